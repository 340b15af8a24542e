"""An address-literal relayhost (`[127.R.x.y]:25`, Postfix syntax) against a lab receiver.

Nothing is looked up for the next hop: the relay connects to the address as configured.
At level may it uses TLS; at level dane DANE cannot apply, as TLSA records are found only
by host name (RFC 7672 §2.2.2), so the mail goes opportunistically with reason
ip_literal, even though the receiver's host name has secure TLSA records; dane-only is a
configuration error. No SNI is sent (RFC 6066 §3).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess, write_relay_config
from lab.hostile import submit

RelayFactory = Callable[..., RelayProcess]

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]

BODY = b"Subject: literal next hop\r\n\r\nhello\r\n"


@pytest.mark.parametrize(
    ("level", "dane"),
    [
        ("may", "dane=none"),
        # RFC 7672 §2.2.2: no TLSA base domain for an address: opportunistic, reason logged.
        ("dane", "dane=none reason=ip_literal"),
    ],
)
def test_literal_relayhost_delivers_over_tls_without_sni(
    dns_lab: DnsLab,
    receivers: ReceiverPool,
    relay_factory: RelayFactory,
    level: str,
    dane: str,
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    hop = f"[{receiver.address}]:{receiver.port}"
    relay = relay_factory(tls_level=level, relayhost=hop)
    qid = submit(relay, ["bob@dane-ok.test"], BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert (msg.rcpt_tos, msg.tls) == (("bob@dane-ok.test",), True)
    assert receiver.server_names == [None]  # RFC 6066 §3: no SNI for an address
    sent = relay.attempt_line(qid, "sent")
    assert f"relay={receiver.address}[{receiver.address}]:{receiver.port} dnssec=- " in sent
    assert " tls=encrypted(" in sent
    assert f" {dane} " in sent
    assert sent.endswith(f"level={level} nexthop={hop}")


def test_literal_relayhost_at_dane_only_is_a_config_error(dns_lab: DnsLab, tmp_path: Path) -> None:
    config = write_relay_config(
        tmp_path / "relay.toml",
        listen=f"{dns_lab.relay_addr}:2525",
        spool_dir=tmp_path / "spool",
        resolvers=[dns_lab.resolver_addr],
        metrics_listen=f"{dns_lab.relay_addr}:9425",
        tls_level="dane-only",
        relayhost="[127.0.0.5]:2525",
    )
    out = subprocess.run(
        [sys.executable, "-m", "relay", "config", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 78
    assert out.stderr.startswith(
        f"dane-relay: {config}: delivery.relayhost: expected a next hop with a host name for "
        "TLS level 'dane-only' (set by tls.level), got '[127.0.0.5]:2525': an IP address has "
        "no name, and TLSA records are found only at _port._tcp.<host name> (RFC 7672 §2.2.2)"
    ), out.stderr
