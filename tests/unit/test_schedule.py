"""relay.spool.schedule: backoff doubling, its cap, the jittered retry delay, and queue
lifetime expiry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.spool.schedule import backoff, expired, retry_delay, retry_window


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


# -- jitter --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "window"),
    [
        (1, (300.0, 375.0)),  # below min_backoff: moved up to start at it
        (2, (450.0, 600.0)),
        (3, (900.0, 1200.0)),
        (4, (1800.0, 2400.0)),
        (5, (3000.0, 4000.0)),  # the nominal 4800 is capped at 4000 first
        (100, (3000.0, 4000.0)),
    ],
)
def test_retry_window_is_the_lower_quarter_of_the_nominal_delay(
    attempts: int, window: tuple[float, float]
) -> None:
    assert retry_window(attempts, 300.0, 4000.0) == window


def test_first_retry_window_is_cut_at_max_backoff() -> None:
    assert retry_window(1, 300.0, 320.0) == (300.0, 320.0)


def test_equal_min_and_max_leave_no_room_for_jitter() -> None:
    assert [retry_window(n, 60.0, 60.0) for n in (1, 2, 9)] == [(60.0, 60.0)] * 3


@pytest.mark.parametrize("attempts", [0, -1])
def test_no_retry_delay_before_the_first_failure(attempts: int) -> None:
    assert retry_delay(attempts, 300.0, 4000.0, lambda: 0.5) == 0.0


@pytest.mark.parametrize(
    ("attempts", "rand", "seconds"),
    [
        (1, 0.0, 300.0),
        (1, 0.5, 337.5),
        (2, 0.0, 450.0),
        (2, 0.25, 487.5),
        (3, 0.5, 1050.0),
        (6, 0.75, 3750.0),
    ],
)
def test_retry_delay_takes_its_point_in_the_window_from_the_random_source(
    attempts: int, rand: float, seconds: float
) -> None:
    assert retry_delay(attempts, 300.0, 4000.0, lambda: rand) == seconds


@pytest.mark.parametrize(("rand", "seconds"), [(-3.0, 450.0), (1.0, 600.0), (7.5, 600.0)])
def test_a_random_source_out_of_range_is_clamped_into_the_window(
    rand: float, seconds: float
) -> None:
    assert retry_delay(2, 300.0, 4000.0, lambda: rand) == seconds


@given(
    attempts=st.integers(min_value=1, max_value=10_000),
    low=st.floats(min_value=0.001, max_value=1e6),
    factor=st.floats(min_value=1.0, max_value=1e3),
    rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_retry_delay_stays_between_min_and_max_backoff(
    attempts: int, low: float, factor: float, rand: float
) -> None:
    high = low * factor
    delay = retry_delay(attempts, low, high, lambda: rand)
    nominal = backoff(attempts, low, high)
    assert low <= delay <= high
    # Never later than the nominal curve, except the first retry's window above min_backoff.
    assert delay <= nominal or (delay <= min(high, low * 1.25) and nominal * 0.75 < low)
