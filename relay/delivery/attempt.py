"""One delivery attempt's record: what it learnt, its per-recipient results, its log line.

Contract: `AttemptRecorder` turns outcomes into `RecipientResult` values, counts them in
`dane_relay_delivery_attempts_total`, and writes the one key=value line per attempt that
docs/metrics.md describes (logger `relay.delivery`). It decides nothing about delivery.

Attempt history: every host-scoped failure given to `log_failure` (MX1 failed DANE, then
MX2 ...) becomes a `relay.model.Step` on the `Attempt`, stamped with the recorder's clock;
`results`, `fail_all` and `finish` give each recipient those steps plus the final one
(`RecipientResult.history`). A final step that repeats the last logged one but for its
time (`fail_all` right after `log_failure` of the same error, or every host having
failed with the last host's reply) is that step, not a second one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from relay.errors import DeliveryError, PermanentFailure, Scope
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult, Step
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
    steps: list[Step] = field(default_factory=list)  # host-scoped failures, in order


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
        history = self._history(attempt, outcome, reply)
        out = [
            RecipientResult(r, outcome, reply, attempt.relay, reason, history)
            for r in attempt.recipients
        ]
        if log_it:
            self.log_results(attempt, out, received)
        else:
            for _ in out:
                self.metrics.delivery_result(outcome.value, reason, attempt.tls)
        return out

    def finish(
        self, attempt: Attempt, results: Sequence[RecipientResult], received: float
    ) -> list[RecipientResult]:
        """The per-recipient results of a mail transaction on `attempt.relay`, logged."""
        out = [
            replace(r, relay=attempt.relay, history=self._history(attempt, r.outcome, r.reply))
            for r in results
        ]
        self.log_results(attempt, out, received)
        return out

    def log_failure(self, attempt: Attempt, exc: DeliveryError, received: float) -> None:
        """Log a failure on `attempt.relay` and add it to the attempt's steps."""
        bounced = isinstance(exc, PermanentFailure) and exc.scope is not Scope.HOST
        status = "bounced" if bounced else "deferred"
        outcome = Outcome.BOUNCED if bounced else Outcome.DEFERRED
        attempt.steps.append(self.step(attempt, outcome, exc.reply))
        self.log_line(
            attempt, attempt.recipients, status, exc.reply, received, extra=f" error={exc.reason}"
        )

    def step(self, attempt: Attempt, outcome: Outcome, reply: SmtpReply) -> Step:
        """What `attempt` stands at now, as one step with this outcome and reply."""
        host, address, port = _where(attempt.relay)
        return Step(
            time=self.clock(),
            outcome=outcome,
            reply=str(reply),
            host=host,
            address=address,
            port=port,
            tls=attempt.tls,
            dane=_dane(attempt),
        )

    def _history(self, attempt: Attempt, outcome: Outcome, reply: SmtpReply) -> tuple[Step, ...]:
        final = self.step(attempt, outcome, reply)
        if attempt.steps and replace(attempt.steps[-1], time=final.time) == final:
            return tuple(attempt.steps)
        return (*attempt.steps, final)

    def log_results(
        self, attempt: Attempt, results: Sequence[RecipientResult], received: float
    ) -> None:
        groups: dict[tuple[Outcome, SmtpReply, str], list[str]] = {}
        for r in results:
            groups.setdefault((r.outcome, r.reply, r.reason), []).append(r.recipient)
            self.metrics.delivery_result(r.outcome.value, r.reason, attempt.tls)
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


def _where(relay: str) -> tuple[str, str, int]:
    """("host", "address", port) from "host[address]:port"; "host[-]" and "none" give
    empty parts (no connection made, no host chosen)."""
    if not relay or relay == "none":
        return "", "", 0
    host, bracket, rest = relay.partition("[")
    if not bracket:
        return host, "", 0
    address, _, port = rest.rpartition("]")
    if address == "-":
        return host, "", 0
    return host, address, int(port[1:]) if port[1:].isdigit() else 0


def _dane(attempt: Attempt) -> str:
    """The DANE result with its reason only: "fail reason=no-match", "pass reason=match"."""
    reason = attempt.dane_detail.split(" ", 1)[0]
    return f"{attempt.dane} {reason}" if reason.startswith("reason=") else attempt.dane


def as_temporary(exc: DeliveryError) -> SmtpReply:
    reply = exc.reply
    if reply.is_permanent:
        # A host that refused service (554 greeting) with other hosts also failing.
        return SmtpReply(451, "4.4.0", f"all MX hosts failed, last: {reply}")
    return reply
