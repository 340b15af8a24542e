"""relay.dane.policy: the (level, TLSA state) decision table against a golden file."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from relay.config import TLS_LEVELS
from relay.dane.policy import (
    POLICY_TABLE,
    Decision,
    TlsaState,
    TlsRequirement,
    decide,
    wants_tlsa,
)

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "dane_policy.tsv"


def read_golden() -> dict[tuple[str, TlsaState], str]:
    rows: dict[tuple[str, TlsaState], str] = {}
    lines = [
        line
        for line in GOLDEN.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0].split("\t") == ["level", "tlsa_state", "requirement_or_defer"]
    for line in lines[1:]:
        level, state, outcome = line.split("\t")
        key = (level, TlsaState(state))
        assert key not in rows, f"duplicate row {line!r}"
        rows[key] = outcome
    return rows


def render(decision: Decision) -> str:
    if decision.requirement is None:
        return f"defer:{decision.defer_reason}"
    return decision.requirement.value


def test_table_matches_golden_file() -> None:
    actual = {key: render(decision) for key, decision in POLICY_TABLE.items()}
    assert actual == read_golden()


def test_table_covers_every_level_and_state() -> None:
    expected = set(itertools.product(TLS_LEVELS, TlsaState))
    assert set(POLICY_TABLE) == expected
    assert set(read_golden()) == expected


def test_every_decision_is_consistent_and_explained() -> None:
    for key, decision in POLICY_TABLE.items():
        assert decision.why, key
        # A deferral has a reason token and no requirement; a requirement has no reason.
        assert (decision.requirement is None) == bool(decision.defer_reason), key


def test_dane_failures_never_downgrade_to_plaintext() -> None:
    """RFC 7672 §2.2: no DANE level ever yields plaintext-only delivery."""
    for (level, _state), decision in POLICY_TABLE.items():
        if level in ("dane", "dane-only"):
            assert decision.requirement is not TlsRequirement.NONE


@pytest.mark.parametrize(("level", "state"), sorted(POLICY_TABLE, key=str))
def test_decide_reads_the_table(level: str, state: TlsaState) -> None:
    assert decide(level, state) is POLICY_TABLE[(level, state)]


def test_decide_unknown_level() -> None:
    with pytest.raises(KeyError):
        decide("verify", TlsaState.SECURE_USABLE)


@pytest.mark.parametrize(
    ("level", "addresses_secure", "expected"),
    [
        ("dane", True, True),
        ("dane-only", True, True),
        ("dane", False, False),  # RFC 7672 §2.2.2: insecure host addresses, no TLSA lookup
        ("dane-only", False, False),
        ("none", True, False),
        ("may", True, False),
        ("encrypt", True, False),
        ("encrypt", False, False),
    ],
)
def test_wants_tlsa(level: str, addresses_secure: bool, expected: bool) -> None:
    assert wants_tlsa(level, addresses_secure) is expected
