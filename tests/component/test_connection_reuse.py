"""Connection reuse and per-destination concurrency in relay.delivery.engine.

Uses the scripted resolver and SMTP peers of test_engine.py (real DANE verdicts from real
certificates). Every test asserts the sequence of SMTP commands the peers saw, the
connections opened and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest
from test_engine import (
    FULL_TRANSACTION,
    QUEUED,
    RECEIVED,
    SENDER,
    FakeResolver,
    FakeSession,
    FakeTransport,
    Peer,
    World,
    answer,
    cert_der,
    secure_domain,
    tlsa_3_1_1,
    world,
)

from relay.config import parse_next_hop
from relay.delivery.client import ConnectionLost, PeerReply
from relay.delivery.engine import EngineSettings
from relay.delivery.policymap import PolicyMap
from relay.delivery.pool import Channel, ConnectionCache, DestinationSlots
from relay.lookup.results import ResolverStatus, Security
from relay.model import Outcome
from relay.smtp.reply import SmtpReply

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

MX1 = "mx1.secure.example"
ADDRESS = "192.0.2.1"
SESSION = ["CONNECT", "EHLO", "STARTTLS", "EHLO"]
TRANSACTION = ["MAIL", "RCPT", "DATA"]


def settings(**overrides: object) -> EngineSettings:
    base = EngineSettings(level="dane", helo_name="relay.example.net")
    return replace(base, **overrides)  # type: ignore[arg-type]


def reusing(resolver: FakeResolver, peers: dict[str, Peer | list[Peer]], **kw: object) -> World:
    return world(resolver, peers, settings=settings(**{"connection_cache_time": 5.0, **kw}))


def verified_peer() -> Peer:
    return Peer(starttls=[cert_der(MX1)])


async def test_second_message_goes_on_the_cached_verified_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = reusing(secure_domain(), {ADDRESS: verified_peer()})
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (first,) = await w.deliver("a@secure.example")
        (second,) = await w.deliver("b@secure.example")

    assert (first.outcome, second.outcome) == (Outcome.DELIVERED, Outcome.DELIVERED)
    assert second.reply == QUEUED
    assert second.relay == f"{MX1}[{ADDRESS}]:25"
    # One connection, one handshake; RFC 5321 §4.1.1.5: RSET before the second MAIL.
    assert w.transport.verbs() == SESSION + TRANSACTION + ["RSET"] + TRANSACTION
    assert w.transport.connections() == [ADDRESS]
    # The second message needed no DNS: the destination's verdict came with the connection.
    assert [c[0] for c in w.resolver.calls] == ["MX", "A/AAAA", "TLSA"]
    assert w.sample("dane_relay_connection_reuse_total", result="hit") == 1
    assert w.sample("dane_relay_outbound_tls_total", level="verified") == 1
    assert w.sample("dane_relay_delivery_attempts_total", result="delivered", reason="sent") == 2
    lines = [r.getMessage() for r in caplog.records if "status=sent" in r.getMessage()]
    assert len(lines) == 2
    assert "conn=reused" not in lines[0]
    # The reused connection carries the DANE verdict of its setup (RFC 7672 §2.2).
    assert " tls=verified(TLSv1.3 TLS_AES_256_GCM_SHA384) dane=pass reason=match " in lines[1]
    assert f"tlsa_base={MX1}" in lines[1]
    assert lines[1].endswith(" conn=reused:1")


async def test_a_connection_that_does_not_answer_rset_is_replaced() -> None:
    stale = replace(verified_peer(), rset=ConnectionLost())
    w = reusing(secure_domain(), {ADDRESS: [stale, verified_peer()]})
    await w.deliver("a@secure.example")
    (second,) = await w.deliver("b@secure.example")

    assert second.outcome is Outcome.DELIVERED
    assert w.transport.verbs() == (
        SESSION + TRANSACTION + ["RSET", "ABORT"] + SESSION + TRANSACTION
    )
    assert w.sample("dane_relay_connection_reuse_total", result="stale") == 1
    assert w.sample("dane_relay_connection_reuse_total", result="hit") is None
    assert w.sample("dane_relay_outbound_tls_total", level="verified") == 2


async def test_a_refused_rset_is_stale_too() -> None:
    refusing = replace(verified_peer(), rset=SmtpReply(421, "4.4.2", "closing"))
    w = reusing(secure_domain(), {ADDRESS: [refusing, verified_peer()]})
    await w.deliver("a@secure.example")
    (second,) = await w.deliver("b@secure.example")
    assert second.outcome is Outcome.DELIVERED
    assert w.transport.connections() == [ADDRESS, ADDRESS]
    assert w.sample("dane_relay_connection_reuse_total", result="stale") == 1


async def test_reuse_limit_ends_the_connection_with_quit() -> None:
    w = reusing(secure_domain(), {ADDRESS: verified_peer()}, connection_reuse_limit=2)
    for rcpt in ("a", "b", "c"):
        (r,) = await w.deliver(f"{rcpt}@secure.example")
        assert r.outcome is Outcome.DELIVERED
    assert w.transport.verbs() == (
        SESSION + TRANSACTION + ["RSET"] + TRANSACTION + ["QUIT"] + SESSION + TRANSACTION
    )
    assert w.sample("dane_relay_connection_reuse_total", result="hit") == 1


async def test_idle_connection_is_closed_after_the_cache_time() -> None:
    w = reusing(secure_domain(), {ADDRESS: verified_peer()}, connection_cache_time=0.05)
    await w.deliver("a@secure.example")
    assert w.transport.verbs()[-1] == "DATA"  # kept open, waiting for the next message
    await asyncio.sleep(0.3)
    assert w.transport.verbs()[-1] == "QUIT"
    await w.deliver("b@secure.example")
    assert w.transport.connections() == [ADDRESS, ADDRESS]
    assert w.sample("dane_relay_connection_reuse_total", result="hit") is None


async def test_connection_older_than_the_reuse_time_is_not_reused() -> None:
    w = reusing(secure_domain(), {ADDRESS: verified_peer()}, connection_reuse_time=0.05)
    await w.deliver("a@secure.example")
    await asyncio.sleep(0.1)
    await w.deliver("b@secure.example")
    await asyncio.sleep(0)  # the too-old connection is QUIT in the background
    assert w.transport.connections() == [ADDRESS, ADDRESS]
    verbs = w.transport.verbs()
    assert verbs.count("QUIT") == 1 and "RSET" not in verbs
    assert verbs.count("MAIL") == 2


async def test_cache_time_zero_turns_reuse_off() -> None:
    w = reusing(secure_domain(), {ADDRESS: verified_peer()}, connection_cache_time=0.0)
    await w.deliver("a@secure.example")
    await w.deliver("b@secure.example")
    assert w.transport.verbs() == FULL_TRANSACTION + FULL_TRANSACTION


async def test_session_ended_by_421_is_not_cached() -> None:
    closing = replace(verified_peer(), mail=SmtpReply(421, "4.3.2", "shutting down"))
    w = reusing(secure_domain(), {ADDRESS: [closing, verified_peer()]})
    (first,) = await w.deliver("a@secure.example")
    (second,) = await w.deliver("b@secure.example")
    assert (first.outcome, second.outcome) == (Outcome.DEFERRED, Outcome.DELIVERED)
    # RFC 5321 §3.8: after a 421 no further command, so no RSET on it either (the RCPT
    # had gone out in the same PIPELINING batch as MAIL, RFC 2920 §3.1).
    assert w.transport.verbs() == SESSION + ["MAIL", "RCPT", "ABORT"] + SESSION + TRANSACTION


async def test_a_session_set_up_while_the_resolver_did_not_validate_is_not_reused_after() -> None:
    """RFC 7672 §2.2: once the resolver validates again, DANE applies at once; the cached
    encrypted-only session of the non-validating period must not carry the next message."""
    status = ResolverStatus(validating=False)
    w = world(
        secure_domain(),
        {ADDRESS: verified_peer()},
        settings=settings(connection_cache_time=5.0),
        resolver_status=status,
    )
    (first,) = await w.deliver("a@secure.example")
    assert first.outcome is Outcome.DELIVERED
    status.validating = True
    (second,) = await w.deliver("b@secure.example")
    assert second.outcome is Outcome.DELIVERED
    assert w.transport.connections() == [ADDRESS, ADDRESS]
    assert w.sample("dane_relay_outbound_tls_total", level="encrypted") == 1
    assert w.sample("dane_relay_outbound_tls_total", level="verified") == 1
    assert w.sample("dane_relay_connection_reuse_total", result="hit") is None


async def test_domains_do_not_share_connections_even_on_one_mx_host() -> None:
    resolver = secure_domain()
    resolver.domain("other.example", (10, MX1, ADDRESS))
    w = reusing(resolver, {ADDRESS: verified_peer()})
    await w.deliver("a@secure.example")
    await w.deliver("b@other.example")
    assert w.transport.connections() == [ADDRESS, ADDRESS]


async def test_a_connection_made_at_level_may_is_never_reused_at_level_dane() -> None:
    """Two domains through one smarthost, one at may, one at dane: two connections, each
    with its own verdict (the may session never carries dane mail)."""
    resolver = FakeResolver()
    resolver.address_answers["smart.example"] = answer("smart.example", "192.0.2.9")
    resolver.tlsa_answers["_25._tcp.smart.example"] = answer(
        "_25._tcp.smart.example", tlsa_3_1_1(cert_der("smart.example"))
    )
    routes = PolicyMap(
        "dane",
        policy=(("loose.example", "may"),),
        relayhost=parse_next_hop("[smart.example]"),
    )
    peer = Peer(starttls=[cert_der("smart.example")])
    w = reusing(resolver, {"192.0.2.9": peer}, policy=routes)
    await w.deliver("a@loose.example")
    await w.deliver("b@strict.example")
    await w.deliver("c@loose.example")
    await w.deliver("d@strict.example")
    assert w.transport.connections() == ["192.0.2.9", "192.0.2.9"]
    assert w.sample("dane_relay_outbound_tls_total", level="encrypted") == 1
    assert w.sample("dane_relay_outbound_tls_total", level="verified") == 1
    assert w.sample("dane_relay_connection_reuse_total", result="hit") == 2


async def test_one_smarthost_connection_carries_mail_for_many_domains() -> None:
    resolver = FakeResolver()
    resolver.address_answers["smart.example"] = answer("smart.example", "192.0.2.9")
    resolver.set_tlsa("smart.example", tlsa_3_1_1(cert_der("smart.example")))
    routes = PolicyMap("dane", relayhost=parse_next_hop("[smart.example]"))
    w = reusing(resolver, {"192.0.2.9": Peer(starttls=[cert_der("smart.example")])}, policy=routes)
    for domain in ("one.example", "two.example", "three.example"):
        (r,) = await w.deliver(f"x@{domain}")
        assert r.outcome is Outcome.DELIVERED
    assert w.transport.connections() == ["192.0.2.9"]
    assert w.sample("dane_relay_connection_reuse_total", result="hit") == 2


async def test_close_quits_every_cached_connection() -> None:
    resolver = secure_domain()
    resolver.domain("other.example", (10, "mx.other.example", "192.0.2.2"))
    resolver.set_tlsa("mx.other.example", security=Security.INSECURE)
    w = reusing(resolver, {ADDRESS: verified_peer(), "192.0.2.2": Peer()})
    await w.deliver("a@secure.example", "b@other.example")
    assert "QUIT" not in w.transport.verbs()
    await w.engine.close()
    assert w.transport.verbs(ADDRESS)[-1] == "QUIT"
    assert w.transport.verbs("192.0.2.2")[-1] == "QUIT"
    assert len(w.engine.cache) == 0


# -- per-destination concurrency ---------------------------------------------------------------


class SlowSession(FakeSession):
    """Yields to the loop before each reply, so concurrent deliveries overlap."""

    async def read_reply(self, timeout: float) -> PeerReply | ConnectionLost:
        await asyncio.sleep(0.01)
        return await super().read_reply(timeout)


class CountingTransport(FakeTransport):
    def __init__(self, peers: dict[str, Peer | list[Peer]]) -> None:
        super().__init__(peers)
        self.open_now = 0
        self.most_open = 0

    async def open(self, address: str, port: int) -> FakeSession:
        plain = await super().open(address, port)
        session = SlowSession(self, address, plain.peer)
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        for name in ("quit", "abort"):
            method = getattr(session, name)
            setattr(session, name, self._closing(method))
        return session

    def _closing(self, method):  # type: ignore[no-untyped-def]
        def close(*args: object):  # type: ignore[no-untyped-def]
            self.open_now -= 1
            return method(*args)

        return close


async def _concurrent(limit: int, messages: int) -> tuple[int, list[Outcome]]:
    w = world(
        secure_domain(),
        settings=settings(destination_concurrency=limit, connection_cache_time=0.0),
    )
    transport = CountingTransport({ADDRESS: verified_peer()})
    transport.expected_context = w.transport.expected_context
    w.engine.transport = transport
    results = await asyncio.gather(
        *(
            w.engine.deliver(f"Q{i:020X}", SENDER, [f"r{i}@secure.example"], b"x\r\n", RECEIVED)
            for i in range(messages)
        )
    )
    return transport.most_open, [r.outcome for (r,) in results]


async def test_destination_concurrency_bounds_open_connections() -> None:
    most_open, outcomes = await _concurrent(limit=2, messages=6)
    assert most_open == 2
    assert outcomes == [Outcome.DELIVERED] * 6


async def test_without_a_tight_limit_the_same_deliveries_overlap() -> None:
    """The control for the test above: the fakes do let six deliveries run at once."""
    most_open, outcomes = await _concurrent(limit=20, messages=6)
    assert most_open == 6
    assert outcomes == [Outcome.DELIVERED] * 6


# -- the pool on its own -----------------------------------------------------------------------


class Quitter:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ended: list[str] = []

    async def quit(self) -> None:
        self.ended.append("quit")

    def abort(self) -> None:
        self.ended.append("abort")


async def test_cache_hands_out_the_freshest_connection_once() -> None:
    now = [100.0]
    cache: ConnectionCache[Quitter, str] = ConnectionCache(5.0, 300.0, 10, clock=lambda: now[0])
    old, new = Quitter("old"), Quitter("new")
    assert cache.put("k", Channel(old, "v-old", opened=90.0))
    assert cache.put("k", Channel(new, "v-new", opened=99.0))
    first = cache.take("k")
    assert first is not None and first.session is new and first.verdict == "v-new"
    second = cache.take("k")
    assert second is not None and second.session is old
    assert cache.take("k") is None
    assert cache.take("other") is None
    assert len(cache) == 0


async def test_cache_refuses_used_up_and_old_connections() -> None:
    now = [1000.0]
    cache: ConnectionCache[Quitter, str] = ConnectionCache(5.0, 300.0, 3, clock=lambda: now[0])
    assert not cache.put("k", Channel(Quitter("a"), "", opened=999.0, uses=3))
    assert not cache.put("k", Channel(Quitter("b"), "", opened=700.0))
    aging = Quitter("c")
    assert cache.put("k", Channel(aging, "", opened=701.0))
    now[0] = 1001.5  # 300.5 s old by now: QUIT instead of handing it out
    assert cache.take("k") is None
    await asyncio.sleep(0)
    assert aging.ended == ["quit"]


async def test_destination_slots_forget_idle_destinations() -> None:
    slots = DestinationSlots(1)
    order: list[str] = []

    async def use(key: str, name: str) -> None:
        async with slots.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(0.01)
            order.append(f"{name}-")

    await asyncio.gather(use("a", "1"), use("a", "2"), use("b", "3"))
    # One at a time for "a", in arrival order; "b" is not held up by "a".
    assert order.index("1-") < order.index("2+")
    assert order.index("3+") < order.index("1-")
    assert len(slots) == 0
