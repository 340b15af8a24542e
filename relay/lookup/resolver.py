"""DNS lookups for the relay: MX, A/AAAA and TLSA answers with their DNSSEC status.

Owns:
    ``DnsResolver``: the relay's only DNS client. It speaks to the configured resolvers
    directly (bytes move through ``relay.lookup.exchange``), reads their responses with
    ``relay.lookup.responses``, follows CNAME chains across responses, and caches answers
    in ``relay.lookup.cache``.

Guarantees (the contract the delivery engine relies on):
    * Every lookup returns a ``DnsAnswer`` whose kind is DATA, NODATA or NXDOMAIN and whose
      security is SECURE (AD bit from a configured resolver) or INSECURE; or it raises
      ``DnsTempFail`` with a ``kind`` token:

      ============ ==================================================================
      servfail     SERVFAIL without a DNSSEC Extended DNS Error
      bogus        SERVFAIL carrying a DNSSEC EDE code (RFC 8914 §4.6-§4.13, §4.26)
      refused      REFUSED
      timeout      no response within ``DnsConfig.timeout``
      truncated    TC set over UDP and again over TCP
      network      resolver unreachable, connection refused or closed
      cname-loop   a CNAME loop, or a chain longer than ``MAX_CNAME_CHAIN``
      malformed    a response that cannot be decoded or does not match the query, or a
                   CNAME RRset with more than one target
      error        any other rcode, or a name that cannot be put in a query
      ============ ==================================================================

      One lookup (one name and record type) ends within ``DnsConfig.timeout``, whatever it
      takes: every CNAME hop the resolver did not finish and every resolver tried share
      that one deadline. Each question goes to the configured resolvers in order, each
      getting an equal share of the time left, before it fails; the kind is then the most
      specific one seen (what a resolver said about the data beats one being unreachable).
      A CNAME loop is a property of the data and is not retried elsewhere.
    * A CNAME chain is followed across responses; the answer is secure only when every
      response on the chain had AD set, and ``canonical`` is the fully expanded name ("" when
      there was no CNAME). ``ttl`` is the smallest TTL on the chain, for NXDOMAIN/NODATA the
      SOA-derived negative TTL (RFC 2308 §5), or 0 when no SOA came with it.
    * TLSA RDATA is never rejected here: each record becomes a ``TlsaRecord`` for
      ``relay.dane.records`` to judge, and a record too short for its 3-octet header becomes
      a malformed one (never an exception, never silently dropped; one WARNING per RRset
      gives their count and the first few, however many there are).
    * Observer: one ``dns_lookup(rrtype, result, seconds)`` per upstream query (per resolver
      tried; the TCP retry belongs to the same query); chain re-queries are reported as
      "CNAME". The cache reports one ``dns_cache`` per lookup of one record type.

Does not:
    Read /etc/resolv.conf, apply a search list, validate DNSSEC itself, decide what an
    answer means for delivery (``relay.delivery``), or judge TLSA usability.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.wire
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from relay.config import DnsConfig, Endpoint
from relay.dane.records import TlsaRecord
from relay.errors import DnsTempFail
from relay.lookup.cache import AnswerCache
from relay.lookup.exchange import exchange
from relay.lookup.responses import (
    EDE_TEXT_MAX,
    MAX_CNAME_CHAIN,
    TLSA_HEADER,
    Walk,
    check_cnames,
    check_rcode,
    follow,
    log_short_tlsa,
    merge_addresses,
    name_text,
    negative_ttl,
    query_name,
    scan,
    soa_for,
    tlsa_record,
)
from relay.lookup.results import (
    AnswerKind,
    DnsAnswer,
    LookupObserver,
    MxRecord,
    ProbeResult,
    Security,
)

__all__ = ["EDNS_PAYLOAD", "MAX_CNAME_CHAIN", "DnsResolver"]

log = logging.getLogger("relay.lookup")

T = TypeVar("T")

#: EDNS0 UDP buffer size: the DNS Flag Day 2020 value, which avoids IP fragmentation.
EDNS_PAYLOAD = 1232

# Kinds that describe the resolver's view of the data, preferred over availability failures.
_DATA_KINDS = ("bogus", "servfail", "truncated", "malformed", "error")


@dataclass(frozen=True, slots=True)
class _Resolved:
    kind: AnswerKind
    security: Security
    rrset: dns.rrset.RRset | None
    canonical: str
    ttl: float


class DnsResolver:
    """Implements relay.lookup.results.Resolver against the configured resolvers.

    Raises:
        ValueError: on construction, when `cfg` names no resolver.
    """

    def __init__(
        self,
        cfg: DnsConfig,
        observer: LookupObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not cfg.resolvers:
            raise ValueError("DnsResolver needs at least one resolver")
        self._cfg = cfg
        self._observer = observer
        self._cache = AnswerCache(
            size=cfg.cache_size,
            min_ttl=cfg.cache_min_ttl,
            max_ttl=cfg.cache_max_ttl,
            negative_ttl=cfg.cache_negative_ttl,
            clock=clock,
            observer=observer,
        )

    @property
    def cache(self) -> AnswerCache:
        return self._cache

    # -- the Resolver protocol -----------------------------------------------------------

    async def mx(self, domain: str) -> DnsAnswer[MxRecord]:
        """The MX RRset of `domain`; an RFC 7505 null MX has exchange "".

        Raises:
            DnsTempFail: see the module docstring for the kinds.
        """
        return await self._cached(domain, "MX", lambda: self._mx(domain))

    async def addresses(self, host: str) -> DnsAnswer[str]:
        """A then AAAA addresses of `host`, looked up concurrently.

        Secure only if both answers are (RFC 7672 §2.2.2). When one family fails and the
        other has addresses, those are returned with ``failed`` naming the failed type.

        Raises:
            DnsTempFail: both lookups failed, or one failed and the other has no address
                (the kind is that of the A failure if A failed, else of AAAA's).
        """
        results = await asyncio.gather(
            self._cached(host, "A", lambda: self._addresses(host, dns.rdatatype.A)),
            self._cached(host, "AAAA", lambda: self._addresses(host, dns.rdatatype.AAAA)),
            return_exceptions=True,
        )
        answers: list[DnsAnswer[str]] = []
        failures: list[tuple[str, DnsTempFail]] = []
        for rrtype, result in zip(("A", "AAAA"), results, strict=True):
            if isinstance(result, DnsTempFail):
                failures.append((rrtype, result))
            elif isinstance(result, BaseException):
                raise result
            else:
                answers.append(result)
        if not failures:
            a, aaaa = answers
            return merge_addresses(host, a, aaaa)
        if answers and answers[0].records:
            return replace(answers[0], failed=tuple(rrtype for rrtype, _ in failures))
        first = failures[0][1]
        text = "; ".join(exc.reply.text for _, exc in failures)
        raise DnsTempFail(text, kind=first.kind) from first

    async def tlsa(self, host: str, port: int) -> DnsAnswer[TlsaRecord]:
        """The TLSA RRset at ``_{port}._tcp.{host}``.

        Raises:
            DnsTempFail: see the module docstring for the kinds.
        """
        # RFC 7672 §2.2.3: TLSA records for SMTP live at _25._tcp.<MX host>.
        qname = f"_{port}._tcp.{host}"
        return await self._cached(qname, "TLSA", lambda: self._tlsa(qname))

    async def probe_validation(self) -> ProbeResult:
        """Ask every resolver, concurrently, for the probe name/type, bypassing the cache.

        ok when at least one resolver answered with data and AD set and none answered
        without AD (a resolver that is merely unreachable does not spoil the result, since
        it cannot give unvalidated answers either). Conclusive when at least one resolver
        answered; when none did (timeout, SERVFAIL, REFUSED, unreachable...) the result is
        not ok and not conclusive: it proves nothing about validation. Takes at most
        ``DnsConfig.timeout``. Never raises for DNS failures.
        """
        probe_name = self._cfg.validation_probe_name
        rrtype = self._cfg.validation_probe_type
        asked = f"{probe_name}/{rrtype}"
        try:
            name = dns.name.from_text(probe_name)
            rdtype = dns.rdatatype.from_text(rrtype)
        except (dns.exception.DNSException, ValueError) as exc:
            return ProbeResult(False, f"{asked}: cannot be asked: {exc}", conclusive=False)
        verdicts = await asyncio.gather(
            *(
                self._probe_one(name, rdtype, rrtype, f"{asked} from {ep}", ep)
                for ep in self._cfg.resolvers
            )
        )
        secure = sum(1 for v, _ in verdicts if v == "secure")
        unvalidated = sum(1 for v, _ in verdicts if v == "unvalidated")
        detail = "; ".join(text for _, text in verdicts)
        # RFC 7672 §2.1: only an answer can show that a resolver does not validate; a
        # resolver that did not answer proves nothing either way.
        return ProbeResult(secure > 0 and unvalidated == 0, detail, secure + unvalidated > 0)

    async def _probe_one(
        self,
        name: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        rrtype: str,
        where: str,
        ep: Endpoint,
    ) -> tuple[str, str]:
        """("secure" | "unvalidated" | "failed", what `ep` said) for the probe question."""
        try:
            response, (_, rrset, _) = await self._query(
                name, rdtype, ep, self._cfg.timeout, rrtype, [name]
            )
        except DnsTempFail as exc:
            return "failed", f"{where} {exc.reply.text}"
        ad = bool(response.flags & dns.flags.AD)
        if rrset is None:
            what = "NXDOMAIN" if response.rcode() == dns.rcode.NXDOMAIN else "no data"
            return (
                "unvalidated",
                f"{where} answered {what}{' with' if ad else ' without'} the AD bit",
            )
        if ad:
            # RFC 4035 §3.2.3: the resolver set AD, so it validated this signed data.
            count = f"{len(rrset)} record{'' if len(rrset) == 1 else 's'}"
            return "secure", f"{where} answered with the AD bit ({count})"
        return "unvalidated", f"{where} answered without the AD bit"

    # -- one record type, cached ---------------------------------------------------------

    async def _cached(
        self, qname: str, rrtype: str, fetch: Callable[[], Awaitable[DnsAnswer[T]]]
    ) -> DnsAnswer[T]:
        answer = await self._cache.lookup(qname, rrtype, fetch)
        return answer if answer.name == qname else replace(answer, name=qname)

    async def _mx(self, domain: str) -> DnsAnswer[MxRecord]:
        r = await self._resolve(query_name(domain), dns.rdatatype.MX)
        records = tuple(
            MxRecord(rd.preference, name_text(rd.exchange))
            for rd in r.rrset or ()
            if isinstance(rd, MX)
        )
        return DnsAnswer(domain, r.kind, r.security, records, r.canonical, r.ttl)

    async def _addresses(self, host: str, rdtype: dns.rdatatype.RdataType) -> DnsAnswer[str]:
        r = await self._resolve(query_name(host), rdtype)
        records = tuple(rd.address for rd in r.rrset or () if isinstance(rd, A | AAAA))
        return DnsAnswer(host, r.kind, r.security, records, r.canonical, r.ttl)

    async def _tlsa(self, qname: str) -> DnsAnswer[TlsaRecord]:
        r = await self._resolve(query_name(qname), dns.rdatatype.TLSA)
        owner = r.rrset.name if r.rrset is not None else dns.name.empty
        rdatas = [rd.data for rd in r.rrset or () if isinstance(rd, dns.rdata.GenericRdata)]
        log_short_tlsa(owner, [rdata for rdata in rdatas if len(rdata) < TLSA_HEADER])
        records = tuple(tlsa_record(rdata) for rdata in rdatas)
        return DnsAnswer(qname, r.kind, r.security, records, r.canonical, r.ttl)

    # -- resolution: CNAME chains across responses ---------------------------------------

    async def _resolve(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Resolved:
        """Ask for (qname, rdtype) and follow its CNAME chain to the end, within one
        ``DnsConfig.timeout`` for the whole lookup: every CNAME hop re-queried and every
        resolver tried share that one deadline.

        Raises:
            DnsTempFail: a query failed or the deadline passed ("timeout"), or the chain
                loops or is too long ("cname-loop").
        """
        deadline = asyncio.get_running_loop().time() + self._cfg.timeout
        chain = [qname]
        name = qname
        label = dns.rdatatype.to_text(rdtype)
        # RFC 7672 §2.2.2: the answer is secure only if every response on the chain was.
        secure = True
        ttl = float("inf")
        while True:
            response, (end, rrset, chain_ttl) = await self._ask(
                name, rdtype, label, chain, deadline
            )
            # RFC 4035 §3.2.3 / RFC 7672 §2.1: AD from a trusted validating resolver = secure.
            secure = secure and bool(response.flags & dns.flags.AD)
            ttl = min(ttl, chain_ttl)
            security = Security.SECURE if secure else Security.INSECURE
            canonical = name_text(end) if end != qname else ""
            if rrset is not None:
                return _Resolved(AnswerKind.DATA, security, rrset, canonical, min(ttl, rrset.ttl))
            soa = soa_for(response, end)
            negative = min(ttl, negative_ttl(soa))
            if response.rcode() == dns.rcode.NXDOMAIN:
                return _Resolved(AnswerKind.NXDOMAIN, security, None, canonical, negative)
            if end == name or soa is not None:
                return _Resolved(AnswerKind.NODATA, security, None, canonical, negative)
            # The response stopped at a CNAME target without data or a negative answer for
            # it: the resolver did not finish the chain, so ask for the target itself.
            name = end
            label = "CNAME"

    async def _ask(
        self,
        name: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        label: str,
        chain: list[dns.name.Name],
        deadline: float,
    ) -> tuple[dns.message.Message, Walk]:
        """One question to the configured resolvers in order, before `deadline` (loop time).

        Raises:
            DnsTempFail: every resolver failed, the deadline had passed before a resolver
                could be asked ("timeout"), or the first answer's CNAME chain loops.
        """
        loop = asyncio.get_running_loop()
        resolvers = self._cfg.resolvers
        what = f"DNS lookup of {name_text(chain[0]) or '.'}/{dns.rdatatype.to_text(rdtype)} failed"
        failures: list[tuple[Endpoint, DnsTempFail]] = []
        for i, ep in enumerate(resolvers):
            left = deadline - loop.time()
            if left <= 0:
                failures.append((ep, DnsTempFail(self._late(chain), kind="timeout")))
                continue
            # Each resolver gets an equal share of the time left, so a dead first resolver
            # cannot use up the whole lookup budget.
            budget = left / (len(resolvers) - i)
            try:
                return await self._query(name, rdtype, ep, budget, label, chain)
            except DnsTempFail as exc:
                if exc.kind == "cname-loop":  # a property of the data, not of this resolver
                    raise DnsTempFail(f"{what}: {exc.reply.text}", kind=exc.kind) from exc
                failures.append((ep, exc))
        text = f"{what}: " + "; ".join(f"{ep} {exc.reply.text}" for ep, exc in failures)
        specific = [exc for _, exc in failures if exc.kind in _DATA_KINDS]
        first = (specific or [exc for _, exc in failures])[0]
        raise DnsTempFail(text, kind=first.kind) from first

    def _late(self, chain: list[dns.name.Name]) -> str:
        """Why a resolver was not asked: the lookup's time ran out (on a CNAME chain)."""
        hops = len(chain) - 1
        where = f" after {hops} CNAME hop{'' if hops == 1 else 's'}" if hops else ""
        return f"not asked: the lookup's {self._cfg.timeout:g}s ran out{where}"

    async def _query(
        self,
        name: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        ep: Endpoint,
        budget: float,
        label: str,
        chain: list[dns.name.Name],
    ) -> tuple[dns.message.Message, Walk]:
        """One upstream query to one resolver within `budget` seconds, and the CNAME walk of
        its answer, observed.

        Raises:
            DnsTempFail: no usable answer from this resolver, or its CNAME chain loops.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            response = await self._exchange(name, rdtype, ep, budget)
            walk = follow(response, name, rdtype, chain)
        except DnsTempFail as exc:
            self._observe(label, exc.kind, loop.time() - started)
            raise
        secure = bool(response.flags & dns.flags.AD)
        self._observe(label, "secure" if secure else "insecure", loop.time() - started)
        return response, walk

    async def _exchange(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType, ep: Endpoint, budget: float
    ) -> dns.message.Message:
        # RFC 4035 §3.2.1 / RFC 3225: DO asks for DNSSEC records; RFC 6840 §5.7: AD in the
        # query asks for the AD bit in the answer; RD: the resolver recurses. CD stays clear
        # (RFC 4035 §3.2.2) so that the resolver validates.
        query = dns.message.make_query(
            name, rdtype, use_edns=0, want_dnssec=True, payload=EDNS_PAYLOAD
        )
        query.flags = dns.flags.RD | dns.flags.AD
        raw = await exchange(query.to_wire(), ep, budget)
        try:
            scanned = scan(raw)
            response = dns.message.from_wire(scanned.wire)
        except Exception as exc:  # hostile input: any parse failure is a malformed response
            why = f"{type(exc).__name__}: {exc}"[:EDE_TEXT_MAX]
            raise DnsTempFail(f"sent an undecodable response ({why})", kind="malformed") from exc
        if not query.is_response(response):
            raise DnsTempFail("sent a response to another question", kind="malformed")
        check_cnames(scanned.cnames)
        check_rcode(response)
        return response

    def _observe(self, label: str, result: str, seconds: float) -> None:
        if self._observer is not None:
            self._observer.dns_lookup(label, result, seconds)
