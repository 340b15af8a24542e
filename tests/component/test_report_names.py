"""`dane-relay lookup` / `probe` reports for names that are not DNS names, and terminal hygiene.

relay.report.lookup runs the engine's routing code (relay.delivery.route), so a malformed MX
target is shown skipped with its reason (F4, F10), a bad next-hop domain bounces without a
lookup (F7), and nothing printed carries a raw control character (F8).
"""

from __future__ import annotations

import json

import pytest

from relay.dane.records import TlsaRecord
from relay.lookup.results import AnswerKind, DnsAnswer, MxRecord, ProbeResult, Security
from relay.probe import ProbeReport
from relay.probe import render_json as probe_json
from relay.probe import render_text as probe_text
from relay.report import Outcome, json_safe, lookup, render_json, render_text, terminal_safe

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

S = Security.SECURE
EE = TlsaRecord(3, 1, 1, bytes(range(32)))
VALIDATING = ProbeResult(True, "./DNSKEY from 127.0.0.1:53 answered with the AD bit (1 record)")
# What a hostile peer or resolver could put in a text the report shows: ESC sequences that
# clear the screen or recolour it, a bidi override, a C1 control, a lone surrogate.
HOSTILE = "\x1b[2J\x1b[31mred\u202eevil\x9b\udcff\u2028"
RAW = ("\x1b", "\u202e", "\x9b", "\udcff", "\u2028")


class Scripted:
    """MX answer for one domain, addresses and TLSA by name; records every question."""

    def __init__(
        self,
        mx: dict[str, DnsAnswer[MxRecord]],
        addresses: dict[str, DnsAnswer[str]],
        tlsa: dict[str, DnsAnswer[TlsaRecord]],
        probe: ProbeResult = VALIDATING,
    ) -> None:
        self._mx, self._addresses, self._tlsa, self._probe = mx, addresses, tlsa, probe
        self.asked: list[str] = []

    async def probe_validation(self) -> ProbeResult:
        return self._probe

    async def mx(self, domain: str) -> DnsAnswer[MxRecord]:
        self.asked.append(f"MX {domain}")
        return self._mx[domain]

    async def addresses(self, host: str) -> DnsAnswer[str]:
        self.asked.append(f"A {host}")
        return self._addresses[host]

    async def tlsa(self, host: str, port: int) -> DnsAnswer[TlsaRecord]:
        qname = f"_{port}._tcp.{host}"
        self.asked.append(f"TLSA {qname}")
        return self._tlsa[qname]


def _mx(domain: str, *hosts: tuple[int, str]) -> DnsAnswer[MxRecord]:
    return DnsAnswer(domain, AnswerKind.DATA, S, tuple(MxRecord(p, h) for p, h in hosts))


GOOD_MX2 = {"mx2.example.org": DnsAnswer("mx2.example.org", AnswerKind.DATA, S, ("192.0.2.2",))}
GOOD_TLSA2 = {
    "_25._tcp.mx2.example.org": DnsAnswer("_25._tcp.mx2.example.org", AnswerKind.DATA, S, (EE,))
}


async def test_malformed_mx_target_is_shown_skipped_and_the_backup_is_used() -> None:
    """F4: the \\001 MX is skipped with its reason, never looked up; mx2 gets the mail."""
    resolver = Scripted(
        {
            "example.org": _mx(
                "example.org", (10, "\\001\\001.example.org"), (20, "mx2.example.org")
            )
        },
        GOOD_MX2,
        GOOD_TLSA2,
    )
    report = await lookup(resolver, "example.org", level="dane")
    assert resolver.asked == [
        "MX example.org",
        "A mx2.example.org",
        "TLSA _25._tcp.mx2.example.org",
    ]
    assert (report.outcome, report.usable) == (Outcome.ATTEMPT, ("mx2.example.org",))
    why = "MX target is not a host name: '\\001\\001.example.org' contains a backslash escape"
    lines = render_text(report).splitlines()
    start = lines.index("host \\001\\001.example.org (MX 10)")
    assert lines[start + 1 : start + 5] == [
        "  addresses: not looked up (the MX target is not a host name)",
        "  TLSA: not looked up (the MX target is not a host name)",
        f"  TLS: skip host; {why} (RFC 5321 §5.1)",
        f"  error: 451 4.4.4 {why}",
    ]
    assert lines[-1] == "result: attempt delivery via mx2.example.org"
    (bad, _) = json.loads(render_json(report))["hosts"]
    assert bad["error"] == {"kind": "malformed_mx", "reply": f"451 4.4.4 {why}"}
    assert bad["decision"]["reason"] == "malformed_mx"


async def test_only_an_ip_literal_mx_defers_4_4_4() -> None:
    """F10: "10 192.0.2.1." is not a host name: defer (a DNS configuration error)."""
    resolver = Scripted({"example.org": _mx("example.org", (10, "192.0.2.1"))}, {}, {})
    report = await lookup(resolver, "example.org", level="dane")
    assert resolver.asked == ["MX example.org"]
    assert report.outcome is Outcome.DEFER
    assert report.reply == (
        "451 4.4.4 MX target is not a host name: '192.0.2.1' is an IP address, not a domain name"
    )


@pytest.mark.parametrize(
    ("domain", "line"),
    [
        ("a..b.test", "MX a..b.test: not looked up: Bad destination domain syntax: empty label"),
        (
            "a" * 64 + ".test",
            f"MX {'a' * 64}.test: not looked up: Bad destination domain syntax: "
            "label longer than 63 octets (64)",
        ),
    ],
)
async def test_bad_next_hop_domain_bounces_without_a_lookup(domain: str, line: str) -> None:
    """F7: a name that can never resolve is a bounce (exit 69), not a deferral (75)."""
    resolver = Scripted({}, {}, {})
    report = await lookup(resolver, domain, level="dane")
    assert resolver.asked == []
    assert report.outcome is Outcome.BOUNCE
    assert report.reply.startswith("550 5.1.2 Bad destination domain syntax: ")
    assert line in render_text(report).splitlines()


async def test_idn_next_hop_is_looked_up_and_shown_by_its_a_label() -> None:
    resolver = Scripted(
        {"xn--strae-oqa.de": _mx("xn--strae-oqa.de", (10, "mx2.example.org"))}, GOOD_MX2, GOOD_TLSA2
    )
    report = await lookup(resolver, "straße.de", level="dane")
    assert resolver.asked[0] == "MX xn--strae-oqa.de"
    assert "MX xn--strae-oqa.de: secure" in render_text(report).splitlines()
    # RFC 7672 §3.2.2: the next-hop reference identifier is the A-label.
    assert report.hosts[0].reference_names == ("mx2.example.org", "xn--strae-oqa.de")


# -- terminal hygiene (F8) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text, straße, 日本", "plain text, straße, 日本"),  # printable stays as it is
        ("two\nlines", "two\nlines"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("tab\there\rcr", "tab\\there\\rcr"),
        ("\x7f\x9b", "\\x7f\\x9b"),
        ("pay\u00adpal pay\u200dpal \u202eevil", "pay\\xadpal pay\\u200dpal \\u202eevil"),
        ("\udcff", "\\udcff"),
        ("\u2028\u2029", "\\u2028\\u2029"),
    ],
)
async def test_terminal_safe_escapes_what_a_terminal_would_act_on(text: str, shown: str) -> None:
    assert terminal_safe(text) == shown


async def test_json_safe_keeps_the_value_and_escapes_the_characters() -> None:
    value = {"detail": HOSTILE, "name": "straße"}
    document = json_safe(json.dumps(value, ensure_ascii=False))
    assert not any(c in document for c in RAW)
    assert "straße" in document
    assert json.loads(document) == value


async def test_reports_never_print_raw_control_characters() -> None:
    """F8: text from the network (here the resolver's probe detail, and a peer's reply in
    the probe report) is escaped in both renderings of both commands."""
    resolver = Scripted({}, {}, {}, probe=ProbeResult(False, HOSTILE))
    report = await lookup(resolver, "a..b.test", level="dane")
    probe_report = ProbeReport(report, 25, "relay.test", (), Outcome.DEFER, f"451 4.4.0 {HOSTILE}")
    for output in (
        render_text(report),
        render_json(report),
        probe_text(probe_report),
        probe_json(probe_report),
    ):
        assert not any(c in output for c in RAW), output
        assert output.isprintable() or set(output) - set(output.replace("\n", "")) == {"\n"}
    assert "\\x1b[2J\\x1b[31mred\\u202eevil" in render_text(report)
    assert json.loads(render_json(report))["resolver"]["detail"] == HOSTILE
    assert json.loads(probe_json(probe_report))["result"]["reply"] == f"451 4.4.0 {HOSTILE}"
