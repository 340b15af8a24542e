"""MX planning: from an MX answer to the ordered list of hosts to try. Pure.

RFC 5321 §5.1: lowest preference first, equal preferences in random order; no MX
records means the domain itself is the only host (implicit MX). RFC 7505: a
single "0 ." record means the domain accepts no mail. At most `limit` hosts
(`delivery.mx_host_limit`, default MAX_MX_HOSTS) are planned (the most preferred
ones); `Plan.dropped` counts the others, for the caller to log.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from relay.lookup.results import AnswerKind, DnsAnswer, MxRecord

__all__ = ["MAX_MX_HOSTS", "MxHost", "Plan", "order_addresses", "plan_hosts"]

#: MX hosts considered per delivery attempt, most preferred first. A hostile or broken MX
#: RRset of thousands of hosts must not tie up a delivery slot for hours, each host costing
#: address and TLSA lookups. Postfix bounds the same work with smtp_mx_address_limit
#: (default 5 addresses) and smtp_mx_session_limit (default 2 sessions); the relay caps
#: hosts here and connections in relay.delivery.engine. The default of the configurable
#: `delivery.mx_host_limit` (relay.config.DeliveryConfig, equal by test).
MAX_MX_HOSTS = 10


@dataclass(frozen=True, slots=True)
class MxHost:
    name: str
    preference: int
    implicit: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    hosts: tuple[MxHost, ...]
    null_mx: bool = False
    no_domain: bool = False
    dropped: int = 0  # MX hosts left out beyond the limit (the least preferred)


def plan_hosts(
    domain: str,
    answer: DnsAnswer[MxRecord],
    rng: random.Random | None = None,
    limit: int = MAX_MX_HOSTS,
) -> Plan:
    rng = rng or random.Random()
    if answer.kind is AnswerKind.NXDOMAIN:
        return Plan((), no_domain=True)
    if answer.kind is AnswerKind.NODATA or not answer.records:
        # RFC 5321 §5.1: no MX RRs -> the domain itself is the implicit MX, preference 0.
        return Plan((MxHost(domain, 0, implicit=True),))
    # RFC 7505 §3: a null MX ("0 .") means no mail is accepted.
    if any(r.exchange == "" for r in answer.records):
        return Plan((), null_mx=True)
    # A host listed more than once is tried once, at its most preferred (lowest) value.
    best: dict[str, int] = {}
    for r in answer.records:
        best[r.exchange] = min(r.preference, best.get(r.exchange, r.preference))
    by_pref: dict[int, list[str]] = {}
    for name, pref in best.items():
        by_pref.setdefault(pref, []).append(name)
    hosts: list[MxHost] = []
    for pref in sorted(by_pref):
        names = by_pref[pref]
        rng.shuffle(names)
        hosts.extend(MxHost(n, pref) for n in names)
    # Equal preferences are shuffled first, so a cut inside a group keeps a random subset.
    return Plan(tuple(hosts[:limit]), dropped=max(0, len(hosts) - limit))


def order_addresses(addresses: Sequence[str], preference: str) -> tuple[str, ...]:
    """One host's addresses in the order they are tried (Postfix smtp_address_preference).

    "any": as given (the resolver gives A before AAAA); "ipv6" or "ipv4": that family
    first, each family keeping its own order.
    """
    if preference not in ("ipv6", "ipv4"):
        return tuple(addresses)
    want_v6 = preference == "ipv6"
    first = [a for a in addresses if (":" in a) == want_v6]
    return (*first, *(a for a in addresses if (":" in a) != want_v6))
