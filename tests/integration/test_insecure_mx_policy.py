"""insecure_mx_policy against the lab (RFC 7672 §2.2.1; Postfix smtp_tls_dane_insecure_mx_policy).

An unsigned domain (no DS: its MX RRset is insecure) names an MX host in a signed zone whose
addresses and TLSA records are secure. The MX name was not authenticated, so a DANE match
makes the session `trusted`, not `verified`; the policy decides whether DANE is used at all.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.hostile import metric, submit

RelayFactory = Callable[..., RelayProcess]

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]

BODY = b"Subject: insecure MX\r\n\r\nhello\r\n"


def test_insecure_mx_with_secure_tlsa_is_dane_and_logged_trusted(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory()  # insecure_mx_policy = "dane" (the default)
    qid = submit(relay, "bob@insecure-mx.test", BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.tls is True
    assert msg.rcpt_tos == ("bob@insecure-mx.test",)
    line = relay.attempt_line(qid)
    assert "relay=mx.dane-ok.test[" in line
    assert "dnssec=mx-insecure" in line
    assert "tls=trusted(" in line
    assert "dane=pass reason=match" in line
    assert metric(relay, "dane_relay_outbound_tls_total", level="trusted") == 1
    assert metric(relay, "dane_relay_outbound_tls_total", level="verified") == 0


def test_insecure_mx_policy_dane_still_defers_a_mismatch(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-bad.test")
    relay = relay_factory()
    qid = submit(relay, "bob@insecure-mx-bad.test", BODY)
    line = relay.attempt_line(qid, "deferred")
    # An insecure MX RRset does not switch DANE off for a host with secure TLSA records.
    assert "dane=fail reason=no-match" in line
    assert 'reply="451 4.7.5 Server certificate not verified' in line
    assert receiver.mail_commands == []


@pytest.mark.parametrize(
    ("policy", "tls"), [("may", "encrypted"), ("encrypt", "encrypted")], ids=["may", "encrypt"]
)
def test_insecure_mx_policy_may_and_encrypt_deliver_without_dane(
    dns_lab: DnsLab,
    receivers: ReceiverPool,
    relay_factory: RelayFactory,
    policy: str,
    tls: str,
) -> None:
    (receiver,) = receivers.start("dane-bad.test")
    relay = relay_factory(insecure_mx_policy=policy)
    qid = submit(relay, "bob@insecure-mx-bad.test", BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.tls is True
    line = relay.attempt_line(qid)
    assert "dnssec=mx-insecure" in line
    assert f"tls={tls}(" in line
    assert "dane=none" in line
    assert (
        metric(relay, "dane_relay_dane_verifications_total", result="failed", reason="mismatch")
        == 0
    )
