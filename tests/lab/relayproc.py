"""The relay under test as a real subprocess: config, start, signals, logs, metrics.

Owns:
- `write_relay_config()`: the relay's TOML configuration for a lab run.
- `RelayProcess`: runs `python -m relay run -c CONFIG` with stdout+stderr appended to a
  log file; knows it is up when its SMTP listener sends a 220 banner; sends signals by
  pid; waits for log lines; scrapes `/metrics`.
- `send_mail()`: one SMTP transaction with the stdlib client, returning the DATA reply.
- `stop_all_relays()`: stops every relay still running (a session finalizer calls it).

Guarantees: every wait has a deadline and fails with the relay's log tail. `wait_log`
only looks at lines written since the latest `start()`, so a restarted relay sharing a
log file is not confused by its predecessor's lines.
"""

from __future__ import annotations

import json
import re
import signal
import smtplib
import socket
import sys
import tomllib
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

from .procs import ManagedProcess, log_tail
from .waiting import LabTimeout, poll_until

__all__ = [
    "MetricKey",
    "RelayProcess",
    "SmtpReply",
    "send_mail",
    "split_hostport",
    "stop_all_relays",
    "write_relay_config",
]

MetricKey = tuple[str, frozenset[tuple[str, str]]]

_START_TIMEOUT = 15.0
_LIVE: list[RelayProcess] = []


class SmtpReply(NamedTuple):
    code: int
    text: str


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(_toml_str(v) for v in values) + "]"


def write_relay_config(
    path: Path,
    *,
    listen: str | Sequence[str],
    spool_dir: Path,
    resolvers: Sequence[str],
    metrics_listen: str,
    networks: Sequence[str] = ("127.0.0.0/8",),
    tls_level: str = "dane",
    insecure_mx_policy: str = "dane",
    delivery_port: int = 25,
    hostname: str = "relay.test",
    log_level: str = "debug",
    tls_ca_file: Path | None = None,
    relayhost: str | None = None,
    extra: str = "",
) -> Path:
    """Write the relay's TOML config to `path` and return `path`.

    `extra` is appended verbatim (for options or tables a test needs beyond these, such as
    `[tls.policy]` or `[delivery.transport]`). `tls_ca_file` and `relayhost` are keys of
    [tls] and [delivery], which `extra` cannot reach (TOML forbids a second header).
    """
    listen_list = [listen] if isinstance(listen, str) else list(listen)
    text = (
        "[server]\n"
        f"listen = {_toml_list(listen_list)}\n"
        f"hostname = {_toml_str(hostname)}\n"
        "\n[relay]\n"
        f"networks = {_toml_list(list(networks))}\n"
        "\n[spool]\n"
        f"directory = {_toml_str(str(spool_dir))}\n"
        "\n[dns]\n"
        f"resolvers = {_toml_list(list(resolvers))}\n"
        "\n[tls]\n"
        f"level = {_toml_str(tls_level)}\n"
        f"insecure_mx_policy = {_toml_str(insecure_mx_policy)}\n"
        + (f"ca_file = {_toml_str(str(tls_ca_file))}\n" if tls_ca_file else "")
        + "\n[delivery]\n"
        f"port = {delivery_port}\n"
        + (f"relayhost = {_toml_str(relayhost)}\n" if relayhost else "")
        + "\n[metrics]\n"
        f"listen = {_toml_str(metrics_listen)}\n"
        "\n[log]\n"
        f"level = {_toml_str(log_level)}\n"
    )
    if extra:
        text += "\n" + extra.strip("\n") + "\n"
    path.write_text(text)
    return path


def split_hostport(value: str) -> tuple[str, int]:
    """Split "127.0.0.1:25" into ("127.0.0.1", 25) and "[::1]:25" into ("::1", 25)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not host:port: {value!r}")
    return host.strip("[]"), int(port)


class RelayProcess:
    def __init__(
        self,
        config_path: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        *,
        argv: Sequence[str] | None = None,
    ) -> None:
        """`argv` overrides the command (default: this interpreter, `-m relay run -c`)."""
        self.config_path = config_path
        self.log_path = log_path
        config = tomllib.loads(config_path.read_text())
        self.smtp_addr = split_hostport(config["server"]["listen"][0])
        self.metrics_addr = split_hostport(config["metrics"]["listen"])
        command = (
            list(argv)
            if argv is not None
            else [sys.executable, "-m", "relay", "run", "-c", str(config_path)]
        )
        self._proc = ManagedProcess("relay", command, log_path, env=env)
        self._log_offset = 0

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def alive(self) -> bool:
        return self._proc.alive()

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def _fail(self, problem: str) -> AssertionError:
        return AssertionError(
            f"relay (pid {self.pid}): {problem}\n--- log tail ---\n{self.log_tail()}"
        )

    def start(self, *, wait_ready: bool = True, timeout: float = _START_TIMEOUT) -> RelayProcess:
        """Spawn the relay; unless `wait_ready=False`, wait for its 220 banner.

        Raises:
            AssertionError: if it exits or sends no 220 banner before `timeout`.
        """
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc.start()
        _LIVE.append(self)
        if wait_ready:
            try:
                poll_until(self._banner, timeout=timeout, what="the relay's 220 banner")
            except LabTimeout as exc:
                raise self._fail(str(exc)) from exc
        return self

    def _banner(self) -> bool:
        if not self._proc.alive():
            raise self._fail(f"exited with status {self._proc.returncode} during startup")
        try:
            with socket.create_connection(self.smtp_addr, timeout=1.0) as sock:
                banner = sock.recv(512)
        except OSError:
            return False
        if banner.startswith(b"220"):
            return True
        raise self._fail(f"unexpected greeting {banner!r}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` by pid (SIGKILL also reaps it)."""
        self._proc.kill(sig)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit status."""
        return self._proc.stop(grace)

    def wait(self, timeout: float) -> int:
        """Wait for the relay to exit by itself; return its exit status."""
        return self._proc.wait(timeout)

    def wait_log(self, regex: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """The first log line (since the latest start) matching `regex`, waiting for it.

        Raises:
            AssertionError: with the log tail if no line matches within `timeout`.
        """
        pattern = re.compile(regex) if isinstance(regex, str) else regex

        def find() -> re.Match[str] | None:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace")
            for line in text.splitlines():
                match = pattern.search(line)
                if match:
                    return match
            return None

        try:
            return poll_until(find, timeout=timeout, what=f"log line /{pattern.pattern}/")
        except LabTimeout as exc:
            raise self._fail(str(exc)) from exc

    def attempt_line(self, queue_id: str, status: str = "sent", timeout: float = 20.0) -> str:
        """The first delivery log line for `queue_id` whose status matches `status` (a regex
        alternative such as "sent|deferred" is allowed), waiting for it."""
        return self.wait_log(rf"queue_id={queue_id} .*status=(?:{status}).*", timeout).group(0)

    def metrics(self, timeout: float = 5.0) -> dict[MetricKey, float]:
        """Scrape `/metrics`: {(sample name, frozenset(labels.items())): value}."""
        host, port = self.metrics_addr
        url = f"http://{host}:{port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def __repr__(self) -> str:
        return f"<RelayProcess {self._proc!r} {self.config_path}>"


def stop_all_relays() -> list[str]:
    """Stop every relay started in this session that is still running."""
    stopped = []
    for relay in _LIVE:
        if relay.alive():
            stopped.append(repr(relay))
            relay.stop()
    _LIVE.clear()
    return stopped


def send_mail(
    addr: str,
    port: int,
    mail_from: str,
    rcpt_tos: Sequence[str],
    body: bytes | str,
    *,
    helo: str = "client.test",
    timeout: float = 10.0,
) -> SmtpReply:
    """One SMTP transaction (EHLO, MAIL, RCPT..., DATA, QUIT); return the DATA reply.

    Raises:
        smtplib.SMTPResponseException: if MAIL or any RCPT is refused (code/text in it).
        smtplib.SMTPDataError: if DATA itself is refused before the message is sent.
    """
    with smtplib.SMTP(addr, port, local_hostname=helo, timeout=timeout) as client:
        client.ehlo()
        code, text = client.mail(mail_from)
        if code != 250:
            raise smtplib.SMTPResponseException(code, text)
        for rcpt in rcpt_tos:
            code, text = client.rcpt(rcpt)
            if code not in (250, 251):
                raise smtplib.SMTPResponseException(code, text)
        code, text = client.data(body)
        return SmtpReply(code, text.decode(errors="replace"))
