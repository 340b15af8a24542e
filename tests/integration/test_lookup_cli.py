"""`dane-relay lookup DOMAIN [-c CONFIG] [--json]` as a subprocess against the lab.

Each test checks concrete report lines (or JSON fields) against what the lab publishes
(addresses, TLSA data from the scenario certificates) and the exit status: 0 when mail
would be attempted, 75 when it would be deferred, 69 when it would bounce.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab import DnsLab, write_relay_config

pytestmark = pytest.mark.lab

PLAIN_SPARE = 5  # 127.R.0.5: a non-validating resolver for this module


def _config(lab: DnsLab, path: Path, *, resolver: str | None = None, level: str = "dane") -> Path:
    return write_relay_config(
        path,
        listen=f"{lab.relay_addr}:2525",
        spool_dir=path.parent / "spool",
        resolvers=[resolver or lab.resolver_addr],
        metrics_listen=f"{lab.relay_addr}:9425",
        tls_level=level,
    )


@pytest.fixture
def config(dns_lab: DnsLab, tmp_path: Path) -> Path:
    return _config(dns_lab, tmp_path / "relay.toml")


def _lookup(config: Path, target: str, *extra: str) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-m", "relay", "lookup", target, "-c", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stderr == "", out.stderr
    return out.returncode, out.stdout


def _lookup_json(config: Path, target: str) -> tuple[int, dict[str, Any]]:
    code, stdout = _lookup(config, target, "--json")
    report: dict[str, Any] = json.loads(stdout)
    return code, report


def _tlsa_text(lab: DnsLab, host: str) -> str:
    (record,) = lab.hosts[host].tlsa
    return record.to_text()


def test_dane_domain_shows_secure_mx_address_tlsa_and_dane_verified(
    dns_lab: DnsLab, config: Path
) -> None:
    code, out = _lookup(config, "dane-ok.test")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "domain dane-ok.test: level dane, insecure_mx_policy dane"
    assert lines[2].startswith(f"resolver {dns_lab.resolver_addr}:53: validates DNSSEC (")
    assert lines[3:] == [
        "MX dane-ok.test: secure",
        "  10 mx.dane-ok.test",
        "host mx.dane-ok.test (MX 10)",
        f"  addresses: secure {dns_lab.hosts['mx.dane-ok.test'].address}",
        "  TLSA _25._tcp.mx.dane-ok.test: secure",
        f"    {_tlsa_text(dns_lab, 'mx.dane-ok.test')}",
        "  TLSA base domain: mx.dane-ok.test",
        "  TLS: dane (verified); secure usable TLSA: DANE required (RFC 7672 §2.2)",
        "result: attempt delivery via mx.dane-ok.test",
    ]
    assert _tlsa_text(dns_lab, "mx.dane-ok.test").startswith("3 1 1 ")


def test_dane_domain_as_json(dns_lab: DnsLab, config: Path) -> None:
    code, report = _lookup_json(config, "bob@dane-ok.test")  # an address: its domain
    assert code == 0
    assert report["domain"] == "dane-ok.test"
    assert report["resolver"]["validating"] is True
    assert report["mx"] == {
        "status": "secure",
        "answer": "data",
        "records": [{"preference": 10, "exchange": "mx.dane-ok.test"}],
        "domain": "dane-ok.test",
        "looked_up": True,
        "null_mx": False,
        "implicit": False,
        "error": None,
    }
    (host,) = report["hosts"]
    assert host["name"] == "mx.dane-ok.test"
    assert host["addresses"] == {
        "status": "secure",
        "records": [dns_lab.hosts["mx.dane-ok.test"].address],
        "failed_families": [],
    }
    tlsa = host["tlsa"]
    assert tlsa["base_domain"] == "mx.dane-ok.test"
    assert tlsa["state"] == "secure_usable"
    assert tlsa["records"] == tlsa["usable"] == [_tlsa_text(dns_lab, "mx.dane-ok.test")]
    assert [(x["name"], x["outcome"]) for x in tlsa["lookups"]] == [
        ("_25._tcp.mx.dane-ok.test", "secure")
    ]
    assert host["decision"]["tls"] == "dane (verified)"
    assert (host["decision"]["action"], host["decision"]["label"]) == ("dane", "verified")
    assert host["dnssec"] == "secure"
    assert report["result"] == {"outcome": "attempt", "reply": None, "hosts": ["mx.dane-ok.test"]}


def test_cname_mx_host_uses_the_target_as_tlsa_base_domain(dns_lab: DnsLab, config: Path) -> None:
    code, out = _lookup(config, "cname-ok.test")
    assert code == 0
    lines = out.splitlines()
    start = lines.index("host mx.cname-ok.test (MX 10)")
    assert lines[start + 1 :] == [
        "  CNAME: mx.cname-ok.test -> real.cname-ok.test",
        f"  addresses: secure {dns_lab.hosts['real.cname-ok.test'].address}",
        "  TLSA _25._tcp.real.cname-ok.test: secure",
        f"    {_tlsa_text(dns_lab, 'real.cname-ok.test')}",
        "  TLSA base domain: real.cname-ok.test",
        "  TLS: dane (verified); secure usable TLSA: DANE required (RFC 7672 §2.2)",
        "result: attempt delivery via mx.cname-ok.test",
    ]
    code, report = _lookup_json(config, "cname-ok.test")
    (host,) = report["hosts"]
    assert host["canonical"] == "real.cname-ok.test"
    assert host["tlsa"]["base_domain"] == "real.cname-ok.test"
    # RFC 7672 §2.2.3: the expanded name had records, so the original name was not asked.
    assert [x["name"] for x in host["tlsa"]["lookups"]] == ["_25._tcp.real.cname-ok.test"]


def test_unsigned_domain_gets_no_tlsa_lookup_and_opportunistic_tls(
    dns_lab: DnsLab, config: Path
) -> None:
    code, out = _lookup(config, "unsigned.test")
    assert code == 0
    lines = out.splitlines()
    assert lines[3:] == [
        "MX unsigned.test: insecure",
        "  10 mx.unsigned.test",
        "host mx.unsigned.test (MX 10)",
        f"  addresses: insecure {dns_lab.hosts['mx.unsigned.test'].address}",
        "  TLSA: not looked up (host addresses insecure, RFC 7672 §2.2.2)",
        "  TLS: may; host addresses insecure: TLSA not used, opportunistic TLS (RFC 7672 §2.2.2)",
        "result: attempt delivery via mx.unsigned.test",
    ]


def test_cname_into_an_unsigned_zone_ignores_the_targets_tlsa(config: Path) -> None:
    code, report = _lookup_json(config, "cname-insecure.test")
    assert code == 0
    assert report["mx"]["status"] == "secure"
    (host,) = report["hosts"]
    assert host["canonical"] == "real.cname-unsigned.test"
    assert host["addresses"]["status"] == "insecure"
    assert host["tlsa"]["looked_up"] is False
    assert host["tlsa"]["base_domain"] is None
    assert (host["decision"]["requirement"], host["decision"]["reason"]) == (
        "may",
        "addresses_insecure",
    )


def test_bogus_tlsa_defers_with_4_7_5(config: Path) -> None:
    code, out = _lookup(config, "bogus.test")
    assert code == 75
    lines = out.splitlines()
    tlsa = [x for x in lines if x.startswith("  TLSA _25._tcp.mx.bogus.test: ")]
    assert len(tlsa) == 1
    assert tlsa[0].startswith(
        "  TLSA _25._tcp.mx.bogus.test: lookup failed (bogus): "
        "DNS lookup of _25._tcp.mx.bogus.test/TLSA failed: "
    )
    assert "  TLSA base domain: none (no secure TLSA RRset)" in lines
    assert "  error: 451 4.7.5 TLSA lookup error for mx.bogus.test:25" in lines
    assert lines[-1] == "result: defer: 451 4.7.5 TLSA lookup error for mx.bogus.test:25"


def test_bogus_mx_defers_the_domain_without_looking_at_hosts(config: Path) -> None:
    code, report = _lookup_json(config, "bogus-mx.test")
    assert code == 75
    assert report["mx"]["status"] == "failed"
    assert report["mx"]["error"]["kind"] == "bogus"
    assert report["mx"]["error"]["reply"].startswith(
        "451 4.4.3 DNS lookup of bogus-mx.test/MX failed: "
    )
    assert report["hosts"] == []
    assert report["result"]["outcome"] == "defer"
    assert report["result"]["reply"] == report["mx"]["error"]["reply"]


def test_null_mx_bounces_with_5_1_10(config: Path) -> None:
    code, out = _lookup(config, "nullmx.test")
    assert code == 69
    lines = out.splitlines()
    assert lines[3:] == [
        "MX nullmx.test: secure, null MX (RFC 7505): the domain accepts no mail",
        "  0 .",
        "result: bounce: 556 5.1.10 Domain does not accept mail (null MX)",
    ]
    code, report = _lookup_json(config, "nullmx-addr.test")
    assert code == 69
    assert report["mx"]["null_mx"] is True
    assert report["hosts"] == []  # the domain's own address is never considered
    assert report["result"]["outcome"] == "bounce"


def test_nonexistent_domain_bounces_with_5_1_2(config: Path) -> None:
    code, out = _lookup(config, "no-such-domain.test")
    assert code == 69
    assert out.splitlines()[3:] == [
        "MX no-such-domain.test: NXDOMAIN (secure): the domain does not exist",
        "result: bounce: 550 5.1.2 Host or domain name not found",
    ]


def test_implicit_mx_is_the_domain_itself(dns_lab: DnsLab, config: Path) -> None:
    code, out = _lookup(config, "implicit.test")
    assert code == 0
    lines = out.splitlines()
    assert lines[3:6] == [
        "MX implicit.test: secure, no MX records: implicit MX implicit.test (RFC 5321 §5.1)",
        "host implicit.test (implicit MX)",
        f"  addresses: secure {dns_lab.hosts['implicit.test'].address}",
    ]
    assert "  TLSA base domain: implicit.test" in lines


@pytest.fixture(scope="module")
def plain_resolver(dns_lab: DnsLab) -> Iterator[str]:
    proc = dns_lab.start_resolver(PLAIN_SPARE, validating=False)
    try:
        yield dns_lab.plan.spare(PLAIN_SPARE)
    finally:
        proc.stop()


def test_non_validating_resolver_is_shown_and_dane_becomes_opportunistic(
    dns_lab: DnsLab, plain_resolver: str, tmp_path: Path
) -> None:
    config = _config(dns_lab, tmp_path / "plain.toml", resolver=plain_resolver)
    code, out = _lookup(config, "dane-ok.test")
    assert code == 0
    lines = out.splitlines()
    assert lines[2] == (
        f"resolver {plain_resolver}:53: does NOT validate DNSSEC "
        f"(./DNSKEY from {plain_resolver}:53 answered without the AD bit)"
    )
    assert "MX dane-ok.test: unvalidated" in lines
    assert "  TLSA: not looked up (the resolver does not validate DNSSEC)" in lines
    assert lines[-1] == "result: attempt delivery via mx.dane-ok.test"
    (tls,) = [x for x in lines if x.startswith("  TLS: ")]
    assert tls.startswith("  TLS: may; resolver not validating")

    dane_only = _config(
        dns_lab, tmp_path / "dane-only.toml", resolver=plain_resolver, level="dane-only"
    )
    code, report = _lookup_json(dane_only, "dane-ok.test")
    assert code == 75
    assert report["result"]["outcome"] == "defer"
    assert report["result"]["reply"].startswith("451 4.7.5 ")


# -- DOMAIN arguments that have no DNS name (relay.smtp.domain.ascii_domain) --------------------

# (argument as the shell passes it, shown escaped in the message, the reason given)
BAD_ARGUMENTS = [
    (b"a\xff.test", "'a\\udcff.test'", "not valid IDNA 2008"),  # F8: not UTF-8
    (b"a\x1b[31mred.test", "'a\\x1b[31mred.test'", "character '\\x1b' not allowed"),  # F8: ESC
    (b"a..b.test", "'a..b.test'", "empty label"),  # F7
    (("a" * 64 + ".test").encode(), f"'{'a' * 64}.test'", "label longer than 63 octets"),  # F7
    (".".join(["a" * 63] * 4).encode(), "'", "name longer than 253 octets"),  # F7
    ("pay\u00adpal.de".encode(), "'pay\\xadpal.de'", "not valid IDNA 2008"),  # F1
    (b"exampl\\101.de", "'exampl\\101.de'", "contains a backslash escape"),  # F1
    (b"bob@[192.0.2.1]", "'bob@[192.0.2.1]'", "is an address literal"),  # F10
]


@pytest.mark.parametrize("command", ["lookup", "probe"])
@pytest.mark.parametrize(("argument", "shown", "why"), BAD_ARGUMENTS)
def test_domain_argument_without_a_dns_name_exits_64_with_an_escaped_message(
    config: Path, command: str, argument: bytes, shown: str, why: str
) -> None:
    """F7, F8: exit 64 (EX_USAGE), one line on stderr, no traceback, nothing raw echoed."""
    out = subprocess.run(
        [
            sys.executable.encode(),
            b"-m",
            b"relay",
            command.encode(),
            argument,
            b"-c",
            bytes(config),
        ],
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 64, out
    assert out.stdout == b""
    assert b"Traceback" not in out.stderr
    assert b"\x1b" not in out.stderr and b"\xff" not in out.stderr
    message = out.stderr.decode("ascii")  # escaped: ASCII only
    assert message.startswith(f"dane-relay: {command}: not a mail domain: {shown}"), message
    assert why in message
    assert message.count("\n") == 1


def test_idn_argument_is_looked_up_by_its_a_label(config: Path) -> None:
    """F1: straße.de is looked up as xn--strae-oqa.de (not in the lab: NXDOMAIN, exit 69)."""
    code, report = _lookup_json(config, "bob@straße.de")
    assert report["domain"] == "xn--strae-oqa.de"
    assert report["mx"]["answer"] == "nxdomain"
    assert (code, report["result"]["outcome"]) == (69, "bounce")


def test_relayhost_and_tls_policy_are_what_lookup_resolves(dns_lab: DnsLab, tmp_path: Path) -> None:
    """lookup follows [tls.policy] and delivery.relayhost as delivery does, and says why."""
    config = write_relay_config(
        tmp_path / "smart.toml",
        listen=f"{dns_lab.relay_addr}:2525",
        spool_dir=tmp_path / "spool",
        resolvers=[dns_lab.resolver_addr],
        metrics_listen=f"{dns_lab.relay_addr}:9425",
        tls_level="may",
        relayhost="[mx.dane-ok.test]",
        extra='[tls.policy]\n"mx.dane-ok.test" = "dane-only"\n',
    )
    code, out = _lookup(config, "nullmx.test")  # its own null MX is never looked up
    assert code == 0
    lines = out.splitlines()
    assert lines[:2] == [
        "domain nullmx.test: level dane-only, insecure_mx_policy dane",
        "route: level dane-only ([tls.policy] 'mx.dane-ok.test', next-hop exact); "
        "next hop [mx.dane-ok.test] (delivery.relayhost)",
    ]
    assert "next hop [mx.dane-ok.test]: no MX lookup (explicit next hop, RFC 7672 §2.2.2)" in lines
    assert lines[-1] == "result: attempt delivery via mx.dane-ok.test"
    code, report = _lookup_json(config, "nullmx.test")
    assert (report["route"]["next_hop_match"], report["route"]["level_match"]) == (
        "relayhost",
        "next-hop exact",
    )


def test_an_mx_host_that_is_the_relay_bounces_with_5_4_6(dns_lab: DnsLab, tmp_path: Path) -> None:
    config = write_relay_config(
        tmp_path / "loop.toml",
        # The relay's name is itself only at a port it listens on: 25, where lookup looks.
        listen=[f"{dns_lab.relay_addr}:2525", f"{dns_lab.relay_addr}:25"],
        spool_dir=tmp_path / "spool",
        resolvers=[dns_lab.resolver_addr],
        metrics_listen=f"{dns_lab.relay_addr}:9425",
        hostname="mx.dane-ok.test",
    )
    code, out = _lookup(config, "dane-ok.test")
    assert code == 69
    assert out.splitlines()[-1] == (
        "result: bounce: 554 5.4.6 mail for dane-ok.test loops back to myself "
        "(host name mx.dane-ok.test is this relay (server.hostname))"
    )
