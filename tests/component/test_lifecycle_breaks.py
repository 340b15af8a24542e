"""Lifecycle breaks found by review (graceful stop), each with a real spool in tmp_path.

- QueueRunner.stop counted and logged every message waiting for a delivery slot as a
  delivery "cut off by the stop", although it had never started (with concurrency 1 and
  three due messages, one delivery running: deliveries_cut=3 and three cut-off lines).
- ControlServer.close cancelled a request being carried out: an operator's delete went
  through on disk and in the queue, but the client got no answer ("the relay did not
  answer", try again) and the "deleted by operator" line was never written.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from relay.config import DeliveryConfig
from relay.control import ControlServer, ask
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult
from relay.smtp.reply import SmtpReply
from relay.spool.runner import QueueRunner
from relay.spool.store import SpoolStore

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

BODY = b"Subject: lifecycle\r\n\r\nbody\r\n"
SENT = SmtpReply(250, "2.0.0", "Ok")


class StuckDeliverer:
    """Every delivery waits until it is cancelled; records which ones began."""

    def __init__(self) -> None:
        self.began: list[str] = []
        self.first = asyncio.Event()

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        received: float,
        smtputf8: bool = False,
    ) -> list[RecipientResult]:
        self.began.append(queue_id)
        self.first.set()
        await asyncio.Event().wait()
        return [RecipientResult(r, Outcome.DELIVERED, SENT, "mx[192.0.2.1]:25") for r in recipients]


async def test_stop_counts_only_deliveries_that_began(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SpoolStore(tmp_path / "spool")
    store.open()
    qids = [
        store.commit(sender="a@example.org", recipients=[f"b{i}@example.net"], body=BODY).queue_id
        for i in range(3)
    ]
    engine = StuckDeliverer()
    runner = QueueRunner(store, engine, DeliveryConfig(concurrency=1), Metrics(), "relay.test")
    runner.load(store.recover())
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(engine.first.wait(), 5)
    (running,) = engine.began
    # Each due message has its task; two of them wait for the one slot.
    assert sorted(m.queue_id for m in runner.snapshot() if runner.in_delivery(m.queue_id)) == (
        sorted(qids)
    )
    assert runner.deliveries_running() == 1

    with caplog.at_level(logging.INFO, logger="relay.queue"):
        cut = await runner.stop(grace=0.2)
    await asyncio.wait_for(task, 5)

    assert cut == 1
    assert engine.began == [running]
    cut_lines = [r.getMessage() for r in caplog.records if "cut off by the stop" in r.getMessage()]
    assert cut_lines == [f"queue_id={running} delivery cut off by the stop, stays queued"]
    # All three stay queued, in memory and on disk.
    assert sorted(m.queue_id for m in runner.snapshot()) == sorted(qids)
    assert sorted(p.name for p in (store.directory / "env").iterdir()) == sorted(qids)
    assert runner.deliveries_running() == 0
    store.close()


class SlowRemoveStore(SpoolStore):
    """remove() waits (in its worker thread) until the test lets it go on."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.removing = threading.Event()
        self.go_on = threading.Event()

    def remove(self, qid: str) -> None:
        self.removing.set()
        assert self.go_on.wait(10)
        super().remove(qid)


async def test_close_lets_a_request_under_way_finish_and_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SlowRemoveStore(tmp_path / "spool")
    store.open()
    msg = store.commit(sender="a@example.org", recipients=["b@example.net"], body=BODY)
    cfg = DeliveryConfig(concurrency=1)
    runner = QueueRunner(store, StuckDeliverer(), cfg, Metrics(), "relay.test")
    # Held: the runner does not start it, so an operator may delete it.
    runner.load([msg])
    await runner.hold(msg.queue_id)
    server = ControlServer(runner, store)
    await server.start()

    answer: dict[str, Any] = {}

    def operator() -> None:
        try:
            answer.update(ask(server.path, {"op": "delete", "id": msg.queue_id}, timeout=10))
        except OSError as exc:
            answer["raised"] = repr(exc)

    thread = threading.Thread(target=operator)
    with caplog.at_level(logging.INFO, logger="relay.queue"):
        thread.start()
        assert await asyncio.to_thread(store.removing.wait, 10)
        closing = asyncio.create_task(server.close())
        await asyncio.sleep(0.1)  # close() has begun while the remove is under way
        store.go_on.set()
        await asyncio.wait_for(closing, 10)
        await asyncio.to_thread(thread.join, 10)

    # The delete happened: the client is told so and the log says who removed it.
    assert not (store.directory / "env" / msg.queue_id).exists()
    assert runner.snapshot() == []
    assert answer == {"ok": True, "queue_id": msg.queue_id}
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"queue_id={msg.queue_id} deleted by operator") for line in lines)
    assert not server.path.exists()
    store.close()


async def test_close_does_not_wait_for_an_idle_client(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "spool")
    store.open()
    runner = QueueRunner(store, StuckDeliverer(), DeliveryConfig(), Metrics(), "relay.test")
    server = ControlServer(runner, store)
    await server.start()
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    writer.write(b'{"op": "list"}\n')
    assert (await reader.readline()).startswith(b'{"ok":true')
    # The client stays connected and sends nothing: close() ends its connection.
    await asyncio.wait_for(server.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    store.close()
