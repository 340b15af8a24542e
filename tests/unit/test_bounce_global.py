"""relay.spool.bounce: internationalised reports (RFC 6533) and the ASCII ones unchanged."""

from __future__ import annotations

import email
import email.message
import email.parser
import email.policy
import email.utils
import secrets

import pytest

from relay.model import Outcome, Step
from relay.spool.bounce import (
    DelayedRecipient,
    FailedRecipient,
    build_delay_dsn,
    build_dsn,
    needs_smtputf8,
    original_headers,
)

JOERG = "jörg@bücher.test"
NO_UTF8 = (
    "550 5.6.7 SMTPUTF8 is required for this recipient address (its local part is not "
    "ASCII), but was not offered by host"
)
ASCII_ORIGINAL = b"From: alice@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
UTF8_ORIGINAL = "From: alice@example.org\r\nSubject: Grüße\r\n\r\nHallo.\r\n".encode()


def report(
    failed: list[FailedRecipient],
    *,
    original: bytes = ASCII_ORIGINAL,
    sender: str = "alice@example.org",
    reporting_mta: str = "relay.example.net",
) -> bytes:
    return build_dsn(
        reporting_mta=reporting_mta,
        queue_id="0123456789ABCDEF01234",
        sender=sender,
        arrival=1700000000.0,
        now=1700086400.0,
        failed=failed,
        headers=original_headers(original),
    )


def parsed(raw: bytes) -> tuple[email.message.EmailMessage, list[email.message.EmailMessage]]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert not msg.defects
    return msg, list(msg.iter_parts())


def status_blocks(raw: bytes) -> list[email.message.EmailMessage]:
    """The field blocks of the status part (RFC 3464 §2.1), each parsed as headers."""
    msg, _ = parsed(raw)
    boundary = msg.get_boundary()
    assert boundary is not None
    part = raw.split(b"\r\n--" + boundary.encode() + b"\r\n")[2]
    body = part.partition(b"\r\n\r\n")[2].split(b"\r\n--" + boundary.encode())[0]
    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    blocks = [parser.parsebytes(b + b"\r\n") for b in body.strip(b"\r\n").split(b"\r\n\r\n")]
    return [b for b in blocks if isinstance(b, email.message.EmailMessage)]


def test_a_non_ascii_recipient_makes_a_global_report() -> None:
    raw = report(
        [
            FailedRecipient(JOERG, "5.6.7", NO_UTF8, "mx.hostile.test", last_attempt=1700086300.0),
            FailedRecipient("user@example.net", "5.1.1", "550 5.1.1 user unknown", "mx.e"),
        ]
    )
    _, parts = parsed(raw)
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/global-delivery-status",
        "text/rfc822-headers",  # the returned header section is ASCII
    ]
    assert parts[0].get_content_charset() == "utf-8"
    text = parts[0].get_content()
    assert f"<{JOERG}>: {NO_UTF8} (from mx.hostile.test)" in text
    per_message, joerg, user = status_blocks(raw)
    assert per_message["Reporting-MTA"] == "dns; relay.example.net"
    assert joerg["Final-Recipient"] == f"utf-8; {JOERG}"
    assert joerg["Action"] == "failed"
    assert joerg["Status"] == "5.6.7"
    assert joerg["Remote-MTA"] == "dns; mx.hostile.test"
    assert joerg["Diagnostic-Code"] == f"smtp; {NO_UTF8}"
    assert joerg["Last-Attempt-Date"] == email.utils.formatdate(1700086300.0)
    # An ASCII recipient in the same report keeps its rfc822 type (RFC 3464 §2.3.2).
    assert user["Final-Recipient"] == "rfc822; user@example.net"
    # The address is written in UTF-8 on the wire, not escaped (utf-8-addr-unitext).
    assert "Final-Recipient: utf-8; jörg@bücher.test\r\n".encode() in raw
    assert b"message/delivery-status" not in raw
    assert needs_smtputf8(raw) is False  # global parts travel without SMTPUTF8 (RFC 6533 §6)


def test_utf8_address_escapes_the_characters_rfc_6533_excludes() -> None:
    """RFC 6533 §3: '+', '=', '\\', space and controls become \\x{HEXPOINT}."""
    raw = report([FailedRecipient('"jö rg+a=b"@bücher.test', "5.1.1", "550 5.1.1 no")])
    _, rcpt = status_blocks(raw)
    assert rcpt["Final-Recipient"] == 'utf-8; "jö\\x{20}rg\\x{2B}a\\x{3D}b"@bücher.test'


def test_a_non_ascii_returned_header_section_is_global_headers() -> None:
    raw = report(
        [FailedRecipient("x@example.net", "5.1.1", "550 5.1.1 user unknown")],
        original=UTF8_ORIGINAL,
    )
    _, parts = parsed(raw)
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",  # its fields are all ASCII
        "message/global-headers",
    ]
    assert parts[0].get_content_charset() == "us-ascii"
    assert "Subject: Grüße\r\n".encode() in raw
    assert b"Secret" not in raw and b"Hallo." not in raw  # headers only, as before
    assert needs_smtputf8(raw) is False  # global parts travel without SMTPUTF8 (RFC 6533 §6)


def test_a_u_label_remote_mta_makes_the_status_part_global() -> None:
    raw = report([FailedRecipient("x@example.net", "5.1.1", "550 5.1.1 no", "mx.bücher.test")])
    _, parts = parsed(raw)
    assert parts[1].get_content_type() == "message/global-delivery-status"
    _, rcpt = status_blocks(raw)
    assert rcpt["Final-Recipient"] == "rfc822; x@example.net"
    assert rcpt["Remote-MTA"] == "dns; mx.bücher.test"
    assert needs_smtputf8(raw) is False  # global parts travel without SMTPUTF8 (RFC 6533 §6)


def test_non_ascii_only_in_the_text_part_needs_8bit_not_smtputf8() -> None:
    step = Step(1700086300.0, Outcome.BOUNCED, "550 5.1.1 Benutzer unbekannt: jörg", "mx.e")
    raw = report(
        [FailedRecipient("x@example.net", "5.1.1", "550 5.1.1 no", "mx.e", history=(step,))]
    )
    _, parts = parsed(raw)
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert parts[0].get_content_charset() == "utf-8"
    assert parts[0]["Content-Transfer-Encoding"] == "8bit"
    assert "Benutzer unbekannt: jörg" in parts[0].get_content()
    assert needs_smtputf8(raw) is False


def test_a_non_ascii_sender_makes_the_report_need_smtputf8() -> None:
    raw = report([FailedRecipient("x@example.net", "5.1.1", "550 5.1.1 no")], sender="ålice@e.org")
    parsed(raw)
    assert "\r\nTo: <ålice@e.org>\r\n".encode() in raw  # RFC 6532 §3.2: UTF-8 as is
    assert needs_smtputf8(raw) is True


def test_delay_report_for_a_non_ascii_recipient_is_global() -> None:
    raw = build_delay_dsn(
        reporting_mta="relay.example.net",
        queue_id="0123456789ABCDEF01234",
        sender="alice@example.org",
        arrival=1700000000.0,
        now=1700086400.0,
        delayed=[DelayedRecipient(JOERG, "4.4.1", "451 4.4.1 Connection refused", "mx.e")],
        will_retry_until=1700432000.0,
        headers=original_headers(ASCII_ORIGINAL),
    )
    _, parts = parsed(raw)
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/global-delivery-status",
        "text/rfc822-headers",
    ]
    assert parts[0].get_content_charset() == "utf-8"
    _, rcpt = status_blocks(raw)
    assert rcpt["Final-Recipient"] == f"utf-8; {JOERG}"
    assert rcpt["Action"] == "delayed"
    assert rcpt["Will-Retry-Until"] == email.utils.formatdate(1700432000.0)
    assert needs_smtputf8(raw) is False  # global parts travel without SMTPUTF8 (RFC 6533 §6)


def test_an_ascii_report_is_byte_for_byte_the_plain_rfc_3464_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(secrets, "token_hex", lambda n: "ab" * n)
    monkeypatch.setattr(email.utils, "make_msgid", lambda domain: f"<fixed@{domain}>")
    raw = report([FailedRecipient("x@example.net", "5.1.1", "550 5.1.1 user unknown", "mx.e", 1.0)])
    boundary = "0123456789ABCDEF01234.abababababababab/relay.example.net"
    expected = (
        "From: Mail Delivery System <MAILER-DAEMON@relay.example.net>\r\n"
        "To: <alice@example.org>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Date: Wed, 15 Nov 2023 22:13:20 -0000\r\n"
        "Message-ID: <fixed@relay.example.net>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status; "
        f'boundary="{boundary}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated delivery status notification.\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        "This is the mail system at host relay.example.net.\r\n"
        "\r\n"
        "Your message could not be delivered to one or more recipients.\r\n"
        "It has been returned with the reasons below.\r\n"
        "\r\n"
        "<x@example.net>: 550 5.1.1 user unknown (from mx.e)\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        "Reporting-MTA: dns; relay.example.net\r\n"
        "X-Queue-ID: 0123456789ABCDEF01234\r\n"
        "Arrival-Date: Tue, 14 Nov 2023 22:13:20 -0000\r\n"
        "\r\n"
        "Final-Recipient: rfc822; x@example.net\r\n"
        "Action: failed\r\n"
        "Status: 5.1.1\r\n"
        "Remote-MTA: dns; mx.e\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n"
        "Last-Attempt-Date: Thu, 01 Jan 1970 00:00:01 -0000\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        "\r\n"
        "From: alice@example.org\r\n"
        "Subject: hello\r\n"
        "\r\n"
        f"--{boundary}--\r\n"
    )
    assert raw == expected.encode()
    assert needs_smtputf8(raw) is False
