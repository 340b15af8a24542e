"""ConnectionCache.drop (a reload): no session set up before it is reused afterwards."""

from __future__ import annotations

import asyncio

import pytest
from test_connection_reuse import Quitter

from relay.delivery.pool import Channel, ConnectionCache

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


async def test_drop_quits_idle_sessions_and_refuses_those_put_back_later() -> None:
    now = [100.0]
    cache: ConnectionCache[Quitter, str] = ConnectionCache(5.0, 300.0, 10, clock=lambda: now[0])
    idle_a, idle_b, busy = Quitter("a"), Quitter("b"), Quitter("busy")
    assert cache.put("k1", Channel(idle_a, "old-verdict", opened=90.0))
    assert cache.put("k2", Channel(idle_b, "old-verdict", opened=95.0))
    in_use = Channel(busy, "old-verdict", opened=99.0)  # carrying mail during the reload

    now[0] = 101.0
    assert cache.drop() == 2
    assert len(cache) == 0
    await asyncio.sleep(0)
    assert (idle_a.ended, idle_b.ended) == (["quit"], ["quit"])
    assert cache.take("k1") is None

    # The session that was in use comes back after its transaction: not kept.
    assert cache.put("k1", Channel(busy, "old-verdict", opened=in_use.opened, uses=2)) is False
    # A session set up after the reload is cached and handed out as before.
    now[0] = 102.0
    fresh = Quitter("fresh")
    assert cache.put("k1", Channel(fresh, "new-verdict", opened=101.5))
    taken = cache.take("k1")
    assert taken is not None and taken.session is fresh and taken.verdict == "new-verdict"


async def test_drop_of_an_empty_cache_ends_nothing() -> None:
    cache: ConnectionCache[Quitter, str] = ConnectionCache(5.0, 300.0, 10, clock=lambda: 50.0)
    assert cache.drop() == 0
    assert cache.put("k", Channel(Quitter("x"), "", opened=50.5))
