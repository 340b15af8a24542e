"""relay.delivery.route against an in-memory resolver: which lookups are made, in which
order, and what each host's route says (RFC 7672 §2.2.1-§2.2.3)."""

from __future__ import annotations

import random

import pytest

from relay.config import Endpoint
from relay.dane.policy import Action, AddressStatus, MxStatus, TlsaState, TlsRequirement
from relay.dane.records import TlsaRecord
from relay.delivery.planner import MxHost, Plan
from relay.delivery.route import HostRoute, Myself, resolve_host, resolve_mx
from relay.errors import (
    BadDestinationDomain,
    DaneNotAvailable,
    DnsTempFail,
    MailLoop,
    MailLoopDeferred,
    MalformedMx,
    NoSuchDomain,
    NullMx,
    Scope,
    TlsaLookupFailed,
    TlsaMalformed,
)
from relay.lookup.results import AnswerKind, DnsAnswer, MxRecord, Security

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(10)]

SECURE, INSECURE = Security.SECURE, Security.INSECURE
GOOD = TlsaRecord(3, 1, 1, b"\x11" * 32)
OTHER = TlsaRecord(2, 0, 1, b"\x22" * 32)
PKIX = TlsaRecord(1, 1, 1, b"\x33" * 32)  # unusable for SMTP (RFC 7672 §3.1.3)
SHORT = TlsaRecord(3, 1, 1, b"\x44" * 20)  # malformed: SHA2-256 digest of 20 bytes
HOST = MxHost("mx.example.net", 10)


def ans(
    name: str,
    *records: object,
    security: Security = SECURE,
    kind: AnswerKind | None = None,
    canonical: str = "",
    failed: tuple[str, ...] = (),
) -> DnsAnswer[object]:
    if kind is None:
        kind = AnswerKind.DATA if records else AnswerKind.NODATA
    return DnsAnswer(name, kind, security, tuple(records), canonical, failed=failed)


class FakeResolver:
    """Scripted answers (or exceptions) per name; records every lookup; unscripted fails."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, str], DnsAnswer[object] | DnsTempFail] = {}
        self.calls: list[tuple[str, str]] = []

    def _answer(self, rrtype: str, name: str) -> DnsAnswer[object]:
        self.calls.append((rrtype, name))
        value = self.table[(rrtype, name)]
        if isinstance(value, DnsTempFail):
            raise value
        return value

    async def mx(self, domain: str) -> DnsAnswer[MxRecord]:
        return self._answer("MX", domain)  # type: ignore[return-value]

    async def addresses(self, host: str) -> DnsAnswer[str]:
        return self._answer("A/AAAA", host)  # type: ignore[return-value]

    async def tlsa(self, host: str, port: int) -> DnsAnswer[TlsaRecord]:
        return self._answer("TLSA", f"_{port}._tcp.{host}")  # type: ignore[return-value]

    def host(
        self, name: str, *addresses: str, security: Security = SECURE, canonical: str = ""
    ) -> None:
        self.table[("A/AAAA", name)] = ans(name, *addresses, security=security, canonical=canonical)

    def tlsa_at(
        self,
        name: str,
        *records: TlsaRecord,
        security: Security = SECURE,
        kind: AnswerKind | None = None,
    ) -> None:
        qname = f"_25._tcp.{name}"
        self.table[("TLSA", qname)] = ans(qname, *records, security=security, kind=kind)

    def tlsa_fails(self, name: str, kind: str = "servfail") -> None:
        self.table[("TLSA", f"_25._tcp.{name}")] = DnsTempFail("SERVFAIL", kind=kind)

    def tlsa_calls(self) -> list[str]:
        return [name for rrtype, name in self.calls if rrtype == "TLSA"]


async def route(
    resolver: FakeResolver,
    host: MxHost = HOST,
    *,
    level: str = "dane",
    mx_security: Security = SECURE,
    insecure_mx_policy: str = "dane",
    validating: bool = True,
    tlsa_port: int = 25,
) -> HostRoute:
    return await resolve_host(
        resolver,
        host,
        next_hop="example.org",
        level=level,
        mx_security=mx_security,
        insecure_mx_policy=insecure_mx_policy,
        validating=validating,
        tlsa_port=tlsa_port,
    )


# -- the plain secure case -------------------------------------------------------------------


async def test_secure_host_with_usable_tlsa_uses_dane_at_the_host_name() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.1", "2001:db8::1")
    r.tlsa_at("mx.example.net", GOOD, OTHER)
    hr = await route(r)

    assert r.calls == [("A/AAAA", "mx.example.net"), ("TLSA", "_25._tcp.mx.example.net")]
    assert hr.addresses == ("192.0.2.1", "2001:db8::1")
    assert (hr.mx_status, hr.address_status) == (MxStatus.SECURE, AddressStatus.SECURE)
    assert (hr.tlsa_base, hr.tlsa_state) == ("mx.example.net", TlsaState.SECURE_USABLE)
    assert hr.tlsa_records == hr.usable == (GOOD, OTHER)
    assert hr.malformed == ()
    assert (hr.decision.action, hr.decision.requirement) == (Action.DANE, TlsRequirement.DANE)
    assert hr.failure is None
    assert hr.dnssec == "secure"
    assert hr.dane_label == "verified"
    # RFC 7672 §3.2.2: the next-hop domain is a reference identifier via a secure MX RRset.
    assert hr.reference_names == ("mx.example.net", "example.org")
    assert [(lk.base, lk.outcome) for lk in hr.tlsa_lookups] == [("mx.example.net", "secure")]
    assert hr.reason == "secure usable TLSA: DANE required (RFC 7672 §2.2)"


async def test_tlsa_name_uses_the_logical_port() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.1")
    r.table[("TLSA", "_26._tcp.mx.example.net")] = ans("_26._tcp.mx.example.net", GOOD)
    hr = await route(r, tlsa_port=26)
    assert r.tlsa_calls() == ["_26._tcp.mx.example.net"]
    assert hr.tlsa_state is TlsaState.SECURE_USABLE


# -- CNAME'd hosts: the TLSA base domain (RFC 7672 §2.2.3) --------------------------------------


async def test_tlsa_at_the_cname_target_makes_it_the_base_domain() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.5", canonical="smtp.provider.example")
    r.tlsa_at("smtp.provider.example", GOOD)
    hr = await route(r)
    assert r.tlsa_calls() == ["_25._tcp.smtp.provider.example"]  # the original is never asked
    assert (hr.tlsa_base, hr.tlsa_state) == ("smtp.provider.example", TlsaState.SECURE_USABLE)
    assert hr.canonical == "smtp.provider.example"
    assert hr.reference_names == ("smtp.provider.example", "mx.example.net", "example.org")


@pytest.mark.parametrize("kind", [AnswerKind.NODATA, AnswerKind.NXDOMAIN])
async def test_secure_denial_at_the_target_moves_on_to_the_original_name(kind: AnswerKind) -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.5", canonical="smtp.provider.example")
    r.tlsa_at("smtp.provider.example", kind=kind)
    r.tlsa_at("mx.example.net", GOOD)
    hr = await route(r)
    assert r.tlsa_calls() == ["_25._tcp.smtp.provider.example", "_25._tcp.mx.example.net"]
    assert [lk.outcome for lk in hr.tlsa_lookups] == [f"secure-{kind.value}", "secure"]
    assert (hr.tlsa_base, hr.tlsa_state) == ("mx.example.net", TlsaState.SECURE_USABLE)
    assert hr.usable == (GOOD,)
    assert hr.reference_names == ("mx.example.net", "example.org")


async def test_insecure_tlsa_at_the_target_is_ignored_and_the_original_name_decides() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.5", canonical="smtp.provider.example")
    r.tlsa_at("smtp.provider.example", OTHER, security=INSECURE)
    r.tlsa_at("mx.example.net", GOOD)
    hr = await route(r)
    assert [lk.outcome for lk in hr.tlsa_lookups] == ["insecure", "secure"]
    assert (hr.tlsa_base, hr.usable) == ("mx.example.net", (GOOD,))
    assert hr.decision.action is Action.DANE


async def test_no_secure_tlsa_anywhere_is_opportunistic_with_the_original_name_as_base() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.5", canonical="smtp.provider.example")
    r.tlsa_at("smtp.provider.example", kind=AnswerKind.NXDOMAIN)
    r.tlsa_at("mx.example.net", OTHER, security=INSECURE)
    hr = await route(r)
    assert (hr.tlsa_base, hr.tlsa_state) == ("mx.example.net", TlsaState.INSECURE)
    assert hr.tlsa_records == hr.usable == ()
    assert (hr.decision.requirement, hr.decision.reason) == (TlsRequirement.MAY, "tlsa_insecure")


async def test_tlsa_failure_at_the_target_stops_and_skips_the_host() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.5", canonical="smtp.provider.example")
    r.tlsa_fails("smtp.provider.example", kind="bogus")
    r.tlsa_at("mx.example.net", GOOD)  # never consulted: a failure is not a denial
    hr = await route(r)
    assert r.tlsa_calls() == ["_25._tcp.smtp.provider.example"]
    assert [lk.outcome for lk in hr.tlsa_lookups] == ["failed:bogus"]
    assert (hr.tlsa_base, hr.tlsa_state) == ("smtp.provider.example", TlsaState.LOOKUP_FAILED)
    assert (hr.decision.action, hr.decision.reason) == (Action.SKIP_HOST, "tlsa_lookup")
    assert isinstance(hr.failure, TlsaLookupFailed)
    assert hr.failure.scope is Scope.HOST
    assert str(hr.failure.reply) == "451 4.7.5 TLSA lookup error for smtp.provider.example:25"
    assert hr.reason.startswith("TLSA lookup failed at _25._tcp.smtp.provider.example (bogus); ")


async def test_tlsa_failure_at_the_original_name_after_a_denial_skips_the_host() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.5", canonical="smtp.provider.example")
    r.tlsa_at("smtp.provider.example")
    r.tlsa_fails("mx.example.net")
    hr = await route(r)
    assert [lk.outcome for lk in hr.tlsa_lookups] == ["secure-nodata", "failed:servfail"]
    assert hr.tlsa_state is TlsaState.LOOKUP_FAILED
    assert isinstance(hr.failure, TlsaLookupFailed)


async def test_secure_unusable_tlsa_at_the_target_decides_without_asking_the_original() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.5", canonical="smtp.provider.example")
    r.tlsa_at("smtp.provider.example", PKIX)
    hr = await route(r)
    assert r.tlsa_calls() == ["_25._tcp.smtp.provider.example"]
    assert (hr.tlsa_state, hr.tlsa_records, hr.usable) == (
        TlsaState.SECURE_UNUSABLE,
        (PKIX,),
        (),
    )
    assert hr.decision.requirement is TlsRequirement.ENCRYPT


async def test_canonical_equal_to_the_host_name_is_one_lookup() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.5", canonical="mx.example.net")
    r.tlsa_at("mx.example.net", kind=AnswerKind.NXDOMAIN)
    hr = await route(r)
    assert r.tlsa_calls() == ["_25._tcp.mx.example.net"]
    assert hr.tlsa_state is TlsaState.SECURE_NONE


# -- addresses ---------------------------------------------------------------------------------


async def test_insecure_addresses_get_no_tlsa_lookup() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.1", security=INSECURE, canonical="smtp.provider.example")
    hr = await route(r)
    assert r.tlsa_calls() == []  # RFC 7672 §2.2.2
    assert (hr.address_status, hr.tlsa_state) == (AddressStatus.INSECURE, TlsaState.NOT_LOOKED_UP)
    assert hr.tlsa_base == "mx.example.net"
    assert (hr.decision.requirement, hr.decision.reason) == (
        TlsRequirement.MAY,
        "addresses_insecure",
    )
    assert hr.dnssec == "insecure"


async def test_insecure_addresses_at_dane_only_skip_the_host() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.1", security=INSECURE)
    hr = await route(r, level="dane-only")
    assert isinstance(hr.failure, DaneNotAvailable)
    assert str(hr.failure.reply) == (
        "451 4.7.5 DANE required, but no usable TLSA records for mx.example.net:25"
    )


async def test_one_failed_family_beside_addresses_of_the_other_is_noted_and_used() -> None:
    r = FakeResolver()
    r.table[("A/AAAA", "mx.example.net")] = ans("mx.example.net", "192.0.2.1", failed=("AAAA",))
    r.tlsa_at("mx.example.net", GOOD)
    hr = await route(r)
    assert hr.addresses == ("192.0.2.1",)
    assert hr.failed_families == ("AAAA",)
    assert hr.address_status is AddressStatus.SECURE
    assert hr.decision.action is Action.DANE
    assert hr.reason.startswith("AAAA lookup failed, using the other family; ")


async def test_address_lookup_failure_skips_the_host_with_the_dns_error() -> None:
    r = FakeResolver()
    r.table[("A/AAAA", "mx.example.net")] = DnsTempFail(
        "DNS lookup of mx.example.net/A failed", kind="timeout"
    )
    hr = await route(r)
    assert r.tlsa_calls() == []
    assert (hr.address_status, hr.decision.action) == (AddressStatus.FAILED, Action.SKIP_HOST)
    assert isinstance(hr.failure, DnsTempFail)
    assert (hr.failure.kind, hr.failure.scope) == ("timeout", Scope.HOST)
    assert str(hr.failure.reply) == "451 4.4.3 DNS lookup of mx.example.net/A failed"
    assert hr.dnssec == "secure"  # what the MX answer said; nothing more was learnt


@pytest.mark.parametrize("kind", [AnswerKind.NODATA, AnswerKind.NXDOMAIN])
async def test_a_host_without_addresses_is_skipped(kind: AnswerKind) -> None:
    r = FakeResolver()
    r.table[("A/AAAA", "mx.example.net")] = ans("mx.example.net", kind=kind)
    hr = await route(r)
    assert (hr.address_status, hr.decision.reason) == (AddressStatus.NONE, "no_address")
    assert isinstance(hr.failure, DnsTempFail)
    assert str(hr.failure.reply) == "451 4.4.3 Host or domain name not found: mx.example.net"


# -- a resolver that does not validate ---------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "action", "reason"),
    [
        ("dane", Action.NO_DANE, "addresses_insecure"),
        ("dane-only", Action.SKIP_HOST, "dane_required"),
    ],
)
async def test_non_validating_resolver_makes_everything_insecure(
    level: str, action: Action, reason: str
) -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.1")  # AD set, but the resolver is not trusted to validate
    r.tlsa_at("mx.example.net", GOOD)
    hr = await route(r, level=level, validating=False)
    assert r.tlsa_calls() == []
    assert (hr.mx_status, hr.address_status) == (MxStatus.INSECURE, AddressStatus.INSECURE)
    assert (hr.decision.action, hr.decision.reason) == (action, reason)
    assert hr.dnssec == "unvalidated"
    assert hr.reason.startswith("resolver not validating: every answer counts as insecure")
    assert hr.reference_names == ("mx.example.net",)  # no next-hop domain via an insecure MX


# -- malformed TLSA (RFC 7671 §4.1) ------------------------------------------------------------


async def test_only_malformed_tlsa_records_skip_the_host_and_are_returned() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.1")
    r.tlsa_at("mx.example.net", SHORT, PKIX)
    hr = await route(r)
    assert hr.tlsa_state is TlsaState.SECURE_MALFORMED
    assert (hr.malformed, hr.usable, hr.tlsa_records) == ((SHORT,), (), (SHORT, PKIX))
    assert isinstance(hr.failure, TlsaMalformed)
    assert str(hr.failure.reply) == "451 4.7.5 TLSA records malformed for mx.example.net:25"
    assert "1 malformed TLSA record(s)" in hr.reason


async def test_malformed_record_beside_a_usable_one_is_returned_and_dane_applies() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.1")
    r.tlsa_at("mx.example.net", SHORT, GOOD)
    hr = await route(r)
    assert (hr.tlsa_state, hr.usable, hr.malformed) == (
        TlsaState.SECURE_USABLE,
        (GOOD,),
        (SHORT,),
    )
    assert hr.failure is None


# -- insecure MX RRsets (RFC 7672 §2.2.1) ------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "action", "requirement"),
    [
        ("dane", Action.DANE, TlsRequirement.DANE),
        ("encrypt", Action.NO_DANE, TlsRequirement.ENCRYPT),
        ("may", Action.NO_DANE, TlsRequirement.MAY),
    ],
)
async def test_insecure_mx_with_secure_tlsa_follows_insecure_mx_policy(
    policy: str, action: Action, requirement: TlsRequirement
) -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.1")
    r.tlsa_at("mx.example.net", GOOD)
    hr = await route(r, mx_security=INSECURE, insecure_mx_policy=policy)
    assert (hr.decision.action, hr.decision.requirement) == (action, requirement)
    assert hr.decision.reason == "insecure_mx"
    assert hr.mx_status is MxStatus.INSECURE
    assert hr.dnssec == "mx-insecure"
    assert hr.dane_label == "trusted"
    assert hr.reference_names == ("mx.example.net",)


async def test_implicit_mx_counts_as_a_secure_mx_name() -> None:
    r = FakeResolver()
    r.host("example.org", "192.0.2.7")
    r.tlsa_at("example.org", GOOD)
    hr = await route(r, MxHost("example.org", 0, implicit=True), mx_security=INSECURE)
    assert (hr.mx_status, hr.dane_label) == (MxStatus.SECURE, "verified")
    assert hr.decision.reason == "dane"
    assert hr.dnssec == "mx-insecure"  # the NODATA answer itself was insecure


@pytest.mark.parametrize("level", ["none", "may", "encrypt"])
async def test_levels_without_dane_never_look_up_tlsa(level: str) -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.1")
    hr = await route(r, level=level)
    assert r.tlsa_calls() == []
    assert (hr.decision.action, hr.decision.requirement) == (
        Action.NO_DANE,
        TlsRequirement(level),
    )


# -- resolve_mx --------------------------------------------------------------------------------


async def test_resolve_mx_plans_the_hosts() -> None:
    r = FakeResolver()
    r.table[("MX", "example.org")] = ans(
        "example.org", MxRecord(20, "b.example.net"), MxRecord(10, "a.example.net")
    )
    mx = await resolve_mx(r, "example.org", rng=random.Random(0))
    assert mx.status is MxStatus.SECURE
    assert mx.plan == Plan((MxHost("a.example.net", 10), MxHost("b.example.net", 20)))
    assert (mx.failure, mx.dnssec) == (None, "secure")


async def test_resolve_mx_failure_defers_the_domain() -> None:
    r = FakeResolver()
    failure = DnsTempFail("DNS lookup of example.org/MX failed", kind="bogus")
    r.table[("MX", "example.org")] = failure
    mx = await resolve_mx(r, "example.org")
    assert (mx.status, mx.answer, mx.plan, mx.dnssec) == (MxStatus.FAILED, None, Plan(()), "-")
    assert mx.failure is failure
    assert failure.scope is Scope.DOMAIN


async def test_resolve_mx_nxdomain_and_null_mx_bounce() -> None:
    r = FakeResolver()
    r.table[("MX", "gone.example")] = ans("gone.example", kind=AnswerKind.NXDOMAIN)
    r.table[("MX", "nomail.example")] = ans("nomail.example", MxRecord(0, ""))
    gone = await resolve_mx(r, "gone.example")
    nomail = await resolve_mx(r, "nomail.example")
    assert isinstance(gone.failure, NoSuchDomain)
    assert str(gone.failure.reply) == "550 5.1.2 Host or domain name not found"
    assert isinstance(nomail.failure, NullMx)
    assert str(nomail.failure.reply) == "556 5.1.10 Domain does not accept mail (null MX)"


async def test_resolve_mx_nodata_is_the_implicit_mx() -> None:
    r = FakeResolver()
    r.table[("MX", "example.org")] = ans("example.org", security=INSECURE)
    mx = await resolve_mx(r, "example.org")
    assert mx.plan == Plan((MxHost("example.org", 0, implicit=True),))
    assert (mx.status, mx.dnssec) == (MxStatus.INSECURE, "insecure")


async def test_resolve_mx_without_validation_is_insecure() -> None:
    r = FakeResolver()
    r.table[("MX", "example.org")] = ans("example.org", MxRecord(10, "mx.example.net"))
    mx = await resolve_mx(r, "example.org", validating=False)
    assert (mx.status, mx.dnssec) == (MxStatus.INSECURE, "unvalidated")


# -- names that are not DNS names (relay.smtp.domain) -------------------------------------------


async def test_resolve_mx_looks_up_the_idna_2008_a_label() -> None:
    """F1, RFC 5891: straße.de is xn--strae-oqa.de (never strasse.de), also as implicit MX."""
    r = FakeResolver()
    r.table[("MX", "xn--strae-oqa.de")] = ans("xn--strae-oqa.de")  # NODATA: implicit MX
    mx = await resolve_mx(r, "Straße.de")
    assert r.calls == [("MX", "xn--strae-oqa.de")]
    assert mx.domain == "xn--strae-oqa.de"
    assert mx.plan == Plan((MxHost("xn--strae-oqa.de", 0, implicit=True),))
    assert mx.failure is None


@pytest.mark.parametrize(
    ("domain", "text"),
    [
        # F7: names that can never resolve bounce instead of being deferred for days.
        ("a" * 64 + ".test", "Bad destination domain syntax: label longer than 63 octets (64)"),
        ("a..b.test", "Bad destination domain syntax: empty label"),
        (".".join(["a" * 63] * 4), "Bad destination domain syntax: name longer than 253 octets"),
        # F1: refused, never looked up as paypal.de / example.de.
        ("pay\u00adpal.de", "Bad destination domain syntax: label 'pay\\xadpal' is not valid IDNA"),
        ("pay\u200dpal.de", "Bad destination domain syntax: label 'pay\\u200dpal' is not valid"),
        ("exampl\\101.de", "Bad destination domain syntax: 'exampl\\101.de' contains a backslash"),
        # F10: an address literal is not routed by MX (RFC 5321 §4.1.3).
        (
            "[192.0.2.1]",
            "Bad destination domain: '[192.0.2.1]' is an address literal, not a domain name; "
            "mail is routed by MX only",
        ),
    ],
)
async def test_resolve_mx_bad_domain_bounces_5_1_2_without_a_lookup(domain: str, text: str) -> None:
    r = FakeResolver()
    mx = await resolve_mx(r, domain)
    assert r.calls == []
    assert (mx.status, mx.answer, mx.plan, mx.dnssec) == (MxStatus.FAILED, None, Plan(()), "-")
    assert isinstance(mx.failure, BadDestinationDomain)
    assert (mx.failure.reply.code, mx.failure.reply.enhanced) == (550, "5.1.2")
    assert mx.failure.reply.text.startswith(text)
    assert mx.failure.reason == "bad_domain"
    assert mx.failure.scope is Scope.DOMAIN


@pytest.mark.parametrize(
    ("exchange", "why"),
    [
        ("\\001\\001.test", "'\\001\\001.test' contains a backslash escape"),  # F4
        ("192.0.2.1", "'192.0.2.1' is an IP address, not a domain name"),  # F10
        ("mx_1.example.net", "character '_' not allowed in 'mx_1'"),
        ("mx..example.net", "empty label"),
    ],
)
async def test_mx_target_that_is_not_a_host_name_is_skipped_without_a_lookup(
    exchange: str, why: str
) -> None:
    """RFC 5321 §5.1: the host is skipped (scope HOST) so that the next MX is tried."""
    r = FakeResolver()
    hr = await route(r, MxHost(exchange, 10))
    assert r.calls == []
    assert (hr.decision.action, hr.decision.reason) == (Action.SKIP_HOST, "malformed_mx")
    assert isinstance(hr.failure, MalformedMx)
    assert str(hr.failure.reply) == f"451 4.4.4 MX target is not a host name: {why}"
    assert (hr.failure.scope, hr.failure.reason) == (Scope.HOST, "malformed_mx")
    assert hr.addresses == hr.tlsa_lookups == ()
    assert hr.tlsa_state is TlsaState.NOT_LOOKED_UP
    assert hr.reason == f"MX target is not a host name: {why} (RFC 5321 §5.1)"
    assert hr.dnssec == "secure"


async def test_next_hop_reference_name_is_the_a_label() -> None:
    """RFC 7672 §3.2.2: certificates name A-labels; the next-hop domain is compared as one."""
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.1")
    r.tlsa_at("mx.example.net", GOOD)
    hr = await resolve_host(
        r, HOST, next_hop="straße.de", level="dane", mx_security=SECURE, validating=True
    )
    assert hr.next_hop == "xn--strae-oqa.de"
    assert hr.reference_names == ("mx.example.net", "xn--strae-oqa.de")


# -- mail loops (issue 5 item 3; Postfix "mail for D loops back to myself") ------------------

ME = Myself.of("Relay.Example.NET.", (Endpoint("192.0.2.25", 25), Endpoint("2001:db8::25", 25)))


async def loop_route(
    resolver: FakeResolver, host: MxHost = HOST, myself: Myself | None = ME, **kw: int
) -> HostRoute:
    return await resolve_host(
        resolver,
        host,
        next_hop="example.org",
        level="dane",
        mx_security=SECURE,
        myself=myself,
        **kw,  # type: ignore[arg-type]
    )


async def test_best_mx_named_as_the_relay_bounces_the_domain_without_tlsa() -> None:
    r = FakeResolver()
    r.host("relay.example.net", "198.51.100.7")
    hr = await loop_route(r, MxHost("relay.example.net", 10))

    assert r.tlsa_calls() == []  # the host is not used: nothing more is looked up
    assert isinstance(hr.failure, MailLoop)
    assert hr.failure.scope is Scope.DOMAIN  # stops the engine's host loop: bounce
    assert str(hr.failure.reply) == (
        "554 5.4.6 mail for example.org loops back to myself "
        "(host name relay.example.net is this relay (server.hostname))"
    )
    assert (hr.decision.action, hr.decision.reason) == (Action.SKIP_HOST, "mail_loop")
    assert hr.addresses == ("198.51.100.7",)


async def test_an_mx_address_of_the_relay_is_a_loop_in_any_spelling() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.9", "2001:0db8:0000::0025")
    hr = await loop_route(r)
    assert isinstance(hr.failure, MailLoop)
    assert "address 2001:0db8:0000::0025 is this relay's (server.listen)" in hr.failure.reply.text


async def test_a_cname_to_the_relay_is_a_loop() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.9", canonical="relay.example.net")
    assert isinstance((await loop_route(r)).failure, MailLoop)


async def test_a_less_preferred_loop_defers_instead_of_trying_worse_hosts() -> None:
    """The relay is a backup MX (preference 20); the preferred host (10) was tried first and
    failed: Postfix truncates the list at its own preference and defers."""
    r = FakeResolver()
    r.host("backup.example.net", "192.0.2.25")
    hr = await loop_route(r, MxHost("backup.example.net", 20), best_preference=10)
    assert isinstance(hr.failure, MailLoopDeferred)
    assert hr.failure.scope is Scope.DOMAIN
    assert hr.failure.reply.code == 451 and hr.failure.reply.enhanced == "4.4.6"
    # At the best preference (an equal-preference sibling does not save it): bounce.
    same = await loop_route(r, MxHost("backup.example.net", 10), best_preference=10)
    assert isinstance(same.failure, MailLoop)


async def test_no_identity_or_another_host_is_not_a_loop() -> None:
    r = FakeResolver()
    r.host("mx.example.net", "192.0.2.25")
    r.tlsa_at("mx.example.net", GOOD)
    assert (await loop_route(r, myself=None)).failure is None  # default: no loop check
    other = await loop_route(r, myself=Myself.of("relay.example.net", (Endpoint("192.0.2.9", 25),)))
    assert other.failure is None and other.decision.action is Action.DANE


async def test_myself_counts_only_listen_addresses_on_the_delivery_port_wildcards_apart() -> None:
    listen = (Endpoint("127.0.0.1", 2525), Endpoint("192.0.2.1", 25), Endpoint("0.0.0.0", 25))
    assert Myself.of(None, listen, 25) == Myself(
        frozenset(), frozenset({"192.0.2.1"}), frozenset({"0.0.0.0"})
    )
    assert Myself.of("h.example", listen).addresses == frozenset({"127.0.0.1", "192.0.2.1"})
    assert Myself.of("H.Example.", ()).names == frozenset({"h.example"})
    assert Myself().loops("mx.example.net", "", ("192.0.2.1",)) == ""
