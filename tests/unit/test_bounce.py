"""relay.spool.bounce: RFC 3464 delivery status notifications."""

from __future__ import annotations

import email
import email.message
import email.utils
import re
from dataclasses import replace

import pytest

from relay.model import Outcome, Step
from relay.spool.bounce import (
    DSN_STEPS,
    DelayedRecipient,
    FailedRecipient,
    build_delay_dsn,
    build_dsn,
    delay_status,
    original_headers,
)

ORIGINAL = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: x@y\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"\r\n"
    b"Secret body text\r\n"
    b"Subject: not a header\r\n"
)


def dsn(
    failed: list[FailedRecipient] | None = None, reporting_mta: str = "relay.example.net"
) -> bytes:
    return build_dsn(
        reporting_mta=reporting_mta,
        queue_id="0123456789ABCDEF01234",
        sender="alice@example.org",
        arrival=1700000000.0,
        now=1700086400.0,
        failed=failed or [FailedRecipient("x@y", "5.1.1", "550 5.1.1 user unknown", "mx.y")],
        headers=original_headers(ORIGINAL),
    )


def messages(payload: object) -> list[email.message.Message]:
    assert isinstance(payload, list)
    assert all(isinstance(p, email.message.Message) for p in payload)
    return payload


def parts(raw: bytes) -> tuple[email.message.Message, list[email.message.Message]]:
    msg = email.message_from_bytes(raw)
    return msg, messages(msg.get_payload())


def test_original_headers_cut_at_the_blank_line() -> None:
    assert original_headers(ORIGINAL) == (
        b"From: Alice <alice@example.org>\r\n"
        b"To: x@y\r\n"
        b"Subject: hello\r\n"
        b"Message-ID: <m1@example.org>\r\n"
    )


def test_original_headers_with_bare_lf_line_endings() -> None:
    body = b"Subject: a\nX-Other: b\n\nbody\n"
    assert original_headers(body) == b"Subject: a\r\nX-Other: b\r\n"


def test_original_headers_without_a_body() -> None:
    assert original_headers(b"Subject: a\r\nX: b\r\n") == b"Subject: a\r\nX: b\r\n"


def test_original_headers_are_capped() -> None:
    body = b"X-Big: " + b"a" * 200_000 + b"\r\n\r\nbody"
    headers = original_headers(body)
    assert len(headers) == 64 * 1024
    assert headers.startswith(b"X-Big: aaa")


def test_dsn_is_a_multipart_report() -> None:
    msg, payload = parts(dsn())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in payload] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert msg["To"] == "<alice@example.org>"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.net>"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == 1700086400.0
    assert re.fullmatch(r"<[^@>]+@relay\.example\.net>", msg["Message-ID"])
    assert not msg.defects


def test_dsn_delivery_status_fields() -> None:
    _, payload = parts(dsn())
    per_message, per_recipient = messages(payload[1].get_payload())
    assert per_message["Reporting-MTA"] == "dns; relay.example.net"
    assert per_message["X-Queue-ID"] == "0123456789ABCDEF01234"
    assert per_message["Arrival-Date"] == email.utils.formatdate(1700000000.0)
    assert per_recipient["Final-Recipient"] == "rfc822; x@y"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.y"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 user unknown"


def test_dsn_one_block_per_failed_recipient() -> None:
    raw = dsn(
        [
            FailedRecipient("a@y", "5.1.1", "550 5.1.1 user unknown", "mx.y"),
            FailedRecipient("b@z", "5.1.10", "556 5.1.10 Domain does not accept mail (null MX)"),
        ]
    )
    _, payload = parts(raw)
    blocks = messages(payload[1].get_payload())[1:]
    assert [(b["Final-Recipient"], b["Status"], b["Remote-MTA"]) for b in blocks] == [
        ("rfc822; a@y", "5.1.1", "dns; mx.y"),
        ("rfc822; b@z", "5.1.10", None),
    ]
    text = payload[0].get_payload(decode=True)
    assert isinstance(text, bytes)
    assert b"<a@y>: 550 5.1.1 user unknown (from mx.y)" in text
    assert b"<b@z>: 556 5.1.10 Domain does not accept mail (null MX)\r\n" in text


def test_dsn_returns_headers_only() -> None:
    raw = dsn()
    _, payload = parts(raw)
    returned = payload[2].get_payload(decode=True)
    assert isinstance(returned, bytes)
    assert (
        returned.replace(b"\r\n", b"\n").strip()
        == original_headers(ORIGINAL).replace(b"\r\n", b"\n").strip()
    )
    assert b"Secret body text" not in raw
    assert b"not a header" not in raw


def test_dsn_uses_crlf_line_endings_only() -> None:
    raw = dsn()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert raw.endswith(b"--\r\n")


def test_dsn_boundary_is_valid_for_a_long_host_name() -> None:
    """RFC 2046 §5.1.1: a boundary is at most 70 characters."""
    host = "relay-with-a-rather-long-name.mail-cluster.eu-west.example.net"
    msg, payload = parts(dsn(reporting_mta=host))
    boundary = msg.get_boundary()
    assert boundary is not None
    assert 1 <= len(boundary) <= 70
    assert len(payload) == 3


# -- attempt history (RFC 3464 §2.3.7 Last-Attempt-Date, the story in the text part) ----------

MX1_DANE = Step(
    time=1700086390.0,  # 2023-11-15 22:13:10 UTC
    outcome=Outcome.DEFERRED,
    reply="451 4.7.5 Server certificate not verified (no-match)",
    host="mx1.y",
    address="192.0.2.1",
    port=25,
    tls="encrypted",
    dane="fail reason=no-match",
)
MX2_REFUSED = Step(
    time=1700086391.0,
    outcome=Outcome.BOUNCED,
    reply="550 5.1.1 user unknown",
    host="mx2.y",
    address="2001:db8::2",
    port=25,
    tls="verified",
    dane="pass reason=match",
)


def refused(**changes: object) -> FailedRecipient:
    fields: dict[str, object] = {
        "address": "x@y",
        "status": "5.1.1",
        "diagnostic": "550 5.1.1 user unknown",
        "remote_mta": "mx2.y",
        "last_attempt": 1700086391.0,
        "history": (MX1_DANE, MX2_REFUSED),
    }
    fields.update(changes)
    return FailedRecipient(**fields)  # type: ignore[arg-type]


def text_part(raw: bytes) -> str:
    _, payload = parts(raw)
    text = payload[0].get_payload(decode=True)
    assert isinstance(text, bytes)
    return text.decode("ascii")


def test_dsn_last_attempt_date_per_recipient() -> None:
    _, payload = parts(dsn([refused()]))
    per_message, per_recipient = messages(payload[1].get_payload())
    assert per_recipient["Last-Attempt-Date"] == "Wed, 15 Nov 2023 22:13:11 -0000"
    parsed = email.utils.parsedate_to_datetime(per_recipient["Last-Attempt-Date"])
    assert parsed.timestamp() == 1700086391.0
    assert per_message["Last-Attempt-Date"] is None
    # Remote-MTA and Diagnostic-Code are as before.
    assert per_recipient["Remote-MTA"] == "dns; mx2.y"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 user unknown"
    assert per_recipient["Status"] == "5.1.1"


def test_dsn_without_a_last_attempt_has_no_last_attempt_date() -> None:
    _, payload = parts(dsn())
    _, per_recipient = messages(payload[1].get_payload())
    assert per_recipient["Last-Attempt-Date"] is None


def test_dsn_tells_the_attempt_history_in_the_text_part() -> None:
    text = text_part(dsn([refused()]))
    assert (
        "<x@y>: 550 5.1.1 user unknown (from mx2.y)\r\n"
        "    Delivery attempts (oldest first):\r\n"
        "    2023-11-15 22:13:10 UTC mx1.y[192.0.2.1]:25 tls=encrypted dane=fail reason=no-match:"
        " 451 4.7.5 Server certificate not verified (no-match)\r\n"
        "    2023-11-15 22:13:11 UTC mx2.y[2001:db8::2]:25 tls=verified dane=pass reason=match:"
        " 550 5.1.1 user unknown\r\n"
    ) in text


def test_dsn_history_steps_without_a_connection() -> None:
    lookup = Step(1700086391.0, Outcome.BOUNCED, "550 5.1.2 Domain not found")
    tlsa = Step(1700086390.0, Outcome.DEFERRED, "451 4.7.5 TLSA lookup error", host="mx1.y")
    text = text_part(dsn([refused(history=(tlsa, lookup))]))
    assert "    2023-11-15 22:13:10 UTC mx1.y tls=none dane=none: 451 4.7.5 TLSA" in text
    assert "    2023-11-15 22:13:11 UTC - tls=none dane=none: 550 5.1.2 Domain not found" in text


def test_dsn_history_shows_only_the_most_recent_steps() -> None:
    history = tuple(
        Step(1700000000.0 + n, Outcome.DEFERRED, f"451 4.4.1 refused #{n}", "mx.y", "192.0.2.9", 25)
        for n in range(21)
    )
    text = text_part(dsn([refused(history=history, history_dropped=9)]))
    assert DSN_STEPS == 6
    assert "    (24 earlier not shown)\r\n" in text
    assert [n for n in range(21) if f"refused #{n}\r\n" in text] == list(range(15, 21))


def test_dsn_history_reply_stays_on_one_line() -> None:
    step = Step(1700086391.0, Outcome.BOUNCED, "550-5.1.1 first\r\n550 5.1.1 second", "mx2.y")
    raw = dsn([refused(history=(step,))])
    assert "mx2.y tls=none dane=none: 550-5.1.1 first 550 5.1.1 second\r\n" in text_part(raw)
    assert b"\n" not in raw.replace(b"\r\n", b"")


def test_dsn_with_history_parses_back_for_every_recipient() -> None:
    raw = dsn([refused(), refused(address="z@y", history=())])
    msg, payload = parts(raw)
    assert not msg.defects
    blocks = messages(payload[1].get_payload())[1:]
    assert [(b["Final-Recipient"], b["Last-Attempt-Date"]) for b in blocks] == [
        ("rfc822; x@y", "Wed, 15 Nov 2023 22:13:11 -0000"),
        ("rfc822; z@y", "Wed, 15 Nov 2023 22:13:11 -0000"),
    ]
    text = text_part(raw)
    assert text.count("Delivery attempts") == 1
    assert "<z@y>: 550 5.1.1 user unknown (from mx2.y)\r\n" in text


# -- delay warnings (Action: delayed) ------------------------------------------------------------

DELAYED = DelayedRecipient(
    "bob@example.net",
    "4.7.5",
    "451 4.7.5 Server certificate not verified (no-match)",
    "mx1.example.net",
    last_attempt=1700003600.0,
)


def delay_dsn(delayed: list[DelayedRecipient] | None = None) -> bytes:
    return build_delay_dsn(
        reporting_mta="relay.example.net",
        queue_id="0123456789ABCDEF01234",
        sender="alice@example.org",
        arrival=1700000000.0,
        now=1700003700.0,
        delayed=delayed or [DELAYED],
        will_retry_until=1700432000.0,
        headers=original_headers(ORIGINAL),
    )


def test_delay_dsn_is_a_multipart_report_with_three_parts() -> None:
    msg, payload = parts(delay_dsn())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "<alice@example.org>"
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert [p.get_content_type() for p in payload] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_delay_dsn_per_recipient_fields() -> None:
    _msg, payload = parts(delay_dsn())
    per_message, per_rcpt = messages(payload[1].get_payload())
    assert per_message["Reporting-MTA"] == "dns; relay.example.net"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 -0000"
    assert dict(per_rcpt.items()) == {
        "Final-Recipient": "rfc822; bob@example.net",
        "Action": "delayed",
        "Status": "4.7.5",
        "Remote-MTA": "dns; mx1.example.net",
        "Diagnostic-Code": "smtp; 451 4.7.5 Server certificate not verified (no-match)",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 23:13:20 -0000",
        "Will-Retry-Until": "Sun, 19 Nov 2023 22:13:20 -0000",
    }


def test_delay_dsn_one_block_per_delayed_recipient_and_readable_text() -> None:
    carol = DelayedRecipient("carol@example.com", "4.4.1", "451 4.4.1 Connection refused")
    raw = delay_dsn([DELAYED, carol])
    _msg, payload = parts(raw)
    _per_message, bob_block, carol_block = messages(payload[1].get_payload())
    assert bob_block["Final-Recipient"] == "rfc822; bob@example.net"
    assert (carol_block["Status"], carol_block["Remote-MTA"]) == ("4.4.1", None)
    assert carol_block["Last-Attempt-Date"] is None
    text = payload[0].get_payload(decode=True)
    assert isinstance(text, bytes)
    told = text.decode("ascii")
    assert "THIS IS A WARNING ONLY" in told
    assert "will be retried until Sun, 19 Nov 2023 22:13:20 -0000" in told
    assert (
        "<bob@example.net>: 451 4.7.5 Server certificate not verified (no-match) "
        "(from mx1.example.net)"
    ) in told
    assert "<carol@example.com>: 451 4.4.1 Connection refused\r\n" in told


def test_delay_dsn_returns_headers_only_and_uses_crlf() -> None:
    raw = delay_dsn()
    assert b"Secret body text" not in raw
    assert b"Message-ID: <m1@example.org>" in raw
    assert re.search(rb"(?<!\r)\n", raw) is None
    _msg, payload = parts(raw)
    assert payload[2].get_payload().startswith("From: Alice <alice@example.org>")


@pytest.mark.parametrize(
    ("enhanced", "status"),
    [("4.7.5", "4.7.5"), ("4.4.1", "4.4.1"), ("", "4.0.0"), ("5.1.1", "4.0.0")],
)
def test_delay_status_is_always_transient(enhanced: str, status: str) -> None:
    assert delay_status(enhanced) == status


def test_a_reply_the_relay_wrote_is_typed_as_its_own_and_names_no_remote_mta() -> None:
    # RFC 3464 §2.3.5/§2.3.6 (review 5b f3): no server contacted, the relay's own text.
    loop = "554 5.4.6 mail for y loops back to myself (host name mx.y is this relay)"
    raw = dsn([FailedRecipient("x@y", "5.4.6", loop, diagnostic_type="X-Dane-Relay")])
    _, payload = parts(raw)
    _per_message, per_rcpt = messages(payload[1].get_payload())
    assert dict(per_rcpt.items()) == {
        "Final-Recipient": "rfc822; x@y",
        "Action": "failed",
        "Status": "5.4.6",
        "Diagnostic-Code": f"X-Dane-Relay; {loop}",
    }
    delayed = replace(DELAYED, diagnostic_type="X-Dane-Relay")
    _msg, payload = parts(delay_dsn([delayed]))
    _per_message, per_rcpt = messages(payload[1].get_payload())
    assert per_rcpt["Diagnostic-Code"] == (
        "X-Dane-Relay; 451 4.7.5 Server certificate not verified (no-match)"
    )
    assert per_rcpt["Remote-MTA"] == "dns; mx1.example.net"  # the server it talked to
