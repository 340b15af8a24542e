"""relay.delivery.policymap: per-destination TLS level and next hop (pure)."""

from __future__ import annotations

from pathlib import Path

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


def test_mx_next_hop_with_a_port_has_tlsa_at_that_port() -> None:
    """Postfix looks TLSA up at the port it connects to, for MX hosts too (RFC 7672
    §2.2.2, RFC 6698 §3); without a port, at 25 whatever delivery.port is."""
    routes = PolicyMap(
        "dane",
        port=26,
        transport=(
            ("example.org", parse_next_hop("relay.example.net:2525")),
            ("example.com", parse_next_hop("relay.example.net")),
        ),
    )
    dest = routes.destination("example.org")
    assert (dest.next_hop, dest.mx, dest.port, dest.tlsa_port) == (
        "relay.example.net",
        True,
        2525,
        2525,
    )
    dest = routes.destination("example.com")
    assert (dest.next_hop, dest.mx, dest.port, dest.tlsa_port) == (
        "relay.example.net",
        True,
        26,
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
        "1.2.3.4",
        "[1.2.3.4.5]",
        "[::1]x",
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
    # Through the relayhost, whose own entry decides the level (next-hop precedence).
    assert (sub.level, sub.level_match, sub.level_key) == (
        "secure",
        "next-hop exact",
        "smart.example",
    )
    assert (sub.hop_match, sub.via, sub.overridden_key) == (
        "relayhost",
        "[smart.example]",
        ".parent.example",
    )
    assert "next-hop exact; overrides the recipient domain's '.parent.example')" in sub.why
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


_SMART = parse_next_hop("[smart.example.net]:587")


@pytest.mark.parametrize(
    ("policy", "transport", "relayhost", "domain", "expected"),
    [
        # The issue: a recipient-domain entry must not lower a stricter smarthost entry.
        (
            (("smart.example.net", "dane-only"), ("dane-bad.test", "none")),
            (),
            _SMART,
            "dane-bad.test",
            ("dane-only", "next-hop exact", "smart.example.net", "dane-bad.test"),
        ),
        (
            (("smart.example.net", "dane-only"), (".com", "may")),
            (),
            _SMART,
            "shop.example.com",
            ("dane-only", "next-hop exact", "smart.example.net", ".com"),
        ),
        # A ".parent" entry covering the next-hop host counts as the host's own entry.
        (
            ((".example.net", "secure"), ("dane-bad.test", "none")),
            (),
            _SMART,
            "dane-bad.test",
            ("secure", "next-hop parent", ".example.net", "dane-bad.test"),
        ),
        # No entry for the next hop: the recipient domain's entry decides (even a weaker one).
        (
            (("dane-bad.test", "none"),),
            (),
            _SMART,
            "dane-bad.test",
            ("none", "exact", "dane-bad.test", ""),
        ),
        # Neither: the default.
        ((), (), _SMART, "dane-bad.test", ("dane", "default", "", "")),
        # A [delivery.transport] next hop is a next hop like the relayhost.
        (
            (("mx.int.example", "secure"), ("int.test", "may")),
            (("int.test", parse_next_hop("[mx.int.example]")),),
            None,
            "int.test",
            ("secure", "next-hop exact", "mx.int.example", "int.test"),
        ),
        # Transport to the domain itself (MX lookup of the same name): its own entry.
        (
            (("self.test", "may"),),
            (("self.test", parse_next_hop("self.test")),),
            _SMART,
            "self.test",
            ("may", "exact", "self.test", ""),
        ),
        # The recipient domain's own MX (no next hop configured): the MX host names never
        # take part; the domain's entry decides.
        (
            (("example.org", "dane-only"), (".example.net", "none")),
            (),
            None,
            "example.org",
            ("dane-only", "exact", "example.org", ""),
        ),
    ],
)
def test_next_hop_entry_decides_the_level(
    policy: tuple[tuple[str, str], ...],
    transport: tuple[tuple[str, NextHop], ...],
    relayhost: NextHop | None,
    domain: str,
    expected: tuple[str, str, str, str],
) -> None:
    """Postfix smtp_tls_policy_maps: the level follows the host connected to."""
    routes = PolicyMap("dane", policy=policy, transport=transport, relayhost=relayhost)
    dest = routes.destination(domain)
    assert (dest.level, dest.level_match, dest.level_key, dest.overridden_key) == expected


def test_gateway_domain_keeps_its_tls_level(tmp_path: Path) -> None:
    """[gateway] becomes transport+policy entries; its tls_level applies to its next hop
    unless that host has an entry of its own (which then decides, as for any next hop)."""
    from relay.config import load_config

    conf = tmp_path / "relay.toml"
    base = (
        f'[spool]\ndirectory = "{tmp_path}"\n'
        '[gateway]\ndomains = ["local.example"]\nnext_hop = "[mx.int.example]:2525"\n'
        'tls_level = "encrypt"\n'
    )
    conf.write_text(base)
    cfg = load_config(conf)
    dest = PolicyMap.from_config(cfg.tls, cfg.delivery).destination("local.example")
    assert (dest.level, dest.level_match, dest.next_hop, dest.port) == (
        "encrypt",
        "exact",
        "mx.int.example",
        2525,
    )
    conf.write_text(base + '[tls.policy]\n"mx.int.example" = "secure"\n')
    cfg = load_config(conf)
    dest = PolicyMap.from_config(cfg.tls, cfg.delivery).destination("local.example")
    assert (dest.level, dest.level_match, dest.overridden_key) == (
        "secure",
        "next-hop exact",
        "local.example",
    )
