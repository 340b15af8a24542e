"""Start-up against a hostile environment: a spool that is not a directory, one that is in
use, leftovers and junk in the spool, a listen port that is taken. The relay must either
start and keep every readable message, or stop at once with the documented exit status
(docs/operations.md: 73 spool, 71 listen address) and a one-line reason.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.hostile import SENDER, metric, spool_entries, submit

from relay.spool.records import QueuedMessage, RecipientState, dump
from relay.spool.store import new_queue_id

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
BODY = b"Subject: startup\r\nMessage-ID: <start@sender.example>\r\n\r\nHello.\r\n"


def _plant(spool: Path, rcpt: str) -> str:
    for sub in ("tmp", "data", "env", "corrupt"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    qid = new_queue_id()
    now = time.time()
    msg = QueuedMessage(qid, SENDER, (RecipientState(rcpt),), now, now, size=len(BODY))
    (spool / "data" / qid).write_bytes(BODY)
    (spool / "env" / qid).write_bytes(dump(msg))
    return qid


def _exit_status(relay: RelayProcess) -> tuple[int, str]:
    relay.start(wait_ready=False)
    status = relay.wait(15)
    return status, relay.log_path.read_text(errors="replace")


def test_spool_path_that_is_a_file_exits_73_with_a_reason(
    dns_lab: DnsLab, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    relay = relay_factory(start=False, spool_dir=blocker)
    status, log = _exit_status(relay)
    assert status == 73
    assert f"dane-relay: spool: cannot create spool directory {blocker}: File exists" in log
    assert "Traceback" not in log


def test_second_relay_on_the_same_spool_exits_73(
    dns_lab: DnsLab, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    first = relay_factory()
    second = relay_factory(
        start=False,
        name="second",
        smtp_port=2526,
        metrics_port=9426,
        spool_dir=tmp_path / "relay-spool",
    )
    status, log = _exit_status(second)
    assert status == 73
    assert "is in use by another running relay" in log
    assert first.alive()


def test_listen_port_in_use_exits_71_with_a_reason(
    dns_lab: DnsLab, relay_factory: RelayFactory
) -> None:
    with socket.create_server((dns_lab.relay_addr, 2527)):
        relay = relay_factory(start=False, smtp_port=2527)
        status, log = _exit_status(relay)
    assert status == 71
    assert "dane-relay: cannot listen:" in log
    assert "address already in use" in log
    assert "Traceback" not in log


def test_corrupt_envelopes_are_moved_aside_and_good_ones_delivered(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    spool = tmp_path / "relay-spool"
    good = _plant(spool, "bob@dane-ok.test")
    bad = new_queue_id()
    (spool / "env" / bad).write_bytes(b'{"version": 1, "queue_id": "truncated')
    (spool / "data" / bad).write_bytes(BODY)
    (spool / "env" / "README").write_text("not an envelope\n")
    orphan = new_queue_id()
    (spool / "data" / orphan).write_bytes(BODY)  # a body never acknowledged
    (spool / "tmp" / "leftover.data.1234").write_bytes(b"partial")

    relay = relay_factory(spool_dir=spool)
    relay.wait_log(rf"spool=corrupt queue_id={bad} ")
    relay.wait_log(r"started .* queued=1 ")
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("bob@dane-ok.test",)
    relay.wait_log(rf"queue_id={good} removed")
    assert spool_entries(relay, "corrupt") == sorted(["README.env", f"{bad}.env", f"{bad}.data"])
    assert spool_entries(relay, "tmp") == []
    assert spool_entries(relay, "data") == []


def test_directory_inside_env_does_not_stop_the_relay(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    spool = tmp_path / "relay-spool"
    _plant(spool, "bob@dane-ok.test")
    (spool / "env" / "lost+found").mkdir()
    relay_factory(spool_dir=spool)  # fails if the relay exits instead of greeting
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("bob@dane-ok.test",)


def test_message_accepted_before_sigterm_is_delivered_after_restart(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    # The MX is down while the message is accepted; a clean stop keeps it queued.
    relay = relay_factory()
    qid = submit(relay, "bob@dane-ok.test", BODY)
    relay.wait_log(rf"queue_id={qid} deferred pending=1", timeout=20)
    assert relay.stop() == 0
    (receiver,) = receivers.start("dane-ok.test")
    relay.start()
    relay.wait_log(r"started .* queued=1 ")
    # Deferred with the default 300 s backoff: not retried yet after the restart.
    assert metric(relay, "dane_relay_queue_messages", state="deferred") == 1
    assert receiver.messages == []
