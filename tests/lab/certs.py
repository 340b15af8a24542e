"""Test certificates made with `cryptography`, and TLSA association data.

Owns: EC P-256 certificate authorities, CA-issued and self-signed leaf certificates
(with the chain a server presents), and `tlsa_data()`, the reference computation of a
TLSA record's certificate association data (RFC 6698 section 2.1).

Guarantees: every key is fresh (nothing is read from disk); leaf certificates carry the
given DNS names as subjectAltName (and the first as CN); the default validity is one day
in the past to thirty days ahead.

Does not: write files (see `Leaf.write`), or talk to the network.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA", "Leaf", "make_ca", "make_self_signed", "spki_der", "tlsa_data"]

_DEFAULT_BACKDATE = dt.timedelta(days=1)
_DEFAULT_LIFETIME = dt.timedelta(days=30)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(
    not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    now = _now()
    return (
        not_before if not_before is not None else now - _DEFAULT_BACKDATE,
        not_after if not_after is not None else now + _DEFAULT_LIFETIME,
    )


def spki_der(cert_der: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of a DER certificate (TLSA selector 1)."""
    cert = x509.load_der_x509_certificate(cert_der)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def tlsa_data(cert_der: bytes, selector: int, mtype: int) -> bytes:
    """Certificate association data for a TLSA record.

    selector: 0 = the full certificate DER, 1 = its SubjectPublicKeyInfo DER.
    mtype: 0 = the selected bytes themselves, 1 = SHA-256, 2 = SHA-512.

    Raises:
        ValueError: for any other selector or matching type.
    """
    if selector == 0:
        selected = cert_der
    elif selector == 1:
        selected = spki_der(cert_der)
    else:
        raise ValueError(f"unknown TLSA selector {selector}")
    if mtype == 0:
        return selected
    if mtype == 1:
        return hashlib.sha256(selected).digest()
    if mtype == 2:
        return hashlib.sha512(selected).digest()
    raise ValueError(f"unknown TLSA matching type {mtype}")


@dataclass(frozen=True)
class Leaf:
    """An end-entity certificate, its key, and the issuer chain a server sends."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    issuers: tuple[x509.Certificate, ...] = ()

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        """Leaf first, then each issuer up to and including the root."""
        return (self.cert_der,) + tuple(
            c.public_bytes(serialization.Encoding.DER) for c in self.issuers
        )

    @property
    def chain_pem(self) -> bytes:
        """Leaf first, then each issuer up to and including the root."""
        return self.cert_pem + b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in self.issuers
        )

    def spki_der(self) -> bytes:
        return spki_der(self.cert_der)

    def tlsa_data(self, selector: int, mtype: int) -> bytes:
        return tlsa_data(self.cert_der, selector, mtype)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write `<stem>.chain.pem` and `<stem>.key.pem`; return (chain_path, key_path)."""
        chain_path = directory / f"{stem}.chain.pem"
        key_path = directory / f"{stem}.key.pem"
        chain_path.write_bytes(self.chain_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return chain_path, key_path


@dataclass(frozen=True)
class CA:
    """A certificate authority (a root, or an intermediate below `parents`)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    parents: tuple[x509.Certificate, ...] = field(default=())

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def issue(
        self,
        dns_names: list[str],
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Leaf:
        """A server leaf for `dns_names`, signed by this CA."""
        key = _new_key()
        start, end = _validity(not_before, not_after)
        builder = _leaf_builder(dns_names, key, start, end).issuer_name(self.cert.subject)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
            critical=False,
        )
        cert = builder.sign(self.key, hashes.SHA256())
        return Leaf(cert=cert, key=key, issuers=(self.cert, *self.parents))

    def issue_intermediate(self, common_name: str) -> CA:
        """A subordinate CA whose chain continues with this CA."""
        key = _new_key()
        start, end = _validity(None, None)
        builder = _ca_builder(common_name, key, start, end).issuer_name(self.cert.subject)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
            critical=False,
        )
        cert = builder.sign(self.key, hashes.SHA256())
        return CA(cert=cert, key=key, parents=(self.cert, *self.parents))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_builder(
    common_name: str, key: ec.EllipticCurvePrivateKey, start: dt.datetime, end: dt.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _leaf_builder(
    dns_names: list[str],
    key: ec.EllipticCurvePrivateKey,
    start: dt.datetime,
    end: dt.datetime,
) -> x509.CertificateBuilder:
    if not dns_names:
        raise ValueError("a leaf certificate needs at least one DNS name")
    return (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def make_ca(common_name: str) -> CA:
    """A self-signed root CA valid from one day ago for thirty days."""
    key = _new_key()
    start, end = _validity(None, None)
    cert = (
        _ca_builder(common_name, key, start, end)
        .issuer_name(_name(common_name))
        .sign(key, hashes.SHA256())
    )
    return CA(cert=cert, key=key)


def make_self_signed(
    dns_names: list[str],
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Leaf:
    """A self-signed server certificate for `dns_names` (its chain is just itself)."""
    key = _new_key()
    start, end = _validity(not_before, not_after)
    cert = (
        _leaf_builder(dns_names, key, start, end)
        .issuer_name(_name(dns_names[0]))
        .sign(key, hashes.SHA256())
    )
    return Leaf(cert=cert, key=key)
