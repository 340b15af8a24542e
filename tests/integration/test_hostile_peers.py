"""Hostile and broken remote SMTP servers against the real relay's delivery side.

The scripted peers (lab.scripted_peer) run on the addresses of the hostile.test and
hostile2.test hosts, whose 3 1 1 TLSA records match those hosts' lab certificates, so
DANE applies to every one of them. Each test asserts both what the relay logged and
counted and what the peer saw (never a MAIL command where DANE failed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lab import DnsLab, RelayProcess, make_self_signed
from lab.hostile import SmtpWire, metric, start_relay, submit
from lab.scripted_peer import PeerScript, ScriptedPeer

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
PeerFactory = Callable[..., ScriptedPeer]
BODY = b"Subject: hostile peer\r\nMessage-ID: <peer@sender.example>\r\n\r\nHello.\r\n"
FAST = {"delivery": {"command_timeout": '"2s"', "connect_timeout": '"2s"'}}


@pytest.fixture
def peers(dns_lab: DnsLab, tmp_path: Path) -> Iterator[PeerFactory]:
    made: list[ScriptedPeer] = []

    def make(host: str = "mx.hostile.test", *, cert: str = "own", **script: Any) -> ScriptedPeer:
        """A scripted peer on `host`'s lab address; cert "own" (matches its TLSA),
        "impostor" (self-signed for the same name) or "none" (STARTTLS cannot work)."""
        mx = dns_lab.hosts[host]
        chain = key = None
        if cert != "none":
            leaf = mx.leaf if cert == "own" else make_self_signed([host])
            chain, key = leaf.write(tmp_path, f"{host}-{cert}-{len(made)}")
        peer = ScriptedPeer(mx.address, PeerScript(**script), cert_chain=chain, key=key)
        made.append(peer)
        return peer

    try:
        yield make
    finally:
        for peer in made:
            peer.close()


def _line(relay: RelayProcess, qid: str, status: str = "deferred") -> str:
    return relay.attempt_line(qid, status)


# --- TLS and DANE -----------------------------------------------------------------------


def test_starttls_refused_with_454_on_dane_host_defers_without_plaintext(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peer = peers(starttls_reply="454 4.7.0 TLS not available due to temporary reason")
    relay = relay_factory()
    qid = submit(relay, "bob@hostile.test", BODY)
    line = _line(relay, qid)
    assert "dane=fail reason=handshake" in line
    assert 'reply="451 4.7.5 Cannot start TLS' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert "MAIL" not in peer.verbs
    assert peer.connections == 1  # no plaintext retry on a DANE host
    assert (
        metric(
            relay, "dane_relay_dane_verifications_total", result="failed", reason="handshake-error"
        )
        == 1
    )
    # Its own reason since review 5b: a 454 is "no TLS now", not a failed handshake.
    assert (
        metric(
            relay,
            "dane_relay_delivery_attempts_total",
            result="deferred",
            reason="starttls_refused",
        )
        == 1
    )


def test_tls_handshake_failure_on_dane_host_defers_without_plaintext(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    # The peer says 220 to STARTTLS, then hangs up instead of completing the handshake.
    peer = peers(cert="none")
    relay = relay_factory()
    qid = submit(relay, "bob@hostile.test", BODY)
    line = _line(relay, qid)
    assert "dane=fail reason=handshake" in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert "MAIL" not in peer.verbs
    assert peer.connections == 1


def test_impostor_certificate_on_dane_host_is_refused_before_mail_from(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peer = peers(cert="impostor")
    relay = relay_factory()
    qid = submit(relay, "bob@hostile.test", BODY)
    line = _line(relay, qid)
    assert "dane=fail reason=no-match" in line
    assert 'reply="451 4.7.5 Server certificate not verified' in line
    peer.wait_for("QUIT")
    assert peer.handshakes == 1
    assert "MAIL" not in peer.verbs
    assert peer.messages == []


def test_bytes_injected_after_starttls_220_are_discarded(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    # A man in the middle appends a plaintext reply to "220 Ready to start TLS"; it must not
    # be taken as the answer to the first command sent inside TLS (RFC 3207 §4.2,
    # CVE-2011-0411 class).
    peer = peers(inject_after_starttls=b"554 5.7.1 injected before TLS\r\n")
    relay = relay_factory()
    qid = submit(relay, "bob@hostile.test", BODY)
    line = _line(relay, qid, "sent")
    assert "dane=pass reason=match" in line
    assert 'reply="250 2.0.0 Ok: queued"' in line
    assert "injected" not in line
    (body,) = peer.messages
    assert body.endswith(b"Hello.\r\n")
    tls_commands = [c for c, tls in peer.commands if tls]
    assert tls_commands[0].startswith("EHLO ")
    assert all(tls for c, tls in peer.commands if c.split(" ", 1)[0] in ("MAIL", "RCPT", "DATA"))


# --- greetings, disconnects, stalls ---------------------------------------------------------


def test_421_greeting_defers_with_the_peer_reply(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peer = peers(greeting="421 4.3.2 Service shutting down")
    relay = relay_factory()
    qid = submit(relay, "bob@hostile.test", BODY)
    line = _line(relay, qid)
    assert 'reply="421 4.3.2 Service shutting down"' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert "MAIL" not in peer.verbs
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="deferred", reason="remote_4xx")
        == 1
    )


def test_554_greeting_defers_and_does_not_bounce(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    # RFC 5321 §3.1: 554 greeting = "no service here"; a host-scoped failure never bounces.
    peers(greeting="554 5.3.2 No SMTP service here")
    relay = relay_factory()
    qid = submit(relay, "bob@hostile.test", BODY)
    line = _line(relay, qid)
    assert 'reply="554 5.3.2 No SMTP service here"' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert metric(relay, "dane_relay_bounces_generated_total") == 0
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="bounced", reason="remote_5xx")
        == 0
    )


def test_peer_that_greets_then_hangs_up_defers(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peers(close_after_greeting=True)
    relay = relay_factory()
    qid = submit(relay, "bob@hostile.test", BODY)
    line = _line(relay, qid)
    assert 'reply="451 4.4.1 lost connection' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="deferred", reason="connect")
        == 1
    )


def test_peer_that_stalls_on_starttls_times_out_and_defers(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peer = peers(stall_on="STARTTLS")
    relay = start_relay(relay_factory, FAST)
    qid = submit(relay, "bob@hostile.test", BODY)
    line = _line(relay, qid)
    assert 'reply="451 4.4.2 timeout during STARTTLS"' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert "MAIL" not in peer.verbs
    assert peer.connections == 1
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="deferred", reason="timeout")
        == 1
    )


def test_peer_that_never_greets_times_out_and_defers(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peers(greeting=None)
    relay = start_relay(relay_factory, FAST)
    qid = submit(relay, "bob@hostile.test", BODY)
    line = _line(relay, qid)
    assert 'reply="451 4.4.2' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")


def test_peer_that_stalls_on_quit_after_accepting_counts_as_delivered(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peer = peers(stall_on="QUIT")
    relay = start_relay(relay_factory, FAST)
    qid = submit(relay, "bob@hostile.test", BODY)
    line = _line(relay, qid, "sent")
    assert 'reply="250 2.0.0 Ok: queued"' in line
    relay.wait_log(rf"queue_id={qid} removed")
    assert len(peer.messages) == 1


# --- per-recipient replies ---------------------------------------------------------------


def test_mixed_rcpt_replies_give_per_recipient_outcomes(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peer = peers(
        rcpt_replies={
            "gone@hostile.test": "550 5.1.1 No such user",
            "busy@hostile.test": "452 4.2.2 Mailbox full",
        }
    )
    relay = relay_factory()
    rcpts = ["ok@hostile.test", "gone@hostile.test", "busy@hostile.test"]
    qid = submit(relay, rcpts, BODY)
    sent = _line(relay, qid, "sent")
    assert "to=<ok@hostile.test>" in sent
    bounced = _line(relay, qid, "bounced")
    assert "to=<gone@hostile.test>" in bounced and "550 5.1.1 No such user" in bounced
    deferred = _line(relay, qid, "deferred")
    assert "to=<busy@hostile.test>" in deferred and "452 4.2.2 Mailbox full" in deferred
    relay.wait_log(rf"queue_id={qid} sender non-delivery notification: [0-9A-F]+")
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert len(peer.messages) == 1
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="delivered", reason="sent") == 1
    )
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="bounced", reason="remote_5xx")
        == 1
    )
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="deferred", reason="remote_4xx")
        == 1
    )
    assert metric(relay, "dane_relay_bounces_generated_total") == 1


def test_452_to_data_defers_every_recipient_and_sends_no_body(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peer = peers(data_reply="452 4.3.1 Insufficient system storage")
    relay = relay_factory()
    qid = submit(relay, ["a@hostile.test", "b@hostile.test"], BODY)
    line = _line(relay, qid)
    assert "to=<a@hostile.test>,<b@hostile.test>" in line
    assert 'reply="452 4.3.1 Insufficient system storage"' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=2")
    assert peer.messages == []
    assert metric(relay, "dane_relay_bounces_generated_total") == 0


def test_452_after_the_final_dot_defers(peers: PeerFactory, relay_factory: RelayFactory) -> None:
    peers(dot_reply="452 4.3.1 Insufficient system storage")
    relay = relay_factory()
    qid = submit(relay, "a@hostile.test", BODY)
    line = _line(relay, qid)
    assert 'reply="452 4.3.1 Insufficient system storage"' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")


def test_garbage_reply_after_the_final_dot_defers(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peers(dot_reply="xyz this is not SMTP")
    relay = relay_factory()
    qid = submit(relay, "a@hostile.test", BODY)
    _line(relay, qid)
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert metric(relay, "dane_relay_queue_messages", state="deferred") == 1
    assert metric(relay, "dane_relay_bounces_generated_total") == 0


# --- several MX hosts --------------------------------------------------------------------------


def test_failing_first_mx_falls_through_to_the_second(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    first = peers("mx1.hostile2.test", cert="impostor")
    second = peers("mx2.hostile2.test")
    relay = relay_factory()
    qid = submit(relay, "bob@hostile2.test", BODY)
    line = _line(relay, qid, "sent")
    assert "relay=mx2.hostile2.test[" in line
    assert "dane=pass" in line
    relay.wait_log(r"relay=mx1\.hostile2\.test\[.*dane=fail reason=no-match")
    assert "MAIL" not in first.verbs
    assert len(second.messages) == 1


# --- SMTPUTF8 -------------------------------------------------------------------------------------


def test_smtputf8_envelope_is_relayed_with_the_smtputf8_parameter(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peer = peers(extensions=("8BITMIME", "SMTPUTF8", "STARTTLS"))
    relay = relay_factory()
    host, port = relay.smtp_addr
    with SmtpWire(host, port) as c:
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd("MAIL FROM:<ålice@sender.example> SMTPUTF8".encode()).code == 250
        assert c.cmd("RCPT TO:<bob@hostile.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(BODY + b".\r\n")
        assert c.reply().code == 250
    peer.wait_for("MAIL")
    (mail,) = [cmd for cmd, _ in peer.commands if cmd.startswith("MAIL")]
    assert mail.startswith("MAIL FROM:<ålice@sender.example>")
    assert "SMTPUTF8" in mail.split()


def test_smtputf8_envelope_is_not_sent_to_a_server_without_smtputf8(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peer = peers(extensions=("8BITMIME", "STARTTLS"))
    relay = relay_factory()
    host, port = relay.smtp_addr
    with SmtpWire(host, port) as c:
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd("MAIL FROM:<ålice@sender.example> SMTPUTF8".encode()).code == 250
        assert c.cmd("RCPT TO:<bob@hostile.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(BODY + b".\r\n")
        reply = c.reply()
    assert reply.code == 250
    qid = reply.text.rsplit(" ", 1)[1]
    line = _line(relay, qid, "(sent|bounced|deferred)")
    assert "status=bounced" in line
    assert "5.6.7" in line
    assert "MAIL" not in peer.verbs
