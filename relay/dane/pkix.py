"""Name checks for the PKIX levels verify and secure (Postfix TLS_README). Pure: no I/O.

The chain itself is validated by OpenSSL during the handshake (relay.delivery.tls
`pkix_context`: CERT_REQUIRED against the system trust store or `tls.ca_file`); this module
only decides whether the validated leaf names the destination:

- level verify: a DNS-ID matches the MX host name (Postfix smtp_tls_verify_cert_match =
  hostname), or the host of an explicit `[host]:port` next hop.
- level secure: a DNS-ID is the next-hop domain or a name below it (Postfix
  smtp_tls_secure_cert_match = nexthop, dot-nexthop); never a name learnt from insecure DNS.

When OpenSSL refuses the chain, `chain_untrusted(verify_code)` says whether the reason is
that it does not lead to a trusted CA (unknown issuer, self-signed, a root not in the
trust store: reason `pkix_untrusted`, "Server certificate not trusted"), as opposed to a
chain that does lead there but is broken (expired, bad signature, wrong purpose: reason
`pkix_invalid`, "Server certificate not verified"). Both are verdicts on the certificate,
never connection failures: neither suspends the destination (relay.delivery.engine).

Guarantees: `leaf_names` and `pkix_names_match` never raise for peer bytes (undecodable
leaf: no names, no match). Does not: validate the chain, dates or usages (OpenSSL did).
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID

from relay.dane.match import name_matches

__all__ = ["UNTRUSTED_CHAIN_CODES", "chain_untrusted", "leaf_names", "pkix_names_match"]

#: OpenSSL X509_V_ERR_* codes (x509_vfy.h) for a chain that does not end at a trust anchor:
#: UNABLE_TO_GET_ISSUER_CERT (2), DEPTH_ZERO_SELF_SIGNED_CERT (18),
#: SELF_SIGNED_CERT_IN_CHAIN (19), UNABLE_TO_GET_ISSUER_CERT_LOCALLY (20),
#: UNABLE_TO_VERIFY_LEAF_SIGNATURE (21), CERT_UNTRUSTED (27), CERT_REJECTED (28).
UNTRUSTED_CHAIN_CODES = frozenset({2, 18, 19, 20, 21, 27, 28})


def chain_untrusted(verify_code: int) -> bool:
    """Whether OpenSSL's verify error `verify_code` means "no path to a trusted CA"."""
    # RFC 5280 §6.1: path validation starts at a trust anchor; without one there is no path.
    return verify_code in UNTRUSTED_CHAIN_CODES


def leaf_names(leaf_der: bytes) -> tuple[str, ...]:
    """DNS-IDs of the leaf, or its CN when it has none (RFC 6125 §6.4.4); () if undecodable."""
    try:
        cert = x509.load_der_x509_certificate(leaf_der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns_ids = san.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            dns_ids = []
        if dns_ids:
            return tuple(dns_ids)
        attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return ()
    return tuple(value for a in attributes if isinstance(value := a.value, str))


def _below(presented: str, parent: str) -> bool:
    # Postfix "dot-nexthop": any name strictly below the next-hop domain; a wildcard
    # "*.sub.parent" or "*.parent" covers only names below the parent as well.
    name = presented.lower().rstrip(".")
    parent = parent.lower().rstrip(".")
    if name.startswith("*."):
        name = name[2:]
        return name == parent or name.endswith("." + parent)
    return "*" not in name and name.endswith("." + parent)


def pkix_names_match(
    leaf_der: bytes, names: Sequence[str], sub_domains_of: str | None = None
) -> bool:
    """Whether a leaf DNS-ID matches one of `names`, or is below `sub_domains_of`."""
    presented = leaf_names(leaf_der)
    if any(name_matches(p, n) for p in presented for n in names):
        return True
    return sub_domains_of is not None and any(_below(p, sub_domains_of) for p in presented)
