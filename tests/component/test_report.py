"""relay.report.lookup with a scripted resolver: the outcome the engine would reach for
several MX hosts, and what the renderings say about each host.
"""

from __future__ import annotations

import json

import pytest

from relay.dane.records import TlsaRecord
from relay.errors import DnsTempFail
from relay.lookup.results import AnswerKind, DnsAnswer, MxRecord, ProbeResult, Security
from relay.report import Outcome, lookup, render_json, render_text

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

S = Security.SECURE
EE = TlsaRecord(3, 1, 1, bytes(range(32)))
VALIDATING = ProbeResult(True, "./DNSKEY from 127.0.0.1:53 answered with the AD bit (1 record)")


class Scripted:
    """Answers by name; a DnsTempFail value is raised; unknown names are NXDOMAIN."""

    def __init__(
        self,
        mx: DnsAnswer[MxRecord] | DnsTempFail,
        addresses: dict[str, DnsAnswer[str] | DnsTempFail],
        tlsa: dict[str, DnsAnswer[TlsaRecord] | DnsTempFail],
        probe: ProbeResult = VALIDATING,
    ) -> None:
        self._mx, self._addresses, self._tlsa, self._probe = mx, addresses, tlsa, probe
        self.asked: list[str] = []

    async def probe_validation(self) -> ProbeResult:
        return self._probe

    async def mx(self, domain: str) -> DnsAnswer[MxRecord]:
        self.asked.append(f"MX {domain}")
        if isinstance(self._mx, DnsTempFail):
            raise self._mx
        return self._mx

    async def addresses(self, host: str) -> DnsAnswer[str]:
        self.asked.append(f"A {host}")
        answer = self._addresses.get(host, DnsAnswer(host, AnswerKind.NXDOMAIN, S))
        if isinstance(answer, DnsTempFail):
            raise answer
        return answer

    async def tlsa(self, host: str, port: int) -> DnsAnswer[TlsaRecord]:
        qname = f"_{port}._tcp.{host}"
        self.asked.append(f"TLSA {qname}")
        answer = self._tlsa.get(qname, DnsAnswer(qname, AnswerKind.NXDOMAIN, S))
        if isinstance(answer, DnsTempFail):
            raise answer
        return answer


def _mx(*hosts: tuple[int, str], security: Security = S) -> DnsAnswer[MxRecord]:
    return DnsAnswer(
        "example.org", AnswerKind.DATA, security, tuple(MxRecord(p, h) for p, h in hosts)
    )


def _addr(host: str, address: str, security: Security = S) -> DnsAnswer[str]:
    return DnsAnswer(host, AnswerKind.DATA, security, (address,))


def _tlsa(host: str, *records: TlsaRecord) -> DnsAnswer[TlsaRecord]:
    qname = f"_25._tcp.{host}"
    return DnsAnswer(qname, AnswerKind.DATA, S, records)


async def test_a_skipped_first_host_leaves_the_second_to_attempt() -> None:
    bogus = DnsTempFail("DNS lookup of _25._tcp.mx1.example.org/TLSA failed", kind="bogus")
    resolver = Scripted(
        _mx((20, "mx2.example.org"), (10, "mx1.example.org")),
        {
            "mx1.example.org": _addr("mx1.example.org", "192.0.2.1"),
            "mx2.example.org": _addr("mx2.example.org", "192.0.2.2"),
        },
        {
            "_25._tcp.mx1.example.org": bogus,
            "_25._tcp.mx2.example.org": _tlsa("mx2.example.org", EE),
        },
    )
    report = await lookup(resolver, "example.org", level="dane", resolvers="127.0.0.1:53")
    assert report.outcome is Outcome.ATTEMPT
    assert report.usable == ("mx2.example.org",)
    assert [h.host.name for h in report.hosts] == ["mx1.example.org", "mx2.example.org"]
    text = render_text(report).splitlines()
    assert "host mx1.example.org (MX 10)" in text
    assert "  error: 451 4.7.5 TLSA lookup error for mx1.example.org:25" in text
    assert text[-1] == "result: attempt delivery via mx2.example.org"
    data = json.loads(render_json(report))
    assert [h["decision"]["action"] for h in data["hosts"]] == ["skip_host", "dane"]
    assert data["hosts"][0]["tlsa"]["lookups"][0]["error"]["kind"] == "bogus"


async def test_every_host_skipped_defers_with_the_last_reason_never_bounces() -> None:
    resolver = Scripted(
        _mx((10, "mx1.example.org"), (20, "mx2.example.org")),
        {
            "mx1.example.org": DnsTempFail(
                "DNS lookup of mx1.example.org/A failed", kind="timeout"
            ),
        },
        {},
    )
    report = await lookup(resolver, "example.org", level="dane", resolvers="127.0.0.1:53")
    assert report.outcome is Outcome.DEFER
    assert report.reply == "451 4.4.3 Host or domain name not found: mx2.example.org"
    assert report.usable == ()
    lines = render_text(report).splitlines()
    assert "  addresses: lookup failed: DNS lookup of mx1.example.org/A failed" in lines
    assert "  addresses: none (no A or AAAA records)" in lines
    assert lines.count("  TLSA: not looked up (the host has no usable address)") == 2


async def test_insecure_mx_with_secure_tlsa_is_trusted_not_verified() -> None:
    resolver = Scripted(
        _mx((10, "mx.example.net"), security=Security.INSECURE),
        {"mx.example.net": _addr("mx.example.net", "192.0.2.9")},
        {"_25._tcp.mx.example.net": _tlsa("mx.example.net", EE)},
    )
    report = await lookup(resolver, "example.org", level="dane", resolvers="127.0.0.1:53")
    assert report.outcome is Outcome.ATTEMPT
    lines = render_text(report).splitlines()
    assert "MX example.org: insecure" in lines
    (tls,) = [x for x in lines if x.startswith("  TLS: ")]
    assert tls.startswith("  TLS: dane (trusted); ")
    report = await lookup(
        resolver, "example.org", level="dane", insecure_mx_policy="may", resolvers="x"
    )
    (tls,) = [x for x in render_text(report).splitlines() if x.startswith("  TLS: ")]
    assert tls.startswith("  TLS: may; ")


async def test_a_failed_mx_lookup_asks_nothing_else() -> None:
    resolver = Scripted(DnsTempFail("DNS lookup of example.org/MX failed", kind="timeout"), {}, {})
    report = await lookup(resolver, "example.org", level="dane", resolvers="127.0.0.1:53")
    assert report.outcome is Outcome.DEFER
    assert report.reply == "451 4.4.3 DNS lookup of example.org/MX failed"
    assert resolver.asked == ["MX example.org"]
    assert render_text(report).splitlines()[3] == (
        "MX example.org: lookup failed (timeout): DNS lookup of example.org/MX failed"
    )


async def test_level_may_never_asks_for_tlsa() -> None:
    resolver = Scripted(
        _mx((10, "mx.example.org")),
        {"mx.example.org": _addr("mx.example.org", "192.0.2.1")},
        {"_25._tcp.mx.example.org": _tlsa("mx.example.org", EE)},
    )
    report = await lookup(resolver, "example.org", level="may", resolvers="127.0.0.1:53")
    assert report.outcome is Outcome.ATTEMPT
    assert not any(q.startswith("TLSA") for q in resolver.asked)
    assert "  TLSA: not looked up (level may does not use DANE)" in render_text(report).splitlines()


@pytest.mark.parametrize(
    ("probe", "header", "tls"),
    [
        (VALIDATING, "validates DNSSEC", "  TLS: dane (verified); "),
        # RFC 7672 §2.1: a probe that got no answer proves nothing; DANE stays on.
        (
            ProbeResult(False, "./DNSKEY from 127.0.0.1:53 timed out after 10s", conclusive=False),
            "did not answer the validation probe",
            "  TLS: dane (verified); ",
        ),
        # An answer without AD proves the resolver does not validate: DANE is off.
        (
            ProbeResult(False, "./DNSKEY from 127.0.0.1:53 answered without the AD bit"),
            "does NOT validate DNSSEC",
            "  TLS: may; ",
        ),
    ],
    ids=["validating", "inconclusive", "not-validating"],
)
async def test_report_reads_the_probe_as_the_running_relay_does(
    probe: ProbeResult, header: str, tls: str
) -> None:
    resolver = Scripted(
        _mx((10, "mx.example.org")),
        {"mx.example.org": _addr("mx.example.org", "192.0.2.7")},
        {"_25._tcp.mx.example.org": _tlsa("mx.example.org", EE)},
        probe=probe,
    )
    report = await lookup(resolver, "example.org", level="dane", resolvers="127.0.0.1:53")
    lines = render_text(report).splitlines()
    assert lines[2] == f"resolver 127.0.0.1:53: {header} ({probe.detail})"
    (line,) = [x for x in lines if x.startswith("  TLS: ")]
    assert line.startswith(tls)
