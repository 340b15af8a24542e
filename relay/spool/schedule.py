"""Retry schedule and queue lifetime maths. Pure: the clock is an argument."""

from __future__ import annotations

__all__ = ["backoff", "expired"]


def backoff(attempts: int, min_backoff: float, max_backoff: float) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1-based): doubling from
    `min_backoff`, capped at `max_backoff` (Postfix minimal/maximal_backoff_time)."""
    if attempts < 1:
        return 0.0
    return min(max_backoff, min_backoff * 2.0 ** min(attempts - 1, 60))


def expired(received: float, now: float, lifetime: float) -> bool:
    """True once a message has been queued longer than `lifetime` seconds."""
    return now - received >= lifetime
