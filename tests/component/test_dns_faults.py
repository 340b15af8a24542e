"""Issue 3 acceptance: DNS faults on MX, A, AAAA and TLSA, end to end, with real DANE.

Nothing is faked: the real `DnsResolver` asks `lab.scripted_dns.ScriptedDns` on 127.0.0.1,
the real `DeliveryEngine` plans and decides, and the real `SmtpTransport` (asyncio streams)
talks STARTTLS to lab `Receiver`s (aiosmtpd) on 127.0.0.11-13, all on one port. The TLSA
records are 3 1 1 digests of the receivers' own certificates, so DANE verifies for real.

The domain `faults.test` has two MX hosts (10 mx1, 20 mx2), each with a secure A record, a
secure AAAA NODATA and a correct secure TLSA RRset. The domain also has its own A record
pointing at a third receiver with correct TLSA: the address a relay must never fall back
to when the MX lookup fails (RFC 7672 §2.1, §2.2.1). Each test then faults exactly one
(name, type) and asserts the outcome the RFC asks for:

=========  ==================================  =================================================
faulted    SERVFAIL, bogus, timeout,           truncated over UDP, good answer over TCP
           truncated over UDP and TCP
=========  ==================================  =================================================
MX         defer 451 4.4.3, no connection      delivered via mx1, verified; one TCP query
A (mx1)    mx1 skipped, mx2 verified           delivered via mx1, verified; one TCP query
AAAA(mx1)  mx1 via its A, verified,            delivered via mx1, verified; one TCP query
           logged dns=partial failed=AAAA
TLSA(mx1)  mx1 never contacted, mx2 verified   delivered via mx1, verified; one TCP query
=========  ==================================  =================================================

and: TLSA failing on both hosts defers 451 4.7.5 with no connection at all (levels dane and
dane-only); a CNAME loop at mx1 and a malformed TLSA RRset at mx1 skip mx1 for mx2.

Connections are observed on both sides: the engine's transport is the real one wrapped in a
recorder of every `open()`, and each receiver records MAIL commands, SNI names and messages.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from lab.certs import CA, Leaf, make_ca
from lab.receivers import Receiver
from lab.scenarios import MxHost
from lab.scripted_dns import (
    Answer,
    Cname,
    Drop,
    NoData,
    Reply,
    ScriptedDns,
    ServFail,
    Truncated,
)

from relay.config import DnsConfig
from relay.delivery.engine import DeliveryEngine, EngineSettings
from relay.delivery.tls import client_context
from relay.delivery.transport import OutboundSession, SmtpTransport
from relay.lookup.resolver import DnsResolver
from relay.metrics import Metrics
from relay.model import Outcome, RecipientResult
from relay.smtp.reply import SmtpReply

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

DOMAIN = "faults.test"
MX1 = "mx1.faults.test"
MX2 = "mx2.faults.test"
HOSTS = (MX1, MX2, DOMAIN)  # DOMAIN: the domain's own address, never to be used
ADDRESS = {MX1: "127.0.0.11", MX2: "127.0.0.12", DOMAIN: "127.0.0.13"}
DNS_ADDRESS = "127.0.0.1"
DNS_TIMEOUT = 0.5
SENDER = "alice@origin.test"
RCPT = f"bob@{DOMAIN}"
BODY = b"From: alice@origin.test\r\nTo: bob@faults.test\r\nSubject: faults\r\n\r\nhello\r\n"
RECEIVED_250 = SmtpReply(250, "2.0.0", "OK received by lab")


def tlsa_name(host: str) -> str:
    return f"_25._tcp.{host}"


# -- certificates -------------------------------------------------------------------------------


@functools.cache
def lab_ca() -> CA:
    return make_ca("DNS Faults Test CA")


@functools.cache
def leaf(host: str) -> Leaf:
    return lab_ca().issue([host])


def tlsa_3_1_1(host: str) -> str:
    """RFC 7672 §3.1.1: DANE-EE SPKI SHA2-256 of the receiver's real certificate."""
    return f"3 1 1 {leaf(host).tlsa_data(1, 1).hex()}"


# -- DNS: the good zone, and the faults ----------------------------------------------------------


def good_zone() -> dict[tuple[str, str], Reply]:
    """Every (name, type) the relay may ask, answered securely (AD set)."""
    zone: dict[tuple[str, str], Reply] = {
        (DOMAIN, "MX"): Answer([f"10 {MX1}.", f"20 {MX2}."]),
    }
    for host in HOSTS:
        zone[(host, "A")] = Answer([ADDRESS[host]])
        zone[(host, "AAAA")] = NoData()
        zone[(tlsa_name(host), "TLSA")] = Answer([tlsa_3_1_1(host)])
    return zone


GOOD = good_zone()

# (name, type) each record type of the matrix faults: the domain's MX, mx1's A/AAAA/TLSA.
TARGET = {
    "MX": (DOMAIN, "MX"),
    "A": (MX1, "A"),
    "AAAA": (MX1, "AAAA"),
    "TLSA": (tlsa_name(MX1), "TLSA"),
}

# The faults a retry over TCP cannot fix: the reply, and the DnsTempFail kind it must give.
FAILING: dict[str, tuple[Reply, str]] = {
    "servfail": (ServFail(), "servfail"),
    # RFC 8914 §4.7: EDE 6 "DNSSEC Bogus".
    "bogus-ede6": (ServFail(ede=6, ede_text="signature invalid"), "bogus"),
    "timeout": (Drop(), "timeout"),
    "truncated-udp-tcp": (Truncated(tcp=None), "truncated"),
}

# What the resolver's reply text says for each failing fault (after "<resolver> ").
FAILURE_TEXT = {
    "servfail": "answered SERVFAIL",
    "bogus-ede6": "answered SERVFAIL (EDE 6 (DNSSEC Bogus): signature invalid)",
    "timeout": f"timed out after {DNS_TIMEOUT:.3g}s",
    "truncated-udp-tcp": "truncated over UDP and TCP",
}


def udp_tcp_counts(fault: str) -> tuple[int, int]:
    """(UDP, TCP) queries ScriptedDns sees for one lookup of a name with this fault."""
    # A timed-out query is sent once over UDP: the budget (0.5 s) ends before the
    # retransmission (relay.lookup.exchange.UDP_RETRANSMIT, 1 s).
    return (1, 1) if fault.startswith("truncated") else (1, 0)


# -- the lab -------------------------------------------------------------------------------------


class RecordingTransport:
    """The real SmtpTransport, recording every connection the engine asks it to open."""

    def __init__(self, inner: SmtpTransport) -> None:
        self.inner = inner
        self.opened: list[tuple[str, int]] = []

    async def open(self, address: str, port: int) -> OutboundSession:
        self.opened.append((address, port))
        return await self.inner.open(address, port)


@dataclass
class Lab:
    dns: ScriptedDns
    receivers: dict[str, Receiver]  # by host name (DOMAIN: the domain's own address)
    port: int
    metrics: Metrics
    transport: RecordingTransport

    def fault(self, rrtype: str, reply: Reply) -> None:
        self.dns.script(*TARGET[rrtype], reply)

    async def deliver(self, level: str = "dane") -> RecipientResult:
        engine = DeliveryEngine(
            DnsResolver(
                DnsConfig(resolvers=(self.dns.endpoint,), timeout=DNS_TIMEOUT),
                observer=self.metrics,
            ),
            self.transport,
            client_context(),
            EngineSettings(level=level, helo_name="relay.origin.test", port=self.port),
            self.metrics,
        )
        received = time.time()
        (result,) = await engine.deliver("4FAULTS", SENDER, [RCPT], BODY, received=received)
        return result

    def relay(self, host: str) -> str:
        return f"{host}[{ADDRESS[host]}]:{self.port}"

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def dns_lookups(self, rrtype: str, result: str) -> float | None:
        return self.sample("dane_relay_dns_lookups_total", rrtype=rrtype, result=result)


def _free_shared_port(addresses: tuple[str, ...]) -> int:
    """A TCP port that is free on every one of `addresses` right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
        free = True
        for address in addresses:
            with socket.socket() as s:
                try:
                    s.bind((address, port))
                except OSError:
                    free = False
                    break
        if free:
            return port
    raise OSError(f"no TCP port free on all of {addresses}")


def _start_receivers(certdir: Path) -> tuple[int, dict[str, Receiver]]:
    """One STARTTLS receiver per host, on its own loopback address, all on one port."""
    addresses = tuple(ADDRESS[h] for h in HOSTS)
    for _ in range(5):
        port = _free_shared_port(addresses)
        started: dict[str, Receiver] = {}
        try:
            for host in HOSTS:
                mx = MxHost(host, ADDRESS[host], port, leaf(host), True, tlsa_name(host), ())
                started[host] = Receiver(mx, certdir).start()
        except Exception:  # the port was taken in the meantime: try another one
            for receiver in started.values():
                receiver.stop()
            continue
        return port, started
    raise OSError("could not start the receivers on a shared port")


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[tuple[int, dict[str, Receiver]]]:
    port, started = _start_receivers(tmp_path)
    try:
        yield port, started
    finally:
        for receiver in started.values():
            receiver.stop()


@pytest_asyncio.fixture
async def lab(receivers: tuple[int, dict[str, Receiver]]) -> AsyncIterator[Lab]:
    port, started = receivers
    async with ScriptedDns(DNS_ADDRESS) as dns_server:
        for (name, rrtype), reply in GOOD.items():
            dns_server.script(name, rrtype, reply)
        transport = RecordingTransport(SmtpTransport("relay.origin.test", 5.0, 10.0))
        yield Lab(dns_server, started, port, Metrics(), transport)
        assert dns_server.errors == []


def attempt_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " status=" in r.getMessage()]


# -- shared assertions ---------------------------------------------------------------------------


def assert_delivered_with_dane(
    lab: Lab, result: RecipientResult, host: str, caplog: pytest.LogCaptureFixture
) -> str:
    """Delivered by `host` alone, over TLS, DANE verified against its TLSA records.

    Returns the attempt log line of the delivery.
    """
    assert result == RecipientResult(RCPT, Outcome.DELIVERED, RECEIVED_250, lab.relay(host), "sent")
    (message,) = lab.receivers[host].messages
    assert (message.mail_from, message.rcpt_tos, message.tls) == (SENDER, (RCPT,), True)
    assert message.content == BODY
    # RFC 7672 §8.1: SNI is the TLSA base domain; one handshake, on this host only.
    assert lab.receivers[host].server_names == [host]
    assert lab.receivers[host].mail_commands == [(SENDER, True)]
    for other in HOSTS:
        if other != host:
            assert lab.receivers[other].messages == []
            assert lab.receivers[other].mail_commands == []
            assert lab.receivers[other].server_names == []
    assert lab.sample("dane_relay_dane_verifications_total", result="verified", reason="match") == 1
    assert lab.sample("dane_relay_outbound_tls_total", level="verified") == 1
    assert lab.sample("dane_relay_outbound_tls_total", level="encrypted") is None
    assert lab.sample("dane_relay_outbound_tls_total", level="none") is None
    assert lab.sample("dane_relay_delivery_attempts_total", result="delivered", reason="sent") == 1
    (line,) = [line for line in attempt_lines(caplog) if " status=sent " in line]
    assert f" to=<{RCPT}> relay={lab.relay(host)} dnssec=secure" in line
    assert " tls=verified(TLSv1." in line
    assert " dane=pass reason=match matched=" in line
    assert f" tlsa_base={host} " in line
    return line


def assert_no_receiver_touched(lab: Lab) -> None:
    assert lab.transport.opened == []
    for host in HOSTS:
        assert lab.receivers[host].messages == []
        assert lab.receivers[host].mail_commands == []
        assert lab.receivers[host].server_names == []


# -- the matrix: faults a TCP retry cannot fix ---------------------------------------------------


@pytest.mark.parametrize("fault", sorted(FAILING))
async def test_mx_fault_defers_the_domain_without_connecting(
    lab: Lab, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 7672 §2.1, §2.2.1: a failed MX lookup defers; never the domain's own address."""
    reply, kind = FAILING[fault]
    lab.fault("MX", reply)
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        result = await lab.deliver()

    text = f"DNS lookup of {DOMAIN}/MX failed: {lab.dns.endpoint} {FAILURE_TEXT[fault]}"
    assert result == RecipientResult(
        RCPT, Outcome.DEFERRED, SmtpReply(451, "4.4.3", text), "none", "dns"
    )
    assert_no_receiver_touched(lab)
    # The domain's own address (and anything else) was never even looked up.
    assert lab.dns.count(DOMAIN, "A") == lab.dns.count(DOMAIN, "AAAA") == 0
    udp, tcp = udp_tcp_counts(fault)
    assert (lab.dns.count(DOMAIN, "MX", "udp"), lab.dns.count(DOMAIN, "MX", "tcp")) == (udp, tcp)
    assert sum(lab.dns.queries.values()) == udp + tcp
    assert lab.dns_lookups("MX", kind) == 1
    assert lab.sample("dane_relay_delivery_attempts_total", result="deferred", reason="dns") == 1
    (line,) = attempt_lines(caplog)
    assert " relay=none dnssec=- tls=none dane=none " in line
    assert ' status=deferred reply="451 4.4.3 DNS lookup of faults.test/MX failed: ' in line


@pytest.mark.parametrize("fault", sorted(FAILING))
async def test_a_fault_skips_mx1_and_delivers_via_mx2_with_dane(
    lab: Lab, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 7672 §2.1: a failed address lookup (with AAAA NODATA) makes mx1 unusable."""
    reply, kind = FAILING[fault]
    lab.fault("A", reply)
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        result = await lab.deliver()

    assert_delivered_with_dane(lab, result, MX2, caplog)
    assert lab.transport.opened == [(ADDRESS[MX2], lab.port)]
    udp, tcp = udp_tcp_counts(fault)
    assert (lab.dns.count(MX1, "A", "udp"), lab.dns.count(MX1, "A", "tcp")) == (udp, tcp)
    assert lab.dns.count(MX1, "AAAA") == 1
    # No TLSA lookup for a host without usable addresses.
    assert lab.dns.count(tlsa_name(MX1), "TLSA") == 0
    assert lab.dns.count(tlsa_name(MX2), "TLSA") == 1
    assert lab.dns_lookups("A", kind) == 1
    assert lab.dns_lookups("AAAA", "secure") == 2  # mx1's NODATA and mx2's
    skipped = [line for line in attempt_lines(caplog) if " status=deferred " in line]
    assert len(skipped) == 1
    assert f" relay={MX1}[-] dnssec=secure tls=none dane=none " in skipped[0]
    assert (
        f'reply="451 4.4.3 DNS lookup of {MX1}/A failed: {lab.dns.endpoint} '
        f'{FAILURE_TEXT[fault]}" error=dns'
    ) in skipped[0]


@pytest.mark.parametrize("fault", sorted(FAILING))
async def test_aaaa_fault_delivers_via_mx1_a_record_with_dane(
    lab: Lab, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A secure A answer beside a failed AAAA lookup: mx1 is used with DANE, noted partial."""
    reply, kind = FAILING[fault]
    lab.fault("AAAA", reply)
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        result = await lab.deliver()

    line = assert_delivered_with_dane(lab, result, MX1, caplog)
    assert f" relay={lab.relay(MX1)} dnssec=secure dns=partial failed=AAAA tls=verified(" in line
    assert attempt_lines(caplog) == [line]
    assert lab.transport.opened == [(ADDRESS[MX1], lab.port)]
    udp, tcp = udp_tcp_counts(fault)
    assert (lab.dns.count(MX1, "AAAA", "udp"), lab.dns.count(MX1, "AAAA", "tcp")) == (udp, tcp)
    assert lab.dns.count(tlsa_name(MX1), "TLSA") == 1
    assert lab.dns.count(MX2, "A") == 0
    assert lab.dns_lookups("AAAA", kind) == 1
    assert lab.dns_lookups("TLSA", "secure") == 1


@pytest.mark.parametrize("fault", sorted(FAILING))
async def test_tlsa_fault_never_contacts_mx1_and_delivers_via_mx2_with_dane(
    lab: Lab, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 7672 §2.1, §2.2.3: a failed TLSA lookup is never "no TLSA": mx1 is skipped."""
    reply, kind = FAILING[fault]
    lab.fault("TLSA", reply)
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        result = await lab.deliver()

    assert_delivered_with_dane(lab, result, MX2, caplog)
    assert lab.transport.opened == [(ADDRESS[MX2], lab.port)]
    udp, tcp = udp_tcp_counts(fault)
    name = tlsa_name(MX1)
    assert (lab.dns.count(name, "TLSA", "udp"), lab.dns.count(name, "TLSA", "tcp")) == (udp, tcp)
    assert lab.dns.count(tlsa_name(MX2), "TLSA") == 1
    assert lab.dns_lookups("TLSA", kind) == 1
    assert lab.dns_lookups("TLSA", "secure") == 1  # mx2's
    skipped = [line for line in attempt_lines(caplog) if " status=deferred " in line]
    assert len(skipped) == 1
    assert f" relay={MX1}[-] dnssec=secure tls=none dane=fail reason=tlsa_lookup " in skipped[0]
    assert f'reply="451 4.7.5 TLSA lookup error for {MX1}:25" error=tlsa_lookup' in skipped[0]


# -- the matrix: truncation that TCP fixes -------------------------------------------------------


@pytest.mark.parametrize("rrtype", sorted(TARGET))
async def test_truncation_is_retried_over_tcp_and_delivers_via_mx1(
    lab: Lab, rrtype: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 7766 §5, RFC 1035 §4.2.1: TC over UDP, the full answer over TCP: as if good."""
    name, qtype = TARGET[rrtype]
    lab.fault(rrtype, Truncated(tcp=GOOD[(name, qtype)]))
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        result = await lab.deliver()

    line = assert_delivered_with_dane(lab, result, MX1, caplog)
    assert " dns=partial" not in line
    assert attempt_lines(caplog) == [line]
    assert lab.transport.opened == [(ADDRESS[MX1], lab.port)]
    assert lab.dns.count(name, qtype, "udp") == 1
    assert lab.dns.count(name, qtype, "tcp") == 1
    # Only the truncated question went over TCP.
    assert sum(n for (_, _, via), n in lab.dns.queries.items() if via == "tcp") == 1
    # The TCP retry belongs to the same upstream query: one secure lookup, no failure.
    assert lab.sample("dane_relay_dns_lookups_total", rrtype=qtype, result="truncated") is None
    assert lab.dns_lookups(qtype, "secure") == 1


# -- a TLSA failure never leads to a delivery without DANE --------------------------------------


@pytest.mark.parametrize("level", ["dane", "dane-only"])
@pytest.mark.parametrize("fault", sorted(FAILING))
async def test_tlsa_fault_on_every_host_defers_4_7_5_without_any_connection(
    lab: Lab, fault: str, level: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 7672 §2.1, §2.2.3: no host whose TLSA lookup failed is used, and the domain's
    own address is no fallback: the message stays queued with 4.7.5."""
    reply, kind = FAILING[fault]
    lab.fault("TLSA", reply)
    lab.dns.script(tlsa_name(MX2), "TLSA", reply)
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        result = await lab.deliver(level)

    assert result == RecipientResult(
        RCPT,
        Outcome.DEFERRED,
        SmtpReply(451, "4.7.5", f"TLSA lookup error for {MX2}:25"),
        f"{MX2}[-]",
        "tlsa_lookup",
    )
    assert_no_receiver_touched(lab)
    for host in (MX1, MX2):
        assert lab.dns.count(tlsa_name(host), "TLSA", "udp") == 1
    assert lab.dns.count(DOMAIN, "A") == 0
    assert lab.dns.count(tlsa_name(DOMAIN), "TLSA") == 0
    assert lab.dns_lookups("TLSA", kind) == 2
    assert (
        lab.sample("dane_relay_dane_verifications_total", result="verified", reason="match") is None
    )
    assert (
        lab.sample("dane_relay_delivery_attempts_total", result="deferred", reason="tlsa_lookup")
        == 1
    )
    assert (
        lab.sample("dane_relay_delivery_attempts_total", result="delivered", reason="sent") is None
    )
    lines = attempt_lines(caplog)
    assert len(lines) == 2
    for host, line in zip((MX1, MX2), lines, strict=True):
        assert f" relay={host}[-] dnssec=secure tls=none dane=fail reason=tlsa_lookup " in line
        assert " status=deferred " in line


# -- mx1 broken in other ways --------------------------------------------------------------------


async def test_cname_loop_at_mx1_skips_it_for_mx2(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    """A CNAME loop is a lookup failure (never "no address"): mx1 is skipped."""
    loop_name = f"loop.{DOMAIN}"
    for rrtype in ("A", "AAAA"):
        lab.dns.script(MX1, rrtype, Cname(loop_name))
    lab.dns.cname(loop_name, MX1)
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        result = await lab.deliver()

    assert_delivered_with_dane(lab, result, MX2, caplog)
    assert lab.transport.opened == [(ADDRESS[MX2], lab.port)]
    assert lab.dns.count(MX1, "A") == 1
    assert lab.dns.count(MX1, "AAAA") == 1
    assert lab.dns.count(tlsa_name(MX1), "TLSA") == 0
    assert lab.dns_lookups("A", "cname-loop") == 1
    assert lab.dns_lookups("AAAA", "cname-loop") == 1
    skipped = [line for line in attempt_lines(caplog) if " status=deferred " in line]
    assert len(skipped) == 1
    assert f" relay={MX1}[-] dnssec=secure tls=none dane=none " in skipped[0]
    assert f"CNAME loop {MX1} -> {loop_name} -> {MX1}" in skipped[0]
    assert " error=dns" in skipped[0]


async def test_malformed_tlsa_at_mx1_skips_it_for_mx2(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 7671 §4.1: a secure TLSA RRset whose only record has a 31-byte SHA2-256 digest is
    a publishing error: counted, logged, and mx1 is skipped rather than used without DANE."""
    bad_digest = leaf(MX1).tlsa_data(1, 1)[:31]
    lab.dns.script(tlsa_name(MX1), "TLSA", Answer([bytes([3, 1, 1]) + bad_digest]))
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        result = await lab.deliver()

    assert_delivered_with_dane(lab, result, MX2, caplog)
    assert lab.transport.opened == [(ADDRESS[MX2], lab.port)]
    assert lab.receivers[MX1].server_names == []
    assert lab.sample("dane_relay_tlsa_malformed_records_total") == 1
    assert lab.dns_lookups("TLSA", "secure") == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"host={MX1} dane=malformed-tlsa records=" in warnings[0]
    assert "usable_left=0" in warnings[0]
    skipped = [line for line in attempt_lines(caplog) if " status=deferred " in line]
    assert len(skipped) == 1
    assert f" relay={MX1}[-] dnssec=secure tls=none dane=fail reason=tlsa_malformed " in skipped[0]
    reply = f'reply="451 4.7.5 TLSA records malformed for {MX1}:25" error=tlsa_malformed'
    assert reply in skipped[0]
