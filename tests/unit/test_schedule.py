"""relay.spool.schedule: backoff doubling, its cap, and queue lifetime expiry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.spool.schedule import backoff, expired


@pytest.mark.parametrize(
    ("attempts", "seconds"),
    [(1, 300.0), (2, 600.0), (3, 1200.0), (4, 2400.0), (5, 4000.0), (6, 4000.0), (100, 4000.0)],
)
def test_backoff_doubles_from_min_and_is_capped_at_max(attempts: int, seconds: float) -> None:
    assert backoff(attempts, 300.0, 4000.0) == seconds


@pytest.mark.parametrize("attempts", [0, -1])
def test_no_backoff_before_the_first_failure(attempts: int) -> None:
    assert backoff(attempts, 300.0, 4000.0) == 0.0


def test_backoff_with_equal_min_and_max_is_constant() -> None:
    assert [backoff(n, 60.0, 60.0) for n in range(1, 5)] == [60.0, 60.0, 60.0, 60.0]


def test_backoff_does_not_overflow_for_huge_attempt_counts() -> None:
    assert backoff(10**9, 300.0, 4000.0) == 4000.0


@given(
    attempts=st.integers(min_value=1, max_value=10_000),
    low=st.floats(min_value=0.001, max_value=1e6),
    factor=st.floats(min_value=1.0, max_value=1e3),
)
def test_backoff_properties(attempts: int, low: float, factor: float) -> None:
    high = low * factor
    first, value, after = (
        backoff(1, low, high),
        backoff(attempts, low, high),
        backoff(attempts + 1, low, high),
    )
    assert first == low
    assert low <= value <= high
    assert value <= after  # never shrinks
    assert after == min(high, value * 2) or value == high


def test_expired_at_exactly_the_lifetime() -> None:
    received, lifetime = 1_000_000.0, 5 * 86400.0
    assert not expired(received, received, lifetime)
    assert not expired(received, received + lifetime - 0.001, lifetime)
    assert expired(received, received + lifetime, lifetime)
    assert expired(received, received + lifetime + 1, lifetime)


def test_not_expired_when_the_clock_went_backwards() -> None:
    assert not expired(1_000_000.0, 999_000.0, 60.0)
