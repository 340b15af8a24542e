"""A LookupObserver that records what the resolver and its cache report, for assertions."""

from __future__ import annotations

from collections import Counter

__all__ = ["Observer"]


class Observer:
    """Records what the resolver or cache reports (relay.lookup.results.LookupObserver)."""

    def __init__(self) -> None:
        self.lookups: list[tuple[str, str]] = []
        self.seconds: list[float] = []
        self.cache: Counter[str] = Counter()

    def dns_lookup(self, rrtype: str, result: str, seconds: float) -> None:
        self.lookups.append((rrtype, result))
        self.seconds.append(seconds)

    def dns_cache(self, result: str) -> None:
        self.cache[result] += 1
