"""The DATA content of one inbound message, read in chunks with bytes operations.

Contract: `DataReader` is fed the bytes that follow a 354 in whatever pieces they arrive
and says when the end of data has been seen. It decides exactly as aiosmtpd 1.4's
line-by-line `SMTP.smtp_DATA` does (pinned by a differential test against it):
- The data ends at the first line that is "." (RFC 5321 §4.1.1.4), a line being what
  ends at CRLF. A bare CR or LF ends no line (RFC 5321 §2.3.8), so "\\n.\\n" is data; the
  handler decides what to do with such a message.
- Each line loses one leading "." (RFC 5321 §4.5.2 transparency).
- A line longer than `line_limit` octets with its CRLF, not counting one leading dot
  (RFC 5321 §4.5.3.1.6: 1000, "not counting the leading dot duplicated for
  transparency"), gives `TOO_LONG`; data past
  `size_limit` octets (counted before the leading dots are removed, without the final
  ".") gives `TOO_MUCH`; whichever comes first in the stream wins, as aiosmtpd orders them.
  From then on nothing more is kept: the rest is only scanned for the end of data.
- What followed the end of data (pipelined commands) is handed back in `leftover`.

`receive_data()` drives a `DataReader` from an asyncio `StreamReader` and gives what
followed the end back to that reader, so the command loop reads it next. It calls
`on_chunk` after every read that brought data (the server restarts its idle timer there).

Where it parts from aiosmtpd 1.4 (which allows 1001 octets on every line): a line of
exactly 1001 octets with its CRLF that does not start with a dot is `TOO_LONG`. Which of
two limits wins is still aiosmtpd's order.

Theory of operation: the work per chunk is `find`/`rfind`/`split`/`replace` at C speed
instead of a Python loop iteration per line. The buffer starts with a virtual CRLF so that
the end marker is always "\\r\\n.\\r\\n", the first line included.
"""

from __future__ import annotations

import asyncio
import enum
import sys
from collections.abc import Callable

__all__ = ["LINE_LIMIT", "DataReader", "DataVerdict", "receive_data"]

#: RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF, not counting
#: the leading dot duplicated for transparency.
LINE_LIMIT = 1000

_END = b"\r\n.\r\n"
# Enough for `StreamReader.read` to hand over everything it holds in one call.
_EVERYTHING = sys.maxsize


class DataVerdict(enum.Enum):
    NOMINAL = "nominal"
    TOO_LONG = "too_long"  # a line over the limit (RFC 5321 §4.5.3.1.6)
    TOO_MUCH = "too_much"  # more data than the size limit


class DataReader:
    """Sans-I/O: feed it chunks until `feed` returns True."""

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self._size_limit = size_limit or 0  # 0: none, as aiosmtpd reads None and 0
        self._line_limit = line_limit  # octets per line, CRLF included, one leading dot not
        # aiosmtpd's line reader (limit 1001) overruns beyond this: such a line is too long
        # before its octets are counted towards the size limit.
        self._overrun = line_limit + 3
        self._buf = bytearray(b"\r\n")  # the virtual line end before the first line
        self._checked = 2  # the lines before this offset have been checked
        self._search = 0  # where the search for the end marker goes on
        self._counted = 0  # octets of the checked lines
        self.verdict = DataVerdict.NOMINAL
        self.content = b""  # the message, once the end is read with a NOMINAL verdict
        self.leftover = b""  # what came after the end of data
        self.done = False

    def feed(self, chunk: bytes) -> bool:
        """Take the next bytes; True once the end of data has been read."""
        if self.done:
            raise RuntimeError("end of data already read")
        buf = self._buf
        buf += chunk
        end = buf.find(_END, self._search)
        if end >= 0:
            upto = end + 2  # the CRLF before "." ends the last line
        else:
            upto = buf.rfind(b"\r\n", self._checked - 2) + 2
        if self.verdict is DataVerdict.NOMINAL:
            if upto > self._checked:
                self._check(self._checked, upto)
                self._checked = upto
            # An unfinished line already this long (a CR at its end may still become a
            # CRLF) is over the limit however it ends.
            if (
                end < 0
                and self.verdict is DataVerdict.NOMINAL
                and len(buf) - self._checked > self._overrun - 1
            ):
                self.verdict = DataVerdict.TOO_LONG
        if end >= 0:
            self.done = True
            self.leftover = bytes(buf[end + len(_END) :])
            if self.verdict is DataVerdict.NOMINAL:
                # Each line loses one leading dot; the virtual CRLF makes the first a line.
                self.content = bytes(buf[:upto]).replace(b"\r\n.", b"\r\n")[2:]
            self._buf = bytearray()
            return True
        if self.verdict is DataVerdict.NOMINAL:
            self._search = max(0, len(buf) - (len(_END) - 1))
        else:
            # Refused already: keep only what could begin the end marker.
            del buf[: -(len(_END) - 1)]
            self._checked = 2
            self._search = 0
        return False

    def _check(self, start: int, upto: int) -> None:
        """The verdict after the complete lines buf[start:upto]."""
        size = upto - start
        limit = self._size_limit
        if (not limit or self._counted + size <= limit) and (
            size <= self._line_limit
            or max(map(len, self._buf[start : upto - 2].split(b"\r\n"))) + 2 <= self._line_limit
        ):
            self._counted += size
            return
        # Something may be over a limit: which comes first, line by line as aiosmtpd sees
        # it (a line with a leading dot may be one octet longer).
        for line in self._buf[start : upto - 2].split(b"\r\n"):
            length = len(line) + 2
            if length > self._overrun:
                self.verdict = DataVerdict.TOO_LONG
                return
            self._counted += length
            if limit and self._counted > limit:
                self.verdict = DataVerdict.TOO_MUCH
                return
            if length - line.startswith(b".") > self._line_limit:
                self.verdict = DataVerdict.TOO_LONG
                return


async def receive_data(
    reader: asyncio.StreamReader,
    size_limit: int | None,
    line_limit: int = LINE_LIMIT,
    on_chunk: Callable[[], object] | None = None,
) -> DataReader:
    """Read the DATA content from `reader` up to its end marker.

    What followed the marker is put back into `reader` in order: everything it held was
    taken by the last `read`, and nothing can arrive before `feed_data` runs (no await
    in between).

    Raises:
        asyncio.IncompleteReadError: the stream ended before the end of data (as
            aiosmtpd's `readuntil` does).
    """
    data = DataReader(size_limit, line_limit)
    while True:
        chunk = await reader.read(_EVERYTHING)
        if not chunk:
            raise asyncio.IncompleteReadError(b"", None)
        if on_chunk is not None:
            on_chunk()
        if data.feed(chunk):
            break
    # At end of stream the session is over (aiosmtpd's eof_received cancels it).
    if data.leftover and not reader.at_eof():
        reader.feed_data(data.leftover)
    return data
