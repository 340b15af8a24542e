"""SIGHUP applies a changed [gateway] whole (issue 5/7 review): on a running relay, the
inbound acceptance (which domains an outside client may send to) and the routes of the
local domains (next hop, TLS level) both switch to the new configuration.

The client (127.0.0.1) is outside relay.networks (192.0.2.0/24), so only gateway
domains are accepted from it. Before the reload local.example goes to mx.unsigned.test
at level may; after it, other.example goes to mx.dane-ok.test at dane-only and
local.example is refused.
"""

from __future__ import annotations

import re
import signal
import smtplib
from collections.abc import Callable

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess, send_mail
from lab.waiting import poll_until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(90)]

SENDER = "someone@sender.example"
BODY = b"Subject: gateway reload\r\nMessage-ID: <gwhup@sender.example>\r\n\r\nHUP.\r\n"
BEFORE = (
    "[gateway]\n"
    'domains = ["local.example"]\n'
    'next_hop = "[mx.unsigned.test]:25"\n'
    'tls_level = "may"\n'
)
AFTER = (
    "[gateway]\n"
    'domains = ["other.example"]\n'
    'next_hop = "[mx.dane-ok.test]:25"\n'
    'tls_level = "dane-only"\n'
)


def _queued(relay: RelayProcess, rcpt: str) -> str:
    host, port = relay.smtp_addr
    reply = send_mail(host, port, SENDER, [rcpt], BODY)
    assert reply.code == 250, reply
    match = re.search(r"queued as ([0-9A-F]+)", reply.text)
    assert match, reply
    return match.group(1)


def _refusal(relay: RelayProcess, rcpt: str) -> bytes:
    host, port = relay.smtp_addr
    with pytest.raises(smtplib.SMTPResponseException) as info:
        send_mail(host, port, SENDER, [rcpt], BODY)
    error: bytes | str = info.value.smtp_error  # bytes at run time; typeshed says str
    return f"{info.value.smtp_code} ".encode() + (
        error if isinstance(error, bytes) else error.encode()
    )


def test_sighup_switches_gateway_acceptance_and_routes_together(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: Callable[..., RelayProcess]
) -> None:
    internal_old, internal_new = receivers.start("unsigned.test", "dane-ok.test")
    relay = relay_factory(networks=["192.0.2.0/24"], log_level="info", extra=BEFORE)

    qid = _queued(relay, "bob@local.example")
    (msg,) = internal_old.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("bob@local.example",)
    assert relay.attempt_line(qid).endswith("level=may nexthop=[mx.unsigned.test]:25")
    assert b"550 5.7.1" in _refusal(relay, "bob@other.example")

    config = relay.config_path
    text = config.read_text()
    assert BEFORE in text
    config.write_text(text.replace(BEFORE, AFTER))
    relay.kill(signal.SIGHUP)
    poll_until(
        lambda: "reloaded config=" in relay.log_path.read_text(),
        timeout=10,
        what="the reload in the log",
    )
    applied = relay.wait_log(r"reloaded config=\S+ applied=(\S+)").group(1).split(",")
    assert applied == [
        "tls.policy",
        "delivery.transport",
        "gateway.domains",
        "gateway.next_hop",
        "gateway.tls_level",
    ]
    assert "need a restart" not in relay.log_path.read_text()

    # Acceptance follows the new domains ...
    refusal = _refusal(relay, "bob@local.example")
    assert b"550 5.7.1" in refusal and b"Relay access denied" in refusal
    qid = _queued(relay, "carol@other.example")
    # ... and so do the routes: the new next hop, at the new level (DANE verified).
    (msg,) = internal_new.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("carol@other.example",)
    line = relay.attempt_line(qid)
    assert "relay=mx.dane-ok.test[" in line and "dane=pass" in line
    assert line.endswith("level=dane-only nexthop=[mx.dane-ok.test]:25")
    assert len(internal_old.messages) == 1  # nothing more went to the old next hop
