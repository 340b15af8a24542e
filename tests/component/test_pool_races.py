"""Connection reuse under event-ordering races: a reload while a delivery is under way, a
delivery cut off while it checks a cached session.

Uses the scripted resolver and SMTP peers of test_engine.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from test_engine import (
    FakeSession,
    FakeTransport,
    FirstLookupHeld,
    Peer,
    cert_der,
    insecure_mx_domain,
    secure_domain,
    world,
)

from relay.delivery.client import ConnectionLost, PeerReply, Phase
from relay.delivery.engine import EngineSettings
from relay.model import Outcome

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

ADDRESS = "192.0.2.1"


async def test_a_session_routed_under_the_settings_a_reload_replaced_is_not_reused() -> None:
    """A delivery that decided its route before a reload and connected after it must not
    leave its session in the cache: the reload dropped every verdict of the old settings.
    Here the old insecure_mx_policy "may" sent the first message in plaintext to a host
    with secure TLSA records (MX RRset insecure); under the new "dane" the next message
    must be deferred (no STARTTLS), not go on that plaintext session."""
    resolver = FirstLookupHeld(insecure_mx_domain(), "addresses")
    no_starttls = Peer(extensions=frozenset({"size", "pipelining"}))
    w = world(
        resolver,
        {ADDRESS: no_starttls},
        settings=EngineSettings(
            level="dane",
            helo_name="relay.example.net",
            insecure_mx_policy="may",
            connection_cache_time=5.0,
        ),
    )
    first = asyncio.create_task(w.deliver("a@hosted.example"))
    await resolver.entered.wait()  # MX looked up; the host's route is being decided
    # The reload, as relay.reload does it: the new settings, then the cache dropped.
    w.engine.settings = replace(w.engine.settings, insecure_mx_policy="dane")
    assert w.engine.cache.drop() == 0
    resolver.gate.set()
    (r1,) = await first
    assert r1.outcome is Outcome.DELIVERED  # begun under the old settings: plaintext
    assert w.transport.verbs() == ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert len(w.engine.cache) == 0

    (r2,) = await w.deliver("b@hosted.example")
    assert (r2.outcome, r2.reply.enhanced, r2.reason) == (
        Outcome.DEFERRED,
        "4.7.4",
        "dane_no_starttls",
    )
    assert w.transport.connections() == [ADDRESS, ADDRESS]
    assert w.transport.verbs().count("MAIL") == 1
    assert w.transport.verbs().count("RSET") == 0
    assert w.sample("dane_relay_connection_reuse_total", result="hit") is None


class RsetHangs(FakeSession):
    """Never answers RSET; `waiting` is set once the engine waits for that reply."""

    waiting: asyncio.Event

    async def read_reply(self, timeout: float) -> PeerReply | ConnectionLost:
        if self.phases and self.phases[0] is Phase.RSET:
            self.waiting.set()
            await asyncio.Event().wait()
        return await super().read_reply(timeout)


class RsetHangingTransport(FakeTransport):
    def __init__(self, peers: dict[str, Peer | list[Peer]]) -> None:
        super().__init__(peers)
        self.waiting = asyncio.Event()

    async def open(self, address: str, port: int) -> FakeSession:
        plain = await super().open(address, port)
        session = RsetHangs(self, address, plain.peer)
        session.waiting = self.waiting
        return session


async def test_a_delivery_cut_off_during_the_rset_of_a_cached_session_closes_it() -> None:
    """The relay stopping (runner.stop cancels the delivery) while RSET checks a session
    taken from the cache: the session is neither in the cache nor carrying mail any more,
    so it must be closed there, or its socket stays open until garbage collection."""
    w = world(
        secure_domain(),
        settings=EngineSettings(
            level="dane", helo_name="relay.example.net", connection_cache_time=5.0
        ),
    )
    transport = RsetHangingTransport({ADDRESS: Peer(starttls=[cert_der("mx1.secure.example")])})
    transport.expected_context = w.transport.expected_context
    w.engine.transport = transport
    (r1,) = await w.deliver("a@secure.example")
    assert r1.outcome is Outcome.DELIVERED
    assert len(w.engine.cache) == 1

    second = asyncio.create_task(w.deliver("b@secure.example"))
    await transport.waiting.wait()
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert transport.verbs()[-2:] == ["RSET", "ABORT"]
    assert len(w.engine.cache) == 0
    assert len(w.engine.slots) == 0  # the destination's slot was given back
