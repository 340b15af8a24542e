"""Composition root: builds every component from the Config and runs them.

Start order: spool (lock + recovery) -> metrics -> delivery -> runner -> listeners.
Stop order (SIGTERM/SIGINT): listeners close, running deliveries get a grace
period, then the spool lock is released. Nothing here decides policy.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from relay.config import Config
from relay.delivery.engine import DeliveryEngine, EngineSettings
from relay.delivery.tls import client_context
from relay.delivery.transport import SmtpTransport
from relay.inbound.handler import RelayHandler
from relay.inbound.server import start_listeners
from relay.lookup.resolver import DnsResolver
from relay.metrics import Metrics, MetricsServer
from relay.spool.runner import QueueRunner
from relay.spool.store import SpoolStore

__all__ = ["serve", "system_hostname"]

log = logging.getLogger("relay")


def system_hostname() -> str:
    return socket.getfqdn() or socket.gethostname() or "localhost"


async def serve(cfg: Config) -> None:
    """Run the relay until SIGTERM or SIGINT.

    Raises:
        SpoolError: the spool cannot be created, locked or recovered.
        OSError: a listen address cannot be bound.
    """
    hostname = cfg.server.hostname or system_hostname()
    store = SpoolStore(cfg.spool.directory)
    store.open()
    try:
        messages = store.recover()
        metrics = Metrics()
        metrics_server = None
        if cfg.metrics.listen is not None:
            metrics_server = MetricsServer(
                metrics, cfg.metrics.listen.host, cfg.metrics.listen.port
            )
            metrics_server.start()

        engine = DeliveryEngine(
            resolver=DnsResolver(cfg.dns),
            transport=SmtpTransport(
                hostname, cfg.delivery.connect_timeout, cfg.delivery.command_timeout
            ),
            tls_context=client_context(),
            settings=EngineSettings(
                level=cfg.tls.level, helo_name=hostname, port=cfg.delivery.port
            ),
            metrics=metrics,
        )
        runner = QueueRunner(store, engine, cfg.delivery, metrics, hostname)
        runner.load(messages)
        handler = RelayHandler(store, cfg.server, cfg.relay, hostname, metrics, runner.submit)
        servers = await start_listeners(handler, cfg.server, hostname)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner_task = asyncio.create_task(runner.run(), name="queue-runner")
        log.info(
            "started listen=%s spool=%s queued=%d tls_level=%s resolvers=%s metrics=%s",
            ",".join(str(ep) for ep in cfg.server.listen),
            cfg.spool.directory,
            len(messages),
            cfg.tls.level,
            ",".join(str(ep) for ep in cfg.dns.resolvers),
            cfg.metrics.listen or "off",
        )
        await stop.wait()
        log.info("stopping")
        for server in servers:
            server.close()
        await runner.stop()
        runner_task.cancel()
        await asyncio.gather(runner_task, return_exceptions=True)
        if metrics_server is not None:
            metrics_server.stop()
        log.info("stopped")
    finally:
        store.close()
