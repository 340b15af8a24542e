"""Gateway mode end to end (issue 6 acceptance): a real relay whose relay.networks excludes
the test client (127.0.0.1; networks = 192.0.2.0/24) accepts mail for its local domain
from that client and delivers it to the lab receiver mx.unsigned.test acting as the
internal next hop; the same client is refused 550 5.7.1 for an outside domain, for the
open-relay tricks, and 550 5.1.1 for an unknown local recipient."""

from __future__ import annotations

import os
import re
import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess, send_mail

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]

SENDER = "someone@sender.example"
BODY = b"Subject: inbound\r\nMessage-ID: <gw@sender.example>\r\n\r\nHello, internal world.\r\n"
GATEWAY = (
    "[gateway]\n"
    'domains = ["local.example"]\n'
    'recipients = ["bob@local.example", "carol@local.example"]\n'
    'next_hop = "[mx.unsigned.test]:25"\n'
)


def _metric(relay: RelayProcess, name: str, **labels: str) -> float:
    return relay.metrics().get((name, frozenset(labels.items())), 0.0)


def test_gateway_accepts_local_mail_from_anyone_and_delivers_it_to_the_next_hop(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (internal,) = receivers.start("unsigned.test")
    relay = relay_factory(networks=["192.0.2.0/24"], extra=GATEWAY)
    host, port = relay.smtp_addr
    reply = send_mail(host, port, SENDER, ["Bob@LOCAL.example"], BODY)
    assert reply.code == 250, reply
    match = re.search(r"queued as ([0-9A-F]+)", reply.text)
    assert match, reply
    qid = match.group(1)

    (msg,) = internal.wait_for(1, timeout=20)
    assert msg.mail_from == SENDER
    assert msg.rcpt_tos == ("Bob@LOCAL.example",)
    assert msg.content.endswith(b"Hello, internal world.\r\n")
    assert msg.tls is True  # gateway.tls_level "may": STARTTLS, as the receiver offers it
    assert re.search(
        rb"^Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
        rb"\tby relay\.test \(dane-relay\) with ESMTP id " + qid.encode() + rb"\r\n"
        rb"\tfor <Bob@LOCAL\.example>;\r\n",
        msg.content,
    ), msg.content[:300]
    line = relay.attempt_line(qid)
    assert "relay=mx.unsigned.test[" in line
    assert line.endswith("level=may nexthop=[mx.unsigned.test]:25")
    assert _metric(relay, "dane_relay_inbound_rejections_total", reason="relay_denied") == 0


def test_gateway_refuses_outside_domains_and_tricks_from_the_same_client(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (internal,) = receivers.start("unsigned.test")
    (outside,) = receivers.start("dane-ok.test")
    relay = relay_factory(networks=["192.0.2.0/24"], extra=GATEWAY)
    host, port = relay.smtp_addr
    refused = {
        "bob@dane-ok.test": (550, b"5.7.1 <bob@dane-ok.test>: Relay access denied"),
        "@local.example:bob@dane-ok.test": (
            550,
            b"5.7.1 <bob@dane-ok.test>: Relay access denied",
        ),
        "bob%dane-ok.test@local.example": (
            550,
            b"5.7.1 <bob%dane-ok.test@local.example>: Relay access denied",
        ),
        '"bob@dane-ok.test"@local.example': (
            550,
            b'5.7.1 <"bob@dane-ok.test"@local.example>: Relay access denied',
        ),
        "bob@[127.0.0.1]": (550, b"5.7.1 <bob@[127.0.0.1]>: Relay access denied"),
        "mallory@local.example": (
            550,
            b"5.1.1 <mallory@local.example>: Recipient address rejected: "
            b"User unknown in local recipient table",
        ),
    }
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=10) as client:
        client.ehlo()
        assert client.mail(SENDER)[0] == 250
        for rcpt, expected in refused.items():
            assert client.rcpt(f"<{rcpt}>") == expected, rcpt
        # The only recipient accepted in this transaction goes to the internal hop.
        assert client.rcpt("carol@local.example")[0] == 250
        code, _ = client.data(BODY)
        assert code == 250
    (msg,) = internal.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("carol@local.example",)
    relay.wait_log(
        r"reject=RCPT client=127\.0\.0\.1 from=<someone@sender\.example> "
        r'to=<bob@dane-ok\.test> reply="550 5\.7\.1" reason=relay-denied why=not-a-local-domain'
    )
    relay.wait_log(r'reply="550 5\.7\.1" reason=relay-denied why=sender-specified-routing')
    assert _metric(relay, "dane_relay_inbound_rejections_total", reason="relay_denied") == 5
    assert _metric(relay, "dane_relay_inbound_rejections_total", reason="unknown_recipient") == 1
    assert outside.messages == [] and outside.mail_commands == []


def test_recipients_file_is_read_again_when_it_changes(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    (internal,) = receivers.start("unsigned.test")
    rcpts = tmp_path / "recipients"
    rcpts.write_text("# mailboxes of the internal server\nbob@local.example\n")
    relay = relay_factory(
        networks=["192.0.2.0/24"],
        extra="[gateway]\n"
        'domains = ["local.example"]\n'
        f'recipients_file = "{rcpts}"\n'
        'next_hop = "[mx.unsigned.test]:25"\n',
    )
    host, port = relay.smtp_addr
    with pytest.raises(smtplib.SMTPResponseException) as info:
        send_mail(host, port, SENDER, ["dave@local.example"], BODY)
    assert (info.value.smtp_code, info.value.smtp_error) == (
        550,
        b"5.1.1 <dave@local.example>: Recipient address rejected: "
        b"User unknown in local recipient table",
    )
    new = tmp_path / "recipients.new"
    new.write_text("bob@local.example\ndave@local.example\n")
    os.replace(new, rcpts)
    assert send_mail(host, port, SENDER, ["dave@local.example"], BODY).code == 250
    relay.wait_log(rf"recipients_file={re.escape(str(rcpts))} reloaded entries=2")
    (msg,) = internal.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("dave@local.example",)
