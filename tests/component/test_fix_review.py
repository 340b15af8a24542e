"""Regressions found reviewing the fixes of 2026-12-04.

9a010e5 keeps an attempt's connection failures from suspending a destination that
another delivery reached after the attempt began. It took "began" before the wait for a
destination slot: a delivery queued behind a successful one, whose own connections all
failed after that success, could then never suspend the destination, and every delivery
queued at that moment tried (and waited out) its connections again, which the dead
destination state exists to spare (Postfix qmgr).
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from test_engine import (
    BODY,
    RECEIVED,
    SENDER,
    FakeSession,
    FakeTransport,
    Peer,
    cert_der,
    secure_domain,
    world,
)

from relay.delivery.engine import EngineSettings
from relay.errors import ConnectFailed, Scope
from relay.model import Outcome

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

REFUSED = ConnectFailed("cannot connect: Connection refused", scope=Scope.HOST)
GOOD = Peer(starttls=[cert_der("mx1.secure.example")])


class FirstConnectHeld(FakeTransport):
    """The first connection waits for `gate`, then goes on as scripted."""

    def __init__(self, peers: dict[str, Peer | list[Peer]]) -> None:
        super().__init__(peers)
        self.gate = asyncio.Event()
        self.opened = asyncio.Event()
        self.first = True

    async def open(self, address: str, port: int) -> FakeSession:
        if self.first:
            self.first = False
            self.opened.set()
            await self.gate.wait()
        return await super().open(address, port)


async def test_a_delivery_failing_after_waiting_behind_a_success_still_suspends() -> None:
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
