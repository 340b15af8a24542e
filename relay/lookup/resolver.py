"""dnspython adapter: MX, A/AAAA and TLSA lookups with their DNSSEC status.

Every query is sent with EDNS0 and the DO bit to the configured resolvers only
(no /etc/resolv.conf, no search list). The AD bit in the response is the DNSSEC
status: the configuration only admits resolvers the operator trusts (loopback by
default), as RFC 7672 §2.1 and Postfix's dns_lookup.c require.

Raises `DnsTempFail` for every failure that is not an answer (SERVFAIL, which is
also what a validating resolver says for bogus data; REFUSED; timeouts;
unreachable resolvers; malformed responses). NXDOMAIN and NODATA are answers.
dnspython exceptions never leave this module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TLSA import TLSA

from relay.config import DnsConfig
from relay.dane.records import TlsaRecord
from relay.errors import DnsTempFail
from relay.lookup.results import AnswerKind, DnsAnswer, MxRecord, Security

__all__ = ["DnsResolver"]

log = logging.getLogger("relay.lookup")

# dnspython >= 2.7 refuses a whole response when one TLSA digest has the wrong length,
# which would hide a good record beside it and turn bad data into a timeout. The relay
# decides TLSA usability itself (relay.dane.records, RFC 7671 §4.1, RFC 7672 §2.2), so
# TLSA rdata is parsed without that length check.
if isinstance(getattr(TLSA, "_cert_length_by_mtype", None), dict):
    TLSA._cert_length_by_mtype = {}


@contextmanager
def _dns_errors(qname: str, rdtype: str) -> Iterator[None]:
    try:
        yield
    except dns.resolver.NoNameservers as exc:
        # RFC 7672 §2.1: SERVFAIL (bogus or indeterminate data) is a lookup failure.
        raise DnsTempFail(f"DNS lookup of {qname}/{rdtype} failed: SERVFAIL or refused") from exc
    except dns.exception.Timeout as exc:
        raise DnsTempFail(f"DNS lookup of {qname}/{rdtype} timed out") from exc
    except dns.resolver.YXDOMAIN as exc:
        raise DnsTempFail(f"DNS lookup of {qname}/{rdtype} failed: name too long") from exc
    except dns.exception.DNSException as exc:
        raise DnsTempFail(f"DNS lookup of {qname}/{rdtype} failed: {type(exc).__name__}") from exc
    except (OSError, ValueError) as exc:
        raise DnsTempFail(f"DNS lookup of {qname}/{rdtype} failed: {exc}") from exc


def _security(response: dns.message.Message | None) -> Security:
    # RFC 7672 §2.1 / RFC 4035 §3.2.3: AD set by a trusted validating resolver = secure.
    if response is not None and response.flags & dns.flags.AD:
        return Security.SECURE
    return Security.INSECURE


def _text(name: dns.name.Name) -> str:
    """Lower-case presentation form without the final dot; the root is ""."""
    if name == dns.name.root:
        return ""
    return name.to_text(omit_final_dot=True).lower()


class DnsResolver:
    """Implements relay.lookup.results.Resolver against the configured resolvers."""

    def __init__(self, cfg: DnsConfig) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.nameservers = [
            dns.nameserver.Do53Nameserver(ep.host, ep.port) for ep in cfg.resolvers
        ]
        self._resolver.use_edns(0, dns.flags.DO, 1232)
        self._resolver.flags = dns.flags.RD | dns.flags.AD
        self._resolver.lifetime = cfg.timeout
        self._resolver.timeout = min(cfg.timeout, 3.0)
        self._resolver.retry_servfail = False

    async def _query(
        self, qname: str, rdtype: dns.rdatatype.RdataType
    ) -> tuple[AnswerKind, Security, Sequence[object], str]:
        tname = dns.rdatatype.to_text(rdtype)
        with _dns_errors(qname, tname):
            try:
                answer = await self._resolver.resolve(
                    qname, rdtype, search=False, raise_on_no_answer=False
                )
            except dns.resolver.NXDOMAIN as exc:
                responses = exc.responses()  # type: ignore[no-untyped-call]
                response = next(iter(responses.values()), None) if responses else None
                return AnswerKind.NXDOMAIN, _security(response), (), ""
            security = _security(answer.response)
            canonical = _text(answer.canonical_name)
            if answer.rrset is None:
                return AnswerKind.NODATA, security, (), canonical
            return AnswerKind.DATA, security, list(answer.rrset), canonical

    async def mx(self, domain: str) -> DnsAnswer[MxRecord]:
        kind, security, rdatas, canonical = await self._query(domain, dns.rdatatype.MX)
        records = tuple(
            MxRecord(r.preference, _text(r.exchange)) for r in rdatas if isinstance(r, MX)
        )
        return DnsAnswer(domain, kind, security, records, canonical)

    async def addresses(self, host: str) -> DnsAnswer[str]:
        """A and AAAA together; secure only if every answer that has data is secure."""
        results = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            results.append(await self._query(host, rdtype))
        addrs: list[str] = []
        securities = []
        kinds = []
        canonical = ""
        for kind, security, rdatas, canon in results:
            kinds.append(kind)
            securities.append(security)
            canonical = canonical or canon
            addrs.extend(str(getattr(r, "address", "")) for r in rdatas)
        # RFC 7672 §2.2.2: the address chain is secure only if all of its answers are.
        security = (
            Security.SECURE if all(s is Security.SECURE for s in securities) else Security.INSECURE
        )
        if addrs:
            kind = AnswerKind.DATA
        elif all(k is AnswerKind.NXDOMAIN for k in kinds):
            kind = AnswerKind.NXDOMAIN
        else:
            kind = AnswerKind.NODATA
        return DnsAnswer(host, kind, security, tuple(a for a in addrs if a), canonical)

    async def tlsa(self, host: str, port: int) -> DnsAnswer[TlsaRecord]:
        # RFC 7672 §2.2.3: TLSA records for SMTP live at _25._tcp.<MX host>.
        qname = f"_{port}._tcp.{host}"
        kind, security, rdatas, canonical = await self._query(qname, dns.rdatatype.TLSA)
        records = tuple(
            TlsaRecord(r.usage, r.selector, r.mtype, bytes(r.cert))
            for r in rdatas
            if isinstance(r, TLSA)
        )
        return DnsAnswer(qname, kind, security, records, canonical)
