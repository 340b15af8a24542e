"""`dane-relay probe`: what delivery to one domain would do, seen on the wire.

Like Postfix's posttls-finger. Owns:
    * `probe(resolver, transport, context, domain, ...)` -> `ProbeReport`: resolves the
      domain with `relay.report.lookup` (the engine's own routing code: probe and delivery
      agree on MX hosts, DNSSEC status, TLSA records and TLS level), then, for each MX host
      the policy uses and each of its addresses, in order: connect, EHLO, STARTTLS with SNI
      = TLSA base domain, the peer chain, the `relay.dane.verify` verdict, EHLO, QUIT.
    * `describe_chain(chain)`: depth, subject, issuer, not-after and SPKI SHA-256 of every
      certificate the server sent.
    * `render_text(report)`, `render_json(report)`: the `dane-relay lookup` report, with
      each host's connections under it and the probe's own result line.

Per address, the steps and their outcome are delivery's own: connect, then
`relay.delivery.secure.negotiate` (its docstring has the table: 4.7.4 without STARTTLS
where TLS is mandatory, 4.7.5 for a failed handshake or DANE verdict, plaintext again
for `may`, "verified" / "trusted" / "encrypted" / "none"), then QUIT where delivery
would send MAIL. Only unusable TLSA records are also matched, for display
("unauthenticated"); delivery encrypts without checking them.

The domain's outcome walks hosts and addresses in order as the engine does: the first
address that takes the mail decides ("attempt", exit 0); when none does, mail is
deferred with the last failure (75); NXDOMAIN and a null MX bounce (69).

Guarantees: never sends MAIL, RCPT or DATA: sessions are typed `ProbeSession`, which has
no such method. Connection-level trouble is a value on the `Connection` (the transport
maps library errors to `relay.errors`); nothing here raises for what a peer does.
Does not: cache DNS answers, retry, log, or count metrics.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from relay.dane import DaneVerdict, verify
from relay.dane.certificate import certificate_parts
from relay.delivery.attempt import as_temporary
from relay.delivery.engine import MAX_CONNECTIONS_PER_DOMAIN
from relay.delivery.planner import MAX_MX_HOSTS, order_addresses
from relay.delivery.policymap import PolicyMap
from relay.delivery.route import HostRoute, Myself
from relay.delivery.secure import TlsSession, negotiate
from relay.errors import DeliveryError, RemotePermReject, RemoteTempReject, Scope
from relay.report import (
    LookupReport,
    LookupResolver,
    Outcome,
    error_dict,
    failure_outcome,
    header_lines,
    host_dict,
    host_lines,
    json_safe,
    lookup,
    mx_lines,
    report_dict,
    terminal_safe,
)
from relay.smtp.reply import SmtpReply

__all__ = [
    "CertificateSummary",
    "Connection",
    "HostProbe",
    "ProbeReport",
    "ProbeSession",
    "ProbeTransport",
    "describe_chain",
    "probe",
    "render_json",
    "render_text",
]


class ProbeSession(TlsSession, Protocol):
    """The part of an outbound session the probe uses: no MAIL, RCPT or DATA."""

    greeting: SmtpReply


class ProbeTransport(Protocol):
    """relay.delivery.transport.SmtpTransport satisfies this."""

    async def open(self, address: str, port: int) -> ProbeSession: ...


@dataclass(frozen=True, slots=True)
class CertificateSummary:
    """One certificate the server sent, for people."""

    depth: int  # position in the chain as sent, leaf = 0
    subject: str  # RFC 4514; "" when undecodable
    issuer: str
    not_after: str  # ISO 8601 UTC, "" when undecodable
    spki_sha256: str  # hex SHA-256 of the SPKI as encoded (the 3 1 1 / 2 1 1 data)
    problem: str = ""  # why `cryptography` could not decode it, "" when it could


@dataclass(frozen=True, slots=True)
class Connection:
    """What one address showed, and what delivery would do with it."""

    address: str
    port: int
    greeting: SmtpReply | None = None  # None: no greeting was received
    starttls_offered: bool | None = None  # None: EHLO was not answered
    # The SNI sent with STARTTLS; "": none (an address literal); None: STARTTLS not attempted.
    sni: str | None = None
    handshake_error: str = ""  # why the handshake failed (level may falls back)
    tls_version: str = ""
    cipher: str = ""
    chain: tuple[CertificateSummary, ...] = ()
    verdict: DaneVerdict | None = None  # set when TLSA records applied to the handshake
    tls: str = "none"  # verified / trusted / encrypted / none: what mail would get
    failure: DeliveryError | None = None  # set when delivery would not use this address

    @property
    def delivery(self) -> str:
        """One of verified, trusted, encrypted, none (the TLS mail would get) or defer."""
        return self.tls if self.failure is None else "defer"


@dataclass(frozen=True, slots=True)
class HostProbe:
    route: HostRoute
    connections: tuple[Connection, ...]  # one per address, empty when not tried
    tried: bool  # False: the policy skips the host, or the domain stopped before it


@dataclass(frozen=True, slots=True)
class ProbeReport:
    resolution: LookupReport
    port: int  # the TCP port connected to (TLSA names use resolution.tlsa_port)
    helo_name: str
    hosts: tuple[HostProbe, ...]
    outcome: Outcome
    reply: str  # the deferral or bounce reply; "" for attempt
    via_host: str = ""  # the host and connection delivery would use, for attempt
    via: Connection | None = None
    address_limit: int = MAX_CONNECTIONS_PER_DOMAIN  # delivery.mx_address_limit
    address_preference: str = "any"  # delivery.address_preference


async def probe(
    resolver: LookupResolver,
    transport: ProbeTransport,
    context: ssl.SSLContext,
    domain: str,
    *,
    level: str,
    helo_name: str,
    insecure_mx_policy: str = "dane",
    port: int | None = None,
    tlsa_port: int = 25,
    resolvers: str = "",
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    pkix_context: ssl.SSLContext | None = None,
    policy: PolicyMap | None = None,
    myself: Callable[[int], Myself] | None = None,
    host_limit: int = MAX_MX_HOSTS,
    address_limit: int = MAX_CONNECTIONS_PER_DOMAIN,
    address_preference: str = "any",
) -> ProbeReport:
    """Resolve `domain` as delivery would, then talk to each usable MX address up to QUIT.

    `policy`: the per-destination level, next hop and ports (`PolicyMap.from_config`, as
    `relay.report.lookup`); None: `level`, the domain's MX hosts, port 25. `port`, when
    given, overrides the port connected to (`probe --port`); else the destination's port.
    `tlsa_port` (without `policy`) is the port in TLSA names, the logical SMTP port (RFC
    7672 §2.2.3). `myself(port)`: the relay's identity for the mail-loop check. `clock`
    gives the time for DANE-TA date checks. `pkix_context` is the trust store of the
    levels verify/secure (as for delivery).

    Raises:
        KeyError: `level` or `insecure_mx_policy` is unknown (the configuration prevents it).
    """
    resolution = await lookup(
        resolver,
        domain,
        level=level,
        insecure_mx_policy=insecure_mx_policy,
        tlsa_port=tlsa_port,
        resolvers=resolvers,
        policy=policy or PolicyMap(level, port=25 if port is None else port, tlsa_port=tlsa_port),
        myself=myself,
        host_limit=host_limit,
    )
    dest = resolution.destination
    if port is None:
        port = dest.port if dest is not None else 25
    hosts: list[HostProbe] = []
    # Delivery makes at most `address_limit` connection attempts per domain
    # (delivery.mx_address_limit, Postfix smtp_mx_address_limit); the probe spends the same
    # budget in the same order, so it cannot report a host that delivery would never reach.
    left = address_limit
    for route in resolution.hosts:
        # Only hosts the engine would connect to: the policy uses them and the domain
        # was not stopped by an earlier host (RFC 7672 §2.2).
        if route.failure is not None or resolution.outcome is not Outcome.ATTEMPT or not left:
            hosts.append(HostProbe(route, (), tried=False))
            continue
        addresses = order_addresses(route.addresses, address_preference)[:left]
        left -= len(addresses)
        connections = [
            await _connect(
                transport, (context, pkix_context), route, address, port, helo_name, clock
            )
            for address in addresses
        ]
        hosts.append(HostProbe(route, tuple(connections), tried=True))
    outcome, reply, via_host, via = _conclude(resolution, hosts)
    return ProbeReport(
        resolution=resolution,
        port=port,
        helo_name=helo_name,
        hosts=tuple(hosts),
        outcome=outcome,
        reply=reply,
        via_host=via_host,
        via=via,
        address_limit=address_limit,
        address_preference=address_preference,
    )


def _tries(host: HostProbe) -> list[tuple[DeliveryError | None, Connection | None]]:
    """What the engine meets at a host: the policy's refusal, or each address's result."""
    if host.route.failure is not None:
        return [(host.route.failure, None)]
    return [(conn.failure, conn) for conn in host.connections]


def _conclude(
    resolution: LookupReport, hosts: Sequence[HostProbe]
) -> tuple[Outcome, str, str, Connection | None]:
    """The engine's per-domain loop over what the probe saw (relay.delivery.engine)."""
    if resolution.outcome is not Outcome.ATTEMPT:
        return resolution.outcome, resolution.reply, "", None
    last: DeliveryError | None = None
    for host in hosts:
        for failure, conn in _tries(host):
            if failure is None:
                return Outcome.ATTEMPT, "", host.route.host.name, conn
            if failure.scope is not Scope.HOST:
                return (*failure_outcome(failure), "", None)
            last = failure
    if last is None:
        return Outcome.DEFER, "451 4.4.0 No MX host could be tried", "", None
    # Every host failed: the domain is deferred, never bounced, for host-scoped failures.
    return Outcome.DEFER, str(as_temporary(last)), "", None


async def _connect(
    transport: ProbeTransport,
    contexts: tuple[ssl.SSLContext, ssl.SSLContext | None],
    route: HostRoute,
    address: str,
    port: int,
    helo_name: str,
    clock: Callable[[], datetime],
) -> Connection:
    """One address, up to QUIT; every failure becomes `Connection.failure`."""
    requirement = route.decision.requirement
    assert requirement is not None  # the host is used: resolve_host set a requirement
    try:
        session = await transport.open(address, port)
    except (RemoteTempReject, RemotePermReject) as exc:  # RFC 5321 §3.1: refused
        return Connection(address, port, greeting=exc.reply, failure=exc)
    except DeliveryError as exc:
        return Connection(address, port, failure=exc)
    # The steps delivery takes (relay.delivery.secure); then QUIT instead of MAIL.
    context, pkix_context = contexts
    setup = await negotiate(
        transport,
        session,
        route,
        address,
        port,
        requirement,
        helo_name,
        context,
        clock,
        pkix_context,
    )
    failure = setup.failure
    if setup.session is not None:
        try:
            await setup.session.quit()
        except DeliveryError as exc:
            setup.session.abort()
            failure = exc
    verdict = setup.verdict
    if verdict is None and setup.chain is not None and route.decision.reason == "tlsa_unusable":
        # RFC 7672 §3.1.3: secure TLSA, none usable: "unauthenticated", TLS still required.
        verdict = verify(route.tlsa_records, setup.chain, route.reference_names, clock())
    return Connection(
        address,
        port,
        greeting=session.greeting,
        starttls_offered=setup.starttls_offered,
        sni=setup.sni,
        handshake_error=setup.handshake_error,
        tls_version=setup.tls_version,
        cipher=setup.cipher,
        chain=describe_chain(setup.chain or ()),
        verdict=verdict,
        tls=setup.tls if failure is None else "none",
        failure=failure,
    )


# -- certificates ---------------------------------------------------------------------------


def describe_chain(chain: Sequence[bytes]) -> tuple[CertificateSummary, ...]:
    """One summary per certificate, in the order sent; never raises for peer bytes."""
    return tuple(_summary(depth, bytes(der)) for depth, der in enumerate(chain))


def _summary(depth: int, der: bytes) -> CertificateSummary:
    try:
        _, spki = certificate_parts(der)
    except ValueError as exc:
        return CertificateSummary(depth, "", "", "", "", f"not a certificate ({exc})")
    spki_sha256 = hashlib.sha256(spki).hexdigest()
    try:
        with warnings.catch_warnings():
            # The verdict judges serial numbers; the listing only shows the certificate.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(der)
            subject = cert.subject.rfc4514_string() or "(empty subject)"
            issuer = cert.issuer.rfc4514_string() or "(empty issuer)"
            not_after = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, x509.InvalidVersion) as exc:
        return CertificateSummary(depth, "", "", "", spki_sha256, f"cannot be decoded ({exc})")
    return CertificateSummary(depth, subject, issuer, not_after, spki_sha256)


# -- text -----------------------------------------------------------------------------------


def _where(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def render_text(report: ProbeReport) -> str:
    resolution = report.resolution
    lines = header_lines(resolution) + mx_lines(resolution)
    for host in report.hosts:
        lines += host_lines(resolution, host.route)
        if not host.tried:
            reason = host.route.decision.reason
            why = (
                "the host is this relay"
                if reason == "mail_loop"
                else "its MX preference is not lower than this relay's, RFC 5321 §5.1"
                if reason == "below_myself"
                else "the policy skips this host"
                if host.route.failure
                else "the domain stops first"
                if report.resolution.outcome is not Outcome.ATTEMPT
                else f"connection limit of {report.address_limit} per domain reached"
            )
            lines.append(f"  connect: not tried ({why})")
        for conn in host.connections:
            lines += _connection_text(conn, host.route)
        if host.tried and len(host.connections) < len(host.route.addresses):
            ordered = order_addresses(host.route.addresses, report.address_preference)
            untried = ", ".join(ordered[len(host.connections) :])
            lines.append(
                f"  connect: {untried} not tried (connection limit of "
                f"{report.address_limit} per domain reached)"
            )
    if report.outcome is Outcome.ATTEMPT and report.via is not None:
        where = f"{report.via_host}[{report.via.address}]:{report.via.port}"
        lines.append(f"result: attempt delivery via {where} ({report.via.tls})")
    else:
        lines.append(f"result: {report.outcome.value}: {report.reply}")
    # Greetings, certificate names and handshake errors come from the peer.
    return terminal_safe("\n".join(lines))


def _connection_text(conn: Connection, route: HostRoute) -> list[str]:
    lines = [f"  connect {_where(conn.address, conn.port)}"]
    if conn.greeting is not None:
        lines.append(f"    greeting: {_greeting(conn.greeting)}")
    if conn.starttls_offered is not None:
        lines.append(f"    EHLO: STARTTLS {'offered' if conn.starttls_offered else 'not offered'}")
    if conn.sni is not None:
        session = conn.handshake_error or f"{conn.tls_version} {conn.cipher}".strip()
        # RFC 6066 §3: no SNI for an address literal.
        sent = f"SNI {conn.sni}" if conn.sni else "no SNI (IP address)"
        lines.append(f"    STARTTLS: {sent}: {session}")
    if conn.chain:
        lines.append(f"    chain: {len(conn.chain)} certificate(s), leaf first")
        lines += [f"      {_certificate_text(c)}" for c in conn.chain]
    if conn.verdict is not None:
        lines += _verdict_text(conn.verdict)
    elif conn.tls_version:
        lines.append(f"    DANE: not applied: {route.decision.why}")
    if conn.failure is not None:
        lines.append(f"    delivery: defer: {conn.failure.reply}")
    elif conn.handshake_error:
        lines.append("    delivery: none (plaintext after the failed handshake)")
    else:
        lines.append(f"    delivery: {conn.tls}" + (" (plaintext)" if conn.tls == "none" else ""))
    return lines


def _certificate_text(cert: CertificateSummary) -> str:
    if cert.problem:
        spki = f"; SPKI SHA-256 {cert.spki_sha256}" if cert.spki_sha256 else ""
        return f"{cert.depth}: {cert.problem}{spki}"
    return (
        f"{cert.depth}: {cert.subject}; issuer {cert.issuer}; not after {cert.not_after}; "
        f"SPKI SHA-256 {cert.spki_sha256}"
    )


def _verdict_text(verdict: DaneVerdict) -> list[str]:
    if verdict.matched is not None:
        return [
            f"    DANE: {verdict.status.value} ({verdict.reason}): "
            f"{verdict.matched.to_text()} at depth {verdict.match_depth}",
            f"      {verdict.detail}",
        ]
    return [f"    DANE: {verdict.status.value} ({verdict.reason}): {verdict.detail}"]


# -- JSON -----------------------------------------------------------------------------------


def render_json(report: ProbeReport) -> str:
    resolution = report.resolution
    document = {
        key: value
        for key, value in report_dict(resolution).items()
        if key not in ("hosts", "result")
    }
    document["port"] = report.port
    document["helo"] = report.helo_name
    document["hosts"] = [
        {
            **host_dict(resolution, host.route),
            "tried": host.tried,
            "connections": [_connection_dict(c) for c in host.connections],
        }
        for host in report.hosts
    ]
    via = report.via
    document["result"] = {
        "outcome": report.outcome.value,
        "reply": report.reply or None,
        "host": report.via_host or None,
        "address": via.address if via is not None else None,
        "tls": via.tls if via is not None else None,
    }
    return json_safe(json.dumps(document, indent=2, ensure_ascii=False))


def _greeting(reply: SmtpReply) -> str:
    """As worded by the server: from_peer may have made up an enhanced code."""
    return f"{reply.code} {reply.text}".strip()


def _connection_dict(conn: Connection) -> dict[str, Any]:
    verdict = conn.verdict
    return {
        "address": conn.address,
        "port": conn.port,
        "greeting": _greeting(conn.greeting) if conn.greeting is not None else None,
        "starttls": {
            "offered": conn.starttls_offered,
            "sni": conn.sni,
            "handshake_error": conn.handshake_error or None,
        },
        "tls": {"version": conn.tls_version, "cipher": conn.cipher} if conn.tls_version else None,
        "chain": [{k: v if v != "" else None for k, v in asdict(c).items()} for c in conn.chain],
        "dane": None
        if verdict is None
        else {
            "status": verdict.status.value,
            "reason": verdict.reason,
            "matched": verdict.matched.to_text() if verdict.matched is not None else None,
            "match_depth": verdict.match_depth,
            "detail": verdict.detail,
        },
        "delivery": conn.delivery,
        "error": error_dict(conn.failure),
    }
