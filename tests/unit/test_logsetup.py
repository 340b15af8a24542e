"""relay.logsetup: the JSON line format and the [log] format key."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from relay.config import load_config
from relay.errors import ConfigError
from relay.logsetup import JsonFormatter, message_fields, set_level, setup_logging
from relay.smtp.address import log_quoted

DELIVERY = (
    "queue_id=661BD6F37E76BB1E3238D to=<bob@example.org>,<c@example.org> "
    "relay=mx.example.org[192.0.2.25]:25 dnssec=secure "
    "tls=verified(TLSv1.3 TLS_AES_256_GCM_SHA384) dane=pass reason=match "
    'matched="3 1 1 3b6d" depth=0 delay=0.42 status=sent reply="250 2.0.0 Ok: \\"x\\""'
)


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("relay.delivery", logging.INFO, "f.py", 1, msg, args, exc_info)
    record.created, record.msecs = 1_796_000_000.0, 123.0
    return record


def test_message_fields_of_a_delivery_line() -> None:
    assert message_fields(DELIVERY) == {
        "queue_id": "661BD6F37E76BB1E3238D",
        "to": "<bob@example.org>,<c@example.org>",
        "relay": "mx.example.org[192.0.2.25]:25",
        "dnssec": "secure",
        "tls": "verified(TLSv1.3 TLS_AES_256_GCM_SHA384)",
        "dane": "pass",
        "reason": "match",
        "matched": "3 1 1 3b6d",
        "depth": "0",
        "delay": "0.42",
        "status": "sent",
        "reply": '250 2.0.0 Ok: \\"x\\"',
    }


def test_message_fields_ignore_prose_and_keep_the_first_of_a_key() -> None:
    assert message_fields("resolver=127.0.0.1 validates DNSSEC (root) again; x=1 x=2 a-b=3") == {
        "resolver": "127.0.0.1",
        "x": "1",
    }
    assert message_fields("no fields here") == {}
    assert message_fields("empty= next=1") == {"empty": "", "next": "1"}


def test_a_quoted_local_part_cannot_forge_a_field() -> None:
    # RFC 5321 §4.1.2: a quoted local part may hold spaces, "<", ">" and "key=value".
    line = 'queue_id=Q from=<"x to=<evil@x> a"@d.example> to=<real@x>,<b@y> status=queued'
    assert message_fields(line) == {
        "queue_id": "Q",
        "from": '<"x to=<evil@x> a"@d.example>',
        "to": "<real@x>,<b@y>",
        "status": "queued",
    }


def test_a_free_text_why_is_kept_whole() -> None:
    """Free-text `why` values are written quoted (log_quoted), so the JSON member is the
    whole text, not its first word; a `"` or a control character in it cannot end it."""
    why = 'spool: [Errno 28] No space left on device: "/x"\x1b'
    line = f'reject=DATA client=127.0.0.1 reply="452 4.3.1" why="{log_quoted(why)}" size=3'
    assert message_fields(line) == {
        "reject": "DATA",
        "client": "127.0.0.1",
        "reply": "452 4.3.1",
        "why": "spool: [Errno 28] No space left on device: '/x'\\x1b",
        "size": "3",
    }


def test_json_formatter_writes_one_object_with_the_fixed_members_and_the_fields() -> None:
    line = JsonFormatter().format(_record("queue_id=%s status=%s time=x msg=y", "ABC", "sent"))
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2026-11-30T00:53:20.123Z",
        "severity": "INFO",
        "logger": "relay.delivery",
        "msg": "queue_id=ABC status=sent time=x msg=y",
        "queue_id": "ABC",
        "status": "sent",
    }


def test_json_formatter_puts_the_traceback_in_one_member() -> None:
    line = JsonFormatter().format(_record("queue_id=Q internal error", exc=True))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["queue_id"] == "Q"
    assert doc["traceback"].startswith("Traceback (most recent call last):")
    assert doc["traceback"].endswith("ValueError: boom")


def test_setup_logging_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="log format 'xml': expected one of text, json"):
        setup_logging("info", "xml")


def test_set_level_changes_the_root_level_and_the_library_loggers() -> None:
    root = logging.getLogger()
    saved = root.level
    try:
        set_level("debug")
        assert root.level == logging.DEBUG
        assert logging.getLogger("aiosmtpd").level == logging.NOTSET
        set_level("warning")
        assert root.level == logging.WARNING
        assert logging.getLogger("aiosmtpd").level == logging.WARNING
    finally:
        set_level(logging.getLevelName(saved).lower())


def test_log_format_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[log]\nformat = "json"\n')
    assert load_config(path).log.format == "json"
    path.write_text("[log]\n")
    assert load_config(path).log.format == "text"
    path.write_text('[log]\nformat = "xml"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f'{path}: log.format: expected one of "text", "json", got \'xml\''
