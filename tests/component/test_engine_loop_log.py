"""The engine's mail-loop log line and duplicate recipients (issue 5 review).

Engine, scripted resolver and peers as in test_engine; the assertions are on the log
records of `relay.delivery`, the commands the peer saw and the per-recipient results.
"""

from __future__ import annotations

import logging
from functools import partial

import pytest
from test_engine import FakeResolver, Peer, cert_der, secure_domain, tlsa_3_1_1, world

from relay.config import Endpoint
from relay.delivery.route import Myself
from relay.model import Outcome

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


def _attempt_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "relay.delivery" and " status=" in r.getMessage()
    ]


async def test_a_best_mx_loop_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    myself = partial(Myself.of, "mx1.secure.example", (Endpoint("198.51.100.7", 25),))
    w = world(secure_domain(), {}, myself=myself)
    (r,) = await w.deliver("rcpt@secure.example")
    assert (r.outcome, r.reason) == (Outcome.BOUNCED, "mail_loop")
    (line,) = _attempt_lines(caplog)  # one attempt, one line (was two)
    assert "to=<rcpt@secure.example> relay=mx1.secure.example[-]" in line
    assert 'status=bounced reply="554 5.4.6 mail for secure.example loops back' in line
    assert line.endswith("error=mail_loop")
    assert len(r.history) == 1  # one step, as before
    assert w.sample("dane_relay_delivery_attempts_total", result="bounced", reason="mail_loop") == 1


async def test_a_backup_mx_loop_after_a_failed_best_mx_logs_each_host_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    resolver = FakeResolver()
    resolver.domain(
        "secure.example",
        (10, "mx1.secure.example", "192.0.2.1"),
        (20, "mx2.secure.example", "192.0.2.2"),
    )
    resolver.set_tlsa("mx1.secure.example", tlsa_3_1_1(cert_der("mx1.secure.example")))
    # The relay is mx2 (by its listen address at the delivery port).
    myself = partial(Myself.of, "relay.example.net", (Endpoint("192.0.2.2", 25),))
    w = world(resolver, {"192.0.2.1": Peer(starttls=[cert_der("attacker.example")])}, myself=myself)
    (r,) = await w.deliver("rcpt@secure.example")
    assert (r.outcome, r.reply.code, r.reply.enhanced) == (Outcome.DEFERRED, 451, "4.4.6")
    lines = _attempt_lines(caplog)
    assert len(lines) == 2, lines  # mx1's DANE failure, then the loop at mx2 once
    assert "relay=mx1.secure.example[192.0.2.1]:25" in lines[0]
    assert "relay=mx2.secure.example[-]" in lines[1] and lines[1].endswith("error=mail_loop")
    assert [s.host for s in r.history] == ["mx1.secure.example", "mx2.secure.example"]


async def test_a_recipient_listed_twice_gets_one_rcpt_and_the_same_result_twice() -> None:
    # An old spool file may hold a recipient twice: one RCPT, one outcome for both.
    peer = Peer(starttls=[cert_der("mx1.secure.example")])
    w = world(secure_domain(), {"192.0.2.1": peer})
    results = await w.deliver("rcpt@secure.example", "other@secure.example", "rcpt@secure.example")
    assert w.transport.verbs().count("RCPT") == 2
    assert [r.recipient for r in results] == [
        "rcpt@secure.example",
        "other@secure.example",
        "rcpt@secure.example",
    ]
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 3
    assert results[0] is results[2]
    sent = w.sample("dane_relay_delivery_attempts_total", result="delivered", reason="sent")
    assert sent == 2  # counted per recipient delivered, not per listing
