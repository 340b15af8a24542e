"""relay.smtp.reply: SMTP replies as values."""

from __future__ import annotations

import pytest

from relay.smtp.reply import SmtpReply


@pytest.mark.parametrize(
    ("code", "positive", "transient", "permanent"),
    [
        (220, True, False, False),
        (250, True, False, False),
        (354, False, False, False),
        (421, False, True, False),
        (451, False, True, False),
        (499, False, True, False),
        (500, False, False, True),
        (554, False, False, True),
    ],
)
def test_classes(code: int, positive: bool, transient: bool, permanent: bool) -> None:
    reply = SmtpReply(code, "", "x")
    assert (reply.is_positive, reply.is_transient, reply.is_permanent) == (
        positive,
        transient,
        permanent,
    )


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        (SmtpReply(250, "2.0.0", "Ok"), "250 2.0.0 Ok"),
        (
            SmtpReply(354, "", "End data with <CR><LF>.<CR><LF>"),
            "354 End data with <CR><LF>.<CR><LF>",
        ),
        (SmtpReply(421, "4.7.0", ""), "421 4.7.0"),
        # Line breaks and runs of white space from a peer never reach logs or DSNs.
        (SmtpReply(550, "5.1.1", "user\r\nunknown  here\t"), "550 5.1.1 user unknown here"),
        (SmtpReply(550, "", "line one\r\nline two"), "550 line one line two"),
    ],
)
def test_str(reply: SmtpReply, text: str) -> None:
    assert str(reply) == text
    assert "\r" not in str(reply) and "\n" not in str(reply)


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (250, "2.0.0 Ok: queued as 12345", SmtpReply(250, "2.0.0", "Ok: queued as 12345")),
        (
            550,
            "5.1.1 <x@y>: Recipient address rejected",
            SmtpReply(550, "5.1.1", "<x@y>: Recipient address rejected"),
        ),
        (556, "5.1.10 null MX", SmtpReply(556, "5.1.10", "null MX")),
        (
            451,
            "4.7.5 Server certificate not verified",
            SmtpReply(451, "4.7.5", "Server certificate not verified"),
        ),
        # No enhanced code: one is derived from the class.
        (550, "user unknown", SmtpReply(550, "5.0.0", "user unknown")),
        (451, "try later", SmtpReply(451, "4.0.0", "try later")),
        (250, "Ok", SmtpReply(250, "2.0.0", "Ok")),
        # An enhanced code of another class than the reply code is text, not a status.
        (550, "4.1.1 mismatched", SmtpReply(550, "5.0.0", "4.1.1 mismatched")),
        (250, "5.0.0 odd", SmtpReply(250, "2.0.0", "5.0.0 odd")),
        # 3xx has no enhanced status (RFC 3463 classes are 2, 4, 5).
        (354, "go ahead", SmtpReply(354, "", "go ahead")),
        # Multi-line replies arrive joined by line breaks; they are folded to one line.
        (250, "2.0.0 first\nsecond line", SmtpReply(250, "2.0.0", "first second line")),
        (550, "  5.7.1   spaced   out ", SmtpReply(550, "5.7.1", "spaced out")),
        (421, "4.4.2", SmtpReply(421, "4.4.2", "")),
        (550, "", SmtpReply(550, "5.0.0", "")),
        (550, "5.1.1234 too long", SmtpReply(550, "5.0.0", "5.1.1234 too long")),
        (550, "5.x.1 bad", SmtpReply(550, "5.0.0", "5.x.1 bad")),
    ],
)
def test_from_peer(code: int, message: str, expected: SmtpReply) -> None:
    assert SmtpReply.from_peer(code, message) == expected


def test_replies_are_hashable_values() -> None:
    assert {SmtpReply(250, "2.0.0", "Ok"), SmtpReply(250, "2.0.0", "Ok")} == {
        SmtpReply(250, "2.0.0", "Ok")
    }
