"""Composition root: builds every component from the Config and runs them.

Start order: spool (lock + recovery) -> resolver validation probe -> metrics ->
delivery -> runner -> listeners. Stop order (SIGTERM/SIGINT): the listening sockets close
at once and idle SMTP sessions get 421 (relay.inbound.server.Sessions); sessions in a
transaction and running deliveries then share one `server.shutdown_grace`, after which
the sessions left get 421 and the deliveries left are cancelled (their messages stay
queued); the cached outbound connections are closed, then the spool lock is released.
SIGHUP reads the configuration file again (relay.reload.Reloader: what applies at once,
what needs a restart, and a broken file refused with the running one kept) and the
STARTTLS certificate and key; no connection is dropped. Nothing here decides delivery
policy.

Resolver trust (RFC 7672 §2.1): the relay reads DNSSEC status from the AD bit, which
means something only if the resolver validates. Before anything is delivered, and then
every `dns.validation_interval`, `ResolverWatch` asks for the probe name
(`dns.validation_probe_name`/`_type`, by default the root DNSKEY), which must come back
secure. When a resolver answers without AD, the shared `ResolverStatus` says so: the
engine then treats every answer as insecure (dane -> opportunistic TLS, dane-only ->
deferred), the gauge `dane_relay_resolver_validating` is 0 and /readyz answers 503. When no
resolver answers the probe at all (timeout, SERVFAIL, unreachable), nothing is proven:
the last known state is kept (validating until shown otherwise, so lookups that fail
defer and nothing is downgraded), /readyz answers 503 "resolver not answering" and the
probe is repeated after `PROBE_RETRY_INTERVAL`. With `dns.require_validating_resolver =
true` the relay stops instead (`ResolverNotValidating`, exit 69 from relay.cli) when the
start-up probe shows a non-validating resolver, or when the resolver has not answered
after `STARTUP_PROBES` probes `dns.timeout` apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import MappingProxyType

from relay.config import Config, DeliveryConfig, DnsConfig
from relay.control import ControlServer
from relay.delivery.client import Phase
from relay.delivery.engine import DeliveryEngine, EngineSettings
from relay.delivery.policymap import PolicyMap
from relay.delivery.route import Myself
from relay.delivery.tls import client_context, pkix_context
from relay.delivery.transport import SmtpTransport
from relay.errors import ConfigError
from relay.inbound.auth import Credentials, CredentialsError, FailureLimiter
from relay.inbound.gateway import Gateway, load_gateway
from relay.inbound.handler import RelayHandler
from relay.inbound.server import AuthGate, Sessions, start_listeners
from relay.inbound.tls import TlsContextHolder, TlsFileError
from relay.lookup.resolver import DnsResolver
from relay.lookup.results import ProbeResult, ResolverStatus
from relay.metrics import LoopHeartbeat, Metrics, MetricsServer
from relay.reload import Reloader
from relay.spool.records import QueuedMessage
from relay.spool.runner import QueueRunner
from relay.spool.store import SpoolStore

__all__ = [
    "STARTUP_SIGHUP_WARNING",
    "ResolverNotValidating",
    "ResolverWatch",
    "inbound_auth",
    "inbound_tls",
    "serve",
    "spool_readiness",
    "plausible_public_name",
    "system_hostname",
]

log = logging.getLogger("relay")

RESOLVER_FIX = (
    "run a validating resolver such as unbound with the root trust anchor on 127.0.0.1 "
    "(see deploy/unbound/unbound.conf) and list it in dns.resolvers"
)


#: Logged for a SIGHUP that arrives before the reload handler is installed.
STARTUP_SIGHUP_WARNING = "SIGHUP during start-up ignored; send it again once started"
#: Seconds before an inconclusive probe is repeated (capped at dns.validation_interval).
PROBE_RETRY_INTERVAL = 30.0
#: Probes made at start-up, dns.timeout apart, while the resolver does not answer and
#: dns.require_validating_resolver is true.
STARTUP_PROBES = 3


class ResolverNotValidating(Exception):
    """The start-up probe failed and dns.require_validating_resolver is true: the resolver
    does not validate, or did not answer within STARTUP_PROBES × dns.timeout."""


def system_hostname() -> str:
    return socket.getfqdn() or socket.gethostname() or "localhost"


def plausible_public_name(name: str) -> bool:
    """False for a name no other mail server can know this relay by: one label, or
    localhost / localhost.localdomain (what getfqdn gives when /etc/hosts maps it so)."""
    lowered = name.lower().rstrip(".")
    return "." in lowered and lowered.split(".")[0] != "localhost"


def describe_resolvers(cfg: DnsConfig) -> str:
    return ",".join(str(ep) for ep in cfg.resolvers)


class ResolverWatch:
    """Keeps `status` and the `dane_relay_resolver_validating` gauge in step with the probe.

    Theory of operation (RFC 7672 §2.1: a failure is never "insecure"):

    * A conclusive probe (some resolver answered) sets `status.validating` to its verdict
      and `status.answering` to True. Logged on change only: the first failure (and each
      new one after a recovery) as one WARNING line that names the resolver and the fix,
      a recovery as one INFO line. On every change of `validating` after the first check
      it calls `on_change` (the app empties the answer cache: an answer cached while the
      resolver did not validate says "insecure" for data that may be secure, which would
      keep DANE off after a recovery until its TTL ran out).
    * An inconclusive probe (no resolver answered: timeout, SERVFAIL, REFUSED, unreachable,
      or the probe raised) proves nothing about validation: `validating` keeps its last
      known value (True before any conclusive probe: answers with AD count and lookups that
      fail defer, so nothing is downgraded), `answering` goes False and readiness reports
      it. The first such probe in a row logs one WARNING saying the resolver could not be
      checked; `run()` then retries after `retry_interval` instead of `interval`.
    * The gauge follows `status.validating`, what the delivery engine acts on.
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._on_change = on_change
        self.status = status
        self._metrics = metrics
        self._resolvers = resolvers
        self._interval = interval
        self.retry_interval = min(PROBE_RETRY_INTERVAL, interval)
        self._sleep = sleep
        self._clock = clock
        self._checked = False  # any probe has run
        self._known = False  # a conclusive probe has run

    async def check(self, *, announce_failure: bool = True) -> ProbeResult:
        """Run the probe once and update the status, the gauge and the log.

        `announce_failure=False` leaves a failed or inconclusive check unlogged, for a
        caller that reports it itself (the start-up check that may refuse to start).
        """
        try:
            result = await self._probe()
        except Exception as exc:
            # A probe that cannot run proves nothing about validation (RFC 7672 §2.1).
            log.exception("resolver=%s validation probe raised", self._resolvers)
            result = ProbeResult(
                False, f"probe error: {type(exc).__name__}: {exc}", conclusive=False
            )
        first = not self._checked
        self._checked = True
        if result.conclusive:
            self._conclusive(result, first=first, announce_failure=announce_failure)
        else:
            self._inconclusive(result, announce_failure=announce_failure)
        self._metrics.resolver_validating.set(1 if self.status.validating else 0)
        return result

    def _conclusive(self, result: ProbeResult, *, first: bool, announce_failure: bool) -> None:
        was_validating, was_known = self.status.validating, self._known
        was_answering = self.status.answering
        self._known = True
        self.status.validating = result.ok
        self.status.detail = result.detail
        self.status.answering, self.status.failure = True, ""
        if not first and result.ok != was_validating:
            self._on_change()
        if result.ok:
            if not was_known:
                log.info("resolver=%s validates DNSSEC (%s)", self._resolvers, result.detail)
            elif not was_validating:
                log.info(
                    "resolver=%s validates DNSSEC again (%s); DANE is back on",
                    self._resolvers,
                    result.detail,
                )
            elif not was_answering:
                log.info(
                    "resolver=%s answers again and validates DNSSEC (%s)",
                    self._resolvers,
                    result.detail,
                )
        elif was_validating and announce_failure:
            log.warning(
                "resolver=%s does not validate DNSSEC (%s): DANE is off, level dane delivers "
                "with opportunistic TLS and dane-only mail is deferred; fix: %s",
                self._resolvers,
                result.detail,
                RESOLVER_FIX,
            )
        else:
            log.debug("resolver=%s still not validating (%s)", self._resolvers, result.detail)

    def _inconclusive(self, result: ProbeResult, *, announce_failure: bool) -> None:
        was_answering = self.status.answering
        self.status.answering, self.status.failure = False, result.detail
        if not was_answering or not announce_failure:
            log.debug("resolver=%s still not answering (%s)", self._resolvers, result.detail)
            return
        if not self._known:
            state = "validation unknown: DANE stays on, lookups that fail defer"
        elif self.status.validating:
            state = "last known to validate: DANE stays on, lookups that fail defer"
        else:
            state = "last known not to validate: DANE stays off"
        log.warning(
            "resolver=%s could not be checked (%s): %s; retrying in %gs",
            self._resolvers,
            result.detail,
            state,
            self.retry_interval,
        )

    async def start(self, *, required: bool, patience: float) -> ProbeResult:
        """The start-up check: one probe, repeated while inconclusive when `required`.

        With `required`, up to STARTUP_PROBES probes, the n-th starting no earlier than
        n × `patience` after the first (the relay may start before its resolver at boot);
        each probe takes at most `patience` (dns.timeout), so this ends within
        STARTUP_PROBES × `patience`. Failures are left for the caller to report.
        """
        started = self._clock()
        result = await self.check(announce_failure=not required)
        for attempt in range(1, STARTUP_PROBES if required else 1):
            if result.conclusive:
                break
            pause = max(0.0, started + attempt * patience - self._clock())
            log.info(
                "resolver=%s did not answer the validation probe (%s); probe %d of %d in %.3gs",
                self._resolvers,
                result.detail,
                attempt + 1,
                STARTUP_PROBES,
                pause,
            )
            await self._sleep(pause)
            result = await self.check(announce_failure=False)
        return result

    @property
    def state(self) -> str:
        """For the start-up line: "yes", "no", or "unknown" before a conclusive probe."""
        if not self._known:
            return "unknown"
        return "yes" if self.status.validating else "no"

    async def run(self) -> None:
        while True:
            await self._sleep(self._interval if self.status.answering else self.retry_interval)
            await self.check()

    def readiness(self) -> Sequence[str]:
        """For MetricsServer: why the relay is not ready (empty when it is)."""
        problems: list[str] = []
        if not self.status.answering:
            problems.append(f"resolver not answering: {self.status.failure}")
        if not self.status.validating:
            problems.append(f"resolver does not validate DNSSEC ({self.status.detail})")
        return tuple(problems)


async def serve(cfg: Config) -> None:
    """Run the relay until SIGTERM or SIGINT.

    Raises:
        SpoolError: the spool cannot be created, locked or recovered.
        ResolverNotValidating: the resolver failed the validation probe at start-up and
            dns.require_validating_resolver is true.
        OSError: a listen address cannot be bound.
        ConfigError: tls.ca_file cannot be read as PEM CA certificates.
    """
    # SIGHUP's default action ends the process: until the reload handler is installed
    # (after the resolver check, which may take dns.timeout x STARTUP_PROBES), ignore it.
    # (relay.cli installs the same before loading the configuration, for the time before.)
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGHUP, log.warning, STARTUP_SIGHUP_WARNING
    )
    hostname = cfg.server.hostname or system_hostname()
    pkix = _pkix_context(cfg)  # before the spool: a bad CA file refuses to start
    tls = inbound_tls(cfg)  # likewise a bad STARTTLS certificate or key
    auth = inbound_auth(cfg)  # and an unreadable or malformed credentials file
    gateway = load_gateway(cfg)  # and gateway.recipients_file
    # Warnings only once the files are known good (a refused start shows just its error).
    if not cfg.server.hostname and not plausible_public_name(hostname):
        log.warning(
            "hostname=%s comes from the machine and is not a public name: set server.hostname "
            "to the name this relay is known by (greeting, EHLO, Received:, mail-loop check)",
            hostname,
        )
    if not cfg.server.postmaster and not cfg.gateway.enabled:
        # RFC 5321 §4.5.1: a server MUST accept mail for postmaster; nobody is named.
        log.warning(
            "server.postmaster is not set and there is no [gateway]: the relay cannot accept "
            "postmaster mail (RFC 5321 section 4.5.1); RCPT TO:<postmaster> and "
            "postmaster@%s get 550 5.1.1 until server.postmaster is set",
            hostname,
        )
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
        probe = await watch.start(required=required, patience=cfg.dns.timeout)
        if required and not probe.ok:
            raise ResolverNotValidating(_refusal(resolvers, probe, cfg.dns.timeout))
        async with contextlib.AsyncExitStack() as stack:
            if cfg.metrics.listen is not None:
                heartbeat = LoopHeartbeat()
                beat = asyncio.create_task(heartbeat.run(), name="loop-heartbeat")
                stack.callback(beat.cancel)
                metrics_server = MetricsServer(
                    metrics,
                    cfg.metrics.listen.host,
                    cfg.metrics.listen.port,
                    lambda: (*spool_readiness(store.tmp), *watch.readiness()),
                    heartbeat.problems,
                )
                metrics_server.start()
                stack.callback(metrics_server.stop)
            await _run(
                cfg, hostname, store, messages, metrics, resolver, watch, pkix, tls, auth, gateway
            )
    finally:
        store.close()


def spool_readiness(tmp: Path) -> Sequence[str]:
    """For /readyz: a problem when a file cannot be created, written and removed in the
    spool's `tmp` directory, where every commit starts (read-only file system, full disk,
    permissions, a missing directory). A probe file left by a crash is removed by the
    recovery scan at the next start, like any other file in `tmp`."""
    probe = tmp / f"readyz.{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        return (f"spool not writable: {tmp}: {exc.strerror or exc}",)
    return ()


def inbound_tls(cfg: Config) -> TlsContextHolder | None:
    """The STARTTLS context of the listeners, None when server.tls_cert_file is unset.

    Raises:
        ConfigError: the certificate or key cannot be loaded or do not match (names the
            file and the key).
    """
    if cfg.server.tls_cert_file is None or cfg.server.tls_key_file is None:
        return None
    try:
        return TlsContextHolder(cfg.server.tls_cert_file, cfg.server.tls_key_file)
    except TlsFileError as exc:
        raise ConfigError(
            f"{cfg.path}: server.{exc.key}: {exc.why}, got {str(exc.path)!r}"
        ) from exc


def inbound_auth(cfg: Config) -> AuthGate | None:
    """The AUTH credentials and failure limit, None when server.auth_file is unset.

    Raises:
        ConfigError: the file cannot be read or has a malformed line (named).
    """
    if cfg.server.auth_file is None:
        return None
    try:
        credentials = Credentials(cfg.server.auth_file)
    except OSError as exc:
        raise ConfigError(
            f"{cfg.path}: server.auth_file: expected a readable credentials file, "
            f"got {str(cfg.server.auth_file)!r} ({exc.strerror or exc})"
        ) from exc
    except (CredentialsError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{cfg.path}: server.auth_file: expected lines user:scrypt$N$r$p$SALT$KEY "
            f"(dane-relay passwd), got {exc}"
        ) from exc
    limiter = FailureLimiter(cfg.server.auth_failure_limit, cfg.server.auth_failure_window)
    return AuthGate(credentials, limiter)


def _pkix_context(cfg: Config) -> ssl.SSLContext:
    """The trust store of the levels verify/secure (Postfix smtp_tls_CAfile)."""
    try:
        return pkix_context(cfg.tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{cfg.path}: tls.ca_file: expected a readable PEM file of CA certificates, "
            f"got {str(cfg.tls.ca_file)!r} ({exc})"
        ) from exc


def _refusal(resolvers: str, probe: ProbeResult, timeout: float) -> str:
    """The exit-69 message for a failed start-up check with require_validating_resolver."""
    if probe.conclusive:
        return (
            f"resolver {resolvers} does not validate DNSSEC ({probe.detail}) and "
            f"dns.require_validating_resolver is true; not starting. Fix: {RESOLVER_FIX}"
        )
    return (
        f"resolver {resolvers} did not answer the validation probe "
        f"({STARTUP_PROBES} probes in {STARTUP_PROBES * timeout:g}s; last: {probe.detail}) and "
        "dns.require_validating_resolver is true, so whether it validates DNSSEC is unknown; "
        f"not starting. Fix: check that the resolver is running and reachable; {RESOLVER_FIX}"
    )


def delivery_timeouts(cfg: DeliveryConfig) -> Mapping[Phase, float]:
    """Reply timeout per phase: `command_timeout` for every phase, then the RFC 5321
    §4.5.3.2 ones (`mail_timeout`, `rcpt_timeout`, `data_init_timeout`,
    `data_block_timeout`, `data_done_timeout`)."""
    return MappingProxyType(
        {
            **dict.fromkeys(Phase, cfg.command_timeout),
            Phase.MAIL: cfg.mail_timeout,
            Phase.RCPT: cfg.rcpt_timeout,
            Phase.DATA: cfg.data_init_timeout,
            Phase.DATA_BLOCK: cfg.data_block_timeout,
            Phase.DATA_END: cfg.data_done_timeout,
        }
    )


def engine_settings(
    cfg: Config, hostname: str, timeouts: Mapping[Phase, float] | None = None
) -> EngineSettings:
    """The delivery engine's settings from the configuration."""
    return EngineSettings(
        level=cfg.tls.level,
        helo_name=hostname,
        port=cfg.delivery.port,
        insecure_mx_policy=cfg.tls.insecure_mx_policy,
        # Postfix: an MX that is this relay itself is a mail loop (5.4.6), never a hop.
        myself=partial(Myself.of, hostname, cfg.server.listen),
        policy=PolicyMap.from_config(cfg.tls, cfg.delivery),
        mx_host_limit=cfg.delivery.mx_host_limit,
        mx_address_limit=cfg.delivery.mx_address_limit,
        address_preference=cfg.delivery.address_preference,
        destination_concurrency=cfg.delivery.destination_concurrency,
        connection_cache_time=cfg.delivery.connection_cache_time,
        connection_reuse_time=cfg.delivery.connection_reuse_time,
        connection_reuse_limit=cfg.delivery.connection_reuse_limit,
        # At most min_backoff: a message's own retry (never sooner) is not suspended by the
        # failure that deferred it (Postfix: dead for minimal_backoff_time).
        dead_destination_time=min(cfg.delivery.dead_destination_time, cfg.delivery.min_backoff),
        timeouts=timeouts if timeouts is not None else delivery_timeouts(cfg.delivery),
    )


async def _run(
    cfg: Config,
    hostname: str,
    store: SpoolStore,
    messages: list[QueuedMessage],
    metrics: Metrics,
    resolver: DnsResolver,
    watch: ResolverWatch,
    pkix: ssl.SSLContext,
    tls: TlsContextHolder | None = None,
    auth: AuthGate | None = None,
    gateway: Gateway | None = None,
) -> None:
    timeouts = delivery_timeouts(cfg.delivery)
    engine = DeliveryEngine(
        resolver=resolver,
        transport=SmtpTransport(
            hostname, cfg.delivery.connect_timeout, cfg.delivery.command_timeout, timeouts
        ),
        tls_context=client_context(),
        settings=engine_settings(cfg, hostname, timeouts),
        metrics=metrics,
        resolver_status=watch.status,
        pkix_context=pkix,
    )
    runner = QueueRunner(
        store, engine, cfg.delivery, metrics, hostname, on_flush=engine.lift_suspensions
    )
    runner.load(messages)
    control = ControlServer(runner, store)
    await control.start()  # `dane-relay queue ...` talks to the live runner through it
    handler = RelayHandler(
        store, cfg.server, cfg.relay, hostname, metrics, runner.submit, gateway=gateway
    )
    sessions = Sessions()
    servers = await start_listeners(handler, cfg.server, hostname, tls, auth, sessions)

    stop = asyncio.Event()
    signalled: list[signal.Signals] = []

    def on_stop_signal(sig: signal.Signals) -> None:
        signalled.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal, sig)
    reloader = Reloader(
        cfg,
        hostname,
        partial(engine_settings, hostname=hostname),
        _pkix_context,
        handler,
        engine,
        runner,
        tls,
    )
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    runner_task = asyncio.create_task(runner.run(), name="queue-runner")
    watch_task = asyncio.create_task(watch.run(), name="resolver-watch")
    log.info(
        "started hostname=%s listen=%s spool=%s queued=%d tls_level=%s resolvers=%s "
        "resolver_validating=%s metrics=%s starttls=%s",
        hostname,
        ",".join(str(ep) for ep in cfg.server.listen),
        cfg.spool.directory,
        len(messages),
        cfg.tls.level,
        describe_resolvers(cfg.dns),
        watch.state,
        cfg.metrics.listen or "off",
        "on" if tls is not None else "off",
    )
    await stop.wait()
    grace = cfg.server.shutdown_grace
    for server in servers:
        server.close()  # no new connections from here on
    finishing = sessions.begin_shutdown()  # idle sessions: 421 and closed now
    log.info(
        "stopping signal=%s grace=%gs sessions=%d deliveries=%d",
        signalled[0].name,
        grace,
        finishing,
        runner.deliveries_running(),  # not those waiting for a slot
    )
    watch_task.cancel()
    await control.close()  # from here the queue tools find no relay and wait for the lock
    sessions_cut, deliveries_cut = await asyncio.gather(sessions.drain(grace), runner.stop(grace))
    await engine.close()
    runner_task.cancel()
    await asyncio.gather(runner_task, watch_task, return_exceptions=True)
    log.info(
        "stopped sessions_cut=%d deliveries_cut=%d left_queued=%d",
        sessions_cut,
        deliveries_cut,
        len(runner.snapshot()),
    )
