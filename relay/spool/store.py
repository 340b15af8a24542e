"""Durable spool on the local file system. Synchronous; call it from a thread.

Layout under the spool directory::

    lock              flock()ed by the one running relay
    tmp/              files being written; anything here at start-up is garbage
    data/<qid>        message body, written once, never changed
    env/<qid>         envelope record (relay.spool.records), replaced atomically
    corrupt/          records recovery could not read, kept for the operator

Guarantees (the "never lose a message" contract):
- `commit` returns only after the body and the envelope are written, fsync'ed,
  renamed into place and their directories fsync'ed. The envelope rename into
  env/ is the commit point: a message exists iff its envelope exists.
- `update` replaces an envelope with write-tmp + fsync + rename + fsync(dir).
- `remove` deletes the envelope first (the message leaves the queue), then the body.
- `recover` deletes tmp files and bodies without an envelope (never acknowledged)
  and moves unreadable envelopes to corrupt/ rather than deleting them.
All failures are raised as `SpoolError`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from relay.errors import SpoolError
from relay.spool.records import QueuedMessage, RecipientState, dump, load, valid_queue_id

__all__ = ["SpoolLocked", "SpoolStore", "new_queue_id"]

log = logging.getLogger("relay.spool")


class SpoolLocked(SpoolError):
    """Another process (a running relay, or a queue tool) holds the spool lock."""


def new_queue_id(now: float | None = None) -> str:
    """A sortable, unique queue id: microseconds since the epoch + 32 random bits, hex."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    return f"{micros:013X}{secrets.randbits(32):08X}"


def _regular_file(path: Path) -> bool:
    """A plain file, not a directory, FIFO or symlink planted in the spool."""
    return path.is_file() and not path.is_symlink()


@contextmanager
def _spool_errors(what: str) -> Iterator[None]:
    try:
        yield
    except SpoolError:
        raise
    except OSError as exc:
        raise SpoolError(exc.errno, f"spool: {what}: {exc.strerror or exc}") from exc


class SpoolStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tmp = directory / "tmp"
        self.data = directory / "data"
        self.env = directory / "env"
        self.corrupt = directory / "corrupt"
        self._lock_file: IO[bytes] | None = None

    # -- start-up ---------------------------------------------------------------

    def open(self, *, lock: bool = True) -> None:
        """Create the directories and, with `lock`, take the spool lock.

        Raises:
            SpoolError: cannot create the directories, or another relay holds the lock.
        """
        with _spool_errors(f"cannot create spool directory {self.directory}"):
            for d in (self.directory, self.tmp, self.data, self.env, self.corrupt):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if lock:
            with _spool_errors(f"cannot lock {self.directory / 'lock'}"):
                fh = open(self.directory / "lock", "ab")  # noqa: SIM115 - held until close()
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    fh.close()
                    raise SpoolLocked(
                        0, f"spool: {self.directory} is in use by another running relay"
                    ) from None
                self._lock_file = fh

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def recover(self) -> list[QueuedMessage]:
        """Clean up after a crash and return every queued message.

        Raises:
            SpoolError: the spool cannot be read.
        """
        with _spool_errors("recovery"):
            for leftover in self.tmp.iterdir():
                leftover.unlink(missing_ok=True)
            messages: list[QueuedMessage] = []
            envelope_ids = set()
            for path in sorted(self.env.iterdir()):
                qid = path.name
                try:
                    if not _regular_file(path):
                        raise ValueError("not a regular file")
                    msg = load(path.read_bytes())
                    if msg.queue_id != qid or not _regular_file(self.data / qid):
                        raise ValueError("envelope without its data file or with a wrong id")
                except ValueError as exc:
                    log.error(
                        "spool=corrupt queue_id=%s reason=%r moved to %s",
                        qid,
                        str(exc),
                        self.corrupt,
                    )
                    os.replace(path, self.corrupt / f"{qid}.env")
                    if (self.data / qid).exists():
                        os.replace(self.data / qid, self.corrupt / f"{qid}.data")
                    continue
                envelope_ids.add(qid)
                messages.append(msg)
            for path in self.data.iterdir():
                if not _regular_file(path):
                    log.error(
                        "spool=corrupt entry=%s reason='not a regular file' moved to %s",
                        path,
                        self.corrupt,
                    )
                    os.replace(path, self.corrupt / f"{path.name}.data")
                elif path.name not in envelope_ids:
                    # Body written but never committed: no 250 was sent for it.
                    log.info("spool=orphan queue_id=%s removed (never acknowledged)", path.name)
                    path.unlink(missing_ok=True)
            self._fsync_dir(self.env)
            self._fsync_dir(self.data)
        return messages

    # -- the message life cycle ---------------------------------------------------

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
        queue_id: str | None = None,
        smtputf8: bool = False,
    ) -> QueuedMessage:
        """Store a new message durably; returns its record once it is safe to say 250.

        Raises:
            SpoolError: the message could not be stored; nothing was committed.
        """
        now = time.time() if now is None else now
        qid = queue_id or new_queue_id(now)
        msg = QueuedMessage(
            queue_id=qid,
            sender=sender,
            recipients=tuple(RecipientState(address=r) for r in recipients),
            received=now,
            next_attempt=now,
            client=client,
            helo=helo,
            size=len(body),
            is_bounce=is_bounce,
            extra={"smtputf8": True} if smtputf8 else {},
        )
        with _spool_errors(f"cannot store message {qid}"):
            body_tmp = self._write_tmp(f"{qid}.data", body)
            try:
                env_tmp = self._write_tmp(f"{qid}.env", dump(msg))
            except OSError:
                body_tmp.unlink(missing_ok=True)  # e.g. ENOSPC after the body fit
                raise
            try:
                os.replace(body_tmp, self.data / qid)
                self._fsync_dir(self.data)
                os.replace(env_tmp, self.env / qid)  # the commit point
                self._fsync_dir(self.env)
            except OSError:
                body_tmp.unlink(missing_ok=True)
                env_tmp.unlink(missing_ok=True)
                if not (self.env / qid).exists():
                    (self.data / qid).unlink(missing_ok=True)
                raise
        return msg

    def update(self, msg: QueuedMessage) -> None:
        """Atomically replace the envelope of a queued message.

        Raises:
            SpoolError: the new state could not be stored (the old one stays).
        """
        with _spool_errors(f"cannot update message {msg.queue_id}"):
            tmp = self._write_tmp(f"{msg.queue_id}.env", dump(msg))
            os.replace(tmp, self.env / msg.queue_id)
            self._fsync_dir(self.env)

    def remove(self, qid: str) -> None:
        """Take a finished message out of the queue.

        Raises:
            SpoolError: the envelope could not be removed.
        """
        with _spool_errors(f"cannot remove message {qid}"):
            (self.env / qid).unlink(missing_ok=True)
            self._fsync_dir(self.env)
            (self.data / qid).unlink(missing_ok=True)

    def read_body(self, qid: str) -> bytes:
        """Raises: SpoolError: the data file is missing or unreadable."""
        with _spool_errors(f"cannot read message {qid}"):
            return (self.data / qid).read_bytes()

    def get(self, qid: str) -> QueuedMessage | None:
        """The envelope of one queued message, or None when there is none (or the id is
        not a queue id, or the record is unreadable: recovery deals with those).

        Raises:
            SpoolError: the spool cannot be read.
        """
        if not valid_queue_id(qid):
            return None
        with _spool_errors(f"cannot read message {qid}"):
            path = self.env / qid
            try:
                if not _regular_file(path):
                    return None
                msg = load(path.read_bytes())
            except (ValueError, FileNotFoundError):
                return None
        return msg if msg.queue_id == qid else None

    def scan(self) -> list[QueuedMessage]:
        """Read every envelope without changing anything (for `queue list`).

        Raises:
            SpoolError: the spool cannot be read.
        """
        out = []
        with _spool_errors("cannot list the queue"):
            if not self.env.is_dir():
                return []
            for path in sorted(self.env.iterdir()):
                if not valid_queue_id(path.name):
                    continue
                try:
                    msg = load(path.read_bytes())
                except (ValueError, FileNotFoundError):
                    continue
                if msg.queue_id == path.name:  # else filed under another id: recovery's
                    out.append(msg)
        return out

    # -- helpers ------------------------------------------------------------------

    def _write_tmp(self, name: str, payload: bytes) -> Path:
        path = self.tmp / f"{name}.{secrets.token_hex(4)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return path

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
