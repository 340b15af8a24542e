"""A spool that is (nearly) full, on the real front end: MAIL gets 452 4.3.1 when the spool's
file system has less free than server.queue_minfree plus the declared SIZE= (RFC 1870 §6.1,
statvfs of the real spool directory; the thresholds are made to exceed the real free
space), and a full disk or quota at the end of DATA (ENOSPC/EDQUOT raised by the store's
own write) gets 452 4.3.1 instead of 451 4.3.0 (RFC 5321 §4.2.2, RFC 3463 X.3.1)."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
from inboundkit import Frontend, frontend

NO_STORAGE = (452, "4.3.1 Insufficient system storage")
HUGE = 2**60  # more than any test machine has free


def _free(fe: Frontend) -> int:
    st = os.statvfs(fe.spool)
    return st.f_bavail * st.f_frsize


@pytest.mark.asyncio
async def test_mail_is_refused_when_less_than_queue_minfree_is_free(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relay.smtpd")
    async with frontend(tmp_path, queue_minfree=HUGE) as fe:
        assert _free(fe) < HUGE
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert await c.cmd("MAIL FROM:<a@client.test>") == NO_STORAGE
        # No transaction was started.
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 503
        await c.close()
        assert fe.rejections("insufficient_storage") == 1
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reject=")]
    assert line.startswith(
        'reject=MAIL client=127.0.0.1 from=<a@client.test> reply="452 4.3.1" '
        'reason=insufficient-storage why="'
    )
    assert line.endswith(f', need {HUGE} (queue_minfree {HUGE} + SIZE 0)"')


@pytest.mark.asyncio
async def test_mail_is_refused_when_the_declared_size_does_not_fit(tmp_path: Path) -> None:
    async with frontend(tmp_path, queue_minfree=1, max_message_size=HUGE) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert await c.cmd(f"MAIL FROM:<a@client.test> SIZE={HUGE - 1}") == NO_STORAGE
        assert (await c.cmd("MAIL FROM:<a@client.test> SIZE=1000")).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(b"Subject: fits\r\n\r\nx\r\n.")).code == 250
        await c.close()
        assert len(fe.queued) == 1
        assert fe.rejections("insufficient_storage") == 1


@pytest.mark.asyncio
async def test_queue_minfree_zero_and_no_size_never_refuses(tmp_path: Path) -> None:
    async with frontend(tmp_path, queue_minfree=0) as fe:
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<a@client.test>")).code == 250
        await c.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("code", "reply", "reason"),
    [
        (errno.ENOSPC, NO_STORAGE, "insufficient_storage"),
        (errno.EDQUOT, NO_STORAGE, "insufficient_storage"),
        (errno.EIO, (451, "4.3.0 Error: queue file write error"), "spool_error"),
    ],
)
async def test_a_full_disk_at_data_gets_452(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reply: tuple[int, str], reason: str
) -> None:
    async with frontend(tmp_path, queue_minfree=0) as fe:

        def full(name: str, payload: bytes) -> Path:
            raise OSError(code, os.strerror(code))

        # The store's own write fails as on a full file system; SpoolStore.commit wraps
        # it into a SpoolError carrying the errno.
        monkeypatch.setattr(fe.store, "_write_tmp", full)
        c = await fe.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<a@client.test>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        assert await c.cmd(b"Subject: full\r\n\r\nx\r\n.") == reply
        await c.close()
        assert fe.queued == []
        assert fe.files("env") == [] and fe.files("data") == []
        assert fe.rejections(reason) == 1
