"""Domain names on their way into DNS and TLS, seen from a DNS server on loopback.

The real `DnsResolver` asks `lab.scripted_dns.ScriptedDns`; every test asserts which names
reached the server (and which never did). The adversarial findings each become a test:

F1   straße.de is looked up as xn--strae-oqa.de (IDNA 2008), never strasse.de; a soft hyphen,
     a zero-width joiner or a presentation escape is refused without any query, never looked
     up as paypal.de / example.de.
F7   names that can never resolve (a 64-octet label, empty labels, > 253 octets) are refused
     without a query.

Then end to end, as tests/component/test_dns_faults.py does: the real `DeliveryEngine` and
`SmtpTransport` deliver to STARTTLS receivers on 127.0.0.21-23 whose TLSA records are DANE-EE
digests of their own certificates:

F1   u@straße.de (SMTPUTF8) reaches straße.de's MX with DANE; strasse.de is never asked.
F1/F7  the refused names bounce 550 5.1.2 "Bad destination domain syntax" at once, with no
     DNS query and no connection.
F10  u@[192.0.2.1] bounces 5.1.2 with a clear reason; an MX "10 192.0.2.1." alone defers
     451 4.4.4 "MX target is not a host name".
F4   an MX target with \\001 octets (or an IP literal, or "_") is skipped before any lookup and
     the backup MX receives the mail; a server name that cannot be sent as SNI is a
     TlsHandshakeFailed (host scope), never an internal error.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from lab.certs import CA, Leaf, make_ca
from lab.receivers import Receiver
from lab.scenarios import MxHost as LabMxHost
from lab.scripted_dns import Answer, NoData, ScriptedDns

from relay.config import DnsConfig
from relay.delivery.engine import DeliveryEngine, EngineSettings
from relay.delivery.tls import client_context
from relay.delivery.transport import OutboundSession, SmtpTransport
from relay.errors import DnsTempFail, Scope, TlsHandshakeFailed
from relay.lookup.resolver import DnsResolver
from relay.lookup.results import AnswerKind, MxRecord
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult
from relay.smtp.reply import SmtpReply

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

IDN = "straße.de"
IDN_ASCII = "xn--strae-oqa.de"
DIGEST = bytes(range(32))

# (name given to the resolver, the name IDNA 2003 / dnspython escapes would have asked for)
NEVER_ASKED = [
    ("pay\u00adpal.de", "paypal.de"),  # F1: soft hyphen, deleted by IDNA 2003
    ("pay\u200dpal.de", "paypal.de"),  # F1: zero-width joiner, deleted by IDNA 2003
    ("exampl\\101.de", "example.de"),  # F1: RFC 1035 §5.1 escape of "e"
    ("a..b.test", "a.b.test"),  # F7
    ("a" * 64 + ".test", "a" * 63 + ".test"),  # F7
    (".".join(["a" * 63] * 4), "a.test"),  # F7: 255 octets
]


def asked(server: ScriptedDns, name: str) -> int:
    """Queries the server received for `name`, of any type, over UDP or TCP."""
    return sum(n for (qname, _, _), n in server.queries.items() if qname == name)


def resolver_for(server: ScriptedDns) -> DnsResolver:
    return DnsResolver(DnsConfig(resolvers=(server.endpoint,), timeout=0.5))


async def test_idn_is_looked_up_by_its_idna_2008_a_label(server: ScriptedDns) -> None:
    """F1, RFC 5891: straße.de is xn--strae-oqa.de; strasse.de is another domain."""
    server.answer(IDN_ASCII, "MX", f"10 mx.{IDN_ASCII}.")
    server.answer("strasse.de", "MX", "10 mx.strasse.de.")
    answer = await resolver_for(server).mx(IDN)
    assert answer.kind is AnswerKind.DATA
    assert answer.records == (MxRecord(10, f"mx.{IDN_ASCII}"),)
    assert server.count(IDN_ASCII, "MX") == 1
    assert asked(server, "strasse.de") == 0
    assert server.queries == Counter({(IDN_ASCII, "MX", "udp"): 1})


async def test_idn_host_and_tlsa_names_use_the_a_label(server: ScriptedDns) -> None:
    server.answer(f"mx.{IDN_ASCII}", "A", "192.0.2.25")
    server.nodata(f"mx.{IDN_ASCII}", "AAAA")
    server.answer(f"_25._tcp.mx.{IDN_ASCII}", "TLSA", f"3 1 1 {DIGEST.hex()}")
    resolver = resolver_for(server)
    assert (await resolver.addresses(f"mx.{IDN}")).records == ("192.0.2.25",)
    assert (await resolver.tlsa(f"mx.{IDN}", 25)).kind is AnswerKind.DATA
    assert server.count(f"mx.{IDN_ASCII}", "A") == 1
    assert server.count(f"_25._tcp.mx.{IDN_ASCII}", "TLSA") == 1
    assert asked(server, "mx.strasse.de") == asked(server, "_25._tcp.mx.strasse.de") == 0


@pytest.mark.parametrize(("name", "confused_with"), NEVER_ASKED)
async def test_names_that_are_not_dns_names_fail_without_a_query(
    server: ScriptedDns, name: str, confused_with: str
) -> None:
    """The resolver's last line of defence: DnsTempFail kind "error", nothing sent."""
    server.answer(confused_with, "MX", f"10 mx.{confused_with}.")
    server.answer(confused_with, "A", "192.0.2.1")
    server.script(confused_with, "AAAA", NoData())
    resolver = resolver_for(server)
    for lookup in (resolver.mx(name), resolver.addresses(name), resolver.tlsa(name, 25)):
        with pytest.raises(DnsTempFail) as info:
            await lookup
        assert info.value.kind == "error"
        assert "not a DNS name" in info.value.reply.text
        assert info.value.reply.text.isascii()
    assert server.queries == Counter()


async def test_tlsa_owner_names_keep_their_service_labels(server: ScriptedDns) -> None:
    """RFC 7672 §2.2.3: "_" is allowed where the owner name needs it."""
    server.script("_25._tcp.mx.example.test", "TLSA", Answer([f"3 1 1 {DIGEST.hex()}"]))
    answer = await resolver_for(server).tlsa("MX.Example.Test", 25)
    assert answer.kind is AnswerKind.DATA
    assert server.count("_25._tcp.mx.example.test", "TLSA") == 1


# -- end to end: ScriptedDns -> DnsResolver -> DeliveryEngine -> SmtpTransport -> receivers ------

RIGHT = f"mx.{IDN_ASCII}"  # the MX of straße.de
WRONG = "mx.strasse.de"  # the MX of strasse.de, paypal.de, example.de: must never be used
BACKUP = "backup.broken-mx.test"
ADDRESS = {RIGHT: "127.0.0.21", WRONG: "127.0.0.22", BACKUP: "127.0.0.23"}
SENDER = "alice@origin.test"
BODY = b"From: alice@origin.test\r\nSubject: names\r\n\r\nhello\r\n"
RECEIVED_250 = SmtpReply(250, "2.0.0", "OK received by lab")
# MX targets that are not host names (F4: octets shown as escapes; F10: an IP literal).
BAD_TARGETS = ["\\001\\001.broken-mx.test", "192.0.2.1", "mx_1.broken-mx.test"]


@functools.cache
def lab_ca() -> CA:
    return make_ca("Domain Names Test CA")


@functools.cache
def leaf(host: str) -> Leaf:
    return lab_ca().issue([host])


def good_zone(dns_server: ScriptedDns) -> None:
    """straße.de's MX, strasse.de's MX (the wrong one), and a secure host for each MX."""
    dns_server.answer(IDN_ASCII, "MX", f"10 {RIGHT}.")
    for confused in ("strasse.de", "paypal.de", "example.de", "a.b.test"):
        dns_server.answer(confused, "MX", f"10 {WRONG}.")
    for host, address in ADDRESS.items():
        dns_server.answer(host, "A", address)
        dns_server.nodata(host, "AAAA")
        tlsa = f"3 1 1 {leaf(host).tlsa_data(1, 1).hex()}"  # RFC 7672 §3.1.1 DANE-EE
        dns_server.answer(f"_25._tcp.{host}", "TLSA", tlsa)
    # If a malformed MX target were looked up, it would lead to the wrong receiver.
    for target in BAD_TARGETS:
        dns_server.answer(target, "A", ADDRESS[WRONG])
        dns_server.nodata(target, "AAAA")


def _free_shared_port(addresses: tuple[str, ...]) -> int:
    """A TCP port that is free on every one of `addresses` right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for address in addresses:
                with socket.socket() as s:
                    s.bind((address, port))
        except OSError:
            continue
        return port
    raise OSError(f"no TCP port free on all of {addresses}")


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[tuple[int, dict[str, Receiver]]]:
    """One STARTTLS receiver per MX host, each on its own loopback address, one port."""
    for _ in range(5):
        port = _free_shared_port(tuple(ADDRESS.values()))
        started: dict[str, Receiver] = {}
        try:
            for host, address in ADDRESS.items():
                mx = LabMxHost(host, address, port, leaf(host), True, f"_25._tcp.{host}", ())
                started[host] = Receiver(mx, tmp_path).start()
        except Exception:  # the port was taken in the meantime: try another one
            for receiver in started.values():
                receiver.stop()
            continue
        try:
            yield port, started
        finally:
            for receiver in started.values():
                receiver.stop()
        return
    raise OSError("could not start the receivers on a shared port")


@dataclass
class Lab:
    dns: ScriptedDns
    receivers: dict[str, Receiver]
    port: int
    metrics: Metrics

    async def deliver(self, rcpt: str, *, smtputf8: bool = False) -> RecipientResult:
        (result,) = await self.deliver_all([rcpt], smtputf8=smtputf8)
        return result

    async def deliver_all(
        self, rcpts: list[str], *, smtputf8: bool = False
    ) -> list[RecipientResult]:
        engine = DeliveryEngine(
            DnsResolver(DnsConfig(resolvers=(self.dns.endpoint,), timeout=0.5)),
            SmtpTransport("relay.origin.test", 5.0, 10.0),
            client_context(),
            EngineSettings(level="dane", helo_name="relay.origin.test", port=self.port),
            self.metrics,
        )
        return await engine.deliver(
            "4NAMES", SENDER, rcpts, BODY, received=time.time(), smtputf8=smtputf8
        )

    def relay(self, host: str) -> str:
        return f"{host}[{ADDRESS[host]}]:{self.port}"

    def attempts(self, result: str, reason: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "dane_relay_delivery_attempts_total", {"result": result, "reason": reason}
        )

    def untouched(self, *hosts: str) -> bool:
        return all(
            not (self.receivers[h].messages or self.receivers[h].server_names) for h in hosts
        )


@pytest_asyncio.fixture
async def lab(receivers: tuple[int, dict[str, Receiver]]) -> AsyncIterator[Lab]:
    port, started = receivers
    async with ScriptedDns("127.0.0.1") as dns_server:
        good_zone(dns_server)
        yield Lab(dns_server, started, port, Metrics())
        assert dns_server.errors == []


def no_internal_error(caplog: pytest.LogCaptureFixture) -> bool:
    return not any("internal error" in r.getMessage() for r in caplog.records)


async def test_idn_recipient_is_delivered_to_the_idn_domain_mx_with_dane(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    """F1: RCPT TO:<u@straße.de> (SMTPUTF8) goes to xn--strae-oqa.de's MX, never strasse.de's."""
    rcpt = f"u@{IDN}"
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        result = await lab.deliver(rcpt, smtputf8=True)
    assert result == RecipientResult(
        rcpt, Outcome.DELIVERED, RECEIVED_250, lab.relay(RIGHT), "sent"
    )
    (message,) = lab.receivers[RIGHT].messages
    assert (message.rcpt_tos, message.tls) == ((rcpt,), True)  # RFC 6531: the address as given
    # RFC 7672 §8.1: SNI is the TLSA base domain, in A-label form.
    assert lab.receivers[RIGHT].server_names == [RIGHT]
    assert lab.untouched(WRONG, BACKUP)
    assert lab.dns.count(IDN_ASCII, "MX") == 1
    assert asked(lab.dns, "strasse.de") == asked(lab.dns, WRONG) == 0
    assert (
        lab.metrics.registry.get_sample_value(
            "dane_relay_dane_verifications_total", {"result": "verified", "reason": "match"}
        )
        == 1
    )
    assert no_internal_error(caplog)


async def test_u_label_and_a_label_recipients_share_one_transaction(lab: Lab) -> None:
    # RFC 5891: "straße.de" and "xn--strae-oqa.de" are the same domain: one MX lookup, one
    # SMTP transaction carrying both recipients.
    rcpts = [f"u@{IDN}", f"v@{IDN_ASCII}"]
    results = await lab.deliver_all(rcpts, smtputf8=True)
    assert [(r.recipient, r.outcome) for r in results] == [
        (rcpts[0], Outcome.DELIVERED),
        (rcpts[1], Outcome.DELIVERED),
    ]
    (message,) = lab.receivers[RIGHT].messages
    assert message.rcpt_tos == tuple(rcpts)
    assert lab.dns.count(IDN_ASCII, "MX") == 1


@pytest.mark.parametrize(
    ("domain", "text"),
    [
        ("pay\u00adpal.de", "label 'pay\\xadpal' is not valid IDNA 2008"),  # F1: soft hyphen
        ("pay\u200dpal.de", "label 'pay\\u200dpal' is not valid IDNA 2008"),  # F1: ZWJ
        ("exampl\\101.de", "'exampl\\101.de' contains a backslash escape"),  # F1: escape
        ("a" * 64 + ".test", "label longer than 63 octets (64)"),  # F7
        ("a..b.test", "empty label"),  # F7
        (".".join(["a" * 63] * 4), "name longer than 253 octets (255)"),  # F7
    ],
)
async def test_bad_domain_syntax_bounces_5_1_2_without_dns_or_connection(
    lab: Lab, domain: str, text: str
) -> None:
    """F1, F7: a domain that can never resolve bounces at once (not 5 days of retries) and is
    never looked up as the domain IDNA 2003 or an escape would have made of it."""
    rcpt = f"u@{domain}"
    result = await lab.deliver(rcpt, smtputf8=not rcpt.isascii())
    assert (result.recipient, result.outcome, result.relay, result.reason) == (
        rcpt,
        Outcome.BOUNCED,
        "none",
        "bad_domain",
    )
    assert (result.reply.code, result.reply.enhanced) == (550, "5.1.2")
    assert result.reply.text.startswith(f"Bad destination domain syntax: {text}")
    assert result.reply.text.isascii()  # safe in a DSN (RFC 3464 §2.3.6)
    assert lab.dns.queries == Counter()
    assert lab.untouched(RIGHT, WRONG, BACKUP)
    assert lab.attempts("bounced", "bad_domain") == 1


async def test_address_literal_recipient_bounces_with_a_clear_reason(lab: Lab) -> None:
    """F10: u@[192.0.2.1] is not routed by MX (RFC 5321 §4.1.3; DANE needs a name)."""
    result = await lab.deliver("u@[192.0.2.1]")
    assert result.outcome is Outcome.BOUNCED
    assert str(result.reply) == (
        "550 5.1.2 Bad destination domain: '[192.0.2.1]' is an address literal, not a domain "
        "name; mail is routed by MX only"
    )
    assert lab.dns.queries == Counter()
    assert lab.untouched(RIGHT, WRONG, BACKUP)


@pytest.mark.parametrize("target", BAD_TARGETS)
async def test_malformed_mx_target_is_skipped_and_the_backup_mx_gets_the_mail(
    lab: Lab, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    """F4, F10: the bad MX is skipped with a clear reason; the backup MX receives the mail
    with DANE; no lookup of, connection to or SNI for the bad name; no internal error."""
    lab.dns.answer("broken-mx.test", "MX", f"10 {target}.", f"20 {BACKUP}.")
    rcpt = "bob@broken-mx.test"
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        result = await lab.deliver(rcpt)
    assert result == RecipientResult(
        rcpt, Outcome.DELIVERED, RECEIVED_250, lab.relay(BACKUP), "sent"
    )
    assert lab.receivers[BACKUP].server_names == [BACKUP]
    assert lab.untouched(RIGHT, WRONG)
    assert asked(lab.dns, target) == 0
    skipped = [r.getMessage() for r in caplog.records if " status=deferred " in r.getMessage()]
    assert len(skipped) == 1
    assert f" relay={target}[-] dnssec=secure tls=none dane=none " in skipped[0]
    assert 'reply="451 4.4.4 MX target is not a host name: ' in skipped[0]
    assert skipped[0].endswith(" error=malformed_mx")
    assert no_internal_error(caplog)


async def test_only_malformed_mx_targets_defer_the_domain_4_4_4(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    """F10: "10 192.0.2.1." alone is a DNS configuration error: defer, with the reason."""
    lab.dns.answer("literal-mx.test", "MX", "10 192.0.2.1.")
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        result = await lab.deliver("bob@literal-mx.test")
    text = "MX target is not a host name: '192.0.2.1' is an IP address, not a domain name"
    reply = SmtpReply(451, "4.4.4", text)
    assert result == RecipientResult(
        "bob@literal-mx.test", Outcome.DEFERRED, reply, "192.0.2.1[-]", "malformed_mx"
    )
    assert asked(lab.dns, "192.0.2.1") == 0
    assert lab.untouched(RIGHT, WRONG, BACKUP)
    assert lab.attempts("deferred", "malformed_mx") == 1
    assert no_internal_error(caplog)


# -- the transport: SNI that cannot be sent is a TLS failure, never an internal error ----------


class _UnencodableNameContext(ssl.SSLContext):
    """A client context whose handshake preparation fails as ssl does for a bad name."""

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        raise UnicodeError("encoding with 'idna' codec failed (UnicodeError: label too long)")


async def _session(lab: Lab, host: str) -> OutboundSession:
    session = await SmtpTransport("relay.origin.test", 5.0, 10.0).open(ADDRESS[host], lab.port)
    assert (await session.ehlo("relay.origin.test")).code == 250
    assert session.supports("starttls")
    return session


@pytest.mark.parametrize("name", ["\\001\\001.test", "a..b.test", "192.0.2.1", "mx\x00.test"])
async def test_sni_that_is_not_a_host_name_is_a_handshake_failure(lab: Lab, name: str) -> None:
    """F4 defence in depth (RFC 7672 §8.1, RFC 6066 §3): refused before STARTTLS is sent."""
    session = await _session(lab, BACKUP)
    with pytest.raises(TlsHandshakeFailed) as info:
        await session.starttls(name, client_context())
    session.abort()
    assert info.value.scope is Scope.HOST
    assert str(info.value.reply).startswith("451 4.7.5 Cannot start TLS: SNI ")
    assert lab.receivers[BACKUP].server_names == []


async def test_failure_preparing_the_handshake_is_a_handshake_failure(lab: Lab) -> None:
    session = await _session(lab, BACKUP)
    context = _UnencodableNameContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(TlsHandshakeFailed) as info:
        await session.starttls(BACKUP, context)
    session.abort()
    assert info.value.scope is Scope.HOST
    assert str(info.value.reply) == (
        "451 4.7.5 Cannot start TLS: cannot prepare the handshake (encoding with 'idna' codec "
        "failed (UnicodeError: label too long))"
    )


async def test_sni_at_a_cname_target_with_a_service_label_is_sent(lab: Lab) -> None:
    """RFC 7672 §2.2.3: the TLSA base domain may be a CNAME target such as _smtp.provider."""
    session = await _session(lab, BACKUP)
    await session.starttls("_smtp.Provider.test", client_context())
    await session.quit()
    assert lab.receivers[BACKUP].server_names == ["_smtp.provider.test"]


async def test_idn_sni_is_sent_as_the_a_label(lab: Lab) -> None:
    """RFC 6066 §3: ssl would encode a U-label with IDNA 2003; the A-label is sent instead."""
    session = await _session(lab, RIGHT)
    await session.starttls(f"mx.{IDN}", client_context())
    await session.quit()
    assert lab.receivers[RIGHT].server_names == [RIGHT]
