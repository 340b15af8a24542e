"""A SIGHUP ends the reuse of outbound connections set up under the old settings.

Review finding: a connection cached while `insecure_mx_policy = "may"` (no DANE for an
insecure MX RRset) kept carrying mail to a host whose secure TLSA records match nothing
after SIGHUP switched the policy to "dane" (RFC 7672 §2.2.1: it must then be verified).
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.hostile import submit

RelayFactory = Callable[..., RelayProcess]

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]

BODY = b"Subject: reload and reuse\r\n\r\nhello\r\n"


def test_sighup_to_insecure_mx_policy_dane_is_not_bypassed_by_a_cached_connection(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-bad.test")
    relay = relay_factory(insecure_mx_policy="may", start=False)
    # Keep the connection for longer than the test can take (the default is 5 s).
    text = relay.config_path.read_text()
    relay.config_path.write_text(
        text.replace("[delivery]\n", '[delivery]\nconnection_cache_time = "120s"\n', 1)
    )
    relay.start()
    first = submit(relay, "bob@insecure-mx-bad.test", BODY)
    receiver.wait_for(1, timeout=20)
    assert "dane=none" in relay.attempt_line(first)  # policy may: no DANE, cached

    config = relay.config_path
    text = config.read_text()
    assert 'insecure_mx_policy = "may"' in text
    config.write_text(text.replace('insecure_mx_policy = "may"', 'insecure_mx_policy = "dane"'))
    relay.kill(signal.SIGHUP)
    line = relay.wait_log(r"reloaded config=\S+ applied=(\S+) .*cached_connections_closed=(\d+)")
    assert "tls.insecure_mx_policy" in line.group(1).split(",")
    assert line.group(2) == "1"

    second = submit(relay, "bob@insecure-mx-bad.test", BODY)
    deferred = relay.attempt_line(second, "deferred")
    assert "conn=reused" not in deferred
    assert "dane=fail reason=no-match" in deferred
    assert 'reply="451 4.7.5 Server certificate not verified' in deferred
    assert len(receiver.messages) == 1  # only the message sent before the reload
