"""Hostile SMTP clients against the relay's listener: size and line limits, out-of-order
commands, pipelined garbage, addresses the relay cannot relay, clients that vanish
mid-DATA (SMTP smuggling is in test_inbound_acceptance.py). Each test asserts the reply
codes (RFC 5321) and what did, or did not, reach the queue and the lab receiver.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess, poll_until
from lab.hostile import SENDER, SmtpWire, metric, spool_entries, start_relay, submit

from relay.spool.records import QueuedMessage, RecipientState, dump
from relay.spool.store import new_queue_id

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
BODY = b"Subject: hostile client\r\nMessage-ID: <in@sender.example>\r\n\r\nHello.\r\n"


def _open(relay: RelayProcess) -> SmtpWire:
    host, port = relay.smtp_addr
    wire = SmtpWire(host, port)
    assert wire.greeting.code == 220
    return wire


def _start(c: SmtpWire) -> None:
    """EHLO and MAIL FROM:<SENDER>, both accepted."""
    assert c.cmd("EHLO client.test").code == 250
    assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250


def assert_nothing_queued(relay: RelayProcess) -> None:
    assert spool_entries(relay, "env") == []
    assert spool_entries(relay, "data") == []


def _qid(reply_text: str) -> str:
    assert "queued as " in reply_text, reply_text
    return reply_text.rsplit(" ", 1)[1]


# --- limits --------------------------------------------------------------------------------


def test_message_over_max_message_size_gets_552_and_nothing_is_queued(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = start_relay(relay_factory, {"server": {"max_message_size": "2048"}})
    with _open(relay) as c:
        ehlo = c.cmd("EHLO client.test")
        assert "SIZE 2048" in ehlo.text.splitlines()
        # Declared too big: refused at MAIL.
        assert c.cmd(f"MAIL FROM:<{SENDER}> SIZE=5000").code == 552
        # Undeclared and too big: refused after DATA.
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        assert c.cmd("RCPT TO:<bob@dane-ok.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 50 + b".\r\n")
        assert c.reply().code == 552
        # The session is still usable afterwards.
        assert c.cmd("RSET").code == 250
    assert_nothing_queued(relay)
    assert metric(relay, "dane_relay_messages_received_total") == 0


def test_overlong_data_line_is_refused_with_554_and_nothing_is_queued(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    with _open(relay) as c:
        _start(c)
        assert c.cmd("RCPT TO:<bob@dane-ok.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n")
        reply = c.reply()
        # RFC 5321 §4.3.2: after the final dot 500 is not a permitted reply; 554 is.
        assert (reply.code, reply.text) == (
            554,
            "5.6.0 Message content rejected: line longer than 1000 octets "
            "(RFC 5321 section 4.5.3.1.6)",
        )
        assert c.cmd("RSET").code == 250
    assert spool_entries(relay, "env") == []
    assert metric(relay, "dane_relay_messages_received_total") == 0


def test_overlong_command_line_is_refused_with_500(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    with _open(relay) as c:
        assert c.cmd("EHLO client.test").code == 250
        reply = c.cmd("MAIL FROM:<" + "a" * 2000 + "@sender.example>")
        assert reply.code == 500
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250


def test_recipients_beyond_max_recipients_get_452_and_the_rest_is_delivered(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = start_relay(relay_factory, {"server": {"max_recipients": "3"}})
    with _open(relay) as c:
        _start(c)
        for i in range(3):
            assert c.cmd(f"RCPT TO:<r{i}@dane-ok.test>").code == 250
        over = c.cmd("RCPT TO:<r3@dane-ok.test>")
        assert (over.code, over.text) == (452, "4.5.3 Error: too many recipients")
        assert c.cmd("DATA").code == 354
        c.send(BODY + b".\r\n")
        assert c.reply().code == 250
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("r0@dane-ok.test", "r1@dane-ok.test", "r2@dane-ok.test")
    assert metric(relay, "dane_relay_inbound_rejections_total", reason="too_many_recipients") == 1


# --- out-of-order commands and pipelining ---------------------------------------------------


def test_commands_out_of_order_get_503_and_nothing_is_queued(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    with _open(relay) as c:
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 503  # before EHLO
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd("RCPT TO:<bob@dane-ok.test>").code == 503  # before MAIL
        assert c.cmd("DATA").code == 503  # before MAIL/RCPT
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 503  # nested MAIL
        assert c.cmd("DATA").code == 503  # no recipient yet
        assert c.cmd("RCPT TO:<bob>").code == 504  # not fully qualified
        assert c.cmd("DATA").code == 503
    assert spool_entries(relay, "env") == []
    assert metric(relay, "dane_relay_inbound_rejections_total", reason="bad_recipient") == 1


def test_pipelined_commands_with_garbage_keep_one_reply_each(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory()
    with _open(relay) as c:
        c.send(
            b"EHLO client.test\r\n"
            b"\x00\x01\x02garbage\r\n"
            b"MAIL FROM:<" + SENDER.encode() + b">\r\n"
            b"RCPT TO:<bob@dane-ok.test>\r\n"
            b"RCPT TO:<nodomain>\r\n"
            b"DATA\r\n"
        )
        codes = [c.reply().code for _ in range(6)]
        assert codes == [250, 500, 250, 250, 504, 354]
        c.send(BODY + b".\r\nQUIT\r\n")
        assert c.reply().code == 250
        assert c.reply().code == 221
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("bob@dane-ok.test",)


def test_null_sender_is_relayed_as_the_null_reverse_path(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory()
    qid = submit(relay, "bob@dane-ok.test", BODY, sender="")
    line = relay.wait_log(rf"queue_id={qid} .*status=(sent|bounced|deferred)", timeout=20)
    assert "status=sent" in line.group(0)
    relay.wait_log(rf"queue_id={qid} client=\S+ from=<> to=<bob@dane-ok\.test>", timeout=1)
    (msg,) = receiver.messages
    assert msg.mail_from == ""


def test_null_sender_message_is_never_bounced(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    qid = submit(relay, "bob@nullmx.test", BODY, sender="")
    relay.wait_log(rf"queue_id={qid} .*status=bounced", timeout=20)
    relay.wait_log(rf"queue_id={qid} removed")
    assert metric(relay, "dane_relay_bounces_generated_total") == 0
    relay.wait_log(rf"queue_id={qid} bounce of null-sender message discarded")


def test_nul_bytes_in_the_body_are_relayed_unchanged(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory()
    body = b"Subject: nul\r\n\r\nbefore\x00after\r\n"
    submit(relay, "bob@dane-ok.test", body)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.content.endswith(b"before\x00after\r\n")


# --- clients that vanish -------------------------------------------------------------------


def test_client_that_disconnects_mid_data_leaves_nothing_queued(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory()
    with _open(relay) as c:
        _start(c)
        assert c.cmd("RCPT TO:<bob@dane-ok.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: cut\r\n\r\nthis message never ends\r\n")
    relay.wait_log(r"connection lost")
    # The relay still works, and only the complete message reaches the queue and the MX.
    qid = submit(relay, "carol@dane-ok.test", BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("carol@dane-ok.test",)
    relay.wait_log(rf"queue_id={qid} removed")
    assert_nothing_queued(relay)
    assert spool_entries(relay, "tmp") == []
    assert metric(relay, "dane_relay_messages_received_total") == 1


# --- addresses the relay cannot relay ------------------------------------------------------


def test_recipient_with_invalid_utf8_is_refused_at_rcpt(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    with _open(relay) as c:
        _start(c)
        reply = c.cmd(b"RCPT TO:<b\xffob@dane-ok.test>")
    assert reply.code in (501, 553), reply


def test_recipient_with_control_character_is_refused_at_rcpt(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    with _open(relay) as c:
        _start(c)
        reply = c.cmd(b'RCPT TO:<"a\x01b"@dane-ok.test>')
    assert reply.code in (501, 553), reply


# Recipient domains that have no DNS name (relay.smtp.domain.ascii_domain): refused at RCPT
# with 553 5.1.3 (RFC 5321 §4.2.3: mailbox name not allowed), never queued, never looked up
# as the domain IDNA 2003 or an escape would make of them (F1, F7).
BAD_DOMAINS = [
    ("u@pay\u00adpal.de", "u@pay\\xadpal.de", "label 'pay\\xadpal' is not valid IDNA 2008"),
    ("u@pay\u200dpal.de", "u@pay\\u200dpal.de", "label 'pay\\u200dpal' is not valid IDNA 2008"),
    (f"u@{'a' * 64}.test", f"u@{'a' * 64}.test", "label longer than 63 octets (64)"),
    ("u@192.0.2.1", "u@192.0.2.1", "'192.0.2.1' is an IP address, not a domain name"),
]


def test_recipient_domains_without_a_dns_name_are_refused_553_and_counted(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    with _open(relay) as c:
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8").code == 250
        for rcpt, shown, why in BAD_DOMAINS:
            reply = c.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.code == 553, (rcpt, reply)
            expected = f"5.1.3 <{shown}>: Recipient address rejected: bad domain syntax: {why}"
            assert reply.text.startswith(expected), (rcpt, reply)
            assert reply.text.isascii()  # the invisible characters are shown, escaped
        # A presentation escape (exampl\\101.de would be example.de) and an empty label:
        # aiosmtpd's own address parser refuses them first; relay.smtp.domain would too.
        assert c.cmd("RCPT TO:<u@exampl\\101.de>").code in (501, 553)
        assert c.cmd("RCPT TO:<u@a..b.test>").code in (501, 553)
        # An IDN whose labels are valid IDNA 2008 is accepted as it is (RFC 6531 §3.2).
        assert c.cmd("RCPT TO:<u@straße.de>").code == 250
        assert c.cmd("RSET").code == 250
    assert spool_entries(relay, "env") == []
    count = len(BAD_DOMAINS)
    assert metric(relay, "dane_relay_inbound_rejections_total", reason="bad_domain") == count
    line = relay.wait_log(r"reject=RCPT .* to=<u@pay\\u200dpal\.de> .*reason=bad-domain ")
    assert 'reply="553 5.1.3"' in line.group(0)


def test_address_literal_recipient_is_refused_550_with_a_clear_reason(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    """F10: a literal used to be queued and then "Host or domain name not found"."""
    relay = relay_factory()
    with _open(relay) as c:
        _start(c)
        for rcpt in ("u@[192.0.2.1]", "u@[IPv6:2001:db8::1]"):
            reply = c.cmd(f"RCPT TO:<{rcpt}>")
            assert (reply.code, reply.text) == (
                550,
                f"5.1.2 <{rcpt}>: Recipient address rejected: address literals are not "
                "accepted, mail is routed by MX only",
            )
        assert c.cmd("DATA").code == 503  # no recipient was accepted
    assert spool_entries(relay, "env") == []
    assert metric(relay, "dane_relay_inbound_rejections_total", reason="address_literal") == 2
    relay.wait_log(r'reject=RCPT .* to=<u@\[192\.0\.2\.1\]> reply="550 5\.1\.2" reason=address-lit')


def test_sender_with_invalid_utf8_is_refused_at_mail(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    with _open(relay) as c:
        assert c.cmd("EHLO client.test").code == 250
        reply = c.cmd(b"MAIL FROM:<al\xffice@sender.example>")
    assert reply.code in (501, 553), reply


def _plant(spool: Path, sender: str, recipients: list[str], body: bytes) -> str:
    """Write a committed message into a spool the way SpoolStore.commit lays it out."""
    for sub in ("tmp", "data", "env", "corrupt"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    qid = new_queue_id()
    now = time.time()
    msg = QueuedMessage(
        queue_id=qid,
        sender=sender,
        recipients=tuple(RecipientState(r) for r in recipients),
        received=now,
        next_attempt=now,
        size=len(body),
    )
    (spool / "data" / qid).write_bytes(body)
    (spool / "env" / qid).write_bytes(dump(msg))
    return qid


def test_undeliverable_address_does_not_cause_duplicates_of_other_recipients(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    receivers.start("implicit.test")
    spool = tmp_path / "relay-spool"
    # An address that cannot be put on the wire (lone surrogate = an invalid UTF-8 byte
    # read with surrogateescape), next to a good one in another domain.
    qid = _plant(spool, SENDER, ["bob@dane-ok.test", "b\udcffob@implicit.test"], BODY)
    relay = start_relay(
        relay_factory,
        {
            "delivery": {
                "min_backoff": '"1s"',
                "max_backoff": '"1s"',
                "max_queue_lifetime": '"4s"',
            }
        },
        spool_dir=spool,
    )
    relay.wait_log(rf"queue_id={qid} to=<bob@dane-ok.test> .*status=sent", timeout=20)

    def settled() -> str | None:
        # Either the message left the queue, or the good recipient got a second copy.
        if len(receiver.messages) > 1:
            return "duplicate"
        text = relay.log_path.read_text(errors="replace")
        return "removed" if f"queue_id={qid} removed" in text else None

    outcome = poll_until(settled, timeout=15, what="the planted message to settle")
    # The good recipient was delivered exactly once, and the bad one ended (bounced, at the
    # latest when max_queue_lifetime expired) instead of being retried for ever.
    assert outcome == "removed"
    assert len(receiver.messages) == 1


def test_client_that_stalls_in_data_is_cut_off_after_server_timeout(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = start_relay(relay_factory, {"server": {"timeout": '"1s"'}})
    with _open(relay) as c:
        _start(c)
        assert c.cmd("RCPT TO:<bob@dane-ok.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: stalled\r\n\r\nand then nothing more")
        # The relay closes the idle connection after server.timeout; no 250 ever comes.
        received = c.pending_bytes()
        while chunk := c.sock.recv(4096):
            received += chunk
    assert b"250" not in received
    assert_nothing_queued(relay)
    assert metric(relay, "dane_relay_messages_received_total") == 0
    assert receiver.messages == []
