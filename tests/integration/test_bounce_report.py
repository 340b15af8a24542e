"""Acceptance (issue 6): a message to a 550 receiver bounces ONCE to its sender with a valid
RFC 3464 report, which the test receives and parses back; and a message that stays
deferred past delivery.delay_warning_after gets ONE delay warning (Action: delayed).

The recipient's MX is a scripted peer on mx1.hostile2.test (DANE-EE TLSA matching its lab
certificate) that answers RCPT with 550; the sender's domain is the lab's dane-ok.test,
whose receiver runs, so the DSN really travels back through the relay's delivery.
(tests/integration/test_attempt_history_relay.py reads a DSN left in the spool for its
attempt history; this one checks the report as the sender gets it.)
"""

from __future__ import annotations

import email
import email.message
import email.utils
import json
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.hostile import spool_entries, start_relay, submit
from lab.scripted_peer import PeerScript, ScriptedPeer
from lab.waiting import poll_until

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
SENDER = "alice@dane-ok.test"
BODY = (
    b"From: Alice <alice@dane-ok.test>\r\n"
    b"Subject: to a 550 receiver\r\n"
    b"Message-ID: <bounce-once@dane-ok.test>\r\n"
    b"\r\n"
    b"This body must not come back in the report.\r\n"
)
REFUSAL = "550 5.1.1 No such user here"


@pytest.fixture
def refusing_mx(dns_lab: DnsLab, tmp_path: Path) -> Iterator[ScriptedPeer]:
    mx = dns_lab.hosts["mx1.hostile2.test"]
    chain, key = mx.leaf.write(tmp_path, "mx1.hostile2.test-550")
    peer = ScriptedPeer(
        mx.address,
        PeerScript(rcpt_replies={"bob@hostile2.test": REFUSAL}),
        cert_chain=chain,
        key=key,
    )
    try:
        yield peer
    finally:
        peer.close()


def parts(payload: object) -> list[email.message.Message]:
    assert isinstance(payload, list)
    assert all(isinstance(p, email.message.Message) for p in payload)
    return payload


def test_550_bounces_once_with_a_valid_rfc3464_report(
    dns_lab: DnsLab,
    receivers: ReceiverPool,
    refusing_mx: ScriptedPeer,
    relay_factory: RelayFactory,
) -> None:
    (sender_mx,) = receivers.start("dane-ok.test")
    relay = relay_factory()
    qid = submit(relay, "bob@hostile2.test", BODY, sender=SENDER)

    dsn_id = relay.wait_log(
        rf"queue_id={qid} sender non-delivery notification: ([0-9A-F]+)", timeout=20
    ).group(1)
    relay.wait_log(rf"queue_id={qid} removed", timeout=20)
    relay.wait_log(rf"queue_id={dsn_id} removed", timeout=20)
    assert spool_entries(relay, "env") == []  # nothing left that could bounce again

    (received,) = sender_mx.wait_for(1, timeout=20)
    assert sender_mx.messages == [received]  # once
    assert received.mail_from == ""  # the null reverse-path (RFC 5321 §4.5.5)
    assert received.rcpt_tos == (SENDER,)
    assert received.tls is True
    assert refusing_mx.verbs.count("RCPT") == 1

    report = email.message_from_bytes(received.content)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["To"] == f"<{SENDER}>"
    assert report["Auto-Submitted"] == "auto-replied"
    text, status, headers = parts(report.get_payload())
    assert [p.get_content_type() for p in (text, status, headers)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]

    per_message, per_rcpt = parts(status.get_payload())
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_message["X-Queue-ID"] == qid
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) is not None
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@hostile2.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx1.hostile2.test"
    assert per_rcpt["Diagnostic-Code"] == f"smtp; {REFUSAL}"
    assert email.utils.parsedate_to_datetime(per_rcpt["Last-Attempt-Date"]) is not None

    returned = headers.get_payload()
    assert isinstance(returned, str)
    assert "Message-ID: <bounce-once@dane-ok.test>" in returned
    assert b"This body must not come back" not in received.content
    told = text.get_payload(decode=True)
    assert isinstance(told, bytes)
    assert f"<bob@hostile2.test>: {REFUSAL} (from mx1.hostile2.test)" in told.decode("ascii")


BUSY = "451 4.2.0 Mailbox busy, try later"


@pytest.fixture
def busy_mxes(dns_lab: DnsLab, tmp_path: Path) -> Iterator[list[ScriptedPeer]]:
    """Both MX hosts of hostile2.test answer RCPT for bob with 451, every time."""
    made = []
    for host in ("mx1.hostile2.test", "mx2.hostile2.test"):
        mx = dns_lab.hosts[host]
        chain, key = mx.leaf.write(tmp_path, f"{host}-451")
        script = PeerScript(rcpt_replies={"bob@hostile2.test": BUSY})
        made.append(ScriptedPeer(mx.address, script, cert_chain=chain, key=key))
    try:
        yield made
    finally:
        for peer in made:
            peer.close()


def test_deferred_message_gets_one_delay_warning(
    receivers: ReceiverPool, busy_mxes: list[ScriptedPeer], relay_factory: RelayFactory
) -> None:
    (sender_mx,) = receivers.start("dane-ok.test")
    relay = start_relay(
        relay_factory,
        {
            "delivery": {
                "min_backoff": '"1s"',
                "max_backoff": '"1s"',
                "delay_warning_after": '"1s"',
            }
        },
    )
    qid = submit(relay, "bob@hostile2.test", BODY, sender=SENDER)
    warning_id = relay.wait_log(
        rf"queue_id={qid} sender delay notification: ([0-9A-F]+) delayed=<bob@hostile2\.test>",
        timeout=30,
    ).group(1)
    relay.wait_log(rf"queue_id={warning_id} removed", timeout=20)

    def deferrals() -> int:
        return relay.log_path.read_text().count(f"queue_id={qid} deferred pending=1")

    # Two more attempts after the warning: still one warning.
    after_warning = deferrals()
    poll_until(lambda: deferrals() >= after_warning + 2, timeout=30, what="two more attempts")
    assert relay.log_path.read_text().count(f"queue_id={qid} sender delay notification") == 1
    record = json.loads((spool_dir(relay) / "env" / qid).read_bytes())
    assert record["delay_warned"] is True

    (received,) = sender_mx.messages
    assert (received.mail_from, received.rcpt_tos) == ("", (SENDER,))
    report = email.message_from_bytes(received.content)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Subject"] == "Delayed Mail (still being retried)"
    _text, status, headers = parts(report.get_payload())
    per_message, per_rcpt = parts(status.get_payload())
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@hostile2.test"
    assert per_rcpt["Action"] == "delayed"
    assert per_rcpt["Status"] == "4.2.0"
    assert per_rcpt["Diagnostic-Code"] == f"smtp; {BUSY}"
    arrival = email.utils.parsedate_to_datetime(per_message["Arrival-Date"])
    until = email.utils.parsedate_to_datetime(per_rcpt["Will-Retry-Until"])
    assert (until - arrival).total_seconds() == 5 * 86400  # max_queue_lifetime default
    assert "Message-ID: <bounce-once@dane-ok.test>" in str(headers.get_payload())


def spool_dir(relay: RelayProcess) -> Path:
    return Path(tomllib.loads(relay.config_path.read_text())["spool"]["directory"])


def test_a_mail_loop_bounce_names_no_remote_mta_and_types_its_text_as_the_relays(
    receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    # Review 5b f3: the next hop of hostile2.test is the relay itself (its server.hostname,
    # at the port it listens on): bounced 554 5.4.6 without any connection. RFC 3464
    # §2.3.5: no server was contacted, so no Remote-MTA; §2.3.6: the text is the relay's,
    # not an SMTP reply. Before the fix: "Remote-MTA: dns; mx1.hostile2.test" and
    # "Diagnostic-Code: smtp; 554 5.4.6 ...".
    (sender_mx,) = receivers.start("dane-ok.test")
    relay = relay_factory(
        hostname="mx1.hostile2.test",
        extra='[delivery.transport]\n"hostile2.test" = "[mx1.hostile2.test]:2525"\n',
    )
    qid = submit(relay, "bob@hostile2.test", BODY, sender=SENDER)
    assert "554 5.4.6" in relay.attempt_line(qid, "bounced")
    (received,) = sender_mx.wait_for(1, timeout=20)
    report = email.message_from_bytes(received.content)
    text, status, _headers = parts(report.get_payload())
    _per_message, per_rcpt = parts(status.get_payload())
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@hostile2.test"
    assert per_rcpt["Status"] == "5.4.6"
    assert per_rcpt["Remote-MTA"] is None
    assert per_rcpt["Diagnostic-Code"] == (
        "X-Dane-Relay; 554 5.4.6 mail for mx1.hostile2.test loops back to myself "
        "(host name mx1.hostile2.test is this relay (server.hostname))"
    )
    told = text.get_payload(decode=True)
    assert isinstance(told, bytes)
    assert "(from " not in told.decode("ascii")
