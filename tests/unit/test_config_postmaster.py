"""server.postmaster (RFC 5321 §4.5.1: where <postmaster> and postmaster@hostname go):
default unset, accepted forms, errors that name the file and the key; and the pure
`postmaster_route` decision."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import ConfigError, ServerConfig, load_config
from relay.inbound.gateway import Gateway, load_gateway, postmaster_route

WHAT = 'a mail address with a domain such as "hostmaster@example.org", or ""'


def test_default_is_unset(tmp_path: Path) -> None:
    assert ServerConfig().postmaster == ""
    path = tmp_path / "relay.toml"
    path.write_text("")
    assert load_config(path).server.postmaster == ""


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("hostmaster@example.org", "hostmaster@example.org"),
        ("Admin@Mail.EXAMPLE.org.", "Admin@mail.example.org"),  # domain in A-label form
        ("pm@bücher.example", "pm@xn--bcher-kva.example"),
        ("", ""),
    ],
)
def test_addresses_are_taken(tmp_path: Path, value: str, stored: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f'[server]\npostmaster = "{value}"\n', encoding="utf-8")
    assert load_config(path).server.postmaster == stored


@pytest.mark.parametrize(
    ("value", "expected", "got"),
    [
        ('"postmaster"', WHAT, "'postmaster'"),
        ('"@example.org"', WHAT, "'@example.org'"),
        ('"a b@example.org"', WHAT, "'a b@example.org'"),
        ('"pm@[192.0.2.1]"', WHAT, "'pm@[192.0.2.1]'"),
        ('"pm@localhost"', f"{WHAT} (the domain must be fully qualified)", "'pm@localhost'"),
        ("true", WHAT, "true"),
        ("5", WHAT, "5"),
    ],
)
def test_bad_values_name_file_key_expectation_and_value(
    tmp_path: Path, value: str, expected: str, got: str
) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\npostmaster = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: server.postmaster: expected {expected}, got {got}"


def test_postmaster_at_the_own_hostname_is_refused(tmp_path: Path) -> None:
    """It would be rewritten to itself: the mail could only loop back here."""
    path = tmp_path / "relay.toml"
    path.write_text(
        '[server]\nhostname = "relay.example.org"\npostmaster = "PostMaster@Relay.example.org"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: server.postmaster: expected a mailbox other than postmaster@server.hostname "
        "(which is rewritten to server.postmaster), got 'PostMaster@relay.example.org'"
    )


def test_gateway_keeps_its_first_domain_for_the_postmaster(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[gateway]\ndomains = ["zz.example", "aa.example"]\nnext_hop = "[192.0.2.1]:25"\n'
    )
    gateway = load_gateway(load_config(path))
    assert gateway is not None
    assert gateway.postmaster == "postmaster@zz.example"


GW = Gateway(frozenset({"local.example"}), first_domain="local.example")


@pytest.mark.parametrize(
    ("address", "configured", "gateway", "route"),
    [
        ("postmaster", "pm@admin.example", None, "pm@admin.example"),
        ("PostMaster", "pm@admin.example", GW, "pm@admin.example"),
        ("postmaster@RELAY.example.org", "pm@admin.example", None, "pm@admin.example"),
        ("postmaster", "", GW, "postmaster@local.example"),
        ("Postmaster@relay.example.org", "", GW, "postmaster@local.example"),
        ("postmaster", "", None, ""),
        ("postmaster@relay.example.org", "", None, ""),
        # Not this server's postmaster: no rewrite.
        ("postmaster@local.example", "pm@admin.example", GW, None),
        ("postmaster@other.example", "pm@admin.example", None, None),
        ("postmasters", "pm@admin.example", None, None),
        ("bob@relay.example.org", "pm@admin.example", None, None),
        ("postmaster@[192.0.2.1]", "pm@admin.example", None, None),
    ],
)
def test_postmaster_route(
    address: str, configured: str, gateway: Gateway | None, route: str | None
) -> None:
    assert postmaster_route(address, "relay.example.org", configured, gateway) == route
