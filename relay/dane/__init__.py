"""DANE for SMTP (RFC 7672): TLSA records and chain authentication. Pure: no I/O.

``relay.dane.records`` models TLSA records and decides which an SMTP client may use;
``relay.dane.match`` authenticates a server's certificate chain against them. The names
below are the public API; import them from here.
"""

from relay.dane.match import MAX_CHAIN_LENGTH, DaneStatus, DaneVerdict, verify
from relay.dane.records import (
    DIGEST_LENGTHS,
    PRIVATE_USE,
    MatchingType,
    Selector,
    TlsaRecord,
    Usage,
    parse_tlsa_text,
    select_usable,
)

__all__ = [
    "DIGEST_LENGTHS",
    "MAX_CHAIN_LENGTH",
    "PRIVATE_USE",
    "DaneStatus",
    "DaneVerdict",
    "MatchingType",
    "Selector",
    "TlsaRecord",
    "Usage",
    "parse_tlsa_text",
    "select_usable",
    "verify",
]
