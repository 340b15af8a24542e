"""Certificate factory for the DANE unit tests: cryptography directly, EC P-256 keys.

``build_pki()`` makes every certificate once per process (it is cached) around the fixed
clock ``NOW``; ``conftest.py`` exposes it as the session fixture ``pki``. ``Issued.tlsa``
computes TLSA association data on its own (re-encoding the key with cryptography, hashing
with hashlib), so tests do not reuse the code under test as their oracle.
"""

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.dane import TlsaRecord

__all__ = ["MX_HOST", "NEXT_HOP", "NOW", "Issued", "Pki", "build_pki", "issue", "resign_sha1"]

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
MX_HOST = "mx.example.net"
NEXT_HOP = "example.com"
_DAY = timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def spki(self) -> bytes:
        return self.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def tlsa(self, usage: int, selector: int, mtype: int) -> TlsaRecord:
        """The TLSA record that matches this certificate with these parameters."""
        data = self.der if selector == 0 else self.spki
        if mtype == 1:
            data = hashlib.sha256(data).digest()
        elif mtype == 2:
            data = hashlib.sha512(data).digest()
        return TlsaRecord(usage, selector, mtype, data)


def issue(
    cn: str | None,
    *,
    issuer: Issued | None = None,
    sans: Sequence[str] = (),
    ca: bool = False,
    path_length: int | None = None,
    not_before: datetime = NOW - 30 * _DAY,
    not_after: datetime = NOW + 365 * _DAY,
    key_ids: bool = True,
    basic_constraints: bool = True,
    key: ec.EllipticCurvePrivateKey | None = None,
    subject: x509.Name | None = None,
    other_sans: Sequence[x509.GeneralName] = (),
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> Issued:
    """One certificate; self-signed when ``issuer`` is None. ``cn=None``: empty subject.

    ``subject`` replaces the CN-only subject; ``other_sans`` are SAN entries after the
    ``sans`` dNSNames; ``extensions`` are extra (extension, critical) pairs.
    """
    key = key or ec.generate_private_key(ec.SECP256R1())
    if subject is None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca, path_length), critical=True)
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if sans or other_sans:
        names = [*(x509.DNSName(name) for name in sans), *other_sans]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if key_ids:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    cert = builder.sign(signer_key, hashes.SHA256())
    return Issued(cert, key)


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + content


def _elements(der: bytes) -> list[bytes]:
    """The encoded children of a DER SEQUENCE (definite lengths only)."""
    body_start = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    items, pos = [], body_start
    while pos < len(der):
        first = der[pos + 1]
        count = first & 0x7F if first & 0x80 else 0
        size = int.from_bytes(der[pos + 2 : pos + 2 + count], "big") if count else first
        end = pos + 2 + count + size
        items.append(der[pos:end])
        pos = end
    return items


def resign_sha1(child: Issued, issuer: Issued) -> Issued:
    """``child`` re-signed by ``issuer`` with ECDSA-with-SHA1, which cryptography will not
    produce through its builder (DER is edited by hand)."""
    sha1_alg = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d0401")))  # 1.2.840.10045.4.1
    fields = _elements(child.cert.tbs_certificate_bytes)
    fields[2] = sha1_alg  # [0] version, serialNumber, signature, ...
    tbs = _der(0x30, b"".join(fields))
    signature = issuer.key.sign(tbs, ec.ECDSA(hashes.SHA1()))
    cert_der = _der(0x30, tbs + sha1_alg + _der(0x03, b"\x00" + signature))
    return Issued(x509.load_der_x509_certificate(cert_der), child.key)


@dataclass(frozen=True)
class Pki:
    """Every certificate the DANE unit tests use. Leaves name ``MX_HOST`` unless noted."""

    root: Issued
    intermediate: Issued  # issued by root
    leaf: Issued  # issued by intermediate
    self_signed: Issued  # self-signed leaf, not a CA
    no_names: Issued  # no SAN, empty subject (no CN)
    cn_only: Issued  # CN=MX_HOST, no SAN
    san_and_cn: Issued  # SAN other.example.org, CN=MX_HOST (CN must be ignored)
    expired_leaf: Issued
    future_leaf: Issued  # not yet valid
    wildcard_leaf: Issued  # SAN *.example.net
    expired_intermediate: Issued  # issued by root, expired
    under_expired: Issued  # leaf issued by expired_intermediate
    other_root: Issued  # unrelated hierarchy
    other_intermediate: Issued
    other_leaf: Issued  # same names as leaf, different CA and key
    nokid_root: Issued  # a hierarchy without key identifiers
    nokid_intermediate: Issued
    nokid_leaf: Issued
    non_ca_intermediate: Issued  # basicConstraints cA=FALSE, issued by intermediate
    under_non_ca: Issued  # leaf "issued" by non_ca_intermediate
    no_bc_intermediate: Issued  # no basicConstraints at all, issued by intermediate
    under_no_bc: Issued
    pathlen0_intermediate: Issued  # issued by root, pathLenConstraint 0
    sub_intermediate: Issued  # CA issued by pathlen0_intermediate (violates its pathLen)
    under_sub: Issued  # leaf issued by sub_intermediate
    sha1_leaf: Issued  # issued by intermediate with a SHA-1 signature


@functools.cache
def build_pki() -> Pki:
    """Build the whole set once per process."""
    root = issue("Test Root CA", ca=True, not_after=NOW + 3650 * _DAY)
    intermediate = issue("Test Issuing CA", issuer=root, ca=True, path_length=0)
    expired_intermediate = issue(
        "Expired CA", issuer=root, ca=True, not_before=NOW - 400 * _DAY, not_after=NOW - _DAY
    )
    other_root = issue("Other Root CA", ca=True)
    other_intermediate = issue("Other Issuing CA", issuer=other_root, ca=True)
    nokid_root = issue("No-KID Root", ca=True, key_ids=False)
    nokid_intermediate = issue("No-KID CA", issuer=nokid_root, ca=True, key_ids=False)
    non_ca = issue("Not A CA", issuer=intermediate, sans=["not-a-ca.example.net"])
    no_bc = issue("No BC", issuer=intermediate, basic_constraints=False)
    pathlen0 = issue("Pathlen0 CA", issuer=root, ca=True, path_length=0)
    sub = issue("Sub CA", issuer=pathlen0, ca=True)
    return Pki(
        root=root,
        intermediate=intermediate,
        leaf=issue(MX_HOST, issuer=intermediate, sans=[MX_HOST]),
        self_signed=issue(MX_HOST, sans=[MX_HOST]),
        no_names=issue(None, issuer=intermediate),
        cn_only=issue(MX_HOST, issuer=intermediate),
        san_and_cn=issue(MX_HOST, issuer=intermediate, sans=["other.example.org"]),
        expired_leaf=issue(
            MX_HOST,
            issuer=intermediate,
            sans=[MX_HOST],
            not_before=NOW - 400 * _DAY,
            not_after=NOW - _DAY,
        ),
        future_leaf=issue(MX_HOST, issuer=intermediate, sans=[MX_HOST], not_before=NOW + _DAY),
        wildcard_leaf=issue("*.example.net", issuer=intermediate, sans=["*.example.net"]),
        expired_intermediate=expired_intermediate,
        under_expired=issue(MX_HOST, issuer=expired_intermediate, sans=[MX_HOST]),
        other_root=other_root,
        other_intermediate=other_intermediate,
        other_leaf=issue(MX_HOST, issuer=other_intermediate, sans=[MX_HOST]),
        nokid_root=nokid_root,
        nokid_intermediate=nokid_intermediate,
        nokid_leaf=issue(MX_HOST, issuer=nokid_intermediate, sans=[MX_HOST], key_ids=False),
        non_ca_intermediate=non_ca,
        under_non_ca=issue(MX_HOST, issuer=non_ca, sans=[MX_HOST]),
        no_bc_intermediate=no_bc,
        under_no_bc=issue(MX_HOST, issuer=no_bc, sans=[MX_HOST]),
        pathlen0_intermediate=pathlen0,
        sub_intermediate=sub,
        under_sub=issue(MX_HOST, issuer=sub, sans=[MX_HOST]),
        sha1_leaf=resign_sha1(issue(MX_HOST, issuer=intermediate, sans=[MX_HOST]), intermediate),
    )
