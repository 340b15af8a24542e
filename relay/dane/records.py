"""TLSA record model and the SMTP usability rules (RFC 6698, RFC 7671, RFC 7672).

Owns:
    * ``TlsaRecord``: one TLSA record as an immutable value (usage, selector, matching type,
      certificate association data), its presentation form, and whether an SMTP client may
      use it (``unusable_reason``).
    * ``parse_tlsa_text``: the zone-file presentation format ``"3 1 1 <hex>"``.
    * ``select_usable``: the records an SMTP client actually matches against a peer chain,
      after dropping unusable ones and applying digest algorithm agility (RFC 7671 §9).

Guarantees:
    Pure functions of their arguments, no I/O. ``unusable_reason``, ``usable``, ``__str__``
    and ``select_usable`` never raise. ``TlsaRecord(...)`` raises ``ValueError`` only for
    values that no wire-format TLSA record can carry (fields outside 0..255); anything a DNS
    answer can hold constructs fine and is judged by ``unusable_reason``.

Does not:
    Match records against certificates (``relay.dane.match``), look records up, or judge
    DNSSEC status (``relay.lookup``). Whether an RRset with no usable record means
    "encrypt without authentication" is the policy's decision, not this module's.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import Final

__all__ = [
    "DIGEST_LENGTHS",
    "PRIVATE_USE",
    "MatchingType",
    "Selector",
    "TlsaRecord",
    "Usage",
    "parse_tlsa_text",
    "select_usable",
]


class Usage(IntEnum):
    """Certificate usage field (RFC 6698 §2.1.1; mnemonics from RFC 7218 §2.1)."""

    PKIX_TA = 0
    PKIX_EE = 1
    DANE_TA = 2
    DANE_EE = 3


class Selector(IntEnum):
    """Selector field (RFC 6698 §2.1.2; mnemonics from RFC 7218 §2.2)."""

    CERT = 0
    SPKI = 1


class MatchingType(IntEnum):
    """Matching type field (RFC 6698 §2.1.3; mnemonics from RFC 7218 §2.3)."""

    FULL = 0
    SHA256 = 1
    SHA512 = 2


#: The value reserved for private use in all three fields (PrivCert/PrivSel/PrivMatch,
#: RFC 6698 §7.2-§7.4, RFC 7218).
PRIVATE_USE: Final = 255

#: Exact digest sizes in bytes; association data of any other length is malformed.
DIGEST_LENGTHS: Final[Mapping[int, int]] = MappingProxyType(
    {MatchingType.SHA256: 32, MatchingType.SHA512: 64}
)

_USAGE_MNEMONICS: Final = {"PKIX-TA": 0, "PKIX-EE": 1, "DANE-TA": 2, "DANE-EE": 3, "PrivCert": 255}
_SELECTOR_MNEMONICS: Final = {"Cert": 0, "SPKI": 1, "PrivSel": 255}
_MTYPE_MNEMONICS: Final = {"Full": 0, "SHA2-256": 1, "SHA2-512": 2, "PrivMatch": 255}
_SHORT_DATA_BYTES: Final = 8
_DECIMAL_RE: Final = re.compile(r"[0-9]{1,3}")
_HEX_RE: Final = re.compile(r"[0-9A-Fa-f]+")


def _mnemonic(table: Mapping[str, int], value: int) -> str:
    for name, number in table.items():
        if number == value:
            return f"{name}({value})"
    return f"?({value})"


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """One TLSA record: ``usage selector mtype data`` (RFC 6698 §2.1).

    Fields hold plain integers 0..255 (``IntEnum`` members are accepted and stored as
    ``int``) so that records with unknown values can still be represented and reported.

    Raises:
        ValueError: a field is outside 0..255.
        TypeError: ``data`` is not bytes-like.
    """

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __post_init__(self) -> None:
        for name in ("usage", "selector", "mtype"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"TLSA {name} must be an int, got {type(value).__name__}")
            if not 0 <= value <= 255:
                raise ValueError(f"TLSA {name} must be 0..255 (one octet), got {value}")
            object.__setattr__(self, name, int(value))
        if not isinstance(self.data, bytes | bytearray | memoryview):
            raise TypeError(f"TLSA data must be bytes, got {type(self.data).__name__}")
        object.__setattr__(self, "data", bytes(self.data))

    def unusable_reason(self) -> str | None:
        """Why an SMTP client must ignore this record, or ``None`` if it is usable."""
        # RFC 7672 §3.1.3: PKIX-TA(0)/PKIX-EE(1) need a CA set shared with the server; unusable.
        if self.usage in (Usage.PKIX_TA, Usage.PKIX_EE):
            return f"usage {self.mnemonic_usage} is unusable for SMTP (RFC 7672 §3.1.3)"
        # RFC 7671 §4.1, RFC 7672 §2.2: unknown (or private) usages make a record unusable.
        if self.usage not in (Usage.DANE_TA, Usage.DANE_EE):
            return f"unknown certificate usage {self.usage}"
        # RFC 7671 §4.1: an unsupported selector makes the record unusable.
        if self.selector not in (Selector.CERT, Selector.SPKI):
            return f"unknown selector {self.selector}"
        # RFC 6698 §2.1.3 / RFC 7218 PrivMatch: no private agreement with a peer MTA; refused.
        if self.mtype == PRIVATE_USE:
            return "private matching type 255 (PrivMatch) is refused"
        # RFC 7671 §9: TLS clients skip matching types they do not support.
        if self.mtype not in (MatchingType.FULL, MatchingType.SHA256, MatchingType.SHA512):
            return f"unknown matching type {self.mtype}"
        # RFC 6698 §2.1.4: Full(0) carries the whole certificate or key; empty data is malformed.
        if self.mtype == MatchingType.FULL and not self.data:
            return "empty certificate association data"
        # RFC 7671 §4.1, RFC 7672 §2.2: a digest of the wrong length is malformed, unusable.
        expected = DIGEST_LENGTHS.get(self.mtype)
        if expected is not None and len(self.data) != expected:
            return f"{self.mnemonic_mtype} digest is {len(self.data)} bytes, expected {expected}"
        return None

    @property
    def malformed(self) -> bool:
        """A DANE usage/selector/matching type we know, with data that cannot be right
        (empty Full(0) data, or a digest of the wrong length): bad DNS data, not a
        record type we merely do not use (RFC 7671 §4.1, RFC 7672 §2.2)."""
        if self.usage not in (Usage.DANE_TA, Usage.DANE_EE):
            return False
        if self.selector not in (Selector.CERT, Selector.SPKI):
            return False
        if self.mtype == MatchingType.FULL:
            return not self.data
        expected = DIGEST_LENGTHS.get(self.mtype)
        return expected is not None and len(self.data) != expected

    @property
    def usable(self) -> bool:
        """True when ``unusable_reason()`` is ``None``."""
        return self.unusable_reason() is None

    @property
    def mnemonic_usage(self) -> str:
        """RFC 7218 name of the usage, e.g. ``DANE-EE(3)``."""
        return _mnemonic(_USAGE_MNEMONICS, self.usage)

    @property
    def mnemonic_mtype(self) -> str:
        """RFC 7218 name of the matching type, e.g. ``SHA2-256(1)``."""
        return _mnemonic(_MTYPE_MNEMONICS, self.mtype)

    @property
    def mnemonic(self) -> str:
        """All three fields by RFC 7218 name, e.g. ``DANE-EE(3) SPKI(1) SHA2-256(1)``."""
        selector = _mnemonic(_SELECTOR_MNEMONICS, self.selector)
        return f"{self.mnemonic_usage} {selector} {self.mnemonic_mtype}"

    def to_text(self) -> str:
        """Full presentation form, ``"3 1 1 <lowercase hex>"``; ``parse_tlsa_text`` inverts it."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    def __str__(self) -> str:
        """Short presentation form for logs: at most 8 data bytes, then an ellipsis."""
        shown = self.data[:_SHORT_DATA_BYTES].hex() or "-"
        more = "…" if len(self.data) > _SHORT_DATA_BYTES else ""
        return f"{self.usage} {self.selector} {self.mtype} {shown}{more}"


def _parse_field(token: str, field: str, mnemonics: Mapping[str, int]) -> int:
    for name, number in mnemonics.items():
        if token.upper() == name.upper():
            return number
    if not _DECIMAL_RE.fullmatch(token) or int(token) > 255:
        raise ValueError(f"TLSA {field} must be a number 0..255 or a mnemonic, got {token!r}")
    return int(token)


def parse_tlsa_text(text: str) -> TlsaRecord:
    """Parse TLSA RDATA in presentation format (RFC 6698 §2.2).

    Accepts ``"usage selector mtype hexdata"`` with decimal fields or RFC 7218 mnemonics
    (``DANE-EE SPKI SHA2-256``, case-insensitive). The hex data may be split by whitespace
    and wrapped in zone-file parentheses; a ``;`` comment is ignored. No owner, TTL, class
    or type may precede the RDATA. The result may still be unusable (see
    ``TlsaRecord.unusable_reason``); parsing only checks the syntax.

    Raises:
        ValueError: a field is missing, not a number 0..255 or known mnemonic, or the
            association data is absent, not hexadecimal, or an odd number of digits.
    """
    body = text.split(";", 1)[0].replace("(", " ").replace(")", " ")
    tokens = body.split()
    if len(tokens) < 4:
        raise ValueError(
            f"TLSA text needs 'usage selector mtype hexdata', got {len(tokens)} field(s): "
            f"{text.strip()[:60]!r}"
        )
    usage = _parse_field(tokens[0], "usage", _USAGE_MNEMONICS)
    selector = _parse_field(tokens[1], "selector", _SELECTOR_MNEMONICS)
    mtype = _parse_field(tokens[2], "matching type", _MTYPE_MNEMONICS)
    hexdata = "".join(tokens[3:])
    if not _HEX_RE.fullmatch(hexdata):
        raise ValueError(f"TLSA association data is not hexadecimal: {hexdata[:40]!r}")
    if len(hexdata) % 2:
        raise ValueError(f"TLSA association data has an odd number of hex digits ({len(hexdata)})")
    return TlsaRecord(usage, selector, mtype, bytes.fromhex(hexdata))


def select_usable(records: Iterable[TlsaRecord]) -> tuple[TlsaRecord, ...]:
    """The records to match, in input order: usable ones, after digest algorithm agility.

    RFC 7671 §9: for each (usage, selector) pair, only records with the strongest digest
    present are kept (SHA2-512 over SHA2-256), so that a weaker digest cannot be used to
    downgrade the match. Full(0) records are not digests and are always kept.
    """
    usable = [record for record in records if record.usable]
    # Digest strength is ranked by output size: SHA2-512 (64) beats SHA2-256 (32).
    strongest: dict[tuple[int, int], int] = {}
    for record in usable:
        size = DIGEST_LENGTHS.get(record.mtype)
        if size is not None:
            key = (record.usage, record.selector)
            strongest[key] = max(strongest.get(key, 0), size)
    return tuple(
        record
        for record in usable
        # RFC 7671 §9: a digest weaker than another present for this usage+selector is ignored.
        if record.mtype not in DIGEST_LENGTHS
        or DIGEST_LENGTHS[record.mtype] == strongest[(record.usage, record.selector)]
    )
