"""Logging: one line per event, key=value fields, to stderr (journald/containers)."""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["setup_logging"]


class _UtcFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UtcFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (aiosmtpd logs every command at INFO) stays at WARNING
    # unless the operator asked for debug.
    if level != "debug":
        for noisy in ("mail.log", "aiosmtpd", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
