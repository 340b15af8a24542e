"""relay.spool.store group commit: concurrent operations share directory fsyncs, and each
one still returns only after an fsync of its directory that started after its own rename
(or unlink) has succeeded.

The threads here do what the relay's asyncio.to_thread calls do: several commits, updates
and removes at once on one SpoolStore. os.fsync, os.replace and os.unlink are wrapped to
log, in one global order, when each rename happened and when each directory fsync started
and ended.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.errors import SpoolError
from relay.spool.records import RecipientState, RecipientStatus
from relay.spool.store import SpoolStore

BODY = b"Subject: group\r\n\r\nhello\r\n"
NOW = 1_700_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SpoolStore]:
    s = SpoolStore(tmp_path / "spool")
    s.open()
    try:
        yield s
    finally:
        s.close()


def _fd_path(fd: int) -> Path:
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


def _run_threads(count: int, target: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(i: int) -> None:
        start.wait()
        try:
            target(i)
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return errors


def test_each_operation_waits_for_a_directory_fsync_started_after_its_rename(
    store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = threading.Lock()
    events: list[tuple[str, ...]] = []

    def log(*event: str) -> int:
        with lock:
            events.append(event)
            return len(events) - 1

    real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink

    def fsync(fd: int) -> None:
        path = _fd_path(fd)
        if path.is_dir():
            log("start", path.name)
            time.sleep(0.005)  # a slow disk, so that callers pile up behind an fsync
            real_fsync(fd)
            log("end", path.name)
        else:
            real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        log("rename", Path(dst).parent.name, Path(dst).name)

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        real_unlink(path, *args, **kwargs)
        log("unlink", Path(path).parent.name, Path(path).name)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)

    threads, per_thread = 12, 6
    done: dict[tuple[str, str], int] = {}  # (operation, queue id) -> event index of return

    def work(i: int) -> None:
        for _ in range(per_thread):
            msg = store.commit(sender=f"s{i}@x", recipients=["r@y"], body=BODY, now=NOW)
            done[("commit", msg.queue_id)] = log("return", "commit", msg.queue_id)
            store.update(msg.with_recipients((RecipientState("r@y", RecipientStatus.DELIVERED),)))
            done[("update", msg.queue_id)] = log("return", "update", msg.queue_id)
            store.remove(msg.queue_id)
            done[("remove", msg.queue_id)] = log("return", "remove", msg.queue_id)

    assert _run_threads(threads, work) == []
    monkeypatch.undo()
    total = threads * per_thread
    assert len(done) == 3 * total

    def covered(change: int, directory: str, returned: int) -> bool:
        """Some fsync of `directory` started after event `change` and ended before `returned`."""
        starts = [i for i in range(change + 1, returned) if events[i] == ("start", directory)]
        return any(_matching_end(events, s, directory) < returned for s in starts)

    for (operation, qid), returned in done.items():
        if operation == "commit":
            data_rename = events.index(("rename", "data", qid))
            env_rename = events.index(("rename", "env", qid))
            assert covered(data_rename, "data", env_rename), (operation, qid)
            assert covered(env_rename, "env", returned), (operation, qid)
        elif operation == "update":
            commit_returned = done[("commit", qid)]
            rename = next(
                i for i in range(commit_returned, returned) if events[i] == ("rename", "env", qid)
            )
            assert covered(rename, "env", returned), (operation, qid)
        else:
            gone = events.index(("unlink", "env", qid))
            assert covered(gone, "env", returned), (operation, qid)
    # Durable, and cheaper: fewer env/ fsyncs than env/ changes (3 per message).
    env_fsyncs = events.count(("start", "env"))
    assert env_fsyncs == store.env_sync.fsyncs
    assert store.env_sync.requests == 3 * total
    assert env_fsyncs < 3 * total
    assert os.listdir(store.env) == [] and os.listdir(store.data) == []


def _matching_end(events: list[tuple[str, ...]], start: int, directory: str) -> int:
    """The index of the end of the fsync that started at `start` (fsyncs of one directory
    never overlap: one thread leads at a time)."""
    return next(i for i in range(start + 1, len(events)) if events[i] == ("end", directory))


def test_concurrent_commits_share_one_fsync_of_the_data_directory(
    store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first commit's data/ fsync is held until all N commits asked for one: the
    second fsync then covers the N-1 others. Two data/ fsyncs for N commits."""
    n = 8
    real_fsync = os.fsync
    data_fsyncs = []

    def fsync(fd: int) -> None:
        if _fd_path(fd) == store.data:
            data_fsyncs.append(fd)
            if len(data_fsyncs) == 1:
                deadline = time.monotonic() + 20
                while store.data_sync.requests < n and time.monotonic() < deadline:
                    time.sleep(0.001)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    committed = []
    errors = _run_threads(
        n,
        lambda i: committed.append(
            store.commit(sender=f"s{i}@x", recipients=["r@y"], body=BODY, now=NOW)
        ),
    )
    monkeypatch.undo()
    assert errors == []
    assert len(committed) == n
    assert store.data_sync.requests == n
    assert len(data_fsyncs) == 2
    assert store.data_sync.fsyncs == 2
    assert sorted(os.listdir(store.env)) == sorted(m.queue_id for m in committed)


def test_a_failed_group_fsync_fails_every_commit_it_was_to_cover(
    store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first data/ fsync (one commit) succeeds after all have asked; the second, which
    covers the other N-1, fails: those N-1 commits raise SpoolError and leave nothing.
    A later commit gets its own fsync and succeeds."""
    n = 6
    real_fsync = os.fsync
    data_fsyncs = []

    def fsync(fd: int) -> None:
        if _fd_path(fd) == store.data:
            data_fsyncs.append(fd)
            if len(data_fsyncs) == 1:
                deadline = time.monotonic() + 20
                while store.data_sync.requests < n and time.monotonic() < deadline:
                    time.sleep(0.001)
            elif len(data_fsyncs) == 2:
                raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    committed = []
    errors = _run_threads(
        n,
        lambda i: committed.append(
            store.commit(sender=f"s{i}@x", recipients=["r@y"], body=BODY, now=NOW)
        ),
    )
    assert len(committed) == 1
    assert len(errors) == n - 1
    assert all(isinstance(e, SpoolError) and "Input/output error" in str(e) for e in errors)
    assert len(data_fsyncs) == 2  # the failed ones did not each retry on a new descriptor
    later = store.commit(sender="later@x", recipients=["r@y"], body=BODY, now=NOW)
    monkeypatch.undo()
    assert len(data_fsyncs) == 3
    assert sorted(os.listdir(store.env)) == sorted([committed[0].queue_id, later.queue_id])
    assert sorted(os.listdir(store.data)) == sorted(os.listdir(store.env))
    assert os.listdir(store.tmp) == []
