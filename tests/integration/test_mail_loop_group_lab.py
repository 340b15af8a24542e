"""Mail loop at an equal MX preference against the lab (issue 5; RFC 5321 §5.1).

loops.test has MX 10 mx1, 20 mx2, 20 mx2b, 30 mx3; the relay is named mx2.loops.test.
With mx1 down, the relay must defer (451 4.4.6) and never hand the mail to mx2b (its own
preference) or mx3. The relay before the change tried equal preferences in random order
and delivered to mx2b whenever it came before mx2: half of the messages, so with eight
messages the test fails on it with probability 1 - 2**-8.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lab import DnsLab, RelayProcess
from lab.hostile import metric, start_relay, submit
from lab.scripted_peer import PeerScript, ScriptedPeer

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
BODY = b"Subject: loop group\r\nMessage-ID: <group@sender.example>\r\n\r\nHello.\r\n"
MESSAGES = 8


@pytest.fixture
def loop_peers(dns_lab: DnsLab, tmp_path: Path) -> Iterator[list[ScriptedPeer]]:
    """Accepting peers, with their lab certificates (matching their TLSA), on mx2b and mx3."""
    peers = []
    for name in ("mx2b.loops.test", "mx3.loops.test"):
        mx = dns_lab.hosts[name]
        chain, key = mx.leaf.write(tmp_path, name)
        peers.append(ScriptedPeer(mx.address, PeerScript(), cert_chain=chain, key=key))
    try:
        yield peers
    finally:
        for peer in peers:
            peer.close()


def test_a_backup_relay_never_tries_a_host_of_its_own_preference(
    dns_lab: DnsLab, loop_peers: list[ScriptedPeer], relay_factory: RelayFactory
) -> None:
    # dead_destination_time 0: every message makes its own attempt (mx1 refused, then the
    # preference 20 group with the relay in it).
    # The relay's name is itself only at a port it listens on: it listens at 25 as well.
    relay = start_relay(
        relay_factory,
        {"delivery": {"dead_destination_time": '"0s"'}},
        hostname="mx2.loops.test",
        listen=[f"{dns_lab.relay_addr}:2525", f"{dns_lab.relay_addr}:25"],
    )
    mx1 = dns_lab.hosts["mx1.loops.test"].address
    for n in range(MESSAGES):
        qid = submit(relay, f"user{n}@loops.test", BODY)
        first = relay.attempt_line(qid, "deferred")
        assert f"relay=mx1.loops.test[{mx1}]:25" in first and "error=connect" in first
        loop = relay.wait_log(
            rf"queue_id={qid} to=<user{n}@loops\.test> relay=mx2\.loops\.test\[-\].*"
        )
        assert (
            'status=deferred reply="451 4.4.6 mail for loops.test loops back to myself '
            "(host name mx2.loops.test is this relay (server.hostname), MX preference 20); "
            'more preferred MX hosts did not take it"'
        ) in loop.group(0)
        relay.wait_log(
            rf"queue_id={qid} domain=loops\.test mail loop: MX host mx2\.loops\.test "
            r"\(preference 20\) is this relay .*; 2 MX host\(s\) of that preference or worse "
            r"not tried reason=mail_loop"
        )
        relay.wait_log(rf"queue_id={qid} deferred pending=1")
    mx2b, mx3 = loop_peers
    assert (mx2b.connections, mx3.connections) == (0, 0)
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="deferred", reason="mail_loop")
        == MESSAGES
    )
