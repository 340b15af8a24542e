"""`dane-relay queue list | show ID [--json] | flush [ID] | hold ID | release ID | delete ID`.

While the relay runs, every command goes through its control socket
(`<spool directory>/control.sock`, relay.control) and acts on the live queue. When no
relay answers there (no socket, or connection refused), the commands act on the spool
directly: `list` and `show` read the records; `hold`, `release`, `delete` and `flush`
take the spool lock first (so a relay cannot start meanwhile) and replace records
atomically. If the lock is taken although the socket does not answer (a relay that is
starting, or one without the control socket), the command fails with 75 rather than
edit records a relay is using.

Exit codes (sysexits(3)):
    0   done
    64  EX_USAGE      ID is not a queue id
    67  EX_NOUSER     no queued message has that ID
    69  EX_UNAVAILABLE  `flush ID` of a held message (release it)
    73  EX_CANTCREAT  the spool cannot be read or written
    75  EX_TEMPFAIL   the message is being delivered right now, or the relay holds the
                      spool but does not answer on its control socket: try again
    77  EX_NOPERM     this user may not use the control socket
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from relay.config import Config
from relay.control import ControlUnavailable, SpoolAdmin, ask, handle, socket_path
from relay.errors import SpoolError
from relay.spool.records import QueuedMessage, from_doc, valid_queue_id
from relay.spool.store import SpoolLocked, SpoolStore

__all__ = ["add_queue_parser", "run_queue_command"]

EX_OK = 0
EX_USAGE = 64
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
DEFAULT_CONFIG = Path("config/relay.toml")
CONFIG_HELP = "the configuration file (default: config/relay.toml in the current directory)"

#: Exit code for each error kind of the control protocol (relay.control).
_EXIT = {
    "bad_request": EX_USAGE,
    "unknown": EX_NOUSER,
    "held": EX_UNAVAILABLE,
    "busy": EX_TEMPFAIL,
    "spool": EX_CANTCREAT,
}
_READ_ONLY = {"list", "show"}


def add_queue_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `queue` command and its subcommands to `subparsers` (the object returned by
    ArgumentParser.add_subparsers). Each subcommand takes -c/--config (args.config)."""
    queue: argparse.ArgumentParser = subparsers.add_parser(
        "queue", help="inspect and manage the queue (works while the relay runs)"
    )
    sub = queue.add_subparsers(dest="queue_command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG, help=CONFIG_HELP)
        return p

    command("list", "list queued messages and their state")
    show = command("show", "show a message: envelope, recipients, attempt history")
    show.add_argument("queue_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print the record as JSON")
    flush = command("flush", "retry deferred messages now (all, or ID); held ones stay")
    flush.add_argument("queue_id", metavar="ID", nargs="?")
    for name, text in (
        ("hold", "put a message on hold: it is not delivered until released"),
        ("release", "release a held message: it is delivered now"),
        ("delete", "delete a message from the queue, without a bounce"),
    ):
        command(name, text).add_argument("queue_id", metavar="ID")
    return queue


def run_queue_command(args: argparse.Namespace, cfg: Config) -> int:
    """Run the parsed `queue` subcommand; returns the exit code."""
    op: str = args.queue_command
    qid: str | None = getattr(args, "queue_id", None)
    if qid is not None and not valid_queue_id(qid):
        _err(f"queue {op}: {qid!r} is not a queue id (10 to 32 hex digits, upper case)")
        return EX_USAGE
    request: dict[str, Any] = {"op": op}
    if qid is not None:
        request["id"] = qid
    response = _request(cfg.spool.directory, request)
    if isinstance(response, int):
        return response
    if not response.get("ok"):
        kind = str(response.get("error"))
        _err(f"queue {op}: {response.get('message', kind)}")
        return _EXIT.get(kind, EX_TEMPFAIL)
    try:
        _print(op, qid, response, as_json=bool(getattr(args, "json", False)))
    except (KeyError, TypeError, ValueError) as exc:
        _err(f"queue {op}: unexpected answer from the relay: {exc}")
        return EX_TEMPFAIL
    return EX_OK


# -- talking to the relay, or to the spool -------------------------------------------------------


def _request(directory: Path, request: dict[str, Any]) -> dict[str, Any] | int:
    """The response to `request` from the running relay or, when none runs, the spool;
    an exit code when neither can answer."""
    path = socket_path(directory)
    try:
        return ask(path, request)
    except ControlUnavailable as exc:
        unavailable = str(exc)
    except PermissionError as exc:
        _err(f"queue: cannot use the control socket {path}: {exc.strerror or exc}")
        return EX_NOPERM
    except (OSError, ValueError) as exc:
        _err(f"queue: the relay did not answer on {path}: {exc}")
        return EX_TEMPFAIL
    store = SpoolStore(directory)
    if request["op"] in _READ_ONLY or not directory.is_dir():
        # Reading needs no lock; a spool that does not exist holds no message.
        return asyncio.run(handle(SpoolAdmin(store), request))
    try:
        store.open(lock=True)
    except SpoolLocked:
        _err(
            f"queue: a relay holds the spool {directory} but does not answer on its "
            f"control socket ({unavailable}); try again when it has started"
        )
        return EX_TEMPFAIL
    except SpoolError as exc:
        _err(f"queue: {exc}")
        return EX_CANTCREAT
    try:
        print("relay not running: acting on the spool directly", file=sys.stderr)
        return asyncio.run(handle(SpoolAdmin(store), request))
    finally:
        store.close()


# -- output ------------------------------------------------------------------------------------


def _print(op: str, qid: str | None, response: dict[str, Any], *, as_json: bool) -> None:
    if op == "list":
        busy = set(response["in_delivery"])
        messages = [from_doc(doc) for doc in response["messages"]]
        _print_list(messages, busy)
    elif op == "show":
        if as_json:
            doc = {"in_delivery": response["in_delivery"], "record": response["message"]}
            print(json.dumps(doc, indent=2, sort_keys=True))
        else:
            _print_show(from_doc(response["message"]), bool(response["in_delivery"]))
    elif op == "flush":
        flushed: list[str] = response["flushed"]
        print(f"flushed {len(flushed)} message(s)" + "".join(f"\n{q}" for q in flushed))
    else:
        done = {"hold": "held", "release": "released (due now)", "delete": "deleted (no bounce)"}
        print(f"{qid}: {done[op]}")


def _state(msg: QueuedMessage, in_delivery: bool, now: float) -> str:
    if in_delivery:
        return "in_delivery"
    if msg.held:
        return "held"
    return "deferred" if msg.next_attempt > now else "due"


def _print_list(messages: list[QueuedMessage], busy: set[str]) -> None:
    now = time.time()
    for m in messages:
        when = "now" if m.next_attempt <= now else f"in {m.next_attempt - now:.0f}s"
        print(
            f"{m.queue_id} size={m.size} from=<{_safe(m.sender)}> attempts={m.attempts} "
            f"next_attempt={when} state={_state(m, m.queue_id in busy, now)}"
        )
        for r in m.recipients:
            last = f' last="{_safe(r.last_reply)}"' if r.last_reply else ""
            print(f"    <{_safe(r.address)}> status={r.status.value}{last}")
    print(f"-- {len(messages)} message(s) in queue")


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _print_show(m: QueuedMessage, in_delivery: bool) -> None:
    now = time.time()
    when = "now" if m.next_attempt <= now else f"in {m.next_attempt - now:.0f}s"
    lines = [
        f"queue_id: {m.queue_id}",
        f"state: {_state(m, in_delivery, now)}",
        f"from: <{_safe(m.sender)}>" + (" (a bounce)" if m.is_bounce else ""),
        f"received: {_utc(m.received)} (queued {now - m.received:.0f}s)",
        f"client: {_safe(m.client) or '-'} helo: {_safe(m.helo) or '-'} size: {m.size}",
        f"attempts: {m.attempts} next_attempt: {_utc(m.next_attempt)} ({when})",
        f"delay_warning: {'sent' if m.delay_warned else 'not sent'}",
    ]
    for r in m.recipients:
        lines.append(
            f"recipient <{_safe(r.address)}> status={r.status.value} attempts={r.attempts}"
            + (f" relay={_safe(r.last_relay)}" if r.last_relay else "")
        )
        if r.last_reply:
            lines.append(f"    last reply: {_safe(r.last_reply)}")
        if r.history:
            dropped = f", {r.history_dropped} dropped after the first" if r.history_dropped else ""
            lines.append(f"    history (oldest first{dropped}):")
        for step in r.history:
            reply = _safe(" ".join(step.reply.split()))
            lines.append(
                f"    {_utc(step.time)} {_safe(step.where)} tls={step.tls} dane={_safe(step.dane)} "
                f"{step.outcome.value}: {reply}"
            )
    print("\n".join(lines))


def _safe(text: str) -> str:
    """Remote replies, HELO names and addresses with control characters escaped, so that
    nothing a peer or client sent can drive the operator's terminal."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _err(text: str) -> None:
    print(f"dane-relay: {text}", file=sys.stderr)
