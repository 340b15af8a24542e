"""Relay control and gateway mode: the pure RCPT decision (relay.inbound.gateway.rcpt_verdict),
the recipients file, and the [gateway] configuration (parsing, errors naming file, key,
what was expected and what was found, and the transport/policy entries it becomes)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from relay.cli import main
from relay.config import NextHop, load_config, recipient_key
from relay.delivery.policymap import PolicyMap
from relay.errors import ConfigError
from relay.inbound.gateway import (
    Gateway,
    RcptVerdict,
    RecipientFileError,
    RecipientTable,
    load_gateway,
    parse_recipients,
    rcpt_verdict,
)

LOCAL = Gateway(frozenset({"local.example", "xn--bcher-kva.example"}))
LISTED = Gateway(
    frozenset({"local.example", "other.example"}),
    frozenset({"alice@local.example", "@other.example"}),
)

OK = RcptVerdict()


def denied(why: str) -> RcptVerdict:
    return RcptVerdict("550 5.7.1", "relay_denied", why, "Relay access denied")


UNKNOWN = RcptVerdict(
    "550 5.1.1",
    "unknown_recipient",
    "not in the gateway recipient list",
    "Recipient address rejected: User unknown in local recipient table",
)

# -- the decision -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("bob@local.example", OK),
        # Upper case and the absolute (trailing-dot) form are the same domain.
        ("bob@LOCAL.Example", OK),
        ("bob@local.example.", OK),
        # An IDN domain given as U-label matches its A-label entry (RFC 5891).
        ("bob@bücher.example", OK),
        ("bob@outside.example", denied("not-a-local-domain")),
        # A sub-domain or a look-alike of a local domain is not local.
        ("bob@sub.local.example", denied("not-a-local-domain")),
        ("bob@local.example.outside.example", denied("not-a-local-domain")),
        ("bob@local.exampl", denied("not-a-local-domain")),
        # Percent hack, bang path, quoted "@": sender-specified routing (RFC 5321 §3.6.1).
        ("bob%outside.example@local.example", denied("sender-specified-routing")),
        ("outside.example!bob@local.example", denied("sender-specified-routing")),
        ('"bob@outside.example"@local.example', denied("sender-specified-routing")),
        ('"bob%outside.example"@local.example', denied("sender-specified-routing")),
        # The rightmost "@" is the domain: these go to outside.example, never local.
        ("bob@local.example@outside.example", denied("not-a-local-domain")),
        ('"bob@local.example"@outside.example', denied("not-a-local-domain")),
        # Address literals and broken domains are never local.
        ("bob@[127.0.0.1]", denied("not-a-local-domain")),
        ("bob@[IPv6:::1]", denied("not-a-local-domain")),
        ("bob@127.0.0.1", denied("not-a-local-domain")),
        ("bob@local..example", denied("not-a-local-domain")),
        ("bob@local\\.example", denied("not-a-local-domain")),
        ("local.example", denied("not-a-local-domain")),
        ("@local.example", denied("not-a-local-domain")),
        ("", denied("not-a-local-domain")),
    ],
)
def test_unprivileged_client_reaches_only_the_gateway_domains(
    address: str, expected: RcptVerdict
) -> None:
    assert rcpt_verdict(address, privileged=False, gateway=LOCAL) == expected


@pytest.mark.parametrize(
    "address", ["bob@outside.example", "bob@local.example", "bob%x@local.example"]
)
def test_without_gateway_an_unprivileged_client_may_send_nowhere(address: str) -> None:
    assert rcpt_verdict(address, privileged=False, gateway=None) == denied("not-a-local-domain")


@pytest.mark.parametrize(
    "address",
    [
        "bob@outside.example",
        "bob%outside.example@local.example",
        "bob@local.example",
        "bob@[127.0.0.1]",  # refused later, by the address checks, not as relaying
    ],
)
@pytest.mark.parametrize("gateway", [None, LOCAL])
def test_privileged_client_may_relay_anywhere(address: str, gateway: Gateway | None) -> None:
    assert rcpt_verdict(address, privileged=True, gateway=gateway) == OK


@pytest.mark.parametrize("privileged", [False, True])
@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("alice@local.example", OK),
        ("ALICE@Local.Example.", OK),  # local parts compared case-insensitively
        ("bob@local.example", UNKNOWN),
        ("alice+tag@local.example", UNKNOWN),
        ("anyone@other.example", OK),  # "@other.example": every user
        ("ANYONE@OTHER.EXAMPLE", OK),
    ],
)
def test_recipient_list_applies_to_every_client(
    address: str, expected: RcptVerdict, privileged: bool
) -> None:
    assert rcpt_verdict(address, privileged=privileged, gateway=LISTED) == expected


def test_recipient_list_does_not_restrict_other_domains_for_privileged_clients() -> None:
    assert rcpt_verdict("bob@outside.example", privileged=True, gateway=LISTED) == OK
    assert rcpt_verdict("bob@outside.example", privileged=False, gateway=LISTED) == denied(
        "not-a-local-domain"
    )


def test_routing_to_a_listed_recipient_is_still_refused_to_unprivileged_clients() -> None:
    gateway = Gateway(frozenset({"local.example"}), frozenset({"@local.example"}))
    assert rcpt_verdict("x%outside.example@local.example", False, gateway) == denied(
        "sender-specified-routing"
    )


# -- recipient entries and the recipients file ------------------------------------------


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ("Alice@Local.Example", "alice@local.example"),
        ("alice@local.example.", "alice@local.example"),
        ("@local.example", "@local.example"),
        ("jörg@bücher.example", "jörg@xn--bcher-kva.example"),
    ],
)
def test_recipient_key_normalises(entry: str, key: str) -> None:
    assert recipient_key(entry) == key


@pytest.mark.parametrize(
    "entry", ["alice", "al ice@local.example", "a@b@local.example", "alice@[127.0.0.1]", "x@"]
)
def test_recipient_key_refuses(entry: str) -> None:
    with pytest.raises(ValueError):
        recipient_key(entry)


def test_parse_recipients_skips_comments_and_names_the_bad_line() -> None:
    text = "# local users\n\nalice@local.example\n  Bob@LOCAL.example  \n@other.example\n"
    assert parse_recipients(text, "rcpts") == {
        "alice@local.example",
        "bob@local.example",
        "@other.example",
    }
    with pytest.raises(RecipientFileError) as info:
        parse_recipients("alice@local.example\nnot an address\n", "/etc/rcpts")
    assert str(info.value) == (
        "/etc/rcpts line 2: expected a list of addresses such as "
        '["alice@example.com", "@example.org"], got \'not an address\''
    )


def test_recipient_table_rereads_a_changed_file_and_keeps_the_last_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rcpts"
    path.write_text("alice@local.example\n")
    table = RecipientTable(path)
    assert table.current() == {"alice@local.example"}
    tmp = tmp_path / "rcpts.new"
    tmp.write_text("alice@local.example\nbob@local.example\n")
    os.replace(tmp, path)  # a new inode, as an editor or a deployment writes it
    assert table.current() == {"alice@local.example", "bob@local.example"}
    with caplog.at_level(logging.ERROR, logger="relay.smtpd"):
        tmp.write_text("broken line\n")
        os.replace(tmp, path)
        assert table.current() == {"alice@local.example", "bob@local.example"}
        assert table.current() == {"alice@local.example", "bob@local.example"}
        path.unlink()
        assert table.current() == {"alice@local.example", "bob@local.example"}
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 2  # once per change, not per lookup
    assert errors[0].startswith(f"recipients_file={path} not reloaded, the previous entries stay")
    assert "line 1: expected" in errors[0]
    assert "cannot read: No such file or directory" in errors[1]


# -- [gateway] configuration ------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_gateway_becomes_transport_and_policy_entries(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            "[gateway]\n"
            'domains = ["Local.Example", "bücher.example"]\n'
            'recipients = ["Alice@local.example", "@xn--bcher-kva.example"]\n'
            'next_hop = "[mail.internal.example]:2525"\n'
            '[delivery.transport]\n"other.example" = "[smart.example]"\n',
        )
    )
    gw = cfg.gateway
    assert gw.enabled
    assert gw.domains == ("local.example", "xn--bcher-kva.example")
    assert gw.recipients == ("alice@local.example", "@xn--bcher-kva.example")
    assert gw.tls_level == "may"
    hop = NextHop("mail.internal.example", 2525, mx=False)
    assert cfg.delivery.transport == (
        ("other.example", NextHop("smart.example", None, mx=False)),
        ("local.example", hop),
        ("xn--bcher-kva.example", hop),
    )
    assert cfg.tls.policy == (("local.example", "may"), ("xn--bcher-kva.example", "may"))
    dest = PolicyMap.from_config(cfg.tls, cfg.delivery).destination("LOCAL.example.")
    assert (dest.level, dest.next_hop, dest.mx, dest.port) == (
        "may",
        "mail.internal.example",
        False,
        2525,
    )
    # Other domains keep the global level and their own MX hosts.
    other = PolicyMap.from_config(cfg.tls, cfg.delivery).destination("outside.example")
    assert (other.level, other.next_hop, other.mx) == ("dane", "outside.example", True)


def test_gateway_tls_level_is_configurable(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            '[gateway]\ndomains = ["local.example"]\nnext_hop = "mail.internal.example"\n'
            'tls_level = "encrypt"\n',
        )
    )
    dest = PolicyMap.from_config(cfg.tls, cfg.delivery).destination("local.example")
    assert (dest.level, dest.next_hop, dest.mx) == ("encrypt", "mail.internal.example", True)


def test_default_has_no_gateway(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, ""))
    assert not cfg.gateway.enabled
    assert load_gateway(cfg) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            'domains = "local.example"\nnext_hop = "[h.example]"',
            'gateway.domains: expected a list of mail domains such as ["example.com"], '
            "got 'local.example'",
        ),
        (
            'domains = ["[127.0.0.1]"]\nnext_hop = "[h.example]"',
            'gateway.domains: expected a list of mail domains such as ["example.com"] '
            "('[127.0.0.1]' is an address literal, not a domain name), got ['[127.0.0.1]']",
        ),
        (
            'domains = ["local.example", "LOCAL.example."]\nnext_hop = "[h.example]"',
            "gateway.domains: expected each domain once, got 'local.example' twice",
        ),
        (
            'domains = ["local.example"]',
            "gateway.next_hop: expected the internal server for the gateway domains, such as "
            '"[mail.internal.example]:25", got nothing',
        ),
        (
            'domains = ["local.example"]\nnext_hop = "[10.0.0.500]:25"',
            'gateway.next_hop: expected a next hop such as "[mx.example.net]:25" (no MX '
            "lookup) or \"example.net\" ('10.0.0.500' is not an IP address), got "
            "'[10.0.0.500]:25'",
        ),
        (
            'next_hop = "[h.example]"',
            "gateway.domains: expected at least one domain (gateway.next_hop is set), got []",
        ),
        (
            'domains = []\nrecipients = ["a@local.example"]',
            "gateway.domains: expected at least one domain (gateway.recipients is set), got []",
        ),
        (
            'domains = ["local.example"]\nnext_hop = "[h.example]"\n'
            'recipients = ["a@outside.example"]',
            "gateway.recipients: expected addresses in gateway.domains, got 'a@outside.example'",
        ),
        (
            'domains = ["local.example"]\nnext_hop = "[h.example]"\nrecipients = ["alice"]',
            "gateway.recipients: expected a list of addresses such as "
            '["alice@example.com", "@example.org"], got [\'alice\']',
        ),
        (
            'domains = ["local.example"]\nnext_hop = "[h.example]"\ntls_level = "strict"',
            'gateway.tls_level: expected one of "none", "may", "encrypt", "dane", '
            '"dane-only", "verify", "secure", got \'strict\'',
        ),
        (
            'domains = ["local.example"]\nnext_hop = "[h.example]"\nnexthop = "x"',
            "gateway.nexthop: expected one of the keys domains, next_hop, recipients, "
            "recipients_file, tls_level, got unknown key 'nexthop'",
        ),
    ],
)
def test_gateway_config_errors(tmp_path: Path, body: str, message: str) -> None:
    text = "[gateway]\n" + body + "\n"
    assert _error(tmp_path, text) == f"{tmp_path / 'relay.toml'}: {message}"


@pytest.mark.parametrize(
    ("table", "entry", "message"),
    [
        (
            "delivery.transport",
            '"local.example" = "[other.example]"',
            "delivery.transport.local.example: expected no entry for a gateway domain "
            "(gateway.next_hop routes it), got '[other.example]'",
        ),
        (
            "tls.policy",
            '"local.example" = "dane-only"',
            "tls.policy.local.example: expected no entry for a gateway domain "
            "(gateway.tls_level sets its level), got 'dane-only'",
        ),
    ],
)
def test_gateway_domain_may_not_also_be_in_transport_or_policy(
    tmp_path: Path, table: str, entry: str, message: str
) -> None:
    text = f'[{table}]\n{entry}\n[gateway]\ndomains = ["local.example"]\nnext_hop = "[h.example]"\n'
    assert _error(tmp_path, text) == f"{tmp_path / 'relay.toml'}: {message}"


def test_recipients_file_is_read_at_start_and_checked(tmp_path: Path) -> None:
    rcpts = tmp_path / "rcpts"
    rcpts.write_text("alice@local.example\n")
    conf = _write(
        tmp_path,
        '[gateway]\ndomains = ["local.example"]\nnext_hop = "[h.example]"\n'
        f'recipients_file = "{rcpts}"\n',
    )
    gateway = load_gateway(load_config(conf))
    assert gateway is not None and gateway.table is not None
    assert rcpt_verdict("alice@local.example", False, gateway) == OK
    assert rcpt_verdict("bob@local.example", False, gateway) == UNKNOWN

    rcpts.write_text("alice@local.example\nbob@outside.example\n")
    with pytest.raises(ConfigError) as info:
        load_gateway(load_config(conf))
    assert str(info.value) == (
        f"{conf}: gateway.recipients_file: expected addresses in gateway.domains, "
        f"got 'bob@outside.example' ({rcpts})"
    )
    rcpts.write_text("alice@local.example\n\nnobody\n")
    with pytest.raises(ConfigError) as info:
        load_gateway(load_config(conf))
    assert str(info.value).startswith(
        f"{conf}: gateway.recipients_file: {rcpts} line 3: expected a list of addresses"
    )
    rcpts.unlink()
    with pytest.raises(ConfigError) as info:
        load_gateway(load_config(conf))
    assert str(info.value) == (
        f"{conf}: gateway.recipients_file: expected a readable file, got '{rcpts}' "
        "(No such file or directory)"
    )


def test_gateway_domains_beat_the_relayhost(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            '[delivery]\nrelayhost = "[smart.example]:587"\n'
            '[tls.policy]\n".example" = "dane-only"\n'
            '[gateway]\ndomains = ["local.example"]\nnext_hop = "[mail.internal.example]"\n',
        )
    )
    policy = PolicyMap.from_config(cfg.tls, cfg.delivery)
    local = policy.destination("local.example")
    # The gateway's transport entry beats the relayhost. The level follows the host
    # connected to: ".example" covers mail.internal.example, and a next hop's own entry
    # decides over the recipient domain's (here the gateway's tls_level, "may"), as
    # Postfix keys smtp_tls_policy_maps by next hop, so the stricter level applies.
    assert (local.level, local.level_match, local.overridden_key) == (
        "dane-only",
        "next-hop parent",
        "local.example",
    )
    assert (local.next_hop, local.port, local.hop_match) == ("mail.internal.example", 25, "exact")
    other = policy.destination("outside.example")
    assert (other.level, other.next_hop, other.port, other.hop_match) == (
        "dane-only",
        "smart.example",
        587,
        "relayhost",
    )


def test_config_check_reads_the_recipients_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rcpts = tmp_path / "rcpts"
    rcpts.write_text("alice@local.example\nbroken\n")
    conf = _write(
        tmp_path,
        '[gateway]\ndomains = ["local.example"]\nnext_hop = "[h.example]"\n'
        f'recipients_file = "{rcpts}"\n',
    )
    assert main(["config", "check", str(conf)]) == 78
    err = capsys.readouterr().err
    assert err.startswith(
        f"dane-relay: {conf}: gateway.recipients_file: {rcpts} line 2: expected a list of "
    )
    rcpts.write_text("alice@local.example\n")
    assert main(["config", "check", str(conf)]) == 0
    assert capsys.readouterr().out.startswith(f"{conf}: ok (")
