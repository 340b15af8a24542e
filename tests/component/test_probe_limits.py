"""dane-relay probe spends the same connection budget per domain as delivery does.

Delivery makes at most MAX_CONNECTIONS_PER_DOMAIN connection attempts per domain and
attempt (relay.delivery.engine, after Postfix smtp_mx_address_limit); a probe that tried
more could report "attempt via mx2" for mail that delivery would defer.
"""

from __future__ import annotations

import ssl

import pytest

from relay.dane.records import TlsaRecord
from relay.delivery.engine import MAX_CONNECTIONS_PER_DOMAIN
from relay.errors import ConnectFailed, Scope
from relay.lookup.results import AnswerKind, DnsAnswer, MxRecord, ProbeResult, Security
from relay.probe import probe, render_text
from relay.report import Outcome

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

S = Security.SECURE
MX1_ADDRESSES = tuple(f"192.0.2.{i}" for i in range(1, 7))  # six: more than the budget


class Resolver:
    async def probe_validation(self) -> ProbeResult:
        return ProbeResult(True, "./DNSKEY answered with the AD bit")

    async def mx(self, domain: str) -> DnsAnswer[MxRecord]:
        records = (MxRecord(10, "mx1.example.org"), MxRecord(20, "mx2.example.org"))
        return DnsAnswer(domain, AnswerKind.DATA, S, records)

    async def addresses(self, host: str) -> DnsAnswer[str]:
        addrs = MX1_ADDRESSES if host == "mx1.example.org" else ("198.51.100.2",)
        return DnsAnswer(host, AnswerKind.DATA, S, addrs)

    async def tlsa(self, host: str, port: int) -> DnsAnswer[TlsaRecord]:
        return DnsAnswer(f"_{port}._tcp.{host}", AnswerKind.NODATA, S)


class RefusingTransport:
    def __init__(self) -> None:
        self.opened: list[str] = []

    async def open(self, address: str, port: int) -> object:
        self.opened.append(address)
        raise ConnectFailed(f"connect to {address}:{port}: refused", scope=Scope.HOST)


async def test_probe_stops_at_the_per_domain_connection_limit_like_delivery() -> None:
    transport = RefusingTransport()
    report = await probe(
        Resolver(),
        transport,  # type: ignore[arg-type]
        ssl.create_default_context(),
        "example.org",
        level="dane",
        helo_name="relay.test",
    )
    assert MAX_CONNECTIONS_PER_DOMAIN == 5
    assert transport.opened == list(MX1_ADDRESSES[:5])  # mx2 is never reached
    assert report.outcome is Outcome.DEFER
    assert report.reply.startswith("451 4.4.1 connect to 192.0.2.5:25: refused")
    text = render_text(report).splitlines()
    assert "  connect: 192.0.2.6 not tried (connection limit of 5 per domain reached)" in text
    assert "  connect: not tried (connection limit of 5 per domain reached)" in text


async def test_probe_uses_the_configured_address_limit_and_preference() -> None:
    """delivery.mx_address_limit and delivery.address_preference, as the engine uses them."""

    class DualStack(Resolver):
        async def addresses(self, host: str) -> DnsAnswer[str]:
            addrs = ("192.0.2.1", "192.0.2.2", "2001:db8::1")
            return DnsAnswer(host, AnswerKind.DATA, S, addrs)

    transport = RefusingTransport()
    report = await probe(
        DualStack(),
        transport,  # type: ignore[arg-type]
        ssl.create_default_context(),
        "example.org",
        level="dane",
        helo_name="relay.test",
        address_limit=2,
        address_preference="ipv6",
    )
    assert transport.opened == ["2001:db8::1", "192.0.2.1"]
    assert report.outcome is Outcome.DEFER
    text = render_text(report).splitlines()
    assert "  connect: 192.0.2.2 not tried (connection limit of 2 per domain reached)" in text
    assert "  connect: not tried (connection limit of 2 per domain reached)" in text
