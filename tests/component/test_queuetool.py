"""relay.queuetool: `queue list|show|flush|hold|release|delete` against a live runner behind
a real control socket, and against the spool when no relay runs; output and exit codes."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from relay.config import Config, DeliveryConfig, SpoolConfig
from relay.control import ControlServer
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult, Step
from relay.queuetool import add_queue_parser, run_queue_command
from relay.smtp.reply import SmtpReply
from relay.spool.records import QueuedMessage, RecipientState
from relay.spool.runner import QueueRunner
from relay.spool.store import SpoolStore

pytestmark = [pytest.mark.timeout(30)]

NOW = 1_700_000_000.0
BODY = b"Subject: tool\r\n\r\nbody\r\n"
CFG = DeliveryConfig(concurrency=2, min_backoff=300.0, max_backoff=4000.0, scan_interval=60.0)
UNKNOWN_ID = "0123456789AB"
STEP = Step(
    time=NOW + 1,
    outcome=Outcome.DEFERRED,
    reply="451 4.7.5 Server certificate not verified (no-match)",
    host="mx1.example.net",
    address="192.0.2.1",
    port=25,
    tls="none",
    dane="fail reason=no-match",
)


def config(tmp_path: Path) -> Config:
    return Config(path=tmp_path / "relay.toml", spool=SpoolConfig(directory=tmp_path / "spool"))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dane-relay")
    add_queue_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["queue", *argv])


def tool(tmp_path: Path, *argv: str) -> int:
    return run_queue_command(parse(*argv), config(tmp_path))


def deferred(store: SpoolStore, rcpt: str = "bob@example.net") -> QueuedMessage:
    msg = store.commit(sender="alice@example.org", recipients=[rcpt], body=BODY, now=NOW)
    state = RecipientState(
        rcpt,
        attempts=1,
        last_reply=STEP.reply,
        last_relay="mx1.example.net[192.0.2.1]:25",
        history=(STEP,),
    )
    msg = replace(msg, next_attempt=NOW + 10**10, attempts=1, recipients=(state,))
    store.update(msg)
    return msg


@pytest.fixture
def spool(tmp_path: Path) -> SpoolStore:
    store = SpoolStore(tmp_path / "spool")
    store.open(lock=False)
    return store


# -- no relay running: the spool directly --------------------------------------------------------


def test_parser_builds_every_subcommand() -> None:
    assert parse("list").queue_command == "list"
    show = parse("show", UNKNOWN_ID, "--json", "-c", "x.toml")
    assert (show.queue_id, show.json, show.config) == (UNKNOWN_ID, True, Path("x.toml"))
    assert parse("flush").queue_id is None
    assert parse("flush", UNKNOWN_ID).queue_id == UNKNOWN_ID
    for name in ("hold", "release", "delete"):
        assert (parse(name, UNKNOWN_ID).queue_command, parse(name, UNKNOWN_ID).queue_id) == (
            name,
            UNKNOWN_ID,
        )


def test_offline_hold_list_release_delete(
    tmp_path: Path, spool: SpoolStore, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = deferred(spool)
    qid = msg.queue_id
    assert tool(tmp_path, "hold", qid) == 0
    out, err = capsys.readouterr()
    assert out == f"{qid}: held\n"
    assert err == "relay not running: acting on the spool directly\n"
    assert spool.get(qid) == replace(msg, held=True)

    assert tool(tmp_path, "list") == 0
    out, _ = capsys.readouterr()
    first, rcpt, total = out.splitlines()
    assert first.startswith(f"{qid} size={len(BODY)} from=<alice@example.org> attempts=1 ")
    assert first.endswith(" state=held")
    assert rcpt == f'    <bob@example.net> status=pending last="{STEP.reply}"'
    assert total == "-- 1 message(s) in queue"

    assert tool(tmp_path, "release", qid) == 0
    assert capsys.readouterr().out == f"{qid}: released (due now)\n"
    released = spool.get(qid)
    assert released is not None and not released.held and released.next_attempt < NOW + 10**10

    assert tool(tmp_path, "delete", qid) == 0
    assert capsys.readouterr().out == f"{qid}: deleted (no bounce)\n"
    assert spool.scan() == []


def test_offline_flush_marks_due(
    tmp_path: Path, spool: SpoolStore, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = deferred(spool)
    assert tool(tmp_path, "flush") == 0
    assert capsys.readouterr().out == f"flushed 1 message(s)\n{msg.queue_id}\n"
    flushed = spool.get(msg.queue_id)
    assert flushed is not None and flushed.next_attempt < NOW + 10**10


def test_show_prints_envelope_recipients_and_history(
    tmp_path: Path, spool: SpoolStore, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = deferred(spool)
    assert tool(tmp_path, "show", msg.queue_id) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        f"queue_id: {msg.queue_id}",
        "state: deferred",
        "from: <alice@example.org>",
    ]
    assert lines[3].startswith("received: 2023-11-14 22:13:20 UTC (queued ")
    assert lines[4:] == [
        f"client: - helo: - size: {len(BODY)}",
        lines[5],  # next_attempt: far in the future, relative to the wall clock
        "delay_warning: not sent",
        "recipient <bob@example.net> status=pending attempts=1 relay=mx1.example.net[192.0.2.1]:25",
        f"    last reply: {STEP.reply}",
        "    history (oldest first):",
        "    2023-11-14 22:13:21 UTC mx1.example.net[192.0.2.1]:25 tls=none "
        f"dane=fail reason=no-match deferred: {STEP.reply}",
    ]
    assert lines[5].startswith("attempts: 1 next_attempt: ")


def test_show_json_is_the_record(
    tmp_path: Path, spool: SpoolStore, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = deferred(spool)
    assert tool(tmp_path, "show", msg.queue_id, "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {
        "in_delivery": False,
        "record": json.loads((spool.env / msg.queue_id).read_bytes()),
    }
    assert doc["record"]["recipients"][0]["history"][0]["dane"] == "fail reason=no-match"


def test_control_characters_from_peers_are_escaped(
    tmp_path: Path, spool: SpoolStore, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = deferred(spool)
    (rcpt,) = msg.recipients
    spool.update(replace(msg, recipients=(replace(rcpt, last_reply="451 \x1b[2Jgotcha"),)))
    assert tool(tmp_path, "list") == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and 'last="451 \\x1b[2Jgotcha"' in out


@pytest.mark.parametrize("command", ["show", "hold", "release", "delete", "flush"])
def test_unknown_id_exits_67(
    tmp_path: Path, spool: SpoolStore, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tool(tmp_path, command, UNKNOWN_ID) == 67
    assert capsys.readouterr().err.endswith(
        f"dane-relay: queue {command}: no queued message with id {UNKNOWN_ID}\n"
    )


def test_bad_id_exits_64(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tool(tmp_path, "delete", "../env/x") == 64
    assert "'../env/x' is not a queue id" in capsys.readouterr().err


def test_flush_of_a_held_message_exits_69(tmp_path: Path, spool: SpoolStore) -> None:
    msg = deferred(spool)
    assert tool(tmp_path, "hold", msg.queue_id) == 0
    assert tool(tmp_path, "flush", msg.queue_id) == 69


def test_a_locked_spool_without_a_socket_exits_75(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = SpoolStore(tmp_path / "spool")
    holder.open()  # like a relay that started but has no control socket (yet)
    try:
        msg = deferred(holder)
        assert tool(tmp_path, "hold", msg.queue_id) == 75
        assert "holds the spool" in capsys.readouterr().err
        assert holder.get(msg.queue_id) == msg
        assert tool(tmp_path, "list") == 0  # reading needs no lock
    finally:
        holder.close()


def test_no_spool_directory_is_an_empty_queue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tool(tmp_path, "list") == 0
    assert capsys.readouterr().out == "-- 0 message(s) in queue\n"
    assert tool(tmp_path, "delete", UNKNOWN_ID) == 67
    assert not (tmp_path / "spool").exists()


# -- a relay running: through the control socket ------------------------------------------------


class Deliverer:
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
        ok = SmtpReply(250, "2.0.0", "Ok")
        return [RecipientResult(r, Outcome.DELIVERED, ok, "mx[192.0.2.1]:25") for r in recipients]


@asynccontextmanager
async def live(tmp_path: Path) -> AsyncIterator[tuple[QueueRunner, SpoolStore, Deliverer]]:
    store = SpoolStore(tmp_path / "spool")
    store.open()
    deliverer = Deliverer()
    runner = QueueRunner(store, deliverer, CFG, Metrics(), "relay.test")
    server = ControlServer(runner, store)
    await server.start()
    task = asyncio.create_task(runner.run())
    try:
        yield runner, store, deliverer
    finally:
        await server.close()
        await runner.stop(grace=5.0)
        await asyncio.wait_for(task, 5.0)
        store.close()


@pytest.mark.asyncio
async def test_tools_act_on_the_running_relay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with live(tmp_path) as (runner, store, deliverer):
        held, other = deferred(store, "held@example.net"), deferred(store, "other@example.net")
        runner.load([held, other])

        assert await asyncio.to_thread(tool, tmp_path, "hold", held.queue_id) == 0
        out, err = capsys.readouterr()
        assert (out, err) == (f"{held.queue_id}: held\n", "")  # no "acting on the spool"
        assert await asyncio.to_thread(tool, tmp_path, "list") == 0
        assert f"{held.queue_id} " in (listing := capsys.readouterr().out)
        # The listing is sorted by queue id, and the two ids were made in the same instant:
        # key each message's first line by its id rather than by position.
        lines = listing.splitlines()[:4:2]  # each message: its line, then its recipients
        states = {line.split()[0]: line.rsplit(" ", 1)[1] for line in lines}
        assert states == {held.queue_id: "state=held", other.queue_id: "state=deferred"}

        assert await asyncio.to_thread(tool, tmp_path, "flush") == 0
        assert capsys.readouterr().out == f"flushed 1 message(s)\n{other.queue_id}\n"
        assert await asyncio.wait_for(deliverer.delivered.get(), 10) == other.queue_id

        assert await asyncio.to_thread(tool, tmp_path, "release", held.queue_id) == 0
        assert await asyncio.wait_for(deliverer.delivered.get(), 10) == held.queue_id

        gone = deferred(store, "gone@example.net")
        runner.load([gone])
        assert await asyncio.to_thread(tool, tmp_path, "delete", gone.queue_id) == 0
        assert runner.message(gone.queue_id) is None
        assert not (store.env / gone.queue_id).exists()
        assert await asyncio.to_thread(tool, tmp_path, "show", gone.queue_id) == 67
