"""relay.delivery.policymap: per-destination TLS level and next hop (pure)."""

from __future__ import annotations

import pytest

from relay.config import NextHop, parse_next_hop
from relay.delivery.policymap import Destination, PolicyMap, lookup_domain

POLICY = (("example.com", "dane-only"), (".example.com", "verify"), (".com", "may"))


@pytest.mark.parametrize(
    ("domain", "level"),
    [
        ("example.com", "dane-only"),  # exact beats .parent
        ("EXAMPLE.com", "dane-only"),
        ("mx.example.com", "verify"),  # .example.com: sub-domains only
        ("a.b.example.com", "verify"),  # closest parent first
        ("other.com", "may"),
        ("example.org", "dane"),  # the default
        ("bücher.example.com", "verify"),  # looked up as the A-label
    ],
)
def test_level_lookup_exact_then_parent_then_default(domain: str, level: str) -> None:
    assert PolicyMap("dane", policy=POLICY).destination(domain).level == level


def test_lookup_domain_returns_none_without_match() -> None:
    assert lookup_domain({".example.com": 1}, "example.com") is None
    assert lookup_domain({".example.com": 1}, "x.example.com") == 1


def test_default_destination_is_the_domain_by_mx_on_the_delivery_port() -> None:
    routes = PolicyMap("dane", port=2525)
    assert not routes.configured
    assert routes.destination("Example.ORG") == Destination(
        "dane", "example.org", True, 2525, 25, "mx"
    )


def test_explicit_next_hop_has_no_mx_lookup_and_tlsa_at_its_port() -> None:
    """Postfix: TLSA of a [host]:port next hop at _port._tcp.host (RFC 7672 §2.2.2)."""
    routes = PolicyMap("dane", transport=(("example.org", parse_next_hop("[mx.int.example]:587")),))
    assert routes.destination("example.org") == Destination(
        "dane", "mx.int.example", False, 587, 587, "[mx.int.example]:587"
    )
    assert routes.destination("sub.example.org").next_hop == "sub.example.org"


def test_mx_next_hop_keeps_tlsa_at_the_smtp_port() -> None:
    routes = PolicyMap(
        "dane", port=25, transport=(("example.org", parse_next_hop("relay.example.net:2525")),)
    )
    dest = routes.destination("example.org")
    assert (dest.next_hop, dest.mx, dest.port, dest.tlsa_port) == (
        "relay.example.net",
        True,
        2525,
        25,
    )


def test_relayhost_takes_everything_the_transport_map_does_not() -> None:
    routes = PolicyMap(
        "may",
        policy=(("smarthost.example", "dane-only"), ("direct.example", "encrypt")),
        transport=((".direct.example", NextHop("direct.example")),),
        relayhost=parse_next_hop("[smarthost.example]"),
        port=25,
    )
    smart = routes.destination("anything.test")
    assert (smart.next_hop, smart.mx, smart.port, smart.tlsa_port) == (
        "smarthost.example",
        False,
        25,
        25,
    )
    assert smart.level == "dane-only"  # the next hop's own policy entry
    direct = routes.destination("a.direct.example")
    assert (direct.next_hop, direct.mx, direct.level) == ("direct.example", True, "encrypt")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[mx.example.net]", NextHop("mx.example.net", None, False)),
        ("[MX.example.net.]:587", NextHop("mx.example.net", 587, False)),
        ("example.net", NextHop("example.net", None, True)),
        ("example.net:2525", NextHop("example.net", 2525, True)),
    ],
)
def test_parse_next_hop(text: str, expected: NextHop) -> None:
    assert parse_next_hop(text) == expected
    assert parse_next_hop(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[mx.example.net",
        "mx.example.net]",
        "[1.2.3.4]",
        "[::1]:25",
        "a:b:c",
        "mx:0",
        "mx:x",
        "bad_name!",
    ],
)
def test_parse_next_hop_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="a next hop such as"):
        parse_next_hop(text)


def test_destination_says_why_for_each_source() -> None:
    """`dane-relay lookup`/`probe` show where the level and next hop come from."""
    routes = PolicyMap(
        "may",
        policy=(
            ("exact.example", "encrypt"),
            (".parent.example", "dane-only"),
            ("smart.example", "secure"),
        ),
        transport=(("exact.example", parse_next_hop("[mx.int.example]:587")),),
        relayhost=parse_next_hop("[smart.example]"),
    )
    exact = routes.destination("exact.example")
    assert (exact.level_match, exact.level_key, exact.hop_match, exact.hop_key) == (
        "exact",
        "exact.example",
        "exact",
        "exact.example",
    )
    assert "([delivery.transport] 'exact.example', exact)" in exact.why
    sub = routes.destination("a.parent.example")
    assert (sub.level, sub.level_match, sub.level_key) == ("dane-only", "parent", ".parent.example")
    assert (sub.hop_match, sub.via) == ("relayhost", "[smart.example]")
    other = routes.destination("other.test")
    assert (other.level, other.level_match, other.level_key) == (
        "secure",
        "next-hop exact",
        "smart.example",
    )
    assert other.why == (
        "level secure ([tls.policy] 'smart.example', next-hop exact); "
        "next hop [smart.example] (delivery.relayhost)"
    )
    plain = PolicyMap("dane").destination("example.org")
    assert (
        plain.why
        == "level dane (default tls.level); next hop example.org (the domain's own MX hosts)"
    )
    assert (plain.level_match, plain.hop_match) == ("default", "default")


def test_from_config_is_what_the_relay_uses() -> None:
    from relay.config import DeliveryConfig, TlsConfig

    tls = TlsConfig(level="may", policy=(("example.org", "dane-only"),))
    delivery = DeliveryConfig(port=2525, relayhost=parse_next_hop("[smart.example]:587"))
    routes = PolicyMap.from_config(tls, delivery)
    dest = routes.destination("example.org")
    assert (dest.level, dest.next_hop, dest.mx, dest.port, dest.tlsa_port) == (
        "dane-only",
        "smart.example",
        False,
        587,
        587,
    )
    assert routes.destination("x.test").level == "may"
    assert routes.port == 2525
