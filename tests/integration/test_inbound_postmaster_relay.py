"""RFC 5321 §4.5.1 end to end: a real relay whose relay.networks excludes the test client
accepts RCPT TO:<postmaster> from it and delivers the message to the gateway's internal
next hop (the lab receiver mx.unsigned.test) as postmaster@<first gateway domain>, even
though the recipient list does not name postmaster; and warns at start when nobody is
named to receive postmaster mail."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Callable

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess, send_mail

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]

SENDER = "someone@sender.example"
BODY = b"Subject: for the postmaster\r\nMessage-ID: <pm@sender.example>\r\n\r\nHello.\r\n"
GATEWAY = (
    "[gateway]\n"
    'domains = ["local.example", "other.example"]\n'
    'recipients = ["bob@local.example"]\n'
    'next_hop = "[mx.unsigned.test]:25"\n'
)


def test_bare_postmaster_from_outside_reaches_the_internal_hop(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (internal,) = receivers.start("unsigned.test")
    relay = relay_factory(networks=["192.0.2.0/24"], extra=GATEWAY)
    host, port = relay.smtp_addr
    reply = send_mail(host, port, SENDER, ["Postmaster"], BODY)
    assert reply.code == 250, reply
    match = re.search(r"queued as ([0-9A-F]+)", reply.text)
    assert match, reply
    qid = match.group(1)

    (msg,) = internal.wait_for(1, timeout=20)
    assert msg.mail_from == SENDER
    assert msg.rcpt_tos == ("postmaster@local.example",)
    assert msg.content.endswith(b"Hello.\r\n")
    relay.wait_log(
        rf"queue_id={qid} client=127\.0\.0\.1 from=<someone@sender\.example> "
        r"to=<postmaster@local\.example> orig_to=<Postmaster> size=\d+ status=queued"
    )
    line = relay.attempt_line(qid)
    assert "relay=mx.unsigned.test[" in line
    assert (
        relay.metrics().get(
            ("dane_relay_inbound_rejections_total", frozenset({("reason", "relay_denied")})), 0.0
        )
        == 0
    )


def test_start_warns_when_no_postmaster_is_configured(
    dns_lab: DnsLab, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    relay.wait_log(
        r"WARNING .*server\.postmaster is not set and there is no \[gateway\]: the relay "
        r"cannot accept postmaster mail \(RFC 5321 section 4\.5\.1\)"
    )
    host, port = relay.smtp_addr
    with pytest.raises(smtplib.SMTPResponseException) as info:
        send_mail(host, port, SENDER, ["postmaster"], BODY)
    assert (info.value.smtp_code, info.value.smtp_error) == (
        550,
        b"5.1.1 <postmaster>: no postmaster address configured (server.postmaster)",
    )
