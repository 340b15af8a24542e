"""The resolver's answer cache, seen from outside: queries counted at a scripted DNS server.

`DnsResolver` runs against `lab.scripted_dns.ScriptedDns` with an injected clock, so TTL
expiry is a clock step, never a sleep. Upstream traffic is what the server counted.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from lab.observer import Observer
from lab.scripted_dns import Answer, Hold, NoData, NxDomain, ScriptedDns, ServFail

from relay.config import DnsConfig
from relay.errors import DnsTempFail
from relay.lookup.resolver import DnsResolver
from relay.lookup.results import AnswerKind, MxRecord, Security

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

DOMAIN = "example.test"
HOST = "mx.example.test"
MX = f"10 {HOST}."


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def make(
    server: ScriptedDns, clock: Clock, observer: Observer | None = None, **cfg: Any
) -> DnsResolver:
    config = DnsConfig(resolvers=(server.endpoint,), timeout=0.5, **cfg)
    return DnsResolver(config, observer, clock=clock)


async def test_hundred_concurrent_lookups_are_one_upstream_query(server: ScriptedDns) -> None:
    gate = asyncio.Event()
    server.script(DOMAIN, "MX", Hold(Answer([MX]), gate))
    observer = Observer()
    resolver = make(server, Clock(), observer)
    tasks = [asyncio.create_task(resolver.mx(DOMAIN)) for _ in range(100)]
    await server.wait_count(DOMAIN, "MX", 1)
    gate.set()
    answers = await asyncio.gather(*tasks)
    assert {a.records for a in answers} == {(MxRecord(10, HOST),)}
    assert server.count(DOMAIN, "MX") == 1
    assert observer.lookups == [("MX", "secure")]
    assert observer.cache == Counter({"miss": 1, "coalesced": 99})


async def test_answer_is_requeried_once_its_ttl_has_passed(server: ScriptedDns) -> None:
    server.answer(DOMAIN, "MX", MX, ttl=300)
    clock, observer = Clock(), Observer()
    resolver = make(server, clock, observer)
    await resolver.mx(DOMAIN)
    clock.now += 299
    cached = await resolver.mx(DOMAIN)
    assert (cached.ttl, server.count(DOMAIN, "MX")) == (1, 1)
    clock.now += 1
    await resolver.mx(DOMAIN)
    assert server.count(DOMAIN, "MX") == 2
    assert observer.cache == Counter({"miss": 2, "hit": 1})


@pytest.mark.parametrize(
    ("ttl", "cfg", "kept"),
    [
        (5, {"cache_min_ttl": 60.0}, 60),
        (86400, {"cache_max_ttl": 600.0}, 600),
    ],
    ids=["min", "max"],
)
async def test_positive_ttl_is_clamped(
    server: ScriptedDns, ttl: int, cfg: dict[str, float], kept: int
) -> None:
    server.answer(DOMAIN, "MX", MX, ttl=ttl)
    clock = Clock()
    resolver = make(server, clock, **cfg)
    await resolver.mx(DOMAIN)
    clock.now += kept - 1
    await resolver.mx(DOMAIN)
    assert server.count(DOMAIN, "MX") == 1
    clock.now += 1
    await resolver.mx(DOMAIN)
    assert server.count(DOMAIN, "MX") == 2


@pytest.mark.parametrize("reply", [NoData(negative_ttl=3600), NxDomain(negative_ttl=3600)])
async def test_negative_answer_is_kept_no_longer_than_cache_negative_ttl(
    server: ScriptedDns, reply: NoData | NxDomain
) -> None:
    server.script(DOMAIN, "MX", reply)
    clock = Clock()
    resolver = make(server, clock, cache_negative_ttl=60.0)
    first = await resolver.mx(DOMAIN)
    clock.now += 59
    again = await resolver.mx(DOMAIN)
    assert first.kind is again.kind is not AnswerKind.DATA
    assert server.count(DOMAIN, "MX") == 1
    clock.now += 1
    await resolver.mx(DOMAIN)
    assert server.count(DOMAIN, "MX") == 2


async def test_negative_answer_with_a_shorter_soa_ttl_expires_at_that_ttl(
    server: ScriptedDns,
) -> None:
    server.script(DOMAIN, "MX", NoData(negative_ttl=20))
    clock = Clock()
    resolver = make(server, clock, cache_negative_ttl=300.0, cache_min_ttl=100.0)
    await resolver.mx(DOMAIN)
    clock.now += 20
    await resolver.mx(DOMAIN)
    assert server.count(DOMAIN, "MX") == 2


async def test_failures_are_not_cached(server: ScriptedDns) -> None:
    server.script(DOMAIN, "MX", ServFail(ede=6))
    observer = Observer()
    resolver = make(server, Clock(), observer)
    for _ in range(2):
        with pytest.raises(DnsTempFail):
            await resolver.mx(DOMAIN)
    assert server.count(DOMAIN, "MX") == 2
    server.answer(DOMAIN, "MX", MX)
    assert (await resolver.mx(DOMAIN)).records == (MxRecord(10, HOST),)
    assert observer.cache == Counter({"miss": 3})
    assert observer.lookups == [("MX", "bogus"), ("MX", "bogus"), ("MX", "secure")]


async def test_cache_size_bounds_entries_least_recently_used_first(server: ScriptedDns) -> None:
    names = [f"d{i}.test" for i in range(3)]
    for name in names:
        server.answer(name, "MX", MX)
    resolver = make(server, Clock(), cache_size=2)
    for name in (names[0], names[1], names[0], names[2], names[1], names[0]):
        await resolver.mx(name)
    # d1 was evicted by d2 (d0 had just been used), then d0 by d1's return.
    assert [server.count(n, "MX") for n in names] == [2, 2, 1]
    assert len(resolver.cache) == 2


async def test_cache_size_zero_still_coalesces(server: ScriptedDns) -> None:
    gate = asyncio.Event()
    server.script(DOMAIN, "MX", Hold(Answer([MX]), gate))
    resolver = make(server, Clock(), cache_size=0)
    tasks = [asyncio.create_task(resolver.mx(DOMAIN)) for _ in range(10)]
    await server.wait_count(DOMAIN, "MX", 1)
    gate.set()
    await asyncio.gather(*tasks)
    assert server.count(DOMAIN, "MX") == 1
    await resolver.mx(DOMAIN)
    assert server.count(DOMAIN, "MX") == 2


async def test_a_and_aaaa_are_cached_separately_and_only_the_failure_is_asked_again(
    server: ScriptedDns,
) -> None:
    server.answer(HOST, "A", "192.0.2.25")
    server.script(HOST, "AAAA", ServFail())
    resolver = make(server, Clock())
    for _ in range(2):
        answer = await resolver.addresses(HOST)
        assert (answer.records, answer.failed) == (("192.0.2.25",), ("AAAA",))
    assert (server.count(HOST, "A"), server.count(HOST, "AAAA")) == (1, 2)


async def test_security_is_cached_with_the_answer(server: ScriptedDns) -> None:
    server.answer(DOMAIN, "MX", MX, ad=False)
    server.answer(f"_25._tcp.{HOST}", "TLSA", "3 1 1 " + "00" * 32)
    resolver = make(server, Clock())
    for _ in range(2):
        assert (await resolver.mx(DOMAIN)).security is Security.INSECURE
        assert (await resolver.tlsa(HOST, 25)).security is Security.SECURE
    assert server.queries.total() == 2


async def test_names_are_cached_case_insensitively_and_reported_as_asked(
    server: ScriptedDns,
) -> None:
    server.answer(DOMAIN, "MX", MX)
    resolver = make(server, Clock())
    await resolver.mx(DOMAIN)
    answer = await resolver.mx("EXAMPLE.Test.")
    assert answer.name == "EXAMPLE.Test."
    assert server.count(DOMAIN, "MX") == 1


async def test_a_cname_chain_is_cached_under_the_name_asked(server: ScriptedDns) -> None:
    server.cname(f"www.{DOMAIN}", HOST, follow=False)
    server.answer(HOST, "MX", MX)
    observer = Observer()
    resolver = make(server, Clock(), observer)
    first = await resolver.mx(f"www.{DOMAIN}")
    second = await resolver.mx(f"www.{DOMAIN}")
    assert first.canonical == second.canonical == HOST
    assert server.queries.total() == 2  # www (CNAME) and its target, once each
    assert observer.lookups == [("MX", "secure"), ("CNAME", "secure")]
    assert observer.cache == Counter({"miss": 1, "hit": 1})


async def test_an_answer_in_flight_when_the_cache_is_cleared_is_not_kept(
    server: ScriptedDns,
) -> None:
    # F9: ResolverWatch clears the cache when the resolver's validation state changes; an
    # answer that was on its way under the old state (no AD) must not be cached after it.
    gate = asyncio.Event()
    server.script(DOMAIN, "MX", Hold(Answer([MX], ad=False), gate))
    resolver = make(server, Clock())
    in_flight = asyncio.create_task(resolver.mx(DOMAIN))
    await server.wait_count(DOMAIN, "MX", 1)
    resolver.cache.clear()
    gate.set()
    assert (await in_flight).security is Security.INSECURE  # its caller still gets it
    assert len(resolver.cache) == 0
    server.answer(DOMAIN, "MX", MX)  # the resolver validates now
    answer = await resolver.mx(DOMAIN)
    assert answer.security is Security.SECURE
    assert server.count(DOMAIN, "MX") == 2
