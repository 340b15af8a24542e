"""Attempts to break the spool's durability promises, on real files in tmp_path: a DATA
commit whose client goes away while it is written, records recovery must quarantine
rather than stumble on, and a damaged record whose bounce could not be written."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from inboundkit import frontend

from relay.config import DeliveryConfig
from relay.control import ControlServer
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult
from relay.smtp.reply import SmtpReply
from relay.spool.records import QueuedMessage, RecipientStatus, load
from relay.spool.runner import QueueRunner
from relay.spool.store import SpoolStore

pytestmark = pytest.mark.timeout(30)

NOW = 1_700_000_000.0
BODY = b"From: Alice <alice@example.org>\r\nSubject: hi\r\n\r\nbody\r\n"


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# -- inbound: the 250 and the runner -------------------------------------------------------


@pytest.mark.asyncio
async def test_a_message_committed_after_its_client_left_is_handed_to_the_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The client sends the final dot and goes away while the commit is being fsync'ed
    (aiosmtpd cancels the session's task on connection loss). The commit finishes in its
    thread: the message is on disk, so the runner must get it too, or it sits in env/
    unseen by the live queue (and `queue list`) until a restart delivers it."""
    caplog.set_level(logging.INFO)
    async with frontend(tmp_path) as fe:
        release = threading.Event()
        entered = threading.Event()
        real_commit = fe.store.commit

        def slow_commit(**kwargs: Any) -> QueuedMessage:
            entered.set()
            assert release.wait(10.0)
            return real_commit(**kwargs)

        monkeypatch.setattr(fe.store, "commit", slow_commit)
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<a@client.test>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        await c.send(b"Subject: gone\r\n\r\nx\r\n.\r\n")
        await _until(entered.is_set)
        c.writer.transport.abort()
        # The session has ended (its log line and metric are written in connection_lost).
        await _until(
            lambda: (
                fe.metrics.registry.get_sample_value(
                    "dane_relay_inbound_sessions_total", {"outcome": "disconnected", "tls": "no"}
                )
                == 1
            )
        )
        release.set()
        await _until(lambda: len(fe.files("env")) == 1)
        (qid,) = fe.files("env")
        await _until(lambda: len(fe.queued) == 1, timeout=5.0)
        assert [m.queue_id for m in fe.queued] == [qid]
        # Logged and counted like any queued message, with why no 250 was sent.
        assert fe.metrics.registry.get_sample_value("dane_relay_messages_received_total") == 1
        (line,) = [r.getMessage() for r in caplog.records if "status=queued" in r.getMessage()]
        assert line.startswith(f"queue_id={qid} client=127.0.0.1 from=<a@client.test> ")
        size = fe.store.get(qid).size  # type: ignore[union-attr]
        assert line.endswith(
            f" to=<bob@example.org> size={size} status=queued reason=client-gone-before-reply"
        )


# -- recovery ------------------------------------------------------------------------------


def _store(tmp_path: Path) -> SpoolStore:
    store = SpoolStore(tmp_path / "spool")
    store.open()
    return store


def test_recovery_quarantines_a_deeply_nested_record(tmp_path: Path) -> None:
    """A damaged record that json cannot parse without exhausting the recursion limit is
    unreadable like any other: recovery moves it to corrupt/ and returns the others (it
    raised RecursionError, and the relay could not start with any of its queue)."""
    store = _store(tmp_path)
    good = store.commit(sender="a@example.org", recipients=["b@example.net"], body=BODY, now=NOW)
    bad = "0000000000000BAD0001"
    (store.data / bad).write_bytes(BODY)
    (store.env / bad).write_bytes(b"[" * 200_000)
    store.close()

    restarted = _store(tmp_path)
    assert [m.queue_id for m in restarted.recover()] == [good.queue_id]
    assert sorted(p.name for p in restarted.corrupt.iterdir()) == [f"{bad}.data", f"{bad}.env"]
    assert sorted(p.name for p in restarted.env.iterdir()) == [good.queue_id]


def test_recovery_returns_no_message_whose_body_it_moves_away(tmp_path: Path) -> None:
    """A data file that is a symbolic link is not a regular file: recovery moves it to
    corrupt/. The envelope check followed the link, so the message was returned (and
    queued) without a body: every attempt failed to read it, forever, never bounced."""
    store = _store(tmp_path)
    msg = store.commit(sender="a@example.org", recipients=["b@example.net"], body=BODY, now=NOW)
    outside = tmp_path / "elsewhere"
    outside.write_bytes(BODY)
    (store.data / msg.queue_id).unlink()
    (store.data / msg.queue_id).symlink_to(outside)
    store.close()

    restarted = _store(tmp_path)
    recovered = restarted.recover()
    for each in recovered:
        assert restarted.read_body(each.queue_id) == BODY  # every queued message has a body
    assert recovered == []
    assert sorted(p.name for p in restarted.corrupt.iterdir()) == [
        f"{msg.queue_id}.data",
        f"{msg.queue_id}.env",
    ]


def test_scan_skips_a_record_filed_under_another_id(tmp_path: Path) -> None:
    """`queue flush` without a running relay updates what scan() returns: a record whose
    queue_id is not its file name (recovery would quarantine it) was written back under
    its own id, replacing the envelope of that other message."""
    store = _store(tmp_path)
    victim = store.commit(sender="a@example.org", recipients=["v@example.net"], body=BODY, now=NOW)
    stray = store.commit(sender="s@example.org", recipients=["s@example.net"], body=BODY, now=NOW)
    doc = json.loads((store.env / stray.queue_id).read_bytes())
    doc["queue_id"] = victim.queue_id
    (store.env / stray.queue_id).write_text(json.dumps(doc))
    assert [m.queue_id for m in store.scan()] == [victim.queue_id]
    assert store.get(stray.queue_id) is None


# -- bounces of a damaged record -----------------------------------------------------------


class _Deliverer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[str]]] = []

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        received: float,
        smtputf8: bool = False,
    ) -> list[RecipientResult]:
        self.calls.append((queue_id, sender, list(recipients)))
        if sender == "":
            reply = SmtpReply(451, "4.4.1", "Connection failed")
            return [RecipientResult(r, Outcome.DEFERRED, reply, "", "connect") for r in recipients]
        return [
            RecipientResult("b@example.net", Outcome.DELIVERED, SmtpReply(250, "2.0.0", "Ok"), ""),
            RecipientResult(
                "c@example.net", Outcome.BOUNCED, SmtpReply(550, "5.1.1", "no such user"), ""
            ),
        ]


@pytest.mark.asyncio
@pytest.mark.parametrize("received", ["NaN", "Infinity", "1e300"])
async def test_a_record_with_a_damaged_arrival_time_still_bounces(
    tmp_path: Path, received: str
) -> None:
    """The spool's JSON loads NaN, Infinity and times no date can show as `received`.
    When such a message bounced, building the DSN raised (formatdate of the arrival):
    the attempt's results were never stored, so it was retried after min_backoff and
    delivered to b@ again each time while c@'s bounce never went out."""
    store = _store(tmp_path)
    msg = store.commit(
        sender="alice@example.org",
        recipients=["b@example.net", "c@example.net"],
        body=BODY,
        now=NOW,
    )
    raw = (store.env / msg.queue_id).read_text()
    damaged = raw.replace(f'"received":{NOW}', f'"received":{received}')
    assert damaged != raw
    (store.env / msg.queue_id).write_text(damaged)
    store.close()

    store = _store(tmp_path)
    recovered = store.recover()
    assert [m.queue_id for m in recovered] == [msg.queue_id]
    deliverer = _Deliverer()
    cfg = DeliveryConfig(min_backoff=300.0, max_backoff=4000.0, scan_interval=60.0)
    runner = QueueRunner(
        store, deliverer, cfg, Metrics(), "relay.example.net", clock=lambda: NOW + 10
    )
    runner.load(recovered)
    task = asyncio.create_task(runner.run())
    try:
        await _until(lambda: len(deliverer.calls) >= 1)
        await _until(lambda: not runner.in_delivery(msg.queue_id))
        await _until(lambda: not (store.env / msg.queue_id).exists(), timeout=5.0)
    finally:
        await runner.stop(grace=5.0)
        await asyncio.wait_for(task, 5.0)
        store.close()
    (bounce,) = [p for p in store.env.iterdir()]
    notice = load(bounce.read_bytes())
    assert notice.sender == "" and notice.is_bounce
    assert [r.address for r in notice.recipients] == ["alice@example.org"]
    assert notice.recipients[0].status is RecipientStatus.PENDING
    dsn = store.read_body(notice.queue_id)
    assert b"Final-Recipient: rfc822; c@example.net" in dsn
    assert b"Arrival-Date" not in dsn  # optional (RFC 3464 2.2.5): no date to give
    assert [c for c in deliverer.calls if c[1]] == [
        (msg.queue_id, "alice@example.org", ["b@example.net", "c@example.net"])
    ]


# -- the control socket ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_deeply_nested_control_request_is_answered_bad_request(tmp_path: Path) -> None:
    """A request line json cannot parse within the recursion limit got no answer (the
    client task died with RecursionError); it is a bad request like any other and the
    connection serves the next one."""
    store = _store(tmp_path)
    runner = QueueRunner(store, _Deliverer(), DeliveryConfig(), Metrics(), "relay.example.net")
    short = Path(tempfile.mkdtemp(prefix="ctl", dir="/tmp"))  # sun_path is 108 bytes
    server = ControlServer(runner, store, path=short / "c.sock")
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(short / "c.sock"))
        writer.write(b"[" * 100_000 + b"\n")
        await writer.drain()
        first = json.loads(await asyncio.wait_for(reader.readline(), 10.0))
        assert (first["ok"], first["error"]) == (False, "bad_request")
        writer.write(b'{"op": "list"}\n')
        second = json.loads(await asyncio.wait_for(reader.readline(), 10.0))
        assert second == {"ok": True, "messages": [], "in_delivery": []}
        writer.close()
    finally:
        await server.close()
        store.close()
        short.rmdir()
