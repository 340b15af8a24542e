"""The start-up check of a machine-derived server.hostname (relay.app.plausible_public_name)."""

from __future__ import annotations

import pytest

from relay.app import plausible_public_name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mx1.example.net", True),
        ("relay.example.", True),
        ("localhost", False),
        ("localhost.localdomain", False),
        ("LOCALHOST.LocalDomain", False),
        ("vm", False),
        ("", False),
    ],
)
def test_plausible_public_name(name: str, expected: bool) -> None:
    assert plausible_public_name(name) is expected
