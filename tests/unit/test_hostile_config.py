"""Hostile configuration files through the real command line entry point (`config check`).

Every bad file must give exit status 78 and one line naming the file and the key; a file
that `config check` accepts must be one the relay can run with.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.cli import main


def _check(tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "relay.toml"
    path.write_bytes(content)
    status = main(["config", "check", str(path)])
    return status, capsys.readouterr().err


def test_config_file_that_is_not_utf8_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _check(tmp_path, b'[server]\nhostname = "r\xe9lay.example"\n', capsys)
    assert status == 78
    assert str(tmp_path / "relay.toml") in err


def test_duplicate_listen_addresses_are_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _check(
        tmp_path, b'[server]\nlisten = ["127.0.0.1:2600", "127.0.0.1:2600"]\n', capsys
    )
    assert status == 78
    assert "server.listen" in err


def test_metrics_on_the_smtp_address_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _check(
        tmp_path,
        b'[server]\nlisten = ["127.0.0.1:2600"]\n[metrics]\nlisten = "127.0.0.1:2600"\n',
        capsys,
    )
    assert status == 78
    assert "metrics.listen" in err


@pytest.mark.parametrize(
    ("content", "key"),
    [
        (b"[server]\nlisten = []\n", "server.listen"),
        (b'[server]\nlisten = ["127.0.0.1:0"]\n', "server.listen"),
        (b'[server]\nlisten = ["localhost:25"]\n', "server.listen"),
        (b"[server]\nmax_recipients = 0\n", "server.max_recipients"),
        (b"[server]\nmax_message_size = -1\n", "server.max_message_size"),
        (b'[server]\nhostname = "a\\u0000b"\n', "server.hostname"),
        (b'[spool]\ndirectory = ""\n', "spool.directory"),
        (b"[delivery]\nport = 25.0\n", "delivery.port"),
        (b'[delivery]\nmin_backoff = "-5s"\n', "delivery.min_backoff"),
        (b'[delivery]\nconnect_timeout = "nan"\n', "delivery.connect_timeout"),
        (b'[dns]\ntimeout = "0s"\n', "dns.timeout"),
        (b'[dns]\nresolvers = ["192.0.2.53"]\n', "dns.resolvers"),
        (b'[tls]\nlevel = ["dane"]\n', "tls.level"),
        (b'[tls]\nlevel = "fortify"\n', "tls.level"),
        (b'[metrics]\nlisten = "127.0.0.1:99999"\n', "metrics.listen"),
        (b"[server]\nlisten = [\n", "TOML"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, key: str
) -> None:
    status, err = _check(tmp_path, content, capsys)
    assert status == 78
    assert err.startswith(f"dane-relay: {tmp_path / 'relay.toml'}: ")
    assert key in err
    assert len(err.strip().splitlines()) == 1
