"""SMTPUTF8 decided per recipient against the real relay (RFC 6531 §3.2; issue 5 item 4).

A scripted peer on mx.hostile.test's lab address (its certificate matches the published
3 1 1 TLSA, so DANE passes) offers no SMTPUTF8. `[delivery.transport]` sends the IDN
domain bücher.test to it. Of one message to user@bücher.test and jörg@bücher.test, the
first must reach the peer with the domain as its A-label, the second must bounce alone,
and the sender (at dane-ok.test, whose lab receiver runs) gets a report for it only: an
internationalised one (RFC 6533), delivered with SMTPUTF8.
"""

from __future__ import annotations

import email
import email.message
import email.policy
from collections.abc import Callable
from pathlib import Path

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.hostile import SmtpWire, metric
from lab.scripted_peer import PeerScript, ScriptedPeer

pytestmark = pytest.mark.lab

BODY = "Subject: Grüße\r\nMessage-ID: <utf8@sender.example>\r\n\r\nHallo.\r\n".encode()
TRANSPORT = '[delivery.transport]\n"xn--bcher-kva.test" = "[mx.hostile.test]"\n'


def _parts(payload: object) -> list[email.message.Message]:
    assert isinstance(payload, list)
    assert all(isinstance(p, email.message.Message) for p in payload)
    return payload


def test_ascii_local_part_is_sent_as_a_label_and_only_utf8_local_part_bounces(
    dns_lab: DnsLab,
    receivers: ReceiverPool,
    relay_factory: Callable[..., RelayProcess],
    tmp_path: Path,
) -> None:
    (sender_mx,) = receivers.start("dane-ok.test")
    mx = dns_lab.hosts["mx.hostile.test"]
    chain, key = mx.leaf.write(tmp_path, "mx.hostile.test-own")
    script = PeerScript(extensions=("PIPELINING", "8BITMIME", "STARTTLS"))  # no SMTPUTF8
    with ScriptedPeer(mx.address, script, cert_chain=chain, key=key) as peer:
        relay = relay_factory(extra=TRANSPORT)
        host, port = relay.smtp_addr
        with SmtpWire(host, port) as c:
            assert c.cmd("EHLO client.test").code == 250
            assert c.cmd("MAIL FROM:<alice@dane-ok.test> SMTPUTF8").code == 250
            assert c.cmd("RCPT TO:<user@bücher.test>".encode()).code == 250
            assert c.cmd("RCPT TO:<jörg@bücher.test>".encode()).code == 250
            assert c.cmd("DATA").code == 354
            c.send(BODY + b".\r\n")
            reply = c.reply()
        assert reply.code == 250
        qid = reply.text.rsplit(" ", 1)[1]
        sent = relay.attempt_line(qid, "sent")
        bounced = relay.attempt_line(qid, "bounced")
        peer.wait_for("QUIT")
        mail = [cmd for cmd, _ in peer.commands if cmd.upper().startswith("MAIL")]
        rcpts = [cmd for cmd, _ in peer.commands if cmd.upper().startswith("RCPT")]
        messages = peer.messages
    # The A-label went on the wire; the U-label and the UTF-8 local part never did.
    assert mail == ["MAIL FROM:<alice@dane-ok.test> BODY=8BITMIME"]  # no SMTPUTF8
    assert rcpts == ["RCPT TO:<user@xn--bcher-kva.test>"]
    assert len(messages) == 1
    assert "Subject: Grüße".encode() in messages[0]  # the header goes as it is
    assert "to=<user@bücher.test>" in sent
    assert "dane=pass" in sent
    assert "to=<jörg@bücher.test>" in bounced
    assert "error=smtputf8_not_offered" in bounced
    assert (
        'reply="550 5.6.7 SMTPUTF8 is required for this recipient address (its local part '
        'is not ASCII), but was not offered by host"' in bounced
    )
    assert (
        metric(
            relay,
            "dane_relay_delivery_attempts_total",
            result="bounced",
            reason="smtputf8_not_offered",
        )
        == 1
    )

    # The report to the sender names the bounced recipient only, with the 5.6.7 reason.
    (dsn,) = sender_mx.wait_for(1, timeout=20)
    assert dsn.mail_from == ""
    assert dsn.rcpt_tos == ("alice@dane-ok.test",)
    report = email.message_from_bytes(dsn.content)
    text, status, _ = _parts(report.get_payload())
    told_bytes = text.get_payload(decode=True)
    assert isinstance(told_bytes, bytes)
    told = told_bytes.decode("utf-8")
    assert (
        "<jörg@bücher.test>: 550 5.6.7 SMTPUTF8 is required for this recipient address "
        "(its local part is not ASCII), but was not offered by host" in told
    )
    assert "user@" not in told
    # The email package reads a message/global-* part as one embedded message: the
    # per-message fields are its header, the per-recipient block its body.
    (per_message,) = _parts(status.get_payload())
    assert per_message["Reporting-MTA"].startswith("dns; ")
    block = per_message.get_payload(decode=True)
    assert isinstance(block, bytes)
    per_rcpt = email.message_from_bytes(block, policy=email.policy.default)
    assert per_rcpt["Status"] == "5.6.7"

    # RFC 6533: the report names a UTF-8 address, so it is internationalised; its
    # message/global-* parts need no SMTPUTF8 (§6), and the sender's address is ASCII.
    assert dsn.smtputf8 is False
    assert [p.get_content_type() for p in _parts(report.get_payload())] == [
        "text/plain",
        "message/global-delivery-status",  # §6.1
        "message/global-headers",  # §6.3: the returned Subject is UTF-8
    ]
    assert text.get_content_charset() == "utf-8"
    assert per_rcpt["Final-Recipient"] == "utf-8; jörg@bücher.test"  # §3
    assert "Final-Recipient: utf-8; jörg@bücher.test\r\n".encode() in dsn.content
    assert "\r\nSubject: Grüße\r\n".encode() in dsn.content
    assert b"message/delivery-status" not in dsn.content
