"""Retry schedule and queue lifetime maths. Pure: the clock and the randomness are arguments.

`backoff` is the nominal delay after the n-th failed attempt: doubling from `min_backoff`,
capped at `max_backoff` (Postfix minimal_backoff_time/maximal_backoff_time). `retry_delay`
is the delay the runner uses: the nominal one with random jitter, so that messages
deferred together (a destination that was down) do not all come back in the same second.

Jitter choice: the delay is drawn uniformly from a window a quarter of the nominal delay
wide, ending at the nominal delay ([0.75 b, b]). The window never leaves
[min_backoff, max_backoff]: where it would start below `min_backoff` (the first retry,
b = min_backoff) it is moved up to start there ([min, 1.25 min], cut at max_backoff).
So `min_backoff` stays a true minimum (a remote site is never retried sooner than
configured), `max_backoff` a true maximum, and the jitter is never zero unless
min_backoff == max_backoff. Downward jitter keeps the worst case at the nominal curve
an operator reads in the configuration.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["JITTER", "backoff", "expired", "retry_delay", "retry_window"]

#: Width of the jitter window, as a fraction of the nominal delay.
JITTER = 0.25


def backoff(attempts: int, min_backoff: float, max_backoff: float) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1-based): doubling from
    `min_backoff`, capped at `max_backoff` (Postfix minimal/maximal_backoff_time)."""
    if attempts < 1:
        return 0.0
    return min(max_backoff, min_backoff * 2.0 ** min(attempts - 1, 60))


def retry_window(attempts: int, min_backoff: float, max_backoff: float) -> tuple[float, float]:
    """The (low, high) seconds the jittered delay after the `attempts`-th failure lies in;
    (0, 0) before the first failure. Always min_backoff <= low <= high <= max_backoff."""
    nominal = backoff(attempts, min_backoff, max_backoff)
    if nominal == 0.0:
        return 0.0, 0.0
    width = nominal * JITTER
    low = max(min_backoff, nominal - width)
    high = min(max_backoff, low + width)
    return min(low, high), high


def retry_delay(
    attempts: int, min_backoff: float, max_backoff: float, rand: Callable[[], float]
) -> float:
    """The jittered delay: `rand()` in [0, 1) picks the point in retry_window (0 the low
    end); out-of-range values from a broken source are clamped into the window."""
    low, high = retry_window(attempts, min_backoff, max_backoff)
    point = min(1.0, max(0.0, rand()))
    return low + (high - low) * point


def expired(received: float, now: float, lifetime: float) -> bool:
    """True once a message has been queued longer than `lifetime` seconds."""
    return now - received >= lifetime
