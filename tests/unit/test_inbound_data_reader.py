"""relay.inbound.data.DataReader: the DATA content, the end of data and the limits.

Every case is fed whole and in chunks of 1, 2, 16, 128 and 4096 bytes, so an end marker
or a CRLF split across reads is covered; the result must not depend on the split.
"""

from __future__ import annotations

import asyncio

import pytest

from relay.inbound.data import LINE_LIMIT, DataReader, DataVerdict, receive_data

CHUNKS = [1, 2, 16, 128, 4096, 1 << 20]


def _read(
    stream: bytes, chunk: int, size_limit: int | None = None
) -> tuple[DataVerdict, bytes, bytes]:
    reader = DataReader(size_limit, LINE_LIMIT)
    for start in range(0, len(stream), chunk):
        if reader.feed(stream[start : start + chunk]):
            rest = stream[start + chunk :]
            return reader.verdict, reader.content, reader.leftover + rest
    raise AssertionError("no end of data")


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    ("stream", "content", "leftover"),
    [
        (b"Subject: a\r\n\r\nbody\r\n.\r\n", b"Subject: a\r\n\r\nbody\r\n", b""),
        # The first line is "." at once: an empty message.
        (b".\r\nNOOP\r\n", b"", b"NOOP\r\n"),
        # RFC 5321 §4.5.2: one leading dot goes from every line, the first one included.
        (b"..\r\n.x\r\n...y\r\nz.\r\n.\r\n", b".\r\nx\r\n..y\r\nz.\r\n", b""),
        # What follows the end (pipelined commands) is handed back untouched.
        (b"a\r\n.\r\nMAIL FROM:<x@y>\r\n.\r\n", b"a\r\n", b"MAIL FROM:<x@y>\r\n.\r\n"),
        # RFC 5321 §2.3.8: bare LF and bare CR end no line, so none of these ends the data
        # and a dot after them is not a line's first character.
        (b"a\n.\nb\r.\rc\n.\r\nd\r\n.\n\r\n.\r\n", b"a\n.\nb\r.\rc\n.\r\nd\r\n\n\r\n", b""),
        (b"a\r\n.\rb\r\n.\r\n", b"a\r\n\rb\r\n", b""),
        (b"\r\r\n.\r\n", b"\r\r\n", b""),
        # 8-bit and NUL octets pass as they are.
        (b"\xff\x00\xe9\r\n.\r\n", b"\xff\x00\xe9\r\n", b""),
    ],
)
def test_content_and_leftover_are_exact(
    stream: bytes, content: bytes, leftover: bytes, chunk: int
) -> None:
    assert _read(stream, chunk) == (DataVerdict.NOMINAL, content, leftover)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_line_of_the_limit_passes_and_one_octet_more_is_too_long(chunk: int) -> None:
    # RFC 5321 §4.5.3.1.6: 1000 octets with the CRLF.
    assert LINE_LIMIT == 1000
    longest = b"x" * (LINE_LIMIT - 2) + b"\r\n"
    assert _read(longest + b".\r\n", chunk) == (DataVerdict.NOMINAL, longest, b"")
    verdict, content, leftover = _read(b"x" + longest + b"after\r\n.\r\nNOOP\r\n", chunk)
    assert (verdict, content, leftover) == (DataVerdict.TOO_LONG, b"", b"NOOP\r\n")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_the_transparency_dot_is_not_counted(chunk: int) -> None:
    # RFC 5321 §4.5.3.1.6: "not counting the leading dot duplicated for transparency".
    longest = b"x" * (LINE_LIMIT - 3) + b"\r\n"  # 1000 octets once the dot is removed
    assert _read(b"." + b"." + longest + b".\r\n", chunk) == (
        DataVerdict.NOMINAL,
        b"." + longest,
        b"",
    )
    verdict, content, leftover = _read(b".." + b"x" + longest + b".\r\nNOOP\r\n", chunk)
    assert (verdict, content, leftover) == (DataVerdict.TOO_LONG, b"", b"NOOP\r\n")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_size_limit_counts_every_octet_before_the_end(chunk: int) -> None:
    body = b"..ab\r\n" + b"c" * 10 + b"\r\n"  # 18 octets as sent, dots included
    assert _read(body + b".\r\n", chunk, size_limit=18) == (
        DataVerdict.NOMINAL,
        b".ab\r\n" + b"c" * 10 + b"\r\n",
        b"",
    )
    assert _read(body + b".\r\nRSET\r\n", chunk, size_limit=17) == (
        DataVerdict.TOO_MUCH,
        b"",
        b"RSET\r\n",
    )
    # None and 0 both mean no limit (as aiosmtpd reads them).
    assert _read(body + b".\r\n", chunk, size_limit=0)[0] is DataVerdict.NOMINAL


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    ("lines", "size_limit", "verdict"),
    [
        # The first limit crossed in the stream decides.
        ([b"a" * 20, b"x" * 1200], 10, DataVerdict.TOO_MUCH),
        ([b"x" * 1200, b"a" * 20], 10, DataVerdict.TOO_LONG),
        # A line too long for aiosmtpd's line reader (over 1001 octets before its CRLF)
        # is refused before its octets are counted...
        ([b"x" * 1002], 500, DataVerdict.TOO_LONG),
        # ...a line that the reader returns whole (1002 or 1003 with its CRLF) is counted
        # first, so the size limit wins if that line crosses it.
        ([b"x" * 1000], 500, DataVerdict.TOO_MUCH),
        ([b"x" * 1001], 500, DataVerdict.TOO_MUCH),
        ([b"x" * 1001], 5000, DataVerdict.TOO_LONG),
        # 1001 octets with the CRLF: within aiosmtpd's reader, over RFC 5321's limit.
        ([b"x" * 999], 5000, DataVerdict.TOO_LONG),
        ([b"x" * 999], 500, DataVerdict.TOO_MUCH),
    ],
)
def test_which_limit_comes_first(
    lines: list[bytes], size_limit: int, verdict: DataVerdict, chunk: int
) -> None:
    stream = b"".join(line + b"\r\n" for line in lines) + b".\r\nNOOP\r\n"
    assert _read(stream, chunk, size_limit) == (verdict, b"", b"NOOP\r\n")


def test_nothing_is_kept_once_refused() -> None:
    reader = DataReader(100, LINE_LIMIT)
    assert not reader.feed(b"y" * 200 + b"\r\n")
    for _ in range(100):
        assert not reader.feed(b"z" * 998 + b"\r\n")
    assert len(reader._buf) <= 4  # only what could start the end marker
    assert reader.feed(b".\r\n")
    assert (reader.verdict, reader.content) == (DataVerdict.TOO_MUCH, b"")


def test_an_endless_line_is_refused_as_it_grows() -> None:
    reader = DataReader(None, LINE_LIMIT)
    # 1002 octets: with a CRLF still to come it is over the limit, but would be counted
    # towards the size limit first (aiosmtpd's order), so no verdict yet.
    assert not reader.feed(b"x" * (LINE_LIMIT + 2))
    assert reader.verdict is DataVerdict.NOMINAL
    assert not reader.feed(b"x")
    assert reader.verdict is DataVerdict.TOO_LONG
    assert len(reader._buf) <= 4


def test_receive_data_puts_back_what_followed_in_order() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        stream = asyncio.StreamReader(limit=LINE_LIMIT)
        stream.feed_data(b"..hi\r\n.\r\nNOOP\r\n")
        stream.feed_data(b"QUIT\r\n")
        data = await receive_data(stream, None, LINE_LIMIT)
        stream.feed_data(b"more\r\n")  # arrives after the leftover was put back
        return data.content, await stream.read(100)

    assert asyncio.run(scenario()) == (b".hi\r\n", b"NOOP\r\nQUIT\r\nmore\r\n")


def test_receive_data_raises_at_end_of_stream_before_the_end_of_data() -> None:
    async def scenario() -> None:
        stream = asyncio.StreamReader(limit=LINE_LIMIT)
        stream.feed_data(b"half a message\r\n")
        stream.feed_eof()
        await receive_data(stream, None, LINE_LIMIT)

    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(scenario())
