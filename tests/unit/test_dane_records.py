"""relay.dane.records: TLSA usability (RFC 7672 §3.1.3, RFC 7671 §4.1/§9), presentation
format, digest algorithm agility."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.dane import (
    DIGEST_LENGTHS,
    MatchingType,
    Selector,
    TlsaRecord,
    Usage,
    parse_tlsa_text,
    select_usable,
)

SHA256 = bytes(range(32))
SHA512 = bytes(range(64))


# (usage, selector, mtype, data, usable?, fragment of the reason)
USABILITY = [
    (3, 1, 1, SHA256, True, None),
    (3, 0, 1, SHA256, True, None),
    (3, 1, 2, SHA512, True, None),
    (3, 0, 0, b"\x30\x00", True, None),
    (2, 1, 1, SHA256, True, None),
    (2, 0, 2, SHA512, True, None),
    (2, 1, 0, b"\x30", True, None),
    (0, 0, 1, SHA256, False, "PKIX-TA(0) is unusable for SMTP"),
    (1, 1, 1, SHA256, False, "PKIX-EE(1) is unusable for SMTP"),
    (4, 1, 1, SHA256, False, "unknown certificate usage 4"),
    (255, 1, 1, SHA256, False, "unknown certificate usage 255"),
    (3, 2, 1, SHA256, False, "unknown selector 2"),
    (2, 255, 1, SHA256, False, "unknown selector 255"),
    (3, 1, 3, SHA256, False, "unknown matching type 3"),
    (3, 1, 254, SHA256, False, "unknown matching type 254"),
    (3, 1, 255, SHA256, False, "private matching type 255"),
    (2, 0, 255, b"", False, "private matching type 255"),
    (3, 1, 1, SHA256[:31], False, "31 bytes, expected 32"),
    (3, 1, 1, SHA512[:33], False, "33 bytes, expected 32"),
    (3, 1, 1, SHA512, False, "64 bytes, expected 32"),
    (2, 1, 2, SHA256, False, "32 bytes, expected 64"),
    (2, 1, 2, SHA512 + b"\x00", False, "65 bytes, expected 64"),
    (3, 1, 1, b"", False, "0 bytes, expected 32"),
    (3, 0, 0, b"", False, "empty certificate association data"),
]


@pytest.mark.parametrize(("usage", "selector", "mtype", "data", "usable", "why"), USABILITY)
def test_usability_matrix(
    usage: int, selector: int, mtype: int, data: bytes, usable: bool, why: str | None
) -> None:
    record = TlsaRecord(usage, selector, mtype, data)
    assert record.usable is usable
    reason = record.unusable_reason()
    if why is None:
        assert reason is None
    else:
        assert reason is not None and why in reason


def test_usage_is_checked_before_other_fields() -> None:
    # A PKIX usage is reported as such even when selector and mtype are also unknown.
    reason = TlsaRecord(1, 7, 9, b"").unusable_reason()
    assert reason is not None and "PKIX-EE(1)" in reason


def test_enum_members_are_stored_as_plain_ints() -> None:
    record = TlsaRecord(Usage.DANE_EE, Selector.SPKI, MatchingType.SHA256, SHA256)
    assert type(record.usage) is int and record == TlsaRecord(3, 1, 1, SHA256)
    assert record.mnemonic == "DANE-EE(3) SPKI(1) SHA2-256(1)"
    assert TlsaRecord(7, 9, 200, b"").mnemonic == "?(7) ?(9) ?(200)"


def test_data_is_normalised_to_bytes_and_hashable() -> None:
    record = TlsaRecord(3, 1, 1, bytearray(SHA256))  # type: ignore[arg-type]
    assert type(record.data) is bytes
    assert hash(record) == hash(TlsaRecord(3, 1, 1, SHA256))


@pytest.mark.parametrize("field", ["usage", "selector", "mtype"])
@pytest.mark.parametrize("value", [-1, 256, 1000])
def test_out_of_octet_range_fields_are_rejected(field: str, value: int) -> None:
    kwargs = {"usage": 3, "selector": 1, "mtype": 1, field: value}
    with pytest.raises(ValueError, match=f"TLSA {field} must be 0..255"):
        TlsaRecord(data=SHA256, **kwargs)


def test_wrong_types_are_rejected() -> None:
    with pytest.raises(TypeError, match="data must be bytes"):
        TlsaRecord(3, 1, 1, SHA256.hex())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="usage must be an int"):
        TlsaRecord(True, 1, 1, SHA256)
    with pytest.raises(TypeError, match="selector must be an int"):
        TlsaRecord(3, "1", 1, SHA256)  # type: ignore[arg-type]


def test_digest_lengths() -> None:
    assert dict(DIGEST_LENGTHS) == {1: 32, 2: 64}


def test_str_is_short_and_to_text_is_full() -> None:
    record = TlsaRecord(3, 1, 1, SHA256)
    assert str(record) == "3 1 1 0001020304050607…"
    assert record.to_text() == "3 1 1 " + SHA256.hex()
    assert str(TlsaRecord(2, 0, 0, b"\xab\xcd")) == "2 0 0 abcd"
    assert str(TlsaRecord(3, 0, 0, b"")) == "3 0 0 -"


# --- parse_tlsa_text -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 1 1 " + SHA256.hex(), TlsaRecord(3, 1, 1, SHA256)),
        ("3 1 1 " + SHA256.hex().upper(), TlsaRecord(3, 1, 1, SHA256)),
        ("  2\t0 2 " + SHA512.hex() + "\n", TlsaRecord(2, 0, 2, SHA512)),
        ("3 1 1 " + SHA256[:16].hex() + " " + SHA256[16:].hex(), TlsaRecord(3, 1, 1, SHA256)),
        (
            "3 1 1 (\n  " + SHA256[:16].hex() + "\n  " + SHA256[16:].hex() + " ) ; leaf key",
            TlsaRecord(3, 1, 1, SHA256),
        ),
        ("DANE-EE SPKI SHA2-256 " + SHA256.hex(), TlsaRecord(3, 1, 1, SHA256)),
        ("dane-ta cert full 3000", TlsaRecord(2, 0, 0, b"\x30\x00")),
        ("PrivCert PrivSel PrivMatch 00", TlsaRecord(255, 255, 255, b"\x00")),
        ("1 0 1 " + SHA256.hex(), TlsaRecord(1, 0, 1, SHA256)),  # parses; unusable later
        ("3 1 1 abcd", TlsaRecord(3, 1, 1, b"\xab\xcd")),  # parses; wrong length is unusable
        ("255 255 255 ff", TlsaRecord(255, 255, 255, b"\xff")),
        ("003 001 001 " + SHA256.hex(), TlsaRecord(3, 1, 1, SHA256)),
    ],
)
def test_parse_good(text: str, expected: TlsaRecord) -> None:
    assert parse_tlsa_text(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "needs 'usage selector mtype hexdata', got 0 field"),
        ("3 1 1", "got 3 field"),
        ("; only a comment", "got 0 field"),
        ("x 1 1 00", "TLSA usage must be a number 0..255 or a mnemonic, got 'x'"),
        ("3 y 1 00", "TLSA selector must be"),
        ("3 1 z 00", "TLSA matching type must be"),
        ("256 1 1 00", "TLSA usage must be"),
        ("3 1 1000 00", "TLSA matching type must be"),
        ("-1 1 1 00", "TLSA usage must be"),
        ("+3 1 1 00", "TLSA usage must be"),
        ("\u0663 1 1 00", "TLSA usage must be"),  # ARABIC-INDIC DIGIT THREE
        ("3.0 1 1 00", "TLSA usage must be"),
        ("3 1 1 0g", "not hexadecimal"),
        ("3 1 1 0x00", "not hexadecimal"),
        ("3 1 1 abc", "odd number of hex digits (3)"),
        ("3 1 1 ab c", "odd number of hex digits (3)"),
        ("IN TLSA 3 1 1 00", "TLSA usage must be"),
    ],
)
def test_parse_bad(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_tlsa_text(text)
    assert message in str(info.value)


@settings(database=None)
@given(
    usage=st.integers(0, 255),
    selector=st.integers(0, 255),
    mtype=st.integers(0, 255),
    data=st.binary(min_size=1, max_size=80),
)
def test_to_text_round_trips(usage: int, selector: int, mtype: int, data: bytes) -> None:
    record = TlsaRecord(usage, selector, mtype, data)
    assert parse_tlsa_text(record.to_text()) == record


@settings(database=None)
@given(st.text(max_size=60))
def test_parse_never_raises_anything_but_value_error(text: str) -> None:
    try:
        parse_tlsa_text(text)
    except ValueError:
        pass


# --- select_usable: filtering and digest algorithm agility (RFC 7671 §9) ----------------

EE_256 = TlsaRecord(3, 1, 1, SHA256)
EE_512 = TlsaRecord(3, 1, 2, SHA512)
EE_FULL = TlsaRecord(3, 1, 0, b"\x30\x00")
EE_CERT_256 = TlsaRecord(3, 0, 1, SHA256)
TA_256 = TlsaRecord(2, 1, 1, SHA256)
TA_512 = TlsaRecord(2, 1, 2, SHA512)
PKIX = TlsaRecord(1, 1, 1, SHA256)
BAD_LEN_512 = TlsaRecord(3, 1, 2, SHA256)


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([], []),
        ([PKIX], []),
        ([PKIX, EE_256], [EE_256]),
        # SHA2-512 present for (3, 1): SHA2-256 records of (3, 1) are ignored.
        ([EE_256, EE_512], [EE_512]),
        ([EE_512, EE_256, EE_256], [EE_512]),
        # Full(0) is not a digest: kept alongside the strongest digest.
        ([EE_FULL, EE_256, EE_512], [EE_FULL, EE_512]),
        # Agility is per usage and selector.
        ([EE_CERT_256, EE_512], [EE_CERT_256, EE_512]),
        ([TA_256, EE_512], [TA_256, EE_512]),
        ([TA_256, TA_512, EE_256], [TA_512, EE_256]),
        # An unusable (malformed) SHA2-512 record does not suppress a usable SHA2-256 one.
        ([BAD_LEN_512, EE_256], [EE_256]),
    ],
)
def test_select_usable(records: list[TlsaRecord], expected: list[TlsaRecord]) -> None:
    assert select_usable(records) == tuple(expected)
