"""Issue 6 front-end acceptance tests against a real relay process and the lab.

SMTP smuggling inputs never yield two messages (refused by default, one message in
`bare_line_endings = "accept"` mode); an oversized message is refused with 552 before
its body is stored.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.hostile import SENDER, SmtpWire, metric, spool_entries, start_relay, submit

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]

SMUGGLED = (
    b"MAIL FROM:<evil@sender.example>\r\n"
    b"RCPT TO:<victim@dane-ok.test>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n\r\nsmuggled message\r\n"
)
FAKE_ENDS = {
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CRLF.CR": b"\r\n.\r",
    "LF-LF.CRLF": b"\n\n.\r\n",
}


def _open(relay: RelayProcess) -> SmtpWire:
    host, port = relay.smtp_addr
    wire = SmtpWire(host, port)
    assert wire.greeting.code == 220
    return wire


def _nothing_queued(relay: RelayProcess) -> None:
    for sub in ("env", "data", "tmp"):
        assert spool_entries(relay, sub) == [], sub


def test_smuggling_inputs_are_refused_and_never_yield_two_messages(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory()
    with _open(relay) as c:
        assert c.cmd("EHLO client.test").code == 250
        for fake_end in FAKE_ENDS.values():
            assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
            assert c.cmd("RCPT TO:<bob@dane-ok.test>").code == 250
            assert c.cmd("DATA").code == 354
            c.send(b"Subject: carrier\r\n\r\nfirst" + fake_end + SMUGGLED + b"\r\n.\r\n")
            reply = c.reply()
            assert (reply.code, reply.text[:5]) == (550, "5.5.2"), fake_end
            assert c.cmd("NOOP").code == 250  # one reply per message: nothing smuggled
            assert c.pending_bytes() == b""
    _nothing_queued(relay)
    assert metric(relay, "dane_relay_inbound_rejections_total", reason="bare_line_ending") == len(
        FAKE_ENDS
    )
    assert metric(relay, "dane_relay_messages_received_total") == 0
    relay.wait_log(r"reject=DATA client=\S+ from=<alice@sender\.example> .*reason=bare-line-end")
    # The relay is fine afterwards, and only the clean message reaches the receiver.
    submit(relay, "carol@dane-ok.test", b"Subject: clean\r\n\r\nclean\r\n")
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("carol@dane-ok.test",)
    assert receiver.mail_commands[0][0] == SENDER
    assert len(receiver.messages) == 1


@pytest.mark.parametrize("fake_end", FAKE_ENDS.values(), ids=FAKE_ENDS.keys())
def test_smuggling_inputs_in_accept_mode_arrive_as_one_message(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory, fake_end: bytes
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = start_relay(relay_factory, {"server": {"bare_line_endings": '"accept"'}})
    with _open(relay) as c:
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        assert c.cmd("RCPT TO:<bob@dane-ok.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: carrier\r\n\r\nfirst" + fake_end + SMUGGLED + b"\r\n.\r\n")
        reply = c.reply()
        assert reply.code == 250
        qid = reply.text.rsplit(" ", 1)[1]
        assert c.cmd("NOOP").code == 250
        assert c.pending_bytes() == b""
    relay.wait_log(rf"queue_id={qid} removed", timeout=20)
    (msg,) = receiver.messages
    assert msg.rcpt_tos == ("bob@dane-ok.test",)
    assert [addr for addr, _ in receiver.mail_commands] == [SENDER]
    assert b"smuggled message" in msg.content  # carried as text, never as a second message
    assert metric(relay, "dane_relay_messages_received_total") == 1


def test_oversized_message_is_refused_552_before_its_body_is_stored(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = start_relay(relay_factory, {"server": {"max_message_size": "4096"}})
    with _open(relay) as c:
        assert "SIZE 4096" in c.cmd("EHLO client.test").text.splitlines()
        refused = c.cmd(f"MAIL FROM:<{SENDER}> SIZE=100000")
        assert (refused.code, refused.text) == (552, "5.3.4 Message size exceeds fixed limit")
        assert c.cmd(f"MAIL FROM:<{SENDER}>").code == 250
        assert c.cmd("RCPT TO:<bob@dane-ok.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 100)  # 10 kB, no end yet
        _nothing_queued(relay)
        c.send(b"\r\n.\r\n")
        reply = c.reply()
        assert (reply.code, reply.text) == (552, "5.3.4 Error: message file too big")
        assert c.cmd("RSET").code == 250
    _nothing_queued(relay)
    assert metric(relay, "dane_relay_inbound_rejections_total", reason="message_too_big") == 2
    assert metric(relay, "dane_relay_messages_received_total") == 0
