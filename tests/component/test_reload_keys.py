"""relay.reload: which keys a SIGHUP reload sees as changed, and which it keeps running."""

from __future__ import annotations

from pathlib import Path

from relay.config import Config, load_config
from relay.reload import LIVE_SECTIONS, RESTART_KEYS, _merged, changed_keys

BASE = """
[server]
listen = ["127.0.0.1:2525"]
hostname = "relay.test"
[relay]
networks = ["127.0.0.0/8"]
[spool]
directory = "/var/spool/x"
[tls]
level = "dane"
[delivery]
concurrency = 10
min_backoff = "5m"
[log]
level = "info"
"""


def _load(tmp_path: Path, text: str, name: str = "relay.toml") -> Config:
    path = tmp_path / name
    path.write_text(text)
    return load_config(path)


def test_changed_keys_lists_every_difference_by_section_and_key(tmp_path: Path) -> None:
    old = _load(tmp_path, BASE)
    new = _load(
        tmp_path,
        BASE.replace('"127.0.0.0/8"', '"10.0.0.0/8"')
        .replace('level = "dane"', 'level = "dane-only"')
        .replace("concurrency = 10", "concurrency = 4")
        .replace('"/var/spool/x"', '"/var/spool/y"')
        .replace('level = "info"', 'level = "debug"'),
    )
    assert list(changed_keys(old, new)) == [
        "relay.networks",
        "spool.directory",
        "tls.level",
        "delivery.concurrency",
        "log.level",
    ]
    assert list(changed_keys(old, old)) == []


def test_merged_keeps_the_running_value_of_every_restart_key(tmp_path: Path) -> None:
    old = _load(tmp_path, BASE)
    new = _load(
        tmp_path,
        BASE.replace('"127.0.0.0/8"', '"10.0.0.0/8"')
        .replace("concurrency = 10", "concurrency = 4")
        .replace('min_backoff = "5m"', 'min_backoff = "1m"')
        .replace('"/var/spool/x"', '"/var/spool/y"')
        .replace('hostname = "relay.test"', 'hostname = "other.test"')
        + '\n[metrics]\nlisten = "127.0.0.1:9999"\n',
        "new.toml",
    )
    merged = _merged(old, new)
    assert list(changed_keys(old, merged)) == ["relay.networks", "delivery.min_backoff"]
    assert (merged.delivery.concurrency, merged.delivery.min_backoff) == (10, 60.0)
    assert merged.spool == old.spool and merged.server == old.server
    assert merged.metrics == old.metrics
    assert "delivery.concurrency" in RESTART_KEYS and "log.format" in RESTART_KEYS


def test_merged_takes_the_new_gateway_with_the_routes_derived_from_it(tmp_path: Path) -> None:
    """A [gateway] change is applied whole: its domains (RCPT acceptance) and the transport
    and policy entries load_config derives from them (delivery) come from the same file."""
    gateway = '\n[gateway]\ndomains = ["{d}"]\nnext_hop = "[{h}]:25"\ntls_level = "{lvl}"\n'
    old = _load(tmp_path, BASE + gateway.format(d="a.example", h="in1.example", lvl="may"))
    new = _load(
        tmp_path,
        BASE + gateway.format(d="b.example", h="in2.example", lvl="encrypt"),
        "new.toml",
    )
    merged = _merged(old, new)
    assert merged.gateway.domains == ("b.example",)
    assert merged.delivery.transport == (("b.example", new.gateway.next_hop),)
    assert new.gateway.next_hop is not None and new.gateway.next_hop.host == "in2.example"
    assert merged.tls.policy == (("b.example", "encrypt"),)
    assert "gateway" in LIVE_SECTIONS
    assert list(changed_keys(old, merged)) == [
        "tls.policy",
        "delivery.transport",
        "gateway.domains",
        "gateway.next_hop",
        "gateway.tls_level",
    ]
