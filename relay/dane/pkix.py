"""Name checks for the PKIX levels verify and secure (Postfix TLS_README). Pure: no I/O.

The chain itself is validated by OpenSSL during the handshake (relay.delivery.tls
`pkix_context`: CERT_REQUIRED against the system trust store or `tls.ca_file`); this module
only decides whether the validated leaf names the destination:

- level verify: a DNS-ID matches the MX host name (Postfix smtp_tls_verify_cert_match =
  hostname), or the host of an explicit `[host]:port` next hop.
- level secure: a DNS-ID is the next-hop domain or a name below it (Postfix
  smtp_tls_secure_cert_match = nexthop, dot-nexthop); never a name learnt from insecure DNS.

Guarantees: `leaf_names` and `pkix_names_match` never raise for peer bytes (undecodable
leaf: no names, no match). Does not: validate the chain, dates or usages (OpenSSL did).
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID

from relay.dane.match import name_matches

__all__ = ["leaf_names", "pkix_names_match"]


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
