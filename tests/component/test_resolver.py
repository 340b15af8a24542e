"""relay.lookup.resolver.DnsResolver against a scripted DNS server on loopback.

Nothing is mocked: the resolver sends real UDP/TCP queries to `lab.scripted_dns.ScriptedDns`,
which answers with dnspython-built messages whose rcode, AD bit, EDE option, TC bit, CNAMEs
and SOA are scripted per test. Each test asserts the exact answer (kind, security, records,
canonical name, TTL) or the exact `DnsTempFail.kind`, and where it matters the number of
queries the server saw and the observer events the resolver reported.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rrset
import pytest
from lab.observer import Observer
from lab.scripted_dns import (
    Answer,
    Custom,
    Drop,
    Garbage,
    Hold,
    NoData,
    NxDomain,
    Rcode,
    Refused,
    Reply,
    ScriptedDns,
    ServFail,
    Truncated,
)

import relay.lookup.exchange
from relay.config import DnsConfig
from relay.dane.records import TlsaRecord
from relay.errors import DnsTempFail
from relay.lookup.resolver import DnsResolver
from relay.lookup.results import AnswerKind, DnsAnswer, MxRecord, Security

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

DOMAIN = "example.test"
HOST = "mx.example.test"
TLSA_NAME = f"_25._tcp.{HOST}"
DIGEST = bytes(range(32))
QNAME = {"MX": DOMAIN, "A": HOST, "AAAA": HOST, "TLSA": TLSA_NAME}
GOOD = {
    "MX": f"10 {HOST}.",
    "A": "192.0.2.25",
    "AAAA": "2001:db8::25",
    "TLSA": f"3 1 1 {DIGEST.hex()}",
}
RECORDS: dict[str, tuple[Any, ...]] = {
    "MX": (MxRecord(10, HOST),),
    "A": ("192.0.2.25",),
    "AAAA": ("2001:db8::25",),
    "TLSA": (TlsaRecord(3, 1, 1, DIGEST),),
}
RRTYPES = ("MX", "A", "AAAA", "TLSA")
DNSKEY = (
    "257 3 13 "
    + "mdsswUyr3DPW132mOi8V9xESWE8jTo0dxCjjnopKl+GqJxpVXckHAeF+KkxLbxILfDLUT0rAK9iUzy1L53eKGQ=="
)


def make_resolver(
    *servers: ScriptedDns, observer: Observer | None = None, timeout: float = 0.5, **cfg: Any
) -> DnsResolver:
    resolvers = tuple(s.endpoint for s in servers)
    return DnsResolver(DnsConfig(resolvers=resolvers, timeout=timeout, **cfg), observer)


async def lookup(resolver: DnsResolver, rrtype: str) -> DnsAnswer[Any]:
    if rrtype == "MX":
        return await resolver.mx(DOMAIN)
    if rrtype in ("A", "AAAA"):
        return await resolver.addresses(HOST)
    return await resolver.tlsa(HOST, 25)


def script(server: ScriptedDns, rrtype: str, reply: Reply) -> None:
    """`reply` for the type under test; for A/AAAA the other family has no addresses."""
    server.script(QNAME[rrtype], rrtype, reply)
    if rrtype in ("A", "AAAA"):
        server.nodata(HOST, "AAAA" if rrtype == "A" else "A")


async def fails(resolver: DnsResolver, rrtype: str) -> DnsTempFail:
    with pytest.raises(DnsTempFail) as info:
        await lookup(resolver, rrtype)
    return info.value


# -- answers and their security ------------------------------------------------------------


@pytest.mark.parametrize("rrtype", RRTYPES)
@pytest.mark.parametrize("ad", [True, False], ids=["AD", "noAD"])
async def test_answer_security_is_the_ad_bit(server: ScriptedDns, rrtype: str, ad: bool) -> None:
    script(server, rrtype, Answer([GOOD[rrtype]], ttl=120, ad=ad))
    answer = await lookup(make_resolver(server), rrtype)
    assert answer.kind is AnswerKind.DATA
    assert answer.security is (Security.SECURE if ad else Security.INSECURE)
    assert answer.records == RECORDS[rrtype]
    assert (answer.canonical, answer.failed) == ("", ())
    assert answer.ttl == 120


async def test_answer_names_and_ttl(server: ScriptedDns) -> None:
    server.answer(DOMAIN, "MX", f"20 b.{DOMAIN}.", f"10 {HOST}.", ttl=77)
    answer = await make_resolver(server).mx("Example.TEST")
    assert answer.name == "Example.TEST"
    assert sorted(answer.records, key=lambda r: r.preference) == [
        MxRecord(10, HOST),
        MxRecord(20, f"b.{DOMAIN}"),
    ]
    assert answer.ttl == 77
    assert server.count(DOMAIN, "MX", "udp") == 1


async def test_null_mx_has_an_empty_exchange(server: ScriptedDns) -> None:
    # RFC 7505: "0 ." means the domain accepts no mail; the planner bounces on exchange "".
    server.answer(DOMAIN, "MX", "0 .")
    answer = await make_resolver(server).mx(DOMAIN)
    assert answer.records == (MxRecord(0, ""),)


@pytest.mark.parametrize("rrtype", ["MX", "TLSA"])
@pytest.mark.parametrize("kind", [AnswerKind.NXDOMAIN, AnswerKind.NODATA])
@pytest.mark.parametrize("ad", [True, False], ids=["AD", "noAD"])
async def test_negative_answers_carry_security_and_the_rfc2308_ttl(
    server: ScriptedDns, rrtype: str, kind: AnswerKind, ad: bool
) -> None:
    reply_type = NxDomain if kind is AnswerKind.NXDOMAIN else NoData
    server.script(QNAME[rrtype], rrtype, reply_type(ad=ad, negative_ttl=90, soa_ttl=600))
    answer = await lookup(make_resolver(server), rrtype)
    assert (answer.kind, answer.security) == (kind, Security.SECURE if ad else Security.INSECURE)
    assert answer.records == ()
    # RFC 2308 §5: the negative TTL is min(SOA TTL, SOA MINIMUM).
    assert answer.ttl == 90


async def test_negative_answer_ttl_uses_the_soa_record_ttl_when_smaller(
    server: ScriptedDns,
) -> None:
    server.script(DOMAIN, "MX", NoData(negative_ttl=900, soa_ttl=30))
    assert (await make_resolver(server).mx(DOMAIN)).ttl == 30


async def test_negative_answer_without_soa_has_ttl_zero(server: ScriptedDns) -> None:
    server.script(DOMAIN, "MX", NxDomain(soa=False))
    answer = await make_resolver(server).mx(DOMAIN)
    assert (answer.kind, answer.ttl) == (AnswerKind.NXDOMAIN, 0)


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("rrtype", RRTYPES)
async def test_servfail_is_a_servfail_failure(server: ScriptedDns, rrtype: str) -> None:
    script(server, rrtype, ServFail())
    observer = Observer()
    exc = await fails(make_resolver(server, observer=observer), rrtype)
    assert exc.kind == "servfail"
    # Logs, DSNs and the integration tests read this form.
    assert exc.reply.text == (
        f"DNS lookup of {QNAME[rrtype]}/{rrtype} failed: {server.endpoint} answered SERVFAIL"
    )
    other = {"A": [("AAAA", "secure")], "AAAA": [("A", "secure")]}.get(rrtype, [])
    assert sorted(observer.lookups) == sorted([(rrtype, "servfail"), *other])


@pytest.mark.parametrize("rrtype", RRTYPES)
async def test_servfail_with_dnssec_bogus_ede_is_bogus(server: ScriptedDns, rrtype: str) -> None:
    script(server, rrtype, ServFail(ede=6, ede_text="validation failure"))
    exc = await fails(make_resolver(server), rrtype)
    assert exc.kind == "bogus"
    assert "EDE 6 (DNSSEC Bogus): validation failure" in exc.reply.text


@pytest.mark.parametrize("code", [5, 6, 7, 8, 9, 10, 11, 12, 25])
async def test_every_dnssec_failure_ede_code_is_bogus(server: ScriptedDns, code: int) -> None:
    server.script(DOMAIN, "MX", ServFail(ede=code))
    assert (await fails(make_resolver(server), "MX")).kind == "bogus"


@pytest.mark.parametrize("code", [0, 3, 13, 22, 23])
async def test_other_ede_codes_stay_servfail(server: ScriptedDns, code: int) -> None:
    server.script(DOMAIN, "MX", ServFail(ede=code))
    assert (await fails(make_resolver(server), "MX")).kind == "servfail"


async def test_ede_text_is_cleaned_of_control_characters(server: ScriptedDns) -> None:
    server.script(DOMAIN, "MX", ServFail(ede=6, ede_text="bad\r\nRCPT TO:<x>\x00"))
    exc = await fails(make_resolver(server), "MX")
    assert (
        "\r" not in exc.reply.text and "\n" not in exc.reply.text and "\x00" not in exc.reply.text
    )


@pytest.mark.parametrize("rrtype", RRTYPES)
async def test_no_reply_is_a_timeout_within_the_configured_time(
    server: ScriptedDns, rrtype: str
) -> None:
    script(server, rrtype, Drop())
    observer = Observer()
    exc = await fails(make_resolver(server, observer=observer, timeout=0.5), rrtype)
    assert exc.kind == "timeout"
    assert (rrtype, "timeout") in observer.lookups
    assert max(observer.seconds) == pytest.approx(0.5, abs=0.2)


@pytest.mark.parametrize("rrtype", RRTYPES)
async def test_truncated_udp_answer_is_retried_over_tcp(server: ScriptedDns, rrtype: str) -> None:
    script(server, rrtype, Truncated(tcp=Answer([GOOD[rrtype]])))
    answer = await lookup(make_resolver(server), rrtype)
    assert (answer.kind, answer.security, answer.records) == (
        AnswerKind.DATA,
        Security.SECURE,
        RECORDS[rrtype],
    )
    assert server.count(QNAME[rrtype], rrtype, "udp") == 1
    assert server.count(QNAME[rrtype], rrtype, "tcp") == 1


@pytest.mark.parametrize("rrtype", RRTYPES)
async def test_truncated_over_udp_and_tcp_is_truncated(server: ScriptedDns, rrtype: str) -> None:
    script(server, rrtype, Truncated())
    assert (await fails(make_resolver(server), rrtype)).kind == "truncated"
    assert server.count(QNAME[rrtype], rrtype, "tcp") == 1


async def test_truncated_then_dropped_over_tcp_is_a_timeout(server: ScriptedDns) -> None:
    server.script(DOMAIN, "MX", Truncated(tcp=Drop()))
    assert (await fails(make_resolver(server), "MX")).kind == "timeout"


@pytest.mark.parametrize("rrtype", RRTYPES)
async def test_refused_is_refused(server: ScriptedDns, rrtype: str) -> None:
    script(server, rrtype, Refused())
    assert (await fails(make_resolver(server), rrtype)).kind == "refused"


@pytest.mark.parametrize("rcode", [dns.rcode.FORMERR, dns.rcode.NOTIMP, dns.rcode.YXDOMAIN])
async def test_other_rcodes_are_errors(server: ScriptedDns, rcode: int) -> None:
    server.script(DOMAIN, "MX", Rcode(rcode))
    exc = await fails(make_resolver(server), "MX")
    assert exc.kind == "error"
    assert f"answered {dns.rcode.to_text(rcode)}" in exc.reply.text


async def test_undecodable_response_is_malformed(server: ScriptedDns) -> None:
    server.script(DOMAIN, "MX", Garbage())
    assert (await fails(make_resolver(server), "MX")).kind == "malformed"


async def test_datagram_with_another_id_is_ignored(server: ScriptedDns) -> None:
    def wrong_id(query: dns.message.Message, transport: str) -> bytes:
        response = dns.message.make_response(query)
        response.id = (query.id + 1) % 65536
        response.answer.append(dns.rrset.from_text(f"{DOMAIN}.", 60, "IN", "MX", GOOD["MX"]))
        return response.to_wire()

    server.script(DOMAIN, "MX", Custom(wrong_id))
    assert (await fails(make_resolver(server), "MX")).kind == "timeout"


async def test_response_to_another_question_is_malformed(server: ScriptedDns) -> None:
    def other_question(query: dns.message.Message, transport: str) -> bytes:
        forged = dns.message.make_query("other.test.", "MX")
        forged.id = query.id
        response = dns.message.make_response(forged)
        response.flags |= dns.flags.AD
        return response.to_wire()

    server.script(DOMAIN, "MX", Custom(other_question))
    assert (await fails(make_resolver(server), "MX")).kind == "malformed"


async def test_unreachable_resolver_is_a_network_failure() -> None:
    async with ScriptedDns() as gone:
        endpoint = gone.endpoint
    resolver = DnsResolver(DnsConfig(resolvers=(endpoint,), timeout=2.0))
    exc = await fails(resolver, "MX")
    assert exc.kind == "network"


async def test_a_name_that_cannot_be_queried_is_an_error_without_a_query(
    server: ScriptedDns,
) -> None:
    resolver = make_resolver(server)
    with pytest.raises(DnsTempFail) as info:
        await resolver.mx("a..b")
    assert info.value.kind == "error"
    assert server.queries == Counter()


async def test_a_resolver_needs_at_least_one_upstream() -> None:
    with pytest.raises(ValueError, match="at least one resolver"):
        DnsResolver(DnsConfig(resolvers=()))


# -- the query on the wire -----------------------------------------------------------------


async def test_query_has_rd_ad_do_and_a_1232_byte_buffer(server: ScriptedDns) -> None:
    server.answer(DOMAIN, "MX", GOOD["MX"])
    await make_resolver(server).mx(DOMAIN)
    (query,) = server.received
    # RFC 6840 §5.7: AD in the query; RFC 4035 §3.2.1: DO; CD clear so the resolver validates.
    assert query.flags & dns.flags.RD and query.flags & dns.flags.AD
    assert not query.flags & dns.flags.CD
    assert (query.edns, query.payload) == (0, 1232)
    assert query.ednsflags & dns.flags.DO


async def test_unanswered_udp_query_is_retransmitted(
    server: ScriptedDns, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay.lookup.exchange, "UDP_RETRANSMIT", 0.05)
    seen: list[str] = []

    def lose_the_first(query: dns.message.Message, transport: str) -> bytes | None:
        seen.append(transport)
        if len(seen) == 1:
            return None
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(f"{DOMAIN}.", 60, "IN", "MX", GOOD["MX"]))
        return response.to_wire()

    server.script(DOMAIN, "MX", Custom(lose_the_first))
    answer = await make_resolver(server, timeout=2.0).mx(DOMAIN)
    assert answer.records == RECORDS["MX"]
    assert seen == ["udp", "udp"]


# -- CNAME chains --------------------------------------------------------------------------


async def test_cname_chain_is_followed_and_secure_when_every_link_is(
    server: ScriptedDns,
) -> None:
    server.cname(f"www.{DOMAIN}", f"web.{DOMAIN}", ttl=60)
    server.cname(f"web.{DOMAIN}", HOST, ttl=300)
    server.answer(HOST, "A", "192.0.2.25", ttl=120)
    server.nodata(HOST, "AAAA")
    answer = await make_resolver(server).addresses(f"www.{DOMAIN}")
    assert (answer.kind, answer.security, answer.records) == (
        AnswerKind.DATA,
        Security.SECURE,
        ("192.0.2.25",),
    )
    assert answer.canonical == HOST
    assert answer.ttl == 60


@pytest.mark.parametrize("insecure", ["first-link", "second-link", "target"])
async def test_cname_chain_with_one_insecure_part_is_insecure(
    server: ScriptedDns, insecure: str
) -> None:
    server.cname(f"_25._tcp.www.{DOMAIN}", f"_25._tcp.web.{DOMAIN}", ad=insecure != "first-link")
    server.cname(f"_25._tcp.web.{DOMAIN}", TLSA_NAME, ad=insecure != "second-link")
    server.answer(TLSA_NAME, "TLSA", GOOD["TLSA"], ad=insecure != "target")
    answer = await make_resolver(server).tlsa(f"www.{DOMAIN}", 25)
    assert answer.security is Security.INSECURE
    assert (answer.records, answer.canonical) == (RECORDS["TLSA"], TLSA_NAME)


async def test_cname_chain_split_over_responses_is_requeried_and_observed(
    server: ScriptedDns,
) -> None:
    alias = f"_25._tcp.alias.{DOMAIN}"
    server.cname(alias, f"_25._tcp.mid.{DOMAIN}", follow=False)
    server.cname(f"_25._tcp.mid.{DOMAIN}", TLSA_NAME, follow=False)
    server.answer(TLSA_NAME, "TLSA", GOOD["TLSA"])
    observer = Observer()
    answer = await make_resolver(server, observer=observer).tlsa(f"alias.{DOMAIN}", 25)
    assert (answer.kind, answer.security, answer.records) == (
        AnswerKind.DATA,
        Security.SECURE,
        RECORDS["TLSA"],
    )
    assert (answer.name, answer.canonical) == (alias, TLSA_NAME)
    assert [server.count(n, "TLSA") for n in (alias, f"_25._tcp.mid.{DOMAIN}", TLSA_NAME)] == [
        1,
        1,
        1,
    ]
    assert observer.lookups == [("TLSA", "secure"), ("CNAME", "secure"), ("CNAME", "secure")]
    assert observer.cache == Counter({"miss": 1})


async def test_split_chain_is_insecure_when_a_later_response_is(server: ScriptedDns) -> None:
    server.cname(f"www.{DOMAIN}", HOST, follow=False)
    server.answer(HOST, "MX", GOOD["MX"], ad=False)
    answer = await make_resolver(server).mx(f"www.{DOMAIN}")
    assert (answer.security, answer.canonical) == (Security.INSECURE, HOST)


async def test_nxdomain_at_the_cname_target(server: ScriptedDns) -> None:
    server.cname(f"www.{DOMAIN}", f"gone.{DOMAIN}")
    server.nxdomain(f"gone.{DOMAIN}", negative_ttl=40)
    answer = await make_resolver(server).mx(f"www.{DOMAIN}")
    assert (answer.kind, answer.security, answer.canonical, answer.ttl) == (
        AnswerKind.NXDOMAIN,
        Security.SECURE,
        f"gone.{DOMAIN}",
        40,
    )


async def test_nodata_at_the_cname_target_is_not_requeried(server: ScriptedDns) -> None:
    server.cname(f"www.{DOMAIN}", HOST)
    server.nodata(HOST, "MX", negative_ttl=50)
    answer = await make_resolver(server).mx(f"www.{DOMAIN}")
    assert (answer.kind, answer.canonical, answer.ttl) == (AnswerKind.NODATA, HOST, 50)
    assert server.count(HOST, "MX") == 0


async def test_cname_loop_in_one_response(server: ScriptedDns) -> None:
    server.cname(f"a.{DOMAIN}", f"b.{DOMAIN}")
    server.cname(f"b.{DOMAIN}", f"a.{DOMAIN}")
    observer = Observer()
    exc = await fails_mx(make_resolver(server, observer=observer), f"a.{DOMAIN}")
    assert exc.kind == "cname-loop"
    assert f"a.{DOMAIN} -> b.{DOMAIN} -> a.{DOMAIN}" in exc.reply.text
    assert observer.lookups == [("MX", "cname-loop")]


async def test_cname_loop_across_responses(server: ScriptedDns) -> None:
    server.cname(f"a.{DOMAIN}", f"b.{DOMAIN}", follow=False)
    server.cname(f"b.{DOMAIN}", f"a.{DOMAIN}", follow=False)
    exc = await fails_mx(make_resolver(server), f"a.{DOMAIN}")
    assert exc.kind == "cname-loop"
    assert (server.count(f"a.{DOMAIN}", "MX"), server.count(f"b.{DOMAIN}", "MX")) == (1, 1)


async def test_cname_loop_is_not_retried_at_the_next_resolver(server: ScriptedDns) -> None:
    async with ScriptedDns() as second:
        for srv in (server, second):
            srv.cname(f"a.{DOMAIN}", f"a.{DOMAIN}")
        exc = await fails_mx(make_resolver(server, second), f"a.{DOMAIN}")
        assert exc.kind == "cname-loop"
        assert second.queries == Counter()


@pytest.mark.parametrize(("links", "works"), [(8, True), (9, False)])
async def test_cname_chain_length_limit(server: ScriptedDns, links: int, works: bool) -> None:
    for i in range(links):
        server.cname(f"c{i}.{DOMAIN}", f"c{i + 1}.{DOMAIN}")
    server.answer(f"c{links}.{DOMAIN}", "MX", GOOD["MX"])
    resolver = make_resolver(server)
    if works:
        answer = await resolver.mx(f"c0.{DOMAIN}")
        assert (answer.records, answer.canonical) == (RECORDS["MX"], f"c{links}.{DOMAIN}")
    else:
        assert (await fails_mx(resolver, f"c0.{DOMAIN}")).kind == "cname-loop"


def _lose_first_datagram(
    links: dict[str, str], final: str
) -> Callable[[dns.message.Message, str], bytes | None]:
    """Answers for a CNAME chain split over responses (`links`: name -> target), where the
    first datagram for each name is lost and only its retransmission is answered."""
    seen: Counter[str] = Counter()

    def build(query: dns.message.Message, transport: str) -> bytes | None:
        name = query.question[0].name.to_text(omit_final_dot=True)
        seen[name] += 1
        if seen[name] == 1:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AD
        if name in links:
            rrset = dns.rrset.from_text(f"{name}.", 60, "IN", "CNAME", f"{links[name]}.")
        else:
            rrset = dns.rrset.from_text(f"{name}.", 60, "IN", "MX", final)
        response.answer.append(rrset)
        return response.to_wire()

    return build


async def test_cname_hops_share_one_deadline_for_the_whole_lookup(
    server: ScriptedDns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # F3: each hop costs one lost datagram and a retransmission (0.2 s). With a fresh
    # timeout per hop, 8 hops would take 1.6 s and succeed; with one 0.5 s deadline for the
    # lookup, it fails after at most 3 hops have been asked.
    monkeypatch.setattr(relay.lookup.exchange, "UDP_RETRANSMIT", 0.2)
    names = [f"c{i}.{DOMAIN}" for i in range(9)]
    links = dict(zip(names, names[1:], strict=False))
    build = _lose_first_datagram(links, GOOD["MX"])
    for name in names:
        server.script(name, "MX", Custom(build))
    observer = Observer()
    exc = await fails_mx(make_resolver(server, observer=observer, timeout=0.5), names[0])
    assert exc.kind == "timeout"
    asked = [name for name in names if server.count(name, "MX")]
    assert asked == names[: len(asked)]
    assert 1 <= len(asked) <= 3
    assert sum(server.count(name, "MX") for name in names) <= 2 * len(asked)
    assert observer.lookups[-1][1] == "timeout"
    assert len(observer.lookups) == len(asked)


async def test_resolvers_tried_on_every_hop_share_the_same_deadline(
    server: ScriptedDns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # F3: the first resolver is dead, the second answers each hop on the retransmission
    # (0.15 s). With a fresh 0.6 s per hop (0.3 s per resolver) every hop would succeed; with
    # one 0.6 s deadline for the lookup, the second hop has too little time left.
    monkeypatch.setattr(relay.lookup.exchange, "UDP_RETRANSMIT", 0.15)
    names = [f"c{i}.{DOMAIN}" for i in range(9)]
    links = dict(zip(names, names[1:], strict=False))
    build = _lose_first_datagram(links, GOOD["MX"])
    async with ScriptedDns() as second:
        for name in names:
            server.script(name, "MX", Drop())
            second.script(name, "MX", Custom(build))
        exc = await fails_mx(make_resolver(server, second, timeout=0.6), names[0])
        assert exc.kind == "timeout"
        asked = [name for name in names if server.count(name, "MX")]
        assert asked == names[: len(asked)]
        assert 1 <= len(asked) <= 3
        assert sum(second.count(name, "MX") for name in names) <= 2 * len(asked)
        assert all(second.count(name, "MX") == 0 for name in names[len(asked) :])


def _cname_rr(owner: str, target: str) -> bytes:
    """One CNAME RR in wire format (no compression)."""
    rdata = dns.name.from_text(target).to_wire()
    assert rdata is not None
    wire = dns.name.from_text(owner).to_wire()
    assert wire is not None
    return wire + struct.pack("!HHIH", 5, 1, 60, len(rdata)) + rdata


async def test_cname_rrset_with_two_targets_is_malformed(server: ScriptedDns) -> None:
    # dnspython keeps one record of a CNAME RRset, so the response is put together by hand:
    # www has two CNAMEs, each target has MX data; neither may be chosen.
    def two_targets(query: dns.message.Message, transport: str) -> bytes:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AD
        response.use_edns(False)  # no OPT record: the CNAMEs go at the end of the message
        head = response.to_wire()
        rrs = _cname_rr(f"www.{DOMAIN}.", f"a.{DOMAIN}.") + _cname_rr(
            f"www.{DOMAIN}.", f"b.{DOMAIN}."
        )
        return head[:6] + struct.pack("!H", 2) + head[8:] + rrs

    server.script(f"www.{DOMAIN}", "MX", Custom(two_targets))
    observer = Observer()
    exc = await fails_mx(make_resolver(server, observer=observer), f"www.{DOMAIN}")
    assert exc.kind == "malformed"
    assert (
        f"sent a CNAME RRset at www.{DOMAIN} with 2 targets (a.{DOMAIN}, b.{DOMAIN})"
        in exc.reply.text
    )
    assert observer.lookups == [("MX", "malformed")]
    assert server.count(f"www.{DOMAIN}", "MX") == 1
    assert (server.count(f"a.{DOMAIN}", "MX"), server.count(f"b.{DOMAIN}", "MX")) == (0, 0)


async def test_a_repeated_identical_cname_is_not_two_targets(server: ScriptedDns) -> None:
    def same_twice(query: dns.message.Message, transport: str) -> bytes:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AD
        response.use_edns(False)  # no OPT record: the CNAMEs go at the end of the message
        head = response.to_wire()
        rr = _cname_rr(f"www.{DOMAIN}.", f"{HOST}.")
        return head[:6] + struct.pack("!H", 2) + head[8:] + rr + rr

    server.script(f"www.{DOMAIN}", "MX", Custom(same_twice))
    server.answer(HOST, "MX", GOOD["MX"])
    answer = await make_resolver(server).mx(f"www.{DOMAIN}")
    assert (answer.records, answer.canonical) == (RECORDS["MX"], HOST)


async def fails_mx(resolver: DnsResolver, name: str) -> DnsTempFail:
    with pytest.raises(DnsTempFail) as info:
        await resolver.mx(name)
    return info.value


# -- A and AAAA together -------------------------------------------------------------------


async def test_a_and_aaaa_are_asked_concurrently_and_merged_in_order(
    server: ScriptedDns,
) -> None:
    gate = asyncio.Event()
    server.script(HOST, "A", Hold(Answer(["192.0.2.25", "192.0.2.26"], ttl=300), gate))
    server.script(HOST, "AAAA", Hold(Answer(["2001:db8::25"], ttl=100), gate))
    observer = Observer()
    task = asyncio.create_task(make_resolver(server, observer=observer).addresses(HOST))
    # Both questions are at the server while neither has been answered.
    await server.wait_count(HOST, "A", 1)
    await server.wait_count(HOST, "AAAA", 1)
    gate.set()
    answer = await task
    assert answer.records[2:] == ("2001:db8::25",)
    assert sorted(answer.records[:2]) == ["192.0.2.25", "192.0.2.26"]
    assert (answer.kind, answer.security, answer.ttl, answer.failed) == (
        AnswerKind.DATA,
        Security.SECURE,
        100,
        (),
    )
    assert sorted(observer.lookups) == [("A", "secure"), ("AAAA", "secure")]
    assert observer.cache == Counter({"miss": 2})


@pytest.mark.parametrize(("a_ad", "aaaa_ad"), [(True, False), (False, True)])
async def test_addresses_are_secure_only_if_both_answers_are(
    server: ScriptedDns, a_ad: bool, aaaa_ad: bool
) -> None:
    server.answer(HOST, "A", "192.0.2.25", ad=a_ad)
    server.nodata(HOST, "AAAA", ad=aaaa_ad)
    answer = await make_resolver(server).addresses(HOST)
    assert (answer.kind, answer.security) == (AnswerKind.DATA, Security.INSECURE)


@pytest.mark.parametrize(
    ("a", "aaaa", "kind"),
    [
        (NxDomain(), NxDomain(), AnswerKind.NXDOMAIN),
        (NoData(), NxDomain(), AnswerKind.NODATA),
        (NoData(), NoData(), AnswerKind.NODATA),
    ],
)
async def test_addresses_without_any_address(
    server: ScriptedDns, a: Reply, aaaa: Reply, kind: AnswerKind
) -> None:
    server.script(HOST, "A", a)
    server.script(HOST, "AAAA", aaaa)
    answer = await make_resolver(server).addresses(HOST)
    assert (answer.kind, answer.security, answer.records) == (kind, Security.SECURE, ())


@pytest.mark.parametrize(
    ("a", "aaaa", "records", "security", "failed"),
    [
        (Answer(["192.0.2.25"]), ServFail(), ("192.0.2.25",), Security.SECURE, ("AAAA",)),
        (Drop(), Answer(["2001:db8::25"], ad=False), ("2001:db8::25",), Security.INSECURE, ("A",)),
    ],
    ids=["AAAA-servfail", "A-timeout"],
)
async def test_one_family_failing_beside_addresses_is_reported_in_failed(
    server: ScriptedDns,
    a: Reply,
    aaaa: Reply,
    records: Sequence[str],
    security: Security,
    failed: tuple[str, ...],
) -> None:
    server.script(HOST, "A", a)
    server.script(HOST, "AAAA", aaaa)
    answer = await make_resolver(server).addresses(HOST)
    assert (answer.kind, answer.records, answer.security, answer.failed) == (
        AnswerKind.DATA,
        tuple(records),
        security,
        failed,
    )


@pytest.mark.parametrize(
    ("a", "aaaa", "kind"),
    [
        (ServFail(), NoData(), "servfail"),
        (NxDomain(), Drop(), "timeout"),
        (Refused(), ServFail(ede=6), "refused"),
        (Drop(), Refused(), "timeout"),
    ],
    ids=["A-fails-AAAA-empty", "AAAA-fails-A-empty", "both-fail", "both-fail-timeout-first"],
)
async def test_failure_without_any_address_raises_the_first_kind(
    server: ScriptedDns, a: Reply, aaaa: Reply, kind: str
) -> None:
    server.script(HOST, "A", a)
    server.script(HOST, "AAAA", aaaa)
    with pytest.raises(DnsTempFail) as info:
        await make_resolver(server).addresses(HOST)
    assert info.value.kind == kind


# -- TLSA RDATA ----------------------------------------------------------------------------


async def test_bad_tlsa_rdata_becomes_records_the_policy_can_judge(server: ScriptedDns) -> None:
    good = bytes([3, 1, 1]) + DIGEST
    short_digest = bytes([3, 1, 1]) + DIGEST[:31]
    server.answer(TLSA_NAME, "TLSA", good, short_digest, bytes([3, 1]), b"", bytes([0]))
    answer = await make_resolver(server).tlsa(HOST, 25)
    assert (answer.kind, answer.security) == (AnswerKind.DATA, Security.SECURE)
    by_data = sorted(answer.records, key=lambda r: (r.usage, r.selector, r.data))
    assert (
        by_data
        == [
            TlsaRecord(0, 1, 1, b""),  # usage 0 kept: unusable for SMTP, not malformed
            TlsaRecord(3, 1, 1, b""),  # two-octet RDATA: missing matching type and data
            TlsaRecord(3, 1, 1, b""),  # empty RDATA
            TlsaRecord(3, 1, 1, DIGEST[:31]),
            TlsaRecord(3, 1, 1, DIGEST),
        ]
    )
    assert [(r.usable, r.malformed) for r in by_data] == [
        (False, False),
        (False, True),
        (False, True),
        (False, True),
        (True, False),
    ]


async def test_thousands_of_short_tlsa_records_are_logged_in_one_line(
    server: ScriptedDns, caplog: pytest.LogCaptureFixture
) -> None:
    # F6: one summary line per RRset (count and the first few), never one line per record.
    def many(query: dns.message.Message, transport: str) -> bytes:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AD
        if transport == "udp":
            response.flags |= dns.flags.TC
            return response.to_wire()
        rrset = response.find_rrset(response.answer, query.question[0].name, 1, 52, create=True)
        for i in range(4000):
            rrset.add(dns.rdata.GenericRdata(1, 52, i.to_bytes(2, "big")), 300)
        return response.to_wire(max_size=65535)

    server.script(TLSA_NAME, "TLSA", Custom(many))
    with caplog.at_level(logging.WARNING, logger="relay.lookup"):
        answer = await make_resolver(server, timeout=5.0).tlsa(HOST, 25)
    assert len(answer.records) == 4000
    assert {r.data for r in answer.records} == {b""}  # each kept, with no data
    warnings = [r.getMessage() for r in caplog.records if r.name == "relay.lookup"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"tlsa={TLSA_NAME} dane=malformed-tlsa count=4000 rdata=")
    assert warnings[0].count(",") == 3  # three RDATA shown, then "+3997 more"
    assert ',+3997 more why="RDATA shorter than the 3-octet TLSA header"' in warnings[0]


async def test_tlsa_uses_the_logical_port_in_the_name(server: ScriptedDns) -> None:
    server.answer(f"_2525._tcp.{HOST}", "TLSA", GOOD["TLSA"])
    answer = await make_resolver(server).tlsa(HOST, 2525)
    assert (answer.name, answer.records) == (f"_2525._tcp.{HOST}", RECORDS["TLSA"])


# -- several resolvers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_reply", "result"),
    [(Refused(), "refused"), (ServFail(), "servfail"), (Garbage(), "malformed")],
)
async def test_next_resolver_is_asked_when_the_first_fails(
    server: ScriptedDns, first_reply: Reply, result: str
) -> None:
    server.script(DOMAIN, "MX", first_reply)
    async with ScriptedDns() as second:
        second.answer(DOMAIN, "MX", GOOD["MX"])
        observer = Observer()
        answer = await make_resolver(server, second, observer=observer).mx(DOMAIN)
        assert answer.records == RECORDS["MX"]
        assert (server.count(DOMAIN, "MX"), second.count(DOMAIN, "MX")) == (1, 1)
        assert observer.lookups == [("MX", result), ("MX", "secure")]


async def test_dead_first_resolver_leaves_time_for_the_second(server: ScriptedDns) -> None:
    server.script(DOMAIN, "MX", Drop())
    async with ScriptedDns() as second:
        second.answer(DOMAIN, "MX", GOOD["MX"])
        observer = Observer()
        answer = await make_resolver(server, second, observer=observer, timeout=1.0).mx(DOMAIN)
        assert answer.records == RECORDS["MX"]
        assert observer.lookups == [("MX", "timeout"), ("MX", "secure")]
        assert observer.seconds[0] == pytest.approx(0.5, abs=0.2)


async def test_unreachable_first_resolver_falls_back(server: ScriptedDns) -> None:
    async with ScriptedDns() as gone:
        dead = gone.endpoint
    server.answer(DOMAIN, "MX", GOOD["MX"])
    observer = Observer()
    cfg = DnsConfig(resolvers=(dead, server.endpoint), timeout=2.0)
    answer = await DnsResolver(cfg, observer).mx(DOMAIN)
    assert answer.records == RECORDS["MX"]
    assert observer.lookups == [("MX", "network"), ("MX", "secure")]


async def test_when_every_resolver_fails_the_most_specific_kind_wins(
    server: ScriptedDns,
) -> None:
    async with ScriptedDns() as gone:
        dead = gone.endpoint
    server.script(DOMAIN, "MX", ServFail(ede=7))
    cfg = DnsConfig(resolvers=(dead, server.endpoint), timeout=2.0)
    with pytest.raises(DnsTempFail) as info:
        await DnsResolver(cfg).mx(DOMAIN)
    assert info.value.kind == "bogus"
    assert str(dead) in info.value.reply.text and str(server.endpoint) in info.value.reply.text


# -- the validation probe ------------------------------------------------------------------


async def test_probe_is_ok_for_secure_data(server: ScriptedDns) -> None:
    server.answer(".", "DNSKEY", DNSKEY)
    observer = Observer()
    result = await make_resolver(server, observer=observer).probe_validation()
    assert (result.ok, result.conclusive) == (True, True)
    assert result.detail == f"./DNSKEY from {server.endpoint} answered with the AD bit (1 record)"
    assert observer.lookups == [("DNSKEY", "secure")]
    assert observer.cache == Counter()


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        (Answer([DNSKEY], ad=False), "answered without the AD bit"),
        (NoData(), "answered no data with the AD bit"),
        (NxDomain(ad=False), "answered NXDOMAIN without the AD bit"),
    ],
)
async def test_probe_fails_conclusively_when_the_resolver_answers_without_secure_data(
    server: ScriptedDns, reply: Reply, said: str
) -> None:
    server.script(".", "DNSKEY", reply)
    result = await make_resolver(server).probe_validation()
    assert (result.ok, result.conclusive) == (False, True)
    assert result.detail == f"./DNSKEY from {server.endpoint} {said}"


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        (ServFail(), "answered SERVFAIL"),
        (ServFail(ede=6), "answered SERVFAIL (EDE 6"),
        (Refused(), "answered REFUSED"),
        (Drop(), "timed out after 0.5s"),
        (Garbage(), "sent an undecodable response"),
    ],
)
async def test_probe_nobody_answers_is_inconclusive(
    server: ScriptedDns, reply: Reply, said: str
) -> None:
    # RFC 7672 §2.1: a failure proves nothing about validation, so it must not turn DANE off.
    server.script(".", "DNSKEY", reply)
    result = await make_resolver(server).probe_validation()
    assert (result.ok, result.conclusive) == (False, False)
    assert result.detail.startswith(f"./DNSKEY from {server.endpoint} {said}")


async def test_probe_of_an_unreachable_resolver_is_inconclusive() -> None:
    async with ScriptedDns() as gone:
        dead = gone.endpoint
    result = await DnsResolver(DnsConfig(resolvers=(dead,), timeout=2.0)).probe_validation()
    assert (result.ok, result.conclusive) == (False, False)
    assert result.detail.startswith(f"./DNSKEY from {dead} network error")


async def test_probe_asks_every_resolver_at_once(server: ScriptedDns) -> None:
    gate = asyncio.Event()
    async with ScriptedDns() as second:
        for srv in (server, second):
            srv.script(".", "DNSKEY", Hold(Answer([DNSKEY]), gate))
        probe = asyncio.create_task(make_resolver(server, second, timeout=5.0).probe_validation())
        # Both questions are at their servers before either is answered: the probe takes
        # one dns.timeout however many resolvers there are.
        await server.wait_count(".", "DNSKEY", 1)
        await second.wait_count(".", "DNSKEY", 1)
        gate.set()
        result = await probe
        assert (result.ok, result.conclusive) == (True, True)
        assert result.detail == (
            f"./DNSKEY from {server.endpoint} answered with the AD bit (1 record); "
            f"./DNSKEY from {second.endpoint} answered with the AD bit (1 record)"
        )


async def test_probe_uses_the_configured_name_and_type_and_bypasses_the_cache(
    server: ScriptedDns,
) -> None:
    server.answer(DOMAIN, "SOA", f"ns.{DOMAIN}. h.{DOMAIN}. 1 2 3 4 5")
    resolver = make_resolver(server, validation_probe_name=DOMAIN, validation_probe_type="SOA")
    assert (await resolver.probe_validation()).ok
    assert (await resolver.probe_validation()).ok
    assert server.count(DOMAIN, "SOA") == 2
    assert len(resolver.cache) == 0


async def test_probe_asks_every_resolver(server: ScriptedDns) -> None:
    server.answer(".", "DNSKEY", DNSKEY)
    async with ScriptedDns() as gone:
        dead = gone.endpoint
    async with ScriptedDns() as plain:
        plain.answer(".", "DNSKEY", DNSKEY, ad=False)
        # An unreachable resolver cannot give unvalidated answers: still ok.
        cfg = DnsConfig(resolvers=(dead, server.endpoint), timeout=2.0)
        result = await DnsResolver(cfg).probe_validation()
        assert (result.ok, result.conclusive) == (True, True)
        assert result.detail.startswith(f"./DNSKEY from {dead} network error")
        # A resolver that answers without validating spoils it.
        cfg = DnsConfig(resolvers=(server.endpoint, plain.endpoint), timeout=2.0)
        result = await DnsResolver(cfg).probe_validation()
        assert (result.ok, result.conclusive) == (False, True)
        assert result.detail.endswith(f"./DNSKEY from {plain.endpoint} answered without the AD bit")
