"""relay.spool.store: durable layout, life cycle, recovery and crash consistency.

The crash tests fork a child that runs one store operation with os.write, os.fsync
and os.replace wrapped so that the process dies (os._exit) just before or just after
their N-th call, for every N the operation reaches. The parent then recovers the
spool the way the relay does at start-up and checks the "never lose, never
duplicate" contract.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.errors import SpoolError
from relay.spool.records import QueuedMessage, RecipientState, RecipientStatus, dump, load
from relay.spool.store import SpoolStore, new_queue_id

NOW = 1_700_000_000.0
BODY = b"Subject: test\r\n\r\nhello\r\n"
OPS = ("write", "fsync", "replace")


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def store(spool_dir: Path) -> Iterator[SpoolStore]:
    s = SpoolStore(spool_dir)
    s.open()
    try:
        yield s
    finally:
        s.close()


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- layout and life cycle -------------------------------------------------------------------


def test_open_creates_private_directories(spool_dir: Path, store: SpoolStore) -> None:
    for name in ("tmp", "data", "env", "corrupt"):
        path = spool_dir / name
        assert path.is_dir()
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert (spool_dir / "lock").is_file()


def test_new_queue_ids_are_unique_sortable_hex() -> None:
    ids = [new_queue_id(NOW + i) for i in range(50)]
    assert all(len(q) == 21 and q == q.upper() and int(q, 16) >= 0 for q in ids)
    assert ids == sorted(ids)
    assert len({new_queue_id(NOW) for _ in range(200)}) == 200
    assert new_queue_id(NOW).startswith(f"{int(NOW * 1_000_000):013X}")


def test_commit_writes_body_and_envelope(spool_dir: Path, store: SpoolStore) -> None:
    msg = store.commit(
        sender="alice@example.org",
        recipients=["bob@example.net", "carol@example.com"],
        body=BODY,
        client="192.0.2.7",
        helo="client.example.org",
        now=NOW,
    )
    assert msg == QueuedMessage(
        queue_id=msg.queue_id,
        sender="alice@example.org",
        recipients=(RecipientState("bob@example.net"), RecipientState("carol@example.com")),
        received=NOW,
        next_attempt=NOW,
        client="192.0.2.7",
        helo="client.example.org",
        size=len(BODY),
    )
    assert msg.queue_id.startswith(f"{int(NOW * 1_000_000):013X}")
    assert files(spool_dir / "data") == [msg.queue_id]
    assert files(spool_dir / "env") == [msg.queue_id]
    assert files(spool_dir / "tmp") == []
    assert (spool_dir / "data" / msg.queue_id).read_bytes() == BODY
    assert (spool_dir / "env" / msg.queue_id).read_bytes() == dump(msg)
    assert stat.S_IMODE((spool_dir / "data" / msg.queue_id).stat().st_mode) == 0o600
    assert store.read_body(msg.queue_id) == BODY


def test_commit_bounce_with_given_queue_id(spool_dir: Path, store: SpoolStore) -> None:
    qid = "00000000000ABCDEF1234"
    msg = store.commit(sender="", recipients=["a@b"], body=b"x", is_bounce=True, queue_id=qid)
    assert msg.queue_id == qid
    assert load((spool_dir / "env" / qid).read_bytes()) == msg
    assert msg.is_bounce and msg.sender == ""


def test_update_replaces_the_envelope(spool_dir: Path, store: SpoolStore) -> None:
    msg = store.commit(sender="a@b", recipients=["c@d", "e@f"], body=BODY, now=NOW)
    changed = msg.with_recipients(
        (
            RecipientState("c@d", RecipientStatus.DELIVERED, 1, "250 2.0.0 Ok", "mx[1.2.3.4]:25"),
            RecipientState("e@f", RecipientStatus.PENDING, 1, "451 4.7.5 no"),
        )
    )
    store.update(changed)
    assert load((spool_dir / "env" / msg.queue_id).read_bytes()) == changed
    assert (spool_dir / "data" / msg.queue_id).read_bytes() == BODY
    assert files(spool_dir / "tmp") == []
    assert store.scan() == [changed]


def test_remove(spool_dir: Path, store: SpoolStore) -> None:
    keep = store.commit(sender="a@b", recipients=["c@d"], body=b"keep", now=NOW)
    gone = store.commit(sender="a@b", recipients=["c@d"], body=b"gone", now=NOW + 1)
    store.remove(gone.queue_id)
    assert files(spool_dir / "env") == [keep.queue_id]
    assert files(spool_dir / "data") == [keep.queue_id]
    store.remove(gone.queue_id)  # removing twice is harmless
    with pytest.raises(SpoolError, match=f"cannot read message {gone.queue_id}"):
        store.read_body(gone.queue_id)


def test_scan_reads_without_changing(spool_dir: Path, store: SpoolStore) -> None:
    msg = store.commit(sender="a@b", recipients=["c@d"], body=BODY, now=NOW)
    (spool_dir / "env" / "FFFFFFFFFFFFFFFFFFFFF").write_bytes(b"garbage")
    (spool_dir / "env" / "not-a-qid").write_bytes(dump(msg))
    (spool_dir / "tmp" / "leftover").write_bytes(b"x")
    assert store.scan() == [msg]
    assert files(spool_dir / "env") == sorted([msg.queue_id, "FFFFFFFFFFFFFFFFFFFFF", "not-a-qid"])
    assert files(spool_dir / "tmp") == ["leftover"]


def test_scan_of_missing_spool(tmp_path: Path) -> None:
    assert SpoolStore(tmp_path / "none").scan() == []


def test_second_open_while_locked(spool_dir: Path, store: SpoolStore) -> None:
    other = SpoolStore(spool_dir)
    with pytest.raises(SpoolError, match="in use by another running relay"):
        other.open()
    store.close()
    other.open()  # the lock is free again once the holder closes
    other.close()


def test_open_without_lock_does_not_take_it(spool_dir: Path) -> None:
    reader = SpoolStore(spool_dir)
    reader.open(lock=False)
    owner = SpoolStore(spool_dir)
    owner.open()
    owner.close()


def test_lock_is_held_against_another_process(spool_dir: Path, store: SpoolStore) -> None:
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_try_open, args=(spool_dir,))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 73


def _try_open(spool_dir: Path) -> None:
    try:
        SpoolStore(spool_dir).open()
    except SpoolError:
        os._exit(73)
    os._exit(0)


def test_open_on_unusable_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SpoolError, match="cannot create spool directory"):
        SpoolStore(tmp_path / "file" / "spool").open()


def test_failed_commit_leaves_nothing(
    spool_dir: Path, store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if Path(dst).parent.name == "env":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(SpoolError, match="No space left on device"):
        store.commit(sender="a@b", recipients=["c@d"], body=BODY, now=NOW)
    monkeypatch.undo()
    for name in ("tmp", "data", "env"):
        assert files(spool_dir / name) == [], name


def test_envelope_write_failing_after_the_body_leaves_nothing(
    spool_dir: Path, store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC when the envelope is written (the body fit): the body's tmp file goes too."""
    real_write = os.write

    def failing_write(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[1].count(".env."):
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(SpoolError, match="No space left on device"):
        store.commit(sender="a@b", recipients=["c@d"], body=BODY, now=NOW)
    monkeypatch.undo()
    for name in ("tmp", "data", "env"):
        assert files(spool_dir / name) == [], name


def test_failed_update_keeps_the_old_envelope(
    spool_dir: Path, store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    msg = store.commit(sender="a@b", recipients=["c@d"], body=BODY, now=NOW)

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(SpoolError, match=f"cannot update message {msg.queue_id}"):
        store.update(msg.with_recipients((RecipientState("c@d", RecipientStatus.DELIVERED),)))
    monkeypatch.undo()
    assert load((spool_dir / "env" / msg.queue_id).read_bytes()) == msg
    assert files(spool_dir / "tmp") == []


# -- the durability order ---------------------------------------------------------------------


def test_commit_fsyncs_before_the_commit_point(
    spool_dir: Path, store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file is fsync'ed before its rename; each directory after it; env rename last."""
    calls: list[tuple[str, str]] = []

    def where(fd_or_path: Any) -> str:
        if isinstance(fd_or_path, int):
            fd_or_path = os.readlink(f"/proc/self/fd/{fd_or_path}")
        path = Path(fd_or_path)
        return path.name if path.parent == spool_dir else f"{path.parent.name}/{path.name[:9]}"

    for name in OPS:
        real = getattr(os, name)

        def spy(*args: Any, _real: Callable[..., Any] = real, _name: str = name) -> Any:
            target = where(args[0]) if _name != "replace" else where(args[1])
            calls.append((_name, target))
            return _real(*args)

        monkeypatch.setattr(os, name, spy)
    msg = store.commit(sender="a@b", recipients=["c@d"], body=BODY, now=NOW)
    monkeypatch.undo()
    short = msg.queue_id[:9]
    assert calls == [
        ("write", f"tmp/{short}"),
        ("fsync", f"tmp/{short}"),
        ("write", f"tmp/{short}"),
        ("fsync", f"tmp/{short}"),
        ("replace", f"data/{short}"),
        ("fsync", "data"),
        ("replace", f"env/{short}"),  # the commit point
        ("fsync", "env"),
    ]


# -- recovery -----------------------------------------------------------------------------------


def test_recover_cleans_up_and_returns_committed(spool_dir: Path, store: SpoolStore) -> None:
    first = store.commit(sender="a@b", recipients=["c@d"], body=b"1", now=NOW)
    second = store.commit(sender="e@f", recipients=["g@h"], body=b"2", now=NOW + 1)
    # Garbage a crash can leave: tmp files, a body whose envelope never got renamed.
    (spool_dir / "tmp" / "0000000000AAAA.data.1234abcd").write_bytes(b"partial")
    (spool_dir / "tmp" / "0000000000AAAA.env.1234abcd").write_bytes(b"{")
    (spool_dir / "data" / "0000000000BBBBBBBBBBB").write_bytes(b"never acknowledged")
    # An envelope that cannot be read, one without its body, one filed under another name.
    bad, lonely, misfiled = (
        "0000000000CCCCCCCCCCC",
        "0000000000DDDDDDDDDDD",
        "0000000000EEEEEEEEEEE",
    )
    (spool_dir / "env" / bad).write_bytes(b'{"version": 1, "queue_id": "truncat')
    (spool_dir / "data" / bad).write_bytes(b"body of the unreadable one")
    (spool_dir / "env" / lonely).write_bytes(dump(_with_id(first, lonely)))
    (spool_dir / "env" / misfiled).write_bytes(dump(first))
    (spool_dir / "data" / misfiled).write_bytes(b"misfiled body")

    recovered = store.recover()

    assert recovered == [first, second]
    assert files(spool_dir / "tmp") == []
    assert files(spool_dir / "env") == [first.queue_id, second.queue_id]
    assert files(spool_dir / "data") == [first.queue_id, second.queue_id]
    assert files(spool_dir / "corrupt") == sorted(
        [f"{bad}.env", f"{bad}.data", f"{lonely}.env", f"{misfiled}.env", f"{misfiled}.data"]
    )
    # Quarantined, not deleted: the operator gets the bytes back.
    assert (spool_dir / "corrupt" / f"{bad}.data").read_bytes() == b"body of the unreadable one"
    assert store.recover() == [first, second]  # idempotent


def _with_id(msg: QueuedMessage, qid: str) -> QueuedMessage:
    return QueuedMessage(
        qid, msg.sender, msg.recipients, msg.received, msg.next_attempt, size=msg.size
    )


def test_recover_empty_spool(store: SpoolStore) -> None:
    assert store.recover() == []


# -- crash consistency ----------------------------------------------------------------------------

CHILD_SENDER = "crash@example.org"


def _count_ops(monkeypatch: pytest.MonkeyPatch, action: Callable[[], object]) -> dict[str, int]:
    counts = dict.fromkeys(OPS, 0)
    for name in OPS:
        real = getattr(os, name)

        def counting(*args: Any, _real: Callable[..., Any] = real, _name: str = name) -> Any:
            counts[_name] += 1
            return _real(*args)

        monkeypatch.setattr(os, name, counting)
    action()
    monkeypatch.undo()
    return counts


def _crash_child(
    spool_dir: Path, marker: Path, operation: str, op: str, nth: int, when: str
) -> None:
    """Runs in the forked child: one store operation that dies at the nth call of `op`."""
    store = SpoolStore(spool_dir)
    store.open(lock=False)
    existing = store.scan()
    count = [0]
    real = getattr(os, op)

    def dying(*args: Any) -> Any:
        count[0] += 1
        if count[0] == nth and when == "before":
            os._exit(1)
        result = real(*args)
        if count[0] == nth and when == "after":
            os._exit(1)
        return result

    setattr(os, op, dying)
    if operation == "commit":
        store.commit(sender=CHILD_SENDER, recipients=["x@y"], body=BODY, now=NOW)
    elif operation == "update":
        (msg,) = existing
        store.update(msg.with_recipients((RecipientState("x@y", RecipientStatus.DELIVERED),)))
    else:
        (msg,) = existing
        store.remove(msg.queue_id)
    setattr(os, op, real)
    marker.write_text("returned")
    os._exit(0)


def _run_child(spool_dir: Path, marker: Path, operation: str, op: str, nth: int, when: str) -> int:
    proc = multiprocessing.get_context("fork").Process(
        target=_crash_child, args=(spool_dir, marker, operation, op, nth, when)
    )
    proc.start()
    proc.join(60)
    assert proc.exitcode is not None, "child did not finish"
    return proc.exitcode


def _scenarios(counts: dict[str, int]) -> list[tuple[str, int, str]]:
    return [
        (op, nth, when)
        for op in OPS
        for nth in range(1, counts[op] + 1)
        for when in ("before", "after")
    ]


def test_commit_crash_at_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = SpoolStore(tmp_path / "probe")
    probe.open()
    counts = _count_ops(
        monkeypatch,
        lambda: probe.commit(sender=CHILD_SENDER, recipients=["x@y"], body=BODY, now=NOW),
    )
    probe.close()
    assert counts == {"write": 2, "fsync": 4, "replace": 2}
    scenarios = _scenarios(counts) + [("write", counts["write"] + 1, "before")]  # no crash

    outcomes = set()
    for i, (op, nth, when) in enumerate(scenarios):
        spool_dir, marker = tmp_path / f"spool{i}", tmp_path / f"marker{i}"
        store = SpoolStore(spool_dir)
        store.open()
        bystander = store.commit(sender="other@example.org", recipients=["o@p"], body=b"o")
        store.close()

        exitcode = _run_child(spool_dir, marker, "commit", op, nth, when)
        returned = marker.exists()
        assert exitcode == (0 if returned else 1), (op, nth, when)

        store = SpoolStore(spool_dir)
        store.open()
        recovered = store.recover()
        mine = [m for m in recovered if m.sender == CHILD_SENDER]
        context = (op, nth, when, returned, recovered)
        assert len(mine) <= 1, context  # exactly once or not at all
        if returned:
            assert len(mine) == 1, context  # acknowledged means present
        if mine:
            assert store.read_body(mine[0].queue_id) == BODY, context
            assert mine[0].recipients == (RecipientState("x@y"),), context
        assert [m for m in recovered if m.sender != CHILD_SENDER] == [bystander], context
        assert files(spool_dir / "tmp") == [], context
        assert files(spool_dir / "corrupt") == [], context
        assert files(spool_dir / "data") == sorted(m.queue_id for m in recovered), context
        store.close()
        outcomes.add((bool(mine), returned))
    # Both sides of the commit point were exercised.
    assert outcomes == {(False, False), (True, False), (True, True)}


@pytest.mark.parametrize("operation", ["update", "remove"])
def test_update_and_remove_crash_at_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    def prepare(spool_dir: Path) -> QueuedMessage:
        store = SpoolStore(spool_dir)
        store.open()
        msg = store.commit(sender=CHILD_SENDER, recipients=["x@y"], body=BODY, now=NOW)
        store.close()
        return msg

    probe_dir = tmp_path / "probe"
    original = prepare(probe_dir)
    probe = SpoolStore(probe_dir)
    probe.open()
    action = (
        (lambda: probe.update(original))
        if operation == "update"
        else (lambda: probe.remove(original.queue_id))
    )
    counts = _count_ops(monkeypatch, action)
    probe.close()
    expected_counts = {
        "update": {"write": 1, "fsync": 2, "replace": 1},
        "remove": {"write": 0, "fsync": 1, "replace": 0},
    }[operation]
    assert counts == expected_counts

    for i, (op, nth, when) in enumerate(_scenarios(counts) + [("fsync", 99, "before")]):
        spool_dir, marker = tmp_path / f"spool{i}", tmp_path / f"marker{i}"
        msg = prepare(spool_dir)
        updated = msg.with_recipients((RecipientState("x@y", RecipientStatus.DELIVERED),))
        exitcode = _run_child(spool_dir, marker, operation, op, nth, when)
        returned = marker.exists()
        assert exitcode == (0 if returned else 1), (op, nth, when)
        store = SpoolStore(spool_dir)
        store.open()
        recovered = store.recover()
        context = (op, nth, when, returned, recovered)
        assert files(spool_dir / "corrupt") == [], context
        assert files(spool_dir / "tmp") == [], context
        if operation == "update":
            # The old state or the new one, never lost; the new one once update returned.
            assert [m.queue_id for m in recovered] == [msg.queue_id], context
            assert recovered[0] in (msg, updated), context
            if returned:
                assert recovered[0] == updated, context
            assert store.read_body(msg.queue_id) == BODY
        else:
            assert recovered in ([], [msg]), context
            if returned:
                assert recovered == [], context
            assert files(spool_dir / "data") == [m.queue_id for m in recovered], context
        store.close()
