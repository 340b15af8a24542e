"""Queue runner: picks due messages, runs the delivery engine, records outcomes.

Contract:
- Every queued message is in memory (loaded by `load` from recovery, or added by
  `submit` after inbound commit) and is retried until each recipient is delivered
  or bounced. Deferred recipients are retried with exponential backoff and random
  jitter (relay.spool.schedule.retry_delay; `rand` is the random source, injectable
  for tests); after `max_queue_lifetime` they bounce with 5.4.7.
- Each attempt's steps (`RecipientResult.history`) are appended to the recipient's
  bounded attempt history in its record (relay.spool.records) and told in the DSN.
- A DSN for bounced recipients is committed to the spool *before* the original's
  state is updated, so a crash can duplicate a DSN but never lose one. Messages
  from the null sender never produce a DSN (RFC 5321 §4.5.5).
- Delay warning: when `delay_warning_after` > 0, the first attempt that leaves
  recipients deferred at least that long after arrival queues ONE delay DSN (RFC 3464,
  Action: delayed) to the sender, then marks the record `delay_warned` (the DSN is
  committed first: a crash may repeat the warning, never lose it). Not for the null
  sender, nor when the attempt bounces the message for its age.
- At most `concurrency` messages are in delivery at once.
- A message on hold (`QueuedMessage.held`) is never delivered. Operator actions
  (`hold`, `release`, `delete`, `flush`, used by relay.control) are serialised, change
  the record on disk before the in-memory queue where the disk matters, and refuse a
  message that is being delivered right now (relay.spool.admin.MessageBusy): its
  attempt is about to rewrite the record, and an action in between would be lost or
  would undo the attempt's results.
- A message whose record lists the same mailbox twice (an old spool file; inbound keeps
  one since, `relay.smtp.domain.mailbox_key`) is delivered once to it: the engine gets
  each mailbox once, every state of that mailbox records the one outcome, and a DSN
  names it once.
- Store I/O (blocking fsyncs) runs in worker threads.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from relay.config import DeliveryConfig
from relay.errors import SpoolError
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult
from relay.smtp.domain import mailbox_key
from relay.smtp.reply import SmtpReply
from relay.spool.admin import (
    MessageBusy,
    MessageHeld,
    UnknownMessage,
    flushable,
    on_hold,
    released,
)
from relay.spool.bounce import (
    DelayedRecipient,
    FailedRecipient,
    build_delay_dsn,
    build_dsn,
    delay_status,
    needs_smtputf8,
    original_headers,
)
from relay.spool.records import QueuedMessage, RecipientState, RecipientStatus
from relay.spool.schedule import expired, retry_delay

__all__ = ["Deliverer", "QueueRunner", "Store"]

log = logging.getLogger("relay.queue")

#: Reasons whose reply the receiving server sent (its greeting, EHLO, MAIL, RCPT or DATA
#: reply; relay.delivery.client, relay.errors.RemoteTempReject/RemotePermReject). Every
#: other reply was written by this relay.
_PEER_REPLY = frozenset({"remote_4xx", "remote_5xx", "mail_from"})
#: RFC 3464 §2.3.6 diagnostic-type of a reply this relay wrote (as Postfix's "X-Postfix").
LOCAL_DIAGNOSTIC = "X-Dane-Relay"


def _dsn_source(result: RecipientResult, own_reply: bool) -> tuple[str, str]:
    """(Remote-MTA host, diagnostic-type) for a DSN about `result`.

    RFC 3464 §2.3.5: Remote-MTA is the server the relay talked to: "" when none was
    reached (relay "none", "host[-]": a loop, a lookup or policy failure; a refused
    connect). §2.3.6: "smtp" only for a reply received from that server; the relay's own
    text (`own_reply`: a reply the runner wrote, such as 5.4.7) is LOCAL_DIAGNOSTIC.
    """
    host, bracket, rest = result.relay.partition("[")
    reached = bool(bracket) and not rest.startswith("-]") and result.reason != "connect"
    remote_mta = host if reached else ""
    from_peer = reached and not own_reply and result.reason in _PEER_REPLY
    return remote_mta, "smtp" if from_peer else LOCAL_DIAGNOSTIC


class Store(Protocol):
    def commit(
        self,
        *,
        sender: str,
        recipients: list[str],
        body: bytes,
        client: str = "",
        helo: str = "",
        is_bounce: bool = False,
        now: float | None = None,
        smtputf8: bool = False,
    ) -> QueuedMessage: ...
    def update(self, msg: QueuedMessage) -> None: ...
    def remove(self, qid: str) -> None: ...
    def read_body(self, qid: str) -> bytes: ...


class Deliverer(Protocol):
    async def deliver(
        self,
        queue_id: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        received: float,
        smtputf8: bool = False,
    ) -> list[RecipientResult]: ...


class QueueRunner:
    def __init__(
        self,
        store: Store,
        engine: Deliverer,
        cfg: DeliveryConfig,
        metrics: Metrics,
        hostname: str,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        on_flush: Callable[[], None] | None = None,
    ) -> None:
        """`on_flush` runs at every `flush` (the engine ends its destination suspensions)."""
        self.store = store
        self.on_flush = on_flush
        self.engine = engine
        self.cfg = cfg
        self.metrics = metrics
        self.hostname = hostname
        self.clock = clock
        self.rand = rand
        self._queue: dict[str, QueuedMessage] = {}
        # The schedule: (next_attempt, seq, queue id), one entry pushed by every _put; an
        # entry whose message is gone, held, running or has another next_attempt is stale
        # and dropped when it comes up (so the loop never sorts the whole queue).
        self._schedule: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        # The queue gauges, kept as messages come, change and go (no scan per message).
        self._counts = {"active": 0, "deferred": 0, "held": 0}
        self._arrivals: list[tuple[float, str]] = []  # (received, queue id), a heap
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        # The messages of _in_flight whose attempt began (the others wait for a slot).
        self._delivering: set[str] = set()
        # Messages an operator action is writing while they stay pickable in memory
        # (release): the loop does not start them; the action schedules them again.
        self._storing: set[str] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self._admin = asyncio.Lock()

    # -- feeding the queue ---------------------------------------------------------

    def load(self, messages: Sequence[QueuedMessage]) -> None:
        for msg in messages:
            self._put(msg)
        self._update_gauges()
        self._wake.set()

    def submit(self, msg: QueuedMessage) -> None:
        """A newly committed message: deliver it as soon as a slot is free."""
        self._put(msg)
        self._update_gauges()
        self._wake.set()

    def _put(self, msg: QueuedMessage) -> None:
        """Add or replace `msg` in the in-memory queue and schedule it at next_attempt."""
        if math.isnan(msg.next_attempt):
            # A damaged record: NaN orders with nothing and would hide entries in the heap.
            msg = replace(msg, next_attempt=0.0)  # due now
        old = self._queue.get(msg.queue_id)
        if old is None:
            heapq.heappush(self._arrivals, (msg.received, msg.queue_id))
        else:
            self._counts[_gauge_state(old)] -= 1
        self._counts[_gauge_state(msg)] += 1
        self._queue[msg.queue_id] = msg
        heapq.heappush(self._schedule, (msg.next_attempt, next(self._seq), msg.queue_id))

    def _drop(self, qid: str) -> None:
        """Take `qid` out of the in-memory queue (its schedule entries go stale)."""
        old = self._queue.pop(qid, None)
        if old is not None:
            self._counts[_gauge_state(old)] -= 1

    def snapshot(self) -> list[QueuedMessage]:
        return list(self._queue.values())

    # -- operator actions (relay.control) ---------------------------------------------------

    def message(self, qid: str) -> QueuedMessage | None:
        return self._queue.get(qid)

    def in_delivery(self, qid: str) -> bool:
        return qid in self._in_flight

    def deliveries_running(self) -> int:
        """Attempts under way (a message waiting for one of the `concurrency` slots is not
        one yet)."""
        return len(self._delivering)

    def _idle(self, qid: str) -> QueuedMessage:
        msg = self._queue.get(qid)
        if msg is None:
            raise UnknownMessage(qid)
        if qid in self._in_flight:
            raise MessageBusy(qid)
        return msg

    async def hold(self, qid: str) -> QueuedMessage:
        """Put a message on hold: it stays queued and is not delivered until released.

        Raises:
            UnknownMessage, MessageBusy; SpoolError: the hold could not be stored (the
            message is not held).
        """
        async with self._admin:
            msg = self._idle(qid)
            held = on_hold(msg)
            self._put(held)  # before the await: the loop must not pick it meanwhile
            try:
                await asyncio.to_thread(self.store.update, held)
            except SpoolError:
                self._put(msg)
                self._update_gauges()  # one published meanwhile counted it held
                raise
            log.info("queue_id=%s held by operator", qid)
            self._update_gauges()
            return held

    async def release(self, qid: str) -> QueuedMessage:
        """Release a held message (or any queued one): due now.

        Raises:
            UnknownMessage, MessageBusy; SpoolError: the release could not be stored.
        """
        async with self._admin:
            msg = self._idle(qid)
            free = released(msg, self.clock())
            # Not held, it could fall due (or be flushed) during the write: an attempt
            # ending before the write would be undone by it, on disk and here.
            self._storing.add(qid)
            try:
                await asyncio.to_thread(self.store.update, free)
            except BaseException:
                self._reschedule(qid)  # an entry that came up meanwhile was dropped
                raise
            finally:
                self._storing.discard(qid)
            self._put(free)  # schedules it (due now)
            log.info("queue_id=%s released by operator", qid)
            self._update_gauges()
            self._wake.set()
            return free

    async def delete(self, qid: str) -> QueuedMessage:
        """Take a message out of the queue without a bounce.

        Raises:
            UnknownMessage, MessageBusy; SpoolError: the envelope could not be removed.
        """
        async with self._admin:
            msg = self._idle(qid)
            self._drop(qid)  # before the await: the loop must not pick it meanwhile
            try:
                await asyncio.to_thread(self.store.remove, qid)
            except SpoolError:
                self._put(msg)
                self._update_gauges()  # one published meanwhile left it out
                raise
            log.info(
                "queue_id=%s deleted by operator from=<%s> pending=%s (no bounce)",
                qid,
                msg.sender,
                ",".join(f"<{r.address}>" for r in msg.pending),
            )
            self._update_gauges()
            return msg

    def flush(self, qid: str | None = None) -> list[str]:
        """Make deferred messages that are not held due now: every one, or `qid` only.
        Only the in-memory schedule changes (a restart retries every message anyway).
        Returns the ids made due.

        Raises:
            UnknownMessage; MessageHeld: `qid` is on hold.
        """
        now = self.clock()
        if qid is not None:
            msg = self._queue.get(qid)
            if msg is None:
                raise UnknownMessage(qid)
            if msg.held:
                raise MessageHeld(qid)
            candidates = [msg]
        else:
            candidates = list(self._queue.values())
        due = [
            m.queue_id
            for m in candidates
            if m.queue_id not in self._in_flight and flushable(m, now)
        ]
        for each in due:
            self._put(replace(self._queue[each], next_attempt=now))
        if self.on_flush is not None:
            self.on_flush()  # Postfix flushes "dead" destinations too: they are tried now
        log.info("queue flushed by operator messages=%d", len(due))
        self._wake.set()
        return due

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping:
            now = self.clock()
            next_due = now + self.cfg.scan_interval
            if len(self._schedule) > 2 * len(self._queue) + 1024:
                # Stale entries piled up behind later ones (e.g. repeated flushes): rebuild.
                self._schedule = [
                    (m.next_attempt, next(self._seq), q) for q, m in self._queue.items()
                ]
                heapq.heapify(self._schedule)
            schedule = self._schedule
            while schedule:
                due, _, qid = schedule[0]
                msg = self._queue.get(qid)
                if (
                    msg is None
                    or msg.next_attempt != due
                    or msg.held
                    or qid in self._in_flight
                    or qid in self._storing
                ):
                    # Stale: gone, rescheduled (a newer entry), held (release puts it
                    # back), running (its end puts it back or removes it) or being
                    # released (release puts it back).
                    heapq.heappop(schedule)
                    continue
                if due > now:
                    next_due = min(next_due, due)
                    break
                heapq.heappop(schedule)
                task = asyncio.create_task(self._process(qid), name=qid)
                self._in_flight[qid] = task
                task.add_done_callback(self._done)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, next_due - now))
            except TimeoutError:
                pass

    def _done(self, task: asyncio.Task[None]) -> None:
        qid = task.get_name()
        self._in_flight.pop(qid, None)
        self._delivering.discard(qid)
        msg = self._queue.get(qid)
        if not task.cancelled() and task.exception() is not None:
            log.error("queue_id=%s runner error: %r", qid, task.exception())
            if msg is not None:
                # Its schedule entry was used up: keep it queued, try after the backoff.
                self._retry_later(msg, self.clock())
        elif msg is not None and not msg.held:
            # The entry its attempt pushed (deferred: next_attempt) may have come up while
            # it was still running and been dropped as running: schedule it again now it
            # is not (a second entry for the same time is dropped when the first starts).
            self._reschedule(qid)
        self._wake.set()

    def _reschedule(self, qid: str) -> None:
        """Push an entry for `qid`'s current next_attempt (its last may have been dropped)."""
        msg = self._queue.get(qid)
        if msg is not None:
            heapq.heappush(self._schedule, (msg.next_attempt, next(self._seq), qid))

    async def stop(self, grace: float = 10.0) -> int:
        """Stop picking messages; let running deliveries finish for `grace` seconds.

        Deliveries still running then are cancelled: their messages stay queued as the
        spool has them (at-least-once: one the peer already took may be sent again after
        the restart). Returns how many were cancelled; a message still waiting for a
        delivery slot had not begun: it is not counted or logged (it stays queued too).
        """
        self._stopping = True
        self._wake.set()
        tasks = list(self._in_flight.values())
        if not tasks:
            return 0
        _done, pending = await asyncio.wait(tasks, timeout=grace)
        # Read before the cancels: a waiting task may take the slot a cancelled one frees.
        cut = [task for task in pending if task.get_name() in self._delivering]
        for task in cut:
            log.info("queue_id=%s delivery cut off by the stop, stays queued", task.get_name())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        return len(cut)

    # -- one message ---------------------------------------------------------------------

    async def _process(self, qid: str) -> None:
        async with self._slots:
            msg = self._queue.get(qid)
            if msg is None or self._stopping:
                return
            self._delivering.add(qid)  # until _done
            try:
                body = await asyncio.to_thread(self.store.read_body, qid)
            except SpoolError as exc:
                log.error("queue_id=%s cannot read message body: %s", qid, exc)
                self._retry_later(msg, self.clock())
                return
            # One RCPT per mailbox, however often the record lists it (Postfix cleanup).
            mailboxes: dict[str, str] = {}
            for state in msg.pending:
                mailboxes.setdefault(mailbox_key(state.address), state.address)
            pending = list(mailboxes.values())
            try:
                results = await self.engine.deliver(
                    qid,
                    msg.sender,
                    pending,
                    body,
                    msg.received,
                    smtputf8=bool(msg.extra.get("smtputf8")),
                )
            except Exception:
                # A bug must not turn into a hot retry loop or lose the message: keep it
                # queued, unchanged on disk, and try again after the minimum backoff.
                log.exception("queue_id=%s delivery raised; retrying later", qid)
                self._retry_later(msg, self.clock())
                return
            await self._record(msg, results, body)

    async def _record(
        self, msg: QueuedMessage, results: Sequence[RecipientResult], body: bytes
    ) -> None:
        now = self.clock()
        by_rcpt = {mailbox_key(r.recipient): r for r in results}
        reported: set[str] = set()  # mailboxes already in this attempt's DSN lists
        too_old = expired(msg.received, now, self.cfg.max_queue_lifetime)
        states: list[RecipientState] = []
        failed: list[FailedRecipient] = []
        delayed: list[DelayedRecipient] = []
        for state in msg.recipients:
            key = mailbox_key(state.address)
            result = by_rcpt.get(key)
            if state.status is not RecipientStatus.PENDING or result is None:
                states.append(state)
                continue
            reply, status = result.reply, RecipientStatus.PENDING
            rewritten = False  # the reply is the runner's own (5.4.7), not the attempt's
            if result.outcome is Outcome.DELIVERED:
                status = RecipientStatus.DELIVERED
            elif result.outcome is Outcome.BOUNCED:
                status = RecipientStatus.BOUNCED
            elif too_old:
                # Queue lifetime exceeded: bounce with 5.4.7, keeping the last reason.
                status = RecipientStatus.BOUNCED
                reply = SmtpReply(550, "5.4.7", f"delivery time expired, last error: {reply}")
                rewritten = True
                log.info(
                    'queue_id=%s to=<%s> status=expired reply="%s"',
                    msg.queue_id,
                    state.address,
                    reply,
                )
            updated_state = replace(
                state,
                status=status,
                attempts=state.attempts + 1,
                last_reply=str(reply),
                last_relay=result.relay,
            ).with_steps(result.history)
            first = key not in reported
            reported.add(key)
            remote_mta, diagnostic_type = _dsn_source(result, rewritten)
            if status is RecipientStatus.BOUNCED and first:
                failed.append(
                    FailedRecipient(
                        state.address,
                        reply.enhanced or "5.0.0",
                        str(reply),
                        remote_mta,
                        diagnostic_type=diagnostic_type,
                        # RFC 3464 §2.3.7: this attempt's last step (it just happened).
                        last_attempt=result.history[-1].time if result.history else now,
                        history=updated_state.history,
                        history_dropped=updated_state.history_dropped,
                    )
                )
            elif status is RecipientStatus.PENDING and first:
                delayed.append(
                    DelayedRecipient(
                        state.address,
                        delay_status(reply.enhanced),
                        str(reply),
                        remote_mta,
                        diagnostic_type=diagnostic_type,
                        last_attempt=result.history[-1].time if result.history else now,
                    )
                )
            states.append(updated_state)
        attempts = msg.attempts + 1
        updated = replace(
            msg,
            recipients=tuple(states),
            attempts=attempts,
            next_attempt=now
            + retry_delay(attempts, self.cfg.min_backoff, self.cfg.max_backoff, self.rand),
        )
        warn = bool(delayed) and self._delay_warning_due(msg, now)
        try:
            if failed:
                await self._bounce(msg, failed, body, now)
            if warn:
                await self._warn(msg, delayed, body, now)
                updated = replace(updated, delay_warned=True)
            if updated.done:
                await asyncio.to_thread(self.store.remove, msg.queue_id)
                self._drop(msg.queue_id)
                log.info("queue_id=%s removed", msg.queue_id)
            else:
                await asyncio.to_thread(self.store.update, updated)
                self._put(updated)
                log.info(
                    "queue_id=%s deferred pending=%d next_attempt_in=%.0fs",
                    msg.queue_id,
                    len(updated.pending),
                    updated.next_attempt - now,
                )
        except SpoolError as exc:
            # The on-disk state is the old one: the attempt will be repeated later.
            log.error("queue_id=%s cannot record delivery results: %s", msg.queue_id, exc)
            self._retry_later(msg, now)
        self._update_gauges()

    async def _bounce(
        self, msg: QueuedMessage, failed: list[FailedRecipient], body: bytes, now: float
    ) -> None:
        if msg.is_bounce or not msg.sender:
            # RFC 5321 §4.5.5: never send a DSN for a message from the null sender.
            log.info(
                "queue_id=%s bounce of null-sender message discarded recipients=%s",
                msg.queue_id,
                ",".join(f"<{f.address}>" for f in failed),
            )
            return
        dsn = build_dsn(
            reporting_mta=self.hostname,
            queue_id=msg.queue_id,
            sender=msg.sender,
            arrival=msg.received,
            now=now,
            failed=failed,
            headers=original_headers(body),
        )
        notice = await asyncio.to_thread(
            self.store.commit,
            sender="",
            recipients=[msg.sender],
            body=dsn,
            is_bounce=True,
            now=now,
            # RFC 6533 §6 / RFC 6531 §3.4: an internationalised report needs SMTPUTF8.
            smtputf8=needs_smtputf8(dsn),
        )
        self.metrics.bounces.inc()
        log.info("queue_id=%s sender non-delivery notification: %s", msg.queue_id, notice.queue_id)
        self.submit(notice)

    def _delay_warning_due(self, msg: QueuedMessage, now: float) -> bool:
        after = self.cfg.delay_warning_after
        if after <= 0 or msg.delay_warned or now - msg.received < after:
            return False
        if msg.is_bounce or not msg.sender:
            # RFC 5321 §4.5.5 / RFC 3461 §6.2: no notification about a notification.
            log.info("queue_id=%s delay warning skipped reason=null_sender", msg.queue_id)
            return False
        return True

    async def _warn(
        self, msg: QueuedMessage, delayed: list[DelayedRecipient], body: bytes, now: float
    ) -> None:
        """Queue the one delay DSN (RFC 3464 Action: delayed) for `msg`'s sender."""
        dsn = build_delay_dsn(
            reporting_mta=self.hostname,
            queue_id=msg.queue_id,
            sender=msg.sender,
            arrival=msg.received,
            now=now,
            delayed=delayed,
            will_retry_until=msg.received + self.cfg.max_queue_lifetime,
            headers=original_headers(body),
        )
        notice = await asyncio.to_thread(
            self.store.commit,
            sender="",
            recipients=[msg.sender],
            body=dsn,
            is_bounce=True,
            now=now,
            smtputf8=needs_smtputf8(dsn),  # as in _bounce
        )
        log.info(
            "queue_id=%s sender delay notification: %s delayed=%s queued_for=%.0fs",
            msg.queue_id,
            notice.queue_id,
            ",".join(f"<{d.address}>" for d in delayed),
            now - msg.received,
        )
        self.submit(notice)

    def _retry_later(self, msg: QueuedMessage, now: float) -> None:
        """Keep the in-memory record (the disk still holds it) and retry after min_backoff."""
        self._put(replace(msg, next_attempt=now + self.cfg.min_backoff))

    def _update_gauges(self) -> None:
        if len(self._arrivals) > 2 * len(self._queue) + 1024:
            # Entries of messages gone behind an old one that stays: rebuild, O(n) rarely.
            self._arrivals = [(m.received, q) for q, m in self._queue.items()]
            heapq.heapify(self._arrivals)
        arrivals = self._arrivals
        while arrivals and arrivals[0][1] not in self._queue:
            heapq.heappop(arrivals)  # a message that has left the queue
        self.metrics.set_queue(
            active=self._counts["active"],
            deferred=self._counts["deferred"],
            held=self._counts["held"],
            oldest_received=arrivals[0][0] if arrivals else None,
        )


def _gauge_state(msg: QueuedMessage) -> str:
    """The dane_relay_queue_messages state of a queued message."""
    if msg.held:
        return "held"
    return "deferred" if msg.attempts > 0 else "active"
