"""The SMTP client (relay.delivery.client driven by the engine) against the lab (issue 5).

Per-recipient outcomes across three receivers in one attempt, SIZE refused before MAIL
FROM, and EHLO refused (HELO fallback). Scripted peers (lab.scripted_peer) run on the
hostile.test / hostile2.test hosts (DANE-EE TLSA matching their lab certificates); the
250 receiver is the lab's dane-ok.test. Assertions are on both sides: the relay's log
lines, queue state, DSN and metrics, and the commands each peer saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.hostile import metric, submit
from lab.scripted_peer import PeerScript, ScriptedPeer

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
PeerFactory = Callable[..., ScriptedPeer]
BODY = b"Subject: client\r\nMessage-ID: <client@sender.example>\r\n\r\nHello.\r\n"


@pytest.fixture
def peers(dns_lab: DnsLab, tmp_path: Path) -> Iterator[PeerFactory]:
    made: list[ScriptedPeer] = []

    def make(host: str, **script: Any) -> ScriptedPeer:
        """A scripted peer on `host`'s lab address with its own certificate (TLSA matches)."""
        mx = dns_lab.hosts[host]
        chain, key = mx.leaf.write(tmp_path, f"{host}-{len(made)}")
        peer = ScriptedPeer(mx.address, PeerScript(**script), cert_chain=chain, key=key)
        made.append(peer)
        return peer

    try:
        yield make
    finally:
        for peer in made:
            peer.close()


def test_three_receivers_250_451_550_delivered_deferred_bounced_in_one_attempt_each(
    receivers: ReceiverPool, peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    (ok,) = receivers.start("dane-ok.test")
    busy = peers("mx.hostile.test", rcpt_replies={"bob@hostile.test": "451 4.2.0 Try later"})
    gone = peers("mx1.hostile2.test", rcpt_replies={"bob@hostile2.test": "550 5.1.1 No such user"})
    relay = relay_factory()
    rcpts = ["bob@dane-ok.test", "bob@hostile.test", "bob@hostile2.test"]
    qid = submit(relay, rcpts, BODY)

    sent = relay.attempt_line(qid, "sent")
    assert "to=<bob@dane-ok.test>" in sent and "dane=pass" in sent
    deferred = relay.attempt_line(qid, "deferred")
    assert "to=<bob@hostile.test>" in deferred
    assert 'reply="451 4.2.0 Try later"' in deferred and "error=remote_4xx" in deferred
    bounced = relay.attempt_line(qid, "bounced")
    assert "to=<bob@hostile2.test>" in bounced and "relay=mx1.hostile2.test[" in bounced
    assert 'reply="550 5.1.1 No such user"' in bounced and "error=remote_5xx" in bounced
    # Queue state: the DSN for the bounced recipient, the deferred one still pending.
    relay.wait_log(rf"queue_id={qid} sender non-delivery notification: [0-9A-F]+")
    relay.wait_log(rf"queue_id={qid} deferred pending=1")

    (msg,) = ok.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("bob@dane-ok.test",)
    for peer in (busy, gone):
        peer.wait_for("QUIT")
        assert peer.connections == 1
        assert peer.verbs.count("RCPT") == 1
        # RFC 2920 §3.1: DATA went in the PIPELINING batch and was refused (no valid
        # recipient), so no content followed; RFC 5321 §3.3.
        assert peer.verbs[-4:] == ["MAIL", "RCPT", "DATA", "QUIT"]
        assert peer.messages == []
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="delivered", reason="sent") == 1
    )
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="deferred", reason="remote_4xx")
        == 1
    )
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="bounced", reason="remote_5xx")
        == 1
    )
    assert metric(relay, "dane_relay_bounces_generated_total") == 1


def test_message_over_the_peer_size_limit_bounces_5_3_4_without_mail_from(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peer = peers("mx.hostile.test", extensions=("SIZE 1000", "8BITMIME", "STARTTLS"))
    relay = relay_factory()
    body = BODY + b"x" * 78 + b"\r\n"
    body += (b"y" * 78 + b"\r\n") * ((5000 - len(body)) // 80 + 1)
    qid = submit(relay, "bob@hostile.test", body)

    line = relay.attempt_line(qid, "bounced")
    assert 'reply="552 5.3.4 message too big for host' in line
    assert "error=message_too_big" in line and "dane=pass" in line
    relay.wait_log(rf"queue_id={qid} sender non-delivery notification: [0-9A-F]+")
    peer.wait_for("QUIT")
    assert "MAIL" not in peer.verbs
    assert peer.messages == []
    assert (
        metric(
            relay, "dane_relay_delivery_attempts_total", result="bounced", reason="message_too_big"
        )
        == 1
    )


def test_ehlo_refused_falls_back_to_helo_and_delivers_in_plaintext_at_level_may(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peer = peers("mx.hostile.test", ehlo_reply="502 5.5.2 Error: command not recognized")
    relay = relay_factory(tls_level="may")
    qid = submit(relay, "bob@hostile.test", BODY + b".leading dot\r\n")

    line = relay.attempt_line(qid, "sent")
    assert "tls=none" in line and 'reply="250 2.0.0 Ok: queued"' in line
    relay.wait_log(rf"queue_id={qid} removed")
    assert peer.verbs[:3] == ["EHLO", "HELO", "MAIL"]
    assert "STARTTLS" not in peer.verbs
    (mail,) = [c for c, _ in peer.commands if c.startswith("MAIL")]
    assert mail == "MAIL FROM:<alice@sender.example>"  # no ESMTP parameters after HELO
    (body,) = peer.messages
    assert body.endswith(b"Hello.\r\n..leading dot\r\n")  # RFC 5321 §4.5.2 transparency


def test_ehlo_refused_on_a_dane_host_defers_without_plaintext(
    peers: PeerFactory, relay_factory: RelayFactory
) -> None:
    peer = peers("mx.hostile.test", ehlo_reply="502 5.5.2 Error: command not recognized")
    relay = relay_factory()  # level dane; hostile.test has secure, usable TLSA
    qid = submit(relay, "bob@hostile.test", BODY)

    line = relay.attempt_line(qid, "deferred")
    assert "dane=fail reason=no-starttls" in line and "4.7.4" in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert peer.verbs[:2] == ["EHLO", "HELO"]
    assert "MAIL" not in peer.verbs
    assert peer.messages == []
