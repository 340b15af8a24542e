"""Issue 7 logs: `dane-relay run --log-format json` writes one JSON object per line, with
one line per SMTP session and per delivery attempt, and the queue id in every line about
a message, so that one grep for the queue id follows it from acceptance to removal.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.hostile import submit
from lab.relayproc import write_relay_config

pytestmark = [pytest.mark.lab, pytest.mark.timeout(90)]

BODY = b"Subject: json\r\nMessage-ID: <json@sender.example>\r\n\r\nStructured.\r\n"


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, each parsed as a JSON object (fails on any other line)."""
    lines = path.read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    assert all(isinstance(doc, dict) for doc in docs)
    return docs


def test_json_log_lines_follow_one_message_by_its_queue_id(
    dns_lab: DnsLab, receivers: ReceiverPool, tmp_path: Path
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    config = write_relay_config(
        tmp_path / "relay.toml",
        listen=f"{dns_lab.relay_addr}:2525",
        spool_dir=tmp_path / "spool",
        resolvers=[dns_lab.resolver_addr],
        metrics_listen=f"{dns_lab.relay_addr}:9425",
        log_level="info",
    )
    argv = [sys.executable, "-m", "relay", "run", "-c", str(config), "--log-format", "json"]
    relay = RelayProcess(config, tmp_path / "relay.log", argv=argv)
    relay.start()
    try:
        qid = submit(relay, "bob@dane-ok.test", BODY)
        receiver.wait_for(1, timeout=20)
        relay.wait_log(rf"queue_id={qid} removed")
        relay.wait_log(rf'"queue_ids": "{qid}"')
    finally:
        assert relay.stop() == 0
    docs = _json_lines(relay.log_path)
    assert {doc["severity"] for doc in docs} <= {"DEBUG", "INFO", "WARNING"}
    assert all(doc["time"].endswith("Z") and doc["logger"].startswith("relay") for doc in docs)

    # The session line: who, what, how it ended.
    (session,) = [d for d in docs if d["msg"].startswith("session ") and d["messages"] == "1"]
    assert session["logger"] == "relay.smtpd"
    assert ipaddress.ip_address(session["client"]) in ipaddress.ip_network("127.0.0.0/8")
    assert {k: session[k] for k in ("helo", "tls", "auth", "queue_ids", "outcome")} == {
        "helo": "client.test",
        "tls": "none",
        "auth": "no",
        "queue_ids": qid,
        "outcome": "quit",
    }
    assert float(session["duration"]) >= 0

    # One grep for the queue id: accepted, the delivery attempt, removed, and the session.
    about = [d for d in docs if qid in json.dumps(d)]
    queued = [d for d in about if d.get("status") == "queued"]
    attempts = [d for d in about if d["logger"] == "relay.delivery"]
    assert len(queued) == 1 and queued[0]["queue_id"] == qid
    assert queued[0]["to"] == "<bob@dane-ok.test>"
    (attempt,) = attempts
    assert attempt["queue_id"] == qid
    assert attempt["status"] == "sent"
    assert attempt["dnssec"] == "secure"
    assert attempt["tls"].startswith("verified(TLSv1.3 ")
    assert attempt["dane"] == "pass"
    assert attempt["reason"] == "match"
    assert attempt["reply"].startswith("250")
    assert attempt["relay"].startswith("mx.dane-ok.test[")
    assert len([d for d in about if d["msg"].startswith(f"queue_id={qid} removed")]) == 1
    assert session in about
