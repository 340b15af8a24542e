"""Review 7, the metrics/health HTTP port of a real relay process under hostile clients:
many idle connections cost at most HTTP_CONNECTIONS threads and SMTP keeps working; a
client that resets its connection leaves one DEBUG line through logging, so with
`--log-format json` every line the process writes is still a JSON object.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import DnsLab, RelayProcess
from lab.relayproc import write_relay_config
from lab.waiting import poll_until

from relay.metrics import HTTP_CONNECTIONS, HTTP_TIMEOUT

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]


@pytest.fixture
def json_relay(dns_lab: DnsLab, tmp_path: Path) -> Iterator[RelayProcess]:
    config = write_relay_config(
        tmp_path / "relay.toml",
        listen=f"{dns_lab.relay_addr}:2525",
        spool_dir=tmp_path / "spool",
        resolvers=[dns_lab.resolver_addr],
        metrics_listen=f"{dns_lab.relay_addr}:9425",
        log_level="debug",
    )
    argv = [sys.executable, "-m", "relay", "run", "-c", str(config), "--log-format", "json"]
    relay = RelayProcess(config, tmp_path / "relay.log", argv=argv)
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def _healthz(relay: RelayProcess) -> int | None:
    host, port = relay.metrics_addr
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as resp:
            return int(resp.status)
    except OSError:
        return None


def _smtp_banner(relay: RelayProcess) -> bytes:
    with socket.create_connection(relay.smtp_addr, timeout=10) as sock:
        return sock.recv(512)


def _reset(relay: RelayProcess, data: bytes) -> None:
    sock = socket.create_connection(relay.metrics_addr, timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(data)
    sock.close()  # RST, not FIN


def test_idle_http_connections_hold_bounded_threads_and_smtp_keeps_working(
    json_relay: RelayProcess,
) -> None:
    relay = json_relay
    before = _threads(relay.pid)
    idle = []
    try:
        for _ in range(300):
            sock = socket.create_connection(relay.metrics_addr, timeout=5)
            sock.sendall(b"GET /metr")
            idle.append(sock)
        # While they are held: SMTP answers and the thread count stays within the cap.
        assert _smtp_banner(relay).startswith(b"220 ")
        assert _threads(relay.pid) <= before + HTTP_CONNECTIONS
        status = poll_until(
            lambda: _healthz(relay), timeout=HTTP_TIMEOUT + 20, what="/healthz to answer"
        )
        assert status == 200
        assert _threads(relay.pid) <= before + HTTP_CONNECTIONS
    finally:
        for sock in idle:
            sock.close()
    assert relay.alive()


def test_reset_http_clients_leave_only_json_lines(json_relay: RelayProcess) -> None:
    relay = json_relay
    for _ in range(10):
        _reset(relay, b"GET /metr")  # mid-request: the server's read fails
        _reset(relay, b"GET /metrics HTTP/1.0\r\n\r\n")  # the answer may meet the reset
    relay.wait_log(r'"msg": "metrics: connection from 127\.[0-9.]+ ended: ConnectionResetError')
    assert _healthz(relay) == 200
    assert relay.stop() == 0
    lines = relay.log_path.read_text().splitlines()
    docs = [json.loads(line) for line in lines]  # a traceback line fails here
    resets = [d for d in docs if d["msg"].startswith("metrics: connection from")]
    assert resets and {d["severity"] for d in resets} == {"DEBUG"}
    assert all("traceback" not in d for d in resets)
