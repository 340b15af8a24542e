"""A reload (SIGHUP) landing while a delivery is under way: the delivery finishes under
the settings it started with (relay.reload's contract), never under a mix of the old
route and the new settings.

Uses the scripted resolver and SMTP peers of test_engine.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from test_engine import FirstLookupHeld, Peer, World, insecure_mx_domain, world

from relay.delivery.engine import EngineSettings
from relay.delivery.policymap import PolicyMap
from relay.model import Outcome

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

ADDRESS = "192.0.2.1"
# hosted.example: MX RRset insecure, its host's addresses and TLSA records secure.
NO_STARTTLS = Peer(extensions=frozenset({"size", "pipelining"}))
# Before: every domain at dane, insecure_mx_policy dane (the secure TLSA records of an
# MX host reached through an insecure MX RRset are enforced).
OLD = EngineSettings(level="dane", helo_name="relay.example.net", connection_cache_time=0.0)
# After: hosted.example gets its own entry, encrypt (TLS required), and every other dane
# domain may ignore TLSA records reached through an insecure MX RRset.
NEW = replace(
    OLD,
    insecure_mx_policy="may",
    policy=PolicyMap("dane", policy=(("hosted.example", "encrypt"),)),
)


def reload(w: World, settings: EngineSettings) -> None:
    """What relay.reload.Reloader._apply does to the engine, then the cache drop."""
    engine = w.engine
    engine.settings = settings
    engine.routes = settings.policy or engine.routes
    engine.cache.drop()


@pytest.mark.parametrize(
    ("settings", "reason"),
    [(OLD, "dane_no_starttls"), (NEW, "tls_not_offered")],
    ids=["old", "new"],
)
async def test_either_configuration_alone_defers_mail_to_a_peer_without_starttls(
    settings: EngineSettings, reason: str
) -> None:
    w = world(insecure_mx_domain(), {ADDRESS: NO_STARTTLS}, settings=settings)
    (r,) = await w.deliver("a@hosted.example")
    assert (r.outcome, r.reply.code, r.reply.enhanced, r.reason) == (
        Outcome.DEFERRED,
        451,
        "4.7.4",
        reason,
    )
    assert w.transport.verbs() == ["CONNECT", "EHLO", "QUIT", "ABORT"]


async def test_a_reload_during_the_mx_lookup_does_not_mix_the_old_route_with_new_settings() -> None:
    """The delivery read its route (hosted.example at the default level dane) before the
    reload and the MX lookup answered after it. Judged by the old configuration (dane,
    insecure_mx_policy dane) or by the new one (hosted.example at encrypt) the peer,
    which offers no STARTTLS, gets nothing; the old level with the new insecure_mx_policy
    "may" is opportunistic TLS, and the message went out in plaintext."""
    resolver = FirstLookupHeld(insecure_mx_domain(), "mx")
    w = world(resolver, {ADDRESS: NO_STARTTLS}, settings=OLD)
    first = asyncio.create_task(w.deliver("a@hosted.example"))
    await resolver.entered.wait()
    reload(w, NEW)
    resolver.gate.set()
    (r,) = await first
    assert (r.outcome, r.reply.enhanced, r.reason) == (
        Outcome.DEFERRED,
        "4.7.4",
        "dane_no_starttls",
    )
    assert "MAIL" not in w.transport.verbs()
    assert w.transport.verbs() == ["CONNECT", "EHLO", "QUIT", "ABORT"]
