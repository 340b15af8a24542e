"""CPU per message of the inbound SMTP protocol layer alone: aiosmtpd's readers or the relay's.

An aiosmtpd server runs in this process on uvloop with a handler that answers 250 at
once (no spool, no delivery). A client in a child process sends N messages of about
10 KB over C connections (EHLO once, then MAIL, RCPT, DATA per message, no PIPELINING,
the same dialogue as bench/loadgen.py). Printed: this process's user and system CPU per
message (getrusage, the client's excluded). Variants:

  library   aiosmtpd's SMTP as shipped (line-by-line DATA, email-parser paths)
  data      plus the relay's chunked DATA reader (LimitedSMTP.smtp_DATA)
  relay     plus the relay's fast path parse (LimitedSMTP._getaddr): what the relay runs

Run the variants in turn, several times, and compare medians: the machine is shared.

Usage: .venv/bin/python bench/inbound_cpu.py VARIANT [--messages N] [--clients C]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
from pathlib import Path
from typing import Any

import uvloop
from aiosmtpd.smtp import SMTP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.inbound.server import LimitedSMTP  # noqa: E402


class _Accept:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 Ok: queued"


class _Data(SMTP):
    smtp_DATA = LimitedSMTP.smtp_DATA
    _end_data = LimitedSMTP._end_data


class _Relay(_Data):
    _getaddr = LimitedSMTP._getaddr


VARIANTS: dict[str, type[SMTP]] = {"library": SMTP, "data": _Data, "relay": _Relay}

_CLIENT = r"""
import asyncio, sys
n, c, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
line = b"Line %04d of the benchmark message, some text to fill it up to 76 ch.\r\n"
body = b"".join(line % i for i in range(140))[:10240]
body = body[: body.rfind(b"\r\n") + 2]

async def session(count):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    async def reply():
        while True:
            got = await r.readline()
            if got[3:4] != b"-":
                return got
    await reply()
    w.write(b"EHLO client.test\r\n")
    await reply()
    for _ in range(count):
        for cmd in (b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n", b"DATA\r\n"):
            w.write(cmd)
            await reply()
        w.write(body + b".\r\n")
        if not (await reply()).startswith(b"250"):
            raise SystemExit("message refused")
    w.write(b"QUIT\r\n")
    await reply()
    w.close()

async def main():
    await asyncio.gather(*(session(n // c) for _ in range(c)))

asyncio.run(main())
"""


async def _measure(variant: type[SMTP], messages: int, clients: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: variant(_Accept(), hostname="bench", decode_data=False, data_size_limit=1 << 24),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    before = resource.getrusage(resource.RUSAGE_SELF)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENT, str(messages), str(clients), str(port)
    )
    if await child.wait() != 0:
        raise SystemExit("the client failed")
    after = resource.getrusage(resource.RUSAGE_SELF)
    server.close()
    sent = messages // clients * clients
    return (
        (after.ru_utime - before.ru_utime) / sent * 1000,
        (after.ru_stime - before.ru_stime) / sent * 1000,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant", choices=sorted(VARIANTS))
    ap.add_argument("--messages", "-n", type=int, default=4000)
    ap.add_argument("--clients", "-c", type=int, default=8)
    args = ap.parse_args()
    user, system = uvloop.run(_measure(VARIANTS[args.variant], args.messages, args.clients))
    print(
        f"{args.variant}: server cpu {user + system:.3f} ms/msg "
        f"(user {user:.3f}, system {system:.3f}) over {args.messages} messages"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
