"""relay.dane.pkix: the name checks of the levels verify and secure (Postfix TLS_README)."""

from __future__ import annotations

import pytest
from lab.certs import make_self_signed

from relay.dane.pkix import chain_untrusted, leaf_names, pkix_names_match


def leaf(*names: str) -> bytes:
    return make_self_signed(list(names)).cert_der


def test_leaf_names_are_the_dns_ids() -> None:
    assert leaf_names(leaf("mx.example.com", "*.example.net")) == (
        "mx.example.com",
        "*.example.net",
    )


def test_undecodable_leaf_has_no_names_and_never_matches() -> None:
    assert leaf_names(b"\x30\x03junk") == ()
    assert not pkix_names_match(b"junk", ("mx.example.com",), "example.com")


@pytest.mark.parametrize(
    ("presented", "names", "below", "expected"),
    [
        # verify: smtp_tls_verify_cert_match = hostname (exact or RFC 6125 wildcard)
        ("mx.example.com", ("mx.example.com",), None, True),
        ("MX.Example.COM", ("mx.example.com",), None, True),
        ("*.example.com", ("mx.example.com",), None, True),
        ("other.example.com", ("mx.example.com",), None, False),
        ("example.com", ("mx.example.com",), None, False),
        # secure: smtp_tls_secure_cert_match = nexthop, dot-nexthop
        ("example.com", ("example.com",), "example.com", True),
        ("mx.example.com", ("example.com",), "example.com", True),
        ("a.b.example.com", ("example.com",), "example.com", True),
        ("*.example.com", ("example.com",), "example.com", True),
        ("mx.badexample.com", ("example.com",), "example.com", False),
        ("example.com.evil", ("example.com",), "example.com", False),
        ("*.com", ("example.com",), "example.com", False),
        ("mx*.example.com", ("example.com",), "example.com", False),
    ],
)
def test_names(presented: str, names: tuple[str, ...], below: str | None, expected: bool) -> None:
    assert pkix_names_match(leaf(presented), names, below) is expected


@pytest.mark.parametrize(
    ("code", "untrusted"),
    [
        (20, True),  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY: issuer not in the trust store
        (18, True),  # DEPTH_ZERO_SELF_SIGNED_CERT
        (19, True),  # SELF_SIGNED_CERT_IN_CHAIN: a root the trust store does not hold
        (2, True),  # UNABLE_TO_GET_ISSUER_CERT
        (21, True),  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
        (27, True),  # CERT_UNTRUSTED
        (10, False),  # CERT_HAS_EXPIRED: a trusted chain, broken otherwise
        (7, False),  # CERT_SIGNATURE_FAILURE
        (26, False),  # INVALID_PURPOSE
    ],
)
def test_chain_untrusted_is_only_no_path_to_a_trust_anchor(code: int, untrusted: bool) -> None:
    assert chain_untrusted(code) is untrusted
