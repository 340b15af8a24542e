"""`dane-relay probe DOMAIN [-c CONFIG] [--resolver ADDR] [--port N] [--json]` against the lab.

The probe runs as a subprocess, resolves through the lab's validating unbound and talks to
the lab's TLS receivers. Each test checks concrete output lines or JSON fields against
what the lab publishes (addresses, TLSA data, certificates), the exit status (0: mail
would be sent with the TLS the policy demands, 75: deferred, 69: bounced, 64: a bad
option), and the receivers' side: the SNI they saw and that no MAIL command ever arrived.
The last test sends real mail through the relay and checks that delivery does what the
probe said.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from lab import DnsLab, ReceiverPool, RelayProcess, send_mail, write_relay_config
from lab.certs import tlsa_data

pytestmark = pytest.mark.lab

UNUSED_SPARE = 9  # 127.R.0.9: nothing listens there (a resolver that never answers)
RelayFactory = Callable[..., RelayProcess]


def _config(lab: DnsLab, path: Path, *, resolver: str | None = None) -> Path:
    return write_relay_config(
        path,
        listen=f"{lab.relay_addr}:2525",
        spool_dir=path.parent / "spool",
        resolvers=[resolver or lab.resolver_addr],
        metrics_listen=f"{lab.relay_addr}:9425",
    )


@pytest.fixture
def config(dns_lab: DnsLab, tmp_path: Path) -> Path:
    return _config(dns_lab, tmp_path / "relay.toml")


def _run(config: Path, target: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "probe", target, "-c", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=90,
    )


def _probe(config: Path, target: str, *extra: str) -> tuple[int, list[str]]:
    out = _run(config, target, *extra)
    assert out.stderr == "", out.stderr  # never a traceback, never a warning
    return out.returncode, out.stdout.splitlines()


def _probe_json(config: Path, target: str, *extra: str) -> tuple[int, dict[str, Any]]:
    out = _run(config, target, "--json", *extra)
    assert out.stderr == "", out.stderr
    document: dict[str, Any] = json.loads(out.stdout)
    return out.returncode, document


def _block(lines: list[str], address: str) -> list[str]:
    """The lines of the connection to `address`, up to its `delivery:` line."""
    start = next(i for i, x in enumerate(lines) if x.startswith(f"  connect {address}:"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("    delivery: "))
    return lines[start : end + 1]


def _spki_sha256(cert_der: bytes) -> str:
    return tlsa_data(cert_der, 1, 1).hex()


def _cert_line(depth: int, cert_der: bytes, subject: str, issuer: str) -> str:
    not_after = x509.load_der_x509_certificate(cert_der).not_valid_after_utc
    return (
        f"      {depth}: {subject}; issuer {issuer}; "
        f"not after {not_after:%Y-%m-%dT%H:%M:%SZ}; SPKI SHA-256 {_spki_sha256(cert_der)}"
    )


def test_dane_ee_domain_is_verified_at_depth_0(
    dns_lab: DnsLab, receivers: ReceiverPool, config: Path
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    host = dns_lab.hosts["mx.dane-ok.test"]
    (record,) = host.tlsa
    code, lines = _probe(config, "dane-ok.test")
    assert code == 0
    # The resolution part is `dane-relay lookup`'s report, word for word.
    assert lines[0] == "domain dane-ok.test: level dane, insecure_mx_policy dane"
    assert lines[3:11] == [
        "MX dane-ok.test: secure",
        "  10 mx.dane-ok.test",
        "host mx.dane-ok.test (MX 10)",
        f"  addresses: secure {host.address}",
        "  TLSA _25._tcp.mx.dane-ok.test: secure",
        f"    {record.to_text()}",
        "  TLSA base domain: mx.dane-ok.test",
        "  TLS: dane (verified); secure usable TLSA: DANE required (RFC 7672 §2.2)",
    ]
    leaf, ca = host.leaf.chain_der
    block = _block(lines, host.address)
    assert block[0] == f"  connect {host.address}:25"
    assert block[1].startswith("    greeting: 220 mx.dane-ok.test ")
    assert block[2] == "    EHLO: STARTTLS offered"
    assert re.fullmatch(r"    STARTTLS: SNI mx\.dane-ok\.test: TLSv1\.[23] \S+", block[3])
    assert block[4:] == [
        "    chain: 2 certificate(s), leaf first",
        _cert_line(0, leaf, "CN=mx.dane-ok.test", "CN=DANE Lab CA"),
        _cert_line(1, ca, "CN=DANE Lab CA", "CN=DANE Lab CA"),
        f"    DANE: verified (match): {record.to_text()} at depth 0",
        f"      DANE-EE(3) SPKI(1) SHA2-256(1) 3 1 1 {record.data[:8].hex()}… matched the leaf "
        "certificate",
        "    delivery: verified",
    ]
    assert record.to_text().startswith("3 1 1 ")
    assert (
        lines[-1] == f"result: attempt delivery via mx.dane-ok.test[{host.address}]:25 (verified)"
    )
    # RFC 7672 §8.1: SNI is the TLSA base domain; the probe stops at QUIT.
    assert receiver.server_names == ["mx.dane-ok.test"]
    assert receiver.mail_commands == []
    assert receiver.messages == []


def test_dane_ee_domain_as_json(dns_lab: DnsLab, receivers: ReceiverPool, config: Path) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    host = dns_lab.hosts["mx.dane-ok.test"]
    (record,) = host.tlsa
    code, doc = _probe_json(config, "bob@dane-ok.test")  # an address: its domain
    assert code == 0
    assert doc["domain"] == "dane-ok.test"
    assert (doc["port"], doc["helo"]) == (25, "relay.test")
    assert doc["mx"]["status"] == "secure"
    (h,) = doc["hosts"]
    assert h["tlsa"]["usable"] == [record.to_text()]
    assert h["tried"] is True
    (conn,) = h["connections"]
    assert conn["address"] == host.address
    assert conn["starttls"] == {"offered": True, "sni": "mx.dane-ok.test", "handshake_error": None}
    assert conn["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert [(c["depth"], c["subject"], c["spki_sha256"]) for c in conn["chain"]] == [
        (0, "CN=mx.dane-ok.test", record.data.hex()),
        (1, "CN=DANE Lab CA", _spki_sha256(host.leaf.chain_der[1])),
    ]
    assert conn["dane"]["status"] == "verified"
    assert (conn["dane"]["matched"], conn["dane"]["match_depth"]) == (record.to_text(), 0)
    assert (conn["delivery"], conn["error"]) == ("verified", None)
    assert doc["result"] == {
        "outcome": "attempt",
        "reply": None,
        "host": "mx.dane-ok.test",
        "address": host.address,
        "tls": "verified",
    }
    assert receiver.mail_commands == []


def test_dane_ta_domain_is_verified_at_the_issuing_ca(
    dns_lab: DnsLab, receivers: ReceiverPool, config: Path
) -> None:
    (receiver,) = receivers.start("dane-ta.test")
    host = dns_lab.hosts["mx.dane-ta.test"]
    (record,) = host.tlsa
    leaf, ca = host.leaf.chain_der
    assert record.to_text() == f"2 1 1 {_spki_sha256(ca)}"  # the CA's key, not the leaf's
    code, doc = _probe_json(config, "dane-ta.test")
    assert code == 0
    (conn,) = doc["hosts"][0]["connections"]
    assert [c["spki_sha256"] for c in conn["chain"]] == [_spki_sha256(leaf), _spki_sha256(ca)]
    dane = conn["dane"]
    assert (dane["status"], dane["reason"]) == ("verified", "match")
    assert dane["matched"] == record.to_text()
    assert dane["match_depth"] == 1  # DANE-TA: the CA certificate the receiver sent, not the leaf
    # RFC 7672 §3.2.2: DANE-TA checks the leaf's name against the reference identifiers.
    assert "'mx.dane-ta.test' is 'mx.dane-ta.test'" in dane["detail"]
    assert conn["delivery"] == "verified"
    assert doc["result"]["outcome"] == "attempt"

    code, lines = _probe(config, "dane-ta.test")
    assert code == 0
    assert f"    DANE: verified (match): {record.to_text()} at depth 1" in lines
    assert receiver.server_names == ["mx.dane-ta.test", "mx.dane-ta.test"]
    assert receiver.mail_commands == []


def test_mismatching_tlsa_defers_with_4_7_5_and_sends_no_mail(
    dns_lab: DnsLab, receivers: ReceiverPool, config: Path
) -> None:
    (receiver,) = receivers.start("dane-bad.test")
    host = dns_lab.hosts["mx.dane-bad.test"]
    code, lines = _probe(config, "dane-bad.test")
    assert code == 75
    block = _block(lines, host.address)
    assert block[-2:] == [
        "    DANE: failed (no-match): no DANE-EE(3) record matches the leaf certificate",
        "    delivery: defer: 451 4.7.5 Server certificate not verified (no-match)",
    ]
    assert lines[-1] == "result: defer: 451 4.7.5 Server certificate not verified (no-match)"
    # The handshake happened (the chain is shown), then QUIT: no MAIL on the wire.
    assert receiver.server_names == ["mx.dane-bad.test"]
    assert receiver.mail_commands == []

    code, doc = _probe_json(config, "dane-bad.test")
    assert code == 75
    (conn,) = doc["hosts"][0]["connections"]
    assert conn["dane"]["status"] == "failed"
    assert (conn["dane"]["matched"], conn["dane"]["match_depth"]) == (None, None)
    assert conn["delivery"] == "defer"
    assert conn["error"] == {
        "kind": "dane_verification",
        "reply": "451 4.7.5 Server certificate not verified (no-match)",
    }
    assert doc["result"]["outcome"] == "defer"
    assert receiver.mail_commands == []


def test_unusable_only_tlsa_means_tls_without_authentication(
    dns_lab: DnsLab, receivers: ReceiverPool, config: Path
) -> None:
    """pkix-tls.test publishes only PKIX-EE 1 1 1: RFC 7672 §3.1.3 makes TLS mandatory but
    unauthenticated (policy row tlsa_unusable -> encrypt), so mail goes "encrypted"."""
    (receiver,) = receivers.start("pkix-tls.test")
    host = dns_lab.hosts["mx.pkix-tls.test"]
    (record,) = host.tlsa
    code, lines = _probe(config, "pkix-tls.test")
    assert code == 0
    assert (
        "  TLS: encrypt; TLSA records all unusable: TLS required, not authenticated "
        "(RFC 7672 §3.1.3)"
    ) in lines
    block = _block(lines, host.address)
    assert block[-2:] == [
        "    DANE: unauthenticated (no-usable-records): no usable TLSA records: "
        f"1 1 1 {record.data[:8].hex()}…: usage PKIX-EE(1) is unusable for SMTP (RFC 7672 §3.1.3)",
        "    delivery: encrypted",
    ]
    assert (
        lines[-1] == f"result: attempt delivery via mx.pkix-tls.test[{host.address}]:25 (encrypted)"
    )

    code, doc = _probe_json(config, "pkix-tls.test")
    assert code == 0
    (h,) = doc["hosts"]
    assert (h["tlsa"]["state"], h["tlsa"]["usable"]) == ("secure_unusable", [])
    assert (h["decision"]["requirement"], h["decision"]["reason"]) == ("encrypt", "tlsa_unusable")
    (conn,) = h["connections"]
    assert conn["dane"]["status"] == "unauthenticated"
    assert conn["delivery"] == "encrypted"
    assert doc["result"]["tls"] == "encrypted"
    assert receiver.server_names == ["mx.pkix-tls.test", "mx.pkix-tls.test"]
    assert receiver.mail_commands == []


def test_unsigned_domain_gets_opportunistic_tls_without_dane(
    dns_lab: DnsLab, receivers: ReceiverPool, config: Path
) -> None:
    (receiver,) = receivers.start("unsigned.test")
    host = dns_lab.hosts["mx.unsigned.test"]
    code, lines = _probe(config, "unsigned.test")
    assert code == 0
    assert "  TLSA: not looked up (host addresses insecure, RFC 7672 §2.2.2)" in lines
    (leaf,) = host.leaf.chain_der  # self-signed
    block = _block(lines, host.address)
    assert block[4:] == [
        "    chain: 1 certificate(s), leaf first",
        _cert_line(0, leaf, "CN=mx.unsigned.test", "CN=mx.unsigned.test"),
        "    DANE: not applied: host addresses insecure: TLSA not used, opportunistic TLS",
        "    delivery: encrypted",
    ]
    assert (
        lines[-1] == f"result: attempt delivery via mx.unsigned.test[{host.address}]:25 (encrypted)"
    )

    code, doc = _probe_json(config, "unsigned.test")
    assert code == 0
    (h,) = doc["hosts"]
    assert h["decision"]["requirement"] == "may"
    (conn,) = h["connections"]
    assert (conn["dane"], conn["delivery"]) == (None, "encrypted")
    assert receiver.mail_commands == []


def test_null_mx_bounces_without_connecting_anywhere(receivers: ReceiverPool, config: Path) -> None:
    code, lines = _probe(config, "nullmx.test")
    assert code == 69
    assert lines[3:] == [
        "MX nullmx.test: secure, null MX (RFC 7505): the domain accepts no mail",
        "  0 .",
        "result: bounce: 556 5.1.10 Domain does not accept mail (null MX)",
    ]
    # nullmx-addr.test has an address of its own; RFC 7505 §3: it is never contacted.
    stall = receivers.start_stall("nullmx-addr.test")
    code, doc = _probe_json(config, "nullmx-addr.test")
    assert code == 69
    assert doc["hosts"] == []
    assert doc["result"] == {
        "outcome": "bounce",
        "reply": "556 5.1.10 Domain does not accept mail (null MX)",
        "host": None,
        "address": None,
        "tls": None,
    }
    assert stall.connections == 0


def test_dane_host_without_starttls_defers_with_4_7_4(
    dns_lab: DnsLab, receivers: ReceiverPool, config: Path
) -> None:
    (receiver,) = receivers.start("dane-nostarttls.test")
    host = dns_lab.hosts["mx.dane-nostarttls.test"]
    code, lines = _probe(config, "dane-nostarttls.test")
    assert code == 75
    block = _block(lines, host.address)
    assert block[2:] == [
        "    EHLO: STARTTLS not offered",
        "    delivery: defer: 451 4.7.4 TLS is required, but was not offered by host",
    ]
    assert lines[-1] == "result: defer: 451 4.7.4 TLS is required, but was not offered by host"
    assert receiver.mail_commands == []

    code, doc = _probe_json(config, "dane-nostarttls.test")
    assert code == 75
    (conn,) = doc["hosts"][0]["connections"]
    assert conn["starttls"]["offered"] is False
    assert (conn["tls"], conn["chain"], conn["dane"]) == (None, [], None)
    assert conn["error"]["kind"] == "dane_no_starttls"
    assert receiver.mail_commands == []


def test_cname_mx_host_gets_the_tlsa_base_domain_as_sni(
    dns_lab: DnsLab, receivers: ReceiverPool, config: Path
) -> None:
    (receiver,) = receivers.start("cname-ok.test")
    host = dns_lab.hosts["real.cname-ok.test"]
    code, lines = _probe(config, "cname-ok.test")
    assert code == 0
    block = _block(lines, host.address)
    assert block[3].startswith("    STARTTLS: SNI real.cname-ok.test: TLSv1.")
    assert block[-1] == "    delivery: verified"
    # RFC 7672 §8.1: the SNI is the CNAME-expanded name where the TLSA records are.
    assert receiver.server_names == ["real.cname-ok.test"]
    assert receiver.mail_commands == []


def test_a_refused_connection_is_reported_per_address_without_a_traceback(
    dns_lab: DnsLab, config: Path
) -> None:
    host = dns_lab.hosts["mx.dane-ok.test"]  # no receiver runs: the connection is refused
    code, lines = _probe(config, "dane-ok.test")
    assert code == 75
    block = _block(lines, host.address)
    assert len(block) == 2
    assert block[1].startswith("    delivery: defer: 451 4.4.1 cannot connect: ")
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1] == "result: " + block[1].removeprefix("    delivery: ")


def test_the_second_mx_takes_the_mail_when_the_first_refuses(
    dns_lab: DnsLab, receivers: ReceiverPool, config: Path
) -> None:
    mx1, mx2 = dns_lab.hosts["mx1.hostile2.test"], dns_lab.hosts["mx2.hostile2.test"]
    (receiver,) = receivers.start("mx2.hostile2.test")
    code, lines = _probe(config, "hostile2.test")
    assert code == 0
    first, second = _block(lines, mx1.address), _block(lines, mx2.address)
    assert lines.index(first[0]) < lines.index(second[0])  # MX preference order
    assert first[-1].startswith("    delivery: defer: 451 4.4.1 cannot connect: ")
    assert second[-1] == "    delivery: verified"
    assert (
        lines[-1] == f"result: attempt delivery via mx2.hostile2.test[{mx2.address}]:25 (verified)"
    )
    assert receiver.mail_commands == []


def test_port_option_moves_the_connection_but_not_the_tlsa_name(
    dns_lab: DnsLab, receivers: ReceiverPool, config: Path
) -> None:
    (receiver,) = receivers.start("dane-ok.test")  # listens on 25 only
    host = dns_lab.hosts["mx.dane-ok.test"]
    code, lines = _probe(config, "dane-ok.test", "--port", "2626")
    assert code == 75
    # RFC 7672 §2.2.3: the TLSA name uses the SMTP port whatever port is connected to.
    assert "  TLSA _25._tcp.mx.dane-ok.test: secure" in lines
    block = _block(lines, host.address)
    assert block[0] == f"  connect {host.address}:2626"
    assert block[1].startswith("    delivery: defer: 451 4.4.1 cannot connect: ")
    assert receiver.server_names == []

    out = _run(config, "dane-ok.test", "--port", "0")
    assert (out.returncode, out.stdout) == (64, "")
    assert "--port 0: expected 1..65535" in out.stderr


def test_resolver_option_replaces_the_configured_resolvers_and_must_be_loopback(
    dns_lab: DnsLab, tmp_path: Path
) -> None:
    # The configured resolver does not exist; only --resolver can answer.
    dead = _config(dns_lab, tmp_path / "dead.toml", resolver=dns_lab.plan.spare(UNUSED_SPARE))
    code, lines = _probe(dead, "nullmx.test", "--resolver", dns_lab.resolver_addr)
    assert code == 69
    assert lines[2].startswith(f"resolver {dns_lab.resolver_addr}:53: validates DNSSEC (")
    code, doc = _probe_json(dead, "nullmx.test", "--resolver", f"{dns_lab.resolver_addr}:53")
    assert (code, doc["resolver"]["servers"]) == (69, f"{dns_lab.resolver_addr}:53")

    # RFC 7672 §2.1: the AD bit is trusted only from this host unless the config says so.
    out = _run(dead, "nullmx.test", "--resolver", "192.0.2.1")
    assert (out.returncode, out.stdout) == (64, "")
    assert "--resolver '192.0.2.1': expected a loopback address" in out.stderr
    out = _run(dead, "nullmx.test", "--resolver", "resolver.example")
    assert (out.returncode, out.stdout) == (64, "")
    assert "--resolver 'resolver.example': expected an IP address" in out.stderr


@pytest.mark.parametrize(
    ("domain", "status", "tls", "reply"),
    [
        ("dane-ok.test", "sent", "verified", None),
        ("dane-ta.test", "sent", "verified", None),
        ("pkix-tls.test", "sent", "encrypted", None),
        ("dane-bad.test", "deferred", None, "451 4.7.5 Server certificate not verified (no-match)"),
        (
            "dane-nostarttls.test",
            "deferred",
            None,
            "451 4.7.4 TLS is required, but was not offered by host",
        ),
    ],
)
def test_delivery_does_what_the_probe_said(
    dns_lab: DnsLab,
    receivers: ReceiverPool,
    relay_factory: RelayFactory,
    domain: str,
    status: str,
    tls: str | None,
    reply: str | None,
) -> None:
    (receiver,) = receivers.start(domain)
    relay = relay_factory()
    code, doc = _probe_json(relay.config_path, domain)
    assert code == (0 if status == "sent" else 75)
    assert (doc["result"]["tls"], doc["result"]["reply"]) == (tls, reply)
    assert receiver.mail_commands == []

    host, port = relay.smtp_addr
    queued = send_mail(
        host, port, "alice@sender.example", [f"bob@{domain}"], b"Subject: t\r\n\r\nx\r\n"
    )
    qid = re.search(r"queued as ([0-9A-F]+)", queued.text)
    assert qid, queued
    line = relay.attempt_line(qid.group(1), status)
    if tls is not None:
        assert f" tls={tls}" in line
        receiver.wait_for(1)
    else:
        assert f'reply="{reply}"' in line
        assert receiver.mail_commands == []


def test_level_verify_uses_the_configured_ca_file(
    dns_lab: DnsLab, receivers: ReceiverPool, tmp_path: Path
) -> None:
    """Postfix verify: the probe validates the chain against tls.ca_file, as delivery does."""
    receivers.start("dane-ok.test")
    ca_file = tmp_path / "lab-ca.pem"
    ca_file.write_bytes(dns_lab.ca.cert_pem)
    config = write_relay_config(
        tmp_path / "verify.toml",
        listen=f"{dns_lab.relay_addr}:2525",
        spool_dir=tmp_path / "spool",
        resolvers=[dns_lab.resolver_addr],
        metrics_listen=f"{dns_lab.relay_addr}:9425",
        tls_level="verify",
        tls_ca_file=ca_file,
    )
    code, lines = _probe(config, "dane-ok.test")
    assert code == 0, lines
    assert lines[0] == "domain dane-ok.test: level verify, insecure_mx_policy dane"
    host = dns_lab.hosts["mx.dane-ok.test"]
    assert "  TLSA: not looked up (level verify does not use DANE)" in lines
    assert "    STARTTLS: SNI mx.dane-ok.test: " in "\n".join(lines)
    assert "    delivery: verified" in lines
    assert (
        lines[-1] == f"result: attempt delivery via mx.dane-ok.test[{host.address}]:25 (verified)"
    )
