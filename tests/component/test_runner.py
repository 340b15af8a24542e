"""relay.spool.runner.QueueRunner with a real on-disk spool and a scripted deliverer.

Synchronisation is on events only: the store wrapper signals each completed store
operation to the event loop, and the fake deliverer signals each call.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from relay.config import DeliveryConfig
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult, Step
from relay.smtp.reply import SmtpReply
from relay.spool.admin import MessageBusy, MessageHeld, UnknownMessage
from relay.spool.records import (
    HISTORY_KEPT,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
    load,
)
from relay.spool.runner import QueueRunner
from relay.spool.store import SpoolStore

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

NOW = 1_700_000_000.0
LIFETIME = 5 * 86400.0
BODY = b"From: Alice <alice@example.org>\r\nSubject: report\r\n\r\nthe body\r\n"
SENT = SmtpReply(250, "2.0.0", "Ok: queued as 99")
DANE_FAIL = SmtpReply(451, "4.7.5", "Server certificate not verified (no-match)")
UNKNOWN = SmtpReply(550, "5.1.1", "<bob@example.net>: user unknown")
RELAY = "mx.example.net[192.0.2.1]:25"
CFG = DeliveryConfig(
    concurrency=4,
    min_backoff=300.0,
    max_backoff=4000.0,
    max_queue_lifetime=LIFETIME,
    scan_interval=60.0,
)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ObservedStore(SpoolStore):
    """A real SpoolStore that tells the event loop about every finished operation."""

    def __init__(self, directory: Path, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(directory)
        self.loop = loop
        self.ops: list[tuple[str, str]] = []
        self.committed: dict[str, QueuedMessage] = {}  # each record as commit() wrote it
        self.changed = asyncio.Event()

    def _note(self, op: str, qid: str) -> None:
        self.ops.append((op, qid))  # from a worker thread: list.append is atomic
        self.loop.call_soon_threadsafe(self.changed.set)

    def commit(self, **kwargs: Any) -> QueuedMessage:
        msg = super().commit(**kwargs)
        self.committed[msg.queue_id] = msg
        self._note("commit", msg.queue_id)
        return msg

    def update(self, msg: QueuedMessage) -> None:
        super().update(msg)
        self._note("update", msg.queue_id)

    def remove(self, qid: str) -> None:
        super().remove(qid)
        self._note("remove", qid)

    def read_body(self, qid: str) -> bytes:
        body = super().read_body(qid)
        self._note("read_body", qid)
        return body

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                if predicate():
                    return
                await self.changed.wait()

    def envelope(self, qid: str) -> QueuedMessage:
        return load((self.env / qid).read_bytes())

    def queued_ids(self) -> list[str]:
        return sorted(p.name for p in self.env.iterdir())


Script = Callable[[str, str, Sequence[str]], list[RecipientResult]]


class FakeDeliverer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls: list[tuple[str, str, list[str], bytes, float]] = []
        self.smtputf8: list[bool] = []
        self.called = asyncio.Event()

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        received: float,
        smtputf8: bool = False,
    ) -> list[RecipientResult]:
        self.calls.append((queue_id, sender, list(recipients), body, received))
        self.smtputf8.append(smtputf8)
        self.called.set()
        return self.script(queue_id, sender, recipients)


def every(outcome: Outcome, reply: SmtpReply, reason: str = "") -> Script:
    def script(qid: str, sender: str, rcpts: Sequence[str]) -> list[RecipientResult]:
        return [RecipientResult(r, outcome, reply, RELAY, reason) for r in rcpts]

    return script


def reason_of(outcome: Outcome, reply: SmtpReply) -> str:
    """The reason the engine gives with `reply`: DANE_FAIL and a 4.4.1 are the relay's own
    text (no peer said them; the DSN writes them X-Dane-Relay), any other the peer's."""
    if reply == DANE_FAIL:
        return "dane_verification"
    if reply.enhanced == "4.4.1":
        return "connect"
    peer = {Outcome.DELIVERED: "sent", Outcome.DEFERRED: "remote_4xx"}
    return peer.get(outcome, "remote_5xx")


def per_recipient(replies: dict[str, tuple[Outcome, SmtpReply]], bounce_reply: Script) -> Script:
    """Scripted replies for the original message; `bounce_reply` for DSNs (sender "")."""

    def script(qid: str, sender: str, rcpts: Sequence[str]) -> list[RecipientResult]:
        if sender == "":
            return bounce_reply(qid, sender, rcpts)
        return [RecipientResult(r, *replies[r], RELAY, reason_of(*replies[r])) for r in rcpts]

    return script


DSN_DEFERRED = every(Outcome.DEFERRED, SmtpReply(451, "4.4.1", "Connection failed"))


@asynccontextmanager
async def running(
    tmp_path: Path,
    script: Script,
    *,
    cfg: DeliveryConfig = CFG,
    clock: Clock | None = None,
    rand: Callable[[], float] = lambda: 0.0,
) -> AsyncIterator[tuple[QueueRunner, ObservedStore, FakeDeliverer, Metrics, Clock]]:
    """A runner on a real spool; `rand` is its jitter source (default: the low end of
    each retry window, relay.spool.schedule.retry_window)."""
    clock = clock or Clock()
    store = ObservedStore(tmp_path / "spool", asyncio.get_running_loop())
    store.open()
    deliverer = FakeDeliverer(script)
    metrics = Metrics()
    runner = QueueRunner(
        store, deliverer, cfg, metrics, "relay.example.net", clock=clock, rand=rand
    )
    task = asyncio.create_task(runner.run())
    try:
        yield runner, store, deliverer, metrics, clock
    finally:
        await runner.stop(grace=5.0)
        await asyncio.wait_for(task, 5.0)
        store.close()


def commit(
    store: SpoolStore, *recipients: str, sender: str = "alice@example.org", **kw: Any
) -> QueuedMessage:
    return store.commit(sender=sender, recipients=list(recipients), body=BODY, now=NOW, **kw)


def dsn_parts(raw: bytes) -> list[email.message.Message]:
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report"
    payload = msg.get_payload()
    assert isinstance(payload, list)
    status = payload[1].get_payload()
    assert isinstance(status, list)
    return [msg, *payload, *status]


# -- outcomes ------------------------------------------------------------------------------------


async def test_smtputf8_flag_of_the_record_reaches_the_engine(tmp_path: Path) -> None:
    async with running(tmp_path, every(Outcome.DELIVERED, SENT, "sent")) as (
        runner,
        store,
        deliverer,
        _metrics,
        _,
    ):
        plain = commit(store, "bob@example.net")
        utf8 = commit(store, "bob@example.net", sender="ålice@example.org", smtputf8=True)
        assert store.envelope(utf8.queue_id).extra == {"smtputf8": True}
        runner.submit(plain)
        await store.until(lambda: ("remove", plain.queue_id) in store.ops)
        runner.submit(utf8)
        await store.until(lambda: ("remove", utf8.queue_id) in store.ops)
        assert deliverer.smtputf8 == [False, True]


async def test_delivered_message_is_removed(tmp_path: Path) -> None:
    async with running(tmp_path, every(Outcome.DELIVERED, SENT, "sent")) as (
        runner,
        store,
        deliverer,
        metrics,
        _,
    ):
        msg = commit(store, "bob@example.net", "carol@example.com")
        runner.submit(msg)
        await store.until(lambda: ("remove", msg.queue_id) in store.ops)

        assert deliverer.calls == [
            (msg.queue_id, "alice@example.org", ["bob@example.net", "carol@example.com"], BODY, NOW)
        ]
        assert store.queued_ids() == []
        assert sorted(p.name for p in store.data.iterdir()) == []
        assert [op for op in store.ops if op[0] != "read_body"] == [
            ("commit", msg.queue_id),
            ("remove", msg.queue_id),
        ]
    assert runner.snapshot() == []
    assert metrics.registry.get_sample_value("dane_relay_queue_messages", {"state": "active"}) == 0


async def test_deferred_message_is_rescheduled_with_backoff(tmp_path: Path) -> None:
    async with running(tmp_path, every(Outcome.DEFERRED, DANE_FAIL, "dane_verification")) as (
        runner,
        store,
        deliverer,
        metrics,
        clock,
    ):
        msg = commit(store, "bob@example.net")
        clock.now = NOW + 10
        runner.submit(msg)
        await store.until(lambda: ("update", msg.queue_id) in store.ops)

        stored = store.envelope(msg.queue_id)
        assert stored.attempts == 1
        assert stored.next_attempt == NOW + 10 + 300.0
        assert stored.recipients == (
            RecipientState(
                "bob@example.net",
                RecipientStatus.PENDING,
                attempts=1,
                last_reply="451 4.7.5 Server certificate not verified (no-match)",
                last_relay=RELAY,
            ),
        )
        assert (store.data / msg.queue_id).read_bytes() == BODY
        assert len(deliverer.calls) == 1

        # The second failure doubles the nominal wait to 600s (Postfix-style backoff); the
        # jitter source at 0.0 picks the low end of its window [450, 600].
        clock.now = NOW + 10 + 300.0
        runner.load([])  # wakes the loop
        await store.until(lambda: store.ops.count(("update", msg.queue_id)) == 2)
        stored = store.envelope(msg.queue_id)
        assert (stored.attempts, stored.recipients[0].attempts) == (2, 2)
        assert stored.next_attempt == NOW + 10 + 300.0 + 450.0
        assert len(deliverer.calls) == 2
    assert metrics.registry.get_sample_value("dane_relay_queue_messages", {"state": "active"}) == 0
    assert (
        metrics.registry.get_sample_value("dane_relay_queue_messages", {"state": "deferred"}) == 1
    )


async def test_retry_delay_is_jittered_by_the_runner_random_source(tmp_path: Path) -> None:
    draws = iter([0.5, 0.25])
    async with running(tmp_path, every(Outcome.DEFERRED, DANE_FAIL), rand=lambda: next(draws)) as (
        runner,
        store,
        _deliverer,
        _metrics,
        clock,
    ):
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        await store.until(lambda: ("update", msg.queue_id) in store.ops)
        # First retry window [300, 375] (relay.spool.schedule.retry_window), point 0.5.
        assert store.envelope(msg.queue_id).next_attempt == NOW + 337.5
        clock.now = NOW + 337.5
        runner.load([])
        await store.until(lambda: store.ops.count(("update", msg.queue_id)) == 2)
        # Second retry window [450, 600], point 0.25.
        assert store.envelope(msg.queue_id).next_attempt == NOW + 337.5 + 487.5


async def test_only_pending_recipients_are_retried(tmp_path: Path) -> None:
    replies = {
        "bob@example.net": (Outcome.DELIVERED, SENT),
        "carol@example.com": (Outcome.DEFERRED, DANE_FAIL),
    }
    async with running(tmp_path, per_recipient(replies, DSN_DEFERRED)) as (
        runner,
        store,
        deliverer,
        _,
        clock,
    ):
        msg = commit(store, "bob@example.net", "carol@example.com")
        runner.submit(msg)
        await store.until(lambda: ("update", msg.queue_id) in store.ops)
        stored = store.envelope(msg.queue_id)
        assert [(r.address, r.status) for r in stored.recipients] == [
            ("bob@example.net", RecipientStatus.DELIVERED),
            ("carol@example.com", RecipientStatus.PENDING),
        ]
        clock.now = NOW + 300.0
        runner.load([])
        await store.until(lambda: store.ops.count(("update", msg.queue_id)) == 2)
        assert deliverer.calls[1][2] == ["carol@example.com"]


async def test_bounce_commits_a_dsn_to_the_sender_and_removes_the_original(
    tmp_path: Path,
) -> None:
    script = per_recipient({"bob@example.net": (Outcome.BOUNCED, UNKNOWN)}, DSN_DEFERRED)
    async with running(tmp_path, script) as (runner, store, _, metrics, _clock):
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        await store.until(lambda: ("remove", msg.queue_id) in store.ops)

        commits = [qid for op, qid in store.ops if op == "commit" and qid != msg.queue_id]
        assert len(commits) == 1
        (dsn_id,) = commits
        # The DSN is durable before the original leaves the queue.
        assert store.ops.index(("commit", dsn_id)) < store.ops.index(("remove", msg.queue_id))
        assert msg.queue_id not in store.queued_ids()
        assert dsn_id in store.queued_ids()
        dsn = store.envelope(dsn_id)
        assert dsn.sender == ""
        assert [r.address for r in dsn.recipients] == ["alice@example.org"]
        assert dsn.is_bounce is True

        top, text, status, headers, per_message, per_rcpt = dsn_parts(store.read_body(dsn_id))
        assert top["To"] == "<alice@example.org>"
        assert top["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.net>"
        assert per_message["X-Queue-ID"] == msg.queue_id
        assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.net"
        assert per_rcpt["Action"] == "failed"
        assert per_rcpt["Status"] == "5.1.1"
        assert per_rcpt["Remote-MTA"] == "dns; mx.example.net"
        assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: user unknown"
        returned = headers.get_payload(decode=True)
        assert isinstance(returned, bytes)
        assert b"Subject: report" in returned and b"the body" not in returned
    assert metrics.registry.get_sample_value("dane_relay_bounces_generated_total") == 1


async def test_partial_bounce_keeps_the_deferred_recipient_queued(tmp_path: Path) -> None:
    replies = {
        "bob@example.net": (Outcome.BOUNCED, UNKNOWN),
        "carol@example.com": (Outcome.DEFERRED, DANE_FAIL),
    }
    async with running(tmp_path, per_recipient(replies, DSN_DEFERRED)) as (
        runner,
        store,
        _,
        _metrics,
        _clock,
    ):
        msg = commit(store, "bob@example.net", "carol@example.com")
        runner.submit(msg)
        await store.until(lambda: ("update", msg.queue_id) in store.ops)
        stored = store.envelope(msg.queue_id)
        assert [(r.address, r.status, r.last_reply) for r in stored.recipients] == [
            ("bob@example.net", RecipientStatus.BOUNCED, str(UNKNOWN)),
            ("carol@example.com", RecipientStatus.PENDING, str(DANE_FAIL)),
        ]
        dsns = [qid for op, qid in store.ops if op == "commit" and qid != msg.queue_id]
        assert len(dsns) == 1
        *_, per_rcpt = dsn_parts(store.read_body(dsns[0]))
        assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.net"


@pytest.mark.parametrize("is_bounce", [True, False], ids=["dsn", "null-sender"])
async def test_bounce_of_null_sender_message_produces_no_dsn(
    tmp_path: Path, is_bounce: bool
) -> None:
    async with running(tmp_path, every(Outcome.BOUNCED, UNKNOWN, "remote_5xx")) as (
        runner,
        store,
        deliverer,
        metrics,
        _,
    ):
        msg = commit(store, "bob@example.net", sender="", is_bounce=is_bounce)
        runner.submit(msg)
        await store.until(lambda: ("remove", msg.queue_id) in store.ops)
        assert [op for op, _ in store.ops].count("commit") == 1  # only the message itself
        assert store.queued_ids() == []
        assert len(deliverer.calls) == 1
    assert metrics.registry.get_sample_value("dane_relay_bounces_generated_total") == 0


async def test_queue_lifetime_expiry_bounces_with_5_4_7(tmp_path: Path) -> None:
    clock = Clock(NOW + LIFETIME)
    last = SmtpReply(451, "4.4.1", "Connection refused")
    script = per_recipient({"bob@example.net": (Outcome.DEFERRED, last)}, DSN_DEFERRED)
    async with running(tmp_path, script, clock=clock) as (runner, store, _, _metrics, _clock):
        msg = commit(store, "bob@example.net")  # received at NOW: exactly LIFETIME ago
        runner.submit(msg)
        await store.until(lambda: ("remove", msg.queue_id) in store.ops)
        (dsn_id,) = [qid for op, qid in store.ops if op == "commit" and qid != msg.queue_id]
        *_, per_rcpt = dsn_parts(store.read_body(dsn_id))
        assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.net"
        assert per_rcpt["Status"] == "5.4.7"
        # The relay's own text about a connection that was never made (review 5b f3): no
        # Remote-MTA, and not "smtp" (RFC 3464 §2.3.5, §2.3.6).
        assert per_rcpt["Diagnostic-Code"] == (
            "X-Dane-Relay; 550 5.4.7 delivery time expired, last error: "
            "451 4.4.1 Connection refused"
        )
        assert per_rcpt["Remote-MTA"] is None


async def test_deferral_just_before_the_lifetime_stays_queued(tmp_path: Path) -> None:
    clock = Clock(NOW + LIFETIME - 1)
    async with running(tmp_path, every(Outcome.DEFERRED, DANE_FAIL), clock=clock) as (
        runner,
        store,
        _,
        _metrics,
        _clock,
    ):
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        await store.until(lambda: ("update", msg.queue_id) in store.ops)
        assert store.envelope(msg.queue_id).pending != ()
        assert [op for op, _ in store.ops].count("commit") == 1


async def test_messages_not_yet_due_are_left_alone(tmp_path: Path) -> None:
    async with running(tmp_path, every(Outcome.DELIVERED, SENT)) as (
        runner,
        store,
        deliverer,
        _,
        clock,
    ):
        later = commit(store, "later@example.net")
        now = commit(store, "now@example.net")
        runner.load([replace(later, next_attempt=NOW + 1000), now])
        await store.until(lambda: ("remove", now.queue_id) in store.ops)
        assert [c[0] for c in deliverer.calls] == [now.queue_id]
        assert store.queued_ids() == [later.queue_id]


async def test_delivery_exception_reschedules_instead_of_retrying_at_once(
    tmp_path: Path,
) -> None:
    clock = Clock()

    def script(qid: str, sender: str, rcpts: Sequence[str]) -> list[RecipientResult]:
        if clock.now < NOW + 300.0:
            raise RuntimeError("engine bug")
        return every(Outcome.DELIVERED, SENT)(qid, sender, rcpts)

    async with running(tmp_path, script, clock=clock) as (runner, store, deliverer, _, _c):
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        await asyncio.wait_for(deliverer.called.wait(), 10)
        # The failing task has finished by the time this task runs again.
        assert [m.next_attempt for m in runner.snapshot()] == [NOW + 300.0]
        assert store.envelope(msg.queue_id) == msg  # nothing recorded on disk
        clock.now = NOW + 300.0
        runner.load([])
        await store.until(lambda: ("remove", msg.queue_id) in store.ops)
        assert len(deliverer.calls) == 2


# -- concurrency ---------------------------------------------------------------------------------


async def test_concurrency_limit_is_respected(tmp_path: Path) -> None:
    limit = 2
    gate = asyncio.Event()
    at_limit = asyncio.Event()
    state = {"current": 0, "max": 0, "done": 0}

    class BlockingDeliverer:
        async def deliver(
            self,
            queue_id: str,
            sender: str,
            rcpts: Sequence[str],
            body: bytes,
            received: float,
            smtputf8: bool = False,
        ) -> list[RecipientResult]:
            state["current"] += 1
            state["max"] = max(state["max"], state["current"])
            if state["current"] >= limit:
                at_limit.set()
            await gate.wait()
            state["current"] -= 1
            state["done"] += 1
            return every(Outcome.DELIVERED, SENT)(queue_id, sender, rcpts)

    store = ObservedStore(tmp_path / "spool", asyncio.get_running_loop())
    store.open()
    metrics = Metrics()
    cfg = DeliveryConfig(concurrency=limit)
    runner = QueueRunner(store, BlockingDeliverer(), cfg, metrics, "relay", clock=Clock())
    messages = [commit(store, f"r{i}@example.net") for i in range(5)]
    runner.load(messages)
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(at_limit.wait(), 10)
        # All five are due; only `limit` may be inside deliver() (and have read a body).
        assert state["current"] == limit
        assert [op for op, _ in store.ops].count("read_body") == limit
        gate.set()
        await store.until(lambda: [op for op, _ in store.ops].count("remove") == 5)
    finally:
        await runner.stop(grace=5.0)
        await asyncio.wait_for(task, 5.0)
        store.close()
    assert state == {"current": 0, "max": limit, "done": 5}
    assert store.queued_ids() == []


# -- clock consistency -------------------------------------------------------------------------


async def test_dsn_is_stamped_with_the_runner_clock(tmp_path: Path) -> None:
    script = per_recipient({"bob@example.net": (Outcome.BOUNCED, UNKNOWN)}, DSN_DEFERRED)
    async with running(tmp_path, script) as (runner, store, deliverer, _, _clock):
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        await store.until(lambda: ("remove", msg.queue_id) in store.ops)
        (dsn_id,) = [qid for op, qid in store.ops if op == "commit" and qid != msg.queue_id]
        # The record as committed: the runner may already have tried (and deferred) the
        # DSN by now, which moves next_attempt on disk.
        dsn = store.committed[dsn_id]
        assert (dsn.received, dsn.next_attempt) == (NOW, NOW)


# -- attempt history -----------------------------------------------------------------------------

MX1_DANE = Step(
    time=NOW + 10,
    outcome=Outcome.DEFERRED,
    reply="451 4.7.5 Server certificate not verified (no-match)",
    host="mx1.example.net",
    address="192.0.2.1",
    port=25,
    tls="encrypted",
    dane="fail reason=no-match",
)


def mx2_step(time: float, reply: SmtpReply, outcome: Outcome) -> Step:
    return Step(time, outcome, str(reply), "mx2.example.net", "192.0.2.2", 25, "verified", "pass")


def with_history(outcome: Outcome, reply: SmtpReply, clock: Clock) -> Script:
    """MX1 fails DANE, MX2 gives `reply`: the history the engine would report."""

    def script(qid: str, sender: str, rcpts: Sequence[str]) -> list[RecipientResult]:
        if sender == "":
            return DSN_DEFERRED(qid, sender, rcpts)
        steps = (replace(MX1_DANE, time=clock.now), mx2_step(clock.now + 1, reply, outcome))
        relay = "mx2.example.net[192.0.2.2]:25"
        reason = reason_of(outcome, reply)
        return [RecipientResult(r, outcome, reply, relay, reason, steps) for r in rcpts]

    return script


async def test_attempt_history_is_written_to_the_envelope_record(tmp_path: Path) -> None:
    clock = Clock(NOW + 10)
    busy = SmtpReply(451, "4.2.0", "Try later")
    async with running(tmp_path, with_history(Outcome.DEFERRED, busy, clock), clock=clock) as (
        runner,
        store,
        _deliverer,
        _metrics,
        _,
    ):
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        await store.until(lambda: ("update", msg.queue_id) in store.ops)
        (state,) = store.envelope(msg.queue_id).recipients
        assert state.history == (MX1_DANE, mx2_step(NOW + 11, busy, Outcome.DEFERRED))
        assert state.history_dropped == 0
        assert (state.last_reply, state.last_relay) == (
            "451 4.2.0 Try later",
            "mx2.example.net[192.0.2.2]:25",
        )
        raw = json.loads((store.env / msg.queue_id).read_bytes())
        assert raw["recipients"][0]["history"][0] == {
            "time": NOW + 10,
            "outcome": "deferred",
            "reply": "451 4.7.5 Server certificate not verified (no-match)",
            "host": "mx1.example.net",
            "address": "192.0.2.1",
            "port": 25,
            "tls": "encrypted",
            "dane": "fail reason=no-match",
        }

        # The next attempt appends its steps after the first attempt's.
        clock.now = NOW + 10 + 300.0
        runner.load([])
        await store.until(lambda: store.ops.count(("update", msg.queue_id)) == 2)
        (state,) = store.envelope(msg.queue_id).recipients
        assert [(s.time, s.host) for s in state.history] == [
            (NOW + 10, "mx1.example.net"),
            (NOW + 11, "mx2.example.net"),
            (NOW + 310, "mx1.example.net"),
            (NOW + 311, "mx2.example.net"),
        ]


async def test_attempt_history_in_the_record_is_bounded(tmp_path: Path) -> None:
    clock = Clock(NOW + 10)
    busy = SmtpReply(451, "4.2.0", "Try later")
    async with running(tmp_path, with_history(Outcome.DEFERRED, busy, clock), clock=clock) as (
        runner,
        store,
        _deliverer,
        _metrics,
        _,
    ):
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        for attempt in range(1, 13):  # 12 attempts of 2 steps: 24 steps
            await store.until(lambda n=attempt: store.ops.count(("update", msg.queue_id)) == n)
            clock.now = store.envelope(msg.queue_id).next_attempt
            runner.load([])
        (state,) = store.envelope(msg.queue_id).recipients
        assert len(state.history) == 1 + HISTORY_KEPT
        assert state.history_dropped == 24 - 1 - HISTORY_KEPT
        assert state.history[0] == MX1_DANE  # the first step of the first attempt
        assert state.attempts >= 12


async def test_dsn_tells_the_attempt_history(tmp_path: Path) -> None:
    clock = Clock(NOW + 10)
    async with running(tmp_path, with_history(Outcome.BOUNCED, UNKNOWN, clock), clock=clock) as (
        runner,
        store,
        _deliverer,
        _metrics,
        _,
    ):
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        await store.until(lambda: ("remove", msg.queue_id) in store.ops)
        (dsn_id,) = [qid for op, qid in store.ops if op == "commit" and qid != msg.queue_id]
        _msg, text, *_rest, per_rcpt = dsn_parts(store.read_body(dsn_id))
        assert per_rcpt["Last-Attempt-Date"] == "Tue, 14 Nov 2023 22:13:31 -0000"  # NOW + 11
        assert per_rcpt["Remote-MTA"] == "dns; mx2.example.net"
        assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: user unknown"
        told = text.get_payload(decode=True)
        assert isinstance(told, bytes)
        assert (
            b"mx1.example.net[192.0.2.1]:25 tls=encrypted dane=fail reason=no-match: "
            b"451 4.7.5 Server certificate not verified (no-match)\r\n"
        ) in told
        assert (
            b"mx2.example.net[192.0.2.2]:25 tls=verified dane=pass: "
            b"550 5.1.1 <bob@example.net>: user unknown\r\n"
        ) in told


# -- operator actions (hold, release, delete, flush) ------------------------------------------


def queue_gauges(metrics: Metrics) -> dict[str, float | None]:
    return {
        state: metrics.registry.get_sample_value("dane_relay_queue_messages", {"state": state})
        for state in ("active", "deferred", "held")
    }


async def test_held_message_is_never_delivered_and_release_makes_it_due(tmp_path: Path) -> None:
    async with running(tmp_path, every(Outcome.DELIVERED, SENT)) as (
        runner,
        store,
        deliverer,
        _metrics,
        clock,
    ):
        held = commit(store, "held@example.net")
        other = commit(store, "other@example.net")
        runner.load([replace(held, next_attempt=NOW + 1000)])
        assert (await runner.hold(held.queue_id)).held
        assert store.envelope(held.queue_id).held
        assert queue_gauges(_metrics) == {"active": 0, "deferred": 0, "held": 1}
        assert json.loads((store.env / held.queue_id).read_bytes())["held"] is True
        clock.now = NOW + 5000  # long past its schedule: still not picked
        runner.submit(other)
        await store.until(lambda: ("remove", other.queue_id) in store.ops)
        assert [c[0] for c in deliverer.calls] == [other.queue_id]
        assert store.envelope(held.queue_id).held

        freed = await runner.release(held.queue_id)
        assert (freed.held, freed.next_attempt) == (False, NOW + 5000)
        assert queue_gauges(_metrics)["held"] == 0
        await store.until(lambda: ("remove", held.queue_id) in store.ops)
        assert [c[0] for c in deliverer.calls] == [other.queue_id, held.queue_id]


async def test_release_is_written_to_the_record(tmp_path: Path) -> None:
    async with running(tmp_path, every(Outcome.DELIVERED, SENT)) as (runner, store, _, _m, clock):
        msg = commit(store, "bob@example.net")
        runner.load([replace(msg, next_attempt=NOW + 1000)])
        await runner.hold(msg.queue_id)
        await runner.stop()  # nothing is delivered from here on
        clock.now = NOW + 7
        await runner.release(msg.queue_id)
        record = store.envelope(msg.queue_id)
        assert (record.held, record.next_attempt) == (False, NOW + 7)
        assert "held" not in json.loads((store.env / msg.queue_id).read_bytes())


async def test_delete_removes_the_message_without_a_bounce(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="relay.queue")
    async with running(tmp_path, every(Outcome.DELIVERED, SENT)) as (
        runner,
        store,
        deliverer,
        _m,
        _c,
    ):
        msg = commit(store, "bob@example.net")
        runner.load([replace(msg, next_attempt=NOW + 1000)])
        gone = await runner.delete(msg.queue_id)
        assert gone.queue_id == msg.queue_id
        assert store.queued_ids() == []
        assert sorted(p.name for p in store.data.iterdir()) == []
        assert runner.snapshot() == []
        assert [op for op, _ in store.ops].count("commit") == 1  # no DSN
        assert deliverer.calls == []
    assert (
        f"queue_id={msg.queue_id} deleted by operator from=<alice@example.org> "
        "pending=<bob@example.net> (no bounce)"
    ) in caplog.messages


async def test_unknown_ids_are_refused(tmp_path: Path) -> None:
    async with running(tmp_path, every(Outcome.DELIVERED, SENT)) as (runner, _s, _d, _m, _c):
        for action in (runner.hold, runner.release, runner.delete):
            with pytest.raises(UnknownMessage, match="no queued message with id 0123456789"):
                await action("0123456789")
        with pytest.raises(UnknownMessage):
            runner.flush("0123456789")


async def test_actions_on_a_message_in_delivery_are_refused(tmp_path: Path) -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    class Blocking(FakeDeliverer):
        async def deliver(self, *args: Any, **kwargs: Any) -> list[RecipientResult]:
            started.set()
            await gate.wait()
            return await super().deliver(*args, **kwargs)

    store = ObservedStore(tmp_path / "spool", asyncio.get_running_loop())
    store.open()
    runner = QueueRunner(
        store, Blocking(every(Outcome.DELIVERED, SENT)), CFG, Metrics(), "relay", clock=Clock()
    )
    task = asyncio.create_task(runner.run())
    try:
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        await asyncio.wait_for(started.wait(), 10)
        assert runner.in_delivery(msg.queue_id)
        for action in (runner.hold, runner.release, runner.delete):
            with pytest.raises(MessageBusy, match="being delivered right now"):
                await action(msg.queue_id)
        assert runner.flush(msg.queue_id) == []
        gate.set()
        await store.until(lambda: ("remove", msg.queue_id) in store.ops)
    finally:
        gate.set()
        await runner.stop(grace=5.0)
        await asyncio.wait_for(task, 5.0)
        store.close()


async def test_flush_makes_deferred_messages_that_are_not_held_due_now(tmp_path: Path) -> None:
    async with running(tmp_path, every(Outcome.DELIVERED, SENT)) as (
        runner,
        store,
        deliverer,
        _m,
        _c,
    ):
        one, two, held = (commit(store, f"{n}@example.net") for n in ("one", "two", "held"))
        runner.load([replace(m, next_attempt=NOW + 1000, attempts=1) for m in (one, two, held)])
        await runner.hold(held.queue_id)
        with pytest.raises(MessageHeld, match="on hold; release it"):
            runner.flush(held.queue_id)
        assert runner.flush(one.queue_id) == [one.queue_id]
        await store.until(lambda: ("remove", one.queue_id) in store.ops)
        assert runner.flush() == [two.queue_id]
        await store.until(lambda: ("remove", two.queue_id) in store.ops)
        assert [c[0] for c in deliverer.calls] == [one.queue_id, two.queue_id]
        assert store.queued_ids() == [held.queue_id]
        assert runner.flush() == []


# -- delay warnings ------------------------------------------------------------------------------

WARN_CFG = replace(CFG, delay_warning_after=3600.0)


def delay_notices(store: ObservedStore) -> list[QueuedMessage]:
    return [m for m in store.committed.values() if m.is_bounce]


async def test_one_delay_warning_once_the_message_is_deferred_long_enough(
    tmp_path: Path,
) -> None:
    clock = Clock(NOW + 3600.0)
    async with running(
        tmp_path,
        per_recipient({"bob@example.net": (Outcome.DEFERRED, DANE_FAIL)}, DSN_DEFERRED),
        cfg=WARN_CFG,
        clock=clock,
    ) as (runner, store, _deliverer, _metrics, _clock):
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        await store.until(lambda: ("update", msg.queue_id) in store.ops)
        (notice,) = delay_notices(store)
        assert (notice.sender, [r.address for r in notice.recipients]) == (
            "",
            ["alice@example.org"],
        )
        assert store.envelope(msg.queue_id).delay_warned
        # The warning is committed before the original's record says so.
        assert store.ops.index(("commit", notice.queue_id)) < store.ops.index(
            ("update", msg.queue_id)
        )
        top, _text, status, *_rest = dsn_parts(store.read_body(notice.queue_id))
        assert top["Subject"] == "Delayed Mail (still being retried)"
        per_rcpt = status.get_payload()[1]
        assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.net"
        assert per_rcpt["Action"] == "delayed"
        assert per_rcpt["Status"] == "4.7.5"
        # The DANE verdict is the relay's text about the server it talked to (review 5b f3).
        assert per_rcpt["Diagnostic-Code"] == f"X-Dane-Relay; {DANE_FAIL}"
        assert per_rcpt["Remote-MTA"] == "dns; mx.example.net"
        assert per_rcpt["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 -0000"  # NOW + 5 days

        # Later deferrals do not warn again.
        clock.now = store.envelope(msg.queue_id).next_attempt
        runner.load([])
        await store.until(lambda: store.ops.count(("update", msg.queue_id)) == 2)
        assert len(delay_notices(store)) == 1
        assert store.envelope(msg.queue_id).delay_warned


async def test_no_delay_warning_before_the_threshold(tmp_path: Path) -> None:
    async with running(
        tmp_path, every(Outcome.DEFERRED, DANE_FAIL), cfg=WARN_CFG, clock=Clock(NOW + 3599.0)
    ) as (runner, store, _d, _m, _c):
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        await store.until(lambda: ("update", msg.queue_id) in store.ops)
        assert delay_notices(store) == []
        assert not store.envelope(msg.queue_id).delay_warned


async def test_no_delay_warning_when_switched_off(tmp_path: Path) -> None:
    async with running(
        tmp_path, every(Outcome.DEFERRED, DANE_FAIL), clock=Clock(NOW + LIFETIME - 1)
    ) as (runner, store, _d, _m, _c):
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        await store.until(lambda: ("update", msg.queue_id) in store.ops)
        assert delay_notices(store) == []


async def test_no_delay_warning_for_the_null_sender(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="relay.queue")
    async with running(
        tmp_path, every(Outcome.DEFERRED, DANE_FAIL), cfg=WARN_CFG, clock=Clock(NOW + 7200.0)
    ) as (runner, store, _d, _m, _c):
        msg = commit(store, "bob@example.net", sender="", is_bounce=True)
        runner.submit(msg)
        await store.until(lambda: ("update", msg.queue_id) in store.ops)
        assert [op for op, _ in store.ops].count("commit") == 1
        assert not store.envelope(msg.queue_id).delay_warned
    assert f"queue_id={msg.queue_id} delay warning skipped reason=null_sender" in caplog.messages


async def test_expiry_bounces_without_a_delay_warning(tmp_path: Path) -> None:
    async with running(
        tmp_path,
        per_recipient({"bob@example.net": (Outcome.DEFERRED, DANE_FAIL)}, DSN_DEFERRED),
        cfg=WARN_CFG,
        clock=Clock(NOW + LIFETIME),
    ) as (runner, store, _d, _m, _c):
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        await store.until(lambda: ("remove", msg.queue_id) in store.ops)
        (notice,) = delay_notices(store)
        _top, _text, status, *_rest = dsn_parts(store.read_body(notice.queue_id))
        assert status.get_payload()[1]["Action"] == "failed"


LOOP = SmtpReply(554, "5.4.6", "mail for example.net loops back to myself (host name mx)")
NO_ROUTE = SmtpReply(550, "5.4.4", "no route")
NO_UTF8 = SmtpReply(550, "5.6.7", "no SMTPUTF8")
MX = "dns; mx.example.net"


@pytest.mark.parametrize(
    ("relay", "reason", "reply", "remote_mta", "diagnostic"),
    [
        # Review 5b f3: a loop bounce made no connection (relay "host[-]").
        ("mx.example.net[-]", "mail_loop", LOOP, None, f"X-Dane-Relay; {LOOP}"),
        # A refused connect reached no MTA either (RFC 3464 §2.3.5).
        (RELAY, "connect", NO_ROUTE, None, f"X-Dane-Relay; {NO_ROUTE}"),
        # A reply the server sent: the one case of "smtp;" (RFC 3464 §2.3.6).
        (RELAY, "remote_5xx", UNKNOWN, MX, f"smtp; {UNKNOWN}"),
        # The relay's own verdict about the server it talked to.
        (RELAY, "smtputf8_not_offered", NO_UTF8, MX, f"X-Dane-Relay; {NO_UTF8}"),
        ("none", "dest_suspended", LOOP, None, f"X-Dane-Relay; {LOOP}"),
    ],
    ids=["loop", "connect", "peer-reply", "own-verdict", "no-relay"],
)
async def test_dsn_remote_mta_and_diagnostic_type_follow_who_said_it(
    tmp_path: Path,
    relay: str,
    reason: str,
    reply: SmtpReply,
    remote_mta: str | None,
    diagnostic: str,
) -> None:
    def script(qid: str, sender: str, rcpts: Sequence[str]) -> list[RecipientResult]:
        if sender == "":
            return DSN_DEFERRED(qid, sender, rcpts)
        return [RecipientResult(r, Outcome.BOUNCED, reply, relay, reason) for r in rcpts]

    async with running(tmp_path, script) as (runner, store, _, _metrics, _clock):
        msg = commit(store, "bob@example.net")
        runner.submit(msg)
        await store.until(lambda: ("remove", msg.queue_id) in store.ops)
        (dsn_id,) = [qid for op, qid in store.ops if op == "commit" and qid != msg.queue_id]
        _top, text, *_rest, per_rcpt = dsn_parts(store.read_body(dsn_id))
        assert per_rcpt["Remote-MTA"] == remote_mta
        assert per_rcpt["Diagnostic-Code"] == diagnostic
        told = text.get_payload(decode=True)
        assert isinstance(told, bytes)
        assert (b"(from mx.example.net)" in told) is (remote_mta is not None)


# -- internationalised reports (RFC 6533) ------------------------------------------------------

NO_UTF8_RCPT = SmtpReply(550, "5.6.7", "SMTPUTF8 is required for this recipient address")


async def test_a_global_dsn_to_an_ascii_sender_is_queued_without_smtputf8(tmp_path: Path) -> None:
    """A report naming jörg@bücher.test is a global one (RFC 6533 §6), but its
    message/global-* parts travel without SMTPUTF8: to an ASCII sender it is queued and
    delivered without it, so a sender's server without SMTPUTF8 still gets it."""
    script = per_recipient(
        {
            "jörg@bücher.test": (Outcome.BOUNCED, NO_UTF8_RCPT),
            "bob@example.net": (Outcome.BOUNCED, UNKNOWN),
        },
        DSN_DEFERRED,
    )
    async with running(tmp_path, script) as (runner, store, deliverer, _metrics, _clock):
        utf8 = commit(store, "jörg@bücher.test")
        plain = commit(store, "bob@example.net")
        runner.submit(utf8)
        runner.submit(plain)
        await store.until(
            lambda: {("remove", utf8.queue_id), ("remove", plain.queue_id)} <= set(store.ops)
        )
        by_body = {
            qid: store.read_body(qid)
            for op, qid in store.ops
            if op == "commit" and store.committed[qid].is_bounce
        }
        assert len(by_body) == 2
        (utf8_dsn,) = [q for q, b in by_body.items() if "jörg@bücher.test".encode() in b]
        (plain_dsn,) = [q for q in by_body if q != utf8_dsn]
        assert store.envelope(utf8_dsn).extra == {}
        assert store.envelope(plain_dsn).extra == {}
        assert b"Content-Type: message/global-delivery-status\r\n" in by_body[utf8_dsn]
        assert "Final-Recipient: utf-8; jörg@bücher.test\r\n".encode() in by_body[utf8_dsn]
        assert b"Content-Type: message/delivery-status\r\n" in by_body[plain_dsn]
        # Neither report's delivery attempt asks the engine for SMTPUTF8.
        await store.until(lambda: {("update", utf8_dsn), ("update", plain_dsn)} <= set(store.ops))
        asked = {
            call[0]: flag for call, flag in zip(deliverer.calls, deliverer.smtputf8, strict=True)
        }
        assert (asked[utf8_dsn], asked[plain_dsn]) == (False, False)


async def test_a_delay_warning_naming_a_utf8_recipient_is_global_without_smtputf8(
    tmp_path: Path,
) -> None:
    async with running(
        tmp_path, every(Outcome.DEFERRED, DANE_FAIL), cfg=WARN_CFG, clock=Clock(NOW + 7200.0)
    ) as (runner, store, _d, _m, _c):
        msg = commit(store, "jörg@bücher.test")
        runner.submit(msg)
        await store.until(lambda: ("update", msg.queue_id) in store.ops)
        (notice,) = delay_notices(store)
        assert notice.extra == {}  # the sender's address is ASCII
        body = store.read_body(notice.queue_id)
        assert b"Content-Type: message/global-delivery-status\r\n" in body
        assert "Final-Recipient: utf-8; jörg@bücher.test\r\n".encode() in body
        assert b"Action: delayed\r\n" in body
