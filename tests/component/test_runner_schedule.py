"""QueueRunner's schedule (a heap) and queue gauges (kept as messages change): the
bookkeeping that replaced sorting and scanning the whole queue for every message."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from relay.config import DeliveryConfig
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult
from relay.smtp.reply import SmtpReply
from relay.spool.records import QueuedMessage, RecipientState
from relay.spool.runner import QueueRunner
from relay.spool.store import SpoolStore

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

CFG = DeliveryConfig(concurrency=4, min_backoff=300.0, max_backoff=4000.0, scan_interval=60.0)
NOW = 1_700_000_000.0


class Recorder:
    """An engine that delivers everything and notes the order of the attempts."""

    def __init__(self) -> None:
        self.order: list[str] = []

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        recipients: list[str],
        body: bytes,
        received: float,
        smtputf8: bool = False,
    ) -> list[RecipientResult]:
        self.order.append(queue_id)
        ok = SmtpReply(250, "2.0.0", "Ok")
        return [RecipientResult(r, Outcome.DELIVERED, ok, "mx[192.0.2.1]:25") for r in recipients]


def message(qid: str, *, received: float, next_attempt: float, **kw: object) -> QueuedMessage:
    base = QueuedMessage(
        queue_id=qid,
        sender="a@example.org",
        recipients=(RecipientState("b@example.net"),),
        received=received,
        next_attempt=next_attempt,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def gauges(metrics: Metrics) -> tuple[float | None, ...]:
    def value(state: str) -> float | None:
        return metrics.registry.get_sample_value("dane_relay_queue_messages", {"state": state})

    return (value("active"), value("deferred"), value("held"), metrics._oldest_received)


async def test_gauges_follow_put_hold_and_drop_and_the_arrival_heap_stays_bounded(
    tmp_path: Path,
) -> None:
    metrics = Metrics()
    runner = QueueRunner(SpoolStore(tmp_path / "spool"), Recorder(), CFG, metrics, "relay.test")
    oldest = message("OLD", received=NOW - 9000, next_attempt=NOW + 5000, attempts=3)
    runner.submit(oldest)
    for i in range(3000):
        runner.submit(message(f"M{i:05d}", received=NOW + i, next_attempt=NOW))
    runner.submit(replace(message("H", received=NOW, next_attempt=NOW), held=True))
    assert gauges(metrics) == (3000.0, 1.0, 1.0, NOW - 9000)
    for i in range(3000):
        runner._drop(f"M{i:05d}")
    runner._update_gauges()
    assert gauges(metrics) == (0.0, 1.0, 1.0, NOW - 9000)
    # 3000 entries of messages gone behind the oldest one were compacted away.
    assert len(runner._arrivals) <= 2 * 2 + 1024
    runner._drop("OLD")
    runner._update_gauges()
    assert gauges(metrics) == (0.0, 0.0, 1.0, NOW)


async def test_due_messages_start_in_next_attempt_order_and_stale_entries_are_skipped(
    tmp_path: Path,
) -> None:
    store = SpoolStore(tmp_path / "spool")
    store.open()
    recorder = Recorder()
    # One delivery at a time, so the order the engine sees is the order they started in.
    cfg = replace(CFG, concurrency=1)
    runner = QueueRunner(store, recorder, cfg, Metrics(), "relay.test", clock=lambda: NOW)
    names: dict[str, str] = {}
    msgs: dict[str, QueuedMessage] = {}
    for name, due in (("C", NOW - 1), ("A", NOW - 3), ("B", NOW - 2), ("LATER", NOW + 100)):
        committed = store.commit(sender="a@example.org", recipients=["b@example.net"], body=b"x")
        msgs[name] = replace(committed, next_attempt=due)
        store.update(msgs[name])
        names[committed.queue_id] = name
        runner.submit(msgs[name])
    # Rescheduling C leaves its first entry stale: C must still start once, after B.
    runner.submit(replace(msgs["C"], next_attempt=NOW - 1.5))
    task = asyncio.create_task(runner.run())
    try:
        for _ in range(300):
            if len(recorder.order) >= 3:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert [names[q] for q in recorder.order] == ["A", "B", "C"]
        assert runner.message(msgs["LATER"].queue_id) is not None  # not due: not started
    finally:
        await runner.stop(grace=5.0)
        await asyncio.wait_for(task, 5.0)
        store.close()


class DeferFirst:
    """An engine that defers every attempt and signals each one by queue id."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.called = asyncio.Event()

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        recipients: list[str],
        body: bytes,
        received: float,
        smtputf8: bool = False,
    ) -> list[RecipientResult]:
        self.calls.append(queue_id)
        self.called.set()
        later = SmtpReply(451, "4.3.0", "try later")
        return [RecipientResult(r, Outcome.DEFERRED, later, "mx[192.0.2.1]:25") for r in recipients]


async def test_a_deferred_message_is_retried_when_a_new_one_arrives_as_its_attempt_ends(
    tmp_path: Path,
) -> None:
    """A message arriving between a deferral being recorded and its attempt's task ending
    wakes the loop while the deferred message still counts as running: its new schedule
    entry was dropped as running, and it was never tried again (until a restart)."""
    now = [NOW]
    store = SpoolStore(tmp_path / "spool")
    store.open()
    engine = DeferFirst()
    first = store.commit(sender="a@example.org", recipients=["b@example.net"], body=b"x", now=NOW)
    second = store.commit(sender="a@example.org", recipients=["c@example.net"], body=b"y", now=NOW)

    class ArrivalAtRecord(Metrics):
        """Gauges are set right after the deferral is put back in the queue, in the same
        step of the attempt's task: a submit there is the arrival at the worst moment."""

        sent = False

        def set_queue(self, **kw: int | float | None) -> None:  # type: ignore[override]
            super().set_queue(**kw)  # type: ignore[arg-type]
            recorded = runner.message(first.queue_id)
            if not self.sent and recorded is not None and recorded.attempts == 1:
                self.sent = True
                runner.submit(second)

    metrics = ArrivalAtRecord()
    runner = QueueRunner(
        store, engine, CFG, metrics, "relay.test", clock=lambda: now[0], rand=lambda: 0.0
    )
    runner.submit(first)
    task = asyncio.create_task(runner.run())
    try:
        async with asyncio.timeout(10):
            while second.queue_id not in engine.calls or any(
                runner.in_delivery(m.queue_id) for m in (first, second)
            ):
                await asyncio.sleep(0.01)
        assert metrics.sent
        assert engine.calls == [first.queue_id, second.queue_id]
        retry_at = runner.message(first.queue_id).next_attempt  # type: ignore[union-attr]
        assert retry_at == NOW + 300.0  # min_backoff, the first retry's window (rand 0)
        now[0] = retry_at
        runner.load([])  # wakes the loop at the new time
        async with asyncio.timeout(10):
            while engine.calls.count(first.queue_id) < 2:
                engine.called.clear()
                await engine.called.wait()
        assert engine.calls[:3] == [first.queue_id, second.queue_id, first.queue_id]
    finally:
        await runner.stop(grace=5.0)
        await asyncio.wait_for(task, 5.0)
        store.close()
