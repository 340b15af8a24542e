"""The local control socket: queue tools talking to a running relay.

The relay listens on a UNIX socket, `<spool directory>/control.sock` (mode 0600 inside
the 0700 spool directory; on Linux the peer must also run as the relay's user or root,
checked with SO_PEERCRED). The protocol is JSON lines: one request object per line, one
response object per line, any number of requests per connection.

Requests (`id` is a queue id)::

    {"op": "list"}
        -> {"ok": true, "messages": [RECORD, ...], "in_delivery": [ID, ...]}
    {"op": "show", "id": ID}
        -> {"ok": true, "message": RECORD, "in_delivery": false}
    {"op": "flush"}, {"op": "flush", "id": ID}
        -> {"ok": true, "flushed": [ID, ...]}
    {"op": "hold" | "release" | "delete", "id": ID}
        -> {"ok": true, "queue_id": ID}

RECORD is the queue record as stored in spool/env/ (relay.spool.records.to_doc). An
error is `{"ok": false, "error": KIND, "message": TEXT}` with KIND one of `bad_request`,
`unknown` (no such message), `held` (flush of a held message), `busy` (the message is
being delivered right now) or `spool` (the spool could not be read or written).

`handle` answers one request against a `QueueAdmin`: `RunnerAdmin` is the live
relay.spool.runner.QueueRunner (used by `ControlServer`), `SpoolAdmin` the spool itself
for when no relay runs (the caller holds the spool lock). `ask` is the blocking client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from relay.errors import SpoolError
from relay.spool.admin import (
    MessageHeld,
    QueueAdminError,
    UnknownMessage,
    flushable,
    on_hold,
    released,
)
from relay.spool.records import QueuedMessage, to_doc, valid_queue_id
from relay.spool.runner import QueueRunner
from relay.spool.store import SpoolStore

__all__ = [
    "MAX_LINE",
    "SOCKET_NAME",
    "ControlServer",
    "ControlUnavailable",
    "QueueAdmin",
    "RunnerAdmin",
    "SpoolAdmin",
    "ask",
    "handle",
    "socket_path",
]

log = logging.getLogger("relay.control")

SOCKET_NAME = "control.sock"
#: Longest request or response line accepted (a record with a full history is ~10 KiB).
MAX_LINE = 4 * 1024 * 1024
#: An idle client connection is closed after this many seconds.
IDLE_TIMEOUT = 60.0
#: close() waits this long for requests being carried out to finish and be answered.
CLOSE_TIMEOUT = 2.0
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
_OPS_WITH_ID = {"show", "hold", "release", "delete"}
_OPS = _OPS_WITH_ID | {"list", "flush"}


def socket_path(spool_directory: Path) -> Path:
    return spool_directory / SOCKET_NAME


class QueueAdmin(Protocol):
    def messages(self) -> list[QueuedMessage]: ...
    def message(self, qid: str) -> QueuedMessage | None: ...
    def in_delivery(self, qid: str) -> bool: ...
    async def hold(self, qid: str) -> QueuedMessage: ...
    async def release(self, qid: str) -> QueuedMessage: ...
    async def delete(self, qid: str) -> QueuedMessage: ...
    async def flush(self, qid: str | None) -> list[str]: ...


class RunnerAdmin:
    """The live queue of a running relay."""

    def __init__(self, runner: QueueRunner) -> None:
        self.runner = runner

    def messages(self) -> list[QueuedMessage]:
        return sorted(self.runner.snapshot(), key=lambda m: m.queue_id)

    def message(self, qid: str) -> QueuedMessage | None:
        return self.runner.message(qid)

    def in_delivery(self, qid: str) -> bool:
        return self.runner.in_delivery(qid)

    async def hold(self, qid: str) -> QueuedMessage:
        return await self.runner.hold(qid)

    async def release(self, qid: str) -> QueuedMessage:
        return await self.runner.release(qid)

    async def delete(self, qid: str) -> QueuedMessage:
        return await self.runner.delete(qid)

    async def flush(self, qid: str | None) -> list[str]:
        return self.runner.flush(qid)


class SpoolAdmin:
    """The spool of a relay that is not running. Changes are atomic record replacements
    (SpoolStore.update/remove); the caller must hold the spool lock (SpoolStore.open)
    for hold, release, delete and flush. Flush writes next_attempt = now into the
    records, so the relay delivers them as soon as it starts."""

    def __init__(self, store: SpoolStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def messages(self) -> list[QueuedMessage]:
        return self.store.scan()

    def message(self, qid: str) -> QueuedMessage | None:
        return self.store.get(qid)

    def in_delivery(self, qid: str) -> bool:
        return False

    def _get(self, qid: str) -> QueuedMessage:
        msg = self.store.get(qid)
        if msg is None:
            raise UnknownMessage(qid)
        return msg

    async def hold(self, qid: str) -> QueuedMessage:
        msg = on_hold(self._get(qid))
        self.store.update(msg)
        log.info("queue_id=%s held by operator (relay not running)", qid)
        return msg

    async def release(self, qid: str) -> QueuedMessage:
        msg = released(self._get(qid), self.clock())
        self.store.update(msg)
        log.info("queue_id=%s released by operator (relay not running)", qid)
        return msg

    async def delete(self, qid: str) -> QueuedMessage:
        msg = self._get(qid)
        self.store.remove(qid)
        log.info(
            "queue_id=%s deleted by operator from=<%s> pending=%s (no bounce, relay not running)",
            qid,
            msg.sender,
            ",".join(f"<{r.address}>" for r in msg.pending),
        )
        return msg

    async def flush(self, qid: str | None) -> list[str]:
        now = self.clock()
        if qid is not None:
            msg = self._get(qid)
            if msg.held:
                raise MessageHeld(qid)
            candidates = [msg]
        else:
            candidates = self.store.scan()
        due = [m for m in candidates if flushable(m, now)]
        for msg in due:
            self.store.update(replace(msg, next_attempt=now))
        return [m.queue_id for m in due]


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": kind, "message": message}


async def handle(admin: QueueAdmin, request: object) -> dict[str, Any]:
    """The response to one decoded request (never raises for a bad request)."""
    if not isinstance(request, dict):
        return _error("bad_request", "a request is a JSON object")
    op = request.get("op")
    if op not in _OPS:
        return _error("bad_request", f"unknown op {op!r}; expected one of {sorted(_OPS)}")
    qid = request.get("id")
    if qid is not None and not (isinstance(qid, str) and valid_queue_id(qid)):
        return _error("bad_request", f"not a queue id: {qid!r}")
    if op in _OPS_WITH_ID and qid is None:
        return _error("bad_request", f"{op} needs an id")
    try:
        if op == "list":
            messages = admin.messages()
            return {
                "ok": True,
                "messages": [to_doc(m) for m in messages],
                "in_delivery": [m.queue_id for m in messages if admin.in_delivery(m.queue_id)],
            }
        if op == "flush":
            return {"ok": True, "flushed": await admin.flush(qid)}
        assert qid is not None  # _OPS_WITH_ID
        if op == "show":
            msg = admin.message(qid)
            if msg is None:
                raise UnknownMessage(qid)
            return {"ok": True, "message": to_doc(msg), "in_delivery": admin.in_delivery(qid)}
        action = {"hold": admin.hold, "release": admin.release, "delete": admin.delete}[op]
        await action(qid)
        return {"ok": True, "queue_id": qid}
    except QueueAdminError as exc:
        return _error(exc.kind, str(exc))
    except SpoolError as exc:
        return _error("spool", str(exc))


class ControlServer:
    """Serves the control socket for a running relay: start() after the runner exists,
    close() before the runner stops."""

    def __init__(self, runner: QueueRunner, store: SpoolStore, path: Path | None = None) -> None:
        self.admin = RunnerAdmin(runner)
        self.path = path if path is not None else socket_path(store.directory)
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._busy: set[asyncio.Task[None]] = set()  # carrying out a request
        self._closing = False

    async def start(self) -> None:
        """Listen on the socket, replacing a stale one left by a crash (the caller holds
        the spool lock, so no other relay uses it).

        Raises:
            SpoolError: the socket cannot be created (path too long, not a socket in the
            way, permissions).
        """
        if len(os.fsencode(self.path)) > _MAX_SOCKET_PATH:
            raise SpoolError(
                0,
                f"control socket {self.path}: path longer than {_MAX_SOCKET_PATH} bytes "
                "(a UNIX socket limit); use a shorter spool.directory",
            )
        try:
            if self.path.is_symlink() or (
                self.path.exists() and not stat.S_ISSOCK(self.path.lstat().st_mode)
            ):
                raise SpoolError(0, f"control socket {self.path}: something else is in the way")
            self.path.unlink(missing_ok=True)  # stale, from a relay that died
            self._server = await asyncio.start_unix_server(
                self._client, path=str(self.path), limit=MAX_LINE
            )
            os.chmod(self.path, 0o600)
        except SpoolError:
            raise
        except OSError as exc:
            raise SpoolError(
                exc.errno, f"control socket {self.path}: {exc.strerror or exc}"
            ) from exc
        log.info("control socket listening path=%s", self.path)

    async def close(self) -> None:
        """Stop listening and end every connection: a request being carried out is first
        finished and answered (an action cancelled half-way would take effect unanswered
        and unlogged), for up to CLOSE_TIMEOUT seconds; idle connections end at once."""
        if self._server is None:
            return
        self._closing = True
        self._server.close()
        for task in list(self._clients - self._busy):
            task.cancel()
        if self._busy:
            await asyncio.wait(list(self._busy), timeout=CLOSE_TIMEOUT)
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=2.0)
        await self._server.wait_closed()
        self._server = None
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("control socket path=%s not removed: %s", self.path, exc)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            if self._closing or not _peer_allowed(writer):
                return  # closing: accepted just before close(), this task began after it
            while not self._closing:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except (TimeoutError, ValueError, asyncio.LimitOverrunError, OSError):
                    return
                if not line:
                    return
                if task is not None:
                    self._busy.add(task)
                try:
                    request = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                    response = _error("bad_request", f"not a JSON request: {exc}")
                else:
                    response = await handle(self.admin, request)
                    _log_request(request, response)
                writer.write(json.dumps(response, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
                if task is not None:
                    self._busy.discard(task)
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            if task is not None:
                self._clients.discard(task)
                self._busy.discard(task)
            writer.close()


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    """Linux: only the relay's own user or root may use the socket."""
    sock = writer.get_extra_info("socket")
    peercred = getattr(socket, "SO_PEERCRED", None)
    if sock is None or peercred is None:
        return True  # the 0600 socket in the 0700 spool directory is the guard
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, peercred, 12))
    if uid in (0, os.getuid()):
        return True
    log.warning("control refused peer_uid=%d reason=not the relay user or root", uid)
    return False


def _log_request(request: object, response: dict[str, Any]) -> None:
    if not isinstance(request, dict) or request.get("op") in ("list", "show"):
        return  # read-only: not worth a log line each
    log.info(
        "control op=%s queue_id=%s result=%s",
        request.get("op"),
        request.get("id") or "-",
        "ok" if response.get("ok") else response.get("error"),
    )


class ControlUnavailable(Exception):
    """No relay answers on the control socket (none runs, or it is not listening)."""


def ask(path: Path, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to the relay's control socket and return its response.

    Raises:
        ControlUnavailable: no socket, or nothing listens on it (connection refused).
        PermissionError: the socket exists but this user may not use it.
        OSError: the relay did not answer in `timeout` seconds or broke the connection.
        ValueError: the answer is not a JSON object.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fsencode(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlUnavailable(f"{path}: {exc.strerror or exc}") from exc
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as stream:
            line = stream.readline(MAX_LINE + 1)
    if not line.endswith(b"\n"):
        raise ConnectionError(f"{path}: the relay closed the connection without an answer")
    response = json.loads(line)
    if not isinstance(response, dict):
        raise ValueError(f"{path}: the answer is not a JSON object")
    return response
