"""relay.lookup.cache.AnswerCache: TTL bounds, negative caching, LRU size, coalescing.

The cache is driven with a fake clock (no sleeping) and real asyncio tasks. Upstream
lookups are coroutines that count their calls and can be held open on an asyncio.Event,
so "in flight at the same time" is a fact of the test, not a timing accident. The same
behaviour through the real resolver and a DNS server is in test_resolver_cache.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
from lab.observer import Observer

from relay.errors import DnsTempFail
from relay.lookup.cache import AnswerCache, cache_key
from relay.lookup.results import AnswerKind, DnsAnswer, Security

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Upstream:
    """Counts fetches per name; answers what `answers` says, or raises DnsTempFail."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.answers: dict[str, DnsAnswer[str] | DnsTempFail] = {}
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()  # set when a fetch has begun

    def fetch(self, name: str) -> Callable[[], Awaitable[DnsAnswer[str]]]:
        async def run() -> DnsAnswer[str]:
            self.calls[name] += 1
            self.started.set()
            if self.gate is not None:
                await self.gate.wait()
            result = self.answers[name]
            if isinstance(result, DnsTempFail):
                raise result
            return result

        return run


def data(name: str, ttl: float, security: Security = Security.SECURE) -> DnsAnswer[str]:
    return DnsAnswer(name, AnswerKind.DATA, security, ("192.0.2.1",), "", ttl)


def negative(name: str, kind: AnswerKind, ttl: float) -> DnsAnswer[str]:
    return DnsAnswer(name, kind, Security.SECURE, (), "", ttl)


def make(
    clock: Clock,
    observer: Observer | None = None,
    *,
    size: int = 100,
    min_ttl: float = 0.0,
    max_ttl: float = 3600.0,
    negative_ttl: float = 300.0,
) -> AnswerCache:
    return AnswerCache(
        size=size,
        min_ttl=min_ttl,
        max_ttl=max_ttl,
        negative_ttl=negative_ttl,
        clock=clock,
        observer=observer,
    )


async def test_cache_key_is_lower_case_without_the_final_dot() -> None:
    assert cache_key("Mail.Example.TEST.", "mx") == ("mail.example.test", "MX")
    assert cache_key(".", "dnskey") == (".", "DNSKEY")


async def test_hundred_concurrent_lookups_make_one_fetch_and_share_its_answer() -> None:
    clock, observer, upstream = Clock(), Observer(), Upstream()
    cache = make(clock, observer)
    upstream.answers["a.test"] = data("a.test", 300)
    upstream.gate = asyncio.Event()
    tasks = [
        asyncio.create_task(cache.lookup("a.test", "A", upstream.fetch("a.test")))
        for _ in range(100)
    ]
    await upstream.started.wait()
    assert upstream.calls["a.test"] == 1
    upstream.gate.set()
    answers = await asyncio.gather(*tasks)
    assert {a.records for a in answers} == {("192.0.2.1",)}
    assert upstream.calls["a.test"] == 1
    assert observer.cache == Counter({"miss": 1, "coalesced": 99})


async def test_positive_answer_is_kept_for_its_ttl_and_fetched_again_after() -> None:
    clock, observer, upstream = Clock(), Observer(), Upstream()
    cache = make(clock, observer)
    upstream.answers["a.test"] = data("a.test", 300)
    await cache.lookup("a.test", "A", upstream.fetch("a.test"))
    clock.now += 299.5
    hit = await cache.lookup("a.test", "A", upstream.fetch("a.test"))
    assert hit.ttl == pytest.approx(0.5)  # the age is taken off the TTL
    clock.now += 0.5
    await cache.lookup("a.test", "A", upstream.fetch("a.test"))
    assert upstream.calls["a.test"] == 2
    assert observer.cache == Counter({"miss": 2, "hit": 1})


@pytest.mark.parametrize(
    ("ttl", "min_ttl", "max_ttl", "kept"),
    [
        (5.0, 60.0, 3600.0, 60.0),  # raised to the minimum
        (86400.0, 0.0, 3600.0, 3600.0),  # lowered to the maximum
        (120.0, 60.0, 3600.0, 120.0),  # within bounds: as given
    ],
)
async def test_positive_ttl_is_clamped_to_the_configured_bounds(
    ttl: float, min_ttl: float, max_ttl: float, kept: float
) -> None:
    clock, upstream = Clock(), Upstream()
    cache = make(clock, min_ttl=min_ttl, max_ttl=max_ttl)
    upstream.answers["a.test"] = data("a.test", ttl)
    await cache.lookup("a.test", "A", upstream.fetch("a.test"))
    clock.now += kept - 0.001
    await cache.lookup("a.test", "A", upstream.fetch("a.test"))
    assert upstream.calls["a.test"] == 1
    clock.now += 0.001
    await cache.lookup("a.test", "A", upstream.fetch("a.test"))
    assert upstream.calls["a.test"] == 2


@pytest.mark.parametrize("kind", [AnswerKind.NXDOMAIN, AnswerKind.NODATA])
@pytest.mark.parametrize(
    ("ttl", "negative_ttl", "kept"),
    [
        (3600.0, 60.0, 60.0),  # the configured bound wins
        (10.0, 60.0, 10.0),  # the SOA-derived TTL wins
    ],
)
async def test_negative_answer_is_kept_for_the_smaller_of_its_ttl_and_the_bound(
    kind: AnswerKind, ttl: float, negative_ttl: float, kept: float
) -> None:
    clock, upstream = Clock(), Upstream()
    # min_ttl is a bound for positive answers only: it must not stretch a negative one.
    cache = make(clock, min_ttl=600.0, negative_ttl=negative_ttl)
    upstream.answers["n.test"] = negative("n.test", kind, ttl)
    first = await cache.lookup("n.test", "MX", upstream.fetch("n.test"))
    clock.now += kept - 0.001
    again = await cache.lookup("n.test", "MX", upstream.fetch("n.test"))
    assert (first.kind, again.kind, upstream.calls["n.test"]) == (kind, kind, 1)
    clock.now += 0.001
    await cache.lookup("n.test", "MX", upstream.fetch("n.test"))
    assert upstream.calls["n.test"] == 2


async def test_zero_ttl_answers_are_not_stored() -> None:
    clock, upstream = Clock(), Upstream()
    cache = make(clock)
    upstream.answers["z.test"] = data("z.test", 0)
    upstream.answers["n.test"] = negative("n.test", AnswerKind.NODATA, 0)
    for name in ("z.test", "z.test", "n.test", "n.test"):
        await cache.lookup(name, "A", upstream.fetch(name))
    assert upstream.calls == Counter({"z.test": 2, "n.test": 2})
    assert len(cache) == 0


async def test_failures_are_shared_by_coalesced_callers_and_never_stored() -> None:
    clock, observer, upstream = Clock(), Observer(), Upstream()
    cache = make(clock, observer)
    upstream.answers["f.test"] = DnsTempFail("SERVFAIL", kind="servfail")
    upstream.gate = asyncio.Event()
    tasks = [
        asyncio.create_task(cache.lookup("f.test", "MX", upstream.fetch("f.test")))
        for _ in range(10)
    ]
    await upstream.started.wait()
    upstream.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [getattr(r, "kind", None) for r in results] == ["servfail"] * 10
    assert upstream.calls["f.test"] == 1
    upstream.answers["f.test"] = data("f.test", 300)
    answer = await cache.lookup("f.test", "MX", upstream.fetch("f.test"))
    assert answer.kind is AnswerKind.DATA
    assert upstream.calls["f.test"] == 2
    assert observer.cache == Counter({"miss": 2, "coalesced": 9})


async def test_least_recently_used_entry_is_evicted_at_the_size_bound() -> None:
    clock, upstream = Clock(), Upstream()
    cache = make(clock, size=2)
    for name in ("a.test", "b.test", "c.test"):
        upstream.answers[name] = data(name, 300)
    await cache.lookup("a.test", "A", upstream.fetch("a.test"))
    await cache.lookup("b.test", "A", upstream.fetch("b.test"))
    await cache.lookup("a.test", "A", upstream.fetch("a.test"))  # a is now the most recent
    await cache.lookup("c.test", "A", upstream.fetch("c.test"))  # evicts b
    assert len(cache) == 2
    assert (("a.test", "A") in cache, ("b.test", "A") in cache) == (True, False)
    await cache.lookup("b.test", "A", upstream.fetch("b.test"))
    await cache.lookup("c.test", "A", upstream.fetch("c.test"))
    assert upstream.calls == Counter({"a.test": 1, "b.test": 2, "c.test": 1})


async def test_size_zero_stores_nothing_but_still_coalesces() -> None:
    clock, observer, upstream = Clock(), Observer(), Upstream()
    cache = make(clock, observer, size=0)
    upstream.answers["a.test"] = data("a.test", 300)
    await cache.lookup("a.test", "A", upstream.fetch("a.test"))
    await cache.lookup("a.test", "A", upstream.fetch("a.test"))
    assert upstream.calls["a.test"] == 2
    upstream.gate = asyncio.Event()
    tasks = [
        asyncio.create_task(cache.lookup("a.test", "A", upstream.fetch("a.test"))) for _ in range(5)
    ]
    await upstream.started.wait()
    upstream.gate.set()
    await asyncio.gather(*tasks)
    assert upstream.calls["a.test"] == 3
    assert len(cache) == 0
    assert observer.cache == Counter({"miss": 3, "coalesced": 4})


async def test_security_is_part_of_the_cached_value() -> None:
    clock, upstream = Clock(), Upstream()
    cache = make(clock)
    upstream.answers["s.test"] = data("s.test", 300, Security.SECURE)
    upstream.answers["i.test"] = data("i.test", 300, Security.INSECURE)
    for _ in range(2):
        secure = await cache.lookup("s.test", "A", upstream.fetch("s.test"))
        insecure = await cache.lookup("i.test", "A", upstream.fetch("i.test"))
        assert (secure.security, insecure.security) == (Security.SECURE, Security.INSECURE)
    assert upstream.calls == Counter({"s.test": 1, "i.test": 1})


async def test_types_and_names_are_separate_keys_and_names_ignore_case() -> None:
    clock, upstream = Clock(), Upstream()
    cache = make(clock)
    upstream.answers["a.test"] = data("a.test", 300)
    await cache.lookup("a.test", "A", upstream.fetch("a.test"))
    await cache.lookup("A.TEST.", "a", upstream.fetch("a.test"))
    assert upstream.calls["a.test"] == 1
    await cache.lookup("a.test", "AAAA", upstream.fetch("a.test"))
    assert upstream.calls["a.test"] == 2


async def test_a_cancelled_caller_does_not_cancel_the_shared_lookup() -> None:
    clock, upstream = Clock(), Upstream()
    cache = make(clock)
    upstream.answers["a.test"] = data("a.test", 300)
    upstream.gate = asyncio.Event()
    first = asyncio.create_task(cache.lookup("a.test", "A", upstream.fetch("a.test")))
    second = asyncio.create_task(cache.lookup("a.test", "A", upstream.fetch("a.test")))
    await upstream.started.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    upstream.gate.set()
    assert (await second).records == ("192.0.2.1",)
    assert upstream.calls["a.test"] == 1
    assert ("a.test", "A") in cache


async def test_clear_forgets_everything() -> None:
    clock, upstream = Clock(), Upstream()
    cache = make(clock)
    upstream.answers["a.test"] = data("a.test", 300)
    await cache.lookup("a.test", "A", upstream.fetch("a.test"))
    cache.clear()
    await cache.lookup("a.test", "A", upstream.fetch("a.test"))
    assert upstream.calls["a.test"] == 2


async def test_a_lookup_in_flight_during_clear_answers_its_callers_but_is_not_stored() -> None:
    # F9: the relay clears the cache when the resolver's validation state changes; an answer
    # fetched under the old state (here: insecure) must not be stored after the clear.
    clock, observer, upstream = Clock(), Observer(), Upstream()
    cache = make(clock, observer)
    upstream.answers["a.test"] = data("a.test", 300, Security.INSECURE)
    upstream.gate = asyncio.Event()
    before = [
        asyncio.create_task(cache.lookup("a.test", "A", upstream.fetch("a.test"))) for _ in range(3)
    ]
    await upstream.started.wait()
    cache.clear()
    upstream.gate.set()
    answers = await asyncio.gather(*before)
    assert [a.security for a in answers] == [Security.INSECURE] * 3
    assert ("a.test", "A") not in cache
    assert len(cache) == 0
    upstream.answers["a.test"] = data("a.test", 300, Security.SECURE)
    after = await cache.lookup("a.test", "A", upstream.fetch("a.test"))
    assert after.security is Security.SECURE
    assert upstream.calls["a.test"] == 2
    assert ("a.test", "A") in cache
    assert observer.cache == Counter({"miss": 2, "coalesced": 2})


async def test_a_caller_after_clear_does_not_join_the_lookup_of_the_old_generation() -> None:
    clock, observer = Clock(), Observer()
    cache = make(clock, observer)
    gate, started = asyncio.Event(), asyncio.Event()
    fetched: list[Security] = []

    def fetch(security: Security) -> Callable[[], Awaitable[DnsAnswer[str]]]:
        async def run() -> DnsAnswer[str]:
            fetched.append(security)
            started.set()
            await gate.wait()
            return data("a.test", 300, security)

        return run

    old = asyncio.create_task(cache.lookup("a.test", "A", fetch(Security.INSECURE)))
    await started.wait()
    cache.clear()
    new = asyncio.create_task(cache.lookup("a.test", "A", fetch(Security.SECURE)))
    gate.set()
    assert (await old).security is Security.INSECURE
    assert (await new).security is Security.SECURE
    assert fetched == [Security.INSECURE, Security.SECURE]
    assert observer.cache == Counter({"miss": 2})
    # Only the new generation's answer was stored, whichever lookup finished last.
    hit = await cache.lookup("a.test", "A", fetch(Security.INSECURE))
    assert (hit.security, len(fetched)) == (Security.SECURE, 2)
