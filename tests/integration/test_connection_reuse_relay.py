"""Connection reuse and per-destination concurrency against the lab (issue 5 item 5).

A real relay process delivers to the lab's DANE-verified receiver (dane-ok.test, DNSSEC
signed, DANE-EE TLSA). The receiver records the SNI of every TLS handshake and the client
address and port of every message, so connections are counted on the receiving side; the
relay's metrics and log lines are checked against them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from lab import ReceiverPool, RelayProcess
from lab.hostile import metric, start_relay, submit

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
BODY = b"Subject: reuse\r\n\r\nHello.\r\n"


def _submit_all(relay: RelayProcess, count: int, clients: int) -> list[str]:
    """`count` messages, one per SMTP session, from `clients` client threads at once."""
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda i: submit(relay, f"user{i}@dane-ok.test", BODY), range(count)))


def test_200_messages_to_one_domain_reuse_verified_connections(
    receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory()
    qids = _submit_all(relay, 200, clients=4)

    messages = receiver.wait_for(200, timeout=120)
    assert sorted(m.rcpt_tos[0] for m in messages) == sorted(
        f"user{i}@dane-ok.test" for i in range(200)
    )
    assert all(m.tls for m in messages)
    handshakes = receiver.server_names
    connections = {m.peer for m in messages}
    # Far fewer TLS handshakes than messages: at most one per delivery slot (20).
    assert 1 <= len(handshakes) <= 20, len(handshakes)
    assert len(connections) == len(handshakes)
    assert set(handshakes) == {"mx.dane-ok.test"}  # RFC 7672 §8.1 SNI on each of them
    # The relay agrees: every handshake was DANE-verified; the rest were cache hits.
    for qid in qids:
        relay.wait_log(rf"queue_id={qid} removed", timeout=30)
    assert metric(relay, "dane_relay_outbound_tls_total", level="verified") == len(handshakes)
    assert metric(relay, "dane_relay_connection_reuse_total", result="hit") == 200 - len(handshakes)
    assert metric(relay, "dane_relay_connection_reuse_total", result="stale") == 0
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="delivered", reason="sent")
        == 200
    )
    # Each reused connection carries the DANE verdict of its setup, in every log line.
    lines = [relay.attempt_line(qid, "sent") for qid in qids]
    reused = [line for line in lines if re.search(r" conn=reused:\d+$", line)]
    assert len(reused) == 200 - len(handshakes)
    assert all("tls=verified(" in line and "dane=pass reason=match" in line for line in lines)


def test_destination_concurrency_bounds_connections_to_one_domain(
    receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    """Eight clients at once, destination_concurrency 2: never more than two connections
    to the destination, so (with reuse) never more than two handshakes in all."""
    (receiver,) = receivers.start("dane-ok.test")
    relay = start_relay(relay_factory, {"delivery": {"destination_concurrency": "2"}})
    _submit_all(relay, 40, clients=8)
    messages = receiver.wait_for(40, timeout=60)
    assert len(messages) == 40
    assert 1 <= len(receiver.server_names) <= 2
    assert len({m.peer for m in messages}) == len(receiver.server_names)


def test_without_reuse_every_message_has_its_own_handshake(
    receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    """The control: connection_cache_time = 0 turns reuse off."""
    (receiver,) = receivers.start("dane-ok.test")
    relay = start_relay(relay_factory, {"delivery": {"connection_cache_time": '"0s"'}})
    _submit_all(relay, 10, clients=2)
    receiver.wait_for(10, timeout=60)
    assert len(receiver.server_names) == 10
    assert metric(relay, "dane_relay_connection_reuse_total", result="hit") == 0
