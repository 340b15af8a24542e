"""relay.smtp.domain.mailbox_key: when two recipient addresses are one mailbox (RFC 5321
§2.4: the local part is the destination's to interpret, the domain is case-insensitive)."""

from __future__ import annotations

import pytest

from relay.smtp.domain import mailbox_key


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("bob@example.org", "bob@EXAMPLE.org"),
        ("bob@bücher.example", "bob@xn--bcher-kva.example"),  # U-label and A-label
        ("bob@BÜCHER.example", "bob@xn--bcher-kva.example"),
    ],
)
def test_same_mailbox(a: str, b: str) -> None:
    assert mailbox_key(a) == mailbox_key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("bob@example.org", "Bob@example.org"),  # the local part is compared exactly
        ("bob@example.org", "bob@example.net"),
        ('"bob smith"@example.org', '"Bob Smith"@example.org'),
    ],
)
def test_different_mailboxes(a: str, b: str) -> None:
    assert mailbox_key(a) != mailbox_key(b)


def test_forms() -> None:
    assert mailbox_key("Bob@Example.ORG") == "Bob@example.org"
    assert mailbox_key("a@b@Example.org") == "a@b@example.org"  # the last @ splits
    assert mailbox_key("postmaster") == "postmaster"
