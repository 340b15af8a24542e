"""Mail loop at an equal MX preference (issue 5; RFC 5321 §5.1).

Engine, scripted resolver and peers as in test_engine. The engine's random order of equal
preferences is replaced by `_AsListed` (no shuffle), so a host listed before the relay's
own entry at the same preference comes first: the engine before the change tried (and
delivered to) it; now every host of the preference is checked for "myself" before any is
tried, and none of that preference or worse is.
"""

from __future__ import annotations

import logging
import random
from collections.abc import MutableSequence
from functools import partial
from typing import Any

import pytest
from test_engine import FakeResolver, Peer, cert_der, tlsa_3_1_1, world

from relay.config import Endpoint
from relay.delivery.route import Myself
from relay.errors import ConnectFailed, DnsTempFail, Scope
from relay.model import Outcome

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

# The relay is 192.0.2.9 (its listen address at the delivery port).
MYSELF = partial(Myself.of, "relay.example.net", (Endpoint("192.0.2.9", 25),))


class _AsListed(random.Random):
    """Equal MX preferences in the order of the MX RRset."""

    def shuffle(self, x: MutableSequence[Any]) -> None:
        return None


def _resolver(*hosts: tuple[int, str, str]) -> FakeResolver:
    resolver = FakeResolver()
    resolver.domain("loops.example", *hosts)
    for _, name, _ in hosts:
        resolver.set_tlsa(name, tlsa_3_1_1(cert_der(name)))
    return resolver


def _attempt_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " status=" in r.getMessage()]


async def test_relay_at_the_best_preference_bounces_before_trying_an_equal_host(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    resolver = _resolver(
        (10, "peer.loops.example", "192.0.2.1"), (10, "me.loops.example", "192.0.2.9")
    )
    w = world(
        resolver, {"192.0.2.1": Peer(starttls=[cert_der("peer.loops.example")])}, myself=MYSELF
    )
    w.engine.rng = _AsListed()
    (r,) = await w.deliver("rcpt@loops.example")
    assert (r.outcome, r.reply.code, r.reply.enhanced) == (Outcome.BOUNCED, 554, "5.4.6")
    assert r.reply.text == (
        "mail for loops.example loops back to myself "
        "(address 192.0.2.9 is this relay's (server.listen))"
    )
    assert w.transport.log == []  # peer.loops.example was never contacted
    assert w.resolver.tlsa_lookups() == []  # nor its TLSA looked up
    # Each address looked up once: the check and the route share the answers.
    assert w.resolver.calls == [
        ("MX", "loops.example"),
        ("A/AAAA", "peer.loops.example"),
        ("A/AAAA", "me.loops.example"),
    ]
    (line,) = _attempt_lines(caplog)
    assert "relay=me.loops.example[-]" in line and line.endswith("error=mail_loop")
    decisions = [m.getMessage() for m in caplog.records if "mail loop: MX host" in m.getMessage()]
    assert decisions == [
        "queue_id=0123456789ABCDEF01234 domain=loops.example mail loop: MX host "
        "me.loops.example (preference 10) is this relay (address 192.0.2.9 is this relay's "
        "(server.listen)); 1 MX host(s) of that preference or worse not tried "
        "reason=mail_loop (RFC 5321 §5.1)"
    ]
    assert w.sample("dane_relay_delivery_attempts_total", result="bounced", reason="mail_loop") == 1


async def test_relay_as_backup_defers_without_trying_its_equal_or_worse_hosts() -> None:
    resolver = _resolver(
        (10, "mx1.loops.example", "192.0.2.1"),
        (20, "peer.loops.example", "192.0.2.2"),
        (20, "me.loops.example", "192.0.2.9"),
        (30, "mx3.loops.example", "192.0.2.3"),
    )
    peers: dict[str, Peer | list[Peer]] = {
        "192.0.2.1": Peer(connect_error=ConnectFailed("cannot connect: refused", scope=Scope.HOST)),
        "192.0.2.2": Peer(starttls=[cert_der("peer.loops.example")]),
        "192.0.2.3": Peer(starttls=[cert_der("mx3.loops.example")]),
    }
    w = world(resolver, peers, myself=MYSELF)
    w.engine.rng = _AsListed()
    (r,) = await w.deliver("rcpt@loops.example")
    assert (r.outcome, r.reply.code, r.reply.enhanced) == (Outcome.DEFERRED, 451, "4.4.6")
    assert r.reason == "mail_loop"
    assert w.transport.connections() == ["192.0.2.1"]  # the better MX only
    assert [s.host for s in r.history] == ["mx1.loops.example", "me.loops.example"]
    assert ("A/AAAA", "mx3.loops.example") not in w.resolver.calls  # worse: not looked up


async def test_relay_by_name_in_a_group_is_found_whatever_its_position() -> None:
    # By server.hostname; the relay listed first, and last, at the best preference.
    me = partial(Myself.of, "me.loops.example", (Endpoint("198.51.100.7", 25),))
    for hosts in (
        ((10, "me.loops.example", "192.0.2.9"), (10, "peer.loops.example", "192.0.2.1")),
        ((10, "peer.loops.example", "192.0.2.1"), (10, "me.loops.example", "192.0.2.9")),
    ):
        w = world(_resolver(*hosts), {}, myself=me)
        w.engine.rng = _AsListed()
        (r,) = await w.deliver("rcpt@loops.example")
        assert (r.outcome, r.reply.enhanced) == (Outcome.BOUNCED, "5.4.6")
        assert w.transport.log == []


async def test_a_group_without_the_relay_keeps_per_host_dane_semantics() -> None:
    # The relay is an MX at 20; at 10, peer1's TLSA lookup fails: only peer1 is skipped
    # (RFC 7672 §2.1), peer2 takes the message, the relay's own preference is never reached.
    resolver = _resolver(
        (10, "peer1.loops.example", "192.0.2.1"),
        (10, "peer2.loops.example", "192.0.2.2"),
        (20, "me.loops.example", "192.0.2.9"),
    )
    resolver.tlsa_answers["_25._tcp.peer1.loops.example"] = DnsTempFail(
        "TLSA lookup failed", kind="servfail"
    )
    peers: dict[str, Peer | list[Peer]] = {
        "192.0.2.2": Peer(starttls=[cert_der("peer2.loops.example")])
    }
    w = world(resolver, peers, myself=MYSELF)
    w.engine.rng = _AsListed()
    (r,) = await w.deliver("rcpt@loops.example")
    assert r.outcome is Outcome.DELIVERED
    assert r.relay == "peer2.loops.example[192.0.2.2]:25"
    assert [s.reply.split(" ", 2)[1] for s in r.history[:1]] == ["4.7.5"]
    assert w.transport.connections() == ["192.0.2.2"]
    assert ("A/AAAA", "me.loops.example") not in w.resolver.calls
    assert w.resolver.calls.count(("A/AAAA", "peer1.loops.example")) == 1


async def test_an_address_lookup_failure_in_the_group_is_not_a_loop() -> None:
    resolver = _resolver(
        (10, "broken.loops.example", "192.0.2.1"), (10, "peer.loops.example", "192.0.2.2")
    )
    resolver.address_answers["broken.loops.example"] = DnsTempFail("SERVFAIL", kind="servfail")
    w = world(
        resolver, {"192.0.2.2": Peer(starttls=[cert_der("peer.loops.example")])}, myself=MYSELF
    )
    w.engine.rng = _AsListed()
    (r,) = await w.deliver("rcpt@loops.example")
    assert r.outcome is Outcome.DELIVERED
    # The failed lookup is made once, for the check; the host's route reuses its failure.
    assert w.resolver.calls.count(("A/AAAA", "broken.loops.example")) == 1
