"""Inbound SMTP listeners: aiosmtpd protocol instances on the configured addresses."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from aiosmtpd.smtp import SMTP

from relay.config import Endpoint, ServerConfig
from relay.inbound.handler import RelayHandler

__all__ = ["start_listeners"]


async def start_listeners(
    handler: RelayHandler, cfg: ServerConfig, hostname: str
) -> list[asyncio.Server]:
    """Bind every listen address; raises OSError if one cannot be bound."""
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname=hostname,
            ident="dane-relay",
            data_size_limit=cfg.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=cfg.timeout,
        )

    servers = []
    for ep in cfg.listen:
        servers.append(await _bind(loop, factory, ep))
    return servers


async def _bind(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], SMTP], ep: Endpoint
) -> asyncio.Server:
    family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
    return await loop.create_server(
        factory,
        host=ep.host,
        port=ep.port,
        family=family,
        reuse_address=True,
    )
