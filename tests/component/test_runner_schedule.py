"""QueueRunner's schedule (a heap) and queue gauges (kept as messages change): the
bookkeeping that replaced sorting and scanning the whole queue for every message."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from relay.config import DeliveryConfig
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult
from relay.smtp.reply import SmtpReply
from relay.spool.records import QueuedMessage, RecipientState
from relay.spool.runner import QueueRunner
from relay.spool.schedule import retry_delay
from relay.spool.store import SpoolStore

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

CFG = DeliveryConfig(concurrency=4, min_backoff=300.0, max_backoff=4000.0, scan_interval=60.0)
NOW = 1_700_000_000.0


class Engine:
    """An engine that notes the order of its attempts (queue ids in `calls`) and answers
    each recipient 250, or 451 where `defer(recipient)` says so (default: none)."""

    def __init__(self, defer: Callable[[str], bool] = lambda rcpt: False) -> None:
        self.defer = defer
        self.calls: list[str] = []

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
        ok, later = SmtpReply(250, "2.0.0", "Ok"), SmtpReply(451, "4.3.0", "try later")
        return [
            RecipientResult(r, Outcome.DEFERRED, later, "mx[192.0.2.1]:25")
            if self.defer(r)
            else RecipientResult(r, Outcome.DELIVERED, ok, "mx[192.0.2.1]:25")
            for r in recipients
        ]


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
    runner = QueueRunner(SpoolStore(tmp_path / "spool"), Engine(), CFG, metrics, "relay.test")
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
    recorder = Engine()
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
            if len(recorder.calls) >= 3:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert [names[q] for q in recorder.calls] == ["A", "B", "C"]
        assert runner.message(msgs["LATER"].queue_id) is not None  # not due: not started
    finally:
        await runner.stop(grace=5.0)
        await asyncio.wait_for(task, 5.0)
        store.close()


async def test_every_deferred_message_is_retried_while_others_keep_arriving(
    tmp_path: Path,
) -> None:
    """Messages arriving while others' deferrals are recorded wake the loop at moments
    when a deferred message's attempt has put its next entry but its task has not ended:
    that entry was dropped as running, and the message was never tried again until a
    restart (found as a full-suite flake of the delay-warning test). Here 120 arrivals
    interleave with 120 deferrals; after the backoff every message must be tried again."""
    now = [NOW]
    store = SpoolStore(tmp_path / "spool")
    store.open()
    engine = Engine(defer=lambda rcpt: True)
    rng = random.Random(7)
    runner = QueueRunner(
        store, engine, CFG, Metrics(), "relay.test", clock=lambda: now[0], rand=lambda: 0.0
    )
    msgs = [
        store.commit(sender="a@example.org", recipients=[f"r{i}@example.net"], body=b"x", now=NOW)
        for i in range(120)
    ]
    task = asyncio.create_task(runner.run())
    try:
        for msg in msgs:
            runner.submit(msg)
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
        async with asyncio.timeout(20):
            while len(engine.calls) < len(msgs) or any(
                runner.in_delivery(m.queue_id) for m in msgs
            ):
                await asyncio.sleep(0.01)
        assert sorted(engine.calls) == sorted(m.queue_id for m in msgs)
        for attempt in range(2, 7):
            # Every message was deferred at the same clock time with the same jitter (0).
            due = {runner.message(m.queue_id).next_attempt for m in msgs}  # type: ignore[union-attr]
            assert due == {now[0] + retry_delay(attempt - 1, 300.0, 4000.0, lambda: 0.0)}
            now[0] = due.pop()
            runner.load([])  # wakes the loop at the new time
            async with asyncio.timeout(20):
                while len(engine.calls) < attempt * len(msgs) or any(
                    runner.in_delivery(m.queue_id) for m in msgs
                ):
                    await asyncio.sleep(0.01)
            assert sorted(engine.calls) == sorted(attempt * [m.queue_id for m in msgs])
    finally:
        await runner.stop(grace=5.0)
        await asyncio.wait_for(task, 5.0)
        store.close()


class ArrivalAsWriteEnds(SpoolStore):
    """A spool where a new message arrives just as the record of a chosen message's
    deferral is written: from the write's worker thread, the arrival is submitted on the
    loop, then `hops` loop iterations pass, then the loop is held long enough for the
    write's completion to be queued behind the wake-up the arrival caused. Which `hops`
    puts the loop's step between the attempt's last step and its done callback depends on
    how many steps asyncio.wait_for takes (3.11: 0), so each message gets another."""

    def __init__(self, directory: Path, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(directory)
        self.loop = loop
        self.hops: dict[str, int] = {}  # queue id -> hops before its write may end
        self.arrive: Callable[[], None] = lambda: None

    def update(self, msg: QueuedMessage) -> None:
        super().update(msg)
        hops = self.hops.pop(msg.queue_id, None)
        if hops is None:
            return
        released = threading.Event()

        def step(n: int) -> None:
            if n == 0:
                self.arrive()
            if n < hops:
                self.loop.call_soon(step, n + 1)
                return
            released.set()
            time.sleep(0.05)  # on the loop: this thread's completion is queued meanwhile

        self.loop.call_soon_threadsafe(step, 0)
        assert released.wait(5.0)


async def test_a_message_arriving_as_a_deferral_is_recorded_leaves_it_scheduled(
    tmp_path: Path,
) -> None:
    """The loop woken by an arrival between a deferred attempt's last step (its next
    entry pushed) and its done callback dropped that entry as running: the message stayed
    on disk and was never retried until a restart. Deterministic form of the race the
    test above provokes by numbers."""
    now = [NOW]
    store = ArrivalAsWriteEnds(tmp_path / "spool", asyncio.get_running_loop())
    store.open()
    engine = Engine(defer=lambda rcpt: rcpt.startswith("m"))  # m*@ deferred, n*@ delivered
    runner = QueueRunner(
        store, engine, CFG, Metrics(), "relay.test", clock=lambda: now[0], rand=lambda: 0.0
    )
    task = asyncio.create_task(runner.run())
    deferred: list[QueuedMessage] = []
    try:
        for hops in range(4):
            # Each one's retry is due before the earlier ones', so its new entry is the
            # first the loop looks at (where the running check dropped it).
            now[0] = NOW - 10.0 * hops
            msg = store.commit(
                sender="a@example.org", recipients=[f"m{hops}@example.net"], body=b"x", now=now[0]
            )
            arrival = store.commit(
                sender="a@example.org", recipients=[f"n{hops}@example.net"], body=b"y", now=now[0]
            )
            store.hops[msg.queue_id] = hops
            store.arrive = lambda arrival=arrival: runner.submit(arrival)  # type: ignore[misc]
            runner.submit(msg)
            async with asyncio.timeout(10):
                while (
                    arrival.queue_id not in engine.calls
                    or any(runner.in_delivery(q) for q in (msg.queue_id, arrival.queue_id))
                    or runner.message(arrival.queue_id) is not None
                ):
                    await asyncio.sleep(0.005)
            assert store.hops == {}  # the arrival came during this message's write
            deferred.append(msg)
        assert len(engine.calls) == 8  # four deferred, four arrivals delivered
        assert [engine.calls.count(m.queue_id) for m in deferred] == [1, 1, 1, 1]
        retry_at = NOW + retry_delay(1, 300.0, 4000.0, lambda: 0.0)
        assert [runner.message(m.queue_id).next_attempt for m in deferred] == [  # type: ignore[union-attr]
            retry_at - 10.0 * hops for hops in range(4)
        ]
        now[0] = retry_at
        runner.load([])  # wakes the loop at the new time: all four are due
        async with asyncio.timeout(10):
            while any(engine.calls.count(m.queue_id) < 2 for m in deferred):
                await asyncio.sleep(0.005)
        assert [engine.calls.count(m.queue_id) for m in deferred] == [2, 2, 2, 2]
    finally:
        await runner.stop(grace=5.0)
        await asyncio.wait_for(task, 5.0)
        store.close()
