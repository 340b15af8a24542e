"""relay.spool.bounce: RFC 3464 delivery status notifications."""

from __future__ import annotations

import email
import email.message
import email.utils
import re

from relay.spool.bounce import FailedRecipient, build_dsn, original_headers

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
