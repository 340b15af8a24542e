"""Dead-destination suppression against deliveries running side by side.

An attempt gathers its connection failures and suspends the destination at its end; a
session another delivery opened to that destination meanwhile proves it up. The failure
evidence is then older than the success, and must not suspend the destination (Postfix
qmgr: a delivery that works clears the dead state)."""

from __future__ import annotations

import asyncio
import itertools
import time

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
from relay.delivery.pool import UP_KEPT, DeadDestinations
from relay.errors import ConnectFailed, Scope
from relay.model import Outcome

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

REFUSED = ConnectFailed("cannot connect: Connection refused", scope=Scope.HOST)
GOOD = Peer(starttls=[cert_der("mx1.secure.example")])


async def test_a_failure_older_than_another_deliverys_success_does_not_suspend() -> None:
    settings = EngineSettings(
        level="dane", helo_name="relay.example.net", connection_cache_time=0.0
    )
    w = world(secure_domain(), {}, settings=settings)
    # q1 takes the refusal and waits; later connections reach the peer.
    transport = FirstConnectHeld({"192.0.2.1": [Peer(connect_error=REFUSED), GOOD]})
    transport.expected_context = w.transport.expected_context
    w.engine.transport = transport
    q1 = asyncio.create_task(w.engine.deliver("q1", SENDER, ["a@secure.example"], BODY, RECEIVED))
    await transport.opened.wait()  # q1 is connecting
    (r2,) = await w.engine.deliver("q2", SENDER, ["b@secure.example"], BODY, RECEIVED)
    assert (r2.outcome, r2.reason) == (Outcome.DELIVERED, "sent")  # the destination is up
    transport.gate.set()
    (r1,) = await q1
    assert (r1.outcome, r1.reason) == (Outcome.DEFERRED, "connect")
    assert len(w.engine.dead) == 0  # before the fix: suspended by q1's old failure
    (r3,) = await w.engine.deliver("q3", SENDER, ["c@secure.example"], BODY, RECEIVED)
    assert (r3.outcome, r3.reason) == (Outcome.DELIVERED, "sent")  # not dest_suspended


async def test_failures_with_no_success_since_they_began_still_suspend() -> None:
    now = [100.0]
    dead = DeadDestinations(lambda: now[0])
    dead.reached("k")  # at 100
    assert dead.mark("k", "refused", 60.0, begun=100.0) is False  # reached as it began
    assert dead.suspended("k") is None
    now[0] = 101.0
    assert dead.mark("k", "refused", 60.0, begun=100.5) is True  # began after the success
    assert dead.suspended("k") == "refused"
    dead.reached("k")  # at 101: lifts it
    assert dead.suspended("k") is None
    assert dead.mark("other", "timeout", 60.0) is True  # no start given: as before
    assert dead.mark("other", "timeout", 0.0) is False  # suppression off


async def test_the_memory_of_successes_is_bounded() -> None:
    dead = DeadDestinations(lambda: 5.0)
    for i in range(UP_KEPT + 10):
        dead.reached(("k", i))
    assert len(dead._up) == UP_KEPT
    assert ("k", 0) not in dead._up and ("k", UP_KEPT + 9) in dead._up
    # Forgotten: an attempt still failing may suspend it, as before this memory.
    assert dead.mark(("k", 0), "refused", 60.0, begun=1.0) is True
    assert dead.mark(("k", UP_KEPT + 9), "refused", 60.0, begun=1.0) is False


async def test_a_delivery_failing_after_waiting_behind_a_success_still_suspends() -> None:
    """The start that counts is when the delivery holds its destination slot, on the
    suppression's clock: a delivery queued behind a success whose own connections all
    fail after it still suspends the destination (a review of the first version of the
    check, which took the start before the wait)."""
    settings = EngineSettings(
        level="dane",
        helo_name="relay.example.net",
        connection_cache_time=0.0,
        destination_concurrency=1,
    )
    w = world(secure_domain(), {}, settings=settings)
    # The destination answers once (q1), then refuses every connection.
    transport = FirstConnectHeld({"192.0.2.1": [GOOD, Peer(connect_error=REFUSED)]})
    transport.expected_context = w.transport.expected_context
    w.engine.transport = transport
    # Every reading of the suspension clock is later than the one before it.
    ticks = itertools.count(1)
    w.engine.dead.clock = lambda: time.monotonic() + next(ticks)
    q1 = asyncio.create_task(w.engine.deliver("q1", SENDER, ["a@secure.example"], BODY, RECEIVED))
    await transport.opened.wait()  # q1 holds the destination's only slot
    q2 = asyncio.create_task(w.engine.deliver("q2", SENDER, ["b@secure.example"], BODY, RECEIVED))
    for _ in range(5):
        await asyncio.sleep(0)  # q2 waits for the slot
    assert not q2.done()
    transport.gate.set()
    (r1,) = await q1
    assert (r1.outcome, r1.reason) == (Outcome.DELIVERED, "sent")
    (r2,) = await q2  # its only connection is refused after q1's success
    assert (r2.outcome, r2.reason) == (Outcome.DEFERRED, "connect")
    assert len(w.engine.dead) == 1  # before the fix: 0, q2's failure counted as old
    (r3,) = await w.engine.deliver("q3", SENDER, ["c@secure.example"], BODY, RECEIVED)
    assert (r3.outcome, r3.reason) == (Outcome.DEFERRED, "dest_suspended")
    assert transport.verbs("192.0.2.1").count("CONNECT") == 2  # q3 did not connect
