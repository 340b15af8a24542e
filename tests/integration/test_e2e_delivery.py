"""End-to-end acceptance tests: mail in through the relay's SMTP listener, through the
spool and the delivery engine, out to the lab's TLS receivers, with real DNSSEC data
from nsd validated by unbound. Each test asserts on both sides: what the receiver got
(or did not get), and what the relay logged, counted and kept in its queue.
"""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess, send_mail
from lab.hostile import start_relay

pytestmark = pytest.mark.lab

SENDER = "alice@sender.example"
BODY = b"Subject: lab test\r\nMessage-ID: <e2e@sender.example>\r\n\r\nHello through DANE.\r\n"

RelayFactory = Callable[..., RelayProcess]


def _submit(relay: RelayProcess, rcpt: str, body: bytes = BODY) -> str:
    """Send one message to the relay; returns the queue id from its 250 reply."""
    host, port = relay.smtp_addr
    reply = send_mail(host, port, SENDER, [rcpt], body)
    assert reply.code == 250, reply
    match = re.search(r"queued as ([0-9A-F]+)", reply.text)
    assert match, reply
    return match.group(1)


def _metric(relay: RelayProcess, name: str, **labels: str) -> float:
    return relay.metrics().get((name, frozenset(labels.items())), 0.0)


def _queue_list(relay: RelayProcess) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "list", "-c", str(relay.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout


def test_secure_mx_with_matching_3_1_1_is_delivered_and_verified(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory()
    qid = _submit(relay, "bob@dane-ok.test")

    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.tls is True
    assert msg.mail_from == SENDER
    assert msg.rcpt_tos == ("bob@dane-ok.test",)
    assert msg.content.endswith(b"Hello through DANE.\r\n")
    assert f"id {qid}".encode() in msg.content  # our Received: header

    line = relay.attempt_line(qid)
    assert "relay=mx.dane-ok.test[" in line
    assert "dnssec=secure" in line
    assert "tls=verified" in line
    assert "dane=pass reason=match" in line
    assert 'matched="3 1 1' in line
    relay.wait_log(rf"queue_id={qid} removed")
    assert (
        _metric(relay, "dane_relay_dane_verifications_total", result="verified", reason="match")
        == 1
    )
    assert (
        _metric(relay, "dane_relay_delivery_attempts_total", result="delivered", reason="sent") == 1
    )
    assert _metric(relay, "dane_relay_messages_received_total") == 1
    assert _metric(relay, "dane_relay_queue_messages", state="active") == 0
    assert _metric(relay, "dane_relay_queue_messages", state="deferred") == 0


def test_secure_mx_with_3_0_1_full_certificate_digest_is_verified(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ee-cert.test")
    relay = relay_factory()
    qid = _submit(relay, "carol@dane-ee-cert.test")
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.tls is True
    line = relay.attempt_line(qid)
    assert 'dane=pass reason=match matched="3 0 1' in line
    assert "tls=verified" in line


def test_wrong_digest_defers_and_sends_nothing(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-bad.test")
    relay = relay_factory()
    qid = _submit(relay, "dave@dane-bad.test")

    line = relay.attempt_line(qid, "deferred")
    assert "dane=fail reason=no-match" in line
    assert 'reply="451 4.7.5 Server certificate not verified' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    # The receiver saw the STARTTLS session but never a MAIL command.
    assert receiver.mail_commands == []
    assert receiver.messages == []
    assert (
        _metric(relay, "dane_relay_dane_verifications_total", result="failed", reason="mismatch")
        == 1
    )
    assert (
        _metric(
            relay,
            "dane_relay_delivery_attempts_total",
            result="deferred",
            reason="dane_verification",
        )
        == 1
    )
    assert _metric(relay, "dane_relay_queue_messages", state="deferred") == 1
    listing = _queue_list(relay)
    assert qid in listing
    assert "<dave@dane-bad.test> status=pending" in listing
    assert "4.7.5 Server certificate not verified" in listing


def test_unsigned_domain_gets_opportunistic_tls(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("unsigned.test")
    relay = relay_factory()
    qid = _submit(relay, "erin@unsigned.test")
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.tls is True
    line = relay.attempt_line(qid)
    assert "dnssec=insecure" in line
    assert "tls=encrypted" in line
    assert "dane=none" in line
    assert (
        _metric(relay, "dane_relay_dane_verifications_total", result="verified", reason="match")
        == 0
    )
    assert _metric(relay, "dane_relay_dns_lookups_total", rrtype="MX", result="insecure") == 1


def test_secure_tlsa_without_starttls_defers_and_sends_nothing_in_plaintext(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-nostarttls.test")
    relay = relay_factory()
    qid = _submit(relay, "frank@dane-nostarttls.test")
    line = relay.attempt_line(qid, "deferred")
    assert "dane=fail reason=no-starttls" in line
    assert "4.7.4 TLS is required, but was not offered" in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert receiver.mail_commands == []
    assert receiver.messages == []
    assert (
        _metric(
            relay,
            "dane_relay_delivery_attempts_total",
            result="deferred",
            reason="dane_no_starttls",
        )
        == 1
    )
    assert _metric(relay, "dane_relay_queue_messages", state="deferred") == 1


def test_bogus_tlsa_is_a_temporary_failure_not_insecure(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("bogus.test")
    relay = relay_factory()
    qid = _submit(relay, "gina@bogus.test")
    line = relay.attempt_line(qid, "deferred", timeout=30)
    assert "4.7.5 TLSA lookup error" in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert receiver.mail_commands == []
    assert _metric(relay, "dane_relay_dns_lookups_total", rrtype="TLSA", result="bogus") == 1
    assert (
        _metric(
            relay, "dane_relay_delivery_attempts_total", result="deferred", reason="tlsa_lookup"
        )
        == 1
    )


def test_implicit_mx_uses_the_domain_address_and_its_tlsa(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("implicit.test")
    relay = relay_factory()
    qid = _submit(relay, "hank@implicit.test")
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.tls is True
    line = relay.attempt_line(qid)
    assert "relay=implicit.test[" in line
    assert "tls=verified" in line


def test_null_mx_bounces_to_the_sender(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    qid = _submit(relay, "ivan@nullmx.test")
    line = relay.attempt_line(qid, "bounced")
    assert "5.1.10" in line
    relay.wait_log(rf"queue_id={qid} sender non-delivery notification: [0-9A-F]+")
    relay.wait_log(rf"queue_id={qid} removed")
    assert _metric(relay, "dane_relay_bounces_generated_total") == 1
    assert (
        _metric(relay, "dane_relay_delivery_attempts_total", result="bounced", reason="null_mx")
        == 1
    )


def test_message_survives_sigkill_after_250_and_is_delivered_after_restart(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    # The MX accepts TCP but never greets, so the relay is stuck mid-delivery when killed.
    stall = receivers.start_stall("crash.test")
    relay = relay_factory()
    qid = _submit(relay, "judy@crash.test")
    assert stall.connected.wait(20), relay.log_tail()
    relay.kill(signal.SIGKILL)
    assert relay.wait(10) == -signal.SIGKILL

    receivers.stop("crash.test")
    (receiver,) = receivers.start("crash.test")
    relay.start()
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("judy@crash.test",)
    assert f"id {qid}".encode() in msg.content
    relay.wait_log(rf"queue_id={qid} .*status=sent.*", timeout=20)
    relay.wait_log(rf"queue_id={qid} removed")
    assert receiver.messages == [msg]  # exactly once


def test_client_outside_relay_networks_is_refused_with_550(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(networks=["192.0.2.0/24"])
    host, port = relay.smtp_addr
    with pytest.raises(smtplib.SMTPResponseException) as info:
        send_mail(host, port, SENDER, ["bob@dane-ok.test"], BODY)
    assert info.value.smtp_code == 550  # RFC 5321 §3.6.2: relaying declined by policy
    assert b"5.7.1" in info.value.smtp_error
    assert b"Relay access denied" in info.value.smtp_error
    relay.wait_log(r"reject=RCPT client=127\.\S+ .*reason=relay-denied")
    assert _metric(relay, "dane_relay_inbound_rejections_total", reason="relay_denied") == 1
    assert _metric(relay, "dane_relay_messages_received_total") == 0


def test_config_check_names_a_typoed_key_and_exits_non_zero(tmp_path: Path) -> None:
    bad = tmp_path / "relay.toml"
    bad.write_text('[server]\nlisten = ["127.0.0.1:2525"]\n\n[tls]\nlevle = "dane"\n')
    out = subprocess.run(
        [sys.executable, "-m", "relay", "config", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 78
    expected = (
        "expected one of the keys ca_file, insecure_mx_policy, level, policy, "
        "got unknown key 'levle'"
    )
    assert f"{bad}: tls.levle: {expected}" in out.stderr


def test_deferred_message_is_retried_with_backoff_and_delivered(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    # No receiver yet: the MX refuses the connection, the message is deferred.
    relay = start_relay(relay_factory, {"delivery": {"min_backoff": '"1s"', "max_backoff": '"2s"'}})
    qid = _submit(relay, "kate@dane-ok.test")
    first = relay.attempt_line(qid, "deferred")
    assert "error=connect" in first
    relay.wait_log(rf"queue_id={qid} deferred pending=1 next_attempt_in=1s")
    (receiver,) = receivers.start("dane-ok.test")
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("kate@dane-ok.test",)
    line = relay.attempt_line(qid)
    assert "tls=verified" in line
    relay.wait_log(rf"queue_id={qid} removed")
    assert (
        _metric(relay, "dane_relay_delivery_attempts_total", result="deferred", reason="connect")
        >= 1
    )
    assert (
        _metric(relay, "dane_relay_delivery_attempts_total", result="delivered", reason="sent") == 1
    )
    assert _metric(relay, "dane_relay_queue_messages", state="active") == 0
    assert _metric(relay, "dane_relay_queue_messages", state="deferred") == 0


def test_resolver_down_is_a_temporary_failure(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    # A loopback address of the lab's range where no resolver listens.
    dead = dns_lab.resolver_addr.rsplit(".", 1)[0] + ".99"
    relay = start_relay(relay_factory, {"dns": {"timeout": '"2s"'}}, resolvers=[dead])
    qid = _submit(relay, "liam@dane-ok.test")
    line = relay.attempt_line(qid, "deferred", timeout=30)
    assert 'reply="451 4.4.3 DNS lookup of dane-ok.test/MX' in line
    assert "error=dns" in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert receiver.mail_commands == []
    assert _metric(relay, "dane_relay_dns_lookups_total", rrtype="MX", result="network") == 1
    assert _metric(relay, "dane_relay_queue_messages", state="deferred") == 1
