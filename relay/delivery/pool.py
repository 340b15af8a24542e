"""Connection cache and per-destination concurrency for the delivery engine.

Contract:
- `ConnectionCache` keeps idle outbound sessions after a completed mail transaction, keyed
  by `DestinationKey` (next hop, TLS level, port, MX or explicit route), with the facts
  their setup established (`Channel.verdict`: relay, TLS and DANE outcome). A session is
  handed out at most once (`take`), never after `idle_time` seconds unused (closed by a
  timer), never once it is `max_age` seconds old or has carried `max_uses` transactions
  (`put` refuses it; the caller QUITs). Postfix's smtp_connection_cache_time_limit,
  smtp_connection_reuse_time_limit and smtp_connection_reuse_count_limit bound the same.
- A reused session carries the verdict of its own setup: the DANE or PKIX check was made
  for this destination and level (the key), so nothing weaker is ever reused for a
  destination that needs more (RFC 7672 §2.2: DANE applies per connection).
- `DestinationSlots` bounds the deliveries in progress per destination (Postfix
  default_destination_concurrency_limit); waiters are served first come, first served.
  Entries exist only while a destination has users, so the map stays as small as the
  number of destinations in flight.
- `close()` QUITs every cached session (shutdown).
- `DeadDestinations` remembers destinations whose every connection attempt failed
  (Postfix qmgr "dead" queues): `mark(key, reason, period)` suspends `key` for `period`
  seconds of its clock, `suspended(key)` gives the reason while that lasts (None after,
  or when the clock went backwards), `reached(key)` (a session answered) and `clear()`
  end it early; `mark(..., begun)` does not suspend a destination reached since `begun`
  (the failing attempt's start, on the same clock). Expired
  entries are dropped whenever one is marked, so the map holds at most the destinations
  that failed within the last period.

Does not: open connections, send RSET (the engine checks a taken session), or log.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

__all__ = ["Channel", "ConnectionCache", "DeadDestinations", "DestinationSlots", "Quittable"]


class Quittable(Protocol):
    async def quit(self) -> None: ...
    def abort(self) -> None: ...


S = TypeVar("S", bound=Quittable)
V = TypeVar("V")


@dataclass(slots=True)
class Channel(Generic[S, V]):
    """A session after a completed transaction, and what its setup established."""

    session: S
    verdict: V
    opened: float  # monotonic time the connection was set up
    uses: int = 1  # mail transactions completed on it
    # Monotonic time the settings its setup followed were read (None: `opened`); `drop`
    # refuses it when that was before the drop, even if it connected after.
    decided: float | None = None
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class ConnectionCache(Generic[S, V]):
    def __init__(
        self,
        idle_time: float,
        max_age: float,
        max_uses: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`idle_time` <= 0 or `max_uses` <= 1 turns reuse off (every `put` QUITs)."""
        self.idle_time = idle_time
        self.max_age = max_age
        self.max_uses = max_uses
        self.clock = clock
        self._idle: dict[Hashable, list[Channel[S, V]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # Sessions set up at or before this time are not reused (see `drop`).
        self._not_after = -math.inf

    @property
    def enabled(self) -> bool:
        return self.idle_time > 0 and self.max_uses > 1

    def __len__(self) -> int:
        return sum(len(channels) for channels in self._idle.values())

    def take(self, key: Hashable) -> Channel[S, V] | None:
        """The most recently cached session for `key` that may still carry mail, or None."""
        channels = self._idle.get(key)
        while channels:
            channel = channels.pop()  # LIFO: the freshest is the least likely to be gone
            if not channels:
                del self._idle[key]
            if channel._timer is not None:
                channel._timer.cancel()
                channel._timer = None
            if self._usable(channel):
                return channel
            self._quit(channel.session)
            channels = self._idle.get(key)
        return None

    def put(self, key: Hashable, channel: Channel[S, V]) -> bool:
        """Keep `channel` for the next message to `key`; False when it may not be kept
        (reuse off, too old, used up): the caller then ends the session."""
        if not self.enabled or not self._usable(channel):
            return False
        loop = asyncio.get_running_loop()
        channel._timer = loop.call_later(self.idle_time, self._expire, key, channel)
        self._idle.setdefault(key, []).append(channel)
        return True

    def drop(self) -> int:
        """Reuse no session set up so far, nor one whose setup follows settings read
        before now (`Channel.decided`): QUIT the idle ones now; one in use is ended when
        it is put back. For a reload, since a session's verdict was reached under the
        settings it was set up with (TLS levels, insecure_mx_policy, CA file, resolvers).
        Returns how many idle sessions were ended."""
        self._not_after = self.clock()
        ended = 0
        for key in list(self._idle):
            for channel in self._idle.pop(key):
                if channel._timer is not None:
                    channel._timer.cancel()
                    channel._timer = None
                self._quit(channel.session)
                ended += 1
        return ended

    async def close(self) -> None:
        """QUIT every cached session and wait (briefly) for the QUITs to finish."""
        for key in list(self._idle):
            for channel in self._idle.pop(key):
                if channel._timer is not None:
                    channel._timer.cancel()
                self._quit(channel.session)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=5.0)
        for task in self._closing:
            task.cancel()

    def _usable(self, channel: Channel[S, V]) -> bool:
        decided = channel.opened if channel.decided is None else channel.decided
        return (
            channel.uses < self.max_uses
            and self.clock() - channel.opened < self.max_age
            and min(channel.opened, decided) > self._not_after
        )

    def _expire(self, key: Hashable, channel: Channel[S, V]) -> None:
        channels = self._idle.get(key)
        if channels is not None and channel in channels:
            channels.remove(channel)
            if not channels:
                del self._idle[key]
        channel._timer = None
        self._quit(channel.session)

    def _quit(self, session: S) -> None:
        task = asyncio.get_running_loop().create_task(_quietly_quit(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


async def _quietly_quit(session: Quittable) -> None:
    try:
        await session.quit()
    except asyncio.CancelledError:
        session.abort()
        raise
    except Exception:  # a session being dropped: nothing about it matters any more
        session.abort()


@dataclass(slots=True)
class _Slot:
    semaphore: asyncio.Semaphore
    users: int = 0


class DestinationSlots:
    """At most `limit` holders per key at once; the others wait in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: dict[Hashable, _Slot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(asyncio.Semaphore(self.limit))
        slot.users += 1
        try:
            async with slot.semaphore:
                yield
        finally:
            slot.users -= 1
            if slot.users == 0:
                del self._slots[key]


#: How many destinations DeadDestinations remembers the last answered session of (about
#: 100 bytes each); past that the oldest is forgotten, and an attempt of that destination
#: still failing may suspend it as before.
UP_KEPT = 10_000


@dataclass(frozen=True, slots=True)
class _Dead:
    since: float
    until: float
    reason: str


class DeadDestinations:
    """Destinations suspended after every connection to them failed (see the module doc)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._dead: dict[Hashable, _Dead] = {}
        # When a session to each destination last answered (the latest UP_KEPT), so that
        # an attempt whose failures began before that cannot suspend it afterwards.
        self._up: OrderedDict[Hashable, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._dead)

    def mark(self, key: Hashable, reason: str, period: float, begun: float | None = None) -> bool:
        """Suspend `key` for `period` seconds; True when it was. Nothing when `period` <= 0,
        or when a session to `key` answered at or after `begun` (the failing attempt's
        start): another delivery reached the destination meanwhile, so its failures are
        old news (Postfix qmgr: a success clears the dead state)."""
        now = self.clock()
        for other in [k for k, d in self._dead.items() if not d.since <= now < d.until]:
            del self._dead[other]
        if period <= 0:
            return False
        if begun is not None and self._up.get(key, float("-inf")) >= begun:
            return False
        self._dead[key] = _Dead(now, now + period, reason)
        return True

    def reached(self, key: Hashable) -> None:
        """A session to `key` answered: it is not dead (any suspension ends)."""
        self._dead.pop(key, None)
        self._up[key] = self.clock()
        self._up.move_to_end(key)
        if len(self._up) > UP_KEPT:
            self._up.popitem(last=False)

    def suspended(self, key: Hashable) -> str | None:
        """Why `key` is suspended, or None when it is not (any more)."""
        dead = self._dead.get(key)
        if dead is None:
            return None
        if dead.since <= self.clock() < dead.until:
            return dead.reason
        del self._dead[key]
        return None

    def clear(self) -> int:
        """End every suspension; returns how many there were."""
        count = len(self._dead)
        self._dead.clear()
        return count
