"""`[server]` soft_error_limit, hard_error_limit and error_sleep_time: defaults (Postfix's),
values read, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import ServerConfig, load_config
from relay.errors import ConfigError


def _load(tmp_path: Path, text: str) -> ServerConfig:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\n{text}\n")
    return load_config(path).server


def test_error_limit_defaults_are_postfixs(tmp_path: Path) -> None:
    server = _load(tmp_path, "")
    assert (server.soft_error_limit, server.hard_error_limit) == (10, 20)
    assert server.error_sleep_time == 1.0


def test_error_limits_are_read(tmp_path: Path) -> None:
    server = _load(tmp_path, "soft_error_limit = 0\nhard_error_limit = 3\nerror_sleep_time = 0.25")
    assert (server.soft_error_limit, server.hard_error_limit) == (0, 3)
    assert server.error_sleep_time == 0.25


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("hard_error_limit = 0", "server.hard_error_limit", "an integer from 1 to 100000"),
        ("soft_error_limit = -1", "server.soft_error_limit", "an integer from 0 to 100000"),
        ('soft_error_limit = "5"', "server.soft_error_limit", "an integer from 0 to 100000"),
        ('error_sleep_time = "10m"', "server.error_sleep_time", "a duration from 0 to 300s"),
        ("error_sleep_time = -1", "server.error_sleep_time", "a non-negative duration"),
        (
            "soft_error_limit = 30\nhard_error_limit = 20",
            "server.soft_error_limit",
            "an integer <= server.hard_error_limit (20)",
        ),
    ],
)
def test_bad_error_limits_name_file_and_key(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'relay.toml'}: {key}: expected {expected}, got ")


def test_queue_minfree_default_and_value(tmp_path: Path) -> None:
    assert _load(tmp_path, "").queue_minfree == 100 * 1024 * 1024
    assert _load(tmp_path, "queue_minfree = 0").queue_minfree == 0


@pytest.mark.parametrize("value", ["-1", '"100M"', "1.5"])
def test_bad_queue_minfree_names_file_and_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"queue_minfree = {value}")
    assert str(info.value).startswith(
        f"{tmp_path / 'relay.toml'}: server.queue_minfree: expected an integer from 0 to "
    )
