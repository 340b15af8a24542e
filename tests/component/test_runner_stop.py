"""QueueRunner.stop(grace) with a real spool: a delivery that ends within the grace is
recorded, one that does not is cancelled and its message stays queued on disk exactly as
it was (the next start retries it); messages not started are left alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from relay.config import DeliveryConfig
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult
from relay.smtp.reply import SmtpReply
from relay.spool.runner import QueueRunner
from relay.spool.store import SpoolStore

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

BODY = b"Subject: stop\r\n\r\nbody\r\n"
SENT = SmtpReply(250, "2.0.0", "Ok")


class GatedDeliverer:
    """Deliveries to "slow@…" wait for `release`; the others are delivered at once."""

    def __init__(self) -> None:
        self.started: asyncio.Queue[str] = asyncio.Queue()
        self.release = asyncio.Event()
        self.cancelled: list[str] = []

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        received: float,
        smtputf8: bool = False,
    ) -> list[RecipientResult]:
        self.started.put_nowait(recipients[0])
        if recipients[0].startswith("slow@"):
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(queue_id)
                raise
        return [RecipientResult(r, Outcome.DELIVERED, SENT, "mx[192.0.2.1]:25") for r in recipients]


async def _runner(tmp_path: Path, *rcpts: str) -> tuple[QueueRunner, SpoolStore, list[str]]:
    store = SpoolStore(tmp_path / "spool")
    store.open()
    qids = []
    for rcpt in rcpts:
        msg = store.commit(sender="alice@example.org", recipients=[rcpt], body=BODY)
        qids.append(msg.queue_id)
    runner = QueueRunner(store, GatedDeliverer(), DeliveryConfig(concurrency=4), Metrics(), "r")
    runner.load(store.recover())
    return runner, store, qids


async def test_delivery_beyond_the_grace_is_cancelled_and_stays_queued(tmp_path: Path) -> None:
    runner, store, (qid,) = await _runner(tmp_path, "slow@example.net")
    engine = runner.engine
    assert isinstance(engine, GatedDeliverer)
    task = asyncio.create_task(runner.run())
    assert await engine.started.get() == "slow@example.net"
    before = (store.directory / "env" / qid).read_bytes()

    assert await runner.stop(grace=0.2) == 1
    assert engine.cancelled == [qid]
    # On disk as before the attempt, and still in the queue.
    assert (store.directory / "env" / qid).read_bytes() == before
    assert (store.directory / "data" / qid).read_bytes() == BODY
    assert [m.queue_id for m in runner.snapshot()] == [qid]
    await asyncio.wait_for(task, 5)
    store.close()


async def test_delivery_that_ends_within_the_grace_is_recorded(tmp_path: Path) -> None:
    runner, store, (qid,) = await _runner(tmp_path, "slow@example.net")
    engine = runner.engine
    assert isinstance(engine, GatedDeliverer)
    task = asyncio.create_task(runner.run())
    assert await engine.started.get() == "slow@example.net"

    stopping = asyncio.create_task(runner.stop(grace=10.0))
    await asyncio.sleep(0)  # stop() has begun: no new deliveries from here on
    engine.release.set()
    assert await stopping == 0
    assert engine.cancelled == []
    assert runner.snapshot() == []
    assert sorted(p.name for p in (store.directory / "env").iterdir()) == []
    await asyncio.wait_for(task, 5)
    store.close()


async def test_stop_without_deliveries_returns_at_once(tmp_path: Path) -> None:
    runner, store, _ = await _runner(tmp_path)
    task = asyncio.create_task(runner.run())
    await asyncio.sleep(0)
    assert await runner.stop(grace=10.0) == 0
    await asyncio.wait_for(task, 5)
    store.close()
