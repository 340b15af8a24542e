"""One delivery attempt's record: what it learnt, its per-recipient results, its log line.

Contract: `AttemptRecorder` turns outcomes into `RecipientResult` values, counts them in
`relay_delivery_attempts_total`, and writes the one key=value line per attempt that
docs/metrics.md describes (logger `relay.delivery`). It decides nothing about delivery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from relay.errors import DeliveryError, PermanentFailure, Scope
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult
from relay.smtp.reply import SmtpReply

__all__ = ["OUTCOME_STATUS", "Attempt", "AttemptRecorder", "as_temporary", "outcome_of"]

log = logging.getLogger("relay.delivery")


@dataclass(slots=True)
class Attempt:
    """What one attempt learnt, for the single log line it produces."""

    queue_id: str
    domain: str
    recipients: Sequence[str]
    smtputf8: bool = False  # RFC 6531: the message needs (or asked for) SMTPUTF8
    relay: str = "none"
    dnssec: str = "-"  # secure / insecure / mx-insecure / unvalidated
    dns_detail: str = ""  # "dns=partial failed=AAAA" when one address family failed
    tls: str = "none"  # verified / trusted / encrypted / none: the metric label
    tls_detail: str = ""  # "(TLSv1.3 TLS_AES_256_GCM_SHA384)" for the log line
    tlsa_base: str = ""  # RFC 7672 §2.2.2: the name whose TLSA records apply
    dane: str = "none"
    dane_detail: str = ""
    route_detail: str = ""  # " level=verify nexthop=[h]:587" when a policy map is configured
    started: float = field(default_factory=time.monotonic)


OUTCOME_STATUS = {
    Outcome.DELIVERED: "sent",
    Outcome.DEFERRED: "deferred",
    Outcome.BOUNCED: "bounced",
}


def outcome_of(reply: SmtpReply) -> Outcome:
    if reply.is_positive:
        return Outcome.DELIVERED
    if reply.is_permanent:
        return Outcome.BOUNCED
    return Outcome.DEFERRED


class AttemptRecorder:
    def __init__(self, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self.clock = clock

    def fail_all(
        self, attempt: Attempt, exc: DeliveryError, received: float
    ) -> list[RecipientResult]:
        outcome = Outcome.BOUNCED if isinstance(exc, PermanentFailure) else Outcome.DEFERRED
        return self.results(attempt, outcome, exc.reply, received, reason=exc.reason)

    def results(
        self,
        attempt: Attempt,
        outcome: Outcome,
        reply: SmtpReply,
        received: float,
        *,
        reason: str,
        log_it: bool = True,
    ) -> list[RecipientResult]:
        out = [
            RecipientResult(r, outcome, reply, attempt.relay, reason) for r in attempt.recipients
        ]
        if log_it:
            self.log_results(attempt, out, received)
        else:
            for _ in out:
                self.metrics.delivery_attempts.labels(outcome.value, reason).inc()
        return out

    def finish(
        self, attempt: Attempt, results: Sequence[RecipientResult], received: float
    ) -> list[RecipientResult]:
        """The per-recipient results of a mail transaction on `attempt.relay`, logged."""
        out = [replace(r, relay=attempt.relay) for r in results]
        self.log_results(attempt, out, received)
        return out

    def log_failure(self, attempt: Attempt, exc: DeliveryError, received: float) -> None:
        status = (
            "bounced"
            if isinstance(exc, PermanentFailure) and exc.scope is not Scope.HOST
            else "deferred"
        )
        self.log_line(
            attempt, attempt.recipients, status, exc.reply, received, extra=f" error={exc.reason}"
        )

    def log_results(
        self, attempt: Attempt, results: Sequence[RecipientResult], received: float
    ) -> None:
        groups: dict[tuple[Outcome, SmtpReply, str], list[str]] = {}
        for r in results:
            groups.setdefault((r.outcome, r.reply, r.reason), []).append(r.recipient)
            self.metrics.delivery_attempts.labels(r.outcome.value, r.reason).inc()
            if r.outcome is Outcome.DELIVERED:
                self.metrics.delivery_delay.observe(max(0.0, self.clock() - received))
        for (outcome, reply, reason), rcpts in groups.items():
            extra = "" if outcome is Outcome.DELIVERED else f" error={reason}"
            self.log_line(attempt, rcpts, OUTCOME_STATUS[outcome], reply, received, extra)

    def log_line(
        self,
        attempt: Attempt,
        rcpts: Sequence[str],
        status: str,
        reply: SmtpReply,
        received: float,
        extra: str = "",
    ) -> None:
        detail = f" {attempt.dane_detail}" if attempt.dane_detail else ""
        if attempt.dane != "none" and attempt.tlsa_base:
            # RFC 7672 §2.2.3: the name whose TLSA records applied (after CNAME expansion).
            detail += f" tlsa_base={attempt.tlsa_base}"
        dns = f" {attempt.dns_detail}" if attempt.dns_detail else ""
        log.info(
            "queue_id=%s to=%s relay=%s dnssec=%s%s tls=%s%s dane=%s%s delay=%.2f "
            'attempt_time=%.2f status=%s reply="%s"%s%s',
            attempt.queue_id,
            ",".join(f"<{r}>" for r in rcpts),
            attempt.relay,
            attempt.dnssec,
            dns,
            attempt.tls,
            attempt.tls_detail,
            attempt.dane,
            detail,
            max(0.0, self.clock() - received),
            time.monotonic() - attempt.started,
            status,
            str(reply).replace('"', "'"),
            extra,
            attempt.route_detail,
        )


def as_temporary(exc: DeliveryError) -> SmtpReply:
    reply = exc.reply
    if reply.is_permanent:
        # A host that refused service (554 greeting) with other hosts also failing.
        return SmtpReply(451, "4.4.0", f"all MX hosts failed, last: {reply}")
    return reply
