"""relay.config: defaults, parity with the shipped file, and every kind of error.

Error messages follow the contract ``FILE: section.key: expected …, got …``; each
negative case asserts the file, the key, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import tomllib
from pathlib import Path

import pytest

from relay.app import delivery_timeouts, engine_settings
from relay.cli import main
from relay.config import (
    Config,
    DeliveryConfig,
    DnsConfig,
    Endpoint,
    GatewayConfig,
    LogConfig,
    MetricsConfig,
    NextHop,
    RelayConfig,
    ServerConfig,
    SpoolConfig,
    TlsConfig,
    load_config,
    parse_duration,
    parse_endpoint,
)
from relay.delivery.client import TIMEOUTS, Phase
from relay.delivery.engine import MAX_CONNECTIONS_PER_DOMAIN, EngineSettings
from relay.delivery.planner import MAX_MX_HOSTS
from relay.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "relay.toml"

SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "relay": RelayConfig,
    "spool": SpoolConfig,
    "dns": DnsConfig,
    "tls": TlsConfig,
    "delivery": DeliveryConfig,
    "gateway": GatewayConfig,
    "metrics": MetricsConfig,
    "log": LogConfig,
}

# Keys that are documented in the shipped file only as a comment because their default
# is "unset" (None) and cannot be written in TOML.
COMMENTED_OUT = {
    ("server", "hostname"),
    ("server", "tls_cert_file"),
    ("server", "tls_key_file"),
    ("server", "auth_file"),
    ("tls", "ca_file"),
    ("delivery", "relayhost"),
    ("gateway", "recipients_file"),
    ("gateway", "next_hop"),
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def config_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def assert_error(message: str, path: Path, key: str, expected: str, got: str) -> None:
    """The message has the form `FILE: key: expected …, got …` with these parts."""
    pattern = (
        rf"^{re.escape(str(path))}: {re.escape(key)}: expected .*{re.escape(expected)}.*, "
        rf"got .*{re.escape(got)}"
    )
    assert re.search(pattern, message, re.DOTALL), f"{message!r} !~ {pattern!r}"


# -- defaults and the shipped file ---------------------------------------------------


def test_shipped_config_loads_and_equals_the_defaults() -> None:
    loaded = load_config(SHIPPED)
    assert loaded == Config(path=SHIPPED)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_shipped_config_sections_match_defaults_field_by_field(section: str) -> None:
    """Parity: every default field is in the shipped file, with the same value."""
    data = tomllib.loads(SHIPPED.read_text())
    default = SECTIONS[section]()
    loaded = getattr(load_config(SHIPPED), section)
    names = [f.name for f in dataclasses.fields(default)]
    for name in names:
        if (section, name) in COMMENTED_OUT:
            assert name not in data[section]
            assert getattr(default, name) is None
            assert re.search(rf"^# {name} = ", SHIPPED.read_text(), re.MULTILINE)
            continue
        assert name in data[section], f"{section}.{name} missing from {SHIPPED.name}"
        assert getattr(loaded, name) == getattr(default, name), f"{section}.{name}"
    assert set(data[section]) <= set(names)


def test_shipped_file_has_exactly_the_known_sections() -> None:
    data = tomllib.loads(SHIPPED.read_text())
    assert set(data) == set(SECTIONS)
    assert {f.name for f in dataclasses.fields(Config)} == {"path", *SECTIONS}


def test_default_values_are_the_documented_ones() -> None:
    cfg = Config(path=Path("x"))
    assert cfg.server.listen == (Endpoint("127.0.0.1", 2525),)
    assert cfg.server.hostname is None
    assert cfg.server.max_message_size == 26214400
    assert cfg.server.max_recipients == 1000
    assert cfg.server.bare_line_endings == "reject"
    assert cfg.server.max_connections == 100
    assert cfg.server.max_connections_per_client == 10
    assert cfg.relay.networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert cfg.spool.directory == Path("var/spool")
    assert cfg.dns.resolvers == (Endpoint("127.0.0.1", 53),)
    assert cfg.dns.timeout == 10.0
    assert cfg.dns.allow_remote_resolver is False
    assert cfg.tls.level == "dane"
    assert cfg.tls.insecure_mx_policy == "dane"
    assert (cfg.dns.cache_size, cfg.dns.cache_min_ttl, cfg.dns.cache_max_ttl) == (10000, 0, 3600)
    assert cfg.dns.cache_negative_ttl == 300
    assert (cfg.dns.validation_probe_name, cfg.dns.validation_probe_type) == (".", "DNSKEY")
    assert cfg.dns.validation_interval == 300
    assert cfg.dns.require_validating_resolver is False
    assert (cfg.delivery.port, cfg.delivery.concurrency) == (25, 20)
    assert (cfg.delivery.connect_timeout, cfg.delivery.command_timeout) == (30.0, 300.0)
    assert (cfg.delivery.min_backoff, cfg.delivery.max_backoff) == (300.0, 4000.0)
    assert cfg.delivery.max_queue_lifetime == 432000.0
    assert cfg.delivery.scan_interval == 60.0
    assert (cfg.delivery.mx_host_limit, cfg.delivery.mx_address_limit) == (10, 5)
    assert cfg.delivery.address_preference == "any"
    assert (cfg.delivery.mail_timeout, cfg.delivery.rcpt_timeout) == (300.0, 300.0)
    assert cfg.delivery.data_init_timeout == 120.0
    assert (cfg.delivery.data_block_timeout, cfg.delivery.data_done_timeout) == (180.0, 600.0)
    assert cfg.delivery.destination_concurrency == 20
    assert (cfg.delivery.connection_cache_time, cfg.delivery.connection_reuse_time) == (5.0, 300.0)
    assert cfg.delivery.connection_reuse_limit == 100
    assert cfg.metrics.listen == Endpoint("127.0.0.1", 9425)
    assert cfg.log.level == "info"


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_config(path) == Config(path=path)


def test_values_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
listen = ["0.0.0.0:25", "[::]:587"]
hostname = "relay.example.org."
max_message_size = 2048
[relay]
networks = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.1/24"]
[spool]
directory = "/var/spool/dane-relay"
[dns]
resolvers = ["::1", "127.0.0.53:5353", "192.0.2.53"]
allow_remote_resolver = true
timeout = 2.5
[tls]
level = "DANE-Only"
[delivery]
port = 2525
concurrency = 3
min_backoff = "1m"
max_backoff = "1h"
max_queue_lifetime = "2d"
[metrics]
listen = ""
[log]
level = "debug"
""",
    )
    cfg = load_config(path)
    assert cfg.server.listen == (Endpoint("0.0.0.0", 25), Endpoint("::", 587))
    assert cfg.server.hostname == "relay.example.org"
    assert cfg.server.max_message_size == 2048
    assert cfg.relay.networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("192.0.2.0/24"),
    )
    assert cfg.spool.directory == Path("/var/spool/dane-relay")
    assert cfg.dns.resolvers == (
        Endpoint("::1", 53),
        Endpoint("127.0.0.53", 5353),
        Endpoint("192.0.2.53", 53),
    )
    assert cfg.dns.timeout == 2.5
    assert cfg.tls.level == "dane-only"
    assert cfg.delivery.port == 2525
    assert cfg.delivery.concurrency == 3
    assert (cfg.delivery.min_backoff, cfg.delivery.max_backoff) == (60.0, 3600.0)
    assert cfg.delivery.max_queue_lifetime == 172800.0
    assert cfg.metrics.listen is None
    assert cfg.log.level == "debug"


# -- durations and endpoints -----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("300s", 300.0),
        ("5m", 300.0),
        ("4h", 14400.0),
        ("5d", 432000.0),
        ("1w", 604800.0),
        ("90", 90.0),
        (" 1.5m ", 90.0),
        (300, 300.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize(
    "raw",
    ["", "5x", "m", "-5s", "5 m s", "1e3", True, False, -1, None, [300], "٥m", math.nan, math.inf],
)
def test_parse_duration_rejects(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(raw)


@pytest.mark.parametrize(
    ("raw", "endpoint"),
    [
        ("1.2.3.4", Endpoint("1.2.3.4", 25)),
        ("1.2.3.4:25", Endpoint("1.2.3.4", 25)),
        ("1.2.3.4:2525", Endpoint("1.2.3.4", 2525)),
        ("[::1]:25", Endpoint("::1", 25)),
        ("[::1]", Endpoint("::1", 25)),
        ("::1", Endpoint("::1", 25)),
        ("[2001:db8::1]:65535", Endpoint("2001:db8::1", 65535)),
    ],
)
def test_parse_endpoint(raw: str, endpoint: Endpoint) -> None:
    assert parse_endpoint(raw, 25) == endpoint


@pytest.mark.parametrize(
    "raw",
    [
        "1.2.3.4:0",
        "1.2.3.4:70000",
        "1.2.3.4:",
        "1.2.3.4:x",
        "[::1]:0",
        "[::1",
        "[::1]25",
        "localhost",
        "localhost:25",
        "1.2.3.4:٢٥",  # non-ASCII digits are not a port
        "1.2.3.4:²",
    ],
)
def test_parse_endpoint_rejects(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(raw, 25)


def test_endpoint_str() -> None:
    assert str(Endpoint("1.2.3.4", 25)) == "1.2.3.4:25"
    assert str(Endpoint("::1", 25)) == "[::1]:25"


# -- unknown sections and keys ---------------------------------------------------------


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_typo_is_rejected_naming_the_key(tmp_path: Path, section: str) -> None:
    names = [f.name for f in dataclasses.fields(SECTIONS[section]())]
    for name in names:
        typo = name[:-1] if len(name) > 1 else name + "x"
        path = write(tmp_path, f'[{section}]\n{typo} = "x"\n')
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert_error(
            str(info.value), path, f"{section}.{typo}", "one of the keys", f"unknown key {typo!r}"
        )
        # The message lists the valid keys so that the operator can spot the typo.
        assert name in str(info.value)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_section_typo_is_rejected(tmp_path: Path, section: str) -> None:
    typo = section + "s"
    path = write(tmp_path, f"[{typo}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_error(str(info.value), path, typo, "one of the sections", f"unknown section {typo!r}")


def test_subtable_inside_a_section_is_an_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[server.tls]\ncert = 'x'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_error(str(info.value), path, "server.tls", "one of the keys", "unknown key 'tls'")


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, "server = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_error(str(info.value), path, "server", "a table", "5")


# -- wrong types and bad values -------------------------------------------------------

BAD_VALUES = [
    # (section, key, TOML value, expected fragment, got fragment)
    ("delivery", "port", '"25"', "an integer from 1 to 65535", "'25'"),
    ("delivery", "port", "true", "an integer from 1 to 65535", "true"),
    ("delivery", "port", "25.0", "an integer from 1 to 65535", "25.0"),
    ("delivery", "port", "0", "an integer from 1 to 65535", "0"),
    ("delivery", "port", "70000", "an integer from 1 to 65535", "70000"),
    ("delivery", "concurrency", "0", "an integer from 1 to 1000", "0"),
    ("delivery", "concurrency", "false", "an integer from 1 to 1000", "false"),
    ("server", "max_recipients", '"1000"', "an integer from 1 to 100000", "'1000'"),
    ("server", "max_message_size", "1023", "an integer from 1024 to", "1023"),
    ("server", "bare_line_endings", '"strip"', '"reject", "accept"', "'strip'"),
    ("server", "bare_line_endings", "true", '"reject", "accept"', "true"),
    ("server", "max_connections", "0", "an integer from 1 to 100000", "0"),
    ("server", "max_connections_per_client", '"10"', "an integer from 1 to 100000", "'10'"),
    ("server", "listen", '"127.0.0.1:25"', "a list of addresses", "'127.0.0.1:25'"),
    ("server", "listen", "[25]", "a list of addresses", "[25]"),
    ("server", "listen", "[]", "a list of addresses", "[]"),
    ("server", "listen", '["127.0.0.1:0"]', "a port between 1 and 65535", "127.0.0.1:0"),
    ("server", "listen", '["127.0.0.1:70000"]', "a port between 1 and 65535", "70000"),
    ("server", "listen", '["[::1]:70000"]', "a port between 1 and 65535", "70000"),
    ("server", "listen", '["localhost:25"]', "an IP address", "localhost:25"),
    ("server", "listen", '["127.0.0.1:²"]', "a port between 1 and 65535", "²"),
    ("server", "listen", '["127.0.0.1:٢٥"]', "a port between 1 and 65535", "٢٥"),
    ("server", "hostname", "5", "a host name", "5"),
    ("server", "hostname", '"bad host"', "a host name", "'bad host'"),
    ("server", "hostname", '"relay.example.org\\n"', "a host name", "relay.example.org\\n"),
    ("server", "hostname", '"-relay.example.org"', "a host name", "-relay.example.org"),
    ("relay", "networks", '["10.0.0.0/33"]', "a list of networks", "10.0.0.0/33"),
    ("relay", "networks", '["not-a-net"]', "a list of networks", "not-a-net"),
    ("relay", "networks", '[["127.0.0.0/8"]]', "a list of networks", "[['127.0.0.0/8']]"),
    ("relay", "networks", '"127.0.0.0/8"', "a list of networks", "'127.0.0.0/8'"),
    ("spool", "directory", '""', "a directory path", "''"),
    ("spool", "directory", "5", "a directory path", "5"),
    ("dns", "resolvers", '["127.0.0.1", 53]', "a list of resolver addresses", "53"),
    ("dns", "resolvers", "[]", "a list of resolver addresses", "[]"),
    ("dns", "allow_remote_resolver", '"yes"', "true or false", "'yes'"),
    ("dns", "allow_remote_resolver", "1", "true or false", "1"),
    ("dns", "timeout", '"10x"', "a duration such as", "'10x'"),
    ("dns", "timeout", "0", "a positive duration", "0"),
    ("dns", "timeout", "-1", "a non-negative duration", "-1"),
    ("dns", "timeout", "true", "a duration", "true"),
    ("dns", "timeout", "nan", "duration", "nan"),
    ("dns", "timeout", "inf", "duration", "inf"),
    ("dns", "cache_size", "-1", "an integer from 0 to 10000000", "-1"),
    ("dns", "cache_size", '"big"', "an integer from 0 to 10000000", "'big'"),
    ("dns", "cache_max_ttl", '"1x"', "a duration such as", "'1x'"),
    ("dns", "cache_negative_ttl", "-5", "a non-negative duration", "-5"),
    ("dns", "validation_probe_name", '"bad name!"', "a DNS name", "'bad name!'"),
    ("dns", "validation_probe_type", '"CAA"', '"DNSKEY"', "'CAA'"),
    ("dns", "validation_interval", "0", "a positive duration", "0"),
    ("dns", "require_validating_resolver", '"yes"', "true or false", "'yes'"),
    ("tls", "insecure_mx_policy", '"verify"', '"encrypt"', "'verify'"),
    ("tls", "level", '"fortify"', '"secure"', "'fortify'"),
    ("tls", "ca_file", '""', "a file path", "''"),
    ("tls", "level", "1", '"none"', "1"),
    ("delivery", "min_backoff", '"5 minutes"', "a duration such as", "'5 minutes'"),
    ("delivery", "max_queue_lifetime", '"0s"', "a positive duration", "'0s'"),
    ("delivery", "connect_timeout", "[30]", "a duration", "[30]"),
    ("delivery", "scan_interval", '"-1m"', "a duration such as", "'-1m'"),
    ("metrics", "listen", "9425", "an address such as", "9425"),
    ("metrics", "listen", '"127.0.0.1:0"', "a port between 1 and 65535", "127.0.0.1:0"),
    ("log", "level", '"verbose"', '"debug"', "'verbose'"),
]


@pytest.mark.parametrize(
    ("section", "key", "value", "expected", "got"),
    BAD_VALUES,
    ids=[f"{s}.{k}={v}" for s, k, v, _, _ in BAD_VALUES],
)
def test_bad_values_are_rejected_naming_the_key(
    tmp_path: Path, section: str, key: str, value: str, expected: str, got: str
) -> None:
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_error(str(info.value), path, f"{section}.{key}", expected, got)


@pytest.mark.parametrize("resolver", ["192.0.2.53", "8.8.8.8:53", "[2001:db8::53]:53"])
def test_remote_resolver_needs_allow_remote_resolver(tmp_path: Path, resolver: str) -> None:
    path = write(tmp_path, f'[dns]\nresolvers = ["127.0.0.1", "{resolver}"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    host = parse_endpoint(resolver, 53).host
    assert_error(str(info.value), path, "dns.resolvers", "loopback resolver addresses", repr(host))
    assert "dns.allow_remote_resolver = true" in str(info.value)

    allowed = write(tmp_path, f'[dns]\nresolvers = ["{resolver}"]\nallow_remote_resolver = true\n')
    assert load_config(allowed).dns.resolvers == (parse_endpoint(resolver, 53),)


@pytest.mark.parametrize("resolver", ["127.0.0.1", "127.0.0.53", "::1", "[::1]:5353"])
def test_loopback_resolvers_are_accepted(tmp_path: Path, resolver: str) -> None:
    path = write(tmp_path, f'[dns]\nresolvers = ["{resolver}"]\n')
    assert load_config(path).dns.resolvers == (parse_endpoint(resolver, 53),)


def test_max_backoff_below_min_backoff(tmp_path: Path) -> None:
    path = write(tmp_path, '[delivery]\nmin_backoff = "10m"\nmax_backoff = "5m"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: delivery.max_backoff: expected a duration >= delivery.min_backoff (600s), "
        "got 300s"
    )


def test_max_backoff_below_default_min_backoff(tmp_path: Path) -> None:
    path = write(tmp_path, '[delivery]\nmax_backoff = "1m"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_error(str(info.value), path, "delivery.max_backoff", ">= delivery.min_backoff", "60s")


def test_equal_backoffs_are_fine(tmp_path: Path) -> None:
    path = write(tmp_path, '[delivery]\nmin_backoff = "5m"\nmax_backoff = 300\n')
    cfg = load_config(path)
    assert (cfg.delivery.min_backoff, cfg.delivery.max_backoff) == (300.0, 300.0)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [('"300s"', 300.0), ('"5m"', 300.0), ('"4h"', 14400.0), ('"5d"', 432000.0), ("45", 45.0)],
)
def test_durations_in_the_file(tmp_path: Path, value: str, seconds: float) -> None:
    path = write(tmp_path, f"[delivery]\nmax_backoff = {value}\nmin_backoff = 1\n")
    assert load_config(path).delivery.max_backoff == seconds


# -- the file itself ---------------------------------------------------------------------


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nlisten = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: expected valid TOML, got a syntax error: ")
    assert "line 1" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_config_is_frozen() -> None:
    cfg = Config(path=Path("x"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tls = TlsConfig("none")  # type: ignore[misc]


# -- `dane-relay config check` ------------------------------------------------------------


def test_cli_config_check_shipped(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(SHIPPED)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{SHIPPED}: ok (listen=127.0.0.1:2525, tls level=dane)\n"
    assert err == ""


def test_cli_config_check_typo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, SHIPPED.read_text().replace("max_recipients", "max_recipient"))
    assert main(["config", "check", str(path)]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"dane-relay: {path}: server.max_recipient: expected one of the keys")
    assert "unknown key 'max_recipient'" in err


def test_cli_config_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(tmp_path / "nope.toml")]) == 78
    assert "cannot read" in capsys.readouterr().err


def test_cache_max_ttl_below_min_ttl_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[dns]\ncache_min_ttl = "10m"\ncache_max_ttl = "1m"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_error(str(info.value), path, "dns.cache_max_ttl", ">= dns.cache_min_ttl (600s)", "60s")


def test_probe_settings_are_normalised(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[dns]\nvalidation_probe_name = "Example.ORG."\nvalidation_probe_type = "soa"\n'
        '[tls]\ninsecure_mx_policy = "Encrypt"\n',
    )
    cfg = load_config(path)
    assert (cfg.dns.validation_probe_name, cfg.dns.validation_probe_type) == ("example.org", "SOA")
    assert cfg.tls.insecure_mx_policy == "encrypt"


# -- policy map, transport map, relayhost (issue 5) -------------------------------------------


def test_policy_transport_and_relayhost_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[tls]\nlevel = "may"\n[tls.policy]\n'
        '"example.com" = "DANE-ONLY"\n".example.com" = "verify"\n'
        '[delivery]\nrelayhost = "[smarthost.example]:587"\n'
        '[delivery.transport]\n"example.org" = "[mx.internal.example]:2525"\n'
        '"example.net" = "relay.example.net"\n',
    )
    cfg = load_config(path)
    assert cfg.tls.policy == (("example.com", "dane-only"), (".example.com", "verify"))
    assert cfg.delivery.relayhost == NextHop("smarthost.example", 587, False)
    assert cfg.delivery.transport == (
        ("example.org", NextHop("mx.internal.example", 2525, False)),
        ("example.net", NextHop("relay.example.net", None, True)),
    )


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ('[tls.policy]\n"example.com" = "fortify"\n', "tls.policy.example.com", '"verify"'),
        ('[tls.policy]\n"bad name" = "may"\n', "tls.policy.bad name", "a domain such as"),
        ('[tls.policy]\n"..example.com" = "may"\n', "tls.policy...example.com", "a domain"),
        ('[tls]\npolicy = "may"\n', "tls.policy", "a table such as"),
        ('[delivery]\nrelayhost = "1.2.3.4"\n', "delivery.relayhost", "a next hop such as"),
        ('[delivery]\nrelayhost = 25\n', "delivery.relayhost", "a next hop such as"),
        ('[delivery.transport]\n"example.org" = "[mx:99999"\n', "delivery.transport.example.org",
         "a next hop such as"),
        ('[delivery.transport]\n"b\u00fccher.example" = "mx.example"\n',
         "delivery.transport.b\u00fccher.example", "A-label form"),
    ],
)  # fmt: skip
def test_policy_map_errors_name_file_key_and_expected(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: expected "), message
    assert expected in message and ", got " in message


# -- MX limits, address preference, per-command timeouts (issue 5 items 3 and 4) --------------


def test_delivery_defaults_are_the_engine_and_client_constants() -> None:
    """One set of values: the constants the code falls back to equal the config defaults."""
    d = DeliveryConfig()
    assert d.mx_host_limit == MAX_MX_HOSTS
    assert d.mx_address_limit == MAX_CONNECTIONS_PER_DOMAIN
    assert delivery_timeouts(d) == TIMEOUTS
    s = EngineSettings(level="dane", helo_name="h")
    assert s.destination_concurrency == d.destination_concurrency
    assert (s.connection_cache_time, s.connection_reuse_time) == (
        d.connection_cache_time,
        d.connection_reuse_time,
    )
    assert s.connection_reuse_limit == d.connection_reuse_limit


def test_connection_reuse_and_destination_concurrency_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[delivery]\ndestination_concurrency = 4\nconnection_cache_time = "0s"\n'
        'connection_reuse_time = "1m"\nconnection_reuse_limit = 7\n',
    )
    cfg = load_config(path)
    d = cfg.delivery
    assert (d.destination_concurrency, d.connection_cache_time) == (4, 0.0)
    assert (d.connection_reuse_time, d.connection_reuse_limit) == (60.0, 7)
    settings = engine_settings(cfg, "relay.example")
    assert (settings.destination_concurrency, settings.connection_cache_time) == (4, 0.0)
    assert (settings.connection_reuse_time, settings.connection_reuse_limit) == (60.0, 7)


def test_delivery_limits_preference_and_timeouts_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[delivery]\nmx_host_limit = 3\nmx_address_limit = 2\n"
        'address_preference = "IPv6"\ncommand_timeout = "1m"\nmail_timeout = "2m"\n'
        'rcpt_timeout = "45s"\ndata_init_timeout = 30\ndata_block_timeout = "1m"\n'
        'data_done_timeout = "15m"\n',
    )
    d = load_config(path).delivery
    assert (d.mx_host_limit, d.mx_address_limit, d.address_preference) == (3, 2, "ipv6")
    timeouts = delivery_timeouts(d)
    assert timeouts[Phase.MAIL] == 120.0 and timeouts[Phase.RCPT] == 45.0
    assert timeouts[Phase.DATA] == 30.0 and timeouts[Phase.DATA_BLOCK] == 60.0
    assert timeouts[Phase.DATA_END] == 900.0
    # command_timeout stays the general one: every phase without its own key.
    assert timeouts[Phase.GREETING] == timeouts[Phase.HELLO] == timeouts[Phase.QUIT] == 60.0


@pytest.mark.parametrize(
    ("text", "key", "expected", "got"),
    [
        ("mx_host_limit = 0", "delivery.mx_host_limit", "an integer from 1 to 1000", "0"),
        ("mx_host_limit = 1001", "delivery.mx_host_limit", "an integer from 1 to 1000", "1001"),
        ('mx_host_limit = "10"', "delivery.mx_host_limit", "an integer from 1", "'10'"),
        ("mx_address_limit = 0", "delivery.mx_address_limit", "an integer from 1 to 1000", "0"),
        ("mx_address_limit = true", "delivery.mx_address_limit", "an integer", "true"),
        ('address_preference = "ipv5"', "delivery.address_preference",
         '"any", "ipv6", "ipv4"', "'ipv5'"),
        ("address_preference = 6", "delivery.address_preference", '"any"', "6"),
        ('mail_timeout = "0s"', "delivery.mail_timeout", "a positive duration", "'0s'"),
        ('rcpt_timeout = "soon"', "delivery.rcpt_timeout", "a duration such as", "'soon'"),
        ("data_init_timeout = -1", "delivery.data_init_timeout", "a non-negative duration", "-1"),
        ("data_block_timeout = 0", "delivery.data_block_timeout", "a positive duration", "0"),
        ("data_done_timeout = false", "delivery.data_done_timeout", "a duration", "false"),
        ("destination_concurrency = 0", "delivery.destination_concurrency",
         "an integer from 1 to 1000", "0"),
        ('connection_cache_time = "-5s"', "delivery.connection_cache_time",
         "a duration such as", "'-5s'"),
        ("connection_reuse_time = 0", "delivery.connection_reuse_time", "a positive duration",
         "0"),
        ("connection_reuse_limit = 0", "delivery.connection_reuse_limit", "an integer from 1",
         "0"),
    ],
)  # fmt: skip
def test_delivery_limit_and_timeout_errors_name_file_key_and_expected(
    tmp_path: Path, text: str, key: str, expected: str, got: str
) -> None:
    path = write(tmp_path, f"[delivery]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: expected "), message
    assert_error(message, path, key, expected, got)


def test_per_client_connection_limit_above_the_overall_one_is_an_error(tmp_path: Path) -> None:
    text = "[server]\nmax_connections = 5\nmax_connections_per_client = 6\n"
    message = config_error(tmp_path, text)
    assert_error(
        message,
        tmp_path / "relay.toml",
        "server.max_connections_per_client",
        "an integer <= server.max_connections (5)",
        "6",
    )


def test_bare_line_endings_accept_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nbare_line_endings = "accept"\n')
    assert load_config(path).server.bare_line_endings == "accept"
