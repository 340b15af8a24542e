"""A stand-in program for exercising the RelayProcess harness itself (not the relay).

Usage: python standin_relay.py CONFIG.toml

Reads the same TOML the relay reads; serves a `220` banner on `server.listen[0]` and
Prometheus metrics on `metrics.listen`; logs one line per connection to stderr; exits 0
on SIGTERM. It exists so the harness (start/banner wait, wait_log, metrics, kill, stop)
is tested even while the real relay is still being written; relay behaviour is only ever
tested against the real `python -m relay`.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tomllib
from types import FrameType

from prometheus_client import Counter, start_http_server


def _split(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def _on_term(signum: int, frame: FrameType | None) -> None:
    print(f"standin[{os.getpid()}]: SIGTERM, exiting", file=sys.stderr, flush=True)
    sys.exit(0)


def main(config_path: str) -> None:
    with open(config_path, "rb") as f:
        config = tomllib.load(f)
    signal.signal(signal.SIGTERM, _on_term)
    connections = Counter("standin_connections", "SMTP connections accepted", ["listener"])
    m_host, m_port = _split(config["metrics"]["listen"])
    start_http_server(m_port, addr=m_host)
    s_host, s_port = _split(config["server"]["listen"][0])
    server = socket.create_server((s_host, s_port))
    print(f"standin[{os.getpid()}]: listening on {s_host}:{s_port}", file=sys.stderr, flush=True)
    while True:
        conn, peer = server.accept()
        with conn:
            connections.labels(listener="smtp").inc()
            conn.sendall(b"220 standin ESMTP\r\n")
            print(f"standin[{os.getpid()}]: connection from {peer[0]}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
