"""The attempt history the engine reports (RecipientResult.history, issue 5 item 6).

Engine, resolver and peers as in test_engine (scripted DNS and SMTP, real certificates
and DANE verdicts); the assertions are on the steps each recipient's result carries.
"""

from __future__ import annotations

import pytest
from test_engine import (
    NOW,
    QUEUED,
    FakeResolver,
    Peer,
    cert_der,
    secure_domain,
    tlsa_3_1_1,
    world,
)

from relay.errors import DnsTempFail
from relay.model import Outcome, Step
from relay.smtp.reply import SmtpReply

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


def two_mx() -> FakeResolver:
    resolver = FakeResolver()
    resolver.domain(
        "secure.example",
        (10, "mx1.secure.example", "192.0.2.1"),
        (20, "mx2.secure.example", "192.0.2.2"),
    )
    resolver.set_tlsa("mx1.secure.example", tlsa_3_1_1(cert_der("mx1.secure.example")))
    resolver.set_tlsa("mx2.secure.example", tlsa_3_1_1(cert_der("mx2.secure.example")))
    return resolver


MX1_DANE_FAILED = Step(
    time=NOW,
    outcome=Outcome.DEFERRED,
    reply="451 4.7.5 Server certificate not verified (no-match)",
    host="mx1.secure.example",
    address="192.0.2.1",
    port=25,
    # The handshake succeeded, but no TLS level was reached: the peer was not authenticated
    # (relay.delivery.secure leaves tls "none" when DANE fails; nothing was sent).
    tls="none",
    dane="fail reason=no-match",
)


async def test_first_mx_fails_dane_second_delivers_two_steps() -> None:
    w = world(
        two_mx(),
        {
            "192.0.2.1": Peer(starttls=[cert_der("attacker.example")]),
            "192.0.2.2": Peer(starttls=[cert_der("mx2.secure.example")]),
        },
    )
    (r,) = await w.deliver("rcpt@secure.example")

    assert r.outcome is Outcome.DELIVERED
    assert r.history == (
        MX1_DANE_FAILED,
        Step(
            time=NOW,
            outcome=Outcome.DELIVERED,
            reply=str(QUEUED),
            host="mx2.secure.example",
            address="192.0.2.2",
            port=25,
            tls="verified",
            dane="pass reason=match",
        ),
    )
    assert r.history[-1].where == r.relay == "mx2.secure.example[192.0.2.2]:25"


async def test_second_mx_refusing_one_recipient_each_gets_its_own_last_step() -> None:
    unknown = SmtpReply(550, "5.1.1", "No such user")
    w = world(
        two_mx(),
        {
            "192.0.2.1": Peer(starttls=[cert_der("attacker.example")]),
            "192.0.2.2": Peer(
                starttls=[cert_der("mx2.secure.example")],
                rcpt={"gone@secure.example": unknown},
            ),
        },
    )
    ok, gone = await w.deliver("ok@secure.example", "gone@secure.example")

    assert (ok.outcome, gone.outcome) == (Outcome.DELIVERED, Outcome.BOUNCED)
    assert ok.history[0] == gone.history[0] == MX1_DANE_FAILED
    assert [(s.outcome, s.reply, s.tls) for s in (ok.history[1], gone.history[1])] == [
        (Outcome.DELIVERED, str(QUEUED), "verified"),
        (Outcome.BOUNCED, "550 5.1.1 No such user", "verified"),
    ]


async def test_every_mx_failing_ends_with_the_last_host_step() -> None:
    w = world(
        two_mx(),
        {
            "192.0.2.1": Peer(starttls=[cert_der("attacker.example")]),
            "192.0.2.2": Peer(extensions=frozenset()),  # no STARTTLS
        },
    )
    (r,) = await w.deliver("rcpt@secure.example")

    assert r.outcome is Outcome.DEFERRED
    assert [(s.host, s.address, s.tls, s.dane, s.reply) for s in r.history] == [
        (
            "mx1.secure.example",
            "192.0.2.1",
            "none",
            "fail reason=no-match",
            "451 4.7.5 Server certificate not verified (no-match)",
        ),
        (
            "mx2.secure.example",
            "192.0.2.2",
            "none",
            "fail reason=no-starttls",
            "451 4.7.4 TLS is required, but was not offered by host",
        ),
    ]


async def test_tlsa_lookup_failure_step_names_the_host_without_an_address() -> None:
    resolver = secure_domain()
    resolver.tlsa_answers["_25._tcp.mx1.secure.example"] = DnsTempFail("SERVFAIL")
    w = world(resolver, {})
    (r,) = await w.deliver("rcpt@secure.example")

    (step,) = r.history
    assert (step.host, step.address, step.port) == ("mx1.secure.example", "", 0)
    assert (step.outcome, step.tls, step.dane) == (
        Outcome.DEFERRED,
        "none",
        "fail reason=tlsa_lookup",
    )
    assert step.reply.startswith("451 4.7.5 ")
    assert w.transport.connections() == []


async def test_mx_lookup_failure_is_one_step_without_a_host() -> None:
    resolver = FakeResolver()
    resolver.mx_answers["secure.example"] = DnsTempFail()
    w = world(resolver, {})
    (r,) = await w.deliver("rcpt@secure.example")

    assert r.history == (Step(NOW, Outcome.DEFERRED, "451 4.4.3 DNS lookup failed"),)


async def test_an_internal_error_keeps_the_steps_made_before_it() -> None:
    """mx1 fails DANE; looking up mx2 then raises something unexpected (the fake resolver's
    AssertionError for an unscripted name): the domain is deferred 4.3.0 and the history
    still tells that mx1 failed DANE."""
    resolver = two_mx()
    del resolver.address_answers["mx2.secure.example"]
    w = world(resolver, {"192.0.2.1": Peer(starttls=[cert_der("attacker.example")])})
    (r,) = await w.deliver("rcpt@secure.example")
    assert (r.outcome, r.reply.code, r.reply.enhanced, r.reason) == (
        Outcome.DEFERRED,
        451,
        "4.3.0",
        "internal",
    )
    assert r.history[0] == MX1_DANE_FAILED
    assert len(r.history) == 2
    assert r.history[-1].reply == "451 4.3.0 Internal error while delivering, will retry"
