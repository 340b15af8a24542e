"""Graceful stop of a real relay process on SIGTERM/SIGINT (issue 6 queue item 6).

The relay closes its listening sockets at once; an idle SMTP session gets
`421 4.3.2 relay.test Service shutting down` (RFC 5321 §3.8) and is closed; a session in
the middle of DATA finishes, its message is committed and answered 250, and then it gets
the 421; deliveries and sessions still running after `server.shutdown_grace` are cut off,
their messages stay queued (or, without a 250, stay with the client), and the process
exits 0. A restart on the same spool delivers what was left.
"""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Callable

import pytest
from lab import ReceiverPool, RelayProcess
from lab.hostile import SENDER, SmtpWire, spool_entries, start_relay, submit

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
SHUTTING_DOWN = (421, "4.3.2 relay.test Service shutting down")
# Generous bounds on how long the process may take to exit; not a timing assertion.
EXIT_WAIT = 30.0


def _greeted(relay: RelayProcess) -> SmtpWire:
    wire = SmtpWire(*relay.smtp_addr)
    assert wire.greeting.code == 220, wire.greeting
    assert wire.cmd("EHLO client.test").code == 250
    return wire


def _closed_by_server(wire: SmtpWire) -> bool:
    """True when the server has closed the connection and sent nothing more."""
    return wire.pending_bytes() == b"" and wire.sock.recv(1) == b""


def _queued_as(text: str) -> str:
    match = re.search(r"queued as ([0-9A-F]+)", text)
    assert match, text
    return match.group(1)


def test_sigterm_lets_a_message_in_data_finish_and_closes_idle_sessions(
    receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = start_relay(relay_factory, {"server": {"shutdown_grace": '"15s"'}})
    host, port = relay.smtp_addr
    idle = _greeted(relay)
    busy = _greeted(relay)
    assert busy.cmd(f"MAIL FROM:<{SENDER}>").code == 250
    assert busy.cmd("RCPT TO:<bob@dane-ok.test>").code == 250
    assert busy.cmd("DATA").code == 354
    busy.send(b"Subject: graceful\r\nMessage-ID: <graceful-token@client.test>\r\n\r\nfirst\r\n")

    relay.kill(signal.SIGTERM)
    relay.wait_log(r"stopping signal=SIGTERM grace=15s sessions=1 deliveries=0$")
    # The idle session is told at once and closed.
    assert idle.reply() == SHUTTING_DOWN
    assert _closed_by_server(idle)
    # The listening socket is gone: a new client is refused by the kernel.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5)
    # The message in DATA is accepted as usual, then the session gets the 421.
    done = busy.cmd(b"second\r\n.")
    assert done.code == 250, done
    qid = _queued_as(done.text)
    assert busy.reply() == SHUTTING_DOWN
    assert _closed_by_server(busy)
    assert relay.wait(EXIT_WAIT) == 0
    relay.wait_log(r'shutdown client=127\.\S+ reply="421 4\.3\.2" state=idle$')
    relay.wait_log(r'shutdown client=127\.\S+ reply="421 4\.3\.2" state=after-transaction$')
    # Committed while stopping: queued, not delivered by the stopping relay.
    relay.wait_log(r"stopped sessions_cut=0 deliveries_cut=0 left_queued=1$")
    assert spool_entries(relay, "env") == [qid]
    assert receiver.messages == []
    idle.close()
    busy.close()

    relay.start()
    relay.wait_log(r"started .* queued=1 ")
    (msg,) = receiver.wait_for(1, timeout=30)
    assert msg.rcpt_tos == ("bob@dane-ok.test",)
    assert b"Message-ID: <graceful-token@client.test>" in msg.content
    assert f"id {qid}".encode() in msg.content
    assert msg.content.endswith(b"first\r\nsecond\r\n")
    relay.wait_log(rf"queue_id={qid} removed")
    assert relay.stop() == 0
    relay.wait_log(r"stopping signal=SIGTERM grace=15s sessions=0 deliveries=0$")
    relay.wait_log(r"stopped sessions_cut=0 deliveries_cut=0 left_queued=0$")


def test_delivery_stuck_beyond_the_grace_stays_queued_and_is_delivered_after_restart(
    receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    # The MX accepts TCP and never greets: the delivery cannot end within the grace.
    stall = receivers.start_stall("crash.test")
    relay = start_relay(relay_factory, {"server": {"shutdown_grace": '"2s"'}})
    qid = submit(relay, "judy@crash.test", b"Subject: stuck\r\n\r\nHello.\r\n")
    assert stall.connected.wait(20), relay.log_tail()

    relay.kill(signal.SIGTERM)
    relay.wait_log(r"stopping signal=SIGTERM grace=2s sessions=0 deliveries=1$")
    assert relay.wait(EXIT_WAIT) == 0
    relay.wait_log(rf"queue_id={qid} delivery cut off by the stop, stays queued")
    relay.wait_log(r"stopped sessions_cut=0 deliveries_cut=1 left_queued=1$")
    assert spool_entries(relay, "env") == [qid]
    assert spool_entries(relay, "data") == [qid]

    receivers.stop("crash.test")
    (receiver,) = receivers.start("crash.test")
    relay.start()
    relay.wait_log(r"started .* queued=1 ")
    (msg,) = receiver.wait_for(1, timeout=30)
    assert msg.rcpt_tos == ("judy@crash.test",)
    assert f"id {qid}".encode() in msg.content
    relay.wait_log(rf"queue_id={qid} removed")
    assert receiver.messages == [msg]


def test_session_still_in_data_after_the_grace_gets_421_and_nothing_is_queued(
    receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = start_relay(relay_factory, {"server": {"shutdown_grace": '"1s"'}})
    slow = _greeted(relay)
    assert slow.cmd(f"MAIL FROM:<{SENDER}>").code == 250
    assert slow.cmd("RCPT TO:<bob@dane-ok.test>").code == 250
    assert slow.cmd("DATA").code == 354
    slow.send(b"Subject: slow\r\n\r\nthe client never ends this\r\n")

    relay.kill(signal.SIGTERM)
    relay.wait_log(r"stopping signal=SIGTERM grace=1s sessions=1 deliveries=0$")
    assert slow.reply() == SHUTTING_DOWN
    assert _closed_by_server(slow)
    assert relay.wait(EXIT_WAIT) == 0
    relay.wait_log(r'shutdown client=127\.\S+ reply="421 4\.3\.2" state=cut-off$')
    relay.wait_log(r"stopped sessions_cut=1 deliveries_cut=0 left_queued=0$")
    # No 250 was given: the message is still the client's, nothing is in the spool.
    assert spool_entries(relay, "env") == []
    assert spool_entries(relay, "data") == []
    assert spool_entries(relay, "tmp") == []
    slow.close()


def test_sigint_stops_the_same_way(relay_factory: RelayFactory) -> None:
    relay = relay_factory()
    idle = _greeted(relay)
    relay.kill(signal.SIGINT)
    relay.wait_log(r"stopping signal=SIGINT grace=20s sessions=0 deliveries=0$")
    assert idle.reply() == SHUTTING_DOWN
    assert _closed_by_server(idle)
    assert relay.wait(EXIT_WAIT) == 0
    relay.wait_log(r"stopped sessions_cut=0 deliveries_cut=0 left_queued=0$")
    idle.close()
