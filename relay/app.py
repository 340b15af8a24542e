"""Composition root: builds every component from the Config and runs them.

Start order: spool (lock + recovery) -> resolver validation probe -> metrics ->
delivery -> runner -> listeners. Stop order (SIGTERM/SIGINT): listeners close, running
deliveries get a grace period, then the spool lock is released. Nothing here decides
delivery policy.

Resolver trust (RFC 7672 §2.1): the relay reads DNSSEC status from the AD bit, which
means something only if the resolver validates. Before anything is delivered, and then
every `dns.validation_interval`, `ResolverWatch` asks for the probe name
(`dns.validation_probe_name`/`_type`, by default the root DNSKEY), which must come back
secure. While it does not, the shared `ResolverStatus` says so: the engine then treats
every answer as insecure (dane -> opportunistic TLS, dane-only -> deferred), the gauge
`relay_resolver_validating` is 0 and /readyz answers 503. With
`dns.require_validating_resolver = true` a failed start-up probe stops the relay instead
(`ResolverNotValidating`, exit 69 from relay.cli).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence

from relay.config import Config, DnsConfig
from relay.delivery.engine import DeliveryEngine, EngineSettings
from relay.delivery.tls import client_context
from relay.delivery.transport import SmtpTransport
from relay.inbound.handler import RelayHandler
from relay.inbound.server import start_listeners
from relay.lookup.resolver import DnsResolver
from relay.lookup.results import ProbeResult, ResolverStatus
from relay.metrics import Metrics, MetricsServer
from relay.spool.records import QueuedMessage
from relay.spool.runner import QueueRunner
from relay.spool.store import SpoolStore

__all__ = ["ResolverNotValidating", "ResolverWatch", "serve", "system_hostname"]

log = logging.getLogger("relay")

RESOLVER_FIX = (
    "run a validating resolver such as unbound with the root trust anchor on 127.0.0.1 "
    "(see deploy/unbound/unbound.conf) and list it in dns.resolvers"
)


class ResolverNotValidating(Exception):
    """The start-up probe failed and dns.require_validating_resolver is true."""


def system_hostname() -> str:
    return socket.getfqdn() or socket.gethostname() or "localhost"


def describe_resolvers(cfg: DnsConfig) -> str:
    return ",".join(str(ep) for ep in cfg.resolvers)


class ResolverWatch:
    """Keeps `status` and the `relay_resolver_validating` gauge in step with the probe.

    `check()` runs the probe once and logs only changes: the first failure (and each
    new one after a recovery) as one WARNING line that names the resolver and the fix,
    a recovery as one INFO line. On every change after the first check it calls
    `on_change` (the app empties the answer cache: an answer cached while the resolver
    did not validate says "insecure" for data that may be secure, which would keep DANE
    off after a recovery until its TTL ran out). `run()` repeats `check()` every
    `interval` seconds until cancelled.
    """

    def __init__(
        self,
        probe: Callable[[], Awaitable[ProbeResult]],
        status: ResolverStatus,
        metrics: Metrics,
        resolvers: str,
        interval: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._probe = probe
        self._on_change = on_change
        self.status = status
        self._metrics = metrics
        self._resolvers = resolvers
        self._interval = interval
        self._sleep = sleep
        self._checked = False

    async def check(self, *, announce_failure: bool = True) -> ProbeResult:
        """Run the probe once and update the status, the gauge and the log.

        `announce_failure=False` leaves a first failure unlogged, for a caller that
        reports it itself (the start-up check that refuses to start).
        """
        try:
            result = await self._probe()
        except Exception as exc:
            # Fail closed: a probe that cannot run proves nothing about validation.
            log.exception("resolver=%s validation probe raised", self._resolvers)
            result = ProbeResult(False, f"probe error: {type(exc).__name__}: {exc}")
        was_validating = self.status.validating and self._checked
        first = not self._checked
        self._checked = True
        self.status.validating = result.ok
        self.status.detail = result.detail
        self._metrics.resolver_validating.set(1 if result.ok else 0)
        if not first and result.ok != was_validating:
            self._on_change()
        if result.ok:
            if first:
                log.info("resolver=%s validates DNSSEC (%s)", self._resolvers, result.detail)
            elif not was_validating:
                log.info(
                    "resolver=%s validates DNSSEC again (%s); DANE is back on",
                    self._resolvers,
                    result.detail,
                )
        elif (first and announce_failure) or was_validating:
            log.warning(
                "resolver=%s does not validate DNSSEC (%s): DANE is off, level dane delivers "
                "with opportunistic TLS and dane-only mail is deferred; fix: %s",
                self._resolvers,
                result.detail,
                RESOLVER_FIX,
            )
        else:
            log.debug("resolver=%s still not validating (%s)", self._resolvers, result.detail)
        return result

    async def run(self) -> None:
        while True:
            await self._sleep(self._interval)
            await self.check()

    def readiness(self) -> Sequence[str]:
        """For MetricsServer: why the relay is not ready (empty when it is)."""
        if self.status.validating:
            return ()
        return (f"resolver does not validate DNSSEC ({self.status.detail})",)


async def serve(cfg: Config) -> None:
    """Run the relay until SIGTERM or SIGINT.

    Raises:
        SpoolError: the spool cannot be created, locked or recovered.
        ResolverNotValidating: the resolver failed the validation probe at start-up and
            dns.require_validating_resolver is true.
        OSError: a listen address cannot be bound.
    """
    hostname = cfg.server.hostname or system_hostname()
    store = SpoolStore(cfg.spool.directory)
    store.open()
    try:
        messages = store.recover()
        metrics = Metrics()
        resolver = DnsResolver(cfg.dns, observer=metrics)
        resolvers = describe_resolvers(cfg.dns)
        watch = ResolverWatch(
            resolver.probe_validation,
            ResolverStatus(),
            metrics,
            resolvers,
            cfg.dns.validation_interval,
            # Answers cached under the other regime carry the wrong security status.
            on_change=resolver.cache.clear,
        )
        # RFC 7672 §2.1: DNSSEC status is only as good as the resolver's validation;
        # find out before the first delivery.
        required = cfg.dns.require_validating_resolver
        probe = await watch.check(announce_failure=not required)
        if not probe.ok and required:
            raise ResolverNotValidating(
                f"resolver {resolvers} does not validate DNSSEC ({probe.detail}) and "
                f"dns.require_validating_resolver is true; not starting. Fix: {RESOLVER_FIX}"
            )
        async with contextlib.AsyncExitStack() as stack:
            if cfg.metrics.listen is not None:
                metrics_server = MetricsServer(
                    metrics, cfg.metrics.listen.host, cfg.metrics.listen.port, watch.readiness
                )
                metrics_server.start()
                stack.callback(metrics_server.stop)
            await _run(cfg, hostname, store, messages, metrics, resolver, watch)
    finally:
        store.close()


async def _run(
    cfg: Config,
    hostname: str,
    store: SpoolStore,
    messages: list[QueuedMessage],
    metrics: Metrics,
    resolver: DnsResolver,
    watch: ResolverWatch,
) -> None:
    engine = DeliveryEngine(
        resolver=resolver,
        transport=SmtpTransport(
            hostname, cfg.delivery.connect_timeout, cfg.delivery.command_timeout
        ),
        tls_context=client_context(),
        settings=EngineSettings(
            level=cfg.tls.level,
            helo_name=hostname,
            port=cfg.delivery.port,
            insecure_mx_policy=cfg.tls.insecure_mx_policy,
        ),
        metrics=metrics,
        resolver_status=watch.status,
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
    watch_task = asyncio.create_task(watch.run(), name="resolver-watch")
    log.info(
        "started listen=%s spool=%s queued=%d tls_level=%s resolvers=%s "
        "resolver_validating=%s metrics=%s",
        ",".join(str(ep) for ep in cfg.server.listen),
        cfg.spool.directory,
        len(messages),
        cfg.tls.level,
        describe_resolvers(cfg.dns),
        "yes" if watch.status.validating else "no",
        cfg.metrics.listen or "off",
    )
    await stop.wait()
    log.info("stopping")
    for server in servers:
        server.close()
    watch_task.cancel()
    await runner.stop()
    runner_task.cancel()
    await asyncio.gather(runner_task, watch_task, return_exceptions=True)
    log.info("stopped")
