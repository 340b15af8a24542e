"""Per-destination TLS level and next hop: [tls.policy], [delivery.transport], relayhost. Pure.

`PolicyMap.destination(domain)` -> `Destination`: the TLS security level, the next hop
(a domain whose MX records are looked up, or an explicit host that is not) and the ports.

Lookup (Postfix transport(5) / smtp_tls_policy_maps style, parent_domain_matches_subdomains
off): an exact domain entry beats a ".parent" entry, the closest parent first; then the
default. For the next hop the default is `delivery.relayhost` when set (smarthost mode),
else the recipient domain itself.

The level is a property of the connection, so it follows the host connected to (Postfix
looks smtp_tls_policy_maps up by next-hop destination): when the next hop is not the
recipient domain itself (relayhost, a [delivery.transport] entry, a gateway next hop) and
the next-hop host has its own [tls.policy] entry (exact or ".parent"), that entry decides,
so a recipient-domain entry ("dane-bad.test" = "none", ".com" = "may") can never lower the
level to a smarthost configured "dane-only". Otherwise the recipient domain's entry
decides, then `tls.level`.

Ports (RFC 7672 §2.2.2; Postfix looks TLSA up at the port it connects to): a next hop
that names a port has its TLSA records at that port: `[host]:port` at `_port._tcp.host`,
`host:port` at `_port._tcp.<each MX host>`; every other destination at
`_<tlsa_port>._tcp` (25: the logical SMTP port, whatever `delivery.port` the connection
uses, so that the lab can run on other ports).

Why (`Destination.level_match`/`level_key`, `hop_match`/`hop_key`, and the one-line
`Destination.why`): "exact" or "parent" with the `[tls.policy]` / `[delivery.transport]`
key that matched ("next-hop exact"/"next-hop parent" when the level came from the next
hop's entry, naming in `overridden_key` the recipient-domain entry it overrode), "relayhost",
or "default". `dane-relay lookup` and `probe` show them.

`PolicyMap.from_config(tls, delivery)` builds the map from the configuration, the one
place delivery and the diagnostic commands take it from.

Address literals (`[192.0.2.1]:25`, `[IPv6:2001:db8::1]`): `Destination.literal`; the next
hop's own entry is an exact `[tls.policy]` key holding the address ("192.0.2.1"), never a
".parent" one. relay.config refuses such a next hop at a level that needs a host name.

Guarantees: never raises for a domain; names are compared in lower case and A-label form
(RFC 5891 A-labels). Does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from relay.config import DeliveryConfig, NextHop, TlsConfig
from relay.smtp.domain import DomainSyntaxError, ascii_domain

__all__ = ["Destination", "PolicyMap", "lookup_domain", "lookup_entry"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Destination:
    level: str
    next_hop: str  # MX-looked-up domain, or the explicit host (RFC 7672 §2.2.2)
    mx: bool  # False: connect to `next_hop` itself, no MX lookup
    port: int  # TCP port to connect to
    tlsa_port: int  # port in the TLSA qname _port._tcp.<host>
    via: str  # log label: "mx", or the configured next hop as written ("[h]:587")
    # Why this level and next hop (see the module docstring); not part of equality: two
    # destinations that route alike are equal however they were configured.
    # exact / parent / next-hop exact / next-hop parent / default
    level_match: str = field(default="default", compare=False)
    level_key: str = field(default="", compare=False)  # the [tls.policy] key, "" for default
    # exact / parent ([delivery.transport]) / relayhost / default (the domain's own MX)
    hop_match: str = field(default="default", compare=False)
    hop_key: str = field(default="", compare=False)  # the [delivery.transport] key
    # The recipient domain's [tls.policy] key that the next hop's entry overrode, or "".
    overridden_key: str = field(default="", compare=False)
    # `next_hop` is an IP address (an address literal such as "[192.0.2.1]:25"): nothing is
    # looked up, no DANE (RFC 7672 §2.2.2: TLSA records are found only by host name).
    literal: bool = False

    @property
    def why(self) -> str:
        """One line: where the level and the next hop come from."""
        if self.level_match == "default":
            level = f"level {self.level} (default tls.level)"
        else:
            level = f"level {self.level} ([tls.policy] {self.level_key!r}, {self.level_match}"
            if self.overridden_key:
                level += f"; overrides the recipient domain's {self.overridden_key!r}"
            level += ")"
        if self.hop_match == "default":
            hop = f"next hop {self.next_hop} (the domain's own MX hosts)"
        elif self.hop_match == "relayhost":
            hop = f"next hop {self.via} (delivery.relayhost)"
        else:
            hop = f"next hop {self.via} ([delivery.transport] {self.hop_key!r}, {self.hop_match})"
        return f"{level}; {hop}"


def _candidates(domain: str) -> Iterator[str]:
    """The domain itself, then ".parent" for each parent, closest first."""
    name = domain.lower().rstrip(".")
    yield name
    labels = name.split(".")
    for i in range(1, len(labels)):
        yield "." + ".".join(labels[i:])


def lookup_entry(table: Mapping[str, T], domain: str) -> tuple[str, T] | None:
    """The (key, value) that matches `domain`: exact beats ".parent", closest first."""
    for key in _candidates(domain):
        if key in table:
            return key, table[key]
    return None


def lookup_domain(table: Mapping[str, T], domain: str) -> T | None:
    """Exact match beats ".parent", which beats nothing (None)."""
    entry = lookup_entry(table, domain)
    return None if entry is None else entry[1]


def _lookup_key(name: str) -> str:
    """`name` as the tables are keyed: its A-label form; a name that is not a domain (an
    address literal, a malformed recipient domain that resolve_mx bounces) lower-cased,
    so that only an exact entry can match it and the lookup never fails."""
    try:
        return ascii_domain(name)
    except DomainSyntaxError:
        return name.lower()


def _match(key: str) -> str:
    return "parent" if key.startswith(".") else "exact"


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

    @classmethod
    def from_config(cls, tls: TlsConfig, delivery: DeliveryConfig) -> PolicyMap:
        """The map `[tls]` and `[delivery]` describe (as relay.app gives the engine)."""
        return cls(
            tls.level,
            policy=tls.policy,
            transport=delivery.transport,
            relayhost=delivery.relayhost,
            port=delivery.port,
        )

    @property
    def configured(self) -> bool:
        """Whether anything beyond the default level is configured."""
        return bool(self.policy or self.transport or self.relayhost)

    def destination(self, domain: str) -> Destination:
        """The level and next hop for mail to `domain` (U-labels are looked up as A-labels)."""
        domain = _lookup_key(domain)
        entry = lookup_entry(self.transport, domain)
        hop_match, hop_key = "default", ""
        hop = self.relayhost
        if entry is not None:
            (hop_key, hop), hop_match = entry, _match(entry[0])
        elif hop is not None:
            hop_match = "relayhost"
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
            # RFC 7672 §2.2.2 / RFC 6698 §3: TLSA at _port._tcp of the port connected to
            # when the next hop names one ([host]:port, or host:port whose MX hosts are
            # all reached at that port), as Postfix looks up its iterator's port.
            tlsa_port = self.tlsa_port if hop.port is None else hop.port
        level_match, level_key, level = "default", "", self.level
        rule, prefix = None, ""
        literal = hop is not None and hop.literal
        if literal:
            # An address has no parent domains: only an exact entry ("192.0.2.1") is its own.
            exact = self.policy.get(next_hop)
            rule, prefix = (None if exact is None else (next_hop, exact)), "next-hop "
        elif hop is not None and next_hop.lower() != domain:
            # Postfix smtp_tls_policy_maps: the next hop's own entry decides the level of
            # the connection to it; a recipient-domain entry must not lower it.
            rule, prefix = lookup_entry(self.policy, _lookup_key(next_hop)), "next-hop "
        own = lookup_entry(self.policy, domain)
        overridden = own[0] if rule is not None and own is not None else ""
        if rule is None:
            rule, prefix = own, ""
        if rule is not None:
            (level_key, level), level_match = rule, prefix + _match(rule[0])
        return Destination(
            level,
            next_hop,
            mx,
            port,
            tlsa_port,
            via,
            level_match,
            level_key,
            hop_match,
            hop_key,
            overridden,
            literal,
        )
