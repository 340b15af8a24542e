"""The lab's scenario table: one recipient domain per DANE situation.

Owns: `SCENARIOS`, the declarative list of every recipient domain the lab serves, and
`build_scenarios()`, which turns it into concrete `Scenario`s (addresses, certificates,
TLSA records) for one test session.

Why one table: nsd loads every zone at start, so all scenario zones must be known before
the DNS lab starts. To add a situation, append a `ScenarioSpec` here; its zone, receiver
address and certificate then exist for the whole session.

Conventions:
- Every domain is a child of `test.` and gets its own zone, delegated from `test.` with NS
  glue pointing at the lab's nsd. `signed=False` zones are delegated without DS
  (insecure); `ds=False` on a signed zone gives an island of security (also insecure).
- Every host in `hosts` is given the next receiver address 127.R.1.N (N counts from 1
  across the whole table, in table order), an A record, its own certificate, and the TLSA
  records at `_25._tcp.<host>` its `tlsa` specs describe.
- `mx=None` means no MX RRset (implicit MX, RFC 5321 section 5.1); `NULL_MX` is RFC 7505.

Does not: start anything. Building scenarios is pure apart from key generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .certs import CA, Leaf, make_self_signed, tlsa_data

__all__ = [
    "NULL_MX",
    "SMTP_PORT",
    "SCENARIOS",
    "CertKind",
    "HostSpec",
    "MxHost",
    "Scenario",
    "ScenarioSpec",
    "TlsaRecord",
    "TlsaSpec",
    "build_scenarios",
    "receiver_address",
]

CertKind = Literal["ca", "self-signed"]
SMTP_PORT = 25  # receivers listen here, and TLSA names use it (RFC 7672 3.1), unless a
# HostSpec names another port
NULL_MX: tuple[tuple[int, str], ...] = ((0, "."),)


@dataclass(frozen=True, slots=True)
class TlsaSpec:
    """A TLSA record to publish for a host, computed from that host's certificate.

    `target="leaf"` hashes the host's own certificate; `target="issuer"` hashes the
    certificate that issued it (for DANE-TA, usage 2). `wrong=True` publishes association
    data that matches nothing.
    """

    usage: int
    selector: int
    mtype: int
    target: Literal["leaf", "issuer"] = "leaf"
    wrong: bool = False


@dataclass(frozen=True, slots=True)
class HostSpec:
    """A mail host (absolute name, inside the scenario's domain) with its own receiver."""

    name: str
    starttls: bool = True
    cert: CertKind = "ca"
    tlsa: tuple[TlsaSpec, ...] = ()
    port: int = SMTP_PORT  # its receiver's port, and the port of its `tlsa` records' owner name


@dataclass(frozen=True, slots=True)
class ScenarioSpec:
    domain: str
    description: str
    hosts: tuple[HostSpec, ...] = ()
    mx: tuple[tuple[int, str], ...] | None = None
    signed: bool = True
    ds: bool = True
    # (owner name, rdata type) whose RRSIG is corrupted after signing -> bogus answers.
    corrupt_rrsigs: tuple[tuple[str, str], ...] = ()
    # (owner name, rdata type, rdata text) added to the zone verbatim before signing, for
    # records the host specs cannot express (CNAMEs, malformed TLSA data, ...).
    extra_records: tuple[tuple[str, str, str], ...] = ()
    # (owner name, rdata type) whose RRSIG is replaced by a valid signature that expired
    # a day ago -> bogus answers.
    expired_rrsigs: tuple[tuple[str, str], ...] = ()


DANE_EE_SPKI_SHA256 = TlsaSpec(usage=3, selector=1, mtype=1)

SCENARIOS: list[ScenarioSpec] = [
    ScenarioSpec(
        domain="dane-ok.test",
        description="signed, DS, MX with correct DANE-EE 3 1 1 TLSA, STARTTLS offered",
        mx=((10, "mx.dane-ok.test"),),
        hosts=(HostSpec("mx.dane-ok.test", tlsa=(DANE_EE_SPKI_SHA256,)),),
    ),
    ScenarioSpec(
        domain="dane-ee-cert.test",
        description="signed, DS, MX with correct DANE-EE 3 0 1 (full certificate) TLSA",
        mx=((10, "mx.dane-ee-cert.test"),),
        hosts=(HostSpec("mx.dane-ee-cert.test", tlsa=(TlsaSpec(3, 0, 1),)),),
    ),
    ScenarioSpec(
        domain="dane-bad.test",
        description="signed, DS, 3 1 1 TLSA whose digest matches nothing, STARTTLS offered",
        mx=((10, "mx.dane-bad.test"),),
        hosts=(HostSpec("mx.dane-bad.test", tlsa=(TlsaSpec(3, 1, 1, wrong=True),)),),
    ),
    ScenarioSpec(
        domain="dane-nostarttls.test",
        description="signed, DS, correct 3 1 1 TLSA, but the receiver offers no STARTTLS",
        mx=((10, "mx.dane-nostarttls.test"),),
        hosts=(HostSpec("mx.dane-nostarttls.test", starttls=False, tlsa=(DANE_EE_SPKI_SHA256,)),),
    ),
    ScenarioSpec(
        domain="unsigned.test",
        description="unsigned zone delegated without DS (insecure), self-signed cert, no TLSA",
        mx=((10, "mx.unsigned.test"),),
        hosts=(HostSpec("mx.unsigned.test", cert="self-signed"),),
        signed=False,
        ds=False,
    ),
    ScenarioSpec(
        domain="crash.test",
        description="signed, DS, correct 3 1 1; used with a stall receiver to crash the relay",
        mx=((10, "mx.crash.test"),),
        hosts=(HostSpec("mx.crash.test", tlsa=(DANE_EE_SPKI_SHA256,)),),
    ),
    ScenarioSpec(
        domain="bogus.test",
        description="signed, DS, correct 3 1 1 TLSA whose RRSIG is corrupted (SERVFAIL)",
        mx=((10, "mx.bogus.test"),),
        hosts=(HostSpec("mx.bogus.test", tlsa=(DANE_EE_SPKI_SHA256,)),),
        corrupt_rrsigs=(("_25._tcp.mx.bogus.test", "TLSA"),),
    ),
    ScenarioSpec(
        domain="implicit.test",
        description="signed, DS, no MX; the domain's own A record is the mail host (3 1 1)",
        mx=None,
        hosts=(HostSpec("implicit.test", tlsa=(DANE_EE_SPKI_SHA256,)),),
    ),
    ScenarioSpec(
        domain="nullmx.test",
        description="signed, DS, null MX (MX 0 .): the domain accepts no mail",
        mx=NULL_MX,
    ),
]


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    usage: int
    selector: int
    mtype: int
    data: bytes

    def to_text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass(frozen=True, slots=True)
class MxHost:
    """One mail host as published in DNS and served by one receiver."""

    name: str
    address: str
    port: int
    leaf: Leaf
    starttls: bool
    tlsa_name: str
    tlsa: tuple[TlsaRecord, ...]


@dataclass(frozen=True, slots=True)
class Scenario:
    spec: ScenarioSpec
    hosts: tuple[MxHost, ...]

    @property
    def domain(self) -> str:
        return self.spec.domain

    @property
    def mx(self) -> tuple[tuple[int, str], ...] | None:
        return self.spec.mx

    @property
    def mx_hosts(self) -> tuple[str, ...]:
        """MX target names (empty for implicit MX and null MX)."""
        return tuple(h for _, h in self.spec.mx or () if h != ".")

    def host(self, name: str | None = None) -> MxHost:
        """The named host, or the only host when `name` is None."""
        if name is None:
            if len(self.hosts) != 1:
                raise LookupError(f"{self.domain} has {len(self.hosts)} hosts; name one")
            return self.hosts[0]
        for h in self.hosts:
            if h.name == name:
                return h
        raise LookupError(f"{self.domain} has no host {name}")

    # Single-host shorthands; they raise LookupError on multi-host scenarios.
    @property
    def address(self) -> str:
        return self.host().address

    @property
    def leaf(self) -> Leaf:
        return self.host().leaf

    @property
    def tlsa(self) -> tuple[TlsaRecord, ...]:
        return self.host().tlsa

    @property
    def starttls(self) -> bool:
        return self.host().starttls

    @property
    def secure(self) -> bool:
        """Whether a validating resolver sees this domain's answers as secure (AD)."""
        return self.spec.signed and self.spec.ds


def receiver_address(octet: int, index: int) -> str:
    """The address of receiver number `index` (1-based) for session octet R."""
    if not 1 <= index <= 254:
        raise ValueError(f"receiver index {index} out of range")
    return f"127.{octet}.1.{index}"


def _tlsa_record(spec: TlsaSpec, leaf: Leaf) -> TlsaRecord:
    if spec.target == "leaf":
        cert_der = leaf.cert_der
    else:
        if len(leaf.chain_der) < 2:
            raise ValueError("TLSA target 'issuer' needs a CA-issued certificate")
        cert_der = leaf.chain_der[1]
    data = tlsa_data(cert_der, spec.selector, spec.mtype)
    if spec.wrong:
        data = bytes(b ^ 0xFF for b in data)  # same length, matches nothing
    return TlsaRecord(spec.usage, spec.selector, spec.mtype, data)


def _check(spec: ScenarioSpec) -> None:
    if not spec.domain.endswith(".test") or spec.domain.count(".") != 1:
        raise ValueError(f"{spec.domain}: scenario domains are direct children of test.")
    for host in spec.hosts:
        if host.name != spec.domain and not host.name.endswith("." + spec.domain):
            raise ValueError(f"{host.name} is outside {spec.domain}")
    if not spec.signed and spec.ds:
        raise ValueError(f"{spec.domain}: an unsigned zone cannot have a DS")


def build_scenarios(specs: list[ScenarioSpec], *, octet: int, ca: CA) -> dict[str, Scenario]:
    """Concrete scenarios for session octet R, keyed by domain, in table order.

    Raises:
        ValueError: on a malformed table (duplicate domain, host outside its domain, ...).
    """
    scenarios: dict[str, Scenario] = {}
    index = 0
    for spec in specs:
        _check(spec)
        if spec.domain in scenarios:
            raise ValueError(f"duplicate scenario domain {spec.domain}")
        hosts = []
        for host in spec.hosts:
            index += 1
            leaf = ca.issue([host.name]) if host.cert == "ca" else make_self_signed([host.name])
            hosts.append(
                MxHost(
                    name=host.name,
                    address=receiver_address(octet, index),
                    port=host.port,
                    leaf=leaf,
                    starttls=host.starttls,
                    tlsa_name=f"_{host.port}._tcp.{host.name}",
                    tlsa=tuple(_tlsa_record(t, leaf) for t in host.tlsa),
                )
            )
        scenarios[spec.domain] = Scenario(spec=spec, hosts=tuple(hosts))
    return scenarios


# Scenarios for the hostile tests (tests/integration/test_hostile_*.py). Appended, so the
# receiver addresses of the scenarios above do not move.
# A 3 1 1 TLSA whose SHA-256 "digest" is 20 bytes long: unusable (RFC 7672 §3.1.3), in the
# RFC 3597 generic form because dnspython refuses the presentation form.
_BAD_LENGTH_3_1_1 = "\\# 23 030101" + "ab" * 20
SCENARIOS += [
    ScenarioSpec(
        domain="cname-ok.test",
        description="signed; the MX host is a CNAME; the correct 3 1 1 TLSA exists only at "
        "the CNAME target (RFC 7672 §2.2.3: TLSA at the expanded name first)",
        mx=((10, "mx.cname-ok.test"),),
        hosts=(HostSpec("real.cname-ok.test", tlsa=(DANE_EE_SPKI_SHA256,)),),
        extra_records=(("mx.cname-ok.test", "CNAME", "real.cname-ok.test."),),
    ),
    ScenarioSpec(
        domain="cname-nostarttls.test",
        description="as cname-ok.test, but the CNAME target offers no STARTTLS",
        mx=((10, "mx.cname-nostarttls.test"),),
        hosts=(
            HostSpec("real.cname-nostarttls.test", starttls=False, tlsa=(DANE_EE_SPKI_SHA256,)),
        ),
        extra_records=(("mx.cname-nostarttls.test", "CNAME", "real.cname-nostarttls.test."),),
    ),
    ScenarioSpec(
        domain="cname-bad.test",
        description="as cname-ok.test, but the TLSA at the CNAME target matches nothing",
        mx=((10, "mx.cname-bad.test"),),
        hosts=(HostSpec("real.cname-bad.test", tlsa=(TlsaSpec(3, 1, 1, wrong=True),)),),
        extra_records=(("mx.cname-bad.test", "CNAME", "real.cname-bad.test."),),
    ),
    ScenarioSpec(
        domain="pkix-notls.test",
        description="signed, DS, only PKIX-TA/PKIX-EE TLSA (unusable: TLS mandatory), no STARTTLS",
        mx=((10, "mx.pkix-notls.test"),),
        hosts=(
            HostSpec(
                "mx.pkix-notls.test",
                starttls=False,
                tlsa=(TlsaSpec(1, 1, 1), TlsaSpec(0, 0, 1, target="issuer")),
            ),
        ),
    ),
    ScenarioSpec(
        domain="pkix-tls.test",
        description="signed, DS, only a PKIX-EE 1 1 1 TLSA (unusable), STARTTLS offered",
        mx=((10, "mx.pkix-tls.test"),),
        hosts=(HostSpec("mx.pkix-tls.test", tlsa=(TlsaSpec(1, 1, 1),)),),
    ),
    ScenarioSpec(
        domain="badlen.test",
        description="signed, DS, only a 3 1 1 TLSA with a 20-byte digest (unusable), no STARTTLS",
        mx=((10, "mx.badlen.test"),),
        hosts=(HostSpec("mx.badlen.test", starttls=False),),
        extra_records=(("_25._tcp.mx.badlen.test", "TLSA", _BAD_LENGTH_3_1_1),),
    ),
    ScenarioSpec(
        domain="badlen-mixed.test",
        description="signed, DS, a correct 3 1 1 TLSA next to a 3 1 1 with a 20-byte digest",
        mx=((10, "mx.badlen-mixed.test"),),
        hosts=(HostSpec("mx.badlen-mixed.test", tlsa=(DANE_EE_SPKI_SHA256,)),),
        extra_records=(("_25._tcp.mx.badlen-mixed.test", "TLSA", _BAD_LENGTH_3_1_1),),
    ),
    ScenarioSpec(
        domain="cname-loop.test",
        description="signed, DS, the MX host name is a CNAME loop (a -> b -> a)",
        mx=((10, "loop1.cname-loop.test"),),
        extra_records=(
            ("loop1.cname-loop.test", "CNAME", "loop2.cname-loop.test."),
            ("loop2.cname-loop.test", "CNAME", "loop1.cname-loop.test."),
        ),
    ),
    ScenarioSpec(
        domain="mx-noaddr.test",
        description="signed, DS, the only MX host has no address records (NXDOMAIN)",
        mx=((10, "ghost.mx-noaddr.test"),),
    ),
    ScenarioSpec(
        domain="island.test",
        description="signed zone without DS (island of security: insecure); TLSA that matches "
        "nothing, which must be ignored",
        mx=((10, "mx.island.test"),),
        hosts=(HostSpec("mx.island.test", tlsa=(TlsaSpec(3, 1, 1, wrong=True),)),),
        ds=False,
    ),
    ScenarioSpec(
        domain="bogus-mx.test",
        description="signed, DS, the MX RRset's RRSIG is corrupted (SERVFAIL)",
        mx=((10, "mx.bogus-mx.test"),),
        hosts=(HostSpec("mx.bogus-mx.test", tlsa=(DANE_EE_SPKI_SHA256,)),),
        corrupt_rrsigs=(("bogus-mx.test", "MX"),),
    ),
    ScenarioSpec(
        domain="expired-a.test",
        description="signed, DS, the MX host's A RRset is signed with an expired RRSIG (bogus)",
        mx=((10, "mx.expired-a.test"),),
        hosts=(HostSpec("mx.expired-a.test", tlsa=(DANE_EE_SPKI_SHA256,)),),
        expired_rrsigs=(("mx.expired-a.test", "A"),),
    ),
    ScenarioSpec(
        domain="unsigned-target.test",
        description="signed, DS, MX pointing at mx.unsigned.test in the unsigned zone",
        mx=((10, "mx.unsigned.test"),),
    ),
    ScenarioSpec(
        domain="hostile.test",
        description="signed, DS, correct 3 1 1; the tests run scripted SMTP peers on its host",
        mx=((10, "mx.hostile.test"),),
        hosts=(HostSpec("mx.hostile.test", tlsa=(DANE_EE_SPKI_SHA256,)),),
    ),
    ScenarioSpec(
        domain="hostile2.test",
        description="signed, DS, two MX hosts with correct 3 1 1, for scripted peers",
        mx=((10, "mx1.hostile2.test"), (20, "mx2.hostile2.test")),
        hosts=(
            HostSpec("mx1.hostile2.test", tlsa=(DANE_EE_SPKI_SHA256,)),
            HostSpec("mx2.hostile2.test", tlsa=(DANE_EE_SPKI_SHA256,)),
        ),
    ),
]

# Scenarios for the DNSSEC lookup acceptance tests (tests/integration/test_dnssec_lookups.py,
# test_lookup_cli.py). Appended, so the receiver addresses above do not move.
SCENARIOS += [
    ScenarioSpec(
        domain="cname-unsigned.test",
        description="unsigned zone (no DS) holding the CNAME target of cname-insecure.test; "
        "it publishes a 3 1 1 TLSA that matches nothing, which must be ignored",
        hosts=(HostSpec("real.cname-unsigned.test", tlsa=(TlsaSpec(3, 1, 1, wrong=True),)),),
        signed=False,
        ds=False,
    ),
    ScenarioSpec(
        domain="cname-insecure.test",
        description="signed, DS, secure MX whose host is a secure CNAME into the unsigned "
        "zone cname-unsigned.test: the address chain is insecure, so no DANE "
        "(RFC 7672 §2.2.2)",
        mx=((10, "mx.cname-insecure.test"),),
        extra_records=(("mx.cname-insecure.test", "CNAME", "real.cname-unsigned.test."),),
    ),
    ScenarioSpec(
        domain="expired.test",
        description="signed, DS, correct 3 1 1, but the RRSIG over the zone's DNSKEY RRset "
        "has expired: every answer from the zone is bogus",
        mx=((10, "mx.expired.test"),),
        hosts=(HostSpec("mx.expired.test", tlsa=(DANE_EE_SPKI_SHA256,)),),
        expired_rrsigs=(("expired.test", "DNSKEY"),),
    ),
    ScenarioSpec(
        domain="nullmx-addr.test",
        description="signed, DS, null MX, yet the domain has an address and a receiver of "
        "its own: the relay must not fall back to it (RFC 7505 §3)",
        mx=NULL_MX,
        hosts=(HostSpec("nullmx-addr.test", tlsa=(DANE_EE_SPKI_SHA256,)),),
    ),
]

# Scenarios for `dane-relay probe` (tests/integration/test_probe_cli.py). Appended, so the
# receiver addresses above do not move.
SCENARIOS += [
    ScenarioSpec(
        domain="dane-ta.test",
        description="signed, DS, only a DANE-TA 2 1 1 TLSA for the lab CA that issued the "
        "host's certificate; the receiver sends leaf + CA, so the match is at depth 1",
        mx=((10, "mx.dane-ta.test"),),
        hosts=(HostSpec("mx.dane-ta.test", tlsa=(TlsaSpec(2, 1, 1, target="issuer"),)),),
    ),
]

# Scenarios for insecure_mx_policy (RFC 7672 §2.2.1): an unsigned domain whose MX names a host
# in a signed zone with secure TLSA records. Appended, so the receiver addresses above stay.
SCENARIOS += [
    ScenarioSpec(
        domain="insecure-mx.test",
        description="unsigned zone (no DS) whose MX is mx.dane-ok.test (secure A, correct "
        "secure 3 1 1): DANE applies per insecure_mx_policy, logged as trusted",
        mx=((10, "mx.dane-ok.test"),),
        signed=False,
        ds=False,
    ),
    ScenarioSpec(
        domain="insecure-mx-bad.test",
        description="unsigned zone (no DS) whose MX is mx.dane-bad.test (secure 3 1 1 that "
        "matches nothing): deferred under insecure_mx_policy dane, delivered under may",
        mx=((10, "mx.dane-bad.test"),),
        signed=False,
        ds=False,
    ),
]

# Scenarios for mail-loop detection (tests/integration/test_mail_loop_lab.py, issue 5
# review). Appended, so the receiver addresses above do not move.
MAPPED_LOOP_ADDRESS = "127.254.77.1"  # listened on by the relay in the mapped-address test
SCENARIOS += [
    ScenarioSpec(
        domain="loops.test",
        description="signed, DS, MX 10 mx1, 20 mx2, 20 mx2b, 30 mx3, each with a correct "
        "3 1 1; the loop tests name the relay mx2.loops.test, so mx2b and mx3 are never used",
        mx=(
            (10, "mx1.loops.test"),
            (20, "mx2.loops.test"),
            (20, "mx2b.loops.test"),
            (30, "mx3.loops.test"),
        ),
        hosts=tuple(
            HostSpec(f"{name}.loops.test", tlsa=(DANE_EE_SPKI_SHA256,))
            for name in ("mx1", "mx2", "mx2b", "mx3")
        ),
    ),
    ScenarioSpec(
        domain="mapped-loop.test",
        description="signed, DS, the only MX host has just an IPv4-mapped AAAA record "
        f"(::ffff:{MAPPED_LOOP_ADDRESS}): a relay listening on that IPv4 address at the "
        "delivery port is that host",
        mx=((10, "mx.mapped-loop.test"),),
        extra_records=(("mx.mapped-loop.test", "AAAA", f"::ffff:{MAPPED_LOOP_ADDRESS}"),),
    ),
]

# A next hop with a port (issue 5 follow-up): TLSA at the port connected to. Appended, so
# the receiver addresses above do not move.
SCENARIOS += [
    ScenarioSpec(
        domain="port-tlsa.test",
        description="signed, DS, MX mx.port-tlsa.test whose receiver listens on port 2525 "
        "only, with a correct 3 1 1 at _2525._tcp and a wrong one at _25._tcp",
        mx=((10, "mx.port-tlsa.test"),),
        hosts=(HostSpec("mx.port-tlsa.test", tlsa=(DANE_EE_SPKI_SHA256,), port=2525),),
        extra_records=(("_25._tcp.mx.port-tlsa.test", "TLSA", "3 1 1 " + "00" * 32),),
    ),
]
