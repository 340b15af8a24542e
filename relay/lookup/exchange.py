"""Moving DNS messages to one resolver and back: UDP, then TCP when the answer is truncated.

Owns:
    ``exchange(wire, endpoint, budget)``: send one query (already in wire format) and return
    the raw response bytes. Reading what the bytes mean is ``relay.lookup.resolver``'s job.

Guarantees:
    * The query goes over a connected UDP socket (only the resolver's address can answer)
      and is retransmitted every ``UDP_RETRANSMIT`` seconds until a datagram with the
      query's ID arrives; datagrams with another ID are ignored.
    * A UDP response with TC set is retried over TCP (RFC 7766 §5, RFC 1035 §4.2.1).
    * Everything, TCP retry included, ends within `budget` seconds.
    * Failures raise ``DnsTempFail`` with kind "timeout", "network" (unreachable, refused,
      connection closed early) or "truncated" (TC set over TCP as well). Nothing else
      escapes: no ``OSError``, no ``TimeoutError``.

Does not:
    Parse messages beyond the ID and the TC bit, choose between resolvers, or use dnspython.
"""

from __future__ import annotations

import asyncio
import struct

from relay.config import Endpoint
from relay.errors import DnsTempFail

__all__ = ["UDP_RETRANSMIT", "exchange"]

#: Seconds between UDP retransmissions of an unanswered query to the same resolver.
UDP_RETRANSMIT = 1.0

_TC = 0x0200  # RFC 1035 §4.1.1: TrunCation bit in the header flags


class _UdpReply(asyncio.DatagramProtocol):
    """Collects the first datagram that carries the query's ID, or the socket's error."""

    def __init__(self, qid: bytes, reply: asyncio.Future[bytes]) -> None:
        self.qid = qid
        self.reply = reply

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        # The socket is connected, so only the resolver's address reaches us; the ID here and
        # the question (checked by the resolver after parsing) tie the datagram to the query.
        if data[:2] == self.qid and not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc or ConnectionError("UDP socket closed"))


async def _udp(wire: bytes, ep: Endpoint) -> bytes:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UdpReply(wire[:2], reply), remote_addr=(ep.host, ep.port)
    )
    try:
        while True:
            transport.sendto(wire)
            done, _ = await asyncio.wait({reply}, timeout=UDP_RETRANSMIT)
            if done:
                return reply.result()
    finally:
        if not reply.done():
            reply.cancel()
        transport.close()


async def _tcp(wire: bytes, ep: Endpoint) -> bytes:
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    try:
        writer.write(struct.pack("!H", len(wire)) + wire)
        await writer.drain()
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(length)
    finally:
        writer.close()


def _truncated(raw: bytes) -> bool:
    return len(raw) >= 4 and bool(struct.unpack_from("!H", raw, 2)[0] & _TC)


async def exchange(wire: bytes, ep: Endpoint, budget: float) -> bytes:
    """The raw response of the resolver at `ep` to the query `wire`.

    Raises:
        DnsTempFail: kind "timeout", "network" or "truncated" (see the module docstring).
    """
    try:
        async with asyncio.timeout(budget):
            raw = await _udp(wire, ep)
            if _truncated(raw):
                # RFC 7766 §5 / RFC 1035 §4.2.1: a truncated UDP answer is retried over TCP.
                raw = await _tcp(wire, ep)
                if _truncated(raw):
                    raise DnsTempFail("truncated over UDP and TCP", kind="truncated")
            return raw
    except TimeoutError as exc:
        raise DnsTempFail(f"timed out after {budget:.3g}s", kind="timeout") from exc
    except (OSError, EOFError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DnsTempFail(f"network error: {why or type(exc).__name__}", kind="network") from exc
