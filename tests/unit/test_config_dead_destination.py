"""`[delivery] dead_destination_time` (issue 8): parsed, validated with the file and key
named, and handed to the engine capped at `min_backoff`."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.app import engine_settings
from relay.config import DeliveryConfig, load_config
from relay.errors import ConfigError


def _load(tmp_path: Path, text: str) -> DeliveryConfig:
    path = tmp_path / "relay.toml"
    path.write_text(f"[delivery]\n{text}\n")
    return load_config(path).delivery


def test_default_is_60_seconds(tmp_path: Path) -> None:
    assert _load(tmp_path, "").dead_destination_time == 60.0


@pytest.mark.parametrize(("text", "seconds"), [('"2m"', 120.0), ('"0s"', 0.0), ("45", 45.0)])
def test_values_are_read(tmp_path: Path, text: str, seconds: float) -> None:
    assert _load(tmp_path, f"dead_destination_time = {text}").dead_destination_time == seconds


@pytest.mark.parametrize(
    ("text", "got"), [('"-5s"', "'-5s'"), ('"soon"', "'soon'"), ("true", "true")]
)
def test_bad_values_name_file_and_key(tmp_path: Path, text: str, got: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"dead_destination_time = {text}")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'relay.toml'}: delivery.dead_destination_time: ")
    assert "expected a duration" in message and message.endswith(f"got {got}")


@pytest.mark.parametrize(
    ("text", "engine"),
    [
        ("", 60.0),
        ('dead_destination_time = "10m"', 300.0),  # capped at min_backoff (300s)
        ('dead_destination_time = "10m"\nmin_backoff = "1s"\nmax_backoff = "2s"', 1.0),
        ('dead_destination_time = "0s"', 0.0),
    ],
)
def test_the_engine_gets_at_most_min_backoff(tmp_path: Path, text: str, engine: float) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[delivery]\n{text}\n")
    assert engine_settings(load_config(path), "relay.example").dead_destination_time == engine
