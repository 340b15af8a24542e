"""The lab's DNS tree, built and DNSSEC-signed at test time with dnspython.

Owns: the private root zone ".", the TLD "test." and one child zone per scenario, each
signed with a fresh ECDSAP256SHA256 key (one combined KSK/ZSK with the SEP flag), and the
root DS that is the validating resolver's only trust anchor.

Theory of operation: signing runs bottom-up. Each child is signed first; its DS goes into
`test.`, which is then signed; the DS of `test.` goes into the root, which is signed last.
Every NS record names a host whose glue A record is the lab's authoritative address, so a
resolver whose root hints name that address can walk the whole tree. Unsigned scenarios
are delegated without DS, so the NSEC at their delegation point proves them insecure.
After signing, RRSIGs listed in a scenario's `corrupt_rrsigs` get their signature bytes
flipped, which makes a validator answer SERVFAIL for that RRset.

Guarantees: signatures are valid from one hour in the past to thirty days ahead.
Does not: write anywhere but the directory given to `LabZone.write`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec
from dns.dnssectypes import Algorithm
from dns.rdtypes.ANY.DNSKEY import DNSKEY
from dns.rdtypes.ANY.DS import DS
from dns.rdtypes.dnskeybase import Flag

from .scenarios import Scenario

__all__ = ["LabZone", "TTL", "build_zones"]

TTL = 300
_NEG_TTL = 60
_ALGORITHM = Algorithm.ECDSAP256SHA256
_INCEPTION_BACKDATE = dt.timedelta(hours=1)
_SIGNATURE_LIFETIME = dt.timedelta(days=30)


@dataclass(frozen=True)
class LabZone:
    origin: str  # absolute, e.g. "dane-ok.test." or "."
    zone: dns.zone.Zone
    dnskey: DNSKEY | None  # None when unsigned
    ds: DS | None  # the DS for the parent (SHA-256), None when unsigned

    @property
    def file_stem(self) -> str:
        return "root" if self.origin == "." else self.origin.rstrip(".")

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.file_stem}.zone"
        path.write_text(self.zone.to_text(relativize=False, want_origin=True))
        return path


class _ZoneBuilder:
    def __init__(self, origin: str, ns_host: str, auth_addr: str) -> None:
        self.origin = dns.name.from_text(origin)
        self.zone = dns.zone.Zone(self.origin, relativize=False)
        self._txn = self.zone.writer()
        self.add(origin, "SOA", f"{ns_host} hostmaster.test. 1 3600 600 86400 {_NEG_TTL}")
        self.add(origin, "NS", ns_host)
        self.auth_addr = auth_addr

    def add(self, owner: str, rdtype: str, text: str) -> None:
        rdata: dns.rdata.Rdata
        if text.startswith("\\# "):
            # RFC 3597 generic form, kept as raw bytes even where dnspython would refuse
            # the data for this type (e.g. a TLSA digest of the wrong length).
            _, length, *hexes = text.split()
            wire = bytes.fromhex("".join(hexes))
            if len(wire) != int(length):
                raise ValueError(f"generic rdata length {length} != {len(wire)} bytes")
            rdata = dns.rdata.GenericRdata(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), wire)
        else:
            rdata = dns.rdata.from_text(
                dns.rdataclass.IN, rdtype, text, origin=dns.name.root, relativize=False
            )
        self._txn.add(dns.name.from_text(owner), TTL, rdata)

    def delegate(self, child: LabZone, ns_host: str) -> None:
        self.add(child.origin, "NS", ns_host)
        self.add(ns_host, "A", self.auth_addr)  # glue
        if child.ds is not None:
            self._txn.add(dns.name.from_text(child.origin), TTL, child.ds)

    def finish(
        self,
        *,
        signed: bool,
        ds: bool,
        now: dt.datetime,
        corrupt: tuple[tuple[str, str], ...] = (),
        expired: tuple[tuple[str, str], ...] = (),
    ) -> LabZone:
        self._txn.commit()
        if not signed:
            return LabZone(str(self.origin), self.zone, None, None)
        key = ec.generate_private_key(ec.SECP256R1())
        dnskey = dns.dnssec.make_dnskey(key.public_key(), _ALGORITHM, flags=Flag.ZONE | Flag.SEP)
        inception = now - _INCEPTION_BACKDATE
        dns.dnssec.sign_zone(
            self.zone,
            keys=[(key, dnskey)],
            dnskey_ttl=TTL,
            inception=inception,
            expiration=inception + _SIGNATURE_LIFETIME,
        )
        for owner, rdtype in corrupt:
            _corrupt_rrsig(self.zone, owner, rdtype)
        for owner, rdtype in expired:
            _expire_rrsig(self.zone, self.origin, owner, rdtype, key, dnskey, now)
        ds_rdata = dns.dnssec.make_ds(self.origin, dnskey, "SHA256") if ds else None
        return LabZone(str(self.origin), self.zone, dnskey, ds_rdata)


def _corrupt_rrsig(zone: dns.zone.Zone, owner: str, rdtype: str) -> None:
    name = dns.name.from_text(owner)
    covered = dns.rdatatype.from_text(rdtype)
    with zone.writer() as txn:
        sigs = txn.get(name, dns.rdatatype.RRSIG, covered)
        if not sigs:
            raise ValueError(f"no RRSIG covering {owner} {rdtype} to corrupt")
        broken = dns.rdataset.Rdataset(
            dns.rdataclass.IN, dns.rdatatype.RRSIG, covers=covered, ttl=sigs.ttl
        )
        for sig in sigs:
            flipped = bytes(b ^ 0x5A for b in sig.signature)
            broken.add(sig.replace(signature=flipped))
        txn.replace(name, broken)


def _expire_rrsig(
    zone: dns.zone.Zone,
    origin: dns.name.Name,
    owner: str,
    rdtype: str,
    key: ec.EllipticCurvePrivateKey,
    dnskey: DNSKEY,
    now: dt.datetime,
) -> None:
    """Replace the RRSIG over (owner, rdtype) by a correct signature that has expired."""
    name = dns.name.from_text(owner)
    covered = dns.rdatatype.from_text(rdtype)
    with zone.writer() as txn:
        rdataset = txn.get(name, covered)
        if not rdataset:
            raise ValueError(f"no {owner} {rdtype} RRset to sign with an expired RRSIG")
        rrset = dns.rrset.from_rdata_list(name, rdataset.ttl, list(rdataset))
        sig = dns.dnssec.sign(
            rrset,
            key,
            origin,
            dnskey,
            inception=now - dt.timedelta(days=10),
            expiration=now - dt.timedelta(days=1),
        )
        expired = dns.rdataset.Rdataset(
            dns.rdataclass.IN, dns.rdatatype.RRSIG, covers=covered, ttl=rdataset.ttl
        )
        expired.add(sig)
        txn.replace(name, expired)


def _child_zone(scenario: Scenario, auth_addr: str, now: dt.datetime) -> LabZone:
    spec = scenario.spec
    origin = f"{spec.domain}."
    b = _ZoneBuilder(origin, f"ns1.{origin}", auth_addr)
    b.add(f"ns1.{origin}", "A", auth_addr)
    for pref, target in spec.mx or ():
        b.add(origin, "MX", f"{pref} {target.rstrip('.')}." if target != "." else f"{pref} .")
    for host in scenario.hosts:
        b.add(f"{host.name}.", "A", host.address)
        for rec in host.tlsa:
            b.add(f"{host.tlsa_name}.", "TLSA", rec.to_text())
    for owner, rdtype, text in spec.extra_records:
        b.add(f"{owner.rstrip('.')}.", rdtype, text)
    corrupt = tuple((f"{o.rstrip('.')}.", t) for o, t in spec.corrupt_rrsigs)
    expired = tuple((f"{o.rstrip('.')}.", t) for o, t in spec.expired_rrsigs)
    return b.finish(signed=spec.signed, ds=spec.ds, now=now, corrupt=corrupt, expired=expired)


def build_zones(
    scenarios: dict[str, Scenario], *, auth_addr: str, now: dt.datetime | None = None
) -> list[LabZone]:
    """All lab zones, children first, then `test.`, then the root (last element).

    Raises:
        ValueError: if a scenario asks to corrupt an RRSIG that does not exist.
    """
    now = now or dt.datetime.now(dt.UTC)
    children = [_child_zone(s, auth_addr, now) for s in scenarios.values()]

    tld = _ZoneBuilder("test.", "ns.test.", auth_addr)
    tld.add("ns.test.", "A", auth_addr)
    for child in children:
        tld.delegate(child, f"ns1.{child.origin}")
    tld_zone = tld.finish(signed=True, ds=True, now=now)

    root = _ZoneBuilder(".", "ns.test.", auth_addr)
    root.delegate(tld_zone, "ns.test.")
    root_zone = root.finish(signed=True, ds=True, now=now)
    return [*children, tld_zone, root_zone]
