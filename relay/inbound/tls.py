"""Inbound STARTTLS: the server-side TLS context, and its reload on SIGHUP.

Contract:
- `server_context(cert, key)` returns a context for RFC 3207 STARTTLS with TLS 1.2 as the
  minimum, no client certificates asked for. It raises `TlsFileError` naming which
  setting (`tls_cert_file` or `tls_key_file`) is at fault: unreadable file, no PEM
  certificate, unreadable or malformed key, or a key that does not match the certificate.
- `TlsContextHolder` keeps the context used for new connections. `reload()` builds a new
  one from the same files; if that fails the old context stays, one ERROR line says why,
  and `reload()` returns False. Connections already open keep the context they started
  with (the SMTP factory reads `holder.context` per connection).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from relay.files import check_regular

__all__ = ["TlsContextHolder", "TlsFileError", "server_context"]

log = logging.getLogger("relay.smtpd")


class TlsFileError(Exception):
    """A certificate or key file cannot be used; `key` names the setting at fault."""

    def __init__(self, key: str, path: Path, why: str) -> None:
        super().__init__(f"{key}: {why} ({path})")
        self.key = key
        self.path = path
        self.why = why


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server-side STARTTLS context from a PEM chain and key.

    Raises:
        TlsFileError: `.key` is "tls_cert_file" or "tls_key_file".
    """
    for key, path in (("tls_cert_file", cert_file), ("tls_key_file", key_file)):
        try:
            check_regular(path)  # OpenSSL opens it by name: a FIFO would block the reader
        except OSError as exc:
            raise TlsFileError(key, path, f"cannot read: {exc.strerror or exc}") from exc
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        # Parses every PEM certificate in the file, nothing else: tells a bad chain file
        # from a bad key below.
        probe.load_verify_locations(cafile=str(cert_file))
    except (ssl.SSLError, ValueError) as exc:
        raise TlsFileError(
            "tls_cert_file", cert_file, f"expected PEM certificates, got none usable ({exc})"
        ) from exc
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # RFC 8996 (and RFC 7525 §3.1.1): nothing older than TLS 1.2.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except ssl.SSLError as exc:
        why = (
            "the key does not match the certificate in tls_cert_file"
            if "KEY_VALUES_MISMATCH" in str(exc)
            else f"expected a PEM private key, got none usable ({exc.reason or exc})"
        )
        raise TlsFileError("tls_key_file", key_file, why) from exc
    return ctx


class TlsContextHolder:
    """The STARTTLS context for new connections, replaced by `reload()`."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = server_context(cert_file, key_file)

    def reload(self) -> bool:
        """Load the files again; on failure keep the current context (logged)."""
        try:
            context = server_context(self.cert_file, self.key_file)
        except TlsFileError as exc:
            log.error(
                "tls reload refused: server.%s: %s (%s); the previous certificate and key "
                "stay in use",
                exc.key,
                exc.why,
                exc.path,
            )
            return False
        self.context = context
        log.info("tls reloaded cert=%s key=%s", self.cert_file, self.key_file)
        return True
