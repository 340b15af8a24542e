"""Certificates as a DANE verifier sees them (RFC 7672 §3): raw DER, and decoded when needed.

Owns the parsing half of ``relay.dane.match``: ``Encoded`` walks a certificate's outer DER by
hand, so the bytes a TLSA record selects (the whole certificate, Cert(0), or its
SubjectPublicKeyInfo, SPKI(1)) are available even when ``cryptography`` refuses to decode the
certificate; ``Peer`` adds the decoded ``x509.Certificate`` that DANE-TA(2) chain checks need.
``presented_names`` gives a leaf's DNS-IDs for the name checks (RFC 6125 §6.4.4).

Guarantees: peer-supplied bytes never raise anything but ``BadCertificate`` (with the depth
and what was wrong). Pure: no I/O.
"""

import hashlib
from dataclasses import dataclass, field
from typing import Final

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from relay.dane.records import MatchingType, Selector, TlsaRecord

__all__ = [
    "BadCertificate",
    "Encoded",
    "Peer",
    "certificate_parts",
    "decode_certificate",
    "presented_names",
]


class BadCertificate(Exception):
    """A presented certificate could not be decoded (a verdict for the chain, not a crash)."""

    def __init__(self, depth: int, problem: str) -> None:
        super().__init__(f"certificate {depth}: {problem}")


def _der_header(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of element) of the DER element at ``pos``."""
    if pos + 2 > len(buf):
        raise ValueError("truncated DER element")
    tag, first = buf[pos], buf[pos + 1]
    if first < 0x80:
        start, size = pos + 2, first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise ValueError("unsupported DER length")
        start = pos + 2 + count
        size = int.from_bytes(buf[pos + 2 : start], "big")
    if start + size > len(buf):
        raise ValueError("truncated DER element")
    return tag, start, start + size


def certificate_parts(der: bytes) -> tuple[bytes, bytes]:
    """(serialNumber contents, SubjectPublicKeyInfo) of a DER Certificate (RFC 5280 §4.1).

    Walks the DER by hand, without ``cryptography``: the outer SEQUENCE must be the whole
    input and hold TBSCertificate, signatureAlgorithm and a BIT STRING signature; the TBS
    fields up to the SPKI must have their ASN.1 tags. The SPKI is returned exactly as
    encoded: re-encoding a parsed key could differ (e.g. compressed EC points), and
    selector SPKI(1) is defined on the certificate's own DER.

    Raises:
        ValueError: the bytes are not a certificate's outer structure.
    """
    tag, tbs_at, end = _der_header(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("not a single DER SEQUENCE")
    tag, cursor, tbs_end = _der_header(der, tbs_at)
    if tag != 0x30:
        raise ValueError("TBSCertificate is not a SEQUENCE")
    tag, _, algorithm_end = _der_header(der, tbs_end)
    signature_tag, _, signature_end = _der_header(der, algorithm_end)
    if tag != 0x30 or signature_tag != 0x03 or signature_end != end:
        raise ValueError("not SEQUENCE { tbsCertificate, signatureAlgorithm, BIT STRING }")
    tag, _, after = _der_header(der, cursor)
    if tag == 0xA0:  # [0] EXPLICIT version
        cursor = after
    tag, serial_at, cursor = _der_header(der, cursor)
    if tag != 0x02:
        raise ValueError("serialNumber is not an INTEGER")
    serial = der[serial_at:cursor]
    for _ in range(4):  # signature, issuer, validity, subject: all SEQUENCEs
        tag, _, cursor = _der_header(der, cursor)
        if tag != 0x30:
            raise ValueError("TBSCertificate fields are out of order")
    tag, _, spki_end = _der_header(der, cursor)
    if tag != 0x30 or spki_end > tbs_end:
        raise ValueError("SubjectPublicKeyInfo is not a SEQUENCE")
    return serial, der[cursor:spki_end]


def decode_certificate(der: bytes, serial: bytes) -> x509.Certificate:
    """``cryptography``'s view of a certificate, for DANE-TA(2) path checks.

    Raises:
        ValueError: undecodable, or the serial number is zero or negative.
    """
    # RFC 5280 §4.1.2.2: serial numbers are positive. cryptography 4x-50 only warns (and
    # says a later release will refuse); refuse here so the verdict does not depend on the
    # installed version, and so ``-W error`` cannot turn the warning into an exception.
    if not serial or serial[0] & 0x80 or not any(serial):
        raise ValueError("serial number is not a positive integer (RFC 5280 §4.1.2.2)")
    try:
        return x509.load_der_x509_certificate(der)
    # InvalidVersion is not a ValueError: a hostile peer can send version 4+ (seen by the
    # bit-flip fuzz test). A deprecation warning only arrives here when raised as an error.
    except (x509.InvalidVersion, CryptographyDeprecationWarning) as exc:
        raise ValueError(str(exc)) from exc


@dataclass(slots=True)
class Encoded:
    """A presented certificate as bytes: enough for DANE-EE(3), which decodes nothing."""

    depth: int
    der: bytes
    spki: bytes
    serial: bytes
    _digests: dict[tuple[int, int], bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, depth: int, der: bytes) -> "Encoded":
        try:
            serial, spki = certificate_parts(der)
        except ValueError as exc:
            raise BadCertificate(depth, str(exc)) from exc
        return cls(depth, der, spki, serial)

    def association(self, selector: int, mtype: int) -> bytes:
        """The selected bytes (RFC 6698 §2.1.2) under the matching type (§2.1.3)."""
        key = (selector, mtype)
        if key not in self._digests:
            selected = self.der if selector == Selector.CERT else self.spki
            if mtype == MatchingType.SHA256:
                selected = hashlib.sha256(selected).digest()
            elif mtype == MatchingType.SHA512:
                selected = hashlib.sha512(selected).digest()
            self._digests[key] = selected
        return self._digests[key]

    def matches(self, record: TlsaRecord) -> bool:
        return self.association(record.selector, record.mtype) == record.data


@dataclass(slots=True)
class Peer:
    """A presented certificate decoded by ``cryptography``, for DANE-TA(2)."""

    encoded: Encoded
    cert: x509.Certificate

    @classmethod
    def decode(cls, encoded: Encoded) -> "Peer":
        try:
            return cls(encoded, decode_certificate(encoded.der, encoded.serial))
        except ValueError as exc:
            raise BadCertificate(encoded.depth, f"unusable for DANE-TA(2): {exc}") from exc

    @property
    def depth(self) -> int:
        return self.encoded.depth

    @property
    def der(self) -> bytes:
        return self.encoded.der

    @property
    def spki(self) -> bytes:
        return self.encoded.spki

    def matches(self, record: TlsaRecord) -> bool:
        return self.encoded.matches(record)

    def label(self) -> str:
        try:
            return f"certificate {self.depth} ({self.cert.subject.rfc4514_string() or '-'})"
        except ValueError:
            return f"certificate {self.depth}"

    def extension(self, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
        try:
            return self.cert.extensions.get_extension_for_class(kind).value
        except x509.ExtensionNotFound:
            return None
        except ValueError as exc:
            raise BadCertificate(self.depth, f"malformed extensions: {exc}") from exc


#: id-on-dnsSRV (RFC 4985 §2): an SRV-ID in a subjectAltName otherName.
SRV_ID_OID: Final = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.7")


def presented_names(peer: Peer) -> list[str]:
    """DNS-IDs of the leaf, or its CN-IDs when it has no DNS-ID, SRV-ID or URI-ID."""
    san = peer.extension(x509.SubjectAlternativeName)
    if isinstance(san, x509.SubjectAlternativeName):
        dns_ids = san.get_values_for_type(x509.DNSName)
        if dns_ids:
            return dns_ids
        srv_ids = [n for n in san.get_values_for_type(x509.OtherName) if n.type_id == SRV_ID_OID]
        # RFC 6125 §6.4.4: the CN is a fallback only when the SAN has no DNS-, SRV- or URI-ID.
        if srv_ids or san.get_values_for_type(x509.UniformResourceIdentifier):
            return []
    try:
        attributes = peer.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:
        raise BadCertificate(peer.depth, f"malformed subject: {exc}") from exc
    return [value for a in attributes if isinstance(value := a.value, str)]
