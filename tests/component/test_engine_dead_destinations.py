"""Dead-destination suppression (issue 8; Postfix qmgr "delivery temporarily suspended").

Engine, scripted resolver and peers as in test_engine. After an attempt in which every
connection to a destination failed before a session was set up, the next messages to it
are deferred at once: no DNS lookup, no connection, reply `451 4.4.1 delivery temporarily
suspended: <last failure>`, reason dest_suspended. Every test fails on the engine before
the change, which connected again for each message.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from test_engine import (
    BODY,
    RECEIVED,
    SENDER,
    FakeResolver,
    FirstConnectHeld,
    Peer,
    cert_der,
    secure_domain,
    tlsa_3_1_1,
    world,
)

from relay.config import DeliveryConfig
from relay.delivery.engine import EngineSettings
from relay.errors import (
    ConnectFailed,
    DnsTempFail,
    PeerTimeout,
    PkixInvalid,
    PkixUntrusted,
    Scope,
    StartTlsRefused,
    TlsHandshakeFailed,
)
from relay.model import Outcome
from relay.smtp.reply import SmtpReply

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

REFUSED = ConnectFailed("cannot connect: Connection refused", scope=Scope.HOST)
GOOD = Peer(starttls=[cert_der("mx1.secure.example")])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _settings(dead: float = 60.0) -> EngineSettings:
    return EngineSettings(
        level="dane",
        helo_name="relay.example.net",
        connection_cache_time=0.0,
        dead_destination_time=dead,
    )


async def test_after_a_refused_connection_the_next_message_is_deferred_without_trying(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    w = world(secure_domain(), {"192.0.2.1": Peer(connect_error=REFUSED)})
    (first,) = await w.deliver("a@secure.example")
    assert (first.outcome, first.reason) == (Outcome.DEFERRED, "connect")
    calls = list(w.resolver.calls)

    (second,) = await w.deliver("b@secure.example")
    assert (second.outcome, second.reason) == (Outcome.DEFERRED, "dest_suspended")
    assert second.reply == SmtpReply(
        451,
        "4.4.1",
        "delivery temporarily suspended: mx1.secure.example[192.0.2.1]:25: "
        "cannot connect: Connection refused",
    )
    assert w.transport.connections() == ["192.0.2.1"]  # one connection, by the first only
    assert w.resolver.calls == calls  # and no DNS lookup either
    # The attempt history holds the suspension, with no host and no address.
    (step,) = second.history
    assert (step.outcome, step.host, step.address) == (Outcome.DEFERRED, "", "")
    assert step.reply.startswith("451 4.4.1 delivery temporarily suspended: ")
    lines = [r.getMessage() for r in caplog.records if "to=<b@secure.example>" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith("error=dest_suspended")
    assert "relay=none" in lines[0] and "status=deferred" in lines[0]
    marked = [r.getMessage() for r in caplog.records if "destination suspended" in r.getMessage()]
    assert len(marked) == 1 and "reason=dest_dead" in marked[0]
    assert w.sample("dane_relay_suspended_deliveries_total") == 1
    assert w.sample("dane_relay_destination_suspensions_total") == 1
    assert (
        w.sample("dane_relay_delivery_attempts_total", result="deferred", reason="dest_suspended")
        == 1
    )


@pytest.mark.parametrize(
    ("peer", "reason"),
    [
        (Peer(greeting=SmtpReply(421, "4.3.2", "Service not available")), "remote_4xx"),
        (Peer(greeting=SmtpReply(554, "5.3.2", "No service")), "remote_5xx"),
        (Peer(connect_error=PeerTimeout("timeout while connecting", scope=Scope.HOST)), "timeout"),
        (Peer(starttls=TlsHandshakeFailed(scope=Scope.HOST)), "tls_handshake"),
    ],
)
async def test_greeting_timeout_and_handshake_failures_also_suspend(
    peer: Peer, reason: str
) -> None:
    w = world(secure_domain(), {"192.0.2.1": peer})
    (first,) = await w.deliver("a@secure.example")
    assert first.reason == reason
    assert first.outcome is Outcome.DEFERRED  # never a bounce, even after a 554 greeting
    (second,) = await w.deliver("b@secure.example")
    assert (second.outcome, second.reason) == (Outcome.DEFERRED, "dest_suspended")
    assert len(w.transport.connections()) == 1


@pytest.mark.parametrize(
    "peer",
    [
        Peer(starttls=[cert_der("attacker.example")]),  # DANE verification fails
        Peer(
            starttls=[cert_der("mx1.secure.example")],
            rcpt={"a@secure.example": SmtpReply(450, "4.2.0", "Mailbox busy")},
        ),
        # Review 5b: certificate verdicts the handshake gives at levels verify/secure, and
        # a STARTTLS refused with 454 (as if not offered), are no connection failures.
        Peer(starttls=PkixInvalid("Server certificate not verified (expired)", scope=Scope.HOST)),
        Peer(starttls=PkixUntrusted(scope=Scope.HOST)),
        Peer(
            starttls=StartTlsRefused("Cannot start TLS: STARTTLS refused (454)", scope=Scope.HOST)
        ),
    ],
    ids=["dane-verification", "recipient-4xx", "pkix-invalid", "pkix-untrusted", "454"],
)
async def test_a_dane_verdict_or_a_recipient_reply_does_not_suspend(peer: Peer) -> None:
    w = world(secure_domain(), {"192.0.2.1": peer})
    (first,) = await w.deliver("a@secure.example")
    assert first.outcome is Outcome.DEFERRED
    (second,) = await w.deliver("a@secure.example")
    assert second.reason != "dest_suspended"
    assert len(w.transport.connections()) == 2
    assert w.sample("dane_relay_destination_suspensions_total") == 0


async def test_a_host_skipped_by_dns_beside_a_refused_one_does_not_suspend() -> None:
    # mx1's TLSA lookup fails (skipped, RFC 7672 §2.1), mx2 refuses: the destination was
    # not shown to be down, so the next message tries again.
    resolver = FakeResolver()
    resolver.domain(
        "secure.example",
        (10, "mx1.secure.example", "192.0.2.1"),
        (20, "mx2.secure.example", "192.0.2.2"),
    )
    resolver.tlsa_answers["_25._tcp.mx1.secure.example"] = DnsTempFail(
        "TLSA lookup failed", kind="servfail"
    )
    resolver.set_tlsa("mx2.secure.example", tlsa_3_1_1(cert_der("mx2.secure.example")))
    w = world(resolver, {"192.0.2.2": Peer(connect_error=REFUSED)})
    await w.deliver("a@secure.example")
    (second,) = await w.deliver("b@secure.example")
    assert second.reason == "connect"
    assert w.transport.connections() == ["192.0.2.2", "192.0.2.2"]


async def test_only_the_failed_destination_is_suspended() -> None:
    resolver = secure_domain()
    other = secure_domain("other.example", "mx.other.example", "192.0.2.7")
    resolver.mx_answers.update(other.mx_answers)
    resolver.address_answers.update(other.address_answers)
    resolver.tlsa_answers.update(other.tlsa_answers)
    peers: dict[str, Peer | list[Peer]] = {
        "192.0.2.1": Peer(connect_error=REFUSED),
        "192.0.2.7": Peer(starttls=[cert_der("mx.other.example")]),
    }
    w = world(resolver, peers)
    await w.deliver("a@secure.example")
    suspended, delivered = await w.deliver("b@secure.example", "c@other.example")
    assert suspended.reason == "dest_suspended"
    assert delivered.outcome is Outcome.DELIVERED


async def test_the_suspension_ends_after_dead_destination_time() -> None:
    w = world(secure_domain(), {"192.0.2.1": [Peer(connect_error=REFUSED), GOOD]})
    clock = Clock()
    w.engine.dead.clock = clock
    await w.deliver("a@secure.example")
    clock.now += 59.0
    (held,) = await w.deliver("b@secure.example")
    assert held.reason == "dest_suspended"
    clock.now += 1.0  # 60 s after the failure
    (sent,) = await w.deliver("b@secure.example")
    assert sent.outcome is Outcome.DELIVERED
    assert len(w.transport.connections()) == 2


async def test_lift_suspensions_lets_the_next_message_try_at_once() -> None:
    # `dane-relay queue flush` calls this (relay.app wires it as the runner's on_flush).
    w = world(secure_domain(), {"192.0.2.1": [Peer(connect_error=REFUSED), GOOD]})
    await w.deliver("a@secure.example")
    w.engine.lift_suspensions()
    (sent,) = await w.deliver("b@secure.example")
    assert sent.outcome is Outcome.DELIVERED
    assert len(w.engine.dead) == 0


async def test_zero_dead_destination_time_never_suspends() -> None:
    w = world(
        secure_domain(), {"192.0.2.1": Peer(connect_error=REFUSED)}, settings=_settings(dead=0)
    )
    for rcpt in ("a@secure.example", "b@secure.example", "c@secure.example"):
        (r,) = await w.deliver(rcpt)
        assert r.reason == "connect"
    assert len(w.transport.connections()) == 3
    assert w.sample("dane_relay_destination_suspensions_total") == 0


async def test_a_session_set_up_meanwhile_lifts_the_suspension() -> None:
    # Message 1 is connecting (slowly, and will succeed) when message 2's connection is
    # refused and suspends the destination; message 1's session then proves it is up.
    transport = FirstConnectHeld({"192.0.2.1": [GOOD, Peer(connect_error=REFUSED), GOOD]})
    w = world(secure_domain(), {})
    w.engine.transport = transport
    transport.expected_context = w.transport.expected_context
    first = asyncio.create_task(
        w.engine.deliver("q1", SENDER, ["a@secure.example"], BODY, RECEIVED)
    )
    await transport.opened.wait()
    (refused,) = await w.engine.deliver("q2", SENDER, ["b@secure.example"], BODY, RECEIVED)
    assert refused.reason == "connect"
    assert w.engine.dead.suspended(("dane", "secure.example", True, 25, 25)) is not None
    transport.gate.set()
    (sent,) = await first
    assert sent.outcome is Outcome.DELIVERED
    (third,) = await w.engine.deliver("q3", SENDER, ["c@secure.example"], BODY, RECEIVED)
    assert third.outcome is Outcome.DELIVERED  # tried: the suspension was lifted


async def test_dead_destination_time_default_is_the_config_default() -> None:
    assert EngineSettings(level="dane", helo_name="h").dead_destination_time == (
        DeliveryConfig().dead_destination_time
    )
