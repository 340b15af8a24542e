"""`dane-relay lookup` and `probe` follow the per-destination policy delivery uses
([tls.policy], [delivery.transport], delivery.relayhost via relay.delivery.policymap) and
say why; with the relay's identity they refuse an MX host that is the relay (mail loop).
"""

from __future__ import annotations

import json
import ssl
from functools import partial

import pytest

from relay.config import Endpoint, parse_next_hop
from relay.delivery.policymap import PolicyMap
from relay.delivery.route import Myself
from relay.errors import ConnectFailed, Scope
from relay.lookup.results import AnswerKind, DnsAnswer, MxRecord, Security
from relay.probe import probe
from relay.probe import render_text as probe_text
from relay.report import Outcome, lookup, render_json, render_text
from tests.component.test_report import EE, Scripted, _addr

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

S = Security.SECURE
ME = partial(Myself.of, "relay.example.net", (Endpoint("192.0.2.25", 25),))


def _mx_of(domain: str, *hosts: tuple[int, str]) -> DnsAnswer[MxRecord]:
    return DnsAnswer(domain, AnswerKind.DATA, S, tuple(MxRecord(p, h) for p, h in hosts))


def _tlsa_at(qname: str) -> DnsAnswer[object]:
    return DnsAnswer(qname, AnswerKind.DATA, S, (EE,))


async def test_relayhost_is_looked_up_without_mx_and_tlsa_at_its_port() -> None:
    resolver = Scripted(
        _mx_of("example.org", (10, "mx.example.org")),
        {"smart.example": _addr("smart.example", "192.0.2.50")},
        {"_587._tcp.smart.example": _tlsa_at("_587._tcp.smart.example")},  # type: ignore[dict-item]
    )
    routes = PolicyMap(
        "may",
        policy=(("smart.example", "dane-only"),),
        relayhost=parse_next_hop("[smart.example]:587"),
    )
    report = await lookup(resolver, "example.org", level="may", policy=routes)
    assert resolver.asked == ["A smart.example", "TLSA _587._tcp.smart.example"]  # no MX
    assert report.outcome is Outcome.ATTEMPT and report.usable == ("smart.example",)
    assert report.level == "dane-only"
    lines = render_text(report).splitlines()
    assert lines[0] == "domain example.org: level dane-only, insecure_mx_policy dane"
    assert lines[1] == (
        "route: level dane-only ([tls.policy] 'smart.example', next-hop exact); "
        "next hop [smart.example]:587 (delivery.relayhost)"
    )
    assert (
        "next hop [smart.example]:587: no MX lookup (explicit next hop, RFC 7672 §2.2.2)" in lines
    )
    assert "host smart.example (explicit next hop)" in lines
    assert "  TLSA _587._tcp.smart.example: secure" in lines
    doc = json.loads(render_json(report))
    assert doc["route"] == {
        "level": "dane-only",
        "level_match": "next-hop exact",
        "level_key": "smart.example",
        "next_hop": "smart.example",
        "mx_lookup": False,
        "via": "[smart.example]:587",
        "next_hop_match": "relayhost",
        "next_hop_key": None,
        "port": 587,
        "tlsa_port": 587,
        "why": lines[1].removeprefix("route: "),
    }
    assert doc["mx"]["looked_up"] is False and doc["mx"]["domain"] == "smart.example"


async def test_transport_entry_routes_a_subdomain_through_another_mx_domain() -> None:
    resolver = Scripted(
        _mx_of("hub.example.net", (10, "mx.hub.example.net")),
        {"mx.hub.example.net": _addr("mx.hub.example.net", "192.0.2.60")},
        {},
    )
    routes = PolicyMap(
        "dane",
        policy=((".example.org", "encrypt"),),
        transport=((".example.org", parse_next_hop("hub.example.net")),),
    )
    report = await lookup(resolver, "a.example.org", level="dane", policy=routes)
    assert resolver.asked == ["MX hub.example.net", "A mx.hub.example.net"]  # encrypt: no TLSA
    lines = render_text(report).splitlines()
    assert lines[1] == (
        "route: level encrypt ([tls.policy] '.example.org', parent); "
        "next hop hub.example.net ([delivery.transport] '.example.org', parent)"
    )
    assert "MX hub.example.net: secure" in lines
    assert lines[-1] == "result: attempt delivery via mx.hub.example.net"


async def test_without_configuration_the_route_is_the_default() -> None:
    resolver = Scripted(_mx_of("example.org", (10, "mx.example.org")), {}, {})
    report = await lookup(resolver, "example.org", level="dane", policy=PolicyMap("dane"))
    assert render_text(report).splitlines()[1] == (
        "route: level dane (default tls.level); next hop example.org (the domain's own MX hosts)"
    )


async def test_best_mx_that_is_the_relay_bounces_with_5_4_6() -> None:
    resolver = Scripted(
        _mx_of("example.org", (10, "mx.example.org"), (20, "backup.example.org")),
        {
            "mx.example.org": _addr("mx.example.org", "192.0.2.25"),
            "backup.example.org": _addr("backup.example.org", "192.0.2.26"),
        },
        {},
    )
    report = await lookup(resolver, "example.org", level="dane", myself=ME)
    assert report.outcome is Outcome.BOUNCE
    assert report.reply == (
        "554 5.4.6 mail for example.org loops back to myself "
        "(address 192.0.2.25 is this relay's (server.listen))"
    )
    lines = render_text(report).splitlines()
    assert "  TLSA: not looked up (the host is this relay)" in lines
    assert any(x.startswith("  TLS: mail loop; ") for x in lines)
    assert lines[-1] == f"result: bounce: {report.reply}"
    # Without the identity (or on another port) the same host is used.
    plain = await lookup(resolver, "example.org", level="dane")
    assert plain.outcome is Outcome.ATTEMPT


async def test_backup_mx_that_is_the_relay_defers_and_never_uses_worse_hosts() -> None:
    resolver = Scripted(
        _mx_of(
            "example.org",
            (10, "mx.example.org"),
            (20, "relay.example.net"),
            (30, "worse.example.org"),
        ),
        {
            "relay.example.net": _addr("relay.example.net", "198.51.100.1"),
            "worse.example.org": _addr("worse.example.org", "192.0.2.30"),
        },
        {},
    )
    report = await lookup(resolver, "example.org", level="dane", myself=ME)
    # mx.example.org has no address (skipped), then the relay's own MX entry stops it.
    assert report.outcome is Outcome.DEFER
    assert report.reply.startswith("451 4.4.6 mail for example.org loops back to myself")
    assert report.usable == ()  # worse.example.org is never used: the loop stops the domain
    assert [h.host.name for h in report.hosts][-1] == "worse.example.org"


class RefusingTransport:
    def __init__(self) -> None:
        self.opened: list[tuple[str, int]] = []

    async def open(self, address: str, port: int) -> object:
        self.opened.append((address, port))
        raise ConnectFailed(f"connect to {address}:{port}: refused", scope=Scope.HOST)


async def test_probe_connects_to_the_destination_port_unless_overridden() -> None:
    def resolver() -> Scripted:
        return Scripted(
            _mx_of("example.org", (10, "mx.example.org")),
            {"smart.example": _addr("smart.example", "192.0.2.50")},
            {},
        )

    routes = PolicyMap("may", relayhost=parse_next_hop("[smart.example]:587"))
    transport = RefusingTransport()
    report = await probe(
        resolver(),
        transport,  # type: ignore[arg-type]
        ssl.create_default_context(),
        "example.org",
        level="may",
        helo_name="relay.test",
        policy=routes,
    )
    assert transport.opened == [("192.0.2.50", 587)]
    assert report.port == 587
    text = probe_text(report).splitlines()
    assert (
        text[1]
        == "route: level may (default tls.level); next hop [smart.example]:587 (delivery.relayhost)"
    )
    transport = RefusingTransport()
    await probe(
        resolver(),
        transport,  # type: ignore[arg-type]
        ssl.create_default_context(),
        "example.org",
        level="may",
        helo_name="relay.test",
        policy=routes,
        port=2525,
    )
    assert transport.opened == [("192.0.2.50", 2525)]


async def test_probe_does_not_connect_to_itself() -> None:
    resolver = Scripted(
        _mx_of("example.org", (10, "relay.example.net")),
        {"relay.example.net": _addr("relay.example.net", "192.0.2.99")},
        {},
    )
    transport = RefusingTransport()
    report = await probe(
        resolver,
        transport,  # type: ignore[arg-type]
        ssl.create_default_context(),
        "example.org",
        level="dane",
        helo_name="relay.example.net",
        myself=ME,
    )
    assert transport.opened == []
    assert report.outcome is Outcome.BOUNCE
    assert "5.4.6" in report.reply
