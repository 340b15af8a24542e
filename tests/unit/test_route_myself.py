"""Mail-loop identity (relay.delivery.route.Myself, is_local_address): IPv4-mapped IPv6 MX
addresses and wildcard listeners (issue 5 review; Postfix smtp_addr.c "mail for D loops back
to myself", RFC 5321 §5.1)."""

from __future__ import annotations

import pytest

from relay.config import Endpoint
from relay.dane.policy import Action
from relay.delivery.planner import MxHost
from relay.delivery.route import Myself, is_local_address, resolve_host
from relay.errors import MailLoop
from relay.lookup.results import AnswerKind, DnsAnswer, MxRecord, Security

pytestmark = pytest.mark.timeout(10)


class OneHost:
    """A resolver that knows the addresses of one host and nothing else."""

    def __init__(self, name: str, *addresses: str) -> None:
        self.name, self.records = name, addresses

    async def mx(self, domain: str) -> DnsAnswer[MxRecord]:
        raise AssertionError("no MX lookup expected")

    async def addresses(self, host: str) -> DnsAnswer[str]:
        assert host == self.name
        return DnsAnswer(host, AnswerKind.DATA, Security.SECURE, self.records)

    async def tlsa(self, host: str, port: int) -> DnsAnswer[object]:
        return DnsAnswer(f"_{port}._tcp.{host}", AnswerKind.NODATA, Security.SECURE)


def only(*local: str) -> object:
    """An `is_local` that knows exactly these addresses (and records what it was asked)."""
    asked: list[str] = []

    def is_local(address: str) -> bool:
        asked.append(address)
        return address in local

    is_local.asked = asked  # type: ignore[attr-defined]
    return is_local


def test_an_ipv4_mapped_mx_address_is_the_relays_ipv4_listen_address() -> None:
    me = Myself.of("relay.example.net", (Endpoint("192.0.2.25", 25),), 25)
    assert me.loops("mx.example.org", "", ("::ffff:192.0.2.25",)) == (
        "address ::ffff:192.0.2.25 is this relay's (server.listen)"
    )
    assert me.loops("mx.example.org", "", ("::ffff:c000:219",)) != ""  # same, hex spelling
    assert me.loops("mx.example.org", "", ("::ffff:192.0.2.26",)) == ""


def test_an_ipv4_mapped_listen_address_is_its_ipv4_address() -> None:
    me = Myself.of(None, (Endpoint("::ffff:127.0.0.1", 25),), 25)
    assert me.addresses == frozenset({"127.0.0.1"})
    assert me.loops("mx.example.org", "", ("127.0.0.1",)) != ""


def test_a_wildcard_listener_makes_every_local_address_of_its_family_the_relay() -> None:
    is_local = only("198.51.100.4", "2001:db8::4")
    v4 = Myself.of("relay.example.net", (Endpoint("0.0.0.0", 25),), 25, is_local)  # type: ignore[arg-type]
    assert v4.wildcards == frozenset({"0.0.0.0"}) and v4.addresses == frozenset()
    assert v4.loops("mx.example.org", "", ("203.0.113.1", "198.51.100.4")) == (
        "address 198.51.100.4 is local and this relay listens on 0.0.0.0 (server.listen)"
    )
    # A mapped address is the IPv4 address it maps (RFC 4291 §2.5.5.2).
    assert v4.loops("mx.example.org", "", ("::ffff:198.51.100.4",)) != ""
    # An IPv4 wildcard is no IPv6 address (and the other way round: "::" is IPV6_V6ONLY).
    assert v4.loops("mx.example.org", "", ("2001:db8::4",)) == ""
    v6 = Myself.of(None, (Endpoint("::", 25),), 25, is_local)  # type: ignore[arg-type]
    assert v6.loops("mx.example.org", "", ("2001:db8::4",)) != ""
    assert v6.loops("mx.example.org", "", ("198.51.100.4",)) == ""
    assert is_local.asked == ["203.0.113.1", "198.51.100.4", "198.51.100.4", "2001:db8::4"]  # type: ignore[attr-defined]


def test_a_wildcard_on_another_port_is_not_the_delivery_port() -> None:
    is_local = only("127.0.0.1")
    me = Myself.of(None, (Endpoint("0.0.0.0", 2525),), 25, is_local)  # type: ignore[arg-type]
    assert me.wildcards == frozenset()
    assert me.loops("mx.example.org", "", ("127.0.0.1",)) == ""


def test_loopback_and_unspecified_addresses_are_always_local_documentation_ones_never() -> None:
    # RFC 1122 §3.2.1.3: all of 127/8 is this host, not only 127.0.0.1.
    for address in ("127.0.0.1", "127.45.6.7", "::1", "::ffff:127.9.9.9", "0.0.0.0", "::"):
        assert is_local_address(address), address
    # RFC 5737 / RFC 3849 documentation addresses are on no interface of a test machine.
    for address in ("192.0.2.77", "2001:db8::77", "fe80::1", "not-an-address"):
        assert not is_local_address(address), address


@pytest.mark.asyncio
async def test_resolve_host_refuses_a_host_at_a_local_address_behind_a_wildcard() -> None:
    # The real is_local_address: every 127/8 address is local.
    me = Myself.of("relay.example.net", (Endpoint("0.0.0.0", 25),), 25)
    route = await resolve_host(
        OneHost("mx.example.org", "127.77.0.5"),  # type: ignore[arg-type]
        MxHost("mx.example.org", 10),
        next_hop="example.org",
        level="dane",
        mx_security=Security.SECURE,
        myself=me,
    )
    assert isinstance(route.failure, MailLoop)
    assert (route.decision.action, route.decision.reason) == (Action.SKIP_HOST, "mail_loop")
    assert str(route.failure.reply) == (
        "554 5.4.6 mail for example.org loops back to myself (address 127.77.0.5 is local "
        "and this relay listens on 0.0.0.0 (server.listen))"
    )


@pytest.mark.asyncio
async def test_resolve_host_refuses_a_mapped_aaaa_of_the_listen_address() -> None:
    me = Myself.of("relay.example.net", (Endpoint("192.0.2.25", 25),), 25)
    route = await resolve_host(
        OneHost("mx.example.org", "::ffff:192.0.2.25"),  # type: ignore[arg-type]
        MxHost("mx.example.org", 10),
        next_hop="example.org",
        level="dane",
        mx_security=Security.SECURE,
        myself=me,
    )
    assert isinstance(route.failure, MailLoop)
    assert "address ::ffff:192.0.2.25 is this relay's" in route.failure.reply.text


def test_the_host_name_is_the_relay_only_at_a_port_it_listens_on() -> None:
    # f2 (review 5b): server.hostname = mx.example.net, listening at :2534 only; a next hop
    # [mx.example.net]:25 or :10025 (a content filter on the same machine) is another server.
    listen = (Endpoint("127.0.0.1", 2534),)
    for port in (25, 10025):
        me = Myself.of("mx.example.net", listen, port)
        assert me.names == frozenset()
        assert me.loops("mx.example.net", "", ("192.0.2.9",)) == ""
    me = Myself.of("mx.example.net", listen, 2534)
    assert me.loops("MX.example.net.", "", ("192.0.2.9",)) == (
        "host name MX.example.net. is this relay (server.hostname)"
    )
    # A wildcard listener at the port counts as listening there too.
    me = Myself.of("mx.example.net", (Endpoint("::", 10025),), 10025, only())  # type: ignore[arg-type]
    assert me.loops("mx.example.net", "", ()) != ""
    # Without a port (no delivery port to compare): every name counts.
    assert Myself.of("mx.example.net", listen).names == frozenset({"mx.example.net"})
