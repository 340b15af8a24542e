"""The relay's own input files are refused, not read, when they are not regular files.

Opening a FIFO for reading waits for a writer: before relay.files, a FIFO (or a device on
a hung mount) as the STARTTLS certificate or key, tls.ca_file, gateway.recipients_file or
server.auth_file blocked its reader for good. On SIGHUP that is the reload thread (every
later reload waits behind it, and the process cannot exit after SIGTERM); for the
recipients and credentials files, re-read when they change, it is the event loop at RCPT
or AUTH (the whole relay stops). Each test would hang without the check (the timeout
mark turns that into a failure)."""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

import pytest
from lab.certs import make_self_signed

from relay.delivery.tls import pkix_context
from relay.files import NotRegularFile, check_regular, open_regular
from relay.inbound.auth import Credentials, write_entry
from relay.inbound.gateway import RecipientTable
from relay.inbound.tls import TlsContextHolder, TlsFileError, server_context

pytestmark = pytest.mark.timeout(10)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_open_regular_reads_a_file_and_refuses_a_fifo_a_directory_and_a_device(
    tmp_path: Path,
) -> None:
    text = tmp_path / "text"
    text.write_text("héllo\n", encoding="utf-8")
    with open_regular(text, encoding="utf-8") as fh:
        assert fh.read() == "héllo\n"
    with open_regular(text) as fh:
        assert fh.read() == "héllo\n".encode()
    for path, kind in (
        (_fifo(tmp_path / "fifo"), "a FIFO"),
        (tmp_path, "a directory"),
        (Path("/dev/zero"), "a device"),
    ):
        with pytest.raises(NotRegularFile) as info:
            check_regular(path)
        assert (info.value.strerror, info.value.filename) == (
            f"expected a regular file, got {kind}",
            str(path),
        )
    with pytest.raises(FileNotFoundError):
        check_regular(tmp_path / "missing")


def test_a_fifo_as_the_starttls_certificate_or_key_is_refused_and_a_reload_keeps_the_old(
    tmp_path: Path,
) -> None:
    cert, key = make_self_signed(["relay.test"]).write(tmp_path, "srv")
    fifo = _fifo(tmp_path / "fifo.pem")
    for which, pair in (("tls_cert_file", (fifo, key)), ("tls_key_file", (cert, fifo))):
        with pytest.raises(TlsFileError) as info:
            server_context(*pair)
        assert (info.value.key, info.value.path) == (which, fifo)
        assert "expected a regular file, got a FIFO" in info.value.why
    holder = TlsContextHolder(cert, key)
    before = holder.context
    cert.unlink()
    os.mkfifo(cert)  # replaced by a FIFO before a SIGHUP
    assert holder.reload() is False
    assert holder.context is before


def test_a_fifo_as_the_ca_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotRegularFile, match="expected a regular file, got a FIFO"):
        pkix_context(_fifo(tmp_path / "ca.pem"))
    assert isinstance(pkix_context(None), ssl.SSLContext)


def test_a_recipients_file_replaced_by_a_fifo_keeps_the_last_entries_without_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rcpts"
    path.write_text("alice@local.example\n")
    table = RecipientTable(path)
    path.unlink()
    os.mkfifo(path)
    with caplog.at_level(logging.ERROR, logger="relay.smtpd"):
        assert table.current() == {"alice@local.example"}  # at RCPT, on the event loop
    assert [r.getMessage() for r in caplog.records] == [
        f"recipients_file={path} not reloaded, the previous entries stay: "
        f"[Errno 22] expected a regular file, got a FIFO: '{path}'"
    ]
    with pytest.raises(NotRegularFile):
        RecipientTable(path)


def test_a_credentials_file_replaced_by_a_fifo_keeps_the_last_users_without_blocking(
    tmp_path: Path,
) -> None:
    path = tmp_path / "passwd"
    write_entry(path, "alice", b"pw")
    creds = Credentials(path)
    path.unlink()
    os.mkfifo(path)
    assert creds.check("alice", b"pw") is True  # at AUTH, on the event loop
    assert creds.check("alice", b"other") is False
    with pytest.raises(NotRegularFile):
        Credentials(path)
