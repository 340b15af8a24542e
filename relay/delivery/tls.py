"""SSLContext factory for outbound STARTTLS.

Certificate checking is NOT done by OpenSSL: Python's ssl module has no DANE hooks,
so the handshake runs with CERT_NONE and no hostname check, and the peer chain is
checked afterwards by relay.dane.match against the TLSA records (RFC 7672 §3).
Opportunistic and encrypt-only levels do not authenticate the peer at all (RFC 7672
§1.3: opportunistic TLS). TLS 1.2 is the minimum: RFC 8996 deprecates 1.0 and 1.1.
"""

from __future__ import annotations

import ssl

__all__ = ["client_context"]


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
