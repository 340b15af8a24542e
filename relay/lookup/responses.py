"""Reading one DNS response: rcodes, Extended DNS Errors, CNAME chains, TTLs and raw TLSA.

Owns the parsing half of ``relay.lookup.resolver``: pure functions of a response (wire
bytes or a ``dns.message.Message``) and the question asked. ``scan`` re-types TLSA records
so their RDATA arrives raw and collects every CNAME owner's targets; ``follow`` walks a
chain through the answer section; ``check_rcode`` turns error responses into
``DnsTempFail`` kinds; ``negative_ttl`` applies RFC 2308 §5.

Guarantees: no I/O, no clock. Errors are ``DnsTempFail`` with the kinds documented in
``relay.lookup.resolver``; nothing else escapes for a malformed response.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

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
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.ANY.SOA import SOA

from relay.dane.records import MatchingType, Selector, TlsaRecord, Usage
from relay.errors import DnsTempFail
from relay.lookup.results import (
    AnswerKind,
    DnsAnswer,
    Security,
)
from relay.smtp.domain import ascii_domain

__all__ = [
    "BOGUS_EDE",
    "EDE_TEXT_MAX",
    "OPAQUE_TYPE",
    "SHOWN_MAX",
    "Scanned",
    "TLSA_HEADER",
    "Walk",
    "check_cnames",
    "check_rcode",
    "ede_text",
    "follow",
    "log_short_tlsa",
    "merge_addresses",
    "name_text",
    "negative_ttl",
    "query_name",
    "scan",
    "soa_for",
    "tlsa_record",
]

log = logging.getLogger("relay.lookup")

#: Longest CNAME chain followed; longer chains are treated like loops.
MAX_CNAME_CHAIN = 8

# RFC 8914 §4.6-§4.13 and §4.26: the EDE codes that say DNSSEC validation failed
# (indeterminate, bogus, signature expired / not yet valid, DNSKEY / RRSIGs / NSEC missing,
# no zone key bit, signature expired before valid).
BOGUS_EDE = frozenset({5, 6, 7, 8, 9, 10, 11, 12, 25})
# TLSA RRs are re-typed to this private-use type (RFC 6895 §3.1) before parsing, so that
# dnspython hands over their raw RDATA (see scan).
OPAQUE_TYPE = dns.rdatatype.RdataType.make(65534)
TLSA_HEADER = 3
SHOWN_MAX = 3  # records quoted in one log line or error text
EDE_TEXT_MAX = 80


def name_text(name: dns.name.Name) -> str:
    """Lower-case presentation form without the final dot; the root is ""."""
    if name == dns.name.root:
        return ""
    return name.to_text(omit_final_dot=True).lower()


def query_name(text: str) -> dns.name.Name:
    """The query name for `text`, through `relay.smtp.domain.ascii_domain` only.

    Never ``dns.name.from_text``: its IDNA 2003 fallback maps straße.de to strasse.de and
    it decodes RFC 1035 §5.1 escapes (``exampl\\101.de`` is example.de). Callers pass names
    already checked (relay.delivery.route); this is the last line of defence.

    Raises:
        DnsTempFail: kind "error", `text` is not a DNS name.
    """
    try:
        # RFC 5890/5891: IDNA 2008 A-labels; "_" for owner names such as _25._tcp (RFC 7672
        # §2.2.3); no escapes (RFC 5321 §4.1.2).
        ascii_name = ascii_domain(text, underscore=True)
        return dns.name.Name([*(label.encode("ascii") for label in ascii_name.split(".")), b""])
    except (dns.exception.DNSException, ValueError) as exc:
        shown = ascii(text)
        raise DnsTempFail(f"cannot look up {shown}: not a DNS name ({exc})", kind="error") from exc


@dataclass(frozen=True, slots=True)
class Scanned:
    wire: bytes  # the response with every TLSA RR re-typed to OPAQUE_TYPE
    cnames: dict[dns.name.Name, set[dns.name.Name]]  # answer-section CNAME owner -> targets


def scan(wire: bytes) -> Scanned:
    """`wire` with every TLSA RR re-typed to a private type whose RDATA dnspython keeps raw,
    and the targets of every CNAME in the answer section.

    dnspython refuses a whole response when one TLSA record has a digest of the wrong length
    (2.7+) or is shorter than its header; the relay judges each record itself instead
    (RFC 7671 §4.1, RFC 7672 §2.2), so one bad record cannot hide the good ones beside it.
    dnspython also keeps only one record of a CNAME RRset (a singleton type), so the relay
    counts the targets on the wire itself.

    Raises:
        dns.exception.FormError: the message structure is broken.
    """
    parser = dns.wire.Parser(wire)
    _, _, qdcount, ancount, nscount, arcount = parser.get_struct("!HHHHHH")
    for _ in range(qdcount):
        parser.get_name(decompress=True)
        parser.get_struct("!HH")
    out = bytearray(wire)
    cnames: dict[dns.name.Name, set[dns.name.Name]] = {}
    for index in range(ancount + nscount + arcount):
        owner = parser.get_name(decompress=True)
        type_at = parser.current
        rdtype, _, _, rdlen = parser.get_struct("!HHIH")
        rdata_at = parser.current
        parser.get_bytes(rdlen)
        if rdtype == dns.rdatatype.TLSA:
            struct.pack_into("!H", out, type_at, OPAQUE_TYPE)
        elif rdtype == dns.rdatatype.CNAME and index < ancount:
            target = dns.wire.Parser(wire, rdata_at).get_name(decompress=True)
            cnames.setdefault(owner, set()).add(target)
    return Scanned(bytes(out), cnames)


def check_cnames(cnames: dict[dns.name.Name, set[dns.name.Name]]) -> None:
    """Raise DnsTempFail (kind "malformed") for a CNAME RRset with more than one target."""
    for owner, targets in cnames.items():
        if len(targets) > 1:
            # RFC 2181 §10.1: a name has at most one CNAME; following one of several would let
            # the order of the records choose the chain (and its DNSSEC status).
            shown = ", ".join(sorted(name_text(t) for t in targets)[:SHOWN_MAX])
            raise DnsTempFail(
                f"sent a CNAME RRset at {name_text(owner)} with {len(targets)} targets ({shown})",
                kind="malformed",
            )


def tlsa_record(rdata: bytes) -> TlsaRecord:
    if len(rdata) >= TLSA_HEADER:
        return TlsaRecord(rdata[0], rdata[1], rdata[2], rdata[TLSA_HEADER:])
    # RFC 6698 §2.1: usage, selector and matching type are one octet each. A shorter RDATA is
    # kept as a record that claims DANE-EE SPKI SHA2-256 with no data (malformed, RFC 7671
    # §4.1), keeping whatever octets are present, so that the policy sees bad DNS data.
    usage = rdata[0] if len(rdata) > 0 else Usage.DANE_EE
    selector = rdata[1] if len(rdata) > 1 else Selector.SPKI
    return TlsaRecord(usage, selector, MatchingType.SHA256, b"")


def log_short_tlsa(owner: dns.name.Name, rdatas: list[bytes]) -> None:
    """One WARNING per RRset for TLSA RDATA shorter than its header: the count and the first
    few, so that a hostile RRset of thousands of records cannot flood the log."""
    if not rdatas:
        return
    shown = ",".join(rdata.hex() or "-" for rdata in rdatas[:SHOWN_MAX])
    more = f",+{len(rdatas) - SHOWN_MAX} more" if len(rdatas) > SHOWN_MAX else ""
    log.warning(
        "tlsa=%s dane=malformed-tlsa count=%d rdata=%s%s "
        'why="RDATA shorter than the 3-octet TLSA header"',
        name_text(owner),
        len(rdatas),
        shown,
        more,
    )


def ede_text(response: dns.message.Message) -> tuple[bool, str]:
    """(carries a DNSSEC-failure EDE, " (EDE ...)" for the error text)."""
    codes = [opt for opt in response.options if isinstance(opt, dns.edns.EDEOption)]
    if not codes:
        return False, ""
    bogus = any(int(opt.code) in BOGUS_EDE for opt in codes)
    shown = []
    for opt in codes:
        extra = "".join(c for c in (opt.text or "") if c.isprintable())[:EDE_TEXT_MAX]
        shown.append(dns.edns.EDEOption(opt.code, extra or None).to_text())
    return bogus, f" ({'; '.join(shown)})"


def check_rcode(response: dns.message.Message) -> None:
    """Raise DnsTempFail unless the response is an answer (NOERROR or NXDOMAIN)."""
    rcode = response.rcode()
    if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return
    bogus, ede = ede_text(response)
    if rcode == dns.rcode.SERVFAIL:
        # RFC 7672 §2.1: bogus or indeterminate data is a lookup failure, never "insecure";
        # RFC 8914: the EDE code tells a DNSSEC failure from other server failures.
        kind = "bogus" if bogus else "servfail"
        raise DnsTempFail(f"answered SERVFAIL{ede}", kind=kind)
    if rcode == dns.rcode.REFUSED:
        raise DnsTempFail(f"answered REFUSED{ede}", kind="refused")
    raise DnsTempFail(f"answered {dns.rcode.to_text(rcode)}{ede}", kind="error")


def soa_for(response: dns.message.Message, name: dns.name.Name) -> dns.rrset.RRset | None:
    """The authority section's SOA RRset for `name` or one of its ancestors."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and name.is_subdomain(rrset.name):
            return rrset
    return None


def negative_ttl(soa: dns.rrset.RRset | None) -> float:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM); 0 without an SOA, which is not to be cached."""
    if soa is None or not isinstance(soa[0], SOA):
        return 0.0
    return float(min(soa.ttl, soa[0].minimum))


# What one response says about a name: (last name on its CNAME chain, that name's RRset of
# the asked type or None, smallest CNAME TTL seen).
Walk = tuple[dns.name.Name, dns.rrset.RRset | None, float]


def follow(
    response: dns.message.Message,
    name: dns.name.Name,
    rdtype: dns.rdatatype.RdataType,
    chain: list[dns.name.Name],
) -> Walk:
    """Walk the answer section from `name`: (last name, its RRset or None, smallest CNAME TTL).

    `chain` holds every name seen so far on this lookup's chain and is extended in place.

    Raises:
        DnsTempFail: kind "cname-loop" for a loop or a chain longer than MAX_CNAME_CHAIN.
    """
    wanted = OPAQUE_TYPE if rdtype == dns.rdatatype.TLSA else rdtype
    ttl = float("inf")
    while True:
        try:
            return name, response.find_rrset(response.answer, name, dns.rdataclass.IN, wanted), ttl
        except KeyError:
            pass
        try:
            cname = response.find_rrset(
                response.answer, name, dns.rdataclass.IN, dns.rdatatype.CNAME
            )
        except KeyError:
            return name, None, ttl
        target = next((rd.target for rd in cname if isinstance(rd, CNAME)), None)
        if target is None:
            return name, None, ttl
        path = " -> ".join(name_text(n) for n in (*chain, target))
        if target in chain:
            raise DnsTempFail(f"CNAME loop {path}", kind="cname-loop")
        if len(chain) > MAX_CNAME_CHAIN:
            raise DnsTempFail(
                f"CNAME chain longer than {MAX_CNAME_CHAIN}: {path}", kind="cname-loop"
            )
        chain.append(target)
        ttl = min(ttl, float(cname.ttl))
        name = target


def merge_addresses(host: str, a: DnsAnswer[str], aaaa: DnsAnswer[str]) -> DnsAnswer[str]:
    # RFC 7672 §2.2.2: the host's addresses are secure only if both answers are.
    both_secure = a.secure and aaaa.secure
    records = a.records + aaaa.records
    if records:
        kind = AnswerKind.DATA
    elif a.kind is AnswerKind.NXDOMAIN and aaaa.kind is AnswerKind.NXDOMAIN:
        kind = AnswerKind.NXDOMAIN
    else:
        kind = AnswerKind.NODATA
    return DnsAnswer(
        host,
        kind,
        Security.SECURE if both_secure else Security.INSECURE,
        records,
        a.canonical or aaaa.canonical,
        min(a.ttl, aaaa.ttl),
    )
