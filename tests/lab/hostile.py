"""Helpers shared by the hostile tests (tests/integration/test_hostile_*.py).

Owns:
- `submit()`: one message through the relay's listener, returning its queue id.
- `metric()`: one sample from the relay's /metrics.
- `start_relay()`: `relay_factory` plus settings that `write_relay_config` has no option
  for (keys are inserted into their TOML tables before the relay starts).
- `SmtpWire`: a raw SMTP client that sends exactly the bytes a test gives it and reads
  replies, for clients that misbehave in ways smtplib refuses to.
- `spool_entries()`: the file names in one spool subdirectory.

Guarantees: every read has a deadline; nothing here sleeps for synchronisation.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .relayproc import RelayProcess, SmtpReply, send_mail

__all__ = ["SENDER", "SmtpWire", "metric", "spool_entries", "start_relay", "submit"]

SENDER = "alice@sender.example"


def submit(
    relay: RelayProcess, rcpts: str | Sequence[str], body: bytes, sender: str = SENDER
) -> str:
    """Send one message to the relay; returns the queue id from its 250 reply."""
    host, port = relay.smtp_addr
    reply = send_mail(host, port, sender, [rcpts] if isinstance(rcpts, str) else rcpts, body)
    assert reply.code == 250, reply
    match = re.search(r"queued as ([0-9A-F]+)", reply.text)
    assert match, reply
    return match.group(1)


def metric(relay: RelayProcess, name: str, **labels: str) -> float:
    return relay.metrics().get((name, frozenset(labels.items())), 0.0)


def start_relay(
    relay_factory: Callable[..., RelayProcess],
    tables: Mapping[str, Mapping[str, str]] | None = None,
    *,
    start: bool = True,
    **options: Any,
) -> RelayProcess:
    """A relay from `relay_factory(**options)` with extra keys in its TOML tables.

    `tables` maps a table name ("server", "delivery", "dns", ...) to {key: TOML value
    text}, e.g. {"delivery": {"command_timeout": '"2s"'}}.
    """
    relay = relay_factory(start=False, **options)
    text = relay.config_path.read_text()
    for table, keys in (tables or {}).items():
        header = f"[{table}]\n"
        assert header in text, f"no [{table}] table in {relay.config_path}"
        lines = "".join(f"{k} = {v}\n" for k, v in keys.items())
        text = text.replace(header, header + lines, 1)
    relay.config_path.write_text(text)
    return relay.start() if start else relay


def spool_entries(relay: RelayProcess, sub: str) -> list[str]:
    """Names of the files in `sub` ("env", "data", "corrupt", "tmp") of the relay's spool."""
    import tomllib

    config = tomllib.loads(relay.config_path.read_text())
    directory = Path(config["spool"]["directory"]) / sub
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


class SmtpWire:
    """A raw SMTP client: `send()` writes bytes verbatim, `reply()` reads one reply."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unparsed {self._buf!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def reply(self) -> SmtpReply:
        """One (possibly multi-line) reply; its text lines are joined with newlines."""
        texts = []
        while True:
            line = self._line()
            texts.append(line[4:].decode(errors="replace"))
            if line[3:4] != b"-":
                return SmtpReply(int(line[:3]), "\n".join(texts))

    def cmd(self, line: str | bytes) -> SmtpReply:
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def pending_bytes(self) -> bytes:
        """What the server sent that no reply() consumed yet (without waiting)."""
        return self._buf

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SmtpWire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
