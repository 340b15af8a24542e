"""STARTTLS certificate and key files: loaded at start-up and by `config check`; every
problem names the configuration file, the key (server.tls_cert_file / tls_key_file) and
what was expected. Also the listen tables of [server] listen."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from lab.certs import make_self_signed

from relay.app import inbound_tls
from relay.cli import main
from relay.config import Endpoint, Listener, load_config
from relay.errors import ConfigError


def _config(tmp_path: Path, cert: Path, key: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f'[server]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n')
    return path


def _pair(tmp_path: Path, stem: str = "srv") -> tuple[Path, Path]:
    return make_self_signed(["relay.test"]).write(tmp_path, stem)


def _error(tmp_path: Path, cert: Path, key: Path) -> str:
    path = _config(tmp_path, cert, key)
    with pytest.raises(ConfigError) as info:
        inbound_tls(load_config(path))
    return str(info.value)


def test_a_matching_pair_gives_a_tls12_minimum_server_context(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    holder = inbound_tls(load_config(_config(tmp_path, cert, key)))
    assert holder is not None
    assert holder.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert holder.context.verify_mode == ssl.CERT_NONE


def test_no_tls_files_means_no_starttls(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("[server]\n")
    assert inbound_tls(load_config(path)) is None


def test_key_that_does_not_match_the_certificate_names_tls_key_file(tmp_path: Path) -> None:
    cert, _ = _pair(tmp_path, "a")
    _, other_key = _pair(tmp_path, "b")
    message = _error(tmp_path, cert, other_key)
    assert message == (
        f"{tmp_path / 'relay.toml'}: server.tls_key_file: the key does not match the "
        f"certificate in tls_cert_file, got {str(other_key)!r}"
    )


def test_missing_certificate_file_names_tls_cert_file(tmp_path: Path) -> None:
    _, key = _pair(tmp_path)
    missing = tmp_path / "nope.pem"
    message = _error(tmp_path, missing, key)
    assert message == (
        f"{tmp_path / 'relay.toml'}: server.tls_cert_file: cannot read: No such file or "
        f"directory, got {str(missing)!r}"
    )


def test_certificate_file_without_a_certificate_names_tls_cert_file(tmp_path: Path) -> None:
    _, key = _pair(tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    message = _error(tmp_path, junk, key)
    assert message.startswith(
        f"{tmp_path / 'relay.toml'}: server.tls_cert_file: expected PEM certificates, got none"
    )
    assert message.endswith(f", got {str(junk)!r}")


def test_key_file_without_a_key_names_tls_key_file(tmp_path: Path) -> None:
    cert, _ = _pair(tmp_path)
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    message = _error(tmp_path, cert, junk)
    assert message.startswith(
        f"{tmp_path / 'relay.toml'}: server.tls_key_file: expected a PEM private key, got none"
    )


def test_config_check_loads_the_tls_files_and_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, _ = _pair(tmp_path, "a")
    _, other_key = _pair(tmp_path, "b")
    path = _config(tmp_path, cert, other_key)
    assert main(["config", "check", str(path)]) == 78
    err = capsys.readouterr().err
    assert f"{path}: server.tls_key_file: the key does not match" in err


def test_only_one_of_cert_and_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[server]\ntls_cert_file = "/x/cert.pem"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: server.tls_key_file: expected a file path (server.tls_cert_file is set, "
        "STARTTLS needs both), got nothing"
    )


# -- listen tables ------------------------------------------------------------------------


def test_listen_mixes_strings_and_tables(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        "[server]\n"
        'tls_cert_file = "/x/c.pem"\ntls_key_file = "/x/k.pem"\nauth_file = "/x/passwd"\n'
        'listen = ["127.0.0.1:25", { address = "127.0.0.1:587", require_tls = true, '
        'auth = true }, { address = "[::1]:2525" }]\n'
    )
    listen = load_config(path).server.listen
    assert listen == (
        Endpoint("127.0.0.1", 25),
        Listener("127.0.0.1", 587, require_tls=True, auth=True),
        Listener("::1", 2525, require_tls=False, auth=False),
    )
    assert str(listen[1]) == "127.0.0.1:587"


@pytest.mark.parametrize(
    ("entry", "key", "expected"),
    [
        ('{ address = "127.0.0.1:25", tls = true }', "server.listen[0].tls", "one of the keys"),
        ("{ require_tls = true }", "server.listen[0].address", "an address such as"),
        ('{ address = "host:25" }', "server.listen[0].address", "an IP address"),
        ('{ address = "127.0.0.1:25", auth = "yes" }', "server.listen[0].auth", "true or"),
    ],
)
def test_bad_listen_tables_name_the_entry_and_key(
    tmp_path: Path, entry: str, key: str, expected: str
) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\nlisten = [{entry}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {key}: expected {expected}")


def test_require_tls_without_certificate_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[server]\nlisten = [{ address = "127.0.0.1:587", require_tls = true }]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: server.listen: expected server.tls_cert_file and server.tls_key_file for a "
        "listener with require_tls = true, got none for '127.0.0.1:587'"
    )


def test_same_address_as_string_and_table_is_a_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:25", { address = "127.0.0.1:25" }]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "server.listen: expected distinct addresses, got '127.0.0.1:25' twice" in str(info.value)
