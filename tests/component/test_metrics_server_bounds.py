"""relay.metrics.MetricsServer against hostile HTTP clients (review 7), over real sockets on
127.0.0.1:0: idle and slow connections are closed after the per-connection timeout, at
most `max_connections` handler threads exist however many connect, and /healthz and
/readyz report an event loop that stopped running (LoopHeartbeat).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from lab.waiting import poll_until

from relay.metrics import LoopHeartbeat, Metrics, MetricsServer

pytestmark = pytest.mark.timeout(60)

CAP = 4
TIMEOUT = 1.0


@pytest.fixture
def bounded() -> Iterator[MetricsServer]:
    srv = MetricsServer(Metrics(), "127.0.0.1", 0, max_connections=CAP, timeout=TIMEOUT)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _get(srv: MetricsServer, path: str) -> tuple[int, str] | None:
    """(status, body), or None when the server closed the connection unanswered."""
    host, port = srv.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed `sock` (EOF or reset), False while it is open."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_idle_connections_beyond_the_cap_hold_no_thread_and_all_are_closed(
    bounded: MetricsServer,
) -> None:
    threads_before = threading.active_count()
    idle = []
    for _ in range(3 * CAP):
        sock = socket.create_connection(bounded.address, timeout=5)
        sock.sendall(b"GET /metr")  # a request line that never ends
        idle.append(sock)
    try:
        # Those beyond the cap are closed at once; the first CAP wait for their request.
        poll_until(
            lambda: sum(map(_closed_by_server, idle)) >= 2 * CAP,
            timeout=TIMEOUT / 2 + 5,
            what="the connections beyond the cap to be closed",
        )
        assert threading.active_count() - threads_before <= CAP

        # A new client is answered once the idle ones time out (at most TIMEOUT later).
        health = poll_until(
            lambda: _get(bounded, "/healthz"), timeout=TIMEOUT + 10, what="/healthz"
        )
        assert health == (200, "ok\n")
        metrics = _get(bounded, "/metrics")
        assert metrics is not None and metrics[0] == 200
        assert "dane_relay_resolver_validating" in metrics[1]
        poll_until(
            lambda: all(_closed_by_server(s) for s in idle),
            timeout=TIMEOUT + 5,
            what="every idle connection to be closed by the server",
        )
        poll_until(
            lambda: threading.active_count() == threads_before,
            timeout=TIMEOUT + 5,
            what="the handler threads to end",
        )
    finally:
        for sock in idle:
            sock.close()


def test_a_request_dripped_a_byte_at_a_time_is_cut_off_at_the_deadline(
    bounded: MetricsServer,
) -> None:
    """The timeout counts from the accept, not from the last byte: a client sending one
    byte every TIMEOUT/10 seconds never trips a per-read timeout, but is closed here."""
    request = b"GET /healthz HTTP/1.0\r\n\r\n"  # 25 bytes, 2.5 x TIMEOUT to drip
    with socket.create_connection(bounded.address, timeout=5) as sock:
        sent = 0
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(TIMEOUT / 10)
        except ConnectionError:
            pass  # the server closed it mid-request
        sock.settimeout(5)
        try:
            answer = sock.recv(4096)
        except ConnectionError:
            answer = b""
    assert answer == b"", f"answered after {sent} of {len(request)} bytes"


def test_a_complete_request_is_answered_normally(bounded: MetricsServer) -> None:
    with socket.create_connection(bounded.address, timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.0 200 OK\r\n")
    assert data.endswith(b"\r\n\r\nok\n")


def test_an_oversized_request_head_is_closed_unanswered(bounded: MetricsServer) -> None:
    with socket.create_connection(bounded.address, timeout=5) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.0\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n")
        except ConnectionError:
            pass
        try:
            answer = sock.recv(4096)
        except ConnectionError:
            answer = b""
    assert answer == b""


@pytest.mark.asyncio
async def test_healthz_and_readyz_answer_503_while_the_event_loop_is_blocked() -> None:
    heartbeat = LoopHeartbeat(limit=0.3, interval=0.05)
    srv = MetricsServer(Metrics(), "127.0.0.1", 0, liveness=heartbeat.problems)
    srv.start()
    beat = asyncio.create_task(heartbeat.run())
    try:
        await asyncio.sleep(0.1)
        assert await asyncio.to_thread(_get, srv, "/healthz") == (200, "ok\n")
        assert await asyncio.to_thread(_get, srv, "/readyz") == (200, "ok\n")

        seen: dict[str, tuple[int, str] | None] = {}
        done = threading.Event()

        def scrape_while_blocked() -> None:
            try:
                seen["healthz"] = poll_until(
                    lambda: (r := _get(srv, "/healthz")) and r[0] == 503 and r,
                    timeout=20,
                    what="/healthz 503",
                )
                seen["readyz"] = _get(srv, "/readyz")
            finally:
                done.set()

        scraper = threading.Thread(target=scrape_while_blocked)
        scraper.start()
        # Block the loop as a full log pipe or a blocking read would, until the scrape
        # from the other thread is done (bounded: the scraper gives up after 20s).
        while not done.wait(0.01):
            time.sleep(0.01)
        scraper.join()
        assert seen["healthz"] is not None
        status, body = seen["healthz"]
        assert status == 503
        assert body.startswith("event loop stalled for ") and body.endswith("s\n")
        assert seen["readyz"] is not None and seen["readyz"][0] == 503
        assert seen["readyz"][1].startswith("degraded: event loop stalled for ")

        # The loop runs again: the next beat clears it.
        await asyncio.sleep(0.1)
        assert await asyncio.to_thread(_get, srv, "/healthz") == (200, "ok\n")
    finally:
        beat.cancel()
        srv.stop()
