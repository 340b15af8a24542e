"""Delivery engine: one attempt to deliver a message's pending recipients.

Theory of operation, per next-hop domain (recipients are grouped by domain):

1. MX lookup (RFC 7672 §2.2.1). A lookup failure defers every recipient of the
   domain; NXDOMAIN and a null MX (RFC 7505) bounce them; no MX means the domain
   itself is the implicit MX (RFC 5321 §5.1).
2. For each MX host in preference order: address lookup, then, when the level
   uses DANE and the addresses are secure, the TLSA lookup at _25._tcp.<host>.
   `relay.dane.policy.decide` turns (level, TLSA state) into a TLS requirement or
   a deferral. A lookup failure never becomes "no TLSA" (RFC 7672 §2.1).
3. For each address: connect, EHLO, STARTTLS as required, DANE verification of
   the peer chain (pure `relay.dane.match.verify`), then MAIL/RCPT/DATA. A
   failure scoped to the host (connect, TLS, DANE, greeting) moves on to the next
   address or MX host; on a DANE failure QUIT is sent before MAIL FROM, so no
   message data ever reaches an unauthenticated peer (RFC 7672 §2.2, §3).
4. Per-recipient replies come back as `RecipientResult` values.

This module never catches library exceptions: the resolver and transport
adapters translate them into relay.errors at their boundary.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from relay.dane.match import DaneStatus, verify
from relay.dane.policy import (
    Action,
    AddressStatus,
    MxStatus,
    TlsaState,
    TlsRequirement,
    decide,
    wants_tlsa,
)
from relay.dane.records import TlsaRecord, select_usable
from relay.delivery.attempt import Attempt, AttemptRecorder, as_temporary, outcome_of
from relay.delivery.planner import MxHost, plan_hosts
from relay.errors import (
    DaneNotAvailable,
    DaneRequiredNoTls,
    DaneVerificationFailed,
    DeliveryError,
    DnsTempFail,
    NoSuchDomain,
    NullMx,
    PermanentFailure,
    RemotePermReject,
    RemoteTempReject,
    Scope,
    TemporaryFailure,
    TlsaLookupFailed,
    TlsaMalformed,
    TlsHandshakeFailed,
    TlsRequiredNotOffered,
)
from relay.lookup.results import AnswerKind, DnsAnswer, Resolver
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult, domain_of
from relay.smtp.reply import SmtpReply

__all__ = ["DeliveryEngine", "EngineSettings", "Session", "Transport"]

log = logging.getLogger("relay.delivery")

# dane.policy deferral reasons -> the failure each one raises (all 4.7.5, host scope).
_POLICY_DEFERRALS: dict[str, type[TemporaryFailure]] = {
    "tlsa_lookup": TlsaLookupFailed,
    "tlsa_malformed": TlsaMalformed,
    "dane_required": DaneNotAvailable,
}
_T = TypeVar("_T")


class Session(Protocol):
    greeting: SmtpReply

    def supports(self, extension: str) -> bool: ...
    async def ehlo(self, name: str) -> SmtpReply: ...
    async def starttls(self, server_hostname: str, context: ssl.SSLContext) -> list[bytes]: ...
    def tls_info(self) -> tuple[str, str]: ...
    async def mail(self, sender: str, options: list[str]) -> SmtpReply: ...
    async def rcpt(self, recipient: str) -> SmtpReply: ...
    async def data(self, body: bytes) -> SmtpReply: ...
    async def quit(self) -> None: ...
    def abort(self) -> None: ...


class Transport(Protocol):
    async def open(self, address: str, port: int) -> Session: ...


@dataclass(frozen=True, slots=True)
class EngineSettings:
    level: str
    helo_name: str
    port: int = 25  # TCP port to connect to
    tlsa_port: int = 25  # RFC 7672 §2.2.3: TLSA qname always uses the SMTP port 25


class DeliveryEngine:
    def __init__(
        self,
        resolver: Resolver,
        transport: Transport,
        tls_context: ssl.SSLContext,
        settings: EngineSettings,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.resolver = resolver
        self.transport = transport
        self.tls_context = tls_context
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.record = AttemptRecorder(metrics, clock)

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
        by_domain: dict[str, list[str]] = {}
        for rcpt in recipients:
            by_domain.setdefault(domain_of(rcpt), []).append(rcpt)
        results: dict[str, RecipientResult] = {}
        for domain, rcpts in by_domain.items():
            try:
                domain_results = await self._deliver_domain(
                    queue_id, sender, domain, rcpts, body, received, smtputf8
                )
            except Exception:
                log.exception("queue_id=%s domain=%s internal error; deferring", queue_id, domain)
                domain_results = self.record.results(
                    Attempt(queue_id, domain, rcpts),
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
        self,
        queue_id: str,
        sender: str,
        domain: str,
        rcpts: list[str],
        body: bytes,
        received: float,
        smtputf8: bool = False,
    ) -> list[RecipientResult]:
        attempt = Attempt(queue_id, domain, rcpts, smtputf8=smtputf8)
        try:
            mx = await self._lookup("MX", self.resolver.mx(domain))
        except DnsTempFail as exc:
            # RFC 7672 §2.1: a failed MX lookup is a temporary failure, never "no MX".
            return self.record.fail_all(attempt, exc, received)
        attempt.dnssec = mx.security.value
        plan = plan_hosts(domain, mx)
        if plan.no_domain:
            return self.record.fail_all(attempt, NoSuchDomain(scope=Scope.DOMAIN), received)
        if plan.null_mx:
            # RFC 7505 §3: null MX: bounce at once.
            return self.record.fail_all(attempt, NullMx(scope=Scope.DOMAIN), received)

        last: DeliveryError | None = None
        for host in plan.hosts:
            try:
                return await self._try_host(attempt, host, mx.secure, sender, body, received)
            except (TemporaryFailure, PermanentFailure) as exc:
                if exc.scope is not Scope.HOST:
                    return self.record.fail_all(attempt, exc, received)
                last = exc
        if last is None:
            last = TemporaryFailure("No MX host could be tried", scope=Scope.DOMAIN)
        # Every host failed: defer (a host-scoped failure is never a reason to bounce).
        return self.record.results(
            attempt,
            Outcome.DEFERRED,
            as_temporary(last),
            received,
            reason=last.reason,
            log_it=False,
        )

    async def _lookup(self, rrtype: str, aw: Awaitable[DnsAnswer[_T]]) -> DnsAnswer[_T]:
        try:
            answer = await aw
        except DnsTempFail:
            self.metrics.dns_lookups.labels(rrtype, "fail").inc()
            raise
        self.metrics.dns_lookups.labels(rrtype, answer.security.value).inc()
        return answer

    async def _try_host(
        self,
        attempt: Attempt,
        host: MxHost,
        mx_secure: bool,
        sender: str,
        body: bytes,
        received: float,
    ) -> list[RecipientResult]:
        level = self.settings.level
        attempt.relay = f"{host.name}[-]"
        try:
            addrs = await self._lookup("A/AAAA", self.resolver.addresses(host.name))
        except DnsTempFail as exc:
            self.record.log_failure(attempt, exc, received)
            raise DnsTempFail(exc.reply.text, scope=Scope.HOST) from exc
        if not addrs.records:
            exc2 = DnsTempFail(f"Host or domain name not found: {host.name}", scope=Scope.HOST)
            self.record.log_failure(attempt, exc2, received)
            raise exc2
        attempt.dnssec = (
            "secure"
            if (mx_secure and addrs.secure)
            else ("insecure" if not addrs.secure else "mx-insecure")
        )

        state: TlsaState = TlsaState.NOT_LOOKED_UP
        records: tuple[TlsaRecord, ...] = ()
        attempt.tlsa_base = host.name
        address_status = AddressStatus.SECURE if addrs.secure else AddressStatus.INSECURE
        if wants_tlsa(level, address_status):
            # RFC 7672 §2.2.2: with a secure CNAME chain, TLSA at the expanded name first;
            # if it has none (secure denial), at the original MX host name.
            bases = [host.name]
            if addrs.canonical and addrs.canonical != host.name.lower():
                bases.insert(0, addrs.canonical)
            for base in bases:
                state, records = await self._tlsa_state(base)
                attempt.tlsa_base = base
                if state is not TlsaState.SECURE_NONE:
                    break
        # The implicit MX is the next-hop domain itself, not a name from the MX RRset.
        mx_status = MxStatus.SECURE if mx_secure or host.implicit else MxStatus.INSECURE
        decision = decide(level, mx_status, address_status, state)
        log.debug(
            "queue_id=%s host=%s tlsa=%s level=%s decision=%s why=%r",
            attempt.queue_id,
            host.name,
            state.value,
            level,
            decision.requirement.value if decision.requirement else "defer",
            decision.why,
        )
        if decision.requirement is None:
            assert decision.action is Action.SKIP_HOST
            cls = _POLICY_DEFERRALS[decision.reason]
            exc3 = cls(f"{cls.default_reply.text} for {attempt.tlsa_base}:25", scope=Scope.HOST)
            attempt.dane = "fail"
            attempt.dane_detail = f"reason={decision.reason}"
            self.record.log_failure(attempt, exc3, received)
            raise exc3

        last: DeliveryError | None = None
        for address in addrs.records:
            attempt.relay = f"{host.name}[{address}]:{self.settings.port}"
            attempt.tls, attempt.tls_detail = "none", ""
            attempt.dane, attempt.dane_detail = "none", ""
            try:
                return await self._transact(
                    attempt,
                    host,
                    address,
                    decision.requirement,
                    records,
                    mx_secure,
                    sender,
                    body,
                    received,
                )
            except (TemporaryFailure, PermanentFailure) as exc:
                self.record.log_failure(attempt, exc, received)
                if exc.scope is not Scope.HOST:
                    raise
                last = exc
        assert last is not None
        raise last

    async def _tlsa_state(self, host: str) -> tuple[TlsaState, tuple[TlsaRecord, ...]]:
        try:
            answer = await self._lookup("TLSA", self.resolver.tlsa(host, self.settings.tlsa_port))
        except DnsTempFail:
            # RFC 7672 §2.2: TLSA lookup failure -> defer, never treat as "no TLSA".
            return TlsaState.LOOKUP_FAILED, ()
        if not answer.secure:
            return TlsaState.INSECURE, ()  # RFC 7672 §2.2: insecure TLSA is ignored
        if answer.kind is not AnswerKind.DATA:
            return TlsaState.SECURE_NONE, ()
        # RFC 7671 §9 digest agility and RFC 7672 §3.1.3 usability, in one place.
        usable = select_usable(answer.records)
        malformed = [r for r in answer.records if r.malformed]
        if malformed:
            # Bad DNS data is logged and counted wherever it appears (DESIGN.md).
            self.metrics.dns_lookups.labels("TLSA", "malformed").inc()
            log.warning(
                "host=%s dane=malformed-tlsa records=%s usable_left=%d",
                host,
                ",".join(str(r) for r in malformed),
                len(usable),
            )
            if not usable:
                return TlsaState.SECURE_MALFORMED, answer.records
        if not usable:
            # RFC 7672 §3.1.3: only unusable records: encrypt without authentication.
            log.info(
                "host=%s dane=unusable records=%s",
                host,
                ",".join(f"{r.usage}-{r.selector}-{r.mtype}" for r in answer.records),
            )
            return TlsaState.SECURE_UNUSABLE, answer.records
        return TlsaState.SECURE_USABLE, usable

    # -- one connection ------------------------------------------------------------

    async def _transact(
        self,
        attempt: Attempt,
        host: MxHost,
        address: str,
        requirement: TlsRequirement,
        records: Sequence[TlsaRecord],
        mx_secure: bool,
        sender: str,
        body: bytes,
        received: float,
    ) -> list[RecipientResult]:
        session = await self.transport.open(address, self.settings.port)
        try:
            await self._ehlo(session)
            if requirement is not TlsRequirement.NONE and session.supports("starttls"):
                session = await self._starttls(
                    session, attempt, host, address, requirement, records, mx_secure
                )
            elif requirement is TlsRequirement.DANE:
                # RFC 7672 §2.2: DANE applies, STARTTLS not offered: defer, never plaintext.
                attempt.dane = "fail"
                attempt.dane_detail = "reason=no-starttls"
                self.metrics.dane_verifications.labels("failed", "no-starttls").inc()
                await session.quit()
                raise DaneRequiredNoTls(scope=Scope.HOST)
            elif requirement is TlsRequirement.ENCRYPT:
                await session.quit()
                raise TlsRequiredNotOffered(scope=Scope.HOST)
            self.metrics.tls_sessions.labels(attempt.tls).inc()
            return await self._mail_transaction(session, attempt, sender, body, received)
        except BaseException:
            session.abort()
            raise

    async def _ehlo(self, session: Session) -> None:
        reply = await session.ehlo(self.settings.helo_name)
        if not reply.is_positive:
            cls = RemotePermReject if reply.is_permanent else RemoteTempReject
            raise cls(reply=reply, scope=Scope.HOST)

    async def _starttls(
        self,
        session: Session,
        attempt: Attempt,
        host: MxHost,
        address: str,
        requirement: TlsRequirement,
        records: Sequence[TlsaRecord],
        mx_secure: bool,
    ) -> Session:
        # RFC 7672 §8.1: SNI carries the TLSA base domain.
        base = attempt.tlsa_base
        try:
            chain = await session.starttls(base, self.tls_context)
        except TlsHandshakeFailed:
            if requirement is not TlsRequirement.MAY:
                if requirement is TlsRequirement.DANE:
                    attempt.dane = "fail"
                    attempt.dane_detail = "reason=handshake"
                    self.metrics.dane_verifications.labels("failed", "handshake").inc()
                raise
            # Opportunistic TLS (level may): retry this host in plaintext, as Postfix does.
            session.abort()
            log.info(
                "queue_id=%s relay=%s tls=fallback reason=handshake-failed",
                attempt.queue_id,
                attempt.relay,
            )
            session = await self.transport.open(address, self.settings.port)
            await self._ehlo(session)
            attempt.tls = "none"
            return session
        version, cipher = session.tls_info()
        if requirement is TlsRequirement.DANE:
            # RFC 7672 §3.2.3: reference identifiers are the TLSA base domain, the MX host
            # name and, when the MX RRset is secure, the next-hop domain.
            ref_names = list(
                dict.fromkeys([base, host.name] + ([attempt.domain] if mx_secure else []))
            )
            verdict = verify(records, chain, ref_names, datetime.fromtimestamp(self.clock(), UTC))
            self.metrics.dane_verifications.labels(verdict.status.value, verdict.reason).inc()
            matched = f' matched="{verdict.matched}"' if verdict.matched else ""
            depth = f" depth={verdict.match_depth}" if verdict.match_depth is not None else ""
            attempt.dane_detail = f"reason={verdict.reason}{matched}{depth}"
            if verdict.status is not DaneStatus.VERIFIED:
                # RFC 7672 §3: no usable record matched: defer; QUIT before MAIL FROM.
                attempt.dane = "fail"
                await session.quit()
                raise DaneVerificationFailed(
                    f"Server certificate not verified ({verdict.reason})", scope=Scope.HOST
                )
            attempt.dane = "pass"
            # Glossary: "verified" needs a secure MX RRset; else the name is only "trusted".
            attempt.tls = "verified" if mx_secure or host.implicit else "trusted"
        else:
            attempt.tls = "encrypted"
        attempt.tls_detail = f"({version} {cipher})" if version else ""
        # RFC 3207 §4.2: forget everything learnt before TLS; EHLO again.
        await self._ehlo(session)
        return session

    async def _mail_transaction(
        self,
        session: Session,
        attempt: Attempt,
        sender: str,
        body: bytes,
        received: float,
    ) -> list[RecipientResult]:
        options = []
        if attempt.smtputf8:
            if session.supports("smtputf8"):
                options.append("SMTPUTF8")
            elif not (sender.isascii() and all(r.isascii() for r in attempt.recipients)):
                # RFC 6531 §3.2: a UTF-8 envelope cannot go to a server without SMTPUTF8.
                await session.quit()
                reply = SmtpReply(550, "5.6.7", "SMTPUTF8 is required, but was not offered by host")
                return self.record.results(
                    attempt, Outcome.BOUNCED, reply, received, reason="smtputf8_not_offered"
                )
        if session.supports("size"):
            options.append(f"SIZE={len(body)}")
        if session.supports("8bitmime") and any(b > 127 for b in body):
            options.append("BODY=8BITMIME")
        mail = await session.mail(sender, options)
        if not mail.is_positive:
            await session.quit()
            return self.record.results(
                attempt, outcome_of(mail), mail, received, reason="mail_from"
            )
        replies: dict[str, SmtpReply] = {}
        accepted: list[str] = []
        for rcpt in attempt.recipients:
            reply = await session.rcpt(rcpt)
            replies[rcpt] = reply
            if reply.is_positive:
                accepted.append(rcpt)
        if accepted:
            data_reply = await session.data(body)
            for rcpt in accepted:
                replies[rcpt] = data_reply
        await session.quit()
        out: list[RecipientResult] = []
        for rcpt in attempt.recipients:
            reply = replies[rcpt]
            outcome = outcome_of(reply)
            reason = {"delivered": "sent", "bounced": "remote_5xx", "deferred": "remote_4xx"}[
                outcome.value
            ]
            out.append(RecipientResult(rcpt, outcome, reply, attempt.relay, reason))
        self.record.log_results(attempt, out, received)
        return out
