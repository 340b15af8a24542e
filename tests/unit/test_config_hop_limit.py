"""server.max_received_headers (the inbound hop limit, RFC 5321 §6.3): default, accepted
range, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import ConfigError, ServerConfig, load_config


def test_default_is_50_like_postfix_hopcount_limit(tmp_path: Path) -> None:
    assert ServerConfig().max_received_headers == 50
    path = tmp_path / "relay.toml"
    path.write_text("")
    assert load_config(path).server.max_received_headers == 50


@pytest.mark.parametrize("value", [1, 30, 1000])
def test_values_in_range_are_taken(tmp_path: Path, value: int) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\nmax_received_headers = {value}\n")
    assert load_config(path).server.max_received_headers == value


@pytest.mark.parametrize(
    ("value", "got"),
    [("0", "0"), ("1001", "1001"), ('"50"', "'50'"), ("true", "true"), ("5.0", "5.0")],
)
def test_bad_values_name_file_key_expectation_and_value(
    tmp_path: Path, value: str, got: str
) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\nmax_received_headers = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: server.max_received_headers: expected an integer from 1 to 1000, got {got}"
    )
