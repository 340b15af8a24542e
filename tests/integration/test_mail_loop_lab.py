"""Mail loops against the lab (issue 5 review): the relay's own identity behind a wildcard
or IPv4-mapped address, lookup and probe when the relay is a backup MX, the inbound hop
limit, and a repeated RCPT. Real relay process, nsd + unbound, TLS receivers.

Each test fails on the code before the fix: the relay then connected to itself (wildcard,
mapped address: deferred for want of STARTTLS, not bounced 5.4.6), listed and probed hosts
below itself, queued a message with any number of Received: headers, and queued a repeated
recipient twice.
"""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess, write_relay_config
from lab.hostile import metric, spool_entries, submit
from lab.scenarios import MAPPED_LOOP_ADDRESS

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
BODY = b"Subject: loops\r\nMessage-ID: <loop@sender.example>\r\n\r\nHello.\r\n"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _lines(relay: RelayProcess, qid: str) -> list[str]:
    """The delivery attempt lines of `qid` (logger relay.delivery, with a status)."""
    text = relay.log_path.read_text(errors="replace")
    return [
        line
        for line in text.splitlines()
        if "relay.delivery:" in line and f"queue_id={qid} " in line and " status=" in line
    ]


def test_a_wildcard_listener_on_the_delivery_port_makes_a_local_mx_a_loop(
    dns_lab: DnsLab, relay_factory: RelayFactory
) -> None:
    # The relay listens on 0.0.0.0 at the delivery port: mx.dane-ok.test (127.R.1.1) is one
    # of its own addresses (RFC 5321 §5.1; Postfix inet_interfaces = all).
    port = _free_port("0.0.0.0")
    relay = relay_factory(
        listen=[f"{dns_lab.relay_addr}:2525", f"0.0.0.0:{port}"], delivery_port=port
    )
    qid = submit(relay, "bob@dane-ok.test", BODY)
    line = relay.attempt_line(qid, "bounced")
    address = dns_lab.hosts["mx.dane-ok.test"].address
    assert (
        'status=bounced reply="554 5.4.6 mail for dane-ok.test loops back to myself '
        f"(address {address} is local and this relay listens on 0.0.0.0 (server.listen))"
    ) in line
    assert "error=mail_loop" in line
    relay.wait_log(rf"queue_id={qid} removed")
    assert len(_lines(relay, qid)) == 1  # one attempt, one line
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="bounced", reason="mail_loop")
        == 1
    )


def test_an_ipv4_mapped_aaaa_of_the_relays_listen_address_is_a_loop(
    dns_lab: DnsLab, relay_factory: RelayFactory
) -> None:
    port = _free_port(MAPPED_LOOP_ADDRESS)
    relay = relay_factory(
        listen=[f"{dns_lab.relay_addr}:2525", f"{MAPPED_LOOP_ADDRESS}:{port}"],
        delivery_port=port,
    )
    qid = submit(relay, "bob@mapped-loop.test", BODY)
    line = relay.attempt_line(qid, "bounced")
    assert (
        'reply="554 5.4.6 mail for mapped-loop.test loops back to myself '
        f"(address ::ffff:{MAPPED_LOOP_ADDRESS} is this relay's (server.listen))"
    ) in line
    assert len(_lines(relay, qid)) == 1


def _cli(command: str, config: Path, *extra: str) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-m", "relay", command, "loops.test", "-c", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.stderr == "", out.stderr
    return out.returncode, out.stdout


SKIPPED = (
    "  skipped: MX preference {pref} is not lower than this relay's own (20, mx2.loops.test): "
    "not tried (RFC 5321 §5.1)"
)


def test_lookup_and_probe_skip_the_hosts_at_or_below_the_relay(
    dns_lab: DnsLab, receivers: ReceiverPool, tmp_path: Path
) -> None:
    mx1, mx2b, mx3 = receivers.start("mx1.loops.test", "mx2b.loops.test", "mx3.loops.test")
    config = write_relay_config(
        tmp_path / "relay.toml",
        # The relay's name is itself only at a port it listens on: 25, where lookup and
        # probe look (neither binds the listeners).
        listen=[f"{dns_lab.relay_addr}:2525", f"{dns_lab.relay_addr}:25"],
        spool_dir=tmp_path / "spool",
        resolvers=[dns_lab.resolver_addr],
        metrics_listen=f"{dns_lab.relay_addr}:9425",
        hostname="mx2.loops.test",  # the relay is the MX 20 host
    )
    code, out = _cli("lookup", config)
    assert code == 0
    lines = out.splitlines()
    for host, pref in (("mx2b.loops.test", 20), ("mx3.loops.test", 30)):
        i = lines.index(f"host {host} (MX {pref})")
        assert lines[i + 1] == SKIPPED.format(pref=pref)
    assert "  TLS: mail loop; mail for loops.test loops back to myself" in "\n".join(lines)
    assert lines[-1] == "result: attempt delivery via mx1.loops.test"

    code, out = _cli("probe", config)
    assert code == 0
    lines = out.splitlines()
    not_tried = (
        "  connect: not tried (its MX preference is not lower than this relay's, RFC 5321 §5.1)"
    )
    assert lines[lines.index(SKIPPED.format(pref=20)) + 1] == not_tried
    assert lines[lines.index(SKIPPED.format(pref=30)) + 1] == not_tried
    assert re.fullmatch(
        r"result: attempt delivery via mx1\.loops\.test\[.*\]:25 \(verified\)", lines[-1]
    )
    assert mx1.server_names == ["mx1.loops.test"]  # the probe's STARTTLS
    assert mx2b.server_names == [] and mx3.server_names == []  # never contacted


def _hops(n: int) -> bytes:
    return b"".join(
        b"Received: from hop%d.example by relay%d.example; Fri, 4 Dec 2026 10:00:00 +0000\r\n"
        % (i, i)
        for i in range(n)
    )


def test_a_message_over_the_hop_limit_is_refused_554_5_4_6(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory()
    host, port = relay.smtp_addr
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=10) as client:
        client.ehlo()
        assert client.mail("alice@sender.example")[0] == 250
        assert client.rcpt("bob@dane-ok.test")[0] == 250
        assert client.data(_hops(51) + BODY) == (554, b"5.4.6 Too many hops")
    relay.wait_log(
        r"reject=DATA client=\S+ from=<alice@sender\.example> to=<bob@dane-ok\.test> "
        r'reply="554 5\.4\.6" reason=too-many-hops hops=51 limit=50'
    )
    assert spool_entries(relay, "env") == []
    assert metric(relay, "dane_relay_inbound_rejections_total", reason="too_many_hops") == 1
    # At the limit the message goes through (the relay's own Received: makes 51).
    qid = submit(relay, "bob@dane-ok.test", _hops(50) + BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.content.count(b"Received: ") == 51
    relay.wait_log(rf"queue_id={qid} removed")


def test_a_repeated_rcpt_is_queued_and_delivered_once(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory()
    qid = submit(relay, ["bob@dane-ok.test", "bob@DANE-OK.test", "bob@dane-ok.test"], BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("bob@dane-ok.test",)
    relay.wait_log(
        rf"queue_id={qid} client=\S+ from=<alice@sender\.example> to=<bob@dane-ok\.test> size="
    )
    relay.wait_log(rf"queue_id={qid} removed")
    (line,) = _lines(relay, qid)
    assert "to=<bob@dane-ok.test> " in line and "status=sent" in line
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="delivered", reason="sent") == 1
    )


def test_a_next_hop_named_after_the_relay_at_a_port_it_does_not_listen_on_is_no_loop(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    # Review 5b f2: server.hostname is mx.dane-ok.test, the relay listens at :2525 only, and
    # both a transport and the gateway send to [mx.dane-ok.test]:25, another server (RFC
    # 5321 §5.1). Before the fix both were bounced 554 5.4.6 "loops back to myself".
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory(
        hostname="mx.dane-ok.test",
        extra='[delivery.transport]\n"dane-ok.test" = "[mx.dane-ok.test]:25"\n\n'
        '[gateway]\ndomains = ["gw.test"]\nnext_hop = "[mx.dane-ok.test]:25"\n'
        'tls_level = "may"\n',
    )
    first = submit(relay, "bob@dane-ok.test", BODY)
    second = submit(relay, "carol@gw.test", BODY)
    messages = receiver.wait_for(2, timeout=20)
    assert sorted(m.rcpt_tos for m in messages) == [("bob@dane-ok.test",), ("carol@gw.test",)]
    for qid in (first, second):
        assert " relay=mx.dane-ok.test[" in relay.attempt_line(qid, "sent")
        relay.wait_log(rf"queue_id={qid} removed")
    assert "5.4.6" not in relay.log_path.read_text(errors="replace")
