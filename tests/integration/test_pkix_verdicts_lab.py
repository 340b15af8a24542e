"""Certificate verdicts and a refused STARTTLS do not suspend a destination (review 5b f6).

Real relay process, nsd + unbound, a scripted peer on mx.dane-ok.test's lab address. At
level verify the peer presents a chain anchored at the configured CA (tls.ca_file) whose
leaf has expired, or answers STARTTLS with 454. docs/configuration.md "Dead destinations":
a DANE or PKIX verdict, or no TLS where TLS is required, never suspends. Before the fix
the expired chain was a plain handshake failure (error=tls_handshake), the destination was
suspended and the second message deferred "delivery temporarily suspended" without a
connection; so was the 454.
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lab import DnsLab, RelayProcess
from lab.hostile import metric, submit
from lab.scripted_peer import PeerScript, ScriptedPeer

pytestmark = [pytest.mark.lab, pytest.mark.timeout(90)]

RelayFactory = Callable[..., RelayProcess]
BODY = b"Subject: verdicts\r\nMessage-ID: <verdict@sender.example>\r\n\r\nHello.\r\n"
HOST = "mx.dane-ok.test"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ca_file(dns_lab: DnsLab, tmp_path: Path) -> Path:
    path = tmp_path / "lab-ca.pem"
    path.write_bytes(dns_lab.ca.cert_pem)
    return path


@pytest.fixture
def peer_at(dns_lab: DnsLab) -> Iterator[Callable[..., ScriptedPeer]]:
    made: list[ScriptedPeer] = []

    def make(script: PeerScript, **kwargs: object) -> ScriptedPeer:
        address = dns_lab.hosts[HOST].address
        peer = ScriptedPeer(address, script, port=_free_port(address), **kwargs)  # type: ignore[arg-type]
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def _two_attempts(relay: RelayProcess, peer: ScriptedPeer) -> tuple[str, str]:
    """One message after the other (the second after the first's attempt): both lines."""
    first = relay.attempt_line(submit(relay, "ann@dane-ok.test", BODY), "deferred")
    second = relay.attempt_line(submit(relay, "bob@dane-ok.test", BODY), "deferred")
    peer.wait_connections(2)
    return first, second


def test_an_expired_anchored_certificate_is_a_verdict_that_does_not_suspend(
    dns_lab: DnsLab,
    relay_factory: RelayFactory,
    peer_at: Callable[..., ScriptedPeer],
    ca_file: Path,
    tmp_path: Path,
) -> None:
    now = dt.datetime.now(dt.UTC)
    leaf = dns_lab.ca.issue(
        [HOST], not_before=now - dt.timedelta(days=20), not_after=now - dt.timedelta(days=1)
    )
    chain, key = leaf.write(tmp_path, "expired")
    peer = peer_at(PeerScript(), cert_chain=chain, key=key)
    relay = relay_factory(
        tls_level="verify",
        tls_ca_file=ca_file,
        extra=f'[delivery.transport]\n"dane-ok.test" = "[{HOST}]:{peer.port}"\n',
    )
    first, second = _two_attempts(relay, peer)
    reply = 'reply="451 4.7.5 Server certificate not verified (certificate has expired)"'
    for line in (first, second):
        assert reply in line
        assert " error=pkix_invalid " in f"{line} "
    assert peer.connections == 2  # the second message was tried too
    assert "destination suspended" not in relay.log_path.read_text(errors="replace")
    labels = {"result": "deferred", "reason": "pkix_invalid"}
    assert metric(relay, "dane_relay_delivery_attempts_total", **labels) == 2
    assert metric(relay, "dane_relay_destination_suspensions_total") == 0
    assert "MAIL" not in peer.verbs


def test_a_454_to_starttls_where_tls_is_required_does_not_suspend(
    relay_factory: RelayFactory, peer_at: Callable[..., ScriptedPeer], ca_file: Path
) -> None:
    peer = peer_at(PeerScript(starttls_reply="454 4.7.0 TLS not available due to load"))
    relay = relay_factory(
        tls_level="verify",
        tls_ca_file=ca_file,
        extra=f'[delivery.transport]\n"dane-ok.test" = "[{HOST}]:{peer.port}"\n',
    )
    first, second = _two_attempts(relay, peer)
    reply = (
        'reply="451 4.7.5 Cannot start TLS: STARTTLS refused '
        '(454 4.7.0 TLS not available due to load)"'
    )
    for line in (first, second):
        assert reply in line
        assert " error=starttls_refused " in f"{line} "
    assert peer.connections == 2
    assert metric(relay, "dane_relay_destination_suspensions_total") == 0
    assert "MAIL" not in peer.verbs
