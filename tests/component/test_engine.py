"""relay.delivery.engine against a scripted resolver and SMTP peers, with real DANE checks.

The resolver and transport are in-memory fakes behind the engine's Protocols; the
certificates are real (EC P-256, self-signed, made with `cryptography`) and the TLSA
verdicts come from the real `relay.dane.match.verify`. Every test asserts on the
returned per-recipient results, on the *sequence* of SMTP commands each peer saw,
and on the metrics.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from lab.certs import make_self_signed

from relay.app import engine_settings
from relay.config import Endpoint, parse_config, parse_next_hop
from relay.dane.records import TlsaRecord
from relay.delivery.client import TIMEOUTS, Capabilities, Command, ConnectionLost, PeerReply, Phase
from relay.delivery.engine import MAX_CONNECTIONS_PER_DOMAIN, DeliveryEngine, EngineSettings
from relay.delivery.planner import MAX_MX_HOSTS
from relay.delivery.policymap import PolicyMap
from relay.delivery.route import Myself
from relay.errors import (
    ConnectFailed,
    DeliveryError,
    DnsTempFail,
    RemotePermReject,
    RemoteTempReject,
    Scope,
    TlsHandshakeFailed,
)
from relay.lookup.results import AnswerKind, DnsAnswer, MxRecord, ResolverStatus, Security
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult
from relay.smtp.reply import SmtpReply

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

NOW = 1_700_000_000.0
RECEIVED = NOW - 60
BODY = b"From: a@sender.example\r\nSubject: hi\r\n\r\nhello\r\n"
SENDER = "a@sender.example"
TLS_VERSION, TLS_CIPHER = "TLSv1.3", "TLS_AES_256_GCM_SHA384"

GREETING = SmtpReply(220, "2.0.0", "mx ESMTP")
EHLO_OK = SmtpReply(250, "2.0.0", "mx")
OK = SmtpReply(250, "2.1.0", "Ok")
QUEUED = SmtpReply(250, "2.0.0", "Ok: queued as 4ABC")
START_DATA = SmtpReply(354, "", "End data with <CR><LF>.<CR><LF>")
NEED_MAIL = SmtpReply(503, "5.5.1", "Error: need MAIL command")
NO_RECIPIENTS = SmtpReply(554, "5.5.1", "Error: no valid recipients")


# -- certificates and TLSA records -------------------------------------------------------------


@functools.cache
def cert_der(name: str) -> bytes:
    """A self-signed EC P-256 certificate for `name` (DER), from the lab's certificate factory."""
    return make_self_signed([name]).cert_der


def tlsa_3_1_1(der: bytes) -> TlsaRecord:
    spki = (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    return TlsaRecord(3, 1, 1, hashlib.sha256(spki).digest())


def tlsa_3_0_1(der: bytes) -> TlsaRecord:
    return TlsaRecord(3, 0, 1, hashlib.sha256(der).digest())


# -- DNS answers and the fake resolver ---------------------------------------------------------


def answer(
    name: str,
    *records: object,
    security: Security = Security.SECURE,
    kind: AnswerKind | None = None,
    canonical: str = "",
) -> DnsAnswer[object]:
    if kind is None:
        kind = AnswerKind.DATA if records else AnswerKind.NODATA
    return DnsAnswer(name, kind, security, tuple(records), canonical)


Scripted = DnsAnswer[object] | BaseException


class FakeResolver:
    """Replays scripted answers; an unscripted lookup fails the test."""

    def __init__(self) -> None:
        self.mx_answers: dict[str, Scripted] = {}
        self.address_answers: dict[str, Scripted] = {}
        self.tlsa_answers: dict[str, Scripted] = {}
        self.calls: list[tuple[str, str]] = []

    @staticmethod
    def _reply(table: dict[str, Scripted], key: str) -> DnsAnswer[object]:
        if key not in table:
            raise AssertionError(f"unexpected lookup of {key}")
        value = table[key]
        if isinstance(value, BaseException):
            raise value
        return value

    async def mx(self, domain: str) -> DnsAnswer[MxRecord]:
        self.calls.append(("MX", domain))
        return self._reply(self.mx_answers, domain)  # type: ignore[return-value]

    async def addresses(self, host: str) -> DnsAnswer[str]:
        self.calls.append(("A/AAAA", host))
        return self._reply(self.address_answers, host)  # type: ignore[return-value]

    async def tlsa(self, host: str, port: int) -> DnsAnswer[TlsaRecord]:
        qname = f"_{port}._tcp.{host}"
        self.calls.append(("TLSA", qname))
        return self._reply(self.tlsa_answers, qname)  # type: ignore[return-value]

    # Convenience for the common shapes.

    def domain(
        self,
        domain: str,
        *hosts: tuple[int, str, str],
        mx_security: Security = Security.SECURE,
        address_security: Security = Security.SECURE,
    ) -> None:
        """MX records (pref, host, address) with one address per host."""
        self.mx_answers[domain] = answer(
            domain, *(MxRecord(p, h) for p, h, _ in hosts), security=mx_security
        )
        for _, host, address in hosts:
            self.address_answers[host] = answer(host, address, security=address_security)

    def set_tlsa(
        self, host: str, *records: TlsaRecord, security: Security = Security.SECURE
    ) -> None:
        self.tlsa_answers[f"_25._tcp.{host}"] = answer(
            f"_25._tcp.{host}", *records, security=security
        )

    def tlsa_lookups(self) -> list[str]:
        return [name for rrtype, name in self.calls if rrtype == "TLSA"]


# -- the fake SMTP peers -----------------------------------------------------------------------


@dataclass
class Peer:
    """How one SMTP server behaves on one connection."""

    connect_error: DeliveryError | None = None
    greeting: SmtpReply = GREETING
    ehlo: SmtpReply = EHLO_OK
    extensions: frozenset[str] = frozenset({"starttls", "size", "8bitmime", "pipelining"})
    tls_extensions: frozenset[str] = frozenset({"size", "8bitmime", "pipelining"})
    starttls: Sequence[bytes] | DeliveryError = ()
    size: int = 0  # the SIZE limit announced with "size" (0: no limit)
    mail: SmtpReply | ConnectionLost = OK
    rcpt: dict[str, SmtpReply | ConnectionLost] = field(default_factory=dict)
    data_start: SmtpReply | ConnectionLost = START_DATA
    data: SmtpReply | ConnectionLost = QUEUED
    rset: SmtpReply | ConnectionLost = SmtpReply(250, "2.0.0", "Ok")  # a reused connection


class FakeSession:
    def __init__(self, transport: FakeTransport, address: str, peer: Peer) -> None:
        self.transport = transport
        self.address = address
        self.peer = peer
        self.greeting = peer.greeting
        self.in_tls = False
        self.replies: list[SmtpReply | ConnectionLost] = []
        self.phases: list[Phase] = []  # of the commands written and not yet answered
        # Transaction state, as a server keeps it: a pipelined RCPT after a refused MAIL
        # and a pipelined DATA without an accepted recipient are refused (RFC 2920 §3.1).
        self.mail_ok = False
        self.rcpt_ok = 0

    def _log(self, *event: object) -> None:
        self.transport.log.append((self.address, *event))

    def supports(self, extension: str) -> bool:
        offered = self.peer.tls_extensions if self.in_tls else self.peer.extensions
        return extension.lower() in offered

    async def ehlo(self, name: str) -> SmtpReply:
        self._log("EHLO", name)
        return self.peer.ehlo

    async def starttls(self, server_hostname: str, context: ssl.SSLContext) -> list[bytes]:
        self._log("STARTTLS", server_hostname)
        assert context is self.transport.expected_context
        if isinstance(self.peer.starttls, DeliveryError):
            raise self.peer.starttls
        self.in_tls = True
        return list(self.peer.starttls)

    def tls_info(self) -> tuple[str, str]:
        return (TLS_VERSION, TLS_CIPHER) if self.in_tls else ("", "")

    def capabilities(self) -> Capabilities:
        offered = self.peer.tls_extensions if self.in_tls else self.peer.extensions
        return Capabilities(
            esmtp=True,
            pipelining="pipelining" in offered,
            size=self.peer.size if "size" in offered else None,
            eightbitmime="8bitmime" in offered,
            smtputf8="smtputf8" in offered,
            starttls="starttls" in offered,
        )

    async def write(self, command: Command, message: bytes) -> None:
        """Logs MAIL (sender, options), RCPT (recipient) and DATA (the message) as
        the old one-call-per-command session did; queues the scripted reply."""
        line = command.line
        reply: SmtpReply | ConnectionLost
        self.phases.append(command.phase)
        self.transport.io.append(("write", command.phase))
        if line is None:
            self._log("DATA", message)
            reply = self.peer.data
        elif line.startswith("MAIL FROM:<"):
            sender, _, options = line.removeprefix("MAIL FROM:<").partition(">")
            self._log("MAIL", sender, tuple(options.split()))
            reply = self.peer.mail
            self.mail_ok = isinstance(reply, SmtpReply) and reply.is_positive
            self.rcpt_ok = 0
        elif line.startswith("RCPT TO:<"):
            rcpt = line.removeprefix("RCPT TO:<").removesuffix(">")
            self._log("RCPT", rcpt)
            reply = self.peer.rcpt.get(rcpt, OK) if self.mail_ok else NEED_MAIL
            self.rcpt_ok += isinstance(reply, SmtpReply) and reply.is_positive
        elif line == "DATA":
            reply = self.peer.data_start if self.rcpt_ok else NO_RECIPIENTS
        elif line == "RSET":
            self._log("RSET")
            reply = self.peer.rset
            self.mail_ok, self.rcpt_ok = False, 0
        else:
            raise AssertionError(f"unexpected command {line!r}")
        self.replies.append(reply)

    async def read_reply(self, timeout: float) -> PeerReply | ConnectionLost:
        self.transport.io.append(("read", self.phases[0]))
        self.transport.read_timeouts.append((self.phases.pop(0), timeout))
        reply = self.replies.pop(0)
        if isinstance(reply, ConnectionLost):
            return reply
        text = f"{reply.enhanced} {reply.text}" if reply.enhanced else reply.text
        return PeerReply(reply.code, text)

    async def quit(self) -> None:
        self._log("QUIT")

    def abort(self) -> None:
        self._log("ABORT")


class FakeTransport:
    """Opens FakeSessions; each address has a list of Peers, one per connection."""

    def __init__(self, peers: dict[str, Peer | list[Peer]] | None = None) -> None:
        self.peers: dict[str, list[Peer]] = {
            address: (list(p) if isinstance(p, list) else [p])
            for address, p in (peers or {}).items()
        }
        self.log: list[tuple[object, ...]] = []
        # (phase of the command, timeout) of every read_reply(), in order.
        self.read_timeouts: list[tuple[Phase, float]] = []
        # ("write" | "read", phase) of every command written and reply read, in order.
        self.io: list[tuple[str, Phase]] = []
        self.expected_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    async def open(self, address: str, port: int) -> FakeSession:
        return self._connect(address, self._take(address, port))

    def _take(self, address: str, port: int) -> Peer:
        """Log the connection and take its Peer (the last one stays for the rest)."""
        self.log.append((address, "CONNECT", port))
        scripts = self.peers.get(address)
        if not scripts:
            raise AssertionError(f"unexpected connection to {address}")
        return scripts.pop(0) if len(scripts) > 1 else scripts[0]

    def _connect(self, address: str, peer: Peer) -> FakeSession:
        if peer.connect_error is not None:
            raise peer.connect_error
        if not peer.greeting.is_positive:
            # As relay.delivery.transport does for a refusing greeting.
            cls = RemotePermReject if peer.greeting.is_permanent else RemoteTempReject
            raise cls(reply=peer.greeting, scope=Scope.HOST)
        return FakeSession(self, address, peer)

    def verbs(self, address: str | None = None) -> list[str]:
        return [str(e[1]) for e in self.log if address is None or e[0] == address]

    def connections(self) -> list[object]:
        return [e[0] for e in self.log if e[1] == "CONNECT"]


class FirstConnectHeld(FakeTransport):
    """The first connection takes its Peer at once, then waits for `gate` (`opened` says
    it is waiting) before it is set up or refused as that Peer says: a slow connect that
    ends as scripted while other deliveries go on."""

    def __init__(self, peers: dict[str, Peer | list[Peer]]) -> None:
        super().__init__(peers)
        self.gate = asyncio.Event()
        self.opened = asyncio.Event()
        self.first = True

    async def open(self, address: str, port: int) -> FakeSession:
        peer = self._take(address, port)
        if self.first:
            self.first = False
            self.opened.set()
            await self.gate.wait()
        return self._connect(address, peer)


class FirstLookupHeld(FakeResolver):
    """`scripted`'s answers; its first lookup of `kind` ("mx" or "addresses") waits for
    `gate` (`entered` says it is waiting)."""

    def __init__(self, scripted: FakeResolver, kind: str) -> None:
        super().__init__()
        self.mx_answers = scripted.mx_answers
        self.address_answers = scripted.address_answers
        self.tlsa_answers = scripted.tlsa_answers
        self.kind = kind
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def _hold(self, kind: str) -> None:
        if kind == self.kind and not self.entered.is_set():
            self.entered.set()
            await self.gate.wait()

    async def mx(self, domain: str) -> DnsAnswer[MxRecord]:
        await self._hold("mx")
        return await super().mx(domain)

    async def addresses(self, host: str) -> DnsAnswer[str]:
        await self._hold("addresses")
        return await super().addresses(host)


# -- running the engine ------------------------------------------------------------------------


@dataclass
class World:
    resolver: FakeResolver
    transport: FakeTransport
    metrics: Metrics
    engine: DeliveryEngine

    async def deliver(self, *recipients: str) -> list[RecipientResult]:
        return await self.engine.deliver(
            "0123456789ABCDEF01234", SENDER, recipients, BODY, RECEIVED
        )

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


def world(
    resolver: FakeResolver,
    peers: dict[str, Peer | list[Peer]] | None = None,
    *,
    level: str = "dane",
    port: int = 25,
    insecure_mx_policy: str = "dane",
    resolver_status: ResolverStatus | None = None,
    policy: PolicyMap | None = None,
    myself: Callable[[int], Myself] | None = None,
    settings: EngineSettings | None = None,
) -> World:
    """`settings`, when given, replaces the EngineSettings built from the other arguments."""
    transport = FakeTransport(peers)
    metrics = Metrics()
    engine = DeliveryEngine(
        resolver,
        transport,
        transport.expected_context,
        settings
        or EngineSettings(
            level=level,
            helo_name="relay.example.net",
            port=port,
            insecure_mx_policy=insecure_mx_policy,
            policy=policy,
            myself=myself,
            # Connection reuse off: each test sees its sessions end with QUIT (the reuse
            # tests are in test_connection_reuse.py).
            connection_cache_time=0.0,
        ),
        metrics,
        clock=lambda: NOW,
        resolver_status=resolver_status,
    )
    return World(resolver, transport, metrics, engine)


def secure_domain(
    domain: str = "secure.example",
    host: str = "mx1.secure.example",
    address: str = "192.0.2.1",
    tlsa: Sequence[TlsaRecord] | None = None,
) -> FakeResolver:
    """A fully DNSSEC-signed domain with one MX host and a 3 1 1 record for its cert."""
    resolver = FakeResolver()
    resolver.domain(domain, (10, host, address))
    resolver.set_tlsa(host, *(tlsa if tlsa is not None else [tlsa_3_1_1(cert_der(host))]))
    return resolver


FULL_TRANSACTION = ["CONNECT", "EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


def result(
    rcpt: str, outcome: Outcome, reply: SmtpReply, relay: str, reason: str
) -> RecipientResult:
    return RecipientResult(rcpt, outcome, reply, relay, reason)


# -- DANE authenticated delivery ---------------------------------------------------------------


async def test_secure_mx_matching_3_1_1_delivers_verified(caplog: pytest.LogCaptureFixture) -> None:
    w = world(secure_domain(), {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")])})
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        results = await w.deliver("rcpt@secure.example")

    assert results == [
        result(
            "rcpt@secure.example",
            Outcome.DELIVERED,
            QUEUED,
            "mx1.secure.example[192.0.2.1]:25",
            "sent",
        )
    ]
    assert w.transport.verbs() == FULL_TRANSACTION
    # RFC 7672 §8.1: SNI is the TLSA base domain; EHLO is repeated after STARTTLS.
    assert w.transport.log[2] == ("192.0.2.1", "STARTTLS", "mx1.secure.example")
    assert w.transport.log[4] == ("192.0.2.1", "MAIL", SENDER, (f"SIZE={len(BODY)}",))
    assert w.transport.log[6] == ("192.0.2.1", "DATA", BODY)
    assert w.resolver.calls == [
        ("MX", "secure.example"),
        ("A/AAAA", "mx1.secure.example"),
        ("TLSA", "_25._tcp.mx1.secure.example"),
    ]
    assert w.sample("dane_relay_dane_verifications_total", result="verified", reason="match") == 1
    assert w.sample("dane_relay_delivery_attempts_total", result="delivered", reason="sent") == 1
    # DNS lookups are counted by the resolver adapter (LookupObserver), not by the engine.
    assert w.sample("dane_relay_dns_lookups_total", rrtype="TLSA", result="secure") is None
    assert w.sample("dane_relay_tlsa_malformed_records_total") == 0
    assert w.sample("dane_relay_delivery_delay_seconds_count") == 1
    assert w.sample("dane_relay_delivery_delay_seconds_sum") == 60.0
    (line,) = [r.getMessage() for r in caplog.records if "status=sent" in r.getMessage()]
    assert " tls=verified(TLSv1.3 TLS_AES_256_GCM_SHA384) dane=pass reason=match " in line
    assert "relay=mx1.secure.example[192.0.2.1]:25 dnssec=secure" in line


async def test_tls_outcome_metric_label_is_verified() -> None:
    w = world(secure_domain(), {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")])})
    await w.deliver("rcpt@secure.example")
    assert w.sample("dane_relay_outbound_tls_total", level="verified") == 1


async def test_dane_match_on_full_certificate_digest_3_0_1() -> None:
    der = cert_der("mx1.secure.example")
    w = world(secure_domain(tlsa=[tlsa_3_0_1(der)]), {"192.0.2.1": Peer(starttls=[der])})
    (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.sample("dane_relay_dane_verifications_total", result="verified", reason="match") == 1


async def test_insecure_mx_with_dane_match_is_trusted_not_verified(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RFC 7672 §2.2.1: DANE may be used for MX hosts from an insecure MX RRset."""
    resolver = FakeResolver()
    resolver.domain(
        "hosted.example", (10, "mx1.secure.example", "192.0.2.1"), mx_security=Security.INSECURE
    )
    resolver.set_tlsa("mx1.secure.example", tlsa_3_1_1(cert_der("mx1.secure.example")))
    w = world(resolver, {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")])})
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@hosted.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.transport.verbs() == FULL_TRANSACTION
    assert any(" tls=trusted(" in rec.getMessage() for rec in caplog.records)
    assert not any(" tls=verified" in rec.getMessage() for rec in caplog.records)


async def test_dane_mismatch_defers_without_mail_from() -> None:
    w = world(secure_domain(), {"192.0.2.1": Peer(starttls=[cert_der("attacker.example")])})
    (r,) = await w.deliver("rcpt@secure.example")

    assert r.outcome is Outcome.DEFERRED
    assert (r.reply.code, r.reply.enhanced) == (451, "4.7.5")
    assert r.reply.text == "Server certificate not verified (no-match)"
    assert r.reason == "dane_verification"
    assert r.relay == "mx1.secure.example[192.0.2.1]:25"
    # RFC 7672 §3: QUIT right after the handshake; no MAIL FROM to an unauthenticated peer.
    assert w.transport.verbs() == ["CONNECT", "EHLO", "STARTTLS", "QUIT", "ABORT"]
    assert "MAIL" not in w.transport.verbs() and "DATA" not in w.transport.verbs()
    assert w.sample("dane_relay_dane_verifications_total", result="failed", reason="mismatch") == 1
    assert (
        w.sample("dane_relay_dane_verifications_total", result="verified", reason="match") is None
    )
    assert (
        w.sample(
            "dane_relay_delivery_attempts_total", result="deferred", reason="dane_verification"
        )
        == 1
    )


async def test_dane_empty_chain_defers() -> None:
    w = world(secure_domain(), {"192.0.2.1": Peer(starttls=[])})
    (r,) = await w.deliver("rcpt@secure.example")
    assert (r.outcome, r.reply.enhanced) == (Outcome.DEFERRED, "4.7.5")
    assert "MAIL" not in w.transport.verbs()
    assert w.sample("dane_relay_dane_verifications_total", result="failed", reason="no-chain") == 1


async def test_dane_without_starttls_defers_4_7_4() -> None:
    peer = Peer(extensions=frozenset({"size", "8bitmime"}))
    w = world(secure_domain(), {"192.0.2.1": peer})
    (r,) = await w.deliver("rcpt@secure.example")

    assert r.outcome is Outcome.DEFERRED
    assert (r.reply.code, r.reply.enhanced) == (451, "4.7.4")
    assert r.reason == "dane_no_starttls"
    assert w.transport.verbs() == ["CONNECT", "EHLO", "QUIT", "ABORT"]
    assert (
        w.sample("dane_relay_dane_verifications_total", result="failed", reason="no-starttls") == 1
    )


async def test_dane_handshake_failure_defers_without_plaintext_retry() -> None:
    failure = TlsHandshakeFailed("Cannot start TLS: handshake failure (alert)", scope=Scope.HOST)
    w = world(secure_domain(), {"192.0.2.1": Peer(starttls=failure)})
    (r,) = await w.deliver("rcpt@secure.example")

    assert r.outcome is Outcome.DEFERRED
    assert (r.reply.code, r.reply.enhanced) == (451, "4.7.5")
    assert r.reason == "tls_handshake"
    assert w.transport.connections() == ["192.0.2.1"]  # no second, plaintext connection
    assert w.transport.verbs() == ["CONNECT", "EHLO", "STARTTLS", "ABORT"]
    assert (
        w.sample("dane_relay_dane_verifications_total", result="failed", reason="handshake-error")
        == 1
    )


async def test_encrypt_level_handshake_failure_defers_without_plaintext_retry() -> None:
    resolver = FakeResolver()
    resolver.domain("plain.example", (10, "mx.plain.example", "192.0.2.9"))
    failure = TlsHandshakeFailed(scope=Scope.HOST)
    w = world(resolver, {"192.0.2.9": Peer(starttls=failure)}, level="encrypt")
    (r,) = await w.deliver("rcpt@plain.example")
    assert (r.outcome, r.reply.enhanced) == (Outcome.DEFERRED, "4.7.5")
    assert w.transport.connections() == ["192.0.2.9"]
    assert "MAIL" not in w.transport.verbs()


async def test_may_level_handshake_failure_retries_in_plaintext() -> None:
    resolver = FakeResolver()
    resolver.domain("plain.example", (10, "mx.plain.example", "192.0.2.9"))
    failing = Peer(starttls=TlsHandshakeFailed(scope=Scope.HOST))
    plaintext = Peer(starttls=TlsHandshakeFailed(scope=Scope.HOST))
    w = world(resolver, {"192.0.2.9": [failing, plaintext]}, level="may")
    (r,) = await w.deliver("rcpt@plain.example")

    assert r == result(
        "rcpt@plain.example", Outcome.DELIVERED, QUEUED, "mx.plain.example[192.0.2.9]:25", "sent"
    )
    assert w.transport.verbs() == [
        "CONNECT", "EHLO", "STARTTLS", "ABORT",
        "CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "QUIT",
    ]  # fmt: skip
    assert w.resolver.tlsa_lookups() == []  # level may never looks up TLSA
    assert w.sample("dane_relay_outbound_tls_total", level="none") == 1
    assert (
        w.sample("dane_relay_dane_verifications_total", result="failed", reason="handshake-error")
        is None
    )


async def test_tlsa_lookup_failure_defers_without_connecting() -> None:
    resolver = secure_domain()
    resolver.tlsa_answers["_25._tcp.mx1.secure.example"] = DnsTempFail("SERVFAIL")
    w = world(resolver, {})
    (r,) = await w.deliver("rcpt@secure.example")

    assert r.outcome is Outcome.DEFERRED
    assert (r.reply.code, r.reply.enhanced) == (451, "4.7.5")
    assert r.reply.text == "TLSA lookup error for mx1.secure.example:25"
    assert r.reason == "tlsa_lookup"
    assert w.transport.log == []
    assert w.resolver.tlsa_lookups() == ["_25._tcp.mx1.secure.example"]
    assert (
        w.sample("dane_relay_delivery_attempts_total", result="deferred", reason="tlsa_lookup") == 1
    )


async def test_best_mx_that_is_the_relay_itself_bounces_5_4_6_without_connecting() -> None:
    # Postfix: the most preferred MX is this relay (by name or by a listen address at the
    # delivery port): a mail loop, bounced at once, nothing connected.
    for myself in (
        # By name: the relay listens at the delivery port (on another address).
        partial(Myself.of, "MX1.secure.example.", (Endpoint("198.51.100.7", 25),)),
        partial(Myself.of, "relay.example.net", (Endpoint("192.0.2.1", 25),)),
    ):
        w = world(secure_domain(), {}, myself=myself)
        (r,) = await w.deliver("rcpt@secure.example")
        assert r.outcome is Outcome.BOUNCED
        assert (r.reply.code, r.reply.enhanced) == (554, "5.4.6")
        assert r.reply.text.startswith("mail for secure.example loops back to myself")
        assert w.transport.log == []


async def test_a_listen_address_on_another_port_is_not_a_loop() -> None:
    # A relay listening on 192.0.2.1:2525 that delivers to 192.0.2.1:25 talks to another
    # server (the host's own MTA), which is no loop.
    myself = partial(Myself.of, "relay.example.net", (Endpoint("192.0.2.1", 2525),))
    peer = Peer(starttls=[cert_der("mx1.secure.example")])
    w = world(secure_domain(), {"192.0.2.1": peer}, myself=myself)
    (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DELIVERED


async def test_the_relays_host_name_at_a_port_it_does_not_listen_on_is_not_a_loop() -> None:
    # server.hostname is mx1.secure.example, listening at :25 only; delivery to port 10025
    # reaches another server on the same machine (a content filter), not the relay
    # (RFC 5321 §5.1). At port 25 the same name is the relay: bounced 5.4.6.
    myself = partial(Myself.of, "mx1.secure.example", (Endpoint("198.51.100.7", 25),))
    peer = Peer(starttls=[cert_der("mx1.secure.example")])
    w = world(secure_domain(), {"192.0.2.1": peer}, myself=myself, port=10025)
    (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.transport.connections() == ["192.0.2.1"]
    w = world(secure_domain(), {"192.0.2.1": peer}, myself=myself, port=25)
    (r,) = await w.deliver("rcpt@secure.example")
    assert (r.outcome, r.reply.code, r.reply.enhanced) == (Outcome.BOUNCED, 554, "5.4.6")
    assert w.transport.log == []


async def test_insecure_addresses_skip_tlsa_and_use_opportunistic_tls() -> None:
    resolver = FakeResolver()
    resolver.domain(
        "secure.example",
        (10, "mx1.secure.example", "192.0.2.1"),
        address_security=Security.INSECURE,
    )
    # A TLSA RRset that would not match, were it (wrongly) consulted.
    resolver.set_tlsa("mx1.secure.example", tlsa_3_1_1(cert_der("other.example")))
    w = world(resolver, {"192.0.2.1": Peer(starttls=[cert_der("attacker.example")])})
    (r,) = await w.deliver("rcpt@secure.example")

    assert r.outcome is Outcome.DELIVERED
    assert w.resolver.tlsa_lookups() == []  # RFC 7672 §2.2.2
    assert w.transport.verbs() == FULL_TRANSACTION
    assert (
        w.metrics.registry.get_sample_value(
            "dane_relay_dane_verifications_total", {"result": "failed", "reason": "mismatch"}
        )
        is None
    )


async def test_insecure_addresses_without_starttls_deliver_in_plaintext() -> None:
    resolver = FakeResolver()
    resolver.domain(
        "plain.example", (10, "mx.plain.example", "192.0.2.9"), address_security=Security.INSECURE
    )
    w = world(resolver, {"192.0.2.9": Peer(extensions=frozenset())})
    (r,) = await w.deliver("rcpt@plain.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.transport.verbs() == ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert w.sample("dane_relay_outbound_tls_total", level="none") == 1


@pytest.mark.parametrize(
    "security", [Security.INSECURE, Security.SECURE], ids=["insecure-tlsa", "secure-nodata"]
)
async def test_no_usable_tlsa_falls_back_to_may(security: Security) -> None:
    resolver = FakeResolver()
    resolver.domain("secure.example", (10, "mx1.secure.example", "192.0.2.1"))
    if security is Security.INSECURE:
        resolver.set_tlsa(
            "mx1.secure.example", tlsa_3_1_1(cert_der("other.example")), security=security
        )
    else:
        resolver.set_tlsa("mx1.secure.example")  # secure NODATA
    w = world(resolver, {"192.0.2.1": Peer(extensions=frozenset())})
    (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.transport.verbs() == ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


UNUSABLE = [
    TlsaRecord(1, 1, 1, b"\x01" * 32),  # PKIX-EE: unusable for SMTP (RFC 7672 §3.1.3)
    TlsaRecord(0, 0, 1, b"\x02" * 32),  # PKIX-TA
    TlsaRecord(3, 1, 255, b"\x04" * 32),  # PrivMatch
]


async def test_secure_unusable_tlsa_encrypts_without_verification(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = world(
        secure_domain(tlsa=UNUSABLE),
        {"192.0.2.1": Peer(starttls=[cert_der("anything.example")])},
    )
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.transport.verbs() == FULL_TRANSACTION
    assert (
        w.sample("dane_relay_dane_verifications_total", result="failed", reason="mismatch") is None
    )
    assert (
        w.sample("dane_relay_dane_verifications_total", result="verified", reason="match") is None
    )
    assert any(" tls=encrypted(" in rec.getMessage() for rec in caplog.records)
    # RFC 7672 §3.1.3: counted as unauthenticated DANE, delivered at TLS level encrypted.
    assert (
        w.sample(
            "dane_relay_dane_verifications_total", result="unauthenticated", reason="unusable-tlsa"
        )
        == 1
    )
    assert (
        w.sample("dane_relay_delivery_attempts_by_tls_total", result="delivered", tls="encrypted")
        == 1
    )
    assert (
        w.sample(
            "dane_relay_tls_negotiated_total",
            direction="outbound",
            version=TLS_VERSION,
            cipher=TLS_CIPHER,
        )
        == 1
    )


async def test_malformed_tlsa_alone_defers_without_connecting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A DANE-EE record whose digest has the wrong length is bad DNS data, not a record
    # type we merely do not use: with nothing usable beside it, defer (never encrypt-only).
    malformed = [TlsaRecord(3, 1, 1, b"\x03" * 31), *UNUSABLE]
    w = world(secure_domain(tlsa=malformed), {"192.0.2.1": Peer()})
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DEFERRED
    assert (r.reply.code, r.reply.enhanced) == (451, "4.7.5")
    assert r.reply.text == "TLSA records malformed for mx1.secure.example:25"
    assert r.reason == "tlsa_malformed"
    assert w.transport.verbs() == []
    assert w.sample("dane_relay_tlsa_malformed_records_total") == 1
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert warnings == [
        "queue_id=0123456789ABCDEF01234 host=mx1.secure.example dane=malformed-tlsa "
        "records=3 1 1 0303030303030303… usable_left=0"
    ]


async def test_secure_unusable_tlsa_without_starttls_defers() -> None:
    w = world(secure_domain(tlsa=UNUSABLE), {"192.0.2.1": Peer(extensions=frozenset())})
    (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DEFERRED
    assert (r.reply.code, r.reply.enhanced) == (451, "4.7.4")
    assert r.reason == "tls_not_offered"
    assert w.transport.verbs() == ["CONNECT", "EHLO", "QUIT", "ABORT"]


async def test_usable_record_among_unusable_ones_is_enforced() -> None:
    records = [*UNUSABLE, tlsa_3_1_1(cert_der("mx1.secure.example"))]
    w = world(secure_domain(tlsa=records), {"192.0.2.1": Peer(starttls=[cert_der("evil.example")])})
    (r,) = await w.deliver("rcpt@secure.example")
    assert (r.outcome, r.reply.enhanced) == (Outcome.DEFERRED, "4.7.5")
    assert "MAIL" not in w.transport.verbs()


async def test_first_mx_fails_dane_second_verifies() -> None:
    resolver = FakeResolver()
    resolver.domain(
        "secure.example",
        (10, "mx1.secure.example", "192.0.2.1"),
        (20, "mx2.secure.example", "192.0.2.2"),
    )
    resolver.set_tlsa("mx1.secure.example", tlsa_3_1_1(cert_der("mx1.secure.example")))
    resolver.set_tlsa("mx2.secure.example", tlsa_3_1_1(cert_der("mx2.secure.example")))
    w = world(
        resolver,
        {
            "192.0.2.1": Peer(starttls=[cert_der("attacker.example")]),
            "192.0.2.2": Peer(starttls=[cert_der("mx2.secure.example")]),
        },
    )
    (r,) = await w.deliver("rcpt@secure.example")

    assert r == result(
        "rcpt@secure.example", Outcome.DELIVERED, QUEUED, "mx2.secure.example[192.0.2.2]:25", "sent"
    )
    assert w.transport.verbs("192.0.2.1") == ["CONNECT", "EHLO", "STARTTLS", "QUIT", "ABORT"]
    assert w.transport.verbs("192.0.2.2") == FULL_TRANSACTION
    assert w.transport.log[7] == ("192.0.2.2", "STARTTLS", "mx2.secure.example")
    assert w.sample("dane_relay_dane_verifications_total", result="failed", reason="mismatch") == 1
    assert w.sample("dane_relay_dane_verifications_total", result="verified", reason="match") == 1


async def test_every_mx_failing_dane_defers_with_the_last_reason() -> None:
    resolver = FakeResolver()
    resolver.domain(
        "secure.example",
        (10, "mx1.secure.example", "192.0.2.1"),
        (20, "mx2.secure.example", "192.0.2.2"),
    )
    resolver.set_tlsa("mx1.secure.example", tlsa_3_1_1(cert_der("mx1.secure.example")))
    resolver.set_tlsa("mx2.secure.example", tlsa_3_1_1(cert_der("mx2.secure.example")))
    w = world(
        resolver,
        {
            "192.0.2.1": Peer(starttls=[cert_der("attacker.example")]),
            "192.0.2.2": Peer(extensions=frozenset()),
        },
    )
    (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DEFERRED
    assert (r.reply.code, r.reply.enhanced, r.reason) == (451, "4.7.4", "dane_no_starttls")
    assert r.relay == "mx2.secure.example[192.0.2.2]:25"
    assert "MAIL" not in w.transport.verbs()
    assert (
        w.sample("dane_relay_delivery_attempts_total", result="deferred", reason="dane_no_starttls")
        == 1
    )


async def test_tlsa_qname_uses_port_25_whatever_the_connection_port() -> None:
    w = world(
        secure_domain(), {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")])}, port=2525
    )
    (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DELIVERED
    assert r.relay == "mx1.secure.example[192.0.2.1]:2525"
    assert w.transport.log[0] == ("192.0.2.1", "CONNECT", 2525)
    assert w.resolver.tlsa_lookups() == ["_25._tcp.mx1.secure.example"]


async def test_explicit_next_hop_skips_mx_and_uses_tlsa_at_its_port(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RFC 7672 §2.2.2, Postfix: [host]:port has its TLSA records at _port._tcp.host."""
    resolver = FakeResolver()
    resolver.address_answers["smart.example"] = answer("smart.example", "192.0.2.9")
    resolver.tlsa_answers["_587._tcp.smart.example"] = answer(
        "_587._tcp.smart.example", tlsa_3_1_1(cert_der("smart.example"))
    )
    routes = PolicyMap("dane", relayhost=parse_next_hop("[smart.example]:587"))
    w = world(resolver, {"192.0.2.9": Peer(starttls=[cert_der("smart.example")])}, policy=routes)
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@anywhere.example")
    assert r.outcome is Outcome.DELIVERED
    assert r.relay == "smart.example[192.0.2.9]:587"
    assert ("MX", "anywhere.example") not in w.resolver.calls
    assert [c for c in w.resolver.calls if c[0] == "MX"] == []
    assert w.resolver.tlsa_lookups() == ["_587._tcp.smart.example"]
    assert w.transport.log[2] == ("192.0.2.9", "STARTTLS", "smart.example")
    assert " tls=verified" in caplog.text
    assert "level=dane nexthop=[smart.example]:587" in caplog.text


async def test_policy_map_level_per_domain() -> None:
    """dane-only for one domain (no TLSA: deferred), the default dane for another."""
    resolver = FakeResolver()
    resolver.domain("strict.example", (10, "mx.strict.example", "192.0.2.1"))
    resolver.domain("loose.example", (10, "mx.loose.example", "192.0.2.2"))
    resolver.set_tlsa("mx.strict.example", security=Security.INSECURE)
    resolver.set_tlsa("mx.loose.example", security=Security.INSECURE)
    routes = PolicyMap("dane", policy=(("strict.example", "dane-only"),))
    w = world(resolver, {"192.0.2.2": Peer(starttls=[cert_der("mx.loose.example")])}, policy=routes)
    strict, loose = await w.deliver("a@strict.example", "b@loose.example")
    assert strict.outcome is Outcome.DEFERRED
    assert (strict.reply.code, strict.reply.enhanced) == (451, "4.7.5")
    assert loose.outcome is Outcome.DELIVERED
    assert w.transport.connections() == ["192.0.2.2"]


async def test_implicit_mx_uses_the_domain_as_host_and_tlsa_base() -> None:
    resolver = FakeResolver()
    resolver.mx_answers["bare.example"] = answer("bare.example")  # secure NODATA
    resolver.address_answers["bare.example"] = answer("bare.example", "192.0.2.7")
    resolver.set_tlsa("bare.example", tlsa_3_1_1(cert_der("bare.example")))
    w = world(resolver, {"192.0.2.7": Peer(starttls=[cert_der("bare.example")])})
    (r,) = await w.deliver("rcpt@bare.example")
    assert r.outcome is Outcome.DELIVERED
    assert r.relay == "bare.example[192.0.2.7]:25"
    assert w.resolver.tlsa_lookups() == ["_25._tcp.bare.example"]
    assert w.transport.log[2] == ("192.0.2.7", "STARTTLS", "bare.example")


async def test_tlsa_base_domain_follows_a_secure_cname() -> None:
    resolver = FakeResolver()
    resolver.mx_answers["hosted.example"] = answer(
        "hosted.example", MxRecord(10, "mx.hosted.example")
    )
    resolver.address_answers["mx.hosted.example"] = answer(
        "mx.hosted.example", "192.0.2.5", canonical="smtp.provider.example"
    )
    resolver.set_tlsa("mx.hosted.example")  # secure NODATA at the alias
    resolver.set_tlsa("smtp.provider.example", tlsa_3_1_1(cert_der("smtp.provider.example")))
    w = world(resolver, {"192.0.2.5": Peer(starttls=[cert_der("smtp.provider.example")])})
    (r,) = await w.deliver("rcpt@hosted.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.resolver.tlsa_lookups()[0] == "_25._tcp.smtp.provider.example"
    assert ("192.0.2.5", "STARTTLS", "smtp.provider.example") in w.transport.log
    assert w.sample("dane_relay_dane_verifications_total", result="verified", reason="match") == 1


# -- DNS outcomes ------------------------------------------------------------------------------


async def test_mx_lookup_failure_defers_4_4_3() -> None:
    resolver = FakeResolver()
    resolver.mx_answers["broken.example"] = DnsTempFail("SERVFAIL for broken.example MX")
    w = world(resolver, {})
    results = await w.deliver("a@broken.example", "b@broken.example")
    assert [(r.outcome, r.reply.code, r.reply.enhanced, r.reason) for r in results] == [
        (Outcome.DEFERRED, 451, "4.4.3", "dns"),
        (Outcome.DEFERRED, 451, "4.4.3", "dns"),
    ]
    assert results[0].reply.text == "SERVFAIL for broken.example MX"
    assert w.transport.log == []
    assert w.sample("dane_relay_delivery_attempts_total", result="deferred", reason="dns") == 2


async def test_nxdomain_bounces_5_1_2() -> None:
    resolver = FakeResolver()
    resolver.mx_answers["nowhere.example"] = answer("nowhere.example", kind=AnswerKind.NXDOMAIN)
    w = world(resolver, {})
    (r,) = await w.deliver("rcpt@nowhere.example")
    assert r.outcome is Outcome.BOUNCED
    assert (r.reply.code, r.reply.enhanced, r.reason) == (550, "5.1.2", "nxdomain")
    assert w.transport.log == []
    assert w.sample("dane_relay_delivery_attempts_total", result="bounced", reason="nxdomain") == 1


async def test_null_mx_bounces_5_1_10() -> None:
    resolver = FakeResolver()
    resolver.mx_answers["nomail.example"] = answer("nomail.example", MxRecord(0, ""))
    w = world(resolver, {})
    (r,) = await w.deliver("rcpt@nomail.example")
    assert r.outcome is Outcome.BOUNCED
    assert (r.reply.code, r.reply.enhanced, r.reason) == (556, "5.1.10", "null_mx")
    assert w.resolver.calls == [("MX", "nomail.example")]
    assert w.transport.log == []


async def test_address_lookup_failure_moves_to_the_next_mx() -> None:
    resolver = FakeResolver()
    resolver.domain(
        "plain.example",
        (10, "mx1.plain.example", "192.0.2.1"),
        (20, "mx2.plain.example", "192.0.2.2"),
        address_security=Security.INSECURE,
    )
    resolver.address_answers["mx1.plain.example"] = DnsTempFail("timeout")
    w = world(resolver, {"192.0.2.2": Peer()})
    (r,) = await w.deliver("rcpt@plain.example")
    assert r.outcome is Outcome.DELIVERED
    assert r.relay == "mx2.plain.example[192.0.2.2]:25"
    assert w.transport.connections() == ["192.0.2.2"]


# -- levels ------------------------------------------------------------------------------------


async def test_dane_only_without_tlsa_defers_without_connecting() -> None:
    resolver = FakeResolver()
    resolver.domain("secure.example", (10, "mx1.secure.example", "192.0.2.1"))
    resolver.set_tlsa("mx1.secure.example")  # secure NODATA
    w = world(resolver, {}, level="dane-only")
    (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DEFERRED
    assert (r.reply.code, r.reply.enhanced, r.reason) == (451, "4.7.5", "dane_required")
    assert w.transport.log == []


async def test_dane_only_with_insecure_addresses_defers_without_connecting() -> None:
    resolver = FakeResolver()
    resolver.domain(
        "plain.example", (10, "mx.plain.example", "192.0.2.9"), address_security=Security.INSECURE
    )
    w = world(resolver, {}, level="dane-only")
    (r,) = await w.deliver("rcpt@plain.example")
    assert (r.outcome, r.reply.enhanced, r.reason) == (Outcome.DEFERRED, "4.7.5", "dane_required")
    assert w.resolver.tlsa_lookups() == []
    assert w.transport.log == []


async def test_dane_only_with_match_delivers() -> None:
    w = world(
        secure_domain(),
        {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")])},
        level="dane-only",
    )
    (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.transport.verbs() == FULL_TRANSACTION


async def test_level_none_never_starts_tls() -> None:
    resolver = FakeResolver()
    resolver.domain("secure.example", (10, "mx1.secure.example", "192.0.2.1"))
    w = world(resolver, {"192.0.2.1": Peer()}, level="none")
    (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.transport.verbs() == ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert w.resolver.tlsa_lookups() == []


# -- the SMTP transaction ----------------------------------------------------------------------


async def test_rcpt_550_for_one_recipient_bounces_it_and_delivers_the_other() -> None:
    rejected = SmtpReply(550, "5.1.1", "<bad@secure.example>: user unknown")
    w = world(
        secure_domain(),
        {
            "192.0.2.1": Peer(
                starttls=[cert_der("mx1.secure.example")], rcpt={"bad@secure.example": rejected}
            )
        },
    )
    results = await w.deliver("good@secure.example", "bad@secure.example")
    relay = "mx1.secure.example[192.0.2.1]:25"
    assert results == [
        result("good@secure.example", Outcome.DELIVERED, QUEUED, relay, "sent"),
        result("bad@secure.example", Outcome.BOUNCED, rejected, relay, "remote_5xx"),
    ]
    assert w.transport.verbs() == [
        "CONNECT", "EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT",
    ]  # fmt: skip
    assert w.sample("dane_relay_delivery_attempts_total", result="delivered", reason="sent") == 1
    assert (
        w.sample("dane_relay_delivery_attempts_total", result="bounced", reason="remote_5xx") == 1
    )


async def test_rcpt_250_451_550_deliver_defer_and_bounce_in_one_attempt() -> None:
    busy = SmtpReply(451, "4.2.0", "try later")
    unknown = SmtpReply(550, "5.1.1", "user unknown")
    peer = Peer(
        starttls=[cert_der("mx1.secure.example")],
        rcpt={"b@secure.example": busy, "c@secure.example": unknown},
    )
    w = world(secure_domain(), {"192.0.2.1": peer})
    results = await w.deliver("a@secure.example", "b@secure.example", "c@secure.example")
    assert [(r.outcome, r.reply, r.reason) for r in results] == [
        (Outcome.DELIVERED, QUEUED, "sent"),
        (Outcome.DEFERRED, busy, "remote_4xx"),
        (Outcome.BOUNCED, unknown, "remote_5xx"),
    ]
    assert {r.relay for r in results} == {"mx1.secure.example[192.0.2.1]:25"}
    assert w.transport.connections() == ["192.0.2.1"]
    assert w.transport.verbs().count("DATA") == 1


async def test_message_bigger_than_peer_size_bounces_5_3_4_without_mail_from() -> None:
    peer = Peer(starttls=[cert_der("mx1.secure.example")], size=len(BODY) - 1)
    w = world(secure_domain(), {"192.0.2.1": peer})
    (r,) = await w.deliver("a@secure.example")
    assert (r.outcome, r.reply.code, r.reply.enhanced) == (Outcome.BOUNCED, 552, "5.3.4")
    assert r.reason == "message_too_big"
    assert w.transport.verbs() == ["CONNECT", "EHLO", "STARTTLS", "EHLO", "QUIT"]
    assert (
        w.sample("dane_relay_delivery_attempts_total", result="bounced", reason="message_too_big")
        == 1
    )


@pytest.mark.parametrize(
    "cut",
    [SmtpReply(421, "4.3.2", "shutting down"), ConnectionLost(), ConnectionLost(timed_out=True)],
)
async def test_421_or_lost_connection_mid_transaction_defers_the_rest_and_closes(
    cut: SmtpReply | ConnectionLost,
) -> None:
    unknown = SmtpReply(550, "5.1.1", "user unknown")
    peer = Peer(
        starttls=[cert_der("mx1.secure.example")],
        rcpt={"a@secure.example": unknown, "b@secure.example": cut},
    )
    w = world(secure_domain(), {"192.0.2.1": peer})
    results = await w.deliver("a@secure.example", "b@secure.example", "c@secure.example")
    assert [r.outcome for r in results] == [Outcome.BOUNCED, Outcome.DEFERRED, Outcome.DEFERRED]
    reason = "remote_4xx"
    if isinstance(cut, ConnectionLost):
        reason = "timeout" if cut.timed_out else "connection_lost"
    assert {r.reason for r in results[1:]} == {reason}
    assert all(r.reply.code in (421, 451) for r in results[1:])
    # RFC 5321 §3.8: no QUIT after a 421 or a lost connection, and no DATA.
    assert w.transport.verbs()[-3:] == ["RCPT", "RCPT", "ABORT"]
    assert "QUIT" not in w.transport.verbs()


async def test_ascii_message_that_asked_for_smtputf8_goes_without_it() -> None:
    w = world(secure_domain(), {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")])})
    (r,) = await w.engine.deliver(
        "0123456789ABCDEF01234", SENDER, ["a@secure.example"], BODY, RECEIVED, smtputf8=True
    )
    assert r.outcome is Outcome.DELIVERED
    assert ("192.0.2.1", "MAIL", SENDER, (f"SIZE={len(BODY)}",)) in w.transport.log


async def test_utf8_address_to_peer_without_smtputf8_bounces_5_6_7() -> None:
    w = world(secure_domain(), {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")])})
    (r,) = await w.engine.deliver(
        "0123456789ABCDEF01234", "jörg@sender.example", ["a@secure.example"], BODY, RECEIVED,
        smtputf8=True,
    )  # fmt: skip
    assert (r.outcome, r.reply.enhanced, r.reason) == (
        Outcome.BOUNCED, "5.6.7", "smtputf8_not_offered",
    )  # fmt: skip
    assert "MAIL" not in w.transport.verbs()


async def test_all_recipients_rejected_sends_no_data() -> None:
    temp = SmtpReply(450, "4.2.0", "mailbox busy")
    w = world(
        secure_domain(),
        {
            "192.0.2.1": Peer(
                starttls=[cert_der("mx1.secure.example")], rcpt={"a@secure.example": temp}
            )
        },
    )
    (r,) = await w.deliver("a@secure.example")
    assert (r.outcome, r.reply, r.reason) == (Outcome.DEFERRED, temp, "remote_4xx")
    assert "DATA" not in w.transport.verbs()
    assert w.transport.verbs()[-1] == "QUIT"


async def test_data_451_defers_every_accepted_recipient() -> None:
    busy = SmtpReply(451, "4.3.0", "local error in processing")
    w = world(
        secure_domain(), {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")], data=busy)}
    )
    results = await w.deliver("a@secure.example", "b@secure.example")
    assert [(r.outcome, r.reply, r.reason) for r in results] == [
        (Outcome.DEFERRED, busy, "remote_4xx"),
        (Outcome.DEFERRED, busy, "remote_4xx"),
    ]
    assert w.transport.verbs().count("DATA") == 1
    assert (
        w.sample("dane_relay_delivery_attempts_total", result="deferred", reason="remote_4xx") == 2
    )


async def test_mail_from_rejected_bounces_without_rcpt() -> None:
    refused = SmtpReply(553, "5.7.1", "sender refused")
    w = world(
        secure_domain(),
        {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")], mail=refused)},
    )
    (r,) = await w.deliver("a@secure.example")
    assert (r.outcome, r.reply, r.reason) == (Outcome.BOUNCED, refused, "mail_from")
    # RFC 2920 §3.1: RCPT went in the same batch as MAIL; the content never followed.
    assert w.transport.verbs()[4:] == ["MAIL", "RCPT", "QUIT"]


async def test_mail_from_rejected_without_pipelining_sends_no_rcpt() -> None:
    refused = SmtpReply(553, "5.7.1", "sender refused")
    peer = Peer(
        starttls=[cert_der("mx1.secure.example")],
        mail=refused,
        tls_extensions=frozenset({"size", "8bitmime"}),
    )
    w = world(secure_domain(), {"192.0.2.1": peer})
    (r,) = await w.deliver("a@secure.example")
    assert (r.outcome, r.reply, r.reason) == (Outcome.BOUNCED, refused, "mail_from")
    assert w.transport.verbs()[4:] == ["MAIL", "QUIT"]


async def test_pipelining_sends_mail_rcpts_and_data_in_one_batch() -> None:
    """RFC 2920 §3.1: with PIPELINING the replies are read only after the whole batch."""
    w = world(secure_domain(), {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")])})
    results = await w.deliver("a@secure.example", "b@secure.example")
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    batch = [Phase.MAIL, Phase.RCPT, Phase.RCPT, Phase.DATA]
    assert w.transport.io == [
        *(("write", phase) for phase in batch),
        *(("read", phase) for phase in batch),
        ("write", Phase.DATA_END),  # the content, after the 354
        ("read", Phase.DATA_END),
    ]


async def test_eight_bit_body_announces_8bitmime() -> None:
    resolver = FakeResolver()
    resolver.domain(
        "plain.example", (10, "mx.plain.example", "192.0.2.9"), address_security=Security.INSECURE
    )
    w = world(resolver, {"192.0.2.9": Peer(extensions=frozenset({"size", "8bitmime"}))})
    body = "Subject: é\r\n\r\nbody\r\n".encode()
    await w.engine.deliver("0123456789ABCDEF01234", SENDER, ["r@plain.example"], body, RECEIVED)
    assert ("192.0.2.9", "MAIL", SENDER, (f"SIZE={len(body)}", "BODY=8BITMIME")) in w.transport.log


async def test_refusing_greeting_and_connect_failure_move_to_the_next_host() -> None:
    resolver = FakeResolver()
    resolver.domain(
        "plain.example",
        (10, "mx1.plain.example", "192.0.2.1"),
        (20, "mx2.plain.example", "192.0.2.2"),
        (30, "mx3.plain.example", "192.0.2.3"),
        address_security=Security.INSECURE,
    )
    w = world(
        resolver,
        {
            "192.0.2.1": Peer(connect_error=ConnectFailed("refused", scope=Scope.HOST)),
            "192.0.2.2": Peer(greeting=SmtpReply(554, "5.7.1", "no service")),
            "192.0.2.3": Peer(),
        },
    )
    (r,) = await w.deliver("rcpt@plain.example")
    assert r.outcome is Outcome.DELIVERED
    assert r.relay == "mx3.plain.example[192.0.2.3]:25"
    assert w.transport.connections() == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]


async def test_every_host_refusing_service_defers_not_bounces() -> None:
    resolver = FakeResolver()
    resolver.domain(
        "plain.example", (10, "mx1.plain.example", "192.0.2.1"), address_security=Security.INSECURE
    )
    w = world(resolver, {"192.0.2.1": Peer(greeting=SmtpReply(554, "5.7.1", "no service"))})
    (r,) = await w.deliver("rcpt@plain.example")
    assert r.outcome is Outcome.DEFERRED
    assert (r.reply.code, r.reply.enhanced) == (451, "4.4.0")
    assert r.reply.text == "all MX hosts failed, last: 554 5.7.1 no service"


async def test_recipients_of_several_domains_each_get_their_own_outcome() -> None:
    resolver = secure_domain()
    resolver.mx_answers["nowhere.example"] = answer("nowhere.example", kind=AnswerKind.NXDOMAIN)
    resolver.mx_answers["broken.example"] = DnsTempFail()
    w = world(resolver, {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")])})
    results = await w.deliver("x@nowhere.example", "y@Secure.Example", "z@broken.example")
    assert [(r.recipient, r.outcome) for r in results] == [
        ("x@nowhere.example", Outcome.BOUNCED),
        ("y@Secure.Example", Outcome.DELIVERED),
        ("z@broken.example", Outcome.DEFERRED),
    ]
    assert ("192.0.2.1", "RCPT", "y@Secure.Example") in w.transport.log


# -- DANE-TA: the reference identifiers the engine passes --------------------------------------


@functools.cache
def ta_chain(leaf_name: str) -> tuple[bytes, bytes]:
    """(leaf, CA) DER: a CA-issued EC leaf whose only DNS name is `leaf_name`."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test DANE-TA CA")])
    start, end = datetime(2020, 1, 1, tzinfo=UTC), datetime(2099, 1, 1, tzinfo=UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, leaf_name)]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(leaf_name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return leaf.public_bytes(Encoding.DER), ca.public_bytes(Encoding.DER)


@pytest.mark.parametrize(
    ("mx_security", "outcome", "reason"),
    [
        (Security.SECURE, Outcome.DELIVERED, "match"),
        (Security.INSECURE, Outcome.DEFERRED, "name-mismatch"),
    ],
)
async def test_dane_ta_leaf_naming_only_the_next_hop_domain(
    mx_security: Security, outcome: Outcome, reason: str
) -> None:
    """RFC 7672 §3.2.2: the next-hop domain is a reference identifier only via a secure MX."""
    leaf, ca = ta_chain("secure.example")
    resolver = FakeResolver()
    resolver.domain(
        "secure.example", (10, "mx1.secure.example", "192.0.2.1"), mx_security=mx_security
    )
    resolver.set_tlsa("mx1.secure.example", TlsaRecord(2, 0, 1, hashlib.sha256(ca).digest()))
    w = world(resolver, {"192.0.2.1": Peer(starttls=[leaf, ca])})
    (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is outcome
    status = "verified" if outcome is Outcome.DELIVERED else "failed"
    assert w.sample("dane_relay_dane_verifications_total", result=status, reason=reason) == 1
    assert ("MAIL" in w.transport.verbs()) is (outcome is Outcome.DELIVERED)


async def test_dane_ta_leaf_naming_the_mx_host_verifies_via_insecure_mx() -> None:
    leaf, ca = ta_chain("mx1.secure.example")
    resolver = FakeResolver()
    resolver.domain(
        "hosted.example", (10, "mx1.secure.example", "192.0.2.1"), mx_security=Security.INSECURE
    )
    resolver.set_tlsa("mx1.secure.example", TlsaRecord(2, 0, 1, hashlib.sha256(ca).digest()))
    w = world(resolver, {"192.0.2.1": Peer(starttls=[leaf, ca])})
    (r,) = await w.deliver("rcpt@hosted.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.sample("dane_relay_dane_verifications_total", result="verified", reason="match") == 1


# -- routing (RFC 7672 §2.2): insecure MX policy, skipped hosts, a non-validating resolver ----


def insecure_mx_domain() -> FakeResolver:
    """hosted.example's MX RRset is insecure; its host's addresses and TLSA are secure."""
    resolver = FakeResolver()
    resolver.domain(
        "hosted.example", (10, "mx1.secure.example", "192.0.2.1"), mx_security=Security.INSECURE
    )
    resolver.set_tlsa("mx1.secure.example", tlsa_3_1_1(cert_der("mx1.secure.example")))
    return resolver


def attempt_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " status=" in r.getMessage()]


async def test_insecure_mx_policy_dane_verifies_and_logs_trusted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RFC 7672 §2.2.1: DANE via an insecure MX RRset authenticates the host, not the MX name."""
    w = world(
        insecure_mx_domain(),
        {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")])},
        insecure_mx_policy="dane",
    )
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@hosted.example")
    assert r == result(
        "rcpt@hosted.example", Outcome.DELIVERED, QUEUED, "mx1.secure.example[192.0.2.1]:25", "sent"
    )
    assert w.transport.verbs() == FULL_TRANSACTION
    (line,) = attempt_lines(caplog)
    assert " dnssec=mx-insecure tls=trusted(TLSv1.3 TLS_AES_256_GCM_SHA384) dane=pass " in line
    assert w.sample("dane_relay_outbound_tls_total", level="trusted") == 1
    assert w.sample("dane_relay_outbound_tls_total", level="verified") is None


async def test_insecure_mx_policy_dane_still_refuses_a_mismatching_certificate() -> None:
    w = world(insecure_mx_domain(), {"192.0.2.1": Peer(starttls=[cert_der("evil.example")])})
    (r,) = await w.deliver("rcpt@hosted.example")
    assert (r.outcome, r.reply.enhanced, r.reason) == (
        Outcome.DEFERRED,
        "4.7.5",
        "dane_verification",
    )
    assert w.transport.verbs() == ["CONNECT", "EHLO", "STARTTLS", "QUIT", "ABORT"]


async def test_insecure_mx_policy_encrypt_requires_tls_without_authentication(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A certificate the TLSA record does not match: with encrypt, nothing is verified.
    w = world(
        insecure_mx_domain(),
        {"192.0.2.1": Peer(starttls=[cert_der("evil.example")])},
        insecure_mx_policy="encrypt",
    )
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@hosted.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.transport.verbs() == FULL_TRANSACTION
    (line,) = attempt_lines(caplog)
    assert " tls=encrypted(TLSv1.3 TLS_AES_256_GCM_SHA384) dane=none reason=insecure_mx " in line
    assert (
        w.sample("dane_relay_dane_verifications_total", result="failed", reason="mismatch") is None
    )
    assert w.sample("dane_relay_outbound_tls_total", level="encrypted") == 1


async def test_insecure_mx_policy_encrypt_defers_a_host_without_starttls() -> None:
    w = world(
        insecure_mx_domain(),
        {"192.0.2.1": Peer(extensions=frozenset({"size"}))},
        insecure_mx_policy="encrypt",
    )
    (r,) = await w.deliver("rcpt@hosted.example")
    assert (r.outcome, r.reply.code, r.reply.enhanced, r.reason) == (
        Outcome.DEFERRED,
        451,
        "4.7.4",
        "tls_not_offered",
    )
    assert w.transport.verbs() == ["CONNECT", "EHLO", "QUIT", "ABORT"]


async def test_insecure_mx_policy_may_delivers_in_plaintext_when_starttls_is_missing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = world(
        insecure_mx_domain(),
        {"192.0.2.1": Peer(extensions=frozenset({"size"}))},
        insecure_mx_policy="may",
    )
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@hosted.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.transport.verbs() == ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    (line,) = attempt_lines(caplog)
    assert " dnssec=mx-insecure tls=none dane=none reason=insecure_mx " in line
    assert w.sample("dane_relay_outbound_tls_total", level="none") == 1


async def test_dane_only_ignores_insecure_mx_policy_and_requires_dane() -> None:
    w = world(
        insecure_mx_domain(),
        {"192.0.2.1": Peer(starttls=[cert_der("evil.example")])},
        level="dane-only",
        insecure_mx_policy="may",
    )
    (r,) = await w.deliver("rcpt@hosted.example")
    assert (r.outcome, r.reply.enhanced, r.reason) == (
        Outcome.DEFERRED,
        "4.7.5",
        "dane_verification",
    )
    assert "MAIL" not in w.transport.verbs()


def two_mx_domain() -> FakeResolver:
    resolver = FakeResolver()
    resolver.domain(
        "secure.example",
        (10, "mx1.secure.example", "192.0.2.1"),
        (20, "mx2.secure.example", "192.0.2.2"),
    )
    resolver.tlsa_answers["_25._tcp.mx1.secure.example"] = DnsTempFail("SERVFAIL", kind="bogus")
    resolver.set_tlsa("mx2.secure.example", tlsa_3_1_1(cert_der("mx2.secure.example")))
    return resolver


async def test_tlsa_lookup_failure_skips_the_host_and_the_next_mx_delivers_with_dane(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = world(
        two_mx_domain(),
        {
            "192.0.2.1": Peer(extensions=frozenset()),  # plaintext, were it ever contacted
            "192.0.2.2": Peer(starttls=[cert_der("mx2.secure.example")]),
        },
    )
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@secure.example")
    assert r == result(
        "rcpt@secure.example", Outcome.DELIVERED, QUEUED, "mx2.secure.example[192.0.2.2]:25", "sent"
    )
    assert w.transport.connections() == ["192.0.2.2"]
    assert w.transport.verbs() == FULL_TRANSACTION
    assert w.resolver.calls == [
        ("MX", "secure.example"),
        ("A/AAAA", "mx1.secure.example"),
        ("TLSA", "_25._tcp.mx1.secure.example"),
        ("A/AAAA", "mx2.secure.example"),
        ("TLSA", "_25._tcp.mx2.secure.example"),
    ]
    skipped, sent = attempt_lines(caplog)
    assert "relay=mx1.secure.example[-] dnssec=secure tls=none dane=fail reason=tlsa_lookup" in (
        skipped
    )
    assert 'status=deferred reply="451 4.7.5 TLSA lookup error for mx1.secure.example:25"' in (
        skipped
    )
    assert "relay=mx2.secure.example[192.0.2.2]:25 dnssec=secure tls=verified(" in sent
    assert w.sample("dane_relay_dane_verifications_total", result="verified", reason="match") == 1
    assert w.sample("dane_relay_delivery_attempts_total", result="delivered", reason="sent") == 1
    assert (
        w.sample("dane_relay_delivery_attempts_total", result="deferred", reason="tlsa_lookup")
        is None
    )


async def test_every_host_failing_its_tlsa_lookup_defers_4_7_5_without_connecting() -> None:
    resolver = two_mx_domain()
    resolver.tlsa_answers["_25._tcp.mx2.secure.example"] = DnsTempFail("timeout", kind="timeout")
    w = world(resolver, {"192.0.2.1": Peer(), "192.0.2.2": Peer()})
    results = await w.deliver("a@secure.example", "b@secure.example")
    assert [(r.outcome, r.reply, r.relay, r.reason) for r in results] == [
        (
            Outcome.DEFERRED,
            SmtpReply(451, "4.7.5", "TLSA lookup error for mx2.secure.example:25"),
            "mx2.secure.example[-]",
            "tlsa_lookup",
        )
    ] * 2
    assert w.transport.log == []
    assert (
        w.sample("dane_relay_delivery_attempts_total", result="deferred", reason="tlsa_lookup") == 2
    )


async def test_non_validating_resolver_reduces_dane_to_opportunistic_tls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RFC 7672 §2.1: without a validating resolver nothing is secure; dane becomes may."""
    status = ResolverStatus(validating=False, detail="probe . DNSKEY came back without AD")
    w = world(
        secure_domain(),
        {"192.0.2.1": Peer(starttls=[cert_der("attacker.example")])},
        resolver_status=status,
    )
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.resolver.tlsa_lookups() == []
    assert w.transport.verbs() == FULL_TRANSACTION
    (line,) = attempt_lines(caplog)
    assert (
        " dnssec=unvalidated tls=encrypted(TLSv1.3 TLS_AES_256_GCM_SHA384) "
        "dane=none reason=addresses_insecure " in line
    )
    assert (
        w.sample("dane_relay_dane_verifications_total", result="failed", reason="mismatch") is None
    )

    # The status is read at each delivery: once the resolver validates, DANE is enforced.
    status.validating = True
    (r2,) = await w.deliver("rcpt@secure.example")
    assert (r2.outcome, r2.reason) == (Outcome.DEFERRED, "dane_verification")
    assert w.resolver.tlsa_lookups() == ["_25._tcp.mx1.secure.example"]


async def test_non_validating_resolver_defers_dane_only_without_connecting() -> None:
    w = world(
        secure_domain(),
        {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")])},
        level="dane-only",
        resolver_status=ResolverStatus(validating=False),
    )
    (r,) = await w.deliver("rcpt@secure.example")
    assert (r.outcome, r.reply.code, r.reply.enhanced, r.reason) == (
        Outcome.DEFERRED,
        451,
        "4.7.5",
        "dane_required",
    )
    assert r.reply.text == ("DANE required, but no usable TLSA records for mx1.secure.example:25")
    assert w.resolver.tlsa_lookups() == []
    assert w.transport.log == []


async def test_one_failed_address_family_is_logged_and_the_other_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resolver = secure_domain()
    resolver.address_answers["mx1.secure.example"] = DnsAnswer(
        "mx1.secure.example", AnswerKind.DATA, Security.SECURE, ("192.0.2.1",), failed=("AAAA",)
    )
    w = world(resolver, {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")])})
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DELIVERED
    (line,) = attempt_lines(caplog)
    assert " dnssec=secure dns=partial failed=AAAA tls=verified(" in line
    assert " dane=pass reason=match " in line


async def test_malformed_record_beside_a_usable_one_is_counted_and_dane_applies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    records = [TlsaRecord(3, 1, 1, b"\x05" * 20), tlsa_3_1_1(cert_der("mx1.secure.example"))]
    w = world(
        secure_domain(tlsa=records), {"192.0.2.1": Peer(starttls=[cert_der("mx1.secure.example")])}
    )
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.sample("dane_relay_tlsa_malformed_records_total") == 1
    assert w.sample("dane_relay_dane_verifications_total", result="verified", reason="match") == 1
    assert any(
        "dane=malformed-tlsa records=3 1 1 0505050505050505… usable_left=1" in rec.getMessage()
        for rec in caplog.records
    )


async def test_a_huge_malformed_rrset_is_counted_in_full_but_logged_briefly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # F6: a hostile RRset of thousands of bad records gives one short line, not a huge one.
    records = [TlsaRecord(3, 1, 1, i.to_bytes(2, "big") * 10) for i in range(4000)]
    w = world(secure_domain(tlsa=records), {"192.0.2.1": Peer()})
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@secure.example")
    assert r.outcome is Outcome.DEFERRED
    assert w.sample("dane_relay_tlsa_malformed_records_total") == 4000
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert warnings == [
        "queue_id=0123456789ABCDEF01234 host=mx1.secure.example dane=malformed-tlsa "
        "records=3 1 1 0000000000000000…,3 1 1 0001000100010001…,3 1 1 0002000200020002…,"
        "+3997 more usable_left=0"
    ]


async def test_a_skipped_host_is_logged_without_the_previous_hosts_tls_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resolver = FakeResolver()
    resolver.domain(
        "secure.example",
        (10, "mx1.secure.example", "192.0.2.1"),
        (20, "mx2.secure.example", "192.0.2.2"),
    )
    resolver.set_tlsa("mx1.secure.example", tlsa_3_1_1(cert_der("mx1.secure.example")))
    resolver.address_answers["mx2.secure.example"] = DnsTempFail(
        "DNS lookup of mx2.secure.example/A timed out", kind="timeout"
    )
    w = world(resolver, {"192.0.2.1": Peer(starttls=[cert_der("evil.example")])})
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@secure.example")
    assert (r.outcome, str(r.reply), r.relay, r.reason) == (
        Outcome.DEFERRED,
        "451 4.4.3 DNS lookup of mx2.secure.example/A timed out",
        "mx2.secure.example[-]",
        "dns",
    )
    first, second = attempt_lines(caplog)
    assert " dnssec=secure tls=none dane=fail reason=no-match " in first
    assert "relay=mx2.secure.example[-] dnssec=secure tls=none dane=none delay=" in second
    assert second.endswith(" error=dns")


# -- caps on MX hosts and connection attempts (F3; Postfix smtp_mx_address_limit) ----------------


def many_hosts(hosts: int, addresses: int, *, failing_lookups: bool = False) -> FakeResolver:
    """plain.example with `hosts` MX hosts (preferences 1..hosts) of `addresses` addresses."""
    resolver = FakeResolver()
    names = [f"mx{h}.plain.example" for h in range(1, hosts + 1)]
    resolver.mx_answers["plain.example"] = answer(
        "plain.example", *(MxRecord(h, name) for h, name in enumerate(names, 1))
    )
    for h, name in enumerate(names, 1):
        resolver.address_answers[name] = (
            DnsTempFail(f"SERVFAIL for {name}", kind="servfail")
            if failing_lookups
            else answer(
                name,
                *(f"10.{h}.{a // 256}.{a % 256}" for a in range(addresses)),
                security=Security.INSECURE,
            )
        )
    return resolver


def refusing(resolver: FakeResolver) -> dict[str, Peer | list[Peer]]:
    refused = Peer(connect_error=ConnectFailed("refused", scope=Scope.HOST))
    return {
        address: refused
        for value in resolver.address_answers.values()
        if isinstance(value, DnsAnswer)
        for address in value.records
        if isinstance(address, str)
    }


def address_lookups(resolver: FakeResolver) -> list[str]:
    return [name for rrtype, name in resolver.calls if rrtype == "A/AAAA"]


async def test_twenty_hosts_of_sixty_addresses_cost_five_connection_attempts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resolver = many_hosts(20, 60)
    w = world(resolver, refusing(resolver))
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@plain.example")
    assert MAX_CONNECTIONS_PER_DOMAIN == 5
    assert r.outcome is Outcome.DEFERRED
    assert w.transport.connections() == [f"10.1.0.{a}" for a in range(5)]
    # The attempts ran out on the first host: no other host was even looked up.
    assert address_lookups(resolver) == ["mx1.plain.example"]
    assert any(
        "domain=plain.example connection limit reached: 5 attempts made; 55 address(es) and "
        "9 MX host(s) not tried (limit 5)" in rec.getMessage()
        for rec in caplog.records
    )
    assert any(
        "domain=plain.example mx_hosts=20 considered=10: the least preferred MX hosts are not "
        "tried (limit 10)" in rec.getMessage()
        for rec in caplog.records
    )


async def test_one_address_per_host_stops_after_five_hosts() -> None:
    resolver = many_hosts(20, 1)
    w = world(resolver, refusing(resolver))
    (r,) = await w.deliver("rcpt@plain.example")
    assert r.outcome is Outcome.DEFERRED
    assert (r.reply.code, r.reason) == (451, "connect")
    assert w.transport.connections() == [f"10.{h}.0.0" for h in range(1, 6)]
    assert address_lookups(resolver) == [f"mx{h}.plain.example" for h in range(1, 6)]


async def test_attempts_are_shared_across_hosts_and_the_fifth_can_deliver() -> None:
    resolver = many_hosts(3, 2)
    peers = refusing(resolver)
    peers["10.3.0.0"] = Peer()
    w = world(resolver, peers)
    (r,) = await w.deliver("rcpt@plain.example")
    assert r.outcome is Outcome.DELIVERED
    assert r.relay == "mx3.plain.example[10.3.0.0]:25"
    assert w.transport.connections() == ["10.1.0.0", "10.1.0.1", "10.2.0.0", "10.2.0.1", "10.3.0.0"]


async def test_hosts_without_connections_are_looked_up_at_most_ten() -> None:
    # Failed address lookups use no connection attempts, so the host cap bounds the lookups.
    resolver = many_hosts(3000, 1, failing_lookups=True)
    w = world(resolver)
    (r,) = await w.deliver("rcpt@plain.example")
    assert r.outcome is Outcome.DEFERRED
    assert w.transport.connections() == []
    assert address_lookups(resolver) == [f"mx{h}.plain.example" for h in range(1, 11)]
    assert len(resolver.calls) == 1 + MAX_MX_HOSTS


# -- configured limits, address preference and timeouts (issue 5 items 3 and 4) ---------------


def configured(
    resolver: FakeResolver, peers: dict[str, Peer | list[Peer]], **delivery: Any
) -> World:
    """A world whose EngineSettings come from a [delivery] section, as relay.app builds them."""
    cfg = parse_config({"delivery": delivery}, Path("relay.toml"))
    return world(resolver, peers, settings=engine_settings(cfg, "relay.example.net"))


async def test_mx_address_limit_two_makes_exactly_two_connection_attempts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resolver = many_hosts(3, 2)
    w = configured(resolver, refusing(resolver), mx_address_limit=2)
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        (r,) = await w.deliver("rcpt@plain.example")
    assert r.outcome is Outcome.DEFERRED
    assert w.transport.connections() == ["10.1.0.0", "10.1.0.1"]
    assert address_lookups(resolver) == ["mx1.plain.example"]
    assert any(
        "connection limit reached: 2 attempts made; 0 address(es) and 2 MX host(s) not tried "
        "(limit 2)" in rec.getMessage()
        for rec in caplog.records
    )


async def test_mx_host_limit_bounds_the_hosts_looked_up() -> None:
    resolver = many_hosts(20, 1, failing_lookups=True)
    w = configured(resolver, {}, mx_host_limit=3)
    (r,) = await w.deliver("rcpt@plain.example")
    assert r.outcome is Outcome.DEFERRED
    assert address_lookups(resolver) == [f"mx{h}.plain.example" for h in range(1, 4)]


def dual_stack() -> FakeResolver:
    """plain.example: one MX host with an A and an AAAA address (A first, as the resolver)."""
    resolver = FakeResolver()
    resolver.mx_answers["plain.example"] = answer("plain.example", MxRecord(10, "mx.plain.example"))
    resolver.address_answers["mx.plain.example"] = answer(
        "mx.plain.example", "192.0.2.1", "2001:db8::1", security=Security.INSECURE
    )
    return resolver


@pytest.mark.parametrize(
    ("preference", "first"),
    [("ipv6", "2001:db8::1"), ("any", "192.0.2.1"), ("ipv4", "192.0.2.1")],
)
async def test_address_preference_orders_the_addresses_tried(preference: str, first: str) -> None:
    peers: dict[str, Peer | list[Peer]] = {
        "192.0.2.1": Peer(extensions=frozenset()),
        "2001:db8::1": Peer(extensions=frozenset()),
    }
    w = configured(dual_stack(), peers, address_preference=preference)
    (r,) = await w.deliver("rcpt@plain.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.transport.connections() == [first]
    assert r.relay == f"mx.plain.example[{first}]:25"


async def test_ipv6_preference_falls_back_to_the_a_address() -> None:
    refused = Peer(connect_error=ConnectFailed("refused", scope=Scope.HOST))
    peers: dict[str, Peer | list[Peer]] = {
        "2001:db8::1": refused,
        "192.0.2.1": Peer(extensions=frozenset()),
    }
    w = configured(dual_stack(), peers, address_preference="ipv6")
    (r,) = await w.deliver("rcpt@plain.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.transport.connections() == ["2001:db8::1", "192.0.2.1"]


async def test_configured_rcpt_timeout_reaches_the_read_of_each_rcpt_reply() -> None:
    resolver = FakeResolver()
    resolver.domain(
        "plain.example", (10, "mx.plain.example", "192.0.2.9"), address_security=Security.INSECURE
    )
    w = configured(
        resolver,
        {"192.0.2.9": Peer(extensions=frozenset())},
        rcpt_timeout="7s",
        mail_timeout="2m",
        data_init_timeout=30,
        data_done_timeout="15m",
    )
    results = await w.deliver("a@plain.example", "b@plain.example")
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 2
    assert w.transport.read_timeouts == [
        (Phase.MAIL, 120.0),
        (Phase.RCPT, 7.0),
        (Phase.RCPT, 7.0),
        (Phase.DATA, 30.0),
        (Phase.DATA_END, 900.0),
    ]


async def test_without_configured_timeouts_the_rfc_5321_values_apply() -> None:
    resolver = FakeResolver()
    resolver.domain(
        "plain.example", (10, "mx.plain.example", "192.0.2.9"), address_security=Security.INSECURE
    )
    w = world(resolver, {"192.0.2.9": Peer(extensions=frozenset())})
    (r,) = await w.deliver("a@plain.example")
    assert r.outcome is Outcome.DELIVERED
    assert w.transport.read_timeouts == [
        (phase, TIMEOUTS[phase]) for phase in (Phase.MAIL, Phase.RCPT, Phase.DATA, Phase.DATA_END)
    ]


async def test_unusable_tlsa_at_dane_only_is_counted_as_dane_required_only() -> None:
    # RFC 7672 §6 (dane-only): nothing usable means the host is skipped, not encrypt-only.
    w = world(
        secure_domain(tlsa=UNUSABLE),
        {"192.0.2.1": Peer(starttls=[cert_der("anything.example")])},
        level="dane-only",
    )
    (r,) = await w.deliver("rcpt@secure.example")
    assert (r.outcome, r.reason) == (Outcome.DEFERRED, "dane_required")
    assert w.transport.verbs() == []
    assert (
        w.sample("dane_relay_dane_verifications_total", result="failed", reason="dane-required")
        == 1
    )
    assert (
        w.sample(
            "dane_relay_dane_verifications_total", result="unauthenticated", reason="unusable-tlsa"
        )
        is None
    )
    assert w.sample("dane_relay_delivery_attempts_by_tls_total", result="deferred", tls="none") == 1
