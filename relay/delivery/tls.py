"""SSLContext factories for outbound STARTTLS.

`client_context`: certificate checking is NOT done by OpenSSL: Python's ssl module has no
DANE hooks, so the handshake runs with CERT_NONE and no hostname check, and the peer chain
is checked afterwards by relay.dane.match against the TLSA records (RFC 7672 §3).
Opportunistic and encrypt-only levels do not authenticate the peer at all (RFC 7672
§1.3: opportunistic TLS).

`pkix_context`: for the levels verify and secure (Postfix TLS_README), OpenSSL validates
the chain (CERT_REQUIRED) against `ca_file` when one is configured, else the system trust
store (as Postfix with tls_append_default_CA = no: a CA file replaces the system roots).
The name check is done after the handshake by relay.dane.pkix, because Postfix's
"secure" match (nexthop, dot-nexthop: any sub-domain) is not what check_hostname does.

TLS 1.2 is the minimum for both: RFC 8996 deprecates 1.0 and 1.1.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from relay.files import check_regular

__all__ = ["client_context", "pkix_context"]


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def pkix_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A context that validates the peer chain; names are checked by the caller.

    Raises:
        OSError, ssl.SSLError: `ca_file` cannot be read or holds no certificate.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # relay.dane.pkix checks the names after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        check_regular(ca_file)  # OpenSSL opens it by name: a FIFO would block the reader
        ctx.load_verify_locations(cafile=str(ca_file))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return ctx
