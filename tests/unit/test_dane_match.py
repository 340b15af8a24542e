"""relay.dane.match.verify: the RFC 7672 §3 decision matrix on generated certificates.

Every case states the full expected verdict: status, reason token and match depth.
"""

import functools
import hashlib
import ipaddress
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta

import pytest
from certfactory import MX_HOST, NEXT_HOP, NOW, Issued, Pki, _der, _elements, build_pki, issue
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.dane import MAX_CHAIN_LENGTH, DaneStatus, DaneVerdict, TlsaRecord, verify
from relay.dane.match import name_matches

VERIFIED, FAILED, UNAUTH = DaneStatus.VERIFIED, DaneStatus.FAILED, DaneStatus.UNAUTHENTICATED
REFS = (MX_HOST, NEXT_HOP)


def der(*certs: Issued) -> list[bytes]:
    return [c.der for c in certs]


def check(
    verdict: DaneVerdict,
    status: DaneStatus,
    reason: str,
    depth: int | None = None,
    matched: TlsaRecord | None = None,
) -> None:
    assert (verdict.status, verdict.reason, verdict.match_depth) == (status, reason, depth), (
        verdict.detail
    )
    assert verdict.detail
    assert verdict.authenticated is (status is VERIFIED)
    if status is VERIFIED:
        assert verdict.matched is not None
        if matched is not None:
            assert verdict.matched == matched
    else:
        assert verdict.matched is None


def run(
    records: Sequence[TlsaRecord],
    chain: Sequence[bytes],
    refs: Sequence[str] = REFS,
    now: datetime = NOW,
) -> DaneVerdict:
    return verify(records, chain, refs, now)


# --- the matrix: usage {2,3} x selector {0,1} x mtype {0,1,2} x {match, no match} -------

MATRIX = [
    (usage, selector, mtype, matches)
    for usage in (2, 3)
    for selector in (0, 1)
    for mtype in (0, 1, 2)
    for matches in (True, False)
]


@pytest.mark.parametrize(("usage", "selector", "mtype", "matches"), MATRIX)
def test_matrix(pki: Pki, usage: int, selector: int, mtype: int, matches: bool) -> None:
    # DANE-EE(3) pins the leaf; DANE-TA(2) pins the intermediate. The non-matching
    # record is built the same way from the unrelated hierarchy.
    if usage == 3:
        target = pki.leaf if matches else pki.other_leaf
    else:
        target = pki.intermediate if matches else pki.other_intermediate
    record = target.tlsa(usage, selector, mtype)
    verdict = run([record], der(pki.leaf, pki.intermediate))
    if matches:
        check(verdict, VERIFIED, "match", 0 if usage == 3 else 1, record)
    else:
        check(verdict, FAILED, "no-match")


def test_dane_ta_root_in_chain_matches_at_depth_2(pki: Pki) -> None:
    record = pki.root.tlsa(2, 0, 1)
    check(run([record], der(pki.leaf, pki.intermediate, pki.root)), VERIFIED, "match", 2)


def test_lowest_depth_wins(pki: Pki) -> None:
    root, inter = pki.root.tlsa(2, 1, 1), pki.intermediate.tlsa(2, 1, 1)
    chain = der(pki.leaf, pki.intermediate, pki.root)
    check(run([root, inter], chain), VERIFIED, "match", 1, inter)


def test_dane_ee_is_preferred_over_dane_ta(pki: Pki) -> None:
    ta, ee = pki.intermediate.tlsa(2, 1, 1), pki.leaf.tlsa(3, 1, 1)
    check(run([ta, ee], der(pki.leaf, pki.intermediate)), VERIFIED, "match", 0, ee)


# Trust anchor = the root, sent by the server or not. Sent, every selector and matching
# type matches it at depth 2. Not sent, only a record that carries the TA itself can
# complete the chain (RFC 7671 §5.2): Cert(0) Full(0) one above the intermediate it issued
# (depth 2), SPKI(1) Full(0) at the intermediate it signed (depth 1); a digest cannot.
TA_SENT_OR_NOT = [
    (selector, mtype, sent, depth)
    for selector in (0, 1)
    for mtype in (0, 1, 2)
    for sent, depth in (
        (True, 2),
        (False, {(0, 0): 2, (1, 0): 1}.get((selector, mtype))),
    )
]


@pytest.mark.parametrize(("selector", "mtype", "sent", "depth"), TA_SENT_OR_NOT)
def test_matrix_trust_anchor_sent_or_not(
    pki: Pki, selector: int, mtype: int, sent: bool, depth: int | None
) -> None:
    record = pki.root.tlsa(2, selector, mtype)
    chain = der(pki.leaf, pki.intermediate, *([pki.root] if sent else []))
    if depth is None:
        check(run([record], chain), FAILED, "no-match")
    else:
        check(run([record], chain), VERIFIED, "match", depth, record)


# PKIX-TA(0), PKIX-EE(1) and unknown usages are unusable for SMTP (RFC 7672 §3.1.3) even
# when their data matches: alone they leave the connection unauthenticated...
UNUSABLE_MATRIX = [
    (usage, selector, mtype)
    for usage in (0, 1, 4, 255)
    for selector in (0, 1)
    for mtype in (0, 1, 2)
]


@pytest.mark.parametrize(("usage", "selector", "mtype"), UNUSABLE_MATRIX)
def test_matrix_unusable_usages_never_match(
    pki: Pki, usage: int, selector: int, mtype: int
) -> None:
    target = pki.leaf if usage in (1, 3) else pki.intermediate
    unusable = target.tlsa(usage, selector, mtype)
    chain = der(pki.leaf, pki.intermediate, pki.root)
    check(run([unusable], chain), UNAUTH, "no-usable-records")
    # ...and beside a usable record that does not match, they do not rescue it.
    check(run([unusable, pki.other_leaf.tlsa(3, 1, 1)], chain), FAILED, "no-match")


@pytest.mark.parametrize(
    "record",
    [
        TlsaRecord(3, 2, 1, bytes(32)),  # unknown selector
        TlsaRecord(3, 1, 3, bytes(32)),  # unknown matching type
        TlsaRecord(3, 1, 255, bytes(32)),  # PrivMatch
        TlsaRecord(3, 1, 1, bytes(33)),  # digest of the wrong length
        TlsaRecord(2, 1, 2, bytes(32)),
        TlsaRecord(3, 0, 0, b""),  # Full(0) with no data
    ],
    ids=str,
)
def test_unusable_record_beside_a_matching_one(pki: Pki, record: TlsaRecord) -> None:
    good = pki.leaf.tlsa(3, 1, 1)
    check(run([record], der(pki.leaf)), UNAUTH, "no-usable-records")
    check(run([record, good], der(pki.leaf)), VERIFIED, "match", 0, good)
    check(run([good, record], der(pki.leaf)), VERIFIED, "match", 0, good)


# --- DANE-EE(3): no names, no dates (RFC 7672 §3.1.1) ------------------------------------


@pytest.mark.parametrize(
    "name",
    ["expired_leaf", "future_leaf", "self_signed", "no_names", "san_and_cn", "sha1_leaf"],
)
def test_dane_ee_ignores_names_dates_and_issuer(pki: Pki, name: str) -> None:
    leaf: Issued = getattr(pki, name)
    record = leaf.tlsa(3, 1, 1)
    check(run([record], [leaf.der], refs=["elsewhere.example"]), VERIFIED, "match", 0)


def test_dane_ee_ignores_an_unrelated_chain(pki: Pki) -> None:
    # Only the leaf matters; the rest of the chain need not chain to anything.
    record = pki.leaf.tlsa(3, 0, 1)
    check(run([record], der(pki.leaf, pki.other_root)), VERIFIED, "match", 0)


def test_dane_ee_ignores_an_expired_intermediate(pki: Pki) -> None:
    chain = der(pki.under_expired, pki.expired_intermediate, pki.root)
    check(run([pki.under_expired.tlsa(3, 1, 1)], chain), VERIFIED, "match", 0)


def test_dane_ee_matches_only_the_leaf(pki: Pki) -> None:
    # A DANE-EE(3) record for the intermediate does not match at depth 1.
    record = pki.intermediate.tlsa(3, 1, 1)
    check(run([record], der(pki.leaf, pki.intermediate)), FAILED, "no-match")


# --- DANE-TA(2): chain and names (RFC 7672 §3.1.2, §3.2) --------------------------------


def test_dane_ta_name_mismatch(pki: Pki) -> None:
    record = pki.intermediate.tlsa(2, 1, 1)
    verdict = run([record], der(pki.leaf, pki.intermediate), refs=["mx.example.org"])
    check(verdict, FAILED, "name-mismatch")


@pytest.mark.parametrize(
    ("refs", "status", "reason"),
    [
        ([MX_HOST], VERIFIED, "match"),
        ([NEXT_HOP, MX_HOST], VERIFIED, "match"),  # any reference identifier may match
        (["MX.Example.NET."], VERIFIED, "match"),  # case-insensitive, trailing dot ignored
        (["example.net"], FAILED, "name-mismatch"),
        (["mx.example.net.evil"], FAILED, "name-mismatch"),
        (["x" + MX_HOST], FAILED, "name-mismatch"),
        ([], FAILED, "name-mismatch"),
    ],
)
def test_dane_ta_reference_identifiers(
    pki: Pki, refs: list[str], status: DaneStatus, reason: str
) -> None:
    record = pki.intermediate.tlsa(2, 0, 1)
    verdict = run([record], der(pki.leaf, pki.intermediate), refs=refs)
    check(verdict, status, reason, 1 if status is VERIFIED else None)


@pytest.mark.parametrize(
    ("ref", "status", "reason"),
    [
        ("mx.example.net", VERIFIED, "match"),
        ("MAIL.EXAMPLE.NET", VERIFIED, "match"),
        ("example.net", FAILED, "name-mismatch"),  # the wildcard needs one label
        ("a.b.example.net", FAILED, "name-mismatch"),  # and matches only one
        (".example.net", FAILED, "name-mismatch"),  # not an empty label
        ("mx.example.org", FAILED, "name-mismatch"),
        ("*.example.net", FAILED, "name-mismatch"),  # a reference is never a pattern
    ],
)
def test_dane_ta_wildcard(pki: Pki, ref: str, status: DaneStatus, reason: str) -> None:
    record = pki.intermediate.tlsa(2, 1, 2)
    verdict = run([record], der(pki.wildcard_leaf, pki.intermediate), refs=[ref])
    check(verdict, status, reason, 1 if status is VERIFIED else None)


@pytest.mark.parametrize(
    ("pattern", "ref", "matches"),
    [
        ("*.example.net", "mx.example.net", True),
        ("*.net", "example.net", False),  # no wildcard over a single label
        ("mx*.example.net", "mx1.example.net", False),  # partial-label wildcards refused
        ("*mx.example.net", "amx.example.net", False),
        ("mx.*.net", "mx.example.net", False),
        ("*.*.net", "a.b.net", False),
        ("", "mx.example.net", False),
    ],
)
def test_wildcard_forms(pki: Pki, pattern: str, ref: str, matches: bool) -> None:
    # The reference matching rules in isolation, through a CN-only leaf.
    leaf = issue(pattern or None, issuer=pki.intermediate)
    verdict = run([pki.intermediate.tlsa(2, 1, 1)], der(leaf, pki.intermediate), refs=[ref])
    if matches:
        check(verdict, VERIFIED, "match", 1)
    else:
        check(verdict, FAILED, "name-mismatch")


def test_cn_is_used_only_without_dns_san(pki: Pki) -> None:
    record = pki.intermediate.tlsa(2, 1, 1)
    check(run([record], der(pki.cn_only, pki.intermediate)), VERIFIED, "match", 1)
    # SAN other.example.org present: the CN (MX_HOST) must not be consulted (RFC 6125 §6.4.4).
    check(run([record], der(pki.san_and_cn, pki.intermediate)), FAILED, "name-mismatch")
    verdict = run([record], der(pki.san_and_cn, pki.intermediate), refs=["other.example.org"])
    check(verdict, VERIFIED, "match", 1)


TLSA_BASE = "mx.hosting.example"  # an MX host name's secure CNAME target (RFC 7672 §2.2.2)


@functools.cache
def named_leaves() -> dict[str, bytes]:
    """Leaves under ``pki.intermediate`` naming each kind of reference identifier."""
    intermediate = build_pki().intermediate
    return {
        "next-hop": issue(NEXT_HOP, issuer=intermediate, sans=[NEXT_HOP]).der,
        "tlsa-base": issue(None, issuer=intermediate, sans=[TLSA_BASE]).der,
        "mx-host": issue(None, issuer=intermediate, sans=[MX_HOST]).der,
        "second-san": issue(None, issuer=intermediate, sans=["a.example", MX_HOST]).der,
    }


@pytest.mark.parametrize(
    ("leaf", "refs", "status"),
    [
        # RFC 7672 §3.2.2: the next-hop domain counts only when the caller passes it (a
        # secure MX RRset); a leaf naming only the next hop fails against the MX name.
        ("next-hop", [TLSA_BASE, MX_HOST, NEXT_HOP], VERIFIED),
        ("next-hop", [TLSA_BASE, MX_HOST], FAILED),
        # The TLSA base domain (after CNAME expansion) is a reference identifier too.
        ("tlsa-base", [TLSA_BASE, MX_HOST], VERIFIED),
        ("tlsa-base", [MX_HOST, NEXT_HOP], FAILED),
        ("mx-host", [TLSA_BASE, MX_HOST], VERIFIED),
        ("mx-host", [TLSA_BASE, NEXT_HOP], FAILED),
        # Any DNS-ID may match, not only the first.
        ("second-san", [MX_HOST], VERIFIED),
    ],
)
def test_dane_ta_each_reference_identifier(
    pki: Pki, leaf: str, refs: list[str], status: DaneStatus
) -> None:
    chain = [named_leaves()[leaf], pki.intermediate.der]
    verdict = run([pki.intermediate.tlsa(2, 1, 1)], chain, refs=refs)
    if status is VERIFIED:
        check(verdict, VERIFIED, "match", 1)
    else:
        check(verdict, FAILED, "name-mismatch")


def leaf_with_san(pki: Pki, names: list[x509.GeneralName], cn: str | None) -> bytes:
    """A leaf under ``pki.intermediate`` with any SAN entries (``issue`` makes DNS only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(pki.intermediate.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(pki.intermediate.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_cn_is_used_when_the_san_has_no_dns_name(pki: Pki) -> None:
    # RFC 6125 §6.4.4: CN-ID only without DNS-IDs; IP and e-mail SAN entries are not DNS-IDs.
    others: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("192.0.2.25")),
        x509.RFC822Name("postmaster@" + MX_HOST),
    ]
    record = pki.intermediate.tlsa(2, 1, 1)
    chain = [leaf_with_san(pki, others, MX_HOST), pki.intermediate.der]
    check(run([record], chain), VERIFIED, "match", 1)
    # A DNS-ID beside them hides the CN again.
    chain = [leaf_with_san(pki, [*others, x509.DNSName("x.example")], MX_HOST), chain[1]]
    check(run([record], chain), FAILED, "name-mismatch")


def test_leaf_without_san_or_cn_fails_name_check(pki: Pki) -> None:
    record = pki.intermediate.tlsa(2, 1, 1)
    check(run([record], der(pki.no_names, pki.intermediate)), FAILED, "name-mismatch")


def test_dane_ta_expired_intermediate(pki: Pki) -> None:
    record = pki.root.tlsa(2, 1, 1)
    chain = der(pki.under_expired, pki.expired_intermediate, pki.root)
    check(run([record], chain), FAILED, "expired")


def test_dane_ta_not_yet_valid_intermediate(pki: Pki) -> None:
    future_ca = issue("Future CA", issuer=pki.root, ca=True, not_before=NOW + timedelta(days=1))
    leaf = issue(MX_HOST, issuer=future_ca, sans=[MX_HOST])
    chain = der(leaf, future_ca, pki.root)
    check(run([pki.root.tlsa(2, 0, 1)], chain), FAILED, "not-yet-valid")
    # Also when the root comes from DNS rather than the chain.
    check(run([pki.root.tlsa(2, 0, 0)], chain[:2]), FAILED, "not-yet-valid")
    check(run([future_ca.tlsa(2, 1, 1)], chain), VERIFIED, "match", 1)


def test_dane_ta_expired_intermediate_is_fine_as_the_anchor(pki: Pki) -> None:
    # The trust anchor is a name and key (RFC 5280 §6.1.1(d)); its own dates do not count.
    record = pki.expired_intermediate.tlsa(2, 1, 1)
    chain = der(pki.under_expired, pki.expired_intermediate)
    check(run([record], chain), VERIFIED, "match", 1)


def test_dane_ta_expired_and_future_leaf(pki: Pki) -> None:
    record = pki.intermediate.tlsa(2, 1, 1)
    check(run([record], der(pki.expired_leaf, pki.intermediate)), FAILED, "expired")
    check(run([record], der(pki.future_leaf, pki.intermediate)), FAILED, "not-yet-valid")


def test_dane_ta_dates_are_checked_at_now(pki: Pki) -> None:
    record = pki.intermediate.tlsa(2, 1, 1)
    chain = der(pki.expired_leaf, pki.intermediate)
    then = pki.expired_leaf.cert.not_valid_after_utc
    check(run([record], chain, now=then), VERIFIED, "match", 1)


def test_dane_ta_never_matches_the_leaf_position(pki: Pki) -> None:
    # Stalwart "noleaf": the CA certificate is sent first; its own TA record must not match.
    record = pki.intermediate.tlsa(2, 1, 1)
    check(run([record], der(pki.intermediate, pki.root)), FAILED, "no-match")
    # A self-signed leaf named by a DANE-TA(2) digest is not its own anchor either...
    self_signed = pki.self_signed.tlsa(2, 0, 1)
    check(run([self_signed], [pki.self_signed.der]), FAILED, "no-match")
    # ...not even when it is sent twice, or published in full.
    check(run([self_signed], der(pki.self_signed, pki.self_signed)), FAILED, "no-match")
    check(run([pki.self_signed.tlsa(2, 0, 0)], [pki.self_signed.der]), FAILED, "no-match")


def test_dane_ta_leaf_not_issued_by_the_anchor(pki: Pki) -> None:
    record = pki.intermediate.tlsa(2, 1, 1)
    check(run([record], der(pki.other_leaf, pki.intermediate)), FAILED, "chain-invalid")


@pytest.mark.parametrize(
    ("leaf", "middle"),
    [
        ("under_non_ca", "non_ca_intermediate"),  # basicConstraints cA=FALSE
        ("under_no_bc", "no_bc_intermediate"),  # no basicConstraints at all
    ],
)
def test_dane_ta_intermediate_must_be_a_ca(pki: Pki, leaf: str, middle: str) -> None:
    record = pki.intermediate.tlsa(2, 1, 1)
    chain = [getattr(pki, leaf).der, getattr(pki, middle).der, pki.intermediate.der]
    check(run([record], chain), FAILED, "chain-invalid")


def test_dane_ta_path_length_constraint(pki: Pki) -> None:
    chain = der(pki.under_sub, pki.sub_intermediate, pki.pathlen0_intermediate, pki.root)
    check(run([pki.root.tlsa(2, 1, 1)], chain), FAILED, "chain-invalid")
    # With the sub CA itself as anchor the constraint above it is irrelevant.
    check(run([pki.sub_intermediate.tlsa(2, 1, 1)], chain), VERIFIED, "match", 1)


def test_dane_ta_refuses_sha1_signatures(pki: Pki) -> None:
    chain = der(pki.sha1_leaf, pki.intermediate)
    check(run([pki.intermediate.tlsa(2, 1, 1)], chain), FAILED, "chain-invalid")
    check(run([pki.intermediate.tlsa(2, 1, 0)], [pki.sha1_leaf.der]), FAILED, "no-match")


def test_dane_ta_chain_without_key_identifiers(pki: Pki) -> None:
    chain = der(pki.nokid_leaf, pki.nokid_intermediate, pki.nokid_root)
    check(run([pki.nokid_root.tlsa(2, 0, 2)], chain), VERIFIED, "match", 2)


def test_dane_ta_out_of_order_and_extra_certificates(pki: Pki) -> None:
    record = pki.root.tlsa(2, 1, 1)
    chain = der(pki.leaf, pki.other_root, pki.root, pki.intermediate)
    # Depth is the position in the verified path, not in the list as sent.
    check(run([record], chain), VERIFIED, "match", 2)


# --- trust anchors published in DNS (RFC 7671 §5.2) ------------------------------------


def test_dns_ta_certificate_not_in_chain(pki: Pki) -> None:
    check(run([pki.root.tlsa(2, 0, 0)], der(pki.leaf, pki.intermediate)), VERIFIED, "match", 2)
    check(run([pki.intermediate.tlsa(2, 0, 0)], [pki.leaf.der]), VERIFIED, "match", 1)


def test_dns_ta_bare_key(pki: Pki) -> None:
    check(run([pki.intermediate.tlsa(2, 1, 0)], [pki.leaf.der]), VERIFIED, "match", 0)
    check(run([pki.root.tlsa(2, 1, 0)], der(pki.leaf, pki.intermediate)), VERIFIED, "match", 1)


def test_dns_ta_certificate_that_issued_nothing(pki: Pki) -> None:
    check(run([pki.other_root.tlsa(2, 0, 0)], der(pki.leaf, pki.intermediate)), FAILED, "no-match")
    check(run([pki.other_root.tlsa(2, 1, 0)], der(pki.leaf, pki.intermediate)), FAILED, "no-match")


def test_dns_ta_digest_only_cannot_complete_the_chain(pki: Pki) -> None:
    # A digest of the missing intermediate carries no key to verify the leaf with.
    check(run([pki.intermediate.tlsa(2, 1, 1)], [pki.leaf.der]), FAILED, "no-match")


def test_dns_ta_undecodable_full_data_is_ignored(pki: Pki) -> None:
    junk = [TlsaRecord(2, 0, 0, b"\x30\x03\x02\x01\x00"), TlsaRecord(2, 1, 0, b"junk")]
    check(run(junk, der(pki.leaf, pki.intermediate)), FAILED, "no-match")
    check(run([*junk, pki.leaf.tlsa(3, 1, 1)], [pki.leaf.der]), VERIFIED, "match", 0)


def test_dns_ta_name_and_date_checks_still_apply(pki: Pki) -> None:
    check(run([pki.intermediate.tlsa(2, 1, 0)], [pki.expired_leaf.der]), FAILED, "expired")
    verdict = run([pki.intermediate.tlsa(2, 0, 0)], [pki.leaf.der], refs=["other.example"])
    check(verdict, FAILED, "name-mismatch")


# --- usability, digest agility, mixed RRsets ----------------------------------------------


def test_mixed_usable_and_unusable_records_still_match(pki: Pki) -> None:
    records = [
        pki.root.tlsa(0, 0, 1),
        pki.leaf.tlsa(1, 1, 1),
        TlsaRecord(3, 1, 255, b"\x00"),
        TlsaRecord(3, 7, 1, bytes(32)),
        TlsaRecord(3, 1, 1, bytes(31)),
        pki.leaf.tlsa(3, 1, 1),
    ]
    check(run(records, der(pki.leaf, pki.intermediate)), VERIFIED, "match", 0, records[-1])


def test_only_unusable_records_are_unauthenticated(pki: Pki) -> None:
    records = [pki.leaf.tlsa(1, 1, 1), pki.root.tlsa(0, 0, 1), TlsaRecord(255, 1, 1, bytes(32))]
    check(run(records, der(pki.leaf, pki.intermediate)), UNAUTH, "no-usable-records")
    # With nothing usable the chain is never examined: empty or garbage makes no difference.
    check(run(records, []), UNAUTH, "no-usable-records")
    check(run(records, [b"junk"]), UNAUTH, "no-usable-records")
    check(run([], der(pki.leaf)), UNAUTH, "no-usable-records")


def test_digest_agility_ignores_the_weaker_digest(pki: Pki) -> None:
    chain = der(pki.leaf, pki.intermediate)
    good_256, good_512 = pki.leaf.tlsa(3, 1, 1), pki.leaf.tlsa(3, 1, 2)
    bad_256, bad_512 = pki.other_leaf.tlsa(3, 1, 1), pki.other_leaf.tlsa(3, 1, 2)
    # SHA2-512 present: the matching SHA2-256 record is ignored (RFC 7671 §9).
    check(run([good_256, bad_512], chain), FAILED, "no-match")
    check(run([bad_256, good_512], chain), VERIFIED, "match", 0, good_512)
    # Only within the same usage and selector: a Cert(0) SHA2-256 record still counts...
    good_cert_256 = pki.leaf.tlsa(3, 0, 1)
    check(run([good_cert_256, bad_512], chain), VERIFIED, "match", 0, good_cert_256)
    # ...and Full(0) is not a digest, so SHA2-512 does not hide it.
    good_full = pki.leaf.tlsa(3, 1, 0)
    check(run([good_full, bad_512], chain), VERIFIED, "match", 0, good_full)


def test_digest_agility_for_dane_ta(pki: Pki) -> None:
    chain = der(pki.leaf, pki.intermediate)
    good_256 = pki.intermediate.tlsa(2, 1, 1)
    bad_512 = pki.other_intermediate.tlsa(2, 1, 2)
    check(run([good_256, bad_512], chain), FAILED, "no-match")
    # DANE-EE and DANE-TA are separate: an EE SHA2-512 does not hide a TA SHA2-256.
    check(run([good_256, pki.other_leaf.tlsa(3, 1, 2)], chain), VERIFIED, "match", 1)


# --- malformed input ------------------------------------------------------------------------


def test_empty_chain(pki: Pki) -> None:
    check(run([pki.leaf.tlsa(3, 1, 1)], []), FAILED, "no-chain")


def test_chain_too_long_for_dane_ta(pki: Pki) -> None:
    chain = [pki.leaf.der] + [pki.other_root.der] * (MAX_CHAIN_LENGTH - 2) + [pki.intermediate.der]
    check(run([pki.intermediate.tlsa(2, 1, 1)], chain), VERIFIED, "match", 1)
    too_long = [*chain[:-1], pki.other_root.der, pki.intermediate.der]
    check(run([pki.intermediate.tlsa(2, 1, 1)], too_long), FAILED, "chain-too-long")
    # DANE-EE(3) looks at the leaf only, whatever follows it.
    check(run([pki.leaf.tlsa(3, 1, 1)], too_long), VERIFIED, "match", 0)


MANGLES: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda d: b"",
    "junk": lambda d: b"junk",
    "truncated-1": lambda d: d[:-1],
    "truncated-half": lambda d: d[: len(d) // 2],
    "trailing-byte": lambda d: d + b"\x00",
    "wrong-tag": lambda d: b"\x31" + d[1:],
    # X.509 version field 2 (v3) -> 3 (no such version): cryptography raises
    # InvalidVersion, which is not a ValueError (found by the bit-flip fuzz test).
    "invalid-version": lambda d: d.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x03", 1),
}
#: Mangles that keep the outer DER structure (and the SPKI) intact: cryptography refuses
#: the certificate, but a DANE-EE(3) digest needs no decoding (issue 4 item 6).
STRUCTURE_INTACT = {"invalid-version"}


@pytest.mark.parametrize("mangle", MANGLES)
def test_bad_leaf_fails_without_exception(pki: Pki, mangle: str) -> None:
    chain = [MANGLES[mangle](pki.leaf.der), pki.intermediate.der]
    check(run([pki.intermediate.tlsa(2, 1, 1)], chain), FAILED, "bad-certificate")
    if mangle in STRUCTURE_INTACT:
        check(run([pki.leaf.tlsa(3, 1, 1)], chain), VERIFIED, "match", 0)
    else:
        check(run([pki.leaf.tlsa(3, 1, 1)], chain), FAILED, "bad-certificate")


@pytest.mark.parametrize("mangle", MANGLES)
def test_bad_issuer_certificate(pki: Pki, mangle: str) -> None:
    chain = [pki.leaf.der, MANGLES[mangle](pki.intermediate.der), pki.root.der]
    # DANE-TA(2) needs the chain: an undecodable certificate in it fails closed...
    check(run([pki.root.tlsa(2, 1, 1)], chain), FAILED, "bad-certificate")
    # ...DANE-EE(3) never looks past the leaf (RFC 7672 §3.1.1).
    check(run([pki.leaf.tlsa(3, 1, 1)], chain), VERIFIED, "match", 0)
    check(run([pki.other_leaf.tlsa(3, 1, 1)], chain), FAILED, "no-match")


# --- certificates cryptography refuses or warns about (issue 4 item 6) -----------------------

#: serialNumber encodings. cryptography 50 loads non-positive serials with a
#: CryptographyDeprecationWarning ("will cause an exception in a future release") and
#: refuses a non-minimal INTEGER with ValueError; both were checked before writing these.
SERIALS = {
    "negative": b"\xff\x01",  # -255
    "zero": b"\x00",
    "non-minimal": b"\x00\x01",  # 1 with a redundant leading zero: not DER
}


def with_serial(cert: Issued, issuer: Issued, serial: bytes) -> bytes:
    """``cert``'s DER with its serialNumber contents replaced, validly re-signed by
    ``issuer`` (cryptography's builder refuses such serials, so the TBS is edited)."""
    fields = _elements(cert.cert.tbs_certificate_bytes)
    fields[1] = _der(0x02, serial)  # [0] version, serialNumber, ...
    tbs = _der(0x30, b"".join(fields))
    algorithm = _elements(cert.der)[1]
    signature = issuer.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _der(0x30, tbs + algorithm + _der(0x03, b"\x00" + signature))


@pytest.fixture
def warnings_are_errors() -> Iterator[None]:
    """No warning may escape ``verify``; under ``-W error`` one would be an exception."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.usefixtures("warnings_are_errors")
@pytest.mark.parametrize("serial", SERIALS)
def test_refused_leaf_still_matches_dane_ee(pki: Pki, serial: str) -> None:
    leaf = with_serial(pki.leaf, pki.intermediate, SERIALS[serial])
    chain = [leaf, pki.intermediate.der]
    # The key is the original leaf's; Cert(0) records are computed over the edited DER.
    for record in (
        pki.leaf.tlsa(3, 1, 1),
        pki.leaf.tlsa(3, 1, 0),
        TlsaRecord(3, 0, 1, hashlib.sha256(leaf).digest()),
        TlsaRecord(3, 0, 2, hashlib.sha512(leaf).digest()),
        TlsaRecord(3, 0, 0, leaf),
    ):
        check(run([record], chain), VERIFIED, "match", 0, record)
    check(run([pki.other_leaf.tlsa(3, 1, 1)], chain), FAILED, "no-match")


@pytest.mark.usefixtures("warnings_are_errors")
@pytest.mark.parametrize("serial", SERIALS)
def test_refused_leaf_is_unverifiable_for_dane_ta(pki: Pki, serial: str) -> None:
    leaf = with_serial(pki.leaf, pki.intermediate, SERIALS[serial])
    verdict = run([pki.intermediate.tlsa(2, 1, 1)], [leaf, pki.intermediate.der])
    check(verdict, FAILED, "bad-certificate")
    assert "certificate 0" in verdict.detail and "DANE-TA(2)" in verdict.detail
    # A DANE-EE(3) record beside the DANE-TA(2) one still wins.
    records = [pki.intermediate.tlsa(2, 1, 1), pki.leaf.tlsa(3, 1, 1)]
    check(run(records, [leaf, pki.intermediate.der]), VERIFIED, "match", 0, records[1])


@pytest.mark.usefixtures("warnings_are_errors")
@pytest.mark.parametrize("serial", SERIALS)
def test_refused_intermediate(pki: Pki, serial: str) -> None:
    middle = with_serial(pki.intermediate, pki.root, SERIALS[serial])
    chain = [pki.leaf.der, middle, pki.root.der]
    check(run([pki.root.tlsa(2, 1, 1)], chain), FAILED, "bad-certificate")
    # Even as the anchor itself: DANE-TA(2) needs it decoded to check the leaf's signature.
    check(run([pki.intermediate.tlsa(2, 1, 1)], chain), FAILED, "bad-certificate")
    check(run([pki.leaf.tlsa(3, 0, 1)], chain), VERIFIED, "match", 0)


@pytest.mark.usefixtures("warnings_are_errors")
def test_refused_trust_anchor_certificate_from_dns_is_ignored(pki: Pki) -> None:
    root = with_serial(pki.root, pki.root, SERIALS["negative"])
    chain = der(pki.leaf, pki.intermediate)
    check(run([TlsaRecord(2, 0, 0, root)], chain), FAILED, "no-match")
    # The same key published bare (SPKI(1) Full(0)) has no serial number to refuse.
    check(run([pki.root.tlsa(2, 1, 0)], chain), VERIFIED, "match", 1)


@pytest.mark.usefixtures("warnings_are_errors")
def test_positive_serials_of_any_length_still_decode(pki: Pki) -> None:
    # Only the sign is judged: a 21-octet serial (over RFC 5280's 20) is cryptography's
    # call, and it accepts it, so DANE-TA(2) still works.
    leaf = with_serial(pki.leaf, pki.intermediate, b"\x01" * 21)
    check(run([pki.intermediate.tlsa(2, 1, 1)], [leaf, pki.intermediate.der]), VERIFIED, "match", 1)


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=3))
def test_random_bytes_never_raise(blobs: list[bytes]) -> None:
    records = [TlsaRecord(3, 1, 1, bytes(32)), TlsaRecord(2, 0, 0, b"\x30\x00")]
    verdict = verify(records, blobs, REFS, NOW)
    assert verdict.status is FAILED


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_bit_flipped_chains_never_raise(pki: Pki, data: st.DataObject) -> None:
    chain = der(pki.leaf, pki.intermediate, pki.root)
    which = data.draw(st.integers(0, 2))
    blob = bytearray(chain[which])
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    chain[which] = bytes(blob)
    records = [pki.root.tlsa(2, 1, 1), pki.intermediate.tlsa(2, 0, 0), pki.leaf.tlsa(3, 0, 1)]
    verdict = verify(records, chain, REFS, NOW)
    assert verdict.status in (VERIFIED, FAILED)


# --- argument contract ------------------------------------------------------------------------


def test_naive_now_is_a_programming_error(pki: Pki) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify([pki.leaf.tlsa(3, 1, 1)], [pki.leaf.der], REFS, NOW.replace(tzinfo=None))


def test_single_string_arguments_are_rejected(pki: Pki) -> None:
    with pytest.raises(TypeError):
        verify([pki.leaf.tlsa(3, 1, 1)], [pki.leaf.der], MX_HOST, NOW)
    with pytest.raises(TypeError):
        verify([pki.leaf.tlsa(3, 1, 1)], pki.leaf.der, REFS, NOW)  # type: ignore[arg-type]


def test_verdict_is_a_frozen_value(pki: Pki) -> None:
    verdict = run([pki.leaf.tlsa(3, 1, 1)], [pki.leaf.der])
    with pytest.raises(AttributeError):
        verdict.reason = "x"  # type: ignore[misc]
    assert verdict == run([pki.leaf.tlsa(3, 1, 1)], [pki.leaf.der])


# --- DANE-TA(2) PKIX checks the adversarial tester found missing (DANE-EE(3) ignores them) -

_UNKNOWN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1")
_SRV_ID_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.7")


def _unknown(critical: bool = True) -> tuple[x509.ExtensionType, bool]:
    return x509.UnrecognizedExtension(_UNKNOWN_OID, b"\x05\x00"), critical


def _eku(*oids: x509.ObjectIdentifier) -> tuple[x509.ExtensionType, bool]:
    return x509.ExtendedKeyUsage(list(oids)), False


def _constraints(
    permitted: Sequence[x509.GeneralName] | None = None,
    excluded: Sequence[x509.GeneralName] | None = None,
) -> tuple[x509.ExtensionType, bool]:
    return x509.NameConstraints(permitted, excluded), True


def _leaf_via_ca(
    ca_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (), **leaf: object
) -> tuple[Issued, Issued]:
    """(leaf, CA issued by ``pki.root`` with ``ca_extensions``); the leaf names MX_HOST."""
    ca = issue("Constrained CA", issuer=build_pki().root, ca=True, extensions=ca_extensions)
    options: dict[str, object] = {"sans": [MX_HOST], **leaf}
    return issue(MX_HOST, issuer=ca, **options), ca  # type: ignore[arg-type]


def _ta_paths(pki: Pki, leaf: Issued, ca: Issued) -> Iterator[DaneVerdict]:
    """The DANE-TA(2) verdicts with the CA (sent and from DNS), the root (same) as anchor."""
    yield run([ca.tlsa(2, 1, 1)], der(leaf, ca))
    yield run([ca.tlsa(2, 0, 0)], der(leaf))
    yield run([pki.root.tlsa(2, 0, 1)], der(leaf, ca, pki.root))
    yield run([pki.root.tlsa(2, 0, 0)], der(leaf, ca))


def test_critical_unknown_extension_on_the_leaf(pki: Pki) -> None:
    # RFC 5280 §4.2: a certificate with a critical extension that is not processed is invalid.
    leaf = issue(MX_HOST, issuer=pki.intermediate, sans=[MX_HOST], extensions=[_unknown()])
    record = pki.intermediate.tlsa(2, 1, 1)
    check(run([record], der(leaf, pki.intermediate)), FAILED, "unhandled-critical-extension")
    check(run([leaf.tlsa(3, 1, 1)], der(leaf)), VERIFIED, "match", 0)
    # Not critical: ignored.
    plain = issue(MX_HOST, issuer=pki.intermediate, sans=[MX_HOST], extensions=[_unknown(False)])
    check(run([record], der(plain, pki.intermediate)), VERIFIED, "match", 1)


def test_critical_unknown_extension_on_an_intermediate(pki: Pki) -> None:
    leaf, ca = _leaf_via_ca([_unknown()])
    check(
        run([pki.root.tlsa(2, 0, 1)], der(leaf, ca, pki.root)),
        FAILED,
        "unhandled-critical-extension",
    )
    # The anchor itself is a name and a key: its extensions are not checked.
    check(run([ca.tlsa(2, 1, 1)], der(leaf, ca)), VERIFIED, "match", 1)


def test_critical_policy_extensions_are_accepted(pki: Pki) -> None:
    policies = x509.CertificatePolicies(
        [x509.PolicyInformation(x509.ObjectIdentifier("2.5.29.32.0"), None)]
    )
    leaf, ca = _leaf_via_ca(
        [
            (policies, True),
            (x509.PolicyConstraints(0, None), True),
            (x509.InhibitAnyPolicy(0), True),
        ],
        extensions=[(policies, True)],
    )
    for verdict in _ta_paths(pki, leaf, ca):
        assert verdict.status is VERIFIED, verdict.detail


@pytest.mark.parametrize(
    ("permitted", "excluded", "ok"),
    [
        ([x509.DNSName("example.org")], None, False),
        ([x509.DNSName("example.net")], None, True),
        ([x509.DNSName("EXAMPLE.NET")], None, True),  # case-insensitive
        ([x509.DNSName("mx.example.net")], None, True),  # the name itself
        ([x509.DNSName(".mx.example.net")], None, False),  # only its sub-domains
        ([x509.DNSName(".example.net")], None, True),
        ([x509.DNSName("xample.net")], None, False),  # label boundary
        ([x509.DNSName("example.org"), x509.DNSName("example.net")], None, True),
        (None, [x509.DNSName("example.net")], False),
        (None, [x509.DNSName(".example.net")], False),
        (None, [x509.DNSName("Mx.Example.Net")], False),
        (None, [x509.DNSName("example.org")], True),
        ([x509.DNSName("example.net")], [x509.DNSName("mx.example.net")], False),
    ],
)
def test_dns_name_constraints(
    pki: Pki,
    permitted: list[x509.GeneralName] | None,
    excluded: list[x509.GeneralName] | None,
    ok: bool,
) -> None:
    # RFC 5280 §4.2.1.10: a CA's name constraints bind every name of the leaf.
    leaf, ca = _leaf_via_ca([_constraints(permitted, excluded)])
    for verdict in _ta_paths(pki, leaf, ca):
        if ok:
            assert (verdict.status, verdict.reason) == (VERIFIED, "match"), verdict.detail
        else:
            check(verdict, FAILED, "name-constraints")
    check(run([leaf.tlsa(3, 1, 1)], der(leaf)), VERIFIED, "match", 0)


def test_dns_name_constraints_on_cn_and_wildcards(pki: Pki) -> None:
    nc = _constraints([x509.DNSName("example.org")])
    cn_only, ca = _leaf_via_ca([nc], sans=[])
    check(run([ca.tlsa(2, 1, 1)], der(cn_only, ca)), FAILED, "name-constraints")
    # "*.example.net" can stand for the excluded "mx.example.net".
    excluded = _constraints(None, [x509.DNSName("mx.example.net")])
    wildcard, ca = _leaf_via_ca([excluded], sans=["*.example.net"])
    check(run([ca.tlsa(2, 1, 1)], der(wildcard, ca)), FAILED, "name-constraints")
    # Every SAN dNSName counts, not only the one that matches a reference identifier.
    extra, ca = _leaf_via_ca([nc], sans=["mx.example.org", MX_HOST])
    check(run([ca.tlsa(2, 1, 1)], der(extra, ca)), FAILED, "name-constraints")


def test_other_name_type_constraints_fail_conservatively(pki: Pki) -> None:
    ip_nc = _constraints([x509.IPAddress(ipaddress.ip_network("192.0.2.0/24"))])
    with_ip, ca = _leaf_via_ca(
        [ip_nc], other_sans=[x509.IPAddress(ipaddress.ip_address("192.0.2.1"))]
    )
    check(run([ca.tlsa(2, 1, 1)], der(with_ip, ca)), FAILED, "name-constraints")
    without_ip, ca = _leaf_via_ca([ip_nc])
    check(run([ca.tlsa(2, 1, 1)], der(without_ip, ca)), VERIFIED, "match", 1)


def test_directory_name_constraints(pki: Pki) -> None:
    acme = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")])
    nc = _constraints([x509.DirectoryName(acme)])
    outside, ca = _leaf_via_ca([nc])
    check(run([ca.tlsa(2, 1, 1)], der(outside, ca)), FAILED, "name-constraints")
    inside_subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ACME"),
            x509.NameAttribute(NameOID.COMMON_NAME, MX_HOST),
        ]
    )
    inside, ca = _leaf_via_ca([nc], subject=inside_subject)
    check(run([ca.tlsa(2, 1, 1)], der(inside, ca)), VERIFIED, "match", 1)
    excluded, ca = _leaf_via_ca(
        [_constraints(None, [x509.DirectoryName(acme)])], subject=inside_subject
    )
    check(run([ca.tlsa(2, 1, 1)], der(excluded, ca)), FAILED, "name-constraints")


def test_non_ascii_presented_name_is_not_case_folded(pki: Pki) -> None:
    # RFC 6125 §6.4.2: "mx.\u212aexample.com" (KELVIN SIGN) is not the A-label "mx.kexample.com".
    leaf = issue("mx.\u212aexample.com", issuer=pki.intermediate)
    record = pki.intermediate.tlsa(2, 1, 1)
    check(run([record], der(leaf, pki.intermediate), ["mx.kexample.com"]), FAILED, "name-mismatch")
    assert not name_matches("mx.\u212aexample.com", "mx.kexample.com")
    assert not name_matches("mx.kexample.com", "mx.\u212aexample.com")
    check(run([leaf.tlsa(3, 1, 1)], der(leaf), ["mx.kexample.com"]), VERIFIED, "match", 0)


@pytest.mark.parametrize(
    ("other", "cn_used"),
    [
        (x509.UniformResourceIdentifier(f"smtp://{MX_HOST}"), False),
        (x509.OtherName(_SRV_ID_OID, _der(0x16, f"_smtp.{MX_HOST}".encode())), False),
        (x509.IPAddress(ipaddress.ip_address("192.0.2.1")), True),
        (x509.RFC822Name(f"postmaster@{MX_HOST}"), True),
    ],
)
def test_cn_fallback_only_without_dns_srv_or_uri_ids(
    pki: Pki, other: x509.GeneralName, cn_used: bool
) -> None:
    # RFC 6125 §6.4.4: the CN is used only when the SAN has no DNS-ID, SRV-ID or URI-ID.
    leaf = issue(MX_HOST, issuer=pki.intermediate, other_sans=[other])
    verdict = run([pki.intermediate.tlsa(2, 1, 1)], der(leaf, pki.intermediate))
    if cn_used:
        check(verdict, VERIFIED, "match", 1)
    else:
        check(verdict, FAILED, "name-mismatch")


@pytest.mark.parametrize(
    ("purposes", "ok"),
    [
        ([ExtendedKeyUsageOID.CLIENT_AUTH], False),
        ([ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CODE_SIGNING], False),
        ([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH], True),
        ([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], True),
    ],
)
def test_leaf_extended_key_usage(pki: Pki, purposes: list[x509.ObjectIdentifier], ok: bool) -> None:
    leaf = issue(MX_HOST, issuer=pki.intermediate, sans=[MX_HOST], extensions=[_eku(*purposes)])
    verdict = run([pki.intermediate.tlsa(2, 1, 1)], der(leaf, pki.intermediate))
    if ok:
        check(verdict, VERIFIED, "match", 1)
    else:
        check(verdict, FAILED, "bad-purpose")
    check(run([leaf.tlsa(3, 1, 1)], der(leaf)), VERIFIED, "match", 0)


def test_intermediate_extended_key_usage(pki: Pki) -> None:
    leaf, ca = _leaf_via_ca([_eku(ExtendedKeyUsageOID.CLIENT_AUTH)])
    check(run([pki.root.tlsa(2, 0, 1)], der(leaf, ca, pki.root)), FAILED, "bad-purpose")
    leaf, ca = _leaf_via_ca([_eku(ExtendedKeyUsageOID.SERVER_AUTH)])
    check(run([pki.root.tlsa(2, 0, 1)], der(leaf, ca, pki.root)), VERIFIED, "match", 2)
