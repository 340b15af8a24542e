"""The benchmark's receiving sink: an SMTP server with STARTTLS on one lab MX address.

Run as its own process (`python bench/sink.py ADDR PORT CHAIN KEY NAME`) so that it does
not share the load generator's interpreter. It accepts every transaction and prints one
line per message on stdout, flushed at once:

    ARRIVED <bench id> <CLOCK_MONOTONIC seconds> <tls 0|1>

CLOCK_MONOTONIC is one clock for every process on the machine, so the load generator can
subtract its own submission times from these. A message without an `X-Bench-Id:` header
is reported with the id `-`. "READY" is printed once the listener is up.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import sys
import time
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

_ID_HEADER = b"\nX-Bench-Id: "


class _Handler:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.monotonic()
        content: bytes = envelope.original_content or b""
        start = content.find(_ID_HEADER)
        bench_id = "-"
        if start >= 0:
            start += len(_ID_HEADER)
            end = content.find(b"\r", start)
            bench_id = content[start:end].decode("ascii", "replace")
        tls = 1 if session.ssl is not None else 0
        sys.stdout.write(f"ARRIVED {bench_id} {now:.6f} {tls}\n")
        sys.stdout.flush()
        return "250 2.0.0 OK received by bench sink"


def main(argv: list[str]) -> int:
    addr, port, chain, key, name = argv
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(chain, key)
    kwargs: dict[str, Any] = {"tls_context": ctx, "require_starttls": False}
    controller = Controller(
        _Handler(), hostname=addr, port=int(port), server_hostname=name, **kwargs
    )
    controller.start()
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(stop.wait())
    finally:
        controller.stop()
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
