"""The operator documentation states what the code does (issue 5/7 review, docs items).

Each test reads a fact from the code (a default, the fields of a real log line) and checks
that the documentation states that fact, so the two cannot drift apart silently.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from relay.config import DeliveryConfig, ServerConfig
from relay.delivery.attempt import Attempt, AttemptRecorder
from relay.metrics import Metrics
from relay.smtp.reply import SmtpReply

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _section(text: str, heading: str) -> str:
    """The text under `heading` (a whole heading line) up to the next heading of any level."""
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1 :]
    end = re.search(r"(?m)^#{1,6} ", rest)
    return rest[: end.start()] if end else rest


def test_stopping_states_the_default_shutdown_grace() -> None:
    stopping = _section((DOCS / "operations.md").read_text(), "## Stopping")
    grace = ServerConfig().shutdown_grace
    assert f"(default {grace:g} s)" in stopping
    assert not re.search(r"\b10 seconds\b", (DOCS / "operations.md").read_text())


def test_operations_has_one_inbound_gateway_section() -> None:
    text = (DOCS / "operations.md").read_text()
    assert re.findall(r"(?m)^#+ Inbound gateway$", text) == ["### Inbound gateway"]


def test_connect_timeout_is_documented_as_not_covering_the_greeting() -> None:
    """The greeting is read under command_timeout (relay.delivery.transport.SmtpTransport)."""
    text = (DOCS / "configuration.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| `connect_timeout` |")]
    assert f'`"{DeliveryConfig().connect_timeout:g}s"`' in row
    assert "does not cover the wait for the server's `220` greeting" in row
    assert "`command_timeout` bounds that" in row
    (row,) = [line for line in text.splitlines() if line.startswith("| `command_timeout` |")]
    assert "the `220` greeting after the connect" in row


def test_every_field_of_the_delivery_log_line_is_in_the_field_table(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A line with every optional part set, written by the real recorder."""
    attempt = Attempt("QID", "example.org", ["bob@example.org"])
    attempt.relay = "mx.example.org[192.0.2.25]:25"
    attempt.dnssec = "secure"
    attempt.dns_detail = "dns=partial failed=AAAA"
    attempt.tls, attempt.tls_detail = "verified", "(TLSv1.3 TLS_AES_256_GCM_SHA384)"
    attempt.dane, attempt.dane_detail = "pass", 'reason=match matched="3 1 1 ab" depth=0'
    attempt.tlsa_base = "mx.example.org"
    attempt.route_detail = " level=dane nexthop=mx conn=reused:2"
    recorder = AttemptRecorder(Metrics(), clock=lambda: 0.0)
    with caplog.at_level(logging.INFO, logger="relay.delivery"):
        recorder.log_line(
            attempt, attempt.recipients, "deferred", SmtpReply(451, "4.7.5", "x"), 0.0, " error=e"
        )
    (record,) = caplog.records
    line = record.getMessage()
    keys = re.findall(r"(?:^| )([a-z_]+)=", line)
    assert len(keys) >= 18, line  # every optional part above made it into the line
    text = (DOCS / "metrics.md").read_text()
    table = _section(text, "## The delivery log line")
    documented = set(re.findall(r"(?m)^\| (.+?) \|", table))
    names = {n for cell in documented for n in re.findall(r"`([a-z_]+)`", cell)}
    missing = [k for k in keys if k not in names]
    assert missing == [], f"not in docs/metrics.md's field table: {missing}"
    # The one summary in docs/logging.md names them too.
    logging_md = (DOCS / "logging.md").read_text()
    (row,) = [r for r in logging_md.splitlines() if r.startswith("| delivery attempt |")]
    assert [k for k in keys if f"`{k}" not in row] == []
