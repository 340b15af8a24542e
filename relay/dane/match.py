"""DANE authentication of an SMTP server's certificate chain (RFC 7672 §3, RFC 7671 §5).

Owns ``verify``: TLSA RRset (already DNSSEC-validated) + the certificates the server sent
+ reference identifiers + current time -> one ``DaneVerdict`` (status, token, operator text).

Guarantees: a pure function (no I/O, no clock, no global state); peer-supplied bytes never
raise (bad DER -> ``FAILED``/``bad-certificate``, no certificate -> ``FAILED``/``no-chain``);
``matched``/``match_depth`` are set exactly when the status is ``VERIFIED``. DANE-EE(3)
needs only the leaf's bytes: its outer DER structure is walked by hand to find the SPKI, so a
leaf that ``cryptography`` refuses (a non-minimal or non-positive serial number, a bad version)
still matches a DANE-EE(3) digest (RFC 7672 §3.1.1). DANE-TA(2) needs every certificate decoded
by ``cryptography``; any that is not, or whose serial number is not positive (RFC 5280
§4.1.2.2), makes the chain unverifiable: ``FAILED``/``bad-certificate``.

Theory of operation:
    1. Drop unusable records, apply digest agility (``select_usable``). None left:
       ``UNAUTHENTICATED`` (RFC 7672 §3.1.3), without looking at the chain.
    2. DANE-EE(3) records are matched against the leaf only, with no name or date checks
       (RFC 7672 §3.1.1). A match wins at depth 0, ahead of any DANE-TA(2) match.
    3. DANE-TA(2): a breadth-first search from the leaf through the presented certificates
       (in any order) finds the shallowest anchor: a presented certificate at depth >= 1
       that a record matches, a Cert(0)/Full(0) certificate from DNS that issued one
       (RFC 7671 §5.2), or an SPKI(1)/Full(0) bare key that signed one. Every certificate
       below the anchor must be within its dates, every one above the leaf a CA allowed to
       sign at its depth, every signature valid and not MD5/SHA-1, none with a critical
       extension it does not process (RFC 5280 §4.2), none with an extendedKeyUsage that
       excludes serverAuth (OpenSSL's TLS server purpose).
    4. The name constraints of every CA on the path (the anchor too, when it is a
       certificate) must allow the leaf's names (RFC 5280 §4.2.1.10). Then a leaf DNS-ID
       (CN only when the SAN has no DNS-ID, SRV-ID or URI-ID) must match a reference
       identifier (RFC 7672 §3.2.3); presented names must be ASCII (A-labels).

Depths follow OpenSSL's convention (see the conformance vectors' README): the anchor's
position in the verified path, leaf = 0; a DNS certificate sits one above the certificate
it issued, a bare key at the one it signed. For an ordered chain that is the ``chain`` index.

Does not: check revocation or policies (policy extensions are accepted as OpenSSL does with
its default policy set), the trust anchor's own dates or extensions other than name
constraints (a TA is a name and key, RFC 5280 §6.1.1(d)); apply name constraints to
intermediates (only to the leaf), nor check other-type names (IP, e-mail, URI, ...) against
constraints of that type: a leaf that has any fails; check keyUsage beyond keyCertSign on
CAs; act on the verdict.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.padding import PSS, PKCS1v15
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from relay.dane.certificate import (
    BadCertificate,
    Encoded,
    Peer,
    certificate_parts,
    decode_certificate,
    presented_names,
)
from relay.dane.records import MatchingType, Selector, TlsaRecord, Usage, select_usable

__all__ = ["MAX_CHAIN_LENGTH", "DaneStatus", "DaneVerdict", "verify"]

#: Longest chain DANE-TA(2) examines; longer ones fail with reason ``"chain-too-long"``.
#: Bounds the signature checks a hostile server can cause (about n*n per verification).
MAX_CHAIN_LENGTH: Final = 16

_SIGNATURE_ERRORS: Final = (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError)
_WEAK_HASHES: Final = (hashes.MD5, hashes.SHA1)
_SHOWN_UNUSABLE: Final = 3
#: Critical extensions a DANE-TA(2) path may carry (RFC 5280 §4.2): those checked here, and
#: the policy ones, accepted as OpenSSL accepts them with its default (any-policy) set.
_PROCESSED_EXTENSIONS: Final = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.NAME_CONSTRAINTS,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.CERTIFICATE_POLICIES,
        ExtensionOID.POLICY_CONSTRAINTS,
        ExtensionOID.INHIBIT_ANY_POLICY,
        ExtensionOID.POLICY_MAPPINGS,
    }
)
_SERVER_PURPOSES: Final = (
    ExtendedKeyUsageOID.SERVER_AUTH,
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
)
_PROBLEMS: Final = {
    "expired": "expired",
    "not-yet-valid": "not yet valid",
    "unhandled-critical-extension": "marked with a critical extension that is not processed",
    "bad-purpose": "restricted by extendedKeyUsage to purposes other than serverAuth",
}


class DaneStatus(Enum):
    """Outcome of DANE authentication (RFC 7672 §2.2, §3)."""

    VERIFIED = "verified"  # a usable record matched and all checks passed
    FAILED = "failed"  # usable records, but authentication failed: do not deliver
    UNAUTHENTICATED = "unauthenticated"  # no usable record: TLS mandatory, unauthenticated


@dataclass(frozen=True, slots=True)
class DaneVerdict:
    """The result of ``verify``.

    ``reason`` is a short stable token for logs and metric labels: ``match``,
    ``no-usable-records``, ``no-chain``, ``chain-too-long``, ``bad-certificate``,
    ``no-match``, ``chain-invalid``, ``expired``, ``not-yet-valid``,
    ``unhandled-critical-extension``, ``bad-purpose``, ``name-constraints``, ``name-mismatch``.
    ``detail`` is free text for operators. ``matched`` and ``match_depth`` are set exactly
    when ``status`` is ``VERIFIED``.
    """

    status: DaneStatus
    reason: str
    matched: TlsaRecord | None = None
    match_depth: int | None = None
    detail: str = ""

    @property
    def authenticated(self) -> bool:
        """True for ``VERIFIED``."""
        return self.status is DaneStatus.VERIFIED


def _fail(reason: str, detail: str) -> DaneVerdict:
    return DaneVerdict(DaneStatus.FAILED, reason, detail=detail)


def verify(
    records: Sequence[TlsaRecord],
    chain: Sequence[bytes],
    ref_names: Sequence[str],
    now: datetime,
) -> DaneVerdict:
    """Authenticate a server's certificate chain against its TLSA RRset (RFC 7672 §3).

    Args:
        records: the TLSA RRset from a secure (DNSSEC-validated) answer; unusable records
            are allowed and ignored.
        chain: DER certificates exactly as the server sent them, leaf first.
        ref_names: reference identifiers for DANE-TA(2) name checks (RFC 7672 §3.2.2): the
            TLSA base domain, the MX host name and, when the MX RRset is secure, the
            next-hop domain. A-labels; case and one trailing dot are ignored.
        now: timezone-aware current time for DANE-TA(2) validity checks.

    Returns:
        The verdict; never raises for any content of ``records`` or ``chain``.

    Raises:
        ValueError: ``now`` is naive (has no timezone).
        TypeError: ``ref_names`` or ``chain`` is a single str/bytes instead of a sequence.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("verify() needs a timezone-aware 'now'")
    if isinstance(ref_names, str) or isinstance(chain, bytes | bytearray):
        raise TypeError("ref_names and chain must be sequences, not a single str/bytes")

    usable = select_usable(records)
    # RFC 7672 §3.1.3 / §2.2: no usable record -> TLS mandatory but unauthenticated.
    if not usable:
        shown = "; ".join(f"{r}: {r.unusable_reason()}" for r in records[:_SHOWN_UNUSABLE])
        hidden = len(records) - _SHOWN_UNUSABLE
        more = f" (+{hidden} more)" if hidden > 0 else ""
        return DaneVerdict(
            DaneStatus.UNAUTHENTICATED,
            "no-usable-records",
            detail=f"no usable TLSA records: {shown or 'empty RRset'}{more}",
        )
    # RFC 7672 §3: authentication needs the server's certificate; none means failure.
    if not chain:
        return _fail("no-chain", "the server presented no certificate")
    try:
        leaf = Encoded.load(0, bytes(chain[0]))
    # RFC 5280 §4.1: bytes that are not even a certificate's structure cannot match; fail.
    except BadCertificate as exc:
        return _fail("bad-certificate", str(exc))

    # RFC 7672 §3.1.1: DANE-EE(3) matches the leaf key/cert only; no name or date checks.
    for record in usable:
        if record.usage == Usage.DANE_EE and leaf.matches(record):
            detail = f"{record.mnemonic} {record} matched the leaf certificate"
            return DaneVerdict(DaneStatus.VERIFIED, "match", record, 0, detail)

    ta_records = [record for record in usable if record.usage == Usage.DANE_TA]
    # RFC 7672 §3.1: usable records exist but none can authenticate this leaf: failure.
    if not ta_records:
        return _fail("no-match", "no DANE-EE(3) record matches the leaf certificate")
    # Local work bound (RFC 5280 §6.1 sets none): a hostile server cannot cost n**2 checks.
    if len(chain) > MAX_CHAIN_LENGTH:
        return _fail("chain-too-long", f"{len(chain)} certificates, limit {MAX_CHAIN_LENGTH}")
    try:
        # RFC 7672 §3.1.1: decoding (and the rest of the chain) matters only for DANE-TA(2).
        encoded = [leaf, *(Encoded.load(i, bytes(der)) for i, der in enumerate(chain[1:], 1))]
        peers = [Peer.decode(certificate) for certificate in encoded]
        return _verify_dane_ta(ta_records, peers, ref_names, now)
    # RFC 5280 §4.1: an undecodable certificate (or extension) cannot be checked; fail.
    except BadCertificate as exc:
        return _fail("bad-certificate", str(exc))


@dataclass(frozen=True, slots=True)
class _Anchor:
    """A trust anchor found by the path search and the path below it (leaf first)."""

    record: TlsaRecord
    depth: int
    path: tuple[int, ...]
    where: str
    certificate: x509.Certificate | None = None  # the anchor's, when it is a certificate

    def describe(self) -> str:
        return f"{self.record.mnemonic} {self.record} matched the {self.where}"


def _weak_signature(cert: x509.Certificate) -> bool:
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return True
    return isinstance(algorithm, _WEAK_HASHES)


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    # RFC 5280 §6.1.3(a)(1),(4): issuer name chains and the signature verifies.
    if _weak_signature(child):
        return False
    try:
        child.verify_directly_issued_by(issuer)
    except _SIGNATURE_ERRORS:
        return False
    return True


def _signed_by_key(child: x509.Certificate, key: PublicKeyTypes) -> bool:
    """Whether a bare public key made ``child``'s signature (no issuer name to compare)."""
    if _weak_signature(child):
        return False
    signature, tbs = child.signature, child.tbs_certificate_bytes
    try:
        params = child.signature_algorithm_parameters
        algorithm = child.signature_hash_algorithm
        if isinstance(key, rsa.RSAPublicKey) and isinstance(params, PKCS1v15 | PSS) and algorithm:
            key.verify(signature, tbs, params, algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(params, ec.ECDSA):
            key.verify(signature, tbs, params)
        elif isinstance(key, Ed25519PublicKey | Ed448PublicKey) and params is None:
            key.verify(signature, tbs)
        else:
            return False
    except _SIGNATURE_ERRORS:
        return False
    return True


def _date_problem(peer: Peer, now: datetime) -> str | None:
    """``expired``/``not-yet-valid`` if ``now`` is outside the validity (RFC 5280 §4.1.2.5)."""
    if now < peer.cert.not_valid_before_utc:
        return "not-yet-valid"
    if now > peer.cert.not_valid_after_utc:
        return "expired"
    return None


def _usage_problem(peer: Peer) -> str | None:
    """``unhandled-critical-extension``/``bad-purpose`` for a certificate below the anchor."""
    try:
        extensions = list(peer.cert.extensions)
    except ValueError as exc:
        raise BadCertificate(peer.depth, f"malformed extensions: {exc}") from exc
    # RFC 5280 §4.2: a critical extension that is not processed makes the certificate invalid.
    if any(e.critical and e.oid not in _PROCESSED_EXTENSIONS for e in extensions):
        return "unhandled-critical-extension"
    purposes = peer.extension(x509.ExtendedKeyUsage)
    # RFC 5280 §4.2.1.12 (OpenSSL's TLS server purpose, on the whole chain): serverAuth or any.
    if isinstance(purposes, x509.ExtendedKeyUsage) and not any(
        oid in purposes for oid in _SERVER_PURPOSES
    ):
        return "bad-purpose"
    return None


def _below_anchor_ok(peer: Peer, path_depth: int, now: datetime | None, strict: bool) -> bool:
    """Checks for a certificate below the trust anchor; ``now=None`` skips the dates,
    ``strict=False`` the extension checks of ``_usage_problem``."""
    # RFC 7672 §3.1.2 / RFC 5280 §6.1.3(a)(2): chain certificates must be valid at ``now``.
    if now is not None and _date_problem(peer, now) is not None:
        return False
    if strict and _usage_problem(peer) is not None:
        return False
    if path_depth == 0:
        return True
    constraints = peer.extension(x509.BasicConstraints)
    # RFC 5280 §6.1.4(k): an intermediate must be a CA (basicConstraints cA=TRUE).
    if not isinstance(constraints, x509.BasicConstraints) or not constraints.ca:
        return False
    # RFC 5280 §6.1.4(l),(m): pathLenConstraint bounds the intermediates below it
    # (counted conservatively: self-issued ones are not exempted).
    if constraints.path_length is not None and path_depth - 1 > constraints.path_length:
        return False
    usage = peer.extension(x509.KeyUsage)
    # RFC 5280 §6.1.4(n): if keyUsage is present, keyCertSign must be set.
    return not isinstance(usage, x509.KeyUsage) or usage.key_cert_sign


class _TaSearch:
    """DANE-TA(2) path search over the presented certificates (RFC 7672 §3.1.2)."""

    def __init__(self, records: Sequence[TlsaRecord], peers: Sequence[Peer]) -> None:
        self.records = records
        self.peers = peers
        self.dns_certs: list[tuple[TlsaRecord, x509.Certificate]] = []
        self.dns_keys: list[tuple[TlsaRecord, PublicKeyTypes]] = []
        for record in records:
            if record.mtype != MatchingType.FULL:
                continue
            try:
                # RFC 7671 §5.2: a Cert(0)/Full(0) TA may be absent from the server's chain.
                if record.selector == Selector.CERT:
                    serial, _ = certificate_parts(record.data)
                    self.dns_certs.append((record, decode_certificate(record.data, serial)))
                # RFC 7671 §5.2: an SPKI(1)/Full(0) TA is a bare key the server cannot send.
                else:
                    self.dns_keys.append((record, serialization.load_der_public_key(record.data)))
            except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion):
                continue  # undecodable data can still match presented certificates byte-wise
        # A certificate sent twice is one node: a repeated leaf must not become its own TA.
        first_seen: dict[bytes, int] = {}
        for peer in peers:
            first_seen.setdefault(peer.der, peer.depth)
        self.issuers = [i for i in range(1, len(peers)) if first_seen[peers[i].der] == i]

    def _sent(self, key_record: TlsaRecord, index: int) -> bool:
        """Whether a presented certificate with this record's key issued ``peers[index]``."""
        peers = self.peers
        return any(
            peers[up].spki == key_record.data and _issued_by(peers[index].cert, peers[up].cert)
            for up in self.issuers
        )

    def find(self, now: datetime | None, strict: bool = True) -> _Anchor | None:
        """Shallowest anchor reachable from the leaf by a valid path; ``now=None``: no dates,
        ``strict=False``: no extension checks (``_usage_problem``)."""
        peers, parent = self.peers, {0: -1}

        def path_to(index: int) -> tuple[int, ...]:
            steps = []
            while index != -1:
                steps.append(index)
                index = parent[index]
            return tuple(reversed(steps))

        level, depth = [0], 0
        while level:
            # RFC 6698 §2.1.1: DANE-TA(2) names an issuer of the leaf, so depth >= 1 (as OpenSSL).
            for index in level if depth >= 1 else []:
                for record in self.records:
                    if peers[index].matches(record):
                        where = f"presented {peers[index].label()}"
                        path = path_to(index)[:-1]
                        return _Anchor(record, depth, path, where, peers[index].cert)
            level = [i for i in level if _below_anchor_ok(peers[i], depth, now, strict)]
            # RFC 7671 §5.2: a bare TA key anchors the certificate it signed, at that depth
            # (unless its own certificate was sent: that is the anchor, one level up).
            for index in level:
                for record, key in self.dns_keys:
                    if _signed_by_key(peers[index].cert, key) and not self._sent(record, index):
                        where = f"public key from DNS that signed {peers[index].label()}"
                        return _Anchor(record, depth, path_to(index), where)
            # RFC 7671 §5.2: a TA certificate from DNS sits one above what it issued.
            for index in level:
                for record, cert in self.dns_certs:
                    if record.data != peers[index].der and _issued_by(peers[index].cert, cert):
                        where = f"certificate from DNS that issued {peers[index].label()}"
                        return _Anchor(record, depth + 1, path_to(index), where, cert)
            # RFC 5280 §6.1: extend the path by presented certificates that issued this level.
            next_level: list[int] = []
            for index in level:
                for up in self.issuers:
                    if up not in parent and _issued_by(peers[index].cert, peers[up].cert):
                        parent[up] = index
                        next_level.append(up)
            level, depth = next_level, depth + 1
        return None

    def explain_failure(self, now: datetime) -> DaneVerdict:
        """The failure verdict when ``find(now)`` found no anchor."""
        relaxed = self.find(None, strict=False)
        for index in relaxed.path if relaxed is not None else ():
            # RFC 7672 §3.1.2: the chain below a DANE-TA(2) anchor must be within its dates
            # (RFC 5280 §6.1.3(a)(2)) and carry no extension that forbids its use (§4.2).
            problem = _date_problem(self.peers[index], now) or _usage_problem(self.peers[index])
            if relaxed is not None and problem is not None:
                at = f" at {now.isoformat()}" if problem in ("expired", "not-yet-valid") else ""
                return _fail(
                    problem,
                    f"{relaxed.describe()}, but {self.peers[index].label()} is "
                    f"{_PROBLEMS[problem]}{at}",
                )
        peers = self.peers
        anchored = (
            any(peers[i].matches(r) for i in self.issuers for r in self.records)
            or any(
                r.data != peer.der and _issued_by(peer.cert, ta)
                for peer in peers
                for r, ta in self.dns_certs
            )
            or any(_signed_by_key(peer.cert, key) for peer in peers for _, key in self.dns_keys)
        )
        if anchored:
            # RFC 5280 §6.1: an anchor that the leaf cannot reach by a valid path is no match.
            return _fail(
                "chain-invalid",
                "a DANE-TA(2) record matches, but the leaf does not chain to it through valid "
                "signatures and CA certificates",
            )
        return _fail("no-match", "no DANE-EE(3) record matches the leaf, no DANE-TA(2) an issuer")


def _verify_dane_ta(
    records: Sequence[TlsaRecord], peers: Sequence[Peer], ref_names: Sequence[str], now: datetime
) -> DaneVerdict:
    """RFC 7672 §3.1.2 / §3.2: chain to a DANE-TA(2) anchor, dates, then names."""
    search = _TaSearch(records, peers)
    anchor = search.find(now)
    if anchor is None:
        return search.explain_failure(now)
    # RFC 7672 §3.2.2: with DANE-TA(2) the leaf must carry a reference identifier.
    presented = presented_names(peers[0])
    # RFC 5280 §4.2.1.10: the name constraints of the CAs on the path bind the leaf's names.
    holders = [peers[i].cert for i in anchor.path[1:]]
    for holder in [*holders, *([anchor.certificate] if anchor.certificate else [])]:
        problem = _name_constraint_problem(holder, peers[0], presented)
        if problem is not None:
            return _fail(
                "name-constraints",
                f"{anchor.describe()} at depth {anchor.depth}, but {problem}",
            )
    for name in presented:
        for reference in ref_names:
            if _name_matches(name, reference):
                detail = f"{anchor.describe()} at depth {anchor.depth}; {name!r} is {reference!r}"
                return DaneVerdict(
                    DaneStatus.VERIFIED, "match", anchor.record, anchor.depth, detail
                )
    return _fail(
        "name-mismatch",
        f"{anchor.describe()} at depth {anchor.depth}, but leaf names "
        f"{presented or ['(none)']} match none of {list(ref_names)}",
    )


def _name_matches(presented: str, reference: str) -> bool:
    """RFC 7672 §3.2.3 / RFC 6125 §6.4: exact, case-insensitive, or a left-most wildcard."""
    # RFC 6125 §6.4.2: compare A-labels; str.lower() would fold U+212A KELVIN SIGN to "k".
    if not presented.isascii() or not reference.isascii():
        return False
    pattern, target = (
        n[:-1].lower() if n.endswith(".") else n.lower() for n in (presented, reference)
    )
    if not pattern or not target or "*" in target:
        return False
    if pattern.startswith("*."):
        suffix = pattern[2:]
        # RFC 7672 §3.2.3: "*" only as the whole left-most label; refuse "*.tld".
        if "*" in suffix or "." not in suffix:
            return False
        # RFC 6125 §6.4.3: the wildcard matches exactly one label.
        label, dot, rest = target.partition(".")
        return bool(label) and bool(dot) and rest == suffix
    # RFC 7672 §3.2.3: partial-label wildcards ("mx*.example") are not supported.
    return "*" not in pattern and pattern == target


def name_matches(presented: str, reference: str) -> bool:
    """A presented DNS-ID matches `reference` (RFC 6125 §6.4; the rules of `verify`)."""
    return _name_matches(presented, reference)


def _dns_within(name: str, base: str, excluded: bool) -> bool:
    """Whether DNS name ``name`` (ASCII) is in the dNSName subtree ``base`` (RFC 5280
    §4.2.1.10): "example.com" holds it and its sub-domains, ".example.com" only sub-domains.
    ``excluded``: a wildcard counts as inside when one name it can match is."""
    if not base.isascii():
        return excluded  # cannot be compared with an A-label: conservative either way
    name, base = name.lower().removesuffix("."), base.lower().removesuffix(".")
    sub_only = base.startswith(".")
    base = base.removeprefix(".")
    if not base:
        return True
    if name == base:
        return not sub_only
    if name.endswith("." + base):
        return True
    # "*.example.com" can match "mx.example.com": inside an excluded "mx.example.com".
    return (
        excluded and not sub_only and name.startswith("*.") and base.partition(".")[2] == name[2:]
    )


def _dn_within(subject: x509.Name, base: x509.Name) -> bool:
    """Whether ``subject`` is in the directoryName subtree ``base``: its leading RDNs are
    ``base``'s (RFC 5280 §4.2.1.10, §7.1; strings compared case-insensitively)."""

    def key(rdn: x509.RelativeDistinguishedName) -> frozenset[tuple[str, object]]:
        return frozenset(
            (a.oid.dotted_string, a.value.casefold() if isinstance(a.value, str) else a.value)
            for a in rdn
        )

    ours, theirs = subject.rdns, base.rdns
    return len(theirs) <= len(ours) and all(
        key(a) == key(b) for a, b in zip(ours, theirs, strict=False)
    )


def _name_constraint_problem(
    holder: x509.Certificate, leaf: Peer, dns_names: Sequence[str]
) -> str | None:
    """Why ``holder``'s nameConstraints do not allow the leaf (``dns_names``: the names
    the leaf is matched by), or None."""
    try:
        constraints = holder.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        return f"a CA's nameConstraints cannot be decoded ({exc})"
    permitted = list(constraints.permitted_subtrees or ())
    excluded = list(constraints.excluded_subtrees or ())
    san = leaf.extension(x509.SubjectAlternativeName)
    san_names = list(san) if isinstance(san, x509.SubjectAlternativeName) else []
    try:
        subject = leaf.cert.subject
        emails = subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
    except ValueError as exc:
        raise BadCertificate(leaf.depth, f"malformed subject: {exc}") from exc
    for kind in {type(tree) for tree in permitted + excluded}:
        allowed = [tree.value for tree in permitted if type(tree) is kind]
        denied = [tree.value for tree in excluded if type(tree) is kind]
        if kind is x509.DNSName:
            for name in dns_names:
                if not name.isascii():
                    return f"leaf name {name!r} is not an A-label"
                if allowed and not any(_dns_within(name, base, False) for base in allowed):
                    return f"leaf name {name!r} is outside the permitted dNSName subtrees"
                if any(_dns_within(name, base, True) for base in denied):
                    return f"leaf name {name!r} is inside an excluded dNSName subtree"
        elif kind is x509.DirectoryName:
            # RFC 5280 §4.2.1.10: applies to a non-empty subject and to directoryName SANs.
            subjects = [subject] if len(subject) else []
            subjects += [n.value for n in san_names if isinstance(n, x509.DirectoryName)]
            dn_allowed = [t.value for t in permitted if isinstance(t, x509.DirectoryName)]
            dn_denied = [t.value for t in excluded if isinstance(t, x509.DirectoryName)]
            for dn in subjects:
                if dn_allowed and not any(_dn_within(dn, base) for base in dn_allowed):
                    return f"leaf name {dn.rfc4514_string()!r} is outside the permitted subtrees"
                if any(_dn_within(dn, base) for base in dn_denied):
                    return f"leaf name {dn.rfc4514_string()!r} is inside an excluded subtree"
        # Other name types are not compared: a leaf that has such names fails (conservative).
        elif any(type(n) is kind for n in san_names) or (kind is x509.RFC822Name and emails):
            return f"{kind.__name__} constraints apply to the leaf, and are not checked"
    return None
