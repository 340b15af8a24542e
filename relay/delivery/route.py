"""Routing: from a next-hop domain to its MX hosts, and from one MX host to how to use it.

Owns the DNS half of RFC 7672 §2.2 for the delivery engine and `dane-relay lookup`:

* `resolve_mx(resolver, domain)` -> `MxRoute`: the MX answer, its status, the planned
  hosts, and the failure that stops the domain (bad domain syntax or an address literal,
  failed lookup, NXDOMAIN, null MX). Names are looked up by their ASCII form
  (`relay.smtp.domain.ascii_domain`: IDNA 2008 A-labels, no escapes).
* `resolve_host(resolver, host, ...)` -> `HostRoute`: the host's addresses and their
  status, every TLSA lookup made, the TLSA base domain, the TLSA state and records, and
  the `relay.dane.policy` decision with a one-line reason.

Theory of operation for one host (RFC 7672 §2.2.2, §2.2.3):
    0. An MX target that is not a host name (an IP literal, octets outside LDH shown as
       escapes) is skipped before any lookup, with a `MalformedMx` failure (4.4.4).
    1. A and AAAA (the resolver looks both up and follows CNAMEs). A failure, or no
       address at all, makes the host unusable. One family failing beside addresses of
       the other is noted (`failed_families`) and the addresses are used.
    2. TLSA only when the level uses DANE and the addresses are secure — which they never
       are when the resolver does not validate: then every answer counts as insecure.
    3. TLSA at `_<port>._tcp.<name>`, first for the fully CNAME-expanded host name, then for
       the original one. The first secure RRset with records decides, and its name is the
       TLSA base domain. A secure denial or an insecure answer moves on to the next name;
       a lookup failure stops at once (the host is skipped, never used without DANE).
    4. `relay.dane.policy.decide` turns the statuses into a Decision.

Mail loops (issue 5; Postfix smtp_addr.c "mail for D loops back to myself"): given
`myself` (the relay's own names and addresses, `Myself.of(server.hostname, server.listen,
port)`), `resolve_host` refuses a host whose name (or CNAME target) is one of the names, or
one of whose addresses is one of the addresses. Both count only at a port the relay
listens on (its name at another port is another server on the same machine). An
IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is the IPv4 address it maps. A wildcard
listener (0.0.0.0 or ::) at the delivery port makes every local address of its family
the relay's: loopback ones always, others when the kernel lets a socket bind them
(`is_local_address`, the one piece of I/O here, asked at check time so that addresses
added later count). Postfix
semantics: the relay is then an MX of the domain at that preference, and hosts of that
preference or worse would hand the mail back (or to another backup): they are not tried.
Hosts come in preference order, so the failure is scoped to the DOMAIN and stops the
engine's host loop:
    * the host has the best preference of the domain (or is the configured next hop):
      `MailLoop`, 554 5.4.6, the domain bounces;
    * more preferred hosts exist (they were tried first and failed): `MailLoopDeferred`,
      451 4.4.6, the domain is deferred.
`myself=None` (the default) checks nothing.

Address literals (`[192.0.2.1]:25` configured as a next hop; `resolve_host(...,
literal=True)`): the address is used as configured and nothing is looked up. Levels none,
may and encrypt apply as for a name; at dane, DANE cannot apply (RFC 7672 §2.2.2: TLSA
records are found by host name), so TLS is opportunistic with reason `ip_literal`;
dane-only, verify and secure fail the host (relay.config refuses them at load). The mail
loop check applies to the address; no SNI is sent (`HostRoute.literal`, RFC 6066 §3).

Guarantees: both functions return values and never raise `DnsTempFail`: a failed lookup
becomes a status, a `failure` (a `relay.errors.DeliveryError` scoped to the host or the
domain, ready to raise) and a reason. They never log; malformed TLSA records are returned
in `HostRoute.malformed` for the caller to count and log. Does not connect, match
certificates, or decide anything the policy table does not.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from relay.config import Endpoint
from relay.dane.policy import (
    Action,
    AddressStatus,
    Decision,
    MxStatus,
    TlsaState,
    TlsRequirement,
    decide,
    wants_tlsa,
)
from relay.dane.records import TlsaRecord, select_usable
from relay.delivery.planner import MAX_MX_HOSTS, MxHost, Plan, plan_hosts
from relay.errors import (
    BadDestinationDomain,
    DaneNotAvailable,
    DeliveryError,
    DnsTempFail,
    MailLoop,
    MailLoopDeferred,
    MalformedMx,
    NoSuchDomain,
    NullMx,
    Scope,
    TemporaryFailure,
    TlsaLookupFailed,
    TlsaMalformed,
)
from relay.lookup.results import AnswerKind, DnsAnswer, MxRecord, Resolver, Security
from relay.smtp.domain import DomainSyntaxError, ascii_domain
from relay.smtp.reply import SmtpReply

__all__ = [
    "HostRoute",
    "Myself",
    "MxRoute",
    "TlsaLookup",
    "below_myself",
    "explicit_route",
    "is_local_address",
    "resolve_host",
    "resolve_mx",
]


def _address_key(text: str) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # RFC 4291 §2.5.5.2: ::ffff:a.b.c.d is the IPv4 host a.b.c.d; a connection to it
        # reaches an IPv4 listener on a.b.c.d.
        return str(ip.ipv4_mapped)
    return ip.compressed


#: Wildcard listen addresses by the address version they cover. An "::" listener covers
#: IPv6 only: relay.inbound.server binds AF_INET6 and asyncio (and uvloop) set IPV6_V6ONLY.
_WILDCARDS = {"0.0.0.0": 4, "::": 6}
#: Documentation addresses no interface has (RFC 5737 §3, RFC 3849 §2): when one of them
#: can be bound, the kernel allows non-local binds (ip_nonlocal_bind) and binding proves
#: nothing.
_NEVER_LOCAL = {4: "192.0.2.1", 6: "2001:db8::1"}


def _bindable(text: str, version: int) -> bool:
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((text, 0))
    except OSError:
        return False
    return True


def is_local_address(text: str) -> bool:
    """Whether `text` (an IP address) is one of this host's own addresses.

    Loopback (127.0.0.0/8, ::1) and unspecified (0.0.0.0, ::) addresses always are; another
    address is when a socket can bind it, which the kernel allows only for addresses
    configured on an interface. Where non-local binds are allowed (a documentation
    address binds too) only loopback and unspecified addresses count: a loop then missed
    still ends at the hop limit (server.max_received_headers, RFC 5321 §6.3).
    """
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # RFC 1122 §3.2.1.3: 127/8 never leaves the host; RFC 4291 §2.5.3: nor does ::1. A
    # connection to the unspecified address reaches this host too (Linux, BSD).
    if ip.is_loopback or ip.is_unspecified:
        return True
    if ip.is_link_local:
        return False  # needs a scope id to bind; MX data cannot carry one
    return _bindable(str(ip), ip.version) and not _bindable(_NEVER_LOCAL[ip.version], ip.version)


@dataclass(frozen=True, slots=True)
class Myself:
    """The relay's own identity for mail-loop detection: DNS names (A-labels, lower case,
    no trailing dot), IP addresses (compressed form, IPv4-mapped ones as IPv4) and the
    wildcard listen addresses ("0.0.0.0", "::") at the delivery port. `is_local` decides
    which addresses a wildcard covers (`is_local_address`; tests give their own)."""

    names: frozenset[str] = frozenset()
    addresses: frozenset[str] = frozenset()
    wildcards: frozenset[str] = frozenset()
    is_local: Callable[[str], bool] = field(default=is_local_address, compare=False)

    @classmethod
    def of(
        cls,
        hostname: str | None,
        listen: Iterable[Endpoint],
        port: int | None = None,
        is_local: Callable[[str], bool] = is_local_address,
    ) -> Myself:
        """From `server.hostname` and `server.listen`. With `port`, only the addresses the
        relay listens on at that port count (the port delivery connects to: a relay on
        127.0.0.1:2525 that delivers to 127.0.0.1:25 talks to another server). A wildcard
        listen address (0.0.0.0, ::) at that port stands for every local address of its
        family (Postfix inet_interfaces = all: every interface address is myself). The
        name counts only when the relay listens at `port` as well: `[server.hostname]:10025`
        is another server on the same machine (a content filter), not the relay."""
        # RFC 5321 §5.1: the loop is mail handed back to this relay, which only answers on
        # its listen ports; the name says which machine, the port which server on it.
        listening = port is None or any(ep.port == port for ep in listen)
        names = frozenset(
            {_ascii_or_same(hostname).lower().rstrip(".")} if hostname and listening else ()
        )
        keys = {_address_key(ep.host) for ep in listen if port is None or ep.port == port}
        wildcards = frozenset(k for k in keys if k in _WILDCARDS)
        return cls(names, frozenset(keys - wildcards), wildcards, is_local)

    def loops(self, host: str, canonical: str, addresses: Iterable[str]) -> str:
        """Why `host` is the relay itself ("" when it is not)."""
        for name in (host, canonical):
            if name and _ascii_or_same(name).lower().rstrip(".") in self.names:
                return f"host name {name} is this relay (server.hostname)"
        versions = {_WILDCARDS[w]: w for w in self.wildcards}
        for address in addresses:
            key = _address_key(address)
            if key in self.addresses:
                return f"address {address} is this relay's (server.listen)"
            try:
                version = ipaddress.ip_address(key).version
            except ValueError:
                continue
            # RFC 5321 §5.1 (Postfix smtp_addr.c): a wildcard listener is every local address.
            if version in versions and self.is_local(key):
                return (
                    f"address {address} is local and this relay listens on "
                    f"{versions[version]} (server.listen)"
                )
        return ""


@dataclass(frozen=True, slots=True)
class MxRoute:
    """What the MX lookup of one next-hop domain gave."""

    domain: str
    answer: DnsAnswer[MxRecord] | None  # None: the lookup failed
    status: MxStatus  # INSECURE for every answer when the resolver does not validate
    plan: Plan
    failure: DeliveryError | None  # set when no host is to be tried: defer or bounce
    validating: bool = True
    literal: bool = False  # an address-literal next hop: nothing was looked up

    @property
    def dnssec(self) -> str:
        """Log label: secure / insecure / unvalidated, or "-" when the lookup failed or
        none was made (an address literal)."""
        if self.answer is None or self.literal:
            return "-"
        return self.status.value if self.validating else "unvalidated"


@dataclass(frozen=True, slots=True)
class TlsaLookup:
    """One TLSA query made for a host, in the order made."""

    base: str  # the candidate TLSA base domain
    answer: DnsAnswer[TlsaRecord] | None  # None: the lookup failed
    error: DnsTempFail | None = None

    @property
    def outcome(self) -> str:
        """secure / insecure / secure-nxdomain / secure-nodata / failed:<kind>."""
        if self.answer is None:
            return f"failed:{self.error.kind if self.error else 'error'}"
        if self.answer.kind is AnswerKind.DATA or not self.answer.secure:
            return self.answer.security.value
        return f"secure-{self.answer.kind.value}"


@dataclass(frozen=True, slots=True)
class HostRoute:
    """Everything known about one MX host before connecting to it."""

    host: MxHost
    next_hop: str
    mx_status: MxStatus  # as the policy saw it (the implicit MX counts as secure)
    addresses: tuple[str, ...]
    address_status: AddressStatus
    failed_families: tuple[str, ...]  # e.g. ("AAAA",): failed while the other family answered
    canonical: str  # the CNAME-expanded host name, "" when there was no CNAME
    tlsa_lookups: tuple[TlsaLookup, ...]
    tlsa_base: str  # RFC 7672 §2.2.3: where the TLSA records were found (SNI, name checks)
    tlsa_state: TlsaState
    tlsa_records: tuple[TlsaRecord, ...]  # every record of the deciding secure RRset
    usable: tuple[TlsaRecord, ...]  # what DANE matches against (RFC 7671 §9 agility applied)
    malformed: tuple[TlsaRecord, ...]  # secure records with bad data (RFC 7671 §4.1)
    decision: Decision
    reason: str  # one line: what was found and what the policy made of it
    failure: DeliveryError | None  # set unless the decision uses the host
    dnssec: str  # log label: secure / insecure / mx-insecure / unvalidated / "-"
    # The host is a configured address literal ("[192.0.2.1]"): no lookup, no SNI.
    literal: bool = False

    @property
    def reference_names(self) -> tuple[str, ...]:
        """RFC 7672 §3.2.2: TLSA base domain, MX host name, and the next-hop domain only
        when the MX RRset that named the host is secure."""
        names = [self.tlsa_base, self.host.name]
        if self.mx_status is MxStatus.SECURE:
            names.append(self.next_hop)
        return tuple(dict.fromkeys(n.lower() for n in names))

    @property
    def dane_label(self) -> str:
        """The TLS outcome label a DANE match earns: "verified", or "trusted" when the MX
        host name itself was not authenticated (insecure MX RRset, RFC 7672 §2.2.1)."""
        return "verified" if self.mx_status is MxStatus.SECURE else "trusted"


async def resolve_mx(
    resolver: Resolver,
    domain: str,
    *,
    validating: bool = True,
    rng: random.Random | None = None,
    host_limit: int = MAX_MX_HOSTS,
) -> MxRoute:
    """Look up and plan the MX hosts of `domain` (at most `host_limit`, the most preferred).
    Never raises DnsTempFail.

    `domain` is looked up by its ASCII form (`relay.smtp.domain.ascii_domain`), which is
    also `MxRoute.domain` and the implicit MX. A domain that has none (bad syntax, an
    address literal) is not looked up: its failure is a `BadDestinationDomain` (bounce).
    """
    try:
        # RFC 5321 §2.3.5, RFC 5890/5891: the DNS name is the IDNA 2008 A-label form.
        qname = ascii_domain(domain)
    except DomainSyntaxError as exc:
        # It can never resolve: bounce at once (RFC 3463 X.1.2), never retry for days.
        return MxRoute(domain, None, MxStatus.FAILED, Plan(()), _bad_domain(exc), validating)
    try:
        answer = await resolver.mx(qname)
    except DnsTempFail as exc:
        # RFC 7672 §2.1, §2.2.1: a failed MX lookup defers the domain, never "no MX".
        return MxRoute(qname, None, MxStatus.FAILED, Plan(()), exc, validating)
    # RFC 7672 §2.1: without a validating resolver nothing is secure.
    status = MxStatus.SECURE if answer.secure and validating else MxStatus.INSECURE
    plan = plan_hosts(qname, answer, rng, host_limit)
    failure: DeliveryError | None = None
    if plan.no_domain:
        failure = NoSuchDomain(scope=Scope.DOMAIN)
    elif plan.null_mx:
        # RFC 7505 §3: a null MX bounces at once.
        failure = NullMx(scope=Scope.DOMAIN)
    return MxRoute(qname, answer, status, plan, failure, validating)


def explicit_route(host: str, *, literal: bool = False) -> MxRoute:
    """The route to a configured `[host]` next hop: no MX lookup (RFC 7672 §2.2.2).

    The host stands as its own implicit MX: the name comes from the configuration, not from
    DNS, so it is the TLSA base domain and the reference identifier for DANE-TA, and a DANE
    match is "verified" when its addresses and TLSA records are secure. `literal`: `host`
    is an IP address (`[192.0.2.1]`), to be passed on to `resolve_host`.
    """
    answer: DnsAnswer[MxRecord] = DnsAnswer(host, AnswerKind.NODATA, Security.SECURE)
    plan = Plan((MxHost(host, 0, implicit=True),))
    return MxRoute(host, answer, MxStatus.SECURE, plan, None, literal=literal)


def _literal_route(
    host: MxHost,
    level: str,
    myself: Myself | None,
    best_preference: int | None,
) -> HostRoute:
    """The route of an address-literal next hop (`[192.0.2.1]:25`): its one address is
    used as configured, nothing is looked up, and DANE cannot apply."""
    address = host.name
    mx_status = MxStatus.SECURE  # configured, not taken from DNS
    loop = myself.loops("", "", (address,)) if myself is not None else ""
    if loop:
        # Postfix smtp_addr.c: a literal that is one of the relay's own addresses loops too.
        return replace(
            _mail_loop(
                host, address, mx_status, (address,), AddressStatus.INSECURE, (), "", loop,
                best_preference, dnssec="-",
            ),
            literal=True,
        )  # fmt: skip
    failure: DeliveryError | None = None
    if level in ("none", "may", "encrypt"):
        # RFC 3207 §4.1 / RFC 7435 §3: these levels need no name; as for any host.
        decision = decide(level, mx_status, AddressStatus.INSECURE, TlsaState.NOT_LOOKED_UP, "dane")
    elif level == "dane":
        # RFC 7672 §2.2.2: TLSA records are at _port._tcp.<host name>; an address has none,
        # so DANE cannot apply: opportunistic TLS, as for an insecure destination.
        decision = Decision(
            Action.NO_DANE, TlsRequirement.MAY, "ip_literal", "RFC 7672 §2.2.2",
            "next hop is an IP address: no TLSA records, DANE cannot apply: opportunistic TLS",
        )  # fmt: skip
    else:
        # relay.config refuses this; should it get here, never send without the required
        # authentication: RFC 7672 §2.2.2 (no TLSA for an address), and verify/secure have
        # no name to match the certificate against.
        why = f"next hop is an IP address: level {level} needs a host name"
        decision = Decision(Action.SKIP_HOST, None, "ip_literal", "RFC 7672 §2.2.2", why)
        if level == "dane-only":
            failure = DaneNotAvailable(
                f"{DaneNotAvailable.default_reply.text} for [{address}]: an IP address",
                scope=Scope.HOST,
            )
        else:
            failure = TemporaryFailure(
                reply=SmtpReply(451, "4.7.5", f"TLS level {level} needs a host name"),
                scope=Scope.HOST,
            )
    return HostRoute(
        host=host,
        next_hop=address,
        mx_status=mx_status,
        addresses=(address,),
        address_status=AddressStatus.INSECURE,
        failed_families=(),
        canonical="",
        tlsa_lookups=(),
        tlsa_base="",
        tlsa_state=TlsaState.NOT_LOOKED_UP,
        tlsa_records=(),
        usable=(),
        malformed=(),
        decision=decision,
        reason=f"address literal, nothing looked up; {decision.why} ({decision.rfc})",
        failure=failure,
        dnssec="-",
        literal=True,
    )


def _bad_domain(exc: DomainSyntaxError) -> BadDestinationDomain:
    if exc.literal:
        # RFC 5321 §4.1.3 literals name no MX and no TLSA base domain (RFC 7672 §2.2.3).
        text = f"Bad destination domain: {exc}; mail is routed by MX only"
    else:
        text = f"Bad destination domain syntax: {exc}"
    return BadDestinationDomain(text, scope=Scope.DOMAIN)


@dataclass(frozen=True, slots=True)
class _Tlsa:
    lookups: tuple[TlsaLookup, ...] = ()
    base: str = ""
    state: TlsaState = TlsaState.NOT_LOOKED_UP
    records: tuple[TlsaRecord, ...] = ()
    usable: tuple[TlsaRecord, ...] = ()
    malformed: tuple[TlsaRecord, ...] = ()


async def _tlsa(resolver: Resolver, host: MxHost, canonical: str, port: int) -> _Tlsa:
    # RFC 7672 §2.2.3: candidates are the fully CNAME-expanded name, then the original one.
    bases = [canonical, host.name] if canonical and canonical != host.name.lower() else [host.name]
    lookups: list[TlsaLookup] = []
    state = TlsaState.NOT_LOOKED_UP
    for base in bases:
        try:
            answer = await resolver.tlsa(base, port)
        except DnsTempFail as exc:
            # RFC 7672 §2.1, §2.2.3: a failed lookup is not a denial: stop here.
            lookups.append(TlsaLookup(base, None, exc))
            return _Tlsa(tuple(lookups), base, TlsaState.LOOKUP_FAILED)
        lookups.append(TlsaLookup(base, answer))
        if not answer.secure:
            state = TlsaState.INSECURE  # RFC 7672 §2.2.3: insecure TLSA: next candidate
            continue
        if answer.kind is not AnswerKind.DATA or not answer.records:
            state = TlsaState.SECURE_NONE  # RFC 7672 §2.2.3: secure denial: next candidate
            continue
        # RFC 7672 §2.2.3: the first secure TLSA RRset decides; its name is the base domain.
        usable = select_usable(answer.records)  # RFC 7671 §9, RFC 7672 §3.1.3
        malformed = tuple(r for r in answer.records if r.malformed)
        if usable:
            state = TlsaState.SECURE_USABLE
        elif malformed:
            state = TlsaState.SECURE_MALFORMED
        else:
            state = TlsaState.SECURE_UNUSABLE
        return _Tlsa(tuple(lookups), base, state, answer.records, usable, malformed)
    return _Tlsa(tuple(lookups), bases[-1], state)


def _failure(
    decision: Decision, host: MxHost, base: str, port: int, address_error: DnsTempFail | None
) -> DeliveryError | None:
    """The error that reports a decision not to use the host (None when it is used)."""
    if decision.action in (Action.DANE, Action.NO_DANE):
        return None
    where = f"{base}:{port}"
    if decision.reason == "address_lookup" and address_error is not None:
        return DnsTempFail(address_error.reply.text, kind=address_error.kind, scope=Scope.HOST)
    if decision.reason == "no_address":
        return DnsTempFail(f"Host or domain name not found: {host.name}", scope=Scope.HOST)
    if decision.reason == "tlsa_lookup":
        return TlsaLookupFailed(f"TLSA lookup error for {where}", scope=Scope.HOST)
    if decision.reason == "tlsa_malformed":
        return TlsaMalformed(f"TLSA records malformed for {where}", scope=Scope.HOST)
    if decision.reason == "dane_required":
        text = f"{DaneNotAvailable.default_reply.text} for {where}"
        return DaneNotAvailable(text, scope=Scope.HOST)
    # Not reachable from resolve_host (its MX lookup answered); kept total for the table.
    return DnsTempFail(f"{decision.why} for {host.name}", scope=Scope.DOMAIN)


def _ascii_or_same(name: str) -> str:
    try:
        return ascii_domain(name)
    except DomainSyntaxError:
        return name


def _skipped(
    host: MxHost,
    next_hop: str,
    mx_status: MxStatus,
    decision: Decision,
    failure: DeliveryError,
    dnssec: str,
    addresses: tuple[str, ...] = (),
    address_status: AddressStatus = AddressStatus.NONE,
    failed: tuple[str, ...] = (),
    canonical: str = "",
) -> HostRoute:
    """The route of a host that is not used and has no TLSA looked up: `decision` (a
    SKIP_HOST) says why, `failure` is what the engine records for it."""
    return HostRoute(
        host=host,
        next_hop=next_hop,
        mx_status=mx_status,
        addresses=addresses,
        address_status=address_status,
        failed_families=failed,
        canonical=canonical,
        tlsa_lookups=(),
        tlsa_base=host.name,
        tlsa_state=TlsaState.NOT_LOOKED_UP,
        tlsa_records=(),
        usable=(),
        malformed=(),
        decision=decision,
        reason=f"{decision.why} ({decision.rfc})",
        failure=failure,
        dnssec=dnssec,
    )


def _malformed_mx(
    host: MxHost,
    next_hop: str,
    mx_status: MxStatus,
    mx_security: Security,
    validating: bool,
    exc: DomainSyntaxError,
) -> HostRoute:
    """The route of an MX target that is not a host name: skipped, nothing looked up."""
    text = f"{MalformedMx.default_reply.text}: {exc}"
    # Postfix treats a malformed MX target as a DNS configuration error: skip the host; the
    # engine defers the domain when no other MX is left (RFC 5321 §5.1).
    decision = Decision(Action.SKIP_HOST, None, "malformed_mx", "RFC 5321 §5.1", text)
    dnssec = mx_security.value if validating else "unvalidated"
    failure = MalformedMx(text, scope=Scope.HOST)
    return _skipped(host, next_hop, mx_status, decision, failure, dnssec)


def _mail_loop(
    host: MxHost,
    next_hop: str,
    mx_status: MxStatus,
    addresses: tuple[str, ...],
    address_status: AddressStatus,
    failed: tuple[str, ...],
    canonical: str,
    loop: str,
    best_preference: int | None,
    dnssec: str,
) -> HostRoute:
    """The route of a host that is the relay itself: not used, and neither is any host of
    its preference or worse (Postfix smtp_addr.c; module docstring)."""
    best = host.preference if best_preference is None else best_preference
    failure: DeliveryError
    if host.preference <= best:
        text = f"mail for {next_hop} loops back to myself ({loop})"
        failure = MailLoop(text, scope=Scope.DOMAIN)
    else:
        text = (
            f"mail for {next_hop} loops back to myself ({loop}, MX preference "
            f"{host.preference}); more preferred MX hosts did not take it"
        )
        failure = MailLoopDeferred(text, scope=Scope.DOMAIN)
    decision = Decision(Action.SKIP_HOST, None, "mail_loop", "RFC 5321 §5.1, Postfix", text)
    return _skipped(
        host,
        next_hop,
        mx_status,
        decision,
        failure,
        dnssec,
        addresses,
        address_status,
        failed,
        canonical,
    )


def below_myself(host: MxHost, loop: HostRoute) -> HostRoute:
    """The route of a host that is not tried because the relay itself (`loop`, the route
    `resolve_host` refused as a mail loop) is an MX host of the domain at a preference
    as good or better: nothing is looked up for it, and its failure is `loop`'s."""
    assert loop.failure is not None
    # RFC 5321 §5.1: the relay only sends to MX hosts with a lower preference value than
    # its own; Postfix (smtp_addr.c) drops the rest of the list.
    text = (
        f"MX preference {host.preference} is not lower than this relay's own "
        f"({loop.host.preference}, {loop.host.name}): not tried"
    )
    decision = Decision(Action.SKIP_HOST, None, "below_myself", "RFC 5321 §5.1", text)
    return _skipped(host, loop.next_hop, loop.mx_status, decision, loop.failure, loop.dnssec)


async def resolve_host(
    resolver: Resolver,
    host: MxHost,
    *,
    next_hop: str,
    level: str,
    mx_security: Security,
    insecure_mx_policy: str = "dane",
    validating: bool = True,
    tlsa_port: int = 25,
    myself: Myself | None = None,
    best_preference: int | None = None,
    literal: bool = False,
) -> HostRoute:
    """Resolve one MX host and decide how to use it. Never raises DnsTempFail.

    `literal`: `host` is a configured address-literal next hop (`explicit_route(...,
    literal=True)`): its name is the address to connect to; nothing is looked up, DANE
    cannot apply (level dane: opportunistic TLS, reason ip_literal), and dane-only,
    verify and secure fail the host (the configuration refuses them before).

    `myself`: the relay's identity for mail-loop detection (module docstring); None: no
    check. `best_preference`: the lowest MX preference of the domain (the plan's first
    host); None: this host's own, i.e. a loop at this host bounces.

    `mx_security` is the security of the MX answer that named the host (of the NODATA
    answer for the implicit MX). `tlsa_port` is the port in the TLSA name, always the
    logical SMTP port (RFC 7672 §2.2.3), whatever port the connection uses.

    Raises:
        KeyError: `level` or `insecure_mx_policy` is unknown (the configuration prevents it).
    """
    # The implicit MX (RFC 5321 §5.1) is the next-hop domain itself, not a name taken from
    # an MX RRset, so there is no MX host name to authenticate (RFC 7672 §2.2.1).
    if literal:
        return _literal_route(host, level, myself, best_preference)
    mx_secure = host.implicit or (mx_security is Security.SECURE and validating)
    mx_status = MxStatus.SECURE if mx_secure else MxStatus.INSECURE
    # RFC 7672 §3.2.2: reference identifiers are DNS names in their A-label form.
    next_hop = _ascii_or_same(next_hop)
    try:
        # RFC 5321 §5.1, §2.3.5: an MX names a host; never look up, connect to or send as
        # SNI (RFC 7672 §8.1, RFC 6066 §3) an IP literal or a name with other octets.
        ascii_domain(host.name)
    except DomainSyntaxError as exc:
        return _malformed_mx(host, next_hop, mx_status, mx_security, validating, exc)
    notes: list[str] = []
    if not validating:
        notes.append("resolver not validating: every answer counts as insecure (RFC 7672 §2.1)")

    addresses: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    canonical = ""
    address_error: DnsTempFail | None = None
    try:
        answer = await resolver.addresses(host.name)
    except DnsTempFail as exc:
        address_error = exc
        address_status = AddressStatus.FAILED
        notes.append(f"address lookup failed ({exc.kind}): {exc.reply.text}")
    else:
        addresses, failed, canonical = answer.records, answer.failed, answer.canonical
        if not addresses:
            address_status = AddressStatus.NONE
        elif answer.secure and validating:
            address_status = AddressStatus.SECURE
        else:
            address_status = AddressStatus.INSECURE
        if failed:
            notes.append(f"{'/'.join(failed)} lookup failed, using the other family")

    loop = myself.loops(host.name, canonical, addresses) if myself is not None else ""
    if loop:
        return _mail_loop(
            host,
            next_hop,
            mx_status,
            addresses,
            address_status,
            failed,
            canonical,
            loop,
            best_preference,
            dnssec="unvalidated" if not validating else mx_security.value,
        )

    tlsa = _Tlsa(base=host.name)
    if wants_tlsa(level, address_status):
        tlsa = await _tlsa(resolver, host, canonical, tlsa_port)
        last = tlsa.lookups[-1]
        if last.error is not None:
            notes.append(f"TLSA lookup failed at _{tlsa_port}._tcp.{last.base} ({last.error.kind})")
        if tlsa.malformed:
            notes.append(f"{len(tlsa.malformed)} malformed TLSA record(s)")

    decision = decide(level, mx_status, address_status, tlsa.state, insecure_mx_policy)
    if not validating:
        dnssec = "unvalidated"
    elif address_status in (AddressStatus.FAILED, AddressStatus.NONE):
        dnssec = mx_security.value  # nothing learnt beyond the MX answer
    elif address_status is AddressStatus.INSECURE:
        dnssec = "insecure"
    else:
        dnssec = "secure" if mx_security is Security.SECURE else "mx-insecure"
    return HostRoute(
        host=host,
        next_hop=next_hop,
        mx_status=mx_status,
        addresses=addresses,
        address_status=address_status,
        failed_families=failed,
        canonical=canonical,
        tlsa_lookups=tlsa.lookups,
        tlsa_base=tlsa.base,
        tlsa_state=tlsa.state,
        tlsa_records=tlsa.records,
        usable=tlsa.usable,
        malformed=tlsa.malformed,
        decision=decision,
        reason="; ".join([*notes, f"{decision.why} ({decision.rfc})"]),
        failure=_failure(decision, host, tlsa.base, tlsa_port, address_error),
        dnssec=dnssec,
    )
