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
    "MxRecord",
    "Resolver",
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

    @property
    def secure(self) -> bool:
        return self.security is Security.SECURE


class Resolver(Protocol):
    """What the delivery engine needs from DNS (satisfied by relay.lookup.resolver)."""

    async def mx(self, domain: str) -> DnsAnswer[MxRecord]: ...

    async def addresses(self, host: str) -> DnsAnswer[str]: ...

    async def tlsa(self, host: str, port: int) -> DnsAnswer[TlsaRecord]: ...
