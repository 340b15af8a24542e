"""Issue 7 acceptance: SIGHUP reloads the configuration of a running relay (a real
process) without dropping connections; a broken new configuration is refused with an
ERROR naming file, key and what was expected, and the old one stays.
"""

from __future__ import annotations

import re
import signal
import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess, send_mail
from lab.hostile import start_relay
from lab.waiting import poll_until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(90)]

SENDER = "alice@sender.example"
BODY = b"Subject: reload\r\nMessage-ID: <reload@sender.example>\r\n\r\nHUP.\r\n"

RelayFactory = Callable[..., RelayProcess]


def _refused(relay: RelayProcess, rcpt: str) -> smtplib.SMTPResponseException:
    host, port = relay.smtp_addr
    with pytest.raises(smtplib.SMTPResponseException) as info:
        send_mail(host, port, SENDER, [rcpt], BODY)
    return info.value


def _queued(relay: RelayProcess, rcpt: str) -> str:
    host, port = relay.smtp_addr
    reply = send_mail(host, port, SENDER, [rcpt], BODY)
    assert reply.code == 250, reply
    match = re.search(r"queued as ([0-9A-F]+)", reply.text)
    assert match, reply
    return match.group(1)


def _set_networks(config: Path, networks: str) -> None:
    text = config.read_text()
    new = re.sub(r"(?m)^networks = .*$", f"networks = {networks}", text)
    assert new != text
    config.write_text(new)


def _hup(relay: RelayProcess, count: int) -> None:
    """SIGHUP, then wait until the `count`-th reload is logged (taken or refused)."""
    relay.kill(signal.SIGHUP)

    def done() -> bool:
        text = relay.log_path.read_text()
        return len(re.findall(r"reloaded config=|new configuration refused", text)) >= count

    poll_until(done, timeout=10, what=f"reload number {count} in the log")


def test_sighup_applies_a_changed_config_and_refuses_a_broken_one(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory(networks=["192.0.2.0/24"], log_level="info")
    config = relay.config_path
    refusal = _refused(relay, "bob@dane-ok.test")
    assert b"5.7.1" in refusal.smtp_error and b"Relay access denied" in refusal.smtp_error

    # A session opened before the reload, idle in the middle of it.
    host, port = relay.smtp_addr
    with smtplib.SMTP(host, port, local_hostname="early.test", timeout=10) as early:
        assert early.ehlo()[0] == 250
        _set_networks(config, '["127.0.0.0/8"]')
        _hup(relay, 1)
        line = relay.wait_log(r"reloaded config=\S+ applied=(\S+)").group(1)
        assert line.split(",") == ["relay.networks"]

        # The next connection is relayed and delivered.
        qid = _queued(relay, "bob@dane-ok.test")
        receiver.wait_for(1, timeout=20)
        relay.wait_log(rf"queue_id={qid} removed")

        # The early session survived the reload and goes on under the new networks.
        assert early.noop()[0] == 250
        assert early.mail(SENDER)[0] == 250
        assert early.rcpt("carol@dane-ok.test")[0] == 250
        code, text = early.data(BODY)
        assert code == 250, text
    receiver.wait_for(2, timeout=20)
    relay.wait_log(r"session client=\S+ helo=early\.test .*messages=1 .*outcome=quit ")

    # A broken file: refused with file, key and expectation; the old config stays.
    good = config.read_text()
    _set_networks(config, '["not-a-network"]')
    _hup(relay, 2)
    error = relay.wait_log(r"ERROR relay: SIGHUP: new configuration refused.*").group(0)
    assert (
        f"the running one stays: {config}: relay.networks: expected a list of networks "
        'such as ["127.0.0.0/8", "::1/128"], got [\'not-a-network\']'
    ) in error
    assert relay.alive()
    _queued(relay, "dave@dane-ok.test")  # 127.0.0.0/8 still relays
    receiver.wait_for(3, timeout=20)

    # Keys that need a restart are named in a WARNING and not applied; the rest is.
    config.write_text(
        good.replace('hostname = "relay.test"', 'hostname = "renamed.test"').replace(
            'networks = ["127.0.0.0/8"]', 'networks = ["192.0.2.0/24"]'
        )
    )
    _hup(relay, 3)
    warning = relay.wait_log(
        r"WARNING relay: SIGHUP: config=\S+ changed keys that need a restart.*"
    )
    assert warning.group(0).endswith("not applied: server.hostname")
    with smtplib.SMTP(host, port, local_hostname="late.test", timeout=10) as late:
        assert late.ehlo()[1].decode().startswith("relay.test")  # the running hostname
    refusal = _refused(relay, "erin@dane-ok.test")  # networks applied: 127/8 refused again
    assert b"Relay access denied" in refusal.smtp_error
    assert relay.alive()
    assert relay.stop() == 0


def test_sighup_applies_a_new_tls_level_to_the_next_delivery(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("unsigned.test")
    relay = relay_factory(log_level="info")
    first = _queued(relay, "bob@unsigned.test")
    line = relay.attempt_line(first)
    assert " tls=encrypted(" in line  # level dane: an insecure zone gets opportunistic TLS
    receiver.wait_for(1, timeout=20)

    config = relay.config_path
    text = config.read_text()
    assert 'level = "dane"\n' in text
    config.write_text(text.replace('level = "dane"\n', 'level = "dane-only"\n'))
    _hup(relay, 1)
    applied = relay.wait_log(r"reloaded config=\S+ applied=(\S+) tls_level=(\S+)")
    assert applied.groups() == ("tls.level", "dane-only")

    # RFC 7672 §6 at dane-only: no DANE for the insecure zone, so the message waits.
    second = _queued(relay, "carol@unsigned.test")
    line = relay.attempt_line(second, "deferred")
    assert "error=dane_required" in line
    relay.wait_log(rf"queue_id={second} deferred pending=1")
    assert len(receiver.messages) == 1
    assert relay.alive()


def test_sighup_during_start_up_is_ignored_not_fatal(
    dns_lab: DnsLab, relay_factory: RelayFactory
) -> None:
    # A resolver that does not answer keeps the relay in its start-up check (three probes
    # one dns.timeout apart, then exit 69 with require_validating_resolver).
    dead = dns_lab.plan.spare(8)
    relay = start_relay(
        relay_factory,
        {"dns": {"require_validating_resolver": "true", "timeout": '"1s"'}},
        start=False,
        resolvers=[dead],
    )
    relay.start(wait_ready=False)
    relay.wait_log(r"did not answer the validation probe .*; probe 2 of 3", timeout=20)
    relay.kill(signal.SIGHUP)
    relay.wait_log(r"WARNING relay: SIGHUP during start-up ignored; send it again once started")
    # Without the handler SIGHUP would have killed it (-1); it ends as configured instead.
    assert relay.wait(30) == 69
