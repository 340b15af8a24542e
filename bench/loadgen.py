"""The benchmark's SMTP load generator: C persistent client connections, one process.

Each connection says EHLO once and then runs its share of transactions back to back
(MAIL, RCPT, DATA, the message, "."), without PIPELINING, so a transaction's submission
latency is the time from MAIL to the 250 after the final dot: what a client waits before
it may forget the message. Raw asyncio streams keep the generator's own cost small.

Every message carries `X-Bench-Id: <id>` so the sink can report its arrival.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

__all__ = ["Submission", "make_message", "submit_all"]

_LINE = b"x" * 76 + b"\r\n"


@dataclass(frozen=True, slots=True)
class Submission:
    bench_id: str
    started: float  # CLOCK_MONOTONIC, before MAIL FROM
    accepted: float  # CLOCK_MONOTONIC, when the 250 for the final dot arrived


def make_message(bench_id: str, size: int) -> bytes:
    """A message of about `size` bytes (headers included), dot-stuffing free, CRLF ended."""
    head = (
        f"From: bench@sender.example\r\nTo: rcpt@dane-ok.test\r\n"
        f"Subject: bench {bench_id}\r\nMessage-ID: <{bench_id}@bench.test>\r\n"
        f"X-Bench-Id: {bench_id}\r\n\r\n"
    ).encode()
    lines = max(1, (size - len(head)) // len(_LINE))
    return head + _LINE * lines


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    text = b""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        text += line
        if line[3:4] != b"-":
            return int(line[:3]), text


async def _expect(reader: asyncio.StreamReader, codes: tuple[int, ...], what: str) -> None:
    code, text = await _reply(reader)
    if code not in codes:
        raise RuntimeError(f"{what}: {text.decode(errors='replace').strip()}")


async def _client(
    host: str, port: int, ids: list[str], size: int, rcpt: str, out: list[Submission]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _expect(reader, (220,), "greeting")
        writer.write(b"EHLO loadgen.bench.test\r\n")
        await _expect(reader, (250,), "EHLO")
        for bench_id in ids:
            message = make_message(bench_id, size)
            started = time.monotonic()
            writer.write(b"MAIL FROM:<bench@sender.example>\r\n")
            await _expect(reader, (250,), "MAIL")
            writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
            await _expect(reader, (250, 251), "RCPT")
            writer.write(b"DATA\r\n")
            await _expect(reader, (354,), "DATA")
            writer.write(message + b".\r\n")
            await _expect(reader, (250,), "end of data")
            out.append(Submission(bench_id, started, time.monotonic()))
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _submit_all(
    host: str, port: int, ids: list[str], clients: int, size: int, rcpt: str
) -> list[Submission]:
    out: list[Submission] = []
    shares = [ids[i::clients] for i in range(clients)]
    await asyncio.gather(*(_client(host, port, s, size, rcpt, out) for s in shares if s))
    return out


def submit_all(
    host: str, port: int, ids: list[str], *, clients: int, size: int, rcpt: str
) -> list[Submission]:
    """Submit one message per id over `clients` connections; every one must get 250.

    Raises:
        RuntimeError: a command was refused (the reply is in the message).
        ConnectionError, OSError: a connection failed.
    """
    return asyncio.run(_submit_all(host, port, ids, clients, size, rcpt))
