"""Delivery engine: one attempt to deliver a message's pending recipients.

Theory of operation, per next-hop domain (recipients are grouped by domain):

1. `route.resolve_mx` (RFC 7672 §2.2.1). A lookup failure defers every recipient of
   the domain; NXDOMAIN and a null MX (RFC 7505) bounce them; no MX means the domain
   itself is the implicit MX (RFC 5321 §5.1).
2. For each MX host in preference order (at most `EngineSettings.mx_host_limit`), while
   connection attempts are left (`EngineSettings.mx_address_limit`), `route.resolve_host`:
   addresses, TLSA (first
   at the CNAME-expanded name) and the `relay.dane.policy` decision. A host the policy
   skips (failed address or TLSA lookup, dane-only without usable TLSA, ...) moves on to
   the next MX; a TLSA lookup failure never becomes "no TLSA" (RFC 7672 §2.1). When the
   resolver is known not to validate (`ResolverStatus.validating` False), every answer
   counts as insecure: dane becomes opportunistic TLS and dane-only defers.
   Mail loop (RFC 5321 §5.1): before the first host of a preference is tried, the
   addresses of every host of that preference are looked up (once: `_Remembered` keeps
   the answers for the hosts' routes) and checked against `EngineSettings.myself`. When
   one is this relay, no host of that preference or a worse one is tried: that host's
   route is the loop, which bounces the domain (554 5.4.6) at its best preference and
   defers it (451 4.4.6) when more preferred hosts were tried first. Without this, an
   equal-preference host listed before the relay's own entry was tried.
3. For each address (family first per `EngineSettings.address_preference`): connect,
   then `relay.delivery.secure.negotiate` (EHLO, STARTTLS
   as required, DANE verification of the peer chain with the pure `relay.dane.verify`,
   EHLO again; shared with `dane-relay probe`), then MAIL/RCPT/DATA. A failure scoped
   to the host (connect, TLS, DANE, greeting) moves on to the next address or MX host;
   on a DANE failure QUIT is sent before MAIL FROM, so no message data ever reaches an
   unauthenticated peer (RFC 7672 §2.2, §3).
4. MAIL/RCPT/DATA: `relay.delivery.client.Transaction` decides (SIZE, SMTPUTF8,
   per-recipient outcomes); `_drive` only moves its commands and replies. After a 421 or a
   lost connection the session is just closed (RFC 5321 §3.8); after a completed
   transaction it goes to the `relay.delivery.pool.ConnectionCache` under its
   destination's key, with the TLS and DANE outcome of its setup.
5. Connection reuse: before step 1, a cached session for the same destination key (next
   hop, level, port) is taken and checked with RSET (RFC 5321 §4.1.1.5); a 250 means the
   next message goes on it, with the verdict its setup earned (logged `conn=reused:N`);
   anything else closes it and the next cached one or a new connection is tried.
   Deliveries in progress per destination key are bounded by `destination_concurrency`.
6. Dead destinations (Postfix qmgr): when every connection of an attempt failed before a
   session was set up (`_UNREACHABLE`: connect, timeout, greeting or EHLO refused, TLS
   handshake) and no host failed otherwise, the destination (the slot key) is suspended
   for `dead_destination_time` seconds: its next attempts are deferred at once, without a
   lookup or a connection, `451 4.4.1 delivery temporarily suspended: <last failure>`
   (reason dest_suspended). A session reaching MAIL, `lift_suspensions` (queue flush) or
   the end of the period ends it. It only ever defers: no bounce, no DANE decision.

This module never catches library exceptions: the resolver and transport
adapters translate them into relay.errors at their boundary.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from relay.dane.match import DaneStatus
from relay.dane.policy import DANE_LEVELS, Action, TlsaState, TlsRequirement
from relay.dane.records import TlsaRecord
from relay.delivery.attempt import Attempt, AttemptRecorder, as_temporary
from relay.delivery.client import (
    TIMEOUTS,
    Capabilities,
    Command,
    ConnectionLost,
    Ending,
    Envelope,
    PeerReply,
    Phase,
    Transaction,
    TransactionResult,
)
from relay.delivery.planner import MAX_MX_HOSTS, MxHost, order_addresses
from relay.delivery.policymap import Destination, PolicyMap
from relay.delivery.pool import Channel, ConnectionCache, DeadDestinations, DestinationSlots
from relay.delivery.route import HostRoute, Myself, explicit_route, resolve_host, resolve_mx
from relay.delivery.secure import Negotiation, TlsSession, negotiate
from relay.errors import (
    ConnectFailed,
    DeliveryError,
    DnsTempFail,
    MailLoopDeferred,
    PeerTimeout,
    PermanentFailure,
    RemotePermReject,
    RemoteTempReject,
    Scope,
    TemporaryFailure,
    TlsHandshakeFailed,
)
from relay.lookup.results import DnsAnswer, MxRecord, Resolver, ResolverStatus, Security
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult, domain_of
from relay.smtp.address import log_quoted
from relay.smtp.domain import DomainSyntaxError, ascii_domain
from relay.smtp.reply import SmtpReply

__all__ = [
    "MAX_CONNECTIONS_PER_DOMAIN",
    "DeliveryEngine",
    "EngineSettings",
    "Session",
    "Transport",
]

log = logging.getLogger("relay.delivery")

# Policy reasons for skipping a host that are DANE failures (logged dane=fail reason=...).
_DANE_SKIPS = frozenset({"tlsa_lookup", "tlsa_malformed", "dane_required"})
#: Connection attempts (addresses tried) per next-hop domain in one delivery attempt, over
#: all its MX hosts; once they are used up no further host is looked up either. Without it
#: 20 MX hosts of 60 addresses each cost 1,200 connection attempts. Postfix bounds the same
#: work with smtp_mx_address_limit (default 5 addresses) and smtp_mx_session_limit (default
#: 2 sessions); MX hosts are capped by relay.delivery.planner.MAX_MX_HOSTS. The default of
#: the configurable `delivery.mx_address_limit` (relay.config.DeliveryConfig, equal by test).
MAX_CONNECTIONS_PER_DOMAIN = 5
# Records quoted in one log line; a hostile RRset can hold thousands.
_LOGGED_RECORDS = 3


def _some(items: Iterable[object]) -> str:
    """The first _LOGGED_RECORDS items, comma-separated, then "+N more" for the rest."""
    shown = [str(item) for item in items]
    extra = len(shown) - _LOGGED_RECORDS
    return ",".join(shown[:_LOGGED_RECORDS]) + (f",+{extra} more" if extra > 0 else "")


@dataclass(slots=True)
class _Connections:
    """What is left of one domain's connection attempts in one delivery attempt."""

    left: int
    untried: int = 0  # addresses of looked-up hosts left out for want of attempts
    best_preference: int | None = None  # the domain's lowest MX preference (loop check)
    # Dead-destination evidence: connections that failed before a session was set up
    # (`_UNREACHABLE`), the last one's "relay: reply", and whether a host failed otherwise.
    down: int = 0
    down_reason: str = ""
    other: bool = False

    def failed(self, exc: DeliveryError, relay: str) -> None:
        if _unreachable(exc):
            self.down += 1
            self.down_reason = f"{relay}: {exc.reply.text}"
        else:
            self.other = True


#: Failures that say the destination is not reachable now, whatever the message: the
#: connect, the greeting, EHLO and the TLS handshake (Postfix qmgr marks such a
#: destination dead). Not DANE/PKIX verdicts nor "TLS required, not offered" (each attempt
#: logs and counts its own authentication result; they are not connection failures), nor
#: DNS or policy skips, nor anything a mail transaction answers (per message/recipient).
_UNREACHABLE = (ConnectFailed, PeerTimeout, RemoteTempReject, RemotePermReject)


def _unreachable(exc: DeliveryError) -> bool:
    # PkixUntrusted, PkixInvalid (certificate verdicts) and StartTlsRefused (no TLS now, as
    # if STARTTLS were not offered) subclass TlsHandshakeFailed but say nothing of the
    # connection: exact type only.
    return isinstance(exc, _UNREACHABLE) or type(exc) is TlsHandshakeFailed


class Session(TlsSession, Protocol):
    """An outbound session after setup (relay.delivery.transport.OutboundSession)."""

    greeting: SmtpReply

    def capabilities(self) -> Capabilities: ...
    async def write(self, command: Command, message: bytes) -> None: ...
    async def read_reply(self, timeout: float) -> PeerReply | ConnectionLost: ...


class Transport(Protocol):
    async def open(self, address: str, port: int) -> Session: ...


@dataclass(frozen=True, slots=True)
class EngineSettings:
    level: str
    helo_name: str
    port: int = 25  # TCP port to connect to
    tlsa_port: int = 25  # RFC 7672 §2.2.3: TLSA qname always uses the SMTP port 25
    # RFC 7672 §2.2.1: level dane, secure TLSA via an insecure MX RRset: dane/encrypt/may.
    insecure_mx_policy: str = "dane"
    # Per-destination level and next hop; None: `level` and the MX hosts for every domain.
    policy: PolicyMap | None = None
    # The relay's own identity for the port delivery connects to (mail-loop check); None: off.
    myself: Callable[[int], Myself] | None = None
    # MX hosts considered and addresses tried per domain (delivery.mx_host_limit,
    # delivery.mx_address_limit) and which family first (delivery.address_preference).
    mx_host_limit: int = MAX_MX_HOSTS
    mx_address_limit: int = MAX_CONNECTIONS_PER_DOMAIN
    address_preference: str = "any"
    # Reply timeout per phase (RFC 5321 §4.5.3.2; delivery.*_timeout).
    timeouts: Mapping[Phase, float] = field(default_factory=lambda: TIMEOUTS)
    # Deliveries in progress per destination (delivery.destination_concurrency).
    destination_concurrency: int = 20
    # Connection reuse (delivery.connection_cache_time, connection_reuse_time,
    # connection_reuse_limit); a cache time of 0 turns reuse off.
    connection_cache_time: float = 5.0
    connection_reuse_time: float = 300.0
    connection_reuse_limit: int = 100
    # Seconds a destination whose every connection failed is suspended (0: never;
    # delivery.dead_destination_time).
    dead_destination_time: float = 60.0


@dataclass(frozen=True, slots=True)
class _Verdict:
    """What a connection's setup established, carried over to every reuse of it."""

    relay: str
    dnssec: str
    dns_detail: str
    tls: str
    tls_detail: str
    tlsa_base: str
    dane: str
    dane_detail: str

    @classmethod
    def of(cls, attempt: Attempt) -> _Verdict:
        return cls(
            attempt.relay,
            attempt.dnssec,
            attempt.dns_detail,
            attempt.tls,
            attempt.tls_detail,
            attempt.tlsa_base,
            attempt.dane,
            attempt.dane_detail,
        )

    def apply(self, attempt: Attempt) -> None:
        attempt.relay, attempt.dnssec, attempt.dns_detail = self.relay, self.dnssec, self.dns_detail
        attempt.tls, attempt.tls_detail = self.tls, self.tls_detail
        attempt.tlsa_base, attempt.dane, attempt.dane_detail = (
            self.tlsa_base,
            self.dane,
            self.dane_detail,
        )


@dataclass(frozen=True, slots=True)
class _Held:
    """What one domain's delivery reads from the engine when it begins, with its route, and
    keeps to the end: a reload (relay.reload) meanwhile swaps the engine's objects for the
    next delivery, and this one must not judge its old route by the new settings (an old
    level dane with a new insecure_mx_policy "may" is plaintext that neither allows)."""

    settings: EngineSettings
    transport: Transport
    pkix_context: ssl.SSLContext | None
    # Monotonic time before the settings were read: a session this delivery sets up is
    # not cached when a reload dropped the cache since (`Channel.decided`).
    begun: float
    # On the clock of `DeliveryEngine.dead`, once the destination slot is held: only a
    # session that answered after this makes this attempt's failures old news (`_suspend`).
    # Not `begun`, from before the wait for the slot: a delivery queued behind a successful
    # one could then never suspend the destination, however its connections failed.
    tried: float = float("inf")  # until the slot is held: no success counts against it


#: A cached connection serves only the destination its setup was checked for, under the
#: resolver trust it was checked with: a session set up without DANE while the resolver did
#: not validate is never reused once it does (RFC 7672 §2.2: DANE needs validated TLSA).
_Key = tuple[bool, str, str, bool, int, int]


def _key(dest: Destination, validating: bool) -> _Key:
    hop = dest.next_hop.lower().rstrip(".")
    return (validating, dest.level, hop, dest.mx, dest.port, dest.tlsa_port)


class DeliveryEngine:
    def __init__(
        self,
        resolver: Resolver,
        transport: Transport,
        tls_context: ssl.SSLContext,
        settings: EngineSettings,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        resolver_status: ResolverStatus | None = None,
        pkix_context: ssl.SSLContext | None = None,  # levels verify/secure (tls.pkix_context)
        rng: random.Random | None = None,  # the order of equal MX preferences (tests)
    ) -> None:
        self.resolver = resolver
        self.transport = transport
        self.tls_context = tls_context
        self.pkix_context = pkix_context
        self.settings = settings
        self.routes = settings.policy or PolicyMap(
            settings.level, port=settings.port, tlsa_port=settings.tlsa_port
        )
        self.metrics = metrics
        self.clock = clock
        self.resolver_status = resolver_status  # None: the resolver is trusted to validate
        self.record = AttemptRecorder(metrics, clock)
        self.cache: ConnectionCache[Session, _Verdict] = ConnectionCache(
            settings.connection_cache_time,
            settings.connection_reuse_time,
            settings.connection_reuse_limit,
        )
        self.slots = DestinationSlots(settings.destination_concurrency)
        self.rng = rng
        # Destinations (the slot key) whose every connection failed; see _suspended.
        self.dead = DeadDestinations(time.monotonic)

    async def close(self) -> None:
        """QUIT the cached connections (shutdown)."""
        await self.cache.close()

    def lift_suspensions(self) -> None:
        """End every dead-destination suspension (`dane-relay queue flush`)."""
        count = self.dead.clear()
        if count:
            log.info("destination suspensions lifted by queue flush destinations=%d", count)

    async def deliver(
        self,
        queue_id: str,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        received: float,
        smtputf8: bool = False,
    ) -> list[RecipientResult]:
        """Try every recipient once; returns one result per recipient, in order.

        Never raises for one domain's trouble: an unexpected error while delivering to a
        domain defers that domain's recipients only, so the results of the others are kept.
        """
        # One transaction per next-hop domain: "straße.de" and "xn--strae-oqa.de" are one
        # domain (RFC 5891 A-label); names that are not DNS names group as written.
        by_domain: dict[str, tuple[str, list[str]]] = {}
        # A recipient listed twice (an old spool file) is sent one RCPT and gets one result,
        # returned for each listing (Postfix drops duplicate recipients in cleanup too).
        for rcpt in dict.fromkeys(recipients):
            domain = domain_of(rcpt)
            try:
                key = ascii_domain(domain)
            except DomainSyntaxError:
                key = domain.lower()
            by_domain.setdefault(key, (domain, []))[1].append(rcpt)
        results: dict[str, RecipientResult] = {}
        for domain, rcpts in by_domain.values():
            attempt = Attempt(queue_id, domain, rcpts, smtputf8=smtputf8)
            try:
                domain_results = await self._deliver_domain(attempt, sender, body, received)
            except Exception:
                log.exception("queue_id=%s domain=%s internal error; deferring", queue_id, domain)
                # The steps already recorded for the domain stay in the history.
                domain_results = self.record.results(
                    attempt,
                    Outcome.DEFERRED,
                    SmtpReply(451, "4.3.0", "Internal error while delivering, will retry"),
                    received,
                    reason="internal",
                    log_it=False,
                )
            for result in domain_results:
                results[result.recipient] = result
        return [results[r] for r in recipients]

    # -- one domain -----------------------------------------------------------------

    async def _deliver_domain(
        self, attempt: Attempt, sender: str, body: bytes, received: float
    ) -> list[RecipientResult]:
        # `begun` before anything is read from the settings (`ConnectionCache.drop`).
        held = _Held(self.settings, self.transport, self.pkix_context, time.monotonic())
        dest = self.routes.destination(attempt.domain)
        if self.routes.configured:
            attempt.route_detail = f" level={dest.level} nexthop={dest.via}"
        validating = self.resolver_status is None or self.resolver_status.validating
        key = _key(dest, validating)  # key[1:], the destination, does not depend on it
        if (suspended := self._suspended(attempt, key, received, held)) is not None:
            return suspended
        async with self.slots.hold(key[1:]):
            # Again: the destination may have been suspended while this one waited.
            if (suspended := self._suspended(attempt, key, received, held)) is not None:
                return suspended
            held = replace(held, tried=self.dead.clock())  # its own attempt starts now
            # One reading per domain, so that every host of the domain is judged alike, and
            # after the wait for a slot: the probe may have found the resolver validating
            # again meanwhile, and nothing has been looked up for this delivery yet (RFC
            # 7672 §2.1; nor may a session cached without DANE be reused once it validates).
            validating = self.resolver_status is None or self.resolver_status.validating
            key = _key(dest, validating)
            channel = await self._cached(key, held)
            if channel is not None:
                channel.verdict.apply(attempt)
                attempt.route_detail += f" conn=reused:{channel.uses}"
                channel.uses += 1
                try:
                    return await self._mail_transaction(
                        channel.session, attempt, sender, body, received, key, channel, held
                    )
                except BaseException:
                    channel.session.abort()
                    raise
            return await self._route_domain(
                attempt, dest, key, validating, sender, body, received, held
            )

    def _suspended(
        self, attempt: Attempt, key: _Key, received: float, held: _Held
    ) -> list[RecipientResult] | None:
        """Deferred results, without a lookup or a connection, while the destination is
        suspended (Postfix qmgr: "delivery temporarily suspended"); None otherwise."""
        if held.settings.dead_destination_time <= 0:
            return None
        why = self.dead.suspended(key[1:])
        if why is None:
            return None
        self.metrics.suspended_deliveries.inc(len(attempt.recipients))
        # Temporary, always: the runner's own rules (max_queue_lifetime) decide any bounce.
        reply = SmtpReply(451, "4.4.1", f"delivery temporarily suspended: {why}")
        return self.record.results(
            attempt, Outcome.DEFERRED, reply, received, reason="dest_suspended"
        )

    def _suspend(self, attempt: Attempt, key: _Key, connections: _Connections, held: _Held) -> None:
        """Suspend the destination when every connection this attempt made failed before a
        session was set up (`_UNREACHABLE`), no host failed in any other way and no other
        delivery reached the destination since this one got its slot (`held.tried`)."""
        period = held.settings.dead_destination_time
        if period <= 0 or not connections.down or connections.other:
            return
        if not self.dead.mark(key[1:], connections.down_reason, period, held.tried):
            log.info(
                "queue_id=%s domain=%s destination not suspended: reached by another "
                "delivery since this attempt began%s",
                attempt.queue_id,
                attempt.domain,
                attempt.route_detail,
            )
            return
        self.metrics.destination_suspensions.inc()
        log.info(
            "queue_id=%s domain=%s destination suspended for %gs: every connection failed "
            'reason=dest_dead last="%s"%s',
            attempt.queue_id,
            attempt.domain,
            period,
            log_quoted(connections.down_reason),
            attempt.route_detail,
        )

    async def _cached(self, key: _Key, held: _Held) -> Channel[Session, _Verdict] | None:
        """A cached session for `key` that answered RSET with 250, or None."""
        while (channel := self.cache.take(key)) is not None:
            session = channel.session
            try:
                # RFC 5321 §4.1.1.5: RSET clears any state and proves the peer still listens.
                await session.write(Command(Phase.RSET, "RSET"), b"")
                reply = await session.read_reply(held.settings.timeouts[Phase.RSET])
            except BaseException:
                session.abort()  # cut off (the relay stopping): out of the cache, unused
                raise
            if isinstance(reply, PeerReply) and reply.code == 250:
                self.metrics.connection_reuse.labels("hit").inc()
                return channel
            self.metrics.connection_reuse.labels("stale").inc()
            session.abort()
        return None

    async def _route_domain(
        self,
        attempt: Attempt,
        dest: Destination,
        key: _Key,
        validating: bool,
        sender: str,
        body: bytes,
        received: float,
        held: _Held,
    ) -> list[RecipientResult]:
        queue_id, domain = attempt.queue_id, attempt.domain
        settings = held.settings
        # RFC 7672 §2.2.2: an explicit [host] next hop is used without MX lookup.
        mx = (
            await resolve_mx(
                self.resolver,
                dest.next_hop,
                validating=validating,
                host_limit=settings.mx_host_limit,
                rng=self.rng,
            )
            if dest.mx
            else explicit_route(dest.next_hop, literal=dest.literal)
        )
        attempt.dnssec = mx.dnssec
        if mx.failure is not None:
            # RFC 7672 §2.1: a failed MX lookup defers, never "no MX"; RFC 7505: null MX bounces.
            return self.record.fail_all(attempt, mx.failure, received)
        assert mx.answer is not None

        if mx.plan.dropped:
            log.info(
                "queue_id=%s domain=%s mx_hosts=%d considered=%d: the least preferred MX hosts "
                "are not tried (limit %d)",
                queue_id,
                domain,
                len(mx.plan.hosts) + mx.plan.dropped,
                len(mx.plan.hosts),
                settings.mx_host_limit,
            )
        last: DeliveryError | None = None
        limit = settings.mx_address_limit
        hosts = mx.plan.hosts
        connections = _Connections(
            left=limit, best_preference=hosts[0].preference if hosts else None
        )
        identity = settings.myself(dest.port) if settings.myself else None
        lookups = _Remembered(self.resolver)
        hosts_left = 0
        for index, host in enumerate(hosts):
            if connections.left <= 0:
                hosts_left = len(hosts) - index
                break
            if identity is not None and (
                index == 0 or hosts[index - 1].preference < host.preference
            ):
                # RFC 5321 §5.1: the relay is checked against every host of a preference
                # before any of them is tried; if it is one, its route (the loop) ends the
                # domain here, and no host of this preference or a worse one is tried.
                group = [h for h in hosts[index:] if h.preference == host.preference]
                mine = await _myself_among(lookups, group, identity)
                if mine is not None:
                    host = mine[0]
                    log.info(
                        "queue_id=%s domain=%s mail loop: MX host %s (preference %d) is this "
                        "relay (%s); %d MX host(s) of that preference or worse not tried "
                        "reason=mail_loop (RFC 5321 §5.1)",
                        attempt.queue_id,
                        attempt.domain,
                        host.name,
                        host.preference,
                        mine[1],
                        len(hosts) - index - 1,
                    )
            try:
                return await self._try_host(
                    attempt,
                    dest,
                    host,
                    mx.answer.security,
                    validating,
                    sender,
                    body,
                    received,
                    connections,
                    key,
                    lookups,
                    held,
                )
            except (TemporaryFailure, PermanentFailure) as exc:
                if exc.scope is not Scope.HOST:
                    if isinstance(exc, MailLoopDeferred):
                        # A backup MX: the more preferred hosts tried before the loop
                        # decide whether their destination is down.
                        self._suspend(attempt, key, connections, held)
                    return self.record.fail_all(attempt, exc, received)
                last = exc
        if hosts_left or connections.untried:
            log.info(
                "queue_id=%s domain=%s connection limit reached: %d attempts made; "
                "%d address(es) and %d MX host(s) not tried (limit %d)",
                queue_id,
                domain,
                limit - connections.left,
                connections.untried,
                hosts_left,
                limit,
            )
        if last is None:
            last = TemporaryFailure("No MX host could be tried", scope=Scope.DOMAIN)
        self._suspend(attempt, key, connections, held)
        # Every host failed: defer (a host-scoped failure is never a reason to bounce).
        return self.record.results(
            attempt,
            Outcome.DEFERRED,
            as_temporary(last),
            received,
            reason=last.reason,
            log_it=False,
        )

    async def _try_host(
        self,
        attempt: Attempt,
        dest: Destination,
        host: MxHost,
        mx_security: Security,
        validating: bool,
        sender: str,
        body: bytes,
        received: float,
        connections: _Connections,
        key: _Key,
        resolver: Resolver,
        held: _Held,
    ) -> list[RecipientResult]:
        settings = held.settings
        route = await resolve_host(
            resolver,
            host,
            next_hop=dest.next_hop,
            level=dest.level,
            mx_security=mx_security,
            insecure_mx_policy=settings.insecure_mx_policy,
            validating=validating,
            tlsa_port=dest.tlsa_port,
            myself=settings.myself(dest.port) if settings.myself else None,
            best_preference=connections.best_preference,
            literal=dest.literal,
        )
        attempt.relay = f"{host.name}[-]"
        attempt.tls, attempt.tls_detail, attempt.dane, attempt.dane_detail = "none", "", "none", ""
        attempt.dnssec = route.dnssec
        attempt.tlsa_base = route.tlsa_base
        attempt.dns_detail = (
            f"dns=partial failed={','.join(route.failed_families)}" if route.failed_families else ""
        )
        self._note_tlsa(attempt, route)
        decision = route.decision
        log.debug(
            'queue_id=%s host=%s tlsa=%s level=%s decision=%s why="%s"',
            attempt.queue_id,
            host.name,
            route.tlsa_state.value,
            dest.level,
            decision.action.value,
            log_quoted(route.reason),
        )
        if route.failure is not None:
            if decision.reason in _DANE_SKIPS:
                attempt.dane, attempt.dane_detail = "fail", f"reason={decision.reason}"
                self.metrics.dane_result(DaneStatus.FAILED.value, decision.reason)
            if route.failure.scope is Scope.HOST:
                # A domain-scoped failure (RFC 5321 §5.1 mail loop) ends the domain: the
                # caller's fail_all logs it, once.
                self.record.log_failure(attempt, route.failure, received)
                connections.other = True  # skipped by DNS or policy: not a dead destination
            raise route.failure
        assert decision.requirement is not None
        if decision.reason == "tlsa_unusable":
            # RFC 7672 §3.1.3: DANE applies, no record is usable: TLS, unauthenticated.
            self.metrics.dane_result(DaneStatus.UNAUTHENTICATED.value, decision.reason)

        last: DeliveryError | None = None
        ordered = order_addresses(route.addresses, settings.address_preference)
        addresses = ordered[: connections.left]
        connections.untried += len(ordered) - len(addresses)
        for address in addresses:
            connections.left -= 1
            attempt.relay = f"{host.name}[{address}]:{dest.port}"
            attempt.tls, attempt.tls_detail = "none", ""
            attempt.dane, attempt.dane_detail = "none", ""
            if decision.action is Action.NO_DANE and dest.level in DANE_LEVELS:
                # Why DANE did not apply at a DANE level (insecure addresses, no TLSA, ...).
                attempt.dane_detail = f"reason={decision.reason}"
            try:
                return await self._transact(
                    attempt,
                    route,
                    address,
                    dest.port,
                    decision.requirement,
                    sender,
                    body,
                    received,
                    key,
                    held,
                )
            except (TemporaryFailure, PermanentFailure) as exc:
                self.record.log_failure(attempt, exc, received)
                connections.failed(exc, attempt.relay)
                if exc.scope is not Scope.HOST:
                    raise
                last = exc
        assert last is not None
        raise last

    def _note_tlsa(self, attempt: Attempt, route: HostRoute) -> None:
        """Count and log what the TLSA RRset held that the policy cannot use."""
        if route.malformed:
            # Bad DNS data is logged and counted wherever it appears (RFC 7671 §4.1).
            self.metrics.tlsa_malformed.inc(len(route.malformed))
            log.warning(
                "queue_id=%s host=%s dane=malformed-tlsa records=%s usable_left=%d",
                attempt.queue_id,
                route.tlsa_base,
                _some(route.malformed),
                len(route.usable),
            )
        if route.tlsa_state is TlsaState.SECURE_UNUSABLE:
            # RFC 7672 §3.1.3: only unusable records: encrypt without authentication.
            log.info(
                "queue_id=%s host=%s dane=unusable records=%s",
                attempt.queue_id,
                route.tlsa_base,
                _some(f"{r.usage}-{r.selector}-{r.mtype}" for r in route.tlsa_records),
            )

    # -- one connection ------------------------------------------------------------

    async def _transact(
        self,
        attempt: Attempt,
        route: HostRoute,
        address: str,
        port: int,
        requirement: TlsRequirement,
        sender: str,
        body: bytes,
        received: float,
        key: _Key,
        held: _Held,
    ) -> list[RecipientResult]:
        opened = time.monotonic()
        session = await held.transport.open(address, port)
        # EHLO, STARTTLS and DANE as relay.delivery.secure decides for delivery and probe
        # alike; on a DANE failure QUIT is sent before MAIL FROM (RFC 7672 §3).
        setup = await negotiate(
            held.transport,
            session,
            route,
            address,
            port,
            requirement,
            held.settings.helo_name,
            self.tls_context,
            lambda: datetime.fromtimestamp(self.clock(), UTC),
            held.pkix_context,
        )
        self._note_setup(attempt, setup)
        if setup.failure is not None:
            raise setup.failure
        assert setup.session is not None
        session = setup.session
        self.metrics.tls_sessions.labels(attempt.tls).inc()
        channel = Channel(session, _Verdict.of(attempt), opened, decided=held.begun)
        try:
            return await self._mail_transaction(
                session, attempt, sender, body, received, key, channel, held
            )
        except BaseException:
            session.abort()
            raise

    def _note_setup(self, attempt: Attempt, setup: Negotiation[Session]) -> None:
        """Carry the TLS and DANE outcome into the log fields and DANE metrics."""
        if setup.fallback:  # RFC 7435 §3: level may went on in plaintext, as Postfix does
            log.info(
                "queue_id=%s relay=%s tls=fallback reason=handshake-failed",
                attempt.queue_id,
                attempt.relay,
            )
        attempt.tls = setup.tls
        if setup.tls_version:
            self.metrics.tls_session("outbound", setup.tls_version, setup.cipher)
        if setup.tls != "none" and setup.tls_version:
            attempt.tls_detail = f"({setup.tls_version} {setup.cipher})"
        if setup.dane == "none":
            return
        verdict = setup.verdict
        status = verdict.status.value if verdict is not None else DaneStatus.FAILED.value
        self.metrics.dane_result(status, setup.dane_reason)
        attempt.dane = setup.dane
        attempt.dane_detail = f"reason={setup.dane_reason}"
        if verdict is not None and verdict.matched:
            attempt.dane_detail += f' matched="{verdict.matched}"'
        if verdict is not None and verdict.match_depth is not None:
            attempt.dane_detail += f" depth={verdict.match_depth}"

    async def _mail_transaction(
        self,
        session: Session,
        attempt: Attempt,
        sender: str,
        body: bytes,
        received: float,
        key: _Key,
        channel: Channel[Session, _Verdict],
        held: _Held,
    ) -> list[RecipientResult]:
        # RFC 2920 §3.1: with PIPELINING, MAIL, every RCPT and DATA go in one batch.
        caps = session.capabilities()
        envelope = Envelope(
            sender,
            attempt.recipients,
            size=len(body),
            eight_bit=not body.isascii(),
            # A message that asked for SMTPUTF8 gets it where offered; an ASCII-only
            # envelope goes without it elsewhere (only a UTF-8 address needs it, RFC 6531
            # §3.2), so it is not bounced for asking.
            smtputf8=attempt.smtputf8 and caps.smtputf8,
        )
        # A session answered: the destination is reachable (Postfix qmgr lifts "dead").
        self.dead.reached(key[1:])
        outcome = await _drive(session, Transaction(envelope, caps), body, held.settings.timeouts)
        if outcome.ending is Ending.CLOSE:
            session.abort()  # RFC 5321 §3.8: 421 or connection lost: no further command
        elif outcome.ending is not Ending.REUSABLE or not self.cache.put(key, channel):
            await session.quit()
        return self.record.finish(attempt, outcome.recipients, received)


class _Remembered:
    """The resolver, with each host's address answer (or failure) of one delivery attempt
    kept: the loop check of a preference group and the host's own route see the same
    answer, and no lookup is made twice (a failed one would cost its timeout again)."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self._addresses: dict[str, DnsAnswer[str] | DnsTempFail] = {}

    async def mx(self, domain: str) -> DnsAnswer[MxRecord]:
        return await self.resolver.mx(domain)

    async def addresses(self, host: str) -> DnsAnswer[str]:
        known = self._addresses.get(host)
        if known is None:
            try:
                known = await self.resolver.addresses(host)
            except DnsTempFail as exc:
                known = exc
            self._addresses[host] = known
        if isinstance(known, DnsTempFail):
            raise known
        return known

    async def tlsa(self, host: str, port: int) -> DnsAnswer[TlsaRecord]:
        return await self.resolver.tlsa(host, port)


async def _myself_among(
    resolver: _Remembered, group: Sequence[MxHost], identity: Myself
) -> tuple[MxHost, str] | None:
    """The host of `group` (MX hosts of one preference) that is this relay, and why; None
    when none is. A host whose name is not a host name, or whose address lookup fails,
    is not this relay as far as can be told (its own route skips it)."""
    for host in group:
        try:
            ascii_domain(host.name)
        except DomainSyntaxError:
            continue
        try:
            answer = await resolver.addresses(host.name)
        except DnsTempFail:
            answer = None
        records = answer.records if answer is not None else ()
        canonical = answer.canonical if answer is not None else ""
        why = identity.loops(host.name, canonical, records)
        if why:
            return host, why
    return None


async def _drive(
    session: Session,
    transaction: Transaction,
    body: bytes,
    timeouts: Mapping[Phase, float] = TIMEOUTS,
) -> TransactionResult:
    """Write the transaction's commands and feed it the replies until it is done; each
    reply is awaited for its phase's timeout in `timeouts` (RFC 5321 §4.5.3.2)."""
    commands = transaction.start()
    while True:
        for command in commands:
            await session.write(command, body)
        awaiting = transaction.awaiting
        if awaiting is None:
            return transaction.result()
        commands = transaction.receive(await session.read_reply(timeouts[awaiting.phase]))
