"""relay.control: the control socket served for a live QueueRunner on a real spool, the
blocking client `ask`, and the same requests answered from the spool (SpoolAdmin) when no
relay runs."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from relay.config import DeliveryConfig
from relay.control import ControlServer, ControlUnavailable, SpoolAdmin, ask, handle
from relay.errors import SpoolError
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult
from relay.smtp.reply import SmtpReply
from relay.spool.records import QueuedMessage, load
from relay.spool.runner import QueueRunner
from relay.spool.store import SpoolStore

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

NOW = 1_700_000_000.0
BODY = b"Subject: control\r\n\r\nbody\r\n"
CFG = DeliveryConfig(concurrency=2, min_backoff=300.0, max_backoff=4000.0, scan_interval=60.0)
UNKNOWN_ID = "0123456789AB"


class Deliverer:
    """Delivers everything and tells the test which queue ids it was given."""

    def __init__(self) -> None:
        self.delivered: asyncio.Queue[str] = asyncio.Queue()

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        received: float,
        smtputf8: bool = False,
    ) -> list[RecipientResult]:
        await self.delivered.put(queue_id)
        reply = SmtpReply(250, "2.0.0", "Ok")
        return [
            RecipientResult(r, Outcome.DELIVERED, reply, "mx[192.0.2.1]:25") for r in recipients
        ]


@asynccontextmanager
async def live(tmp_path: Path) -> AsyncIterator[tuple[QueueRunner, SpoolStore, Deliverer, Path]]:
    store = SpoolStore(tmp_path / "spool")
    store.open()
    deliverer = Deliverer()
    runner = QueueRunner(store, deliverer, CFG, Metrics(), "relay.test", clock=lambda: NOW)
    server = ControlServer(runner, store)
    await server.start()
    task = asyncio.create_task(runner.run())
    try:
        yield runner, store, deliverer, server.path
    finally:
        await server.close()
        await runner.stop(grace=5.0)
        await asyncio.wait_for(task, 5.0)
        store.close()


def deferred(store: SpoolStore, rcpt: str) -> QueuedMessage:
    """A committed message that is not due for another 1000 s (it was deferred once)."""
    msg = store.commit(sender="alice@example.org", recipients=[rcpt], body=BODY, now=NOW)
    msg = replace(msg, next_attempt=NOW + 1000, attempts=1)
    store.update(msg)
    return msg


async def call(path: Path, **request: Any) -> dict[str, Any]:
    return await asyncio.to_thread(ask, path, request)


async def test_socket_is_in_the_spool_directory_with_mode_0600(tmp_path: Path) -> None:
    async with live(tmp_path) as (_runner, _store, _deliverer, path):
        assert path == tmp_path / "spool" / "control.sock"
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert not path.exists()  # removed by close()


async def test_list_and_show_give_the_live_records(tmp_path: Path) -> None:
    async with live(tmp_path) as (runner, store, _deliverer, path):
        one, two = deferred(store, "one@example.net"), deferred(store, "two@example.net")
        runner.load([one, two])
        listing = await call(path, op="list")
        assert listing["ok"] is True and listing["in_delivery"] == []
        assert [m["queue_id"] for m in listing["messages"]] == sorted([one.queue_id, two.queue_id])
        shown = await call(path, op="show", id=one.queue_id)
        assert shown == {
            "ok": True,
            "message": json.loads((store.env / one.queue_id).read_bytes()),
            "in_delivery": False,
        }


async def test_hold_release_delete_and_flush_act_on_the_running_queue(tmp_path: Path) -> None:
    async with live(tmp_path) as (runner, store, deliverer, path):
        kept, dropped = deferred(store, "kept@example.net"), deferred(store, "gone@example.net")
        runner.load([kept, dropped])

        assert await call(path, op="hold", id=kept.queue_id) == {
            "ok": True,
            "queue_id": kept.queue_id,
        }
        assert load((store.env / kept.queue_id).read_bytes()).held
        flushed = await call(path, op="flush")
        assert flushed == {"ok": True, "flushed": [dropped.queue_id]}
        assert await asyncio.wait_for(deliverer.delivered.get(), 10) == dropped.queue_id

        third = deferred(store, "third@example.net")
        runner.load([third])
        assert await call(path, op="delete", id=third.queue_id) == {
            "ok": True,
            "queue_id": third.queue_id,
        }
        assert not (store.env / third.queue_id).exists()
        assert not (store.data / third.queue_id).exists()

        assert (await call(path, op="release", id=kept.queue_id))["ok"] is True
        assert await asyncio.wait_for(deliverer.delivered.get(), 10) == kept.queue_id
        assert deliverer.delivered.empty()


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"op": "show", "id": UNKNOWN_ID}, "unknown"),
        ({"op": "hold", "id": UNKNOWN_ID}, "unknown"),
        ({"op": "flush", "id": UNKNOWN_ID}, "unknown"),
        ({"op": "hold"}, "bad_request"),
        ({"op": "hold", "id": "../../etc/passwd"}, "bad_request"),
        ({"op": "reboot"}, "bad_request"),
    ],
)
async def test_errors_name_their_kind(tmp_path: Path, request_: dict[str, Any], error: str) -> None:
    async with live(tmp_path) as (_runner, _store, _deliverer, path):
        response = await call(path, **request_)
        assert (response["ok"], response["error"]) == (False, error)


async def test_unknown_id_message_names_the_id(tmp_path: Path) -> None:
    async with live(tmp_path) as (_runner, _store, _deliverer, path):
        assert await call(path, op="delete", id=UNKNOWN_ID) == {
            "ok": False,
            "error": "unknown",
            "message": f"no queued message with id {UNKNOWN_ID}",
        }


async def test_flush_of_a_held_message_is_refused(tmp_path: Path) -> None:
    async with live(tmp_path) as (runner, store, _deliverer, path):
        msg = deferred(store, "bob@example.net")
        runner.load([msg])
        await call(path, op="hold", id=msg.queue_id)
        response = await call(path, op="flush", id=msg.queue_id)
        assert (response["ok"], response["error"]) == (False, "held")


async def test_a_line_that_is_not_json_gets_an_error_and_the_connection_stays_usable(
    tmp_path: Path,
) -> None:
    async with live(tmp_path) as (_runner, _store, _deliverer, path):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"{not json\n" + json.dumps({"op": "list"}).encode() + b"\n")
        first = json.loads(await reader.readline())
        second = json.loads(await reader.readline())
        writer.close()
        assert (first["ok"], first["error"]) == (False, "bad_request")
        assert second["ok"] is True


async def test_a_stale_socket_from_a_crash_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "spool" / "control.sock"))
    stale.close()  # the file stays, nothing listens: like a relay that was SIGKILLed
    with pytest.raises(ControlUnavailable):
        ask(tmp_path / "spool" / "control.sock", {"op": "list"})
    async with live(tmp_path) as (_runner, _store, _deliverer, path):
        assert (await call(path, op="list"))["ok"] is True


async def test_a_regular_file_in_the_way_is_an_error(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "spool")
    store.open(lock=False)
    (tmp_path / "spool" / "control.sock").write_text("not a socket")
    runner = QueueRunner(store, Deliverer(), CFG, Metrics(), "relay.test")
    with pytest.raises(SpoolError, match=r"control\.sock: something else is in the way"):
        await ControlServer(runner, store).start()


async def test_a_socket_path_too_long_is_a_clear_error(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / ("d" * 120))
    runner = QueueRunner(store, Deliverer(), CFG, Metrics(), "relay.test")
    with pytest.raises(SpoolError, match="path longer than 107 bytes"):
        await ControlServer(runner, store).start()


async def test_no_socket_means_no_relay(tmp_path: Path) -> None:
    with pytest.raises(ControlUnavailable, match="control.sock"):
        ask(tmp_path / "control.sock", {"op": "list"})


# -- SpoolAdmin: the same requests when no relay runs --------------------------------------------


@pytest.fixture
def offline(tmp_path: Path) -> tuple[SpoolAdmin, SpoolStore]:
    store = SpoolStore(tmp_path / "spool")
    store.open()
    return SpoolAdmin(store, clock=lambda: NOW + 5), store


async def test_offline_hold_release_and_delete_edit_the_records(
    offline: tuple[SpoolAdmin, SpoolStore],
) -> None:
    admin, store = offline
    msg = deferred(store, "bob@example.net")
    assert await handle(admin, {"op": "hold", "id": msg.queue_id}) == {
        "ok": True,
        "queue_id": msg.queue_id,
    }
    assert store.get(msg.queue_id) == replace(msg, held=True)
    await handle(admin, {"op": "release", "id": msg.queue_id})
    assert store.get(msg.queue_id) == replace(msg, next_attempt=NOW + 5)
    await handle(admin, {"op": "delete", "id": msg.queue_id})
    assert store.scan() == [] and list(store.data.iterdir()) == []
    assert list(store.tmp.iterdir()) == []


async def test_offline_flush_marks_deferred_records_due(
    offline: tuple[SpoolAdmin, SpoolStore],
) -> None:
    admin, store = offline
    one, held = deferred(store, "one@example.net"), deferred(store, "held@example.net")
    await handle(admin, {"op": "hold", "id": held.queue_id})
    assert await handle(admin, {"op": "flush"}) == {"ok": True, "flushed": [one.queue_id]}
    assert store.get(one.queue_id) == replace(one, next_attempt=NOW + 5)
    assert store.get(held.queue_id) == replace(held, held=True)
    assert (await handle(admin, {"op": "flush", "id": held.queue_id}))["error"] == "held"


async def test_offline_list_and_unknown_id(offline: tuple[SpoolAdmin, SpoolStore]) -> None:
    admin, store = offline
    msg = deferred(store, "bob@example.net")
    listing = await handle(admin, {"op": "list"})
    assert [m["queue_id"] for m in listing["messages"]] == [msg.queue_id]
    assert (await handle(admin, {"op": "show", "id": UNKNOWN_ID}))["error"] == "unknown"
    assert (await handle(admin, {"op": "delete", "id": UNKNOWN_ID}))["error"] == "unknown"
