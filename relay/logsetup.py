"""Logging: one line per event to standard error (journald, containers), as text or JSON.

Every log call in the relay writes its event as `key=value` fields in the message
(`queue_id=… to=<…> status=sent`), so the two formats carry the same data:

- `text` (default): `2026-12-03T16:40:00.123Z INFO relay.delivery: queue_id=… …`, for people.
- `json`: one JSON object per line, for log shippers: `time`, `severity`, `logger`, `msg`
  (the text message), every `key=value` field of the message as a string member (a value
  in double quotes loses them; `tls=verified(TLSv1.3 TLS_AES_256_GCM_SHA384)` keeps its
  parenthesised part), and `traceback` when an exception is logged. A field named like one
  of the four fixed members is left in `msg` only.

`set_level` changes the level of a running relay (SIGHUP); the format is chosen once at
start-up. docs/logging.md lists the lines and their fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

__all__ = ["LOG_FORMATS", "JsonFormatter", "message_fields", "set_level", "setup_logging"]

LOG_FORMATS = ("text", "json")

# key=value, where value is "quoted"; or <addresses> (comma-separated; a quoted local part
# inside may hold spaces, ">" or "key=": RFC 5321 §4.1.2); or runs to the next space unless
# a "(" opens a parenthesised part first (which may hold spaces); or is empty.
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_ANGLE = rf'<(?:{_QUOTED}|[^>"])*>'
_FIELD = re.compile(
    rf"(?:^|(?<=\s))([a-z][a-z0-9_]*)=({_QUOTED}|{_ANGLE}(?:,{_ANGLE})*\S*"
    r"|[^\s(]*\([^)]*\)\S*|\S*)"
)
_FIXED = frozenset({"time", "severity", "logger", "msg", "traceback"})


def _utc(created: float, msecs: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z"


def message_fields(message: str) -> dict[str, str]:
    """The `key=value` fields of one log message (first occurrence of a key wins)."""
    fields: dict[str, str] = {}
    for key, value in _FIELD.findall(message):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        fields.setdefault(key, value)
    return fields


class _UtcFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _utc(record.created, record.msecs)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        doc: dict[str, str] = {
            "time": _utc(record.created, record.msecs),
            "severity": record.levelname,
            "logger": record.name,
            "msg": message,
        }
        for key, value in message_fields(message).items():
            if key not in _FIXED:
                doc[key] = value
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to standard error at `level` in format `fmt` (one of LOG_FORMATS)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else _UtcFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)


def set_level(level: str) -> None:
    """The root level; library chatter (aiosmtpd logs every command at INFO) stays at
    WARNING unless the level is debug."""
    logging.getLogger().setLevel(level.upper())
    noisy_level = logging.NOTSET if level == "debug" else logging.WARNING
    for noisy in ("mail.log", "aiosmtpd", "asyncio"):
        logging.getLogger(noisy).setLevel(noisy_level)
