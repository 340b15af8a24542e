"""Review 7, refusal lines in `--log-format json` on a real relay: the `reply` member keeps
the enhanced status code ("550 5.7.1", not "550"), every refusal line carries `reject=`
(the command, or COMMAND for a line refused before any command ran), and every one is
counted in dane_relay_inbound_rejections_total, including a RCPT TO or MAIL FROM path
that aiosmtpd's parser refuses (553 5.1.3).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from lab import DnsLab, RelayProcess
from lab.hostile import SmtpWire, metric
from lab.relayproc import write_relay_config

pytestmark = [pytest.mark.lab, pytest.mark.timeout(90)]


def test_every_refusal_is_a_reject_line_with_its_full_reply_and_is_counted(
    dns_lab: DnsLab, tmp_path: Path
) -> None:
    config = write_relay_config(
        tmp_path / "relay.toml",
        listen=f"{dns_lab.relay_addr}:2525",
        spool_dir=tmp_path / "spool",
        resolvers=[dns_lab.resolver_addr],
        metrics_listen=f"{dns_lab.relay_addr}:9425",
        networks=["192.0.2.0/24"],  # the test client may not relay
        log_level="info",
    )
    argv = [sys.executable, "-m", "relay", "run", "-c", str(config), "--log-format", "json"]
    relay = RelayProcess(config, tmp_path / "relay.log", argv=argv)
    relay.start()
    try:
        with SmtpWire(*relay.smtp_addr) as c:
            assert c.cmd("EHLO client.test").code == 250
            assert c.cmd("MAIL FROM:<a@sender.example> SIZE=999999999999").code == 552
            assert c.cmd("MAIL FROM:<a@@sender.example>").code == 553
            assert c.cmd("MAIL FROM:<a@sender.example>").code == 250
            assert c.cmd("RCPT TO:<bob@dane-ok.test>").code == 550
            assert c.cmd("RCPT TO:<bad@bad..domain>").code == 553
            assert c.cmd("NOOP " + "x" * 1000).code == 500
            assert c.cmd("QUIT").code == 221
        relay.wait_log(r'"reason": "command-too-long"')
        counted = {
            reason: metric(relay, "dane_relay_inbound_rejections_total", reason=reason)
            for reason in (
                "message_too_big",
                "bad_sender",
                "relay_denied",
                "bad_recipient",
                "command_too_long",
            )
        }
    finally:
        assert relay.stop() == 0
    assert counted == dict.fromkeys(counted, 1.0)

    docs = [json.loads(line) for line in relay.log_path.read_text().splitlines()]
    refusals = [d for d in docs if d["msg"].startswith("reject")]
    assert all(d["msg"].startswith("reject=") for d in refusals)
    assert [(d["reject"], d["reply"], d["reason"]) for d in refusals] == [
        ("MAIL", "552 5.3.4", "message-too-big"),
        ("MAIL", "553 5.1.3", "bad-sender"),
        ("RCPT", "550 5.7.1", "relay-denied"),
        ("RCPT", "553 5.1.3", "bad-recipient"),
        ("COMMAND", "500 5.5.2", "command-too-long"),
    ]
    assert {d["severity"] for d in refusals} == {"WARNING"}
