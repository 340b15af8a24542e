"""The relay's DNS answer cache: TTL-bounded, LRU-sized, with coalescing of identical lookups.

Owns:
    ``AnswerCache``: answers (``DnsAnswer``) keyed by (query name in lower case without the
    final dot, record type), and the set of lookups currently in flight.

Guarantees:
    * Identical concurrent lookups are coalesced: while one upstream lookup for a key is in
      flight, every other caller for that key awaits the same result (or the same exception),
      even when the cache is disabled (``size == 0``). A caller that is cancelled does not
      cancel the shared lookup.
    * A positive answer (kind DATA) is kept for its TTL clamped to [min_ttl, max_ttl]; an
      NXDOMAIN/NODATA answer for min(TTL, negative_ttl) (RFC 2308 §5), with no lower bound.
      A lifetime of zero means the answer is not stored.
    * The security status is part of the cached value: a secure answer comes back secure, an
      insecure one insecure, never upgraded or mixed.
    * Temporary failures (any exception from the fetch) are never stored (RFC 2308 §7.1 allows
      caching server failures; the relay prefers to ask again at the next attempt).
    * At most ``size`` entries are kept; the least recently used one is evicted first.
    * Expiry uses the injected clock only, so tests can move time without sleeping.
    * A hit returns the answer with ``ttl`` reduced by the time it has been stored.
    * Every call reports exactly one ``dns_cache`` event to the observer: "hit", "miss"
      (this call starts the upstream lookup) or "coalesced" (it joins one in flight).
    * ``clear()`` starts a new generation: stored answers are forgotten, a lookup in flight
      still answers the callers already waiting for it but its answer is not stored, and a
      caller arriving after the clear starts a lookup of its own. (The relay clears the
      cache when the resolver's validation state changes; an answer fetched under the old
      state must not outlive the change, RFC 7672 §2.1.)

Does not:
    Talk DNS (no dnspython here), decide what a lookup means, or pre-fetch before expiry.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from relay.lookup.results import AnswerKind, DnsAnswer, LookupObserver

__all__ = ["AnswerCache", "cache_key"]

T = TypeVar("T")
Key = tuple[str, str]


def cache_key(qname: str, rrtype: str) -> Key:
    """(lower-case name without the final dot, upper-case type): one key per DNS question."""
    name = qname.lower()
    if name.endswith(".") and name != ".":
        name = name[:-1]
    return name, rrtype.upper()


@dataclass(frozen=True, slots=True)
class _Entry:
    answer: DnsAnswer[Any]
    stored_at: float
    expires: float


class AnswerCache:
    """Bounded TTL cache for DNS answers, with coalescing of concurrent identical lookups."""

    def __init__(
        self,
        *,
        size: int,
        min_ttl: float,
        max_ttl: float,
        negative_ttl: float,
        clock: Callable[[], float],
        observer: LookupObserver | None = None,
    ) -> None:
        self._size = size
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._observer = observer
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._inflight: dict[Key, asyncio.Future[DnsAnswer[Any]]] = {}
        self._generation = 0  # bumped by clear(); a fetch stores only in its own generation

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """True when `key` (see ``cache_key``) has an unexpired entry."""
        entry = self._entries.get(key) if isinstance(key, tuple) else None
        return entry is not None and self._clock() < entry.expires

    def clear(self) -> None:
        """Forget every stored answer, and keep lookups in flight from storing theirs.

        Callers already waiting on a lookup in flight still get its result; later callers
        start a new lookup instead of joining it.
        """
        self._generation += 1
        self._entries.clear()
        self._inflight.clear()

    def lifetime(self, answer: DnsAnswer[Any]) -> float:
        """Seconds `answer` would be kept; 0 means it is not stored."""
        if answer.kind is AnswerKind.DATA:
            return min(max(answer.ttl, self._min_ttl), self._max_ttl)
        # RFC 2308 §5: a negative answer is kept no longer than its SOA-derived TTL,
        # and the operator's negative bound caps it further.
        return max(0.0, min(answer.ttl, self._negative_ttl))

    async def lookup(
        self, qname: str, rrtype: str, fetch: Callable[[], Awaitable[DnsAnswer[T]]]
    ) -> DnsAnswer[T]:
        """The answer for (qname, rrtype): from the cache, from a lookup in flight, or `fetch()`.

        Raises:
            Whatever `fetch()` raises (for every caller coalesced onto that lookup); nothing
            is cached then.
        """
        key = cache_key(qname, rrtype)
        entry = self._entries.get(key)
        if entry is not None:
            now = self._clock()
            if now < entry.expires:
                self._entries.move_to_end(key)
                self._report("hit")
                age = now - entry.stored_at
                remaining = max(0.0, entry.answer.ttl - age)
                return cast("DnsAnswer[T]", dataclasses.replace(entry.answer, ttl=remaining))
            del self._entries[key]
        shared = self._inflight.get(key)
        if shared is not None:
            self._report("coalesced")
        else:
            self._report("miss")
            shared = asyncio.create_task(
                self._fetch(key, fetch, self._generation), name=f"dns {key[1]} {key[0]}"
            )
            self._inflight[key] = shared
            shared.add_done_callback(lambda done: self._settled(key, done))
        # shield: one caller's cancellation must not cancel the lookup the others await.
        return cast("DnsAnswer[T]", await asyncio.shield(shared))

    async def _fetch(
        self, key: Key, fetch: Callable[[], Awaitable[DnsAnswer[T]]], generation: int
    ) -> DnsAnswer[Any]:
        answer = await fetch()
        if generation == self._generation:
            # RFC 7672 §2.1: an answer fetched before clear() may carry the security status of
            # the previous resolver state; it goes to its callers but is not kept.
            self._store(key, answer)
        return answer

    def _store(self, key: Key, answer: DnsAnswer[Any]) -> None:
        lifetime = self.lifetime(answer)
        if self._size <= 0 or lifetime <= 0:
            return
        now = self._clock()
        self._entries[key] = _Entry(answer, now, now + lifetime)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def _settled(self, key: Key, done: asyncio.Future[DnsAnswer[Any]]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if not done.cancelled():
            # Mark the exception as retrieved: when every caller was cancelled, nobody else will.
            done.exception()

    def _report(self, result: str) -> None:
        if self._observer is not None:
            self._observer.dns_cache(result)
