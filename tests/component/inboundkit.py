"""The real inbound front end (aiosmtpd + RelayHandler + SpoolStore) in this process.

Owns:
- `Frontend`: listeners from `relay.inbound.server.start_listeners` on 127.0.0.1 port 0,
  a real spool in a temporary directory and the messages handed to `on_queued`.
- `RawClient`: an asyncio client that sends exactly the bytes it is given and reads whole
  SMTP replies (multi-line replies joined), each read with a deadline.

Guarantees: nothing sleeps to synchronise; every read has a timeout.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from relay.config import Endpoint, RelayConfig, ServerConfig
from relay.inbound.gateway import Gateway
from relay.inbound.handler import RelayHandler
from relay.inbound.server import AuthGate, Sessions, start_listeners
from relay.inbound.tls import TlsContextHolder
from relay.metrics import Metrics
from relay.spool.records import QueuedMessage
from relay.spool.store import SpoolStore

__all__ = ["Frontend", "RawClient", "Reply", "frontend", "insecure_client"]

READ_TIMEOUT = 10.0


class Reply(NamedTuple):
    code: int
    text: str


@dataclass
class Frontend:
    store: SpoolStore
    spool: Path
    metrics: Metrics
    host: str
    port: int
    handler: RelayHandler
    queued: list[QueuedMessage] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    def files(self, sub: str) -> list[str]:
        directory = self.spool / sub
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []

    def rejections(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "dane_relay_inbound_rejections_total", {"reason": reason}
        )
        return value or 0.0

    async def connect(self, source: str | None = None, port: int | None = None) -> RawClient:
        return await RawClient.open(self.host, port or self.port, source)


@asynccontextmanager
async def frontend(tmp_path: Path, **server: Any) -> Any:
    """A running front end; `server` overrides ServerConfig fields (listen is port 0).

    Also `relay_cfg` (a RelayConfig), `tls` (a TlsContextHolder), `auth` (an AuthGate,
    offered on the listeners with auth = true), `gateway` (a Gateway: gateway mode) and
    `clock` (the handler's time source, for the Received: date) and `sessions` (a Sessions,
    for the graceful stop).
    """
    relay_cfg = server.pop("relay_cfg", RelayConfig())
    tls: TlsContextHolder | None = server.pop("tls", None)
    auth: AuthGate | None = server.pop("auth", None)
    gateway: Gateway | None = server.pop("gateway", None)
    clock: Callable[[], float] = server.pop("clock", time.time)
    sessions: Sessions | None = server.pop("sessions", None)
    listen = server.pop("listen", (Endpoint("127.0.0.1", 0),))
    cfg = replace(ServerConfig(), listen=listen, **server)
    spool = tmp_path / "spool"
    store = SpoolStore(spool)
    store.open()
    metrics = Metrics()
    queued: list[QueuedMessage] = []
    handler = RelayHandler(
        store, cfg, relay_cfg, "relay.test", metrics, queued.append, gateway=gateway, clock=clock
    )
    servers = await start_listeners(handler, cfg, "relay.test", tls, auth, sessions)
    host, port = servers[0].sockets[0].getsockname()[:2]
    try:
        fe = Frontend(store, spool, metrics, host, port, handler, queued)
        fe.ports = [srv.sockets[0].getsockname()[1] for srv in servers]
        yield fe
    finally:
        for srv in servers:
            srv.close()
        store.close()


def insecure_client() -> ssl.SSLContext:
    """A client context that takes any certificate (the tests compare it themselves)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: Reply | None = None

    @classmethod
    async def open(cls, host: str, port: int, source: str | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection(
            host, port, local_addr=(source, 0) if source else None
        )
        client = cls(reader, writer)
        client.greeting = await client.reply()
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> Reply:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), READ_TIMEOUT)
            if not raw:
                raise ConnectionError(f"closed after {lines!r}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(int(line[:3]), "\n".join(lines))

    async def cmd(self, line: str | bytes) -> Reply:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def starttls(self, context: ssl.SSLContext | None = None) -> None:
        """STARTTLS (220 expected) and the handshake; by default no verification."""
        reply = await self.cmd("STARTTLS")
        assert reply.code == 220, reply
        await self.writer.start_tls(context or insecure_client(), server_hostname="relay.test")

    def peer_cert(self) -> bytes:
        ssl_object = self.writer.get_extra_info("ssl_object")
        assert ssl_object is not None
        der = ssl_object.getpeercert(binary_form=True)
        assert der is not None
        return bytes(der)

    def tls_version(self) -> str:
        ssl_object = self.writer.get_extra_info("ssl_object")
        return str(ssl_object.version())

    async def closed(self) -> bool:
        """True when the server closes the connection with nothing more to read."""
        data = await asyncio.wait_for(self.reader.read(), READ_TIMEOUT)
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass
