"""DNS lookup results with their DNSSEC status. Pure value types.

A lookup either returns a `DnsAnswer` (data, NODATA or NXDOMAIN, each `secure`
or `insecure`) or raises `relay.errors.DnsTempFail` (SERVFAIL, bogus, timeout,
REFUSED, unreachable resolver). There is no third "maybe" value: RFC 7672 §2.1
treats anything that is not a validated answer or a provably unsigned one as a
temporary failure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from relay.dane.records import TlsaRecord

__all__ = [
    "AnswerKind",
    "DnsAnswer",
    "LookupObserver",
    "MxRecord",
    "ProbeResult",
    "Resolver",
    "ResolverStatus",
    "Security",
]


class Security(enum.Enum):
    SECURE = "secure"  # AD bit from a trusted validating resolver
    INSECURE = "insecure"  # provably unsigned (or not validated)


class AnswerKind(enum.Enum):
    DATA = "data"
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"


@dataclass(frozen=True, slots=True)
class MxRecord:
    preference: int
    exchange: str  # lower case, no trailing dot; "" for the RFC 7505 null MX "."


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DnsAnswer(Generic[T]):
    name: str  # the name that was asked for
    kind: AnswerKind
    security: Security
    records: tuple[T, ...] = ()
    canonical: str = ""  # the owner name after CNAME expansion ("" if none)
    ttl: float = 0.0  # seconds the answer may be cached (RFC 2308 §5 for NODATA/NXDOMAIN)
    # addresses() only: record types whose lookup failed while another one answered
    # (e.g. ("AAAA",) when AAAA timed out and A gave addresses).
    failed: tuple[str, ...] = ()

    @property
    def secure(self) -> bool:
        return self.security is Security.SECURE


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Outcome of the resolver validation probe (does the resolver set AD on a signed name?).

    `conclusive` says whether a resolver answered at all. An inconclusive probe (every
    resolver timed out, failed or was unreachable) proves nothing about validation: it
    never turns DANE off (RFC 7672 §2.1: a failure is never "insecure").
    """

    ok: bool
    detail: str  # what was asked and what came back, for the log line
    conclusive: bool = True


class ResolverStatus:
    """Shared, mutable view of whether the resolver is known to validate.

    Written by the periodic validation probe (relay.app), read by the delivery engine: when
    `validating` is False every answer is treated as insecure, so level dane becomes
    opportunistic TLS and dane-only defers (RFC 7672 §2.1; Postfix with a non-validating
    resolver). Only a conclusive probe sets `validating`; before the first one it is True
    (unknown), so answers with AD count and failed lookups defer, which is never a downgrade.
    `answering` is False while the last probe was inconclusive; `failure` says why.
    """

    def __init__(self, validating: bool = True, detail: str = "") -> None:
        self.validating = validating
        self.detail = detail
        self.answering = True
        self.failure = ""


class LookupObserver(Protocol):
    """Where the resolver reports what it did (relay.metrics.Metrics implements this)."""

    def dns_lookup(self, rrtype: str, result: str, seconds: float) -> None:
        """One upstream query: result is "secure", "insecure" or a DnsTempFail kind."""

    def dns_cache(self, result: str) -> None:
        """One cache consultation: "hit", "miss" or "coalesced"."""


class Resolver(Protocol):
    """What the delivery engine needs from DNS (satisfied by relay.lookup.resolver)."""

    async def mx(self, domain: str) -> DnsAnswer[MxRecord]: ...

    async def addresses(self, host: str) -> DnsAnswer[str]: ...

    async def tlsa(self, host: str, port: int) -> DnsAnswer[TlsaRecord]: ...
