"""Per-destination TLS level and next hop: [tls.policy], [delivery.transport], relayhost. Pure.

`PolicyMap.destination(domain)` -> `Destination`: the TLS security level, the next hop
(a domain whose MX records are looked up, or an explicit host that is not) and the ports.

Lookup (Postfix transport(5) / smtp_tls_policy_maps style, parent_domain_matches_subdomains
off): an exact domain entry beats a ".parent" entry, the closest parent first; then the
default. For the next hop the default is `delivery.relayhost` when set (smarthost mode),
else the recipient domain itself. For the level, the recipient domain is looked up first,
then the next-hop name (so a policy for the smarthost applies to all it carries), then
`tls.level`.

Ports (RFC 7672 §2.2.2 non-MX destinations; Postfix looks TLSA up at `_port._tcp.host` of
the next hop): an explicit `[host]:port` has its TLSA records at `_port._tcp.host`; every
other destination at `_<tlsa_port>._tcp` (25: the logical SMTP port, whatever port the
connection uses, so that the lab can run on other ports).

Guarantees: never raises for a domain; names are compared in lower case and A-label form
(RFC 5891 A-labels). Does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from relay.config import NextHop
from relay.smtp.domain import DomainSyntaxError, ascii_domain

__all__ = ["Destination", "PolicyMap", "lookup_domain"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Destination:
    level: str
    next_hop: str  # MX-looked-up domain, or the explicit host (RFC 7672 §2.2.2)
    mx: bool  # False: connect to `next_hop` itself, no MX lookup
    port: int  # TCP port to connect to
    tlsa_port: int  # port in the TLSA qname _port._tcp.<host>
    via: str  # log label: "mx", or the configured next hop as written ("[h]:587")


def _candidates(domain: str) -> Iterator[str]:
    """The domain itself, then ".parent" for each parent, closest first."""
    name = domain.lower().rstrip(".")
    yield name
    labels = name.split(".")
    for i in range(1, len(labels)):
        yield "." + ".".join(labels[i:])


def lookup_domain(table: Mapping[str, T], domain: str) -> T | None:
    """Exact match beats ".parent", which beats nothing (None)."""
    for key in _candidates(domain):
        if key in table:
            return table[key]
    return None


class PolicyMap:
    def __init__(
        self,
        level: str,
        *,
        policy: tuple[tuple[str, str], ...] = (),
        transport: tuple[tuple[str, NextHop], ...] = (),
        relayhost: NextHop | None = None,
        port: int = 25,
        tlsa_port: int = 25,
    ) -> None:
        self.level = level
        self.policy = dict(policy)
        self.transport = dict(transport)
        self.relayhost = relayhost
        self.port = port
        self.tlsa_port = tlsa_port

    @property
    def configured(self) -> bool:
        """Whether anything beyond the default level is configured."""
        return bool(self.policy or self.transport or self.relayhost)

    def destination(self, domain: str) -> Destination:
        """The level and next hop for mail to `domain` (U-labels are looked up as A-labels)."""
        try:
            domain = ascii_domain(domain)
        except DomainSyntaxError:
            domain = domain.lower()  # resolve_mx bounces it; the lookup just must not fail
        hop = lookup_domain(self.transport, domain) or self.relayhost
        if hop is None:
            next_hop, mx, port, tlsa_port, via = (
                domain.lower(),
                True,
                self.port,
                self.tlsa_port,
                "mx",
            )
        else:
            next_hop, mx, via = hop.host, hop.mx, str(hop)
            port = self.port if hop.port is None else hop.port
            # Postfix: TLSA for an explicit [host]:port at _port._tcp.host (RFC 7672 §2.2.2).
            tlsa_port = hop.port if hop.port is not None and not hop.mx else self.tlsa_port
        level = lookup_domain(self.policy, domain)
        if level is None and hop is not None:
            level = lookup_domain(self.policy, next_hop)
        return Destination(level or self.level, next_hop, mx, port, tlsa_port, via)
