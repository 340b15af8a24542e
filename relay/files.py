"""Reading the relay's own input files without blocking on them.

The STARTTLS certificate and key, `tls.ca_file`, `gateway.recipients_file` and
`server.auth_file` are read at start-up, on SIGHUP (a worker thread whose stuck read
would hold every later reload, and the stop, forever) and, for the last two, again when
they change (at RCPT and AUTH, on the event loop). Opening a FIFO for reading waits for a
writer and a device may never end, so anything but a regular file is refused before a
byte is read: `open_regular` opens without blocking, checks the type on the open file
(no window between the check and the read) and only then reads.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class NotRegularFile(OSError):
    """`path` is a FIFO, a directory, a device or a socket (strerror says which)."""

    def __init__(self, path: Path, kind: str) -> None:
        super().__init__(errno.EINVAL, f"expected a regular file, got {kind}", str(path))


def file_kind(mode: int) -> str:
    """What a non-regular file is, for error messages."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


@contextmanager
def open_regular(path: Path, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open `path` for reading (text with `encoding`, else bytes) if it is a regular file.

    Raises:
        NotRegularFile: it is not a regular file (nothing was read).
        OSError: it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, file_kind(mode))
        os.set_blocking(fd, True)
        fh = open(fd, "r" if encoding else "rb", encoding=encoding)  # noqa: SIM115
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def check_regular(path: Path) -> None:
    """Raise as `open_regular` does when `path` cannot be read as a regular file."""
    with open_regular(path):
        pass
