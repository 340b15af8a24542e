"""QueueRunner operator actions racing the queue loop: an action that awaits its store
write must not let an attempt of the same message start and be undone meanwhile."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from relay.config import DeliveryConfig
from relay.errors import SpoolError
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult
from relay.smtp.reply import SmtpReply
from relay.spool.records import QueuedMessage, RecipientStatus
from relay.spool.runner import QueueRunner
from relay.spool.store import SpoolStore

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

CFG = DeliveryConfig(concurrency=4, min_backoff=300.0, max_backoff=4000.0, scan_interval=60.0)
NOW = 1_700_000_000.0
RELAY = "mx[192.0.2.1]:25"


class DeliverBDeferC:
    """b@example.net is delivered, c@example.net deferred; every call is noted."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        received: float,
        smtputf8: bool = False,
    ) -> list[RecipientResult]:
        self.calls.append(list(recipients))
        ok, later = SmtpReply(250, "2.0.0", "Ok"), SmtpReply(451, "4.3.0", "try later")
        return [
            RecipientResult(r, Outcome.DELIVERED, ok, RELAY)
            if r.startswith("b@")
            else RecipientResult(r, Outcome.DEFERRED, later, RELAY, "remote_4xx")
            for r in recipients
        ]


class SlowReleaseStore(SpoolStore):
    """The write of a record with attempts == 0 and next_attempt == `slow_at` (the
    release's) waits for `go`: an fsync that takes its time."""

    def __init__(self, directory: Path, slow_at: float) -> None:
        super().__init__(directory)
        self.slow_at = slow_at
        self.go = threading.Event()
        self.waiting = threading.Event()

    def update(self, msg: QueuedMessage) -> None:
        if msg.attempts == 0 and msg.next_attempt == self.slow_at:
            self.waiting.set()
            assert self.go.wait(10.0)
        super().update(msg)


async def until(predicate: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.005)


async def test_release_of_a_message_that_falls_due_meanwhile_does_not_undo_its_attempt(
    tmp_path: Path,
) -> None:
    """release() wrote the record and only then put it in the queue. A message that is
    not held and falls due while that write is in progress was picked by the loop; when
    its attempt ended before the write, release put back the record from before the
    attempt (memory and disk): b, already delivered, was pending again and was sent a
    second time at once."""
    now = [NOW]
    store = SlowReleaseStore(tmp_path / "spool", slow_at=NOW)
    store.open()
    engine = DeliverBDeferC()
    runner = QueueRunner(
        store, engine, CFG, Metrics(), "relay.test", clock=lambda: now[0], rand=lambda: 0.0
    )
    committed = store.commit(
        sender="a@example.org", recipients=["b@example.net", "c@example.net"], body=b"x", now=NOW
    )
    msg = replace(committed, next_attempt=NOW + 100)  # not held, due in 100 s
    store.update(msg)
    runner.load([msg])
    loop = asyncio.create_task(runner.run())
    try:
        await until(lambda: not runner._wake.is_set())  # the loop is waiting, nothing due
        release = asyncio.create_task(runner.release(msg.queue_id))
        await until(store.waiting.is_set)  # release is writing its record
        now[0] = NOW + 100  # the message's time comes while the write goes on
        runner.load([])  # the loop's timer, without waiting 100 s
        await until(lambda: not runner._wake.is_set())  # the loop has looked at the queue
        if runner.in_delivery(msg.queue_id):
            # The attempt started during the release: let it end before the write does.
            await until(lambda: not runner.in_delivery(msg.queue_id))
        store.go.set()
        await asyncio.wait_for(release, 10.0)
        await until(lambda: not runner._wake.is_set())
        await until(lambda: not runner.in_delivery(msg.queue_id))
        # One attempt in all: b delivered once, c deferred.
        assert engine.calls == [["b@example.net", "c@example.net"]]
        for recorded in (runner.message(msg.queue_id), store.get(msg.queue_id)):
            assert recorded is not None
            assert recorded.attempts == 1
            statuses = [(r.address, r.status) for r in recorded.recipients]
            assert statuses == [
                ("b@example.net", RecipientStatus.DELIVERED),
                ("c@example.net", RecipientStatus.PENDING),
            ]
            assert recorded.next_attempt == NOW + 100 + 300  # min_backoff (rand 0)
    finally:
        store.go.set()
        await runner.stop(grace=5.0)
        await asyncio.wait_for(loop, 5.0)
        store.close()


class FailingReleaseStore(SlowReleaseStore):
    """As SlowReleaseStore, and then the release's write fails."""

    def update(self, msg: QueuedMessage) -> None:
        if msg.attempts == 0 and msg.next_attempt == self.slow_at:
            self.waiting.set()
            assert self.go.wait(10.0)
            raise SpoolError(f"cannot update message {msg.queue_id}")
        super().update(msg)


async def test_a_release_that_cannot_be_stored_leaves_the_message_scheduled(
    tmp_path: Path,
) -> None:
    """The message's time comes while the failed release is writing: it is tried once
    the release has failed (its entry, dropped during the write, is pushed again)."""
    now = [NOW]
    store = FailingReleaseStore(tmp_path / "spool", slow_at=NOW)
    store.open()
    engine = DeliverBDeferC()
    runner = QueueRunner(
        store, engine, CFG, Metrics(), "relay.test", clock=lambda: now[0], rand=lambda: 0.0
    )
    committed = store.commit(
        sender="a@example.org", recipients=["b@example.net", "c@example.net"], body=b"x", now=NOW
    )
    msg = replace(committed, next_attempt=NOW + 100)
    store.update(msg)
    runner.load([msg])
    loop = asyncio.create_task(runner.run())
    try:
        await until(lambda: not runner._wake.is_set())
        release = asyncio.create_task(runner.release(msg.queue_id))
        await until(store.waiting.is_set)
        now[0] = NOW + 100
        runner.load([])
        await until(lambda: not runner._wake.is_set())  # its entry came up during the write
        assert engine.calls == []
        store.go.set()
        with pytest.raises(SpoolError):
            await asyncio.wait_for(release, 10.0)
        runner.load([])  # a wake-up, as the loop's next timer would be
        await until(lambda: len(engine.calls) == 1 and not runner.in_delivery(msg.queue_id))
        recorded = runner.message(msg.queue_id)
        assert recorded is not None and recorded.attempts == 1
        assert [r.status for r in recorded.recipients] == [
            RecipientStatus.DELIVERED,
            RecipientStatus.PENDING,
        ]
    finally:
        store.go.set()
        await runner.stop(grace=5.0)
        await asyncio.wait_for(loop, 5.0)
        store.close()


class FailingWriteStore(SpoolStore):
    """update and remove of `qid` wait for `go`, then fail."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.qid = ""
        self.go = threading.Event()
        self.waiting = threading.Event()

    def _fail(self, qid: str) -> None:
        if qid == self.qid:
            self.waiting.set()
            assert self.go.wait(10.0)
            raise SpoolError(f"cannot write message {qid}")

    def update(self, msg: QueuedMessage) -> None:
        self._fail(msg.queue_id)
        super().update(msg)

    def remove(self, qid: str) -> None:
        self._fail(qid)
        super().remove(qid)


def published(metrics: Metrics) -> tuple[float | None, ...]:
    def value(state: str) -> float | None:
        return metrics.registry.get_sample_value("dane_relay_queue_messages", {"state": state})

    return (value("active"), value("deferred"), value("held"), metrics._oldest_received)


@pytest.mark.parametrize("action", ["hold", "delete"])
async def test_gauges_are_right_after_a_hold_or_delete_that_cannot_be_stored(
    tmp_path: Path, action: str
) -> None:
    """hold and delete change the queue before their write and put it back when the write
    fails, but did not publish the gauges again: a message arriving during the write
    published the changed queue (held 1, or the deferred message gone), and that stayed
    until some other message changed."""
    store = FailingWriteStore(tmp_path / "spool")
    store.open()
    metrics = Metrics()
    runner = QueueRunner(store, DeliverBDeferC(), CFG, metrics, "relay.test", clock=lambda: NOW)
    old = store.commit(sender="a@example.org", recipients=["b@example.net"], body=b"x", now=NOW)
    old = replace(old, attempts=1, next_attempt=NOW + 1000)  # deferred
    store.update(old)
    runner.load([old])
    assert published(metrics) == (0.0, 1.0, 0.0, NOW)
    store.qid = old.queue_id
    try:
        task = asyncio.create_task(getattr(runner, action)(old.queue_id))
        await until(store.waiting.is_set)
        new = store.commit(
            sender="a@example.org", recipients=["c@example.net"], body=b"y", now=NOW + 5
        )
        runner.submit(new)  # publishes the gauges while the write goes on
        store.go.set()
        with pytest.raises(SpoolError):
            await asyncio.wait_for(task, 10.0)
        assert runner.message(old.queue_id) == old
        # The queue: `old` deferred, not held; `new` active. The oldest arrived at NOW.
        assert published(metrics) == (1.0, 1.0, 0.0, NOW)
    finally:
        store.go.set()
        store.close()


async def test_a_record_without_a_valid_next_attempt_hides_no_other_message(
    tmp_path: Path,
) -> None:
    """A record whose next_attempt is NaN (the spool's JSON accepts it: a hand-edited or
    damaged file) compares neither below nor above anything: pushed into the schedule
    heap, it kept a due message pushed after it below it, out of the loop's sight until
    a later one came up. It is tried at once instead, like a message just arrived."""
    store = SpoolStore(tmp_path / "spool")
    store.open()
    engine = DeliverBDeferC()
    runner = QueueRunner(
        store, engine, CFG, Metrics(), "relay.test", clock=lambda: NOW, rand=lambda: 0.0
    )
    due_at = {"later": NOW + 50, "broken": float("nan"), "later2": NOW + 60, "due": NOW - 1}
    names: dict[str, str] = {}
    loaded = []
    for name, at in due_at.items():
        committed = store.commit(
            sender="a@example.org", recipients=[f"c@{name}.example"], body=b"x", now=NOW - 10
        )
        msg = replace(committed, next_attempt=at)
        store.update(msg)
        names[committed.queue_id] = name
        loaded.append(msg)
    runner.load(loaded)
    loop = asyncio.create_task(runner.run())
    try:
        await until(lambda: len(engine.calls) == 2 and not runner._in_flight)
        assert sorted(c[0] for c in engine.calls) == ["c@broken.example", "c@due.example"]
        broken = runner.message(loaded[1].queue_id)
        assert broken is not None and broken.next_attempt == NOW + 300  # finite again
    finally:
        await runner.stop(grace=5.0)
        await asyncio.wait_for(loop, 5.0)
        store.close()
