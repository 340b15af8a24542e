"""relay.delivery.attempt.AttemptRecorder: the attempt history in each RecipientResult.

The recorder is driven here the way relay.delivery.engine drives it: `log_failure` for
each host-scoped failure, then `results`/`fail_all`/`finish` for the final outcome.
"""

from __future__ import annotations

from dataclasses import replace

from relay.delivery.attempt import Attempt, AttemptRecorder
from relay.errors import (
    ConnectFailed,
    DaneVerificationFailed,
    DnsTempFail,
    MailLoop,
    NoSuchDomain,
    RemotePermReject,
    Scope,
    TlsaLookupFailed,
)
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult, Step
from relay.smtp.reply import SmtpReply

NOW = 1_700_000_000.0
RECEIVED = NOW - 60
QUEUED = SmtpReply(250, "2.0.0", "Ok: queued as 4ABC")
UNKNOWN = SmtpReply(550, "5.1.1", "user unknown")
BUSY = SmtpReply(451, "4.2.0", "Try later")
NO_MATCH = DaneVerificationFailed("Server certificate not verified (no-match)")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def recorder() -> tuple[AttemptRecorder, Clock]:
    clock = Clock()
    return AttemptRecorder(Metrics(), clock), clock


def attempt(*recipients: str) -> Attempt:
    return Attempt("0123456789ABCDEF01234", "secure.example", recipients or ("a@secure.example",))


def at_mx1_failing_dane(a: Attempt) -> None:
    """The fields the engine sets for MX1 whose certificate did not match its TLSA (no TLS
    level is reached: the handshake's peer was not authenticated)."""
    a.relay = "mx1.secure.example[192.0.2.1]:25"
    a.tls, a.tls_detail = "none", ""
    a.dane, a.dane_detail = "fail", "reason=no-match"


def at_mx2_verified(a: Attempt) -> None:
    a.relay = "mx2.secure.example[2001:db8::2]:2525"
    a.tls, a.tls_detail = "verified", "(TLSv1.3 TLS_AES_256_GCM_SHA384)"
    a.dane, a.dane_detail = "pass", 'reason=match matched="3 1 1 ab12" depth=0'


MX1_STEP = Step(
    time=NOW,
    outcome=Outcome.DEFERRED,
    reply="451 4.7.5 Server certificate not verified (no-match)",
    host="mx1.secure.example",
    address="192.0.2.1",
    port=25,
    tls="none",
    dane="fail reason=no-match",
)


def test_mx1_fails_dane_mx2_delivers_one_and_refuses_the_other() -> None:
    rec, clock = recorder()
    a = attempt("a@secure.example", "b@secure.example")
    at_mx1_failing_dane(a)
    rec.log_failure(a, NO_MATCH, RECEIVED)
    clock.now = NOW + 2.5
    at_mx2_verified(a)
    out = rec.finish(
        a,
        [
            RecipientResult("a@secure.example", Outcome.DELIVERED, QUEUED, reason="sent"),
            RecipientResult("b@secure.example", Outcome.BOUNCED, UNKNOWN, reason="remote_5xx"),
        ],
        RECEIVED,
    )
    mx2 = Step(
        time=NOW + 2.5,
        outcome=Outcome.DELIVERED,
        reply="250 2.0.0 Ok: queued as 4ABC",
        host="mx2.secure.example",
        address="2001:db8::2",
        port=2525,
        tls="verified",
        dane="pass reason=match",
    )
    assert [r.history for r in out] == [
        (MX1_STEP, mx2),
        (MX1_STEP, replace(mx2, outcome=Outcome.BOUNCED, reply="550 5.1.1 user unknown")),
    ]
    assert [r.relay for r in out] == ["mx2.secure.example[2001:db8::2]:2525"] * 2
    assert out[1].history[-1].where == "mx2.secure.example[2001:db8::2]:2525"


def test_every_host_failing_ends_with_the_last_host_step_once() -> None:
    """The engine's "every MX failed" results() repeat the last logged step: not doubled."""
    rec, clock = recorder()
    a = attempt()
    at_mx1_failing_dane(a)
    rec.log_failure(a, NO_MATCH, RECEIVED)
    clock.now = NOW + 1
    a.relay, a.tls, a.dane, a.dane_detail = "mx2.secure.example[192.0.2.2]:25", "none", "none", ""
    refused = ConnectFailed("Connection refused")
    rec.log_failure(a, refused, RECEIVED)
    clock.now = NOW + 1.001
    (r,) = rec.results(
        a, Outcome.DEFERRED, refused.reply, RECEIVED, reason=refused.reason, log_it=False
    )
    assert r.history == (
        MX1_STEP,
        Step(
            NOW + 1,
            Outcome.DEFERRED,
            "451 4.4.1 Connection refused",
            "mx2.secure.example",
            "192.0.2.2",
            25,
        ),
    )


def test_a_rewritten_final_reply_is_a_step_of_its_own() -> None:
    """A 554 greeting from the last host becomes 451 4.4.0: that decision is a step too."""
    rec, clock = recorder()
    a = attempt()
    a.relay = "mx.secure.example[192.0.2.1]:25"
    refusal = RemotePermReject(reply=SmtpReply(554, "5.7.1", "go away"), scope=Scope.HOST)
    rec.log_failure(a, refusal, RECEIVED)
    clock.now = NOW + 1
    final = SmtpReply(451, "4.4.0", "all MX hosts failed, last: 554 5.7.1 go away")
    (r,) = rec.results(a, Outcome.DEFERRED, final, RECEIVED, reason="remote_5xx", log_it=False)
    assert [(s.time, s.outcome, s.reply) for s in r.history] == [
        (NOW, Outcome.DEFERRED, "554 5.7.1 go away"),  # host scope: never a bounce
        (NOW + 1, Outcome.DEFERRED, "451 4.4.0 all MX hosts failed, last: 554 5.7.1 go away"),
    ]


def test_mx_lookup_failure_is_one_step_without_a_host() -> None:
    rec, _ = recorder()
    a = attempt()
    (r,) = rec.fail_all(a, DnsTempFail(), RECEIVED)
    assert r.history == (Step(NOW, Outcome.DEFERRED, "451 4.4.3 DNS lookup failed"),)
    assert (r.history[0].host, r.history[0].address, r.history[0].port) == ("", "", 0)
    assert r.history[0].where == "-"


def test_nxdomain_bounce_is_one_bounced_step() -> None:
    rec, _ = recorder()
    (r,) = rec.fail_all(attempt(), NoSuchDomain(), RECEIVED)
    assert r.history == (Step(NOW, Outcome.BOUNCED, "550 5.1.2 Host or domain name not found"),)


def test_tlsa_lookup_failure_names_the_host_without_an_address() -> None:
    rec, _ = recorder()
    a = attempt()
    a.relay = "mx1.secure.example[-]"  # as the engine sets it before connecting
    a.dane, a.dane_detail = "fail", "reason=tlsa_lookup"
    rec.log_failure(a, TlsaLookupFailed(), RECEIVED)
    assert a.steps == [
        Step(
            NOW,
            Outcome.DEFERRED,
            "451 4.7.5 TLSA lookup error",
            host="mx1.secure.example",
            tls="none",
            dane="fail reason=tlsa_lookup",
        )
    ]
    assert a.steps[0].where == "mx1.secure.example"


def test_domain_scoped_failure_after_its_log_is_not_recorded_twice() -> None:
    """The engine logs a mail loop on the host, then fail_all()s the domain with it."""
    rec, clock = recorder()
    a = attempt()
    a.relay = "mx.secure.example[-]"
    loop = MailLoop()
    rec.log_failure(a, loop, RECEIVED)
    clock.now = NOW + 0.01
    (r,) = rec.fail_all(a, loop, RECEIVED)
    assert r.history == (
        Step(NOW, Outcome.BOUNCED, "554 5.4.6 Mail loops back to myself", "mx.secure.example"),
    )
    assert r.outcome is Outcome.BOUNCED


def test_dane_none_keeps_why_dane_did_not_apply() -> None:
    rec, _ = recorder()
    a = attempt()
    a.relay = "mx.insecure.example[192.0.2.7]:25"
    a.tls, a.dane_detail = "encrypted", "reason=no_tlsa"
    (r,) = rec.finish(a, [RecipientResult("a@secure.example", Outcome.DEFERRED, BUSY)], RECEIVED)
    assert (r.history[-1].tls, r.history[-1].dane) == ("encrypted", "none reason=no_tlsa")
    assert r.history[-1].reply == "451 4.2.0 Try later"


def test_history_is_not_part_of_result_equality() -> None:
    rec, _ = recorder()
    a = attempt()
    a.relay = "mx.secure.example[192.0.2.1]:25"
    (r,) = rec.finish(a, [RecipientResult("a@secure.example", Outcome.DELIVERED, QUEUED)], RECEIVED)
    assert r.history
    assert r == RecipientResult(
        "a@secure.example", Outcome.DELIVERED, QUEUED, "mx.secure.example[192.0.2.1]:25"
    )


def test_ipv6_relay_and_unusual_ports_are_parsed() -> None:
    rec, _ = recorder()
    a = attempt()
    for relay, where in [
        ("mx[2001:db8::1]:587", ("mx", "2001:db8::1", 587)),
        ("mx[192.0.2.1]:25", ("mx", "192.0.2.1", 25)),
        ("mx[-]", ("mx", "", 0)),
        ("none", ("", "", 0)),
        ("", ("", "", 0)),
    ]:
        a.relay = relay
        step = rec.step(a, Outcome.DEFERRED, BUSY)
        assert (step.host, step.address, step.port) == where
