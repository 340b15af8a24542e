"""`dane-relay lookup`: the whole resolution of one next-hop domain, as delivery sees it.

Owns:
    * `lookup(resolver, domain, ...)` -> `LookupReport`: runs the resolver's validation
      probe, then `relay.delivery.route.resolve_mx` and `resolve_host` for every MX host —
      the code the delivery engine runs, with the same inputs (level, insecure_mx_policy,
      validating), so the report cannot disagree with delivery.
    * `render_text(report)` and `render_json(report)`: pure renderings for people and for
      scripts, built from public pieces (`header_lines`, `mx_lines`, `host_lines`,
      `report_dict`, `host_dict`, `error_dict`, `failure_outcome`) that `relay.probe`
      (`dane-relay probe`) extends with what it sees on the wire, so that both commands
      describe the resolution in the same words.

Per-destination policy: `lookup(..., policy=PolicyMap)` picks the level and next hop with
`PolicyMap.destination` (relay.delivery.policymap), the engine's own selection: `[tls.policy]`,
`[delivery.transport]` and `delivery.relayhost` apply, an explicit `[host]:port` next hop is
used without MX lookup (`relay.delivery.route.explicit_route`), and the report says which
entry chose them (`Destination.why`). `myself` (the relay's identity per connection port)
turns on the mail-loop check of `relay.delivery.route.resolve_host`.

The outcome mirrors `relay.delivery.engine` (RFC 7672 §2.2, RFC 5321 §5.1, RFC 7505):

    =========  ==============================================================  ====
    attempt    at least one MX host is usable: mail would be sent to it         0
    defer      the MX lookup failed, or every host is skipped                   75
    bounce     NXDOMAIN or a null MX                                            69
    =========  ==============================================================  ====

Unlike the engine, which stops at the first host that takes the message, the report
resolves every MX host, but for those at or below the relay's own preference when the
relay is one of them (mail loop): they are listed as skipped, with the reason, and not
looked up (RFC 5321 §5.1; `relay.delivery.route.below_myself`). Hosts of equal
preference are shown by name; the engine tries them in random order (RFC 5321 §5.1).

Does not: connect to any host (`relay.probe` does), match certificates (`dane-relay tlsa
verify` does that), cache answers, or log.
"""

from __future__ import annotations

import enum
import json
import random
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from relay.dane.policy import DANE_LEVELS, Action, AddressStatus
from relay.dane.records import TlsaRecord
from relay.delivery.attempt import as_temporary
from relay.delivery.planner import MAX_MX_HOSTS
from relay.delivery.policymap import Destination, PolicyMap
from relay.delivery.route import (
    HostRoute,
    MxRoute,
    Myself,
    TlsaLookup,
    below_myself,
    explicit_route,
    resolve_host,
    resolve_mx,
)
from relay.errors import BadDestinationDomain, DeliveryError, DnsTempFail, PermanentFailure, Scope
from relay.lookup.results import AnswerKind, ProbeResult, Resolver, Security
from relay.smtp.domain import DomainSyntaxError, ascii_domain

__all__ = [
    "LookupReport",
    "LookupResolver",
    "Outcome",
    "error_dict",
    "failure_outcome",
    "header_lines",
    "host_dict",
    "host_lines",
    "lookup",
    "mx_lines",
    "json_safe",
    "render_json",
    "render_text",
    "report_dict",
    "terminal_safe",
]


class LookupResolver(Resolver, Protocol):
    """A resolver that can also prove it validates (relay.lookup.resolver.DnsResolver)."""

    async def probe_validation(self) -> ProbeResult: ...


class Outcome(enum.Enum):
    ATTEMPT = "attempt"
    DEFER = "defer"
    BOUNCE = "bounce"


@dataclass(frozen=True, slots=True)
class LookupReport:
    domain: str  # the recipient domain (A-label form); `mx.domain` is the next hop looked up
    level: str
    insecure_mx_policy: str
    tlsa_port: int
    resolvers: str  # the configured resolvers, for the report
    probe: ProbeResult
    mx: MxRoute
    hosts: tuple[HostRoute, ...]  # every MX host, by preference then name
    outcome: Outcome
    reply: str  # the deferral or bounce reply; "" for attempt
    usable: tuple[str, ...]  # names of the hosts mail would be sent to, in order
    destination: Destination | None = None  # the policy map's choice; None: MX of `domain`

    @property
    def validating(self) -> bool:
        return _trusts_ad(self.probe)


def _trusts_ad(probe: ProbeResult) -> bool:
    """As the running relay: only a conclusive probe answer without AD turns DANE off.

    RFC 7672 §2.1: a probe that got no answer proves nothing; lookups that fail defer.
    """
    return probe.ok or not probe.conclusive


async def lookup(
    resolver: LookupResolver,
    domain: str,
    *,
    level: str,
    insecure_mx_policy: str = "dane",
    tlsa_port: int = 25,
    resolvers: str = "",
    policy: PolicyMap | None = None,
    myself: Callable[[int], Myself] | None = None,
    host_limit: int = MAX_MX_HOSTS,
) -> LookupReport:
    """Resolve `domain` as the delivery engine would and say what would happen.

    `host_limit`: the MX hosts considered, most preferred first (`delivery.mx_host_limit`).

    `policy`: the per-destination level and next hop (`PolicyMap.from_config`); None:
    `level` and the domain's own MX hosts, TLSA at `tlsa_port`. `myself(port)`: the
    relay's identity for the connection port (`Myself.of(hostname, server.listen, port)`),
    for the mail-loop check; None: no check.

    `LookupReport.domain` is the recipient domain in its A-label form (RFC 5891), or
    `domain` itself when it has none; `LookupReport.mx.domain` is the next hop looked up.

    Raises:
        KeyError: `level` or `insecure_mx_policy` is unknown (the configuration prevents it).
    """
    routes = policy or PolicyMap(level, tlsa_port=tlsa_port)
    dest = routes.destination(domain)
    # RFC 7672 §2.1: answers count as secure only while the resolver is known to validate,
    # exactly as the running relay reads its ResolverStatus.
    probe = await resolver.probe_validation()
    validating = _trusts_ad(probe)
    # As the engine: an explicit [host] next hop is used without MX lookup (RFC 7672 §2.2.2).
    mx = (
        await resolve_mx(
            resolver,
            dest.next_hop,
            validating=validating,
            rng=random.Random(0),
            host_limit=host_limit,
        )
        if dest.mx
        else explicit_route(dest.next_hop, literal=dest.literal)
    )
    if not routes.configured:
        domain = mx.domain  # the name looked up: the A-label form, or `domain` when it has none
    else:
        domain = _ascii_or_same(domain)
    identity = myself(dest.port) if myself is not None else None
    hosts: list[HostRoute] = []
    if mx.failure is None and mx.answer is not None:
        best = mx.plan.hosts[0].preference if mx.plan.hosts else None
        loop: HostRoute | None = None  # the host that is this relay, once met
        for host in sorted(mx.plan.hosts, key=lambda h: (h.preference, h.name)):
            if loop is not None and host.preference >= loop.host.preference:
                # RFC 5321 §5.1: only MX hosts more preferred than the relay itself.
                hosts.append(below_myself(host, loop))
                continue
            route = await resolve_host(
                resolver,
                host,
                next_hop=mx.domain,
                level=dest.level,
                mx_security=mx.answer.security,
                insecure_mx_policy=insecure_mx_policy,
                validating=validating,
                tlsa_port=dest.tlsa_port,
                myself=identity,
                best_preference=best,
                literal=dest.literal,
            )
            if route.decision.reason == "mail_loop":
                loop = route
                # Hosts of the relay's own preference listed before it are not tried either.
                hosts = [
                    below_myself(h.host, loop) if h.host.preference >= host.preference else h
                    for h in hosts
                ]
            hosts.append(route)
    outcome, reply, usable = _outcome(mx, hosts)
    return LookupReport(
        domain=domain,
        level=dest.level,
        insecure_mx_policy=insecure_mx_policy,
        tlsa_port=dest.tlsa_port,
        resolvers=resolvers,
        probe=probe,
        mx=mx,
        hosts=tuple(hosts),
        outcome=outcome,
        reply=reply,
        usable=usable,
        destination=dest,
    )


def _ascii_or_same(domain: str) -> str:
    try:
        return ascii_domain(domain)
    except DomainSyntaxError:
        return domain


def failure_outcome(exc: DeliveryError) -> tuple[Outcome, str]:
    """The outcome and reply of a failure that stops the whole domain."""
    outcome = Outcome.BOUNCE if isinstance(exc, PermanentFailure) else Outcome.DEFER
    return outcome, str(exc.reply)


def _failed(exc: DeliveryError) -> tuple[Outcome, str, tuple[str, ...]]:
    return *failure_outcome(exc), ()


def _outcome(mx: MxRoute, hosts: Sequence[HostRoute]) -> tuple[Outcome, str, tuple[str, ...]]:
    """What the engine's per-domain loop would conclude from these routes."""
    if mx.failure is not None:
        # RFC 7672 §2.1: MX lookup failure defers; RFC 5321 §5.1 NXDOMAIN / RFC 7505 bounce.
        return _failed(mx.failure)
    usable = tuple(h.host.name for h in hosts if h.failure is None)
    for route in hosts:
        if route.failure is None:
            break
        if route.failure.scope is not Scope.HOST:
            return _failed(route.failure)
    if usable:
        return Outcome.ATTEMPT, "", usable
    if not hosts:
        return Outcome.DEFER, "451 4.4.0 No MX host could be tried", ()
    last = hosts[-1].failure
    assert last is not None
    # Every host skipped: the domain is deferred with the last host's reason, never bounced.
    return Outcome.DEFER, str(as_temporary(last)), ()


# -- terminal hygiene -----------------------------------------------------------------------

# Unicode categories never printed raw: controls (ESC starts terminal escape sequences),
# format characters (bidi overrides, joiners, soft hyphen), lone surrogates (bytes that were
# not UTF-8) and the line/paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _unsafe(c: str) -> bool:
    return unicodedata.category(c) in _UNSAFE_CATEGORIES


def terminal_safe(text: str) -> str:
    """`text` with every control, format, surrogate or separator character written as a
    Python escape (``\\x1b``, ``\\u202e``, ``\\udcff``); newlines are kept. Everything a
    report shows that came from the network (greetings, certificate names, DNS data) or the
    command line goes through this before it reaches a terminal."""
    return "".join(c if c == "\n" or not _unsafe(c) else ascii(c)[1:-1] for c in text)


def json_safe(document: str) -> str:
    """JSON text (from ``json.dumps(..., ensure_ascii=False)``) with the characters
    `terminal_safe` escapes written as ``\\uXXXX`` escapes: still the same JSON value.
    Outside strings JSON text has only ASCII structure and whitespace, so every such
    character is inside a string, where a \\u escape means the character itself."""
    return "".join(json.dumps(c)[1:-1] if c != "\n" and _unsafe(c) else c for c in document)


# -- labels shared by both renderings ----------------------------------------------------


def _status(security: Security, validating: bool) -> str:
    return security.value if validating else "unvalidated"


def _address_status(route: HostRoute, validating: bool) -> str:
    if route.address_status in (AddressStatus.SECURE, AddressStatus.INSECURE) and not validating:
        return "unvalidated"
    return route.address_status.value


def _tls(route: HostRoute) -> str:
    """The TLS level that would apply: "dane (verified)", "may", "skip host", ..."""
    decision = route.decision
    if decision.action is Action.DANE:
        return f"dane ({route.dane_label})"
    if decision.action is Action.NO_DANE:
        assert decision.requirement is not None
        return decision.requirement.value
    if decision.reason == "mail_loop":
        return "mail loop"
    if decision.reason == "below_myself":
        return "not tried (this relay is a more preferred MX)"
    if decision.action is Action.SKIP_HOST:
        return "skip host"
    return "defer domain"


def _tlsa_skipped(report: LookupReport, route: HostRoute) -> str:
    if route.decision.reason == "malformed_mx":
        return "the MX target is not a host name"
    if route.decision.reason == "mail_loop":
        return "the host is this relay"
    if route.literal:
        # RFC 7672 §2.2.2: TLSA records are found by host name only.
        return "the next hop is an IP address: no TLSA records, RFC 7672 §2.2.2"
    if report.level not in DANE_LEVELS:
        return f"level {report.level} does not use DANE"
    if route.address_status in (AddressStatus.NONE, AddressStatus.FAILED):
        return "the host has no usable address"
    if not report.validating:
        return "the resolver does not validate DNSSEC"
    return "host addresses insecure, RFC 7672 §2.2.2"


def _base_domain(route: HostRoute) -> str | None:
    """The TLSA base domain when a secure TLSA RRset was found (RFC 7672 §2.2.3)."""
    return route.tlsa_base if route.tlsa_records else None


def _lookup_outcome(tl: TlsaLookup) -> str:
    if tl.error is not None:
        return f"lookup failed ({tl.error.kind})"
    return tl.outcome


def _record_note(record: TlsaRecord) -> str:
    if record.malformed:
        return f"  (malformed: {record.unusable_reason()})"
    reason = record.unusable_reason()
    return f"  (unusable: {reason})" if reason else ""


def _mx_records(report: LookupReport) -> list[tuple[int, str]]:
    answer = report.mx.answer
    if answer is None:
        return []
    return sorted((r.preference, r.exchange or ".") for r in answer.records)


# -- text -----------------------------------------------------------------------------------


def render_text(report: LookupReport) -> str:
    lines = header_lines(report) + mx_lines(report)
    for route in report.hosts:
        lines += host_lines(report, route)
    if report.outcome is Outcome.ATTEMPT:
        lines.append(f"result: attempt delivery via {', '.join(report.usable)}")
    else:
        lines.append(f"result: {report.outcome.value}: {report.reply}")
    return terminal_safe("\n".join(lines))


def header_lines(report: LookupReport) -> list[str]:
    """The destination's policy, why, and whether the resolver validates."""
    dest = report.destination
    route = [] if dest is None else [f"route: {dest.why}"]
    return [
        f"domain {report.domain}: level {report.level}, "
        f"insecure_mx_policy {report.insecure_mx_policy}",
        *route,  # "route: level ... (why); next hop ... (why)"
        f"resolver {report.resolvers}: "
        + (
            "validates DNSSEC"
            if report.probe.ok
            else "did not answer the validation probe"
            if not report.probe.conclusive
            else "does NOT validate DNSSEC"
        )
        + f" ({report.probe.detail})",
    ]


def mx_lines(report: LookupReport) -> list[str]:
    """The MX answer: status, null or implicit MX, the records."""
    mx, domain = report.mx, report.mx.domain
    dest = report.destination
    if dest is not None and dest.literal:
        return [f"next hop {dest.via}: an IP address: no MX or address lookup (RFC 5321 §4.1.3)"]
    if dest is not None and not dest.mx:
        return [f"next hop {dest.via}: no MX lookup (explicit next hop, RFC 7672 §2.2.2)"]
    if mx.answer is None:
        exc = mx.failure
        if isinstance(exc, BadDestinationDomain):
            return [f"MX {domain}: not looked up: {exc.reply.text}"]
        kind = exc.kind if isinstance(exc, DnsTempFail) else "error"
        text = exc.reply.text if exc is not None else ""
        return [f"MX {domain}: lookup failed ({kind}): {text}"]
    status = _status(mx.answer.security, report.validating)
    if mx.answer.kind is AnswerKind.NXDOMAIN:
        return [f"MX {domain}: NXDOMAIN ({status}): the domain does not exist"]
    if mx.plan.null_mx:
        head = f"MX {domain}: {status}, null MX (RFC 7505): the domain accepts no mail"
    elif mx.plan.hosts and mx.plan.hosts[0].implicit:
        head = f"MX {domain}: {status}, no MX records: implicit MX {domain} (RFC 5321 §5.1)"
    else:
        head = f"MX {domain}: {status}"
    return [head] + [f"  {pref} {exchange}" for pref, exchange in _mx_records(report)]


def host_lines(report: LookupReport, route: HostRoute) -> list[str]:
    """One MX host: CNAME, addresses, TLSA lookups and base domain, the TLS decision."""
    host = route.host
    explicit = report.destination is not None and not report.destination.mx
    lines = [
        f"host {host.name} (address literal next hop)"
        if route.literal
        else f"host {host.name} (explicit next hop)"
        if explicit
        else f"host {host.name} (implicit MX)"
        if host.implicit
        else f"host {host.name} (MX {host.preference})"
    ]
    if route.decision.reason == "below_myself":
        # Nothing was looked up: the relay never sends to it (RFC 5321 §5.1).
        return [*lines, f"  skipped: {route.reason}"]
    if route.canonical:
        lines.append(f"  CNAME: {host.name} -> {route.canonical}")
    status = _address_status(route, report.validating)
    if route.decision.reason == "malformed_mx":
        lines.append("  addresses: not looked up (the MX target is not a host name)")
    elif route.literal:
        lines.append(f"  addresses: {host.name} (as configured, not looked up)")
    elif route.address_status is AddressStatus.FAILED:
        text = route.failure.reply.text if route.failure is not None else ""
        lines.append(f"  addresses: lookup failed: {text}")
    elif route.address_status is AddressStatus.NONE:
        lines.append("  addresses: none (no A or AAAA records)")
    else:
        failed = (
            f" ({'/'.join(route.failed_families)} lookup failed)" if route.failed_families else ""
        )
        lines.append(f"  addresses: {status} {', '.join(route.addresses)}{failed}")
    if not route.tlsa_lookups:
        lines.append(f"  TLSA: not looked up ({_tlsa_skipped(report, route)})")
    for tl in route.tlsa_lookups:
        lines += _tlsa_text(tl, report.tlsa_port)
    if route.tlsa_lookups:
        base = _base_domain(route) or "none (no secure TLSA RRset)"
        lines.append(f"  TLSA base domain: {base}")
    lines.append(f"  TLS: {_tls(route)}; {route.reason}")
    if route.failure is not None:
        lines.append(f"  error: {route.failure.reply}")
    return lines


def _tlsa_text(tl: TlsaLookup, port: int) -> list[str]:
    qname = f"_{port}._tcp.{tl.base}"
    if tl.answer is None:
        text = tl.error.reply.text if tl.error is not None else ""
        return [f"  TLSA {qname}: {_lookup_outcome(tl)}: {text}"]
    lines = [f"  TLSA {qname}: {_lookup_outcome(tl)}"]
    lines += [f"    {r.to_text()}{_record_note(r)}" for r in tl.answer.records]
    return lines


# -- JSON -----------------------------------------------------------------------------------


def render_json(report: LookupReport) -> str:
    return json_safe(json.dumps(report_dict(report), indent=2, ensure_ascii=False))


def report_dict(report: LookupReport) -> dict[str, Any]:
    """The report as JSON-ready values (what `render_json` prints)."""
    return {
        "domain": report.domain,
        "level": report.level,
        "insecure_mx_policy": report.insecure_mx_policy,
        "route": _route_dict(report.destination),
        "resolver": {
            "servers": report.resolvers,
            "validating": report.validating,
            "detail": report.probe.detail,
        },
        "mx": _mx_dict(report),
        "hosts": [host_dict(report, route) for route in report.hosts],
        "result": {
            "outcome": report.outcome.value,
            "reply": report.reply or None,
            "hosts": list(report.usable),
        },
    }


def _route_dict(dest: Destination | None) -> dict[str, Any] | None:
    """The policy map's choice and why (relay.delivery.policymap)."""
    if dest is None:
        return None
    return {
        "level": dest.level,
        "level_match": dest.level_match,  # exact / parent / next-hop exact|parent / default
        "level_key": dest.level_key or None,
        "next_hop": dest.next_hop,
        "mx_lookup": dest.mx,
        "via": dest.via,
        "next_hop_match": dest.hop_match,  # exact / parent / relayhost / default
        "next_hop_key": dest.hop_key or None,
        "port": dest.port,
        "tlsa_port": dest.tlsa_port,
        "why": dest.why,
    }


def error_dict(exc: DeliveryError | None) -> dict[str, Any] | None:
    """A failure as JSON: its kind (DNS failure kind or reason token) and the reply."""
    if exc is None:
        return None
    return {
        "kind": exc.kind if isinstance(exc, DnsTempFail) else exc.reason,
        "reply": str(exc.reply),
    }


def _mx_dict(report: LookupReport) -> dict[str, Any]:
    mx = report.mx
    answer = mx.answer
    return {
        "status": mx.status.value
        if answer is None
        else _status(answer.security, report.validating),
        "answer": None if answer is None else answer.kind.value,
        "records": [{"preference": p, "exchange": e} for p, e in _mx_records(report)],
        "domain": mx.domain,
        "looked_up": report.destination is None or report.destination.mx,
        "null_mx": mx.plan.null_mx,
        "implicit": bool(mx.plan.hosts) and mx.plan.hosts[0].implicit,
        "error": error_dict(mx.failure),
    }


def _records(records: Sequence[TlsaRecord]) -> list[str]:
    return [r.to_text() for r in records]


def host_dict(report: LookupReport, route: HostRoute) -> dict[str, Any]:
    """One MX host as JSON-ready values."""
    decision = route.decision
    return {
        "name": route.host.name,
        "preference": route.host.preference,
        "implicit": route.host.implicit,
        "canonical": route.canonical or None,
        "literal": route.literal,
        "addresses": {
            "status": "not_looked_up"
            if decision.reason == "below_myself" or route.literal
            else _address_status(route, report.validating),
            "records": list(route.addresses),
            "failed_families": list(route.failed_families),
        },
        "tlsa": {
            "looked_up": bool(route.tlsa_lookups),
            "base_domain": _base_domain(route),
            "state": route.tlsa_state.value,
            "lookups": [
                {
                    "name": f"_{report.tlsa_port}._tcp.{tl.base}",
                    "outcome": tl.outcome,
                    "records": _records(tl.answer.records) if tl.answer is not None else [],
                    "error": error_dict(tl.error),
                }
                for tl in route.tlsa_lookups
            ],
            "records": _records(route.tlsa_records),
            "usable": _records(route.usable),
            "malformed": _records(route.malformed),
        },
        "decision": {
            "tls": _tls(route),
            "action": decision.action.value,
            "requirement": decision.requirement.value if decision.requirement else None,
            "label": route.dane_label if decision.action is Action.DANE else None,
            "reason": decision.reason,
            "why": decision.why,
            "rfc": decision.rfc,
            "detail": route.reason,
        },
        "dnssec": route.dnssec,
        "error": error_dict(route.failure),
    }
