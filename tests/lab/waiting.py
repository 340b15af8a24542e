"""Deadline-bounded polling, the lab's only way to wait for an external condition.

Owns: `poll_until()`. Used where no event can be had (a TCP port opening in another
process, a log line appearing); in-process waits use events and conditions instead.
Guarantees: the predicate runs at least once; the wait never exceeds `timeout` by more
than one `interval`; on expiry `LabTimeout` (an AssertionError, so pytest shows it as a
test failure) carries the caller's description.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["LabTimeout", "poll_until"]

T = TypeVar("T")


class LabTimeout(AssertionError):
    """A lab condition did not become true before its deadline."""


def poll_until(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.02,
) -> T:
    """Call `predicate` until it returns something other than None/False; return that.

    Raises:
        LabTimeout: when `timeout` seconds pass first; `what` (or what it returns)
            describes the awaited condition.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            detail = what() if callable(what) else what
            raise LabTimeout(f"timed out after {timeout:.1f}s waiting for {detail}")
        time.sleep(interval)
