"""Review of the DNS-side state (resolver trust, dead destinations): breaks found, each with
the test that showed it.

1. The engine read `ResolverStatus.validating` before waiting for a destination slot and
   judged the domain's hosts by that reading after the wait. A delivery queued behind a
   busy destination while the probe saw the resolver validate again (ResolverWatch flips
   the flag and empties the answer cache: "DANE is back on") then looked up secure TLSA
   and ignored it: level dane went out with opportunistic TLS to a peer whose certificate
   matches no TLSA record (RFC 7672 §2.1: DANE applies whenever the resolver validates).
   Engine, scripted resolver and peers as in test_engine.
"""

from __future__ import annotations

import asyncio

import pytest
from test_engine import (
    BODY,
    RECEIVED,
    SENDER,
    FirstConnectHeld,
    Peer,
    cert_der,
    secure_domain,
    world,
)

from relay.delivery.engine import EngineSettings
from relay.lookup.results import ResolverStatus
from relay.model import Outcome

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


async def test_a_delivery_waiting_for_a_slot_judges_its_hosts_by_the_trust_after_the_wait() -> None:
    status = ResolverStatus(validating=False, detail="probe answered without AD")
    settings = EngineSettings(
        level="dane",
        helo_name="relay.example.net",
        connection_cache_time=0.0,
        destination_concurrency=1,
    )
    attacker = Peer(starttls=[cert_der("attacker.example")])
    w = world(secure_domain(), {}, resolver_status=status, settings=settings)
    transport = FirstConnectHeld({"192.0.2.1": attacker})
    transport.expected_context = w.transport.expected_context
    w.engine.transport = transport

    first = asyncio.create_task(
        w.engine.deliver("q1", SENDER, ["a@secure.example"], BODY, RECEIVED)
    )
    await transport.opened.wait()  # q1 holds the destination's only slot, connecting
    second = asyncio.create_task(
        w.engine.deliver("q2", SENDER, ["b@secure.example"], BODY, RECEIVED)
    )
    for _ in range(5):
        await asyncio.sleep(0)
    assert not second.done()  # waiting for the slot: nothing looked up for it yet
    assert len(w.resolver.calls) == 2  # q1's MX and A/AAAA (no TLSA: not validating)

    # The probe sees the resolver validate again (ResolverWatch: flag, then cache cleared).
    status.validating = True
    transport.gate.set()
    (r1,) = await first
    assert r1.outcome is Outcome.DELIVERED  # began before the flip: opportunistic TLS
    (r2,) = await second
    # Before the fix: DELIVERED to the attacker's certificate, no TLSA looked up.
    assert (r2.outcome, r2.reason) == (Outcome.DEFERRED, "dane_verification")
    assert w.resolver.tlsa_lookups() == ["_25._tcp.mx1.secure.example"]
