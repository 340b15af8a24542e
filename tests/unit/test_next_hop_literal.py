"""Address-literal next hops (`[192.0.2.1]:25`, `[IPv6:2001:db8::1]`): parsing, the
load-time refusal of levels that need a host name, the policy map, and the route that
delivery and `dane-relay lookup` take (RFC 5321 §4.1.3, RFC 7672 §2.2.2, RFC 6066 §3)."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from relay.config import Endpoint, NextHop, load_config, parse_next_hop
from relay.dane.policy import Action, TlsRequirement
from relay.delivery.planner import MxHost
from relay.delivery.policymap import PolicyMap
from relay.delivery.route import Myself, explicit_route, resolve_host
from relay.errors import (
    ConfigError,
    ConnectFailed,
    DaneNotAvailable,
    MailLoop,
    Scope,
    TemporaryFailure,
)
from relay.lookup.results import DnsAnswer, MxRecord, ProbeResult, Security
from relay.probe import probe
from relay.report import Outcome, lookup, render_json, render_text

WHAT = 'a next hop such as "[mx.example.net]:25" (no MX lookup) or "example.net"'


# -- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "shown"),
    [
        ("[192.0.2.1]", NextHop("192.0.2.1", None, False), "[192.0.2.1]"),
        ("[127.0.0.5]:2525", NextHop("127.0.0.5", 2525, False), "[127.0.0.5]:2525"),
        ("[IPv6:2001:db8::1]:2525", NextHop("2001:db8::1", 2525, False), "[IPv6:2001:db8::1]:2525"),
        ("[ipv6:2001:DB8:0::1]", NextHop("2001:db8::1", None, False), "[IPv6:2001:db8::1]"),
        # Postfix also takes an IPv6 address without the tag.
        ("[2001:db8::1]:587", NextHop("2001:db8::1", 587, False), "[IPv6:2001:db8::1]:587"),
        ("[::1]", NextHop("::1", None, False), "[IPv6:::1]"),
    ],
)  # fmt: skip
def test_address_literals_are_accepted(text: str, expected: NextHop, shown: str) -> None:
    hop = parse_next_hop(text)
    assert hop == expected
    assert hop.literal is True
    assert str(hop) == shown
    assert parse_next_hop(str(hop)) == hop  # what is shown reads back the same


def test_host_names_are_not_literals() -> None:
    assert parse_next_hop("[mx.example.net]:25").literal is False
    assert parse_next_hop("example.net").literal is False


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[192.0.2.1]:99999", " (port 99999 is not 1..65535)"),
        ("[192.0.2.1]:0", " (port 0 is not 1..65535)"),
        ("[192.0.2.1]:smtp", " (port 'smtp' is not a number)"),
        ("example.net:70000", " (port 70000 is not 1..65535)"),
        ("[300.1.1.1]", " ('300.1.1.1' is not an IP address)"),
        ("[192.0.2.1.7]:25", " ('192.0.2.1.7' is not an IP address)"),
        ("[2001:db8::g]", " ('2001:db8::g' is not an IP address)"),
        ("[IPv6:192.0.2.1]", " ('192.0.2.1' is not an IPv6 address)"),
        # Brackets are required: without them the text would be a name to look up.
        ("192.0.2.1", " (an IP address goes in brackets: [192.0.2.1])"),
        ("192.0.2.1:25", " (an IP address goes in brackets: [192.0.2.1]:25)"),
        ("2001:db8::1", " (an IP address goes in brackets: [2001:db8::1])"),
        ("[192.0.2.1]25", ""),
        ("[192.0.2.1", ""),
        ("[]", ""),
    ],
)
def test_invalid_next_hops_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_next_hop(text)
    assert str(info.value) == WHAT + why


# -- configuration ------------------------------------------------------------------------------


def load(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def test_relayhost_literal_loads(tmp_path: Path) -> None:
    cfg = load_config(load(tmp_path, '[delivery]\nrelayhost = "[127.0.0.5]:2525"\n'))
    assert cfg.delivery.relayhost == NextHop("127.0.0.5", 2525, False)


def test_a_bad_port_names_file_key_and_reason(tmp_path: Path) -> None:
    path = load(tmp_path, '[delivery]\nrelayhost = "[127.0.0.5]:99999"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: delivery.relayhost: expected {WHAT} (port 99999 is not 1..65535), "
        "got '[127.0.0.5]:99999'"
    )


def _refusal(path: Path, key: str, hop: str, level: str, source: str) -> str:
    why = (
        "TLSA records are found only at _port._tcp.<host name> (RFC 7672 §2.2.2)"
        if level == "dane-only"
        else "a certificate is verified against a host name"
    )
    return (
        f"{path}: {key}: expected a next hop with a host name for TLS level {level!r} "
        f"(set by {source}), got {hop!r}: an IP address has no name, and {why}; use a host "
        "name, or level none, may, encrypt or dane"
    )


@pytest.mark.parametrize(
    ("text", "key", "hop", "level", "source"),
    [
        # The default level applies to every domain routed to the relayhost.
        ('[tls]\nlevel = "dane-only"\n[delivery]\nrelayhost = "[192.0.2.1]"\n',
         "delivery.relayhost", "[192.0.2.1]", "dane-only", "tls.level"),
        # The next hop's own (exact) entry decides every connection to it.
        ('[tls]\nlevel = "may"\n[tls.policy]\n"192.0.2.1" = "verify"\n'
         '[delivery]\nrelayhost = "[192.0.2.1]:587"\n',
         "delivery.relayhost", "[192.0.2.1]:587", "verify", "tls.policy.192.0.2.1"),
        # A recipient domain's entry, for a domain that goes to the relayhost.
        ('[tls]\nlevel = "may"\n[tls.policy]\n".example.org" = "secure"\n'
         '[delivery]\nrelayhost = "[IPv6:2001:db8::1]"\n',
         "delivery.relayhost", "[IPv6:2001:db8::1]", "secure", "tls.policy..example.org"),
        # A transport entry and the domain's own entry.
        ('[tls]\nlevel = "may"\n[tls.policy]\n"example.org" = "dane-only"\n'
         '[delivery.transport]\n"example.org" = "[192.0.2.1]:25"\n',
         "delivery.transport.example.org", "[192.0.2.1]:25", "dane-only",
         "tls.policy.example.org"),
        # A ".parent" transport entry and an entry for one domain below it.
        ('[tls]\nlevel = "may"\n[tls.policy]\n"a.example.org" = "verify"\n'
         '[delivery.transport]\n".example.org" = "[192.0.2.1]"\n',
         "delivery.transport..example.org", "[192.0.2.1]", "verify",
         "tls.policy.a.example.org"),
        # The gateway's own level.
        ('[gateway]\ndomains = ["local.example"]\nnext_hop = "[10.0.0.5]:25"\n'
         'tls_level = "dane-only"\n',
         "gateway.next_hop", "[10.0.0.5]:25", "dane-only", "gateway.tls_level"),
    ],
)  # fmt: skip
def test_levels_that_need_a_name_are_refused_at_load(
    tmp_path: Path, text: str, key: str, hop: str, level: str, source: str
) -> None:
    path = load(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == _refusal(path, key, hop, level, source)


@pytest.mark.parametrize(
    "text",
    [
        # dane is allowed: it means opportunistic TLS for an address (RFC 7672 §2.2.2).
        '[tls]\nlevel = "dane"\n[delivery]\nrelayhost = "[192.0.2.1]"\n',
        # The literal's own entry lowers nothing it should not: it decides, and it is may.
        '[tls]\nlevel = "dane-only"\n[tls.policy]\n"192.0.2.1" = "may"\n'
        '[delivery]\nrelayhost = "[192.0.2.1]"\n',
        # dane-only applies to the domains routed by name, not to the literal's.
        '[tls]\nlevel = "dane-only"\n[tls.policy]\n"int.example" = "may"\n'
        '[delivery.transport]\n"int.example" = "[192.0.2.1]"\n',
        # A more specific transport entry takes a.example.org (verify) away from the literal.
        '[tls]\nlevel = "may"\n[tls.policy]\n"a.example.org" = "verify"\n'
        '[delivery.transport]\n".example.org" = "[192.0.2.1]"\n'
        '"a.example.org" = "[mx.a.example.org]"\n',
        # An exact transport key does not cover the ".example.org" entry's sub-domains.
        '[tls]\nlevel = "may"\n[tls.policy]\n".example.org" = "secure"\n'
        '[delivery.transport]\n"example.org" = "[192.0.2.1]"\n',
    ],
)
def test_levels_without_a_name_are_accepted(tmp_path: Path, text: str) -> None:
    load_config(load(tmp_path, text))


# -- policy map ------------------------------------------------------------------------------


def test_destination_of_a_literal_relayhost() -> None:
    routes = PolicyMap(
        "dane",
        policy=(("192.0.2.1", "encrypt"), (".2.1", "none"), ("example.org", "may")),
        relayhost=parse_next_hop("[192.0.2.1]:2525"),
    )
    dest = routes.destination("example.org")
    assert (dest.next_hop, dest.mx, dest.literal, dest.port, dest.via) == (
        "192.0.2.1",
        False,
        True,
        2525,
        "[192.0.2.1]:2525",
    )
    # The literal's own exact entry decides; a ".parent"-looking key never matches it.
    assert (dest.level, dest.level_match, dest.level_key) == (
        "encrypt",
        "next-hop exact",
        "192.0.2.1",
    )
    other = PolicyMap("dane", policy=((".2.1", "none"),), relayhost=parse_next_hop("[192.0.2.1]"))
    assert other.destination("example.org").level == "dane"


# -- route ---------------------------------------------------------------------------------------


class NoDns:
    """A resolver that must not be asked anything: an address literal is not looked up."""

    async def mx(self, domain: str) -> DnsAnswer[MxRecord]:
        raise AssertionError(f"MX lookup of {domain}")

    async def addresses(self, host: str) -> DnsAnswer[str]:
        raise AssertionError(f"address lookup of {host}")

    async def tlsa(self, host: str, port: int) -> DnsAnswer[object]:
        raise AssertionError(f"TLSA lookup of {host}")


async def literal_route(level: str, myself: Myself | None = None, address: str = "192.0.2.1"):  # type: ignore[no-untyped-def]
    mx = explicit_route(address, literal=True)
    assert mx.dnssec == "-"
    (host,) = mx.plan.hosts
    assert host == MxHost(address, 0, implicit=True)
    return await resolve_host(
        NoDns(),  # type: ignore[arg-type]
        host,
        next_hop=address,
        level=level,
        mx_security=Security.SECURE,
        myself=myself,
        literal=True,
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("level", "requirement", "reason"),
    [
        ("none", TlsRequirement.NONE, "level"),
        ("may", TlsRequirement.MAY, "level"),
        ("encrypt", TlsRequirement.ENCRYPT, "level"),
        # RFC 7672 §2.2.2: no TLSA for an address: opportunistic, with its own reason.
        ("dane", TlsRequirement.MAY, "ip_literal"),
    ],
)
async def test_levels_that_need_no_name_use_the_address(
    level: str, requirement: TlsRequirement, reason: str
) -> None:
    route = await literal_route(level)
    assert route.decision.action is Action.NO_DANE
    assert (route.decision.requirement, route.decision.reason) == (requirement, reason)
    assert route.addresses == ("192.0.2.1",)
    assert (route.literal, route.failure, route.tlsa_lookups, route.dnssec) == (True, None, (), "-")


@pytest.mark.asyncio
async def test_dane_only_at_delivery_time_defers_never_sends() -> None:
    route = await literal_route("dane-only")
    assert route.decision.action is Action.SKIP_HOST
    assert route.decision.reason == "ip_literal"
    assert isinstance(route.failure, DaneNotAvailable)
    assert str(route.failure.reply) == (
        "451 4.7.5 DANE required, but no usable TLSA records for [192.0.2.1]: an IP address"
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("level", ["verify", "secure"])
async def test_pkix_levels_at_delivery_time_defer(level: str) -> None:
    route = await literal_route(level)
    assert route.decision.action is Action.SKIP_HOST
    assert isinstance(route.failure, TemporaryFailure)
    assert str(route.failure.reply) == f"451 4.7.5 TLS level {level} needs a host name"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("address", "listen"),
    [
        ("192.0.2.25", Endpoint("192.0.2.25", 25)),
        ("2001:db8::25", Endpoint("2001:db8:0::25", 25)),
        ("::ffff:192.0.2.25", Endpoint("192.0.2.25", 25)),  # RFC 4291 §2.5.5.2
    ],
)
async def test_a_literal_that_is_the_relay_itself_is_a_mail_loop(
    address: str, listen: Endpoint
) -> None:
    me = Myself.of("relay.example.net", (listen,))
    route = await literal_route("may", me, address)
    assert route.decision.reason == "mail_loop"
    assert isinstance(route.failure, MailLoop)
    assert str(route.failure.reply).startswith(f"554 5.4.6 mail for {address} loops back to myself")


@pytest.mark.asyncio
async def test_a_literal_on_another_port_is_not_a_loop() -> None:
    # Myself.of(..., port) keeps only the listeners on the delivery port.
    me = Myself.of("relay.example.net", (Endpoint("192.0.2.25", 2525),), 25)
    route = await literal_route("may", me, "192.0.2.25")
    assert (route.decision.reason, route.failure) == ("level", None)


# -- dane-relay lookup / probe ------------------------------------------------------------------


class Validating(NoDns):
    async def probe_validation(self) -> ProbeResult:
        return ProbeResult(True, "AD bit set")


class Refusing:
    def __init__(self) -> None:
        self.opened: list[tuple[str, int]] = []

    async def open(self, address: str, port: int) -> object:
        self.opened.append((address, port))
        raise ConnectFailed(f"connect to {address}:{port}: refused", scope=Scope.HOST)


@pytest.mark.asyncio
async def test_lookup_and_probe_show_a_literal_route() -> None:
    routes = PolicyMap("dane", relayhost=parse_next_hop("[IPv6:2001:db8::7]:2525"))
    report = await lookup(Validating(), "example.org", level="dane", policy=routes)  # type: ignore[arg-type]
    assert report.outcome is Outcome.ATTEMPT and report.usable == ("2001:db8::7",)
    lines = render_text(report).splitlines()
    assert lines[1] == (
        "route: level dane (default tls.level); next hop [IPv6:2001:db8::7]:2525 "
        "(delivery.relayhost)"
    )
    assert lines[3:8] == [
        "next hop [IPv6:2001:db8::7]:2525: an IP address: no MX or address lookup "
        "(RFC 5321 §4.1.3)",
        "host 2001:db8::7 (address literal next hop)",
        "  addresses: 2001:db8::7 (as configured, not looked up)",
        "  TLSA: not looked up (the next hop is an IP address: no TLSA records, RFC 7672 §2.2.2)",
        "  TLS: may; address literal, nothing looked up; next hop is an IP address: no TLSA "
        "records, DANE cannot apply: opportunistic TLS (RFC 7672 §2.2.2)",
    ]
    (host,) = json.loads(render_json(report))["hosts"]
    assert (host["literal"], host["addresses"]["status"], host["decision"]["reason"]) == (
        True,
        "not_looked_up",
        "ip_literal",
    )
    transport = Refusing()
    probed = await probe(
        Validating(),  # type: ignore[arg-type]
        transport,  # type: ignore[arg-type]
        ssl.create_default_context(),
        "example.org",
        level="dane",
        helo_name="relay.test",
        policy=routes,
    )
    assert transport.opened == [("2001:db8::7", 2525)]  # the address itself, its port
    assert probed.outcome is Outcome.DEFER
