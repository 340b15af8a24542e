"""Dead-destination suppression against the lab (issue 8): real relay process, nsd +
unbound, TLS receivers and scripted peers.

A destination whose every connection failed is suspended for `dead_destination_time`:
the next messages to it are deferred with `451 4.4.1 delivery temporarily suspended: …`
(error=dest_suspended) without a connection; `dane-relay queue flush` ends the suspension
and they are delivered. On the relay before the change every message connected again.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.hostile import metric, submit
from lab.scripted_peer import PeerScript, ScriptedPeer

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
BODY = b"Subject: dead destination\r\nMessage-ID: <dead@sender.example>\r\n\r\nHello.\r\n"


def _flush(relay: RelayProcess) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "flush", "-c", str(relay.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and "relay not running" not in done.stderr, done.stderr
    return done.stdout


def _deferred(relay: RelayProcess, rcpt: str) -> tuple[str, str]:
    """Submit, wait until the attempt is over; (queue id, its delivery line)."""
    qid = submit(relay, rcpt, BODY)
    line = relay.attempt_line(qid, "deferred")
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    return qid, line


def _lines(relay: RelayProcess, qid: str) -> list[str]:
    text = relay.log_path.read_text(errors="replace")
    return [
        line
        for line in text.splitlines()
        if "relay.delivery:" in line and f"queue_id={qid} " in line and " status=" in line
    ]


def test_a_down_receiver_suspends_its_destination_until_flush(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    address = dns_lab.hosts["mx.dane-ok.test"].address
    # No receiver: the connection is refused; the destination is suspended.
    first, line = _deferred(relay, "bob@dane-ok.test")
    assert f"relay=mx.dane-ok.test[{address}]:25" in line and "error=connect" in line
    relay.wait_log(rf"queue_id={first} domain=dane-ok.test destination suspended for 60s")
    later = [_deferred(relay, f"user{n}@dane-ok.test") for n in range(3)]
    for qid, line in later:
        assert "relay=none" in line and "error=dest_suspended" in line
        assert (
            'status=deferred reply="451 4.4.1 delivery temporarily suspended: '
            f"mx.dane-ok.test[{address}]:25: cannot connect: "
        ) in line
        assert len(_lines(relay, qid)) == 1  # no connection attempt line
    assert metric(relay, "dane_relay_suspended_deliveries_total") == 3
    assert metric(relay, "dane_relay_destination_suspensions_total") == 1
    assert (
        metric(
            relay, "dane_relay_delivery_attempts_total", result="deferred", reason="dest_suspended"
        )
        == 3
    )

    (receiver,) = receivers.start("dane-ok.test")
    assert _flush(relay).startswith("flushed 4 message(s)")
    relay.wait_log(r"destination suspensions lifted by queue flush destinations=1")
    got = receiver.wait_for(4, timeout=30)
    assert sorted(r for m in got for r in m.rcpt_tos) == [
        "bob@dane-ok.test",
        "user0@dane-ok.test",
        "user1@dane-ok.test",
        "user2@dane-ok.test",
    ]
    for qid in [first, *(q for q, _ in later)]:
        relay.wait_log(rf"queue_id={qid} removed", timeout=20)


@pytest.fixture
def hostile_peer(dns_lab: DnsLab, tmp_path: Path) -> Iterator[Callable[..., ScriptedPeer]]:
    made: list[ScriptedPeer] = []

    def make(greeting: str | None = PeerScript.greeting) -> ScriptedPeer:
        """A scripted peer on mx.hostile.test's address, with its lab certificate (which
        matches the host's 3 1 1 TLSA record)."""
        mx = dns_lab.hosts["mx.hostile.test"]
        chain, key = mx.leaf.write(tmp_path, f"mx.hostile.test-{len(made)}")
        peer = ScriptedPeer(mx.address, PeerScript(greeting=greeting), cert_chain=chain, key=key)
        made.append(peer)
        return peer

    try:
        yield make
    finally:
        for peer in made:
            peer.close()


def test_a_refusing_greeting_is_not_connected_to_again_while_suspended(
    hostile_peer: Callable[..., ScriptedPeer], relay_factory: RelayFactory
) -> None:
    busy = hostile_peer(greeting="421 4.3.2 Service not available, try later")
    relay = relay_factory()
    _qid, line = _deferred(relay, "a@hostile.test")
    assert 'reply="421 4.3.2 Service not available, try later"' in line
    later = [_deferred(relay, f"{name}@hostile.test") for name in ("b", "c")]
    for _qid, line in later:
        assert "error=dest_suspended" in line
        assert "Service not available, try later" in line  # the last reason
    assert busy.connections == 1  # the receiver saw the first attempt only

    busy.close()
    good = hostile_peer()
    _flush(relay)
    for name in ("a", "b", "c"):
        relay.wait_log(rf"queue_id=\S+ to=<{name}@hostile\.test> .*status=sent", timeout=30)
    assert len(good.messages) == 3
