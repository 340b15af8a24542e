"""The one adapter that reaches the peer's certificate chain (relay.delivery.transport.
peer_chain) on both event loops the relay runs on: the stdlib loop and uvloop.

DANE-TA needs the chain exactly as the server sent it; on Python < 3.13 it comes from
the private `_sslobj` (STYLE.md project decision), so both loops are checked here over a
real TLS connection on loopback.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop
from lab.certs import make_ca

from relay.delivery.tls import client_context
from relay.delivery.transport import peer_chain

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "stdlib": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_peer_chain_is_the_chain_the_server_sent(loop_name: str, tmp_path: Path) -> None:
    root = make_ca("Chain Test Root")
    issuing = root.issue_intermediate("Chain Test Issuing CA")
    leaf = issuing.issue(["mx.chain.test"])
    chain_path, key_path = leaf.write(tmp_path, "mx")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(chain_path, key_path)

    async def scenario() -> list[bytes]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            _reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(), server_hostname="mx.chain.test"
            )
            chain = peer_chain(writer.get_extra_info("ssl_object"))
            writer.write(b"x")
            writer.close()
            return chain
        finally:
            server.close()
            await server.wait_closed()

    loop = LOOPS[loop_name]()
    try:
        chain = loop.run_until_complete(asyncio.wait_for(scenario(), 10))
    finally:
        loop.close()
    # Leaf first, then the issuers the server was configured to send, byte for byte.
    assert chain == list(leaf.chain_der)
    assert len(chain) >= 2
