"""Every metric the relay exports, defined in one place, and the HTTP endpoint serving
them with liveness (/healthz) and readiness (/readyz).

Each `Metrics` instance owns its own registry, so two relays in one process (tests)
never share counters. Label values are small closed sets (outcome, reason tokens, TLS
protocol versions and the cipher suites OpenSSL can negotiate), never addresses or
domains, to keep cardinality bounded. docs/metrics.md lists every metric, label and value.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler

__all__ = [
    "DANE_REASONS",
    "HTTP_CONNECTIONS",
    "HTTP_TIMEOUT",
    "LOOP_STALL_LIMIT",
    "LoopHeartbeat",
    "Metrics",
    "MetricsServer",
    "Readiness",
]

log = logging.getLogger("relay.metrics")

# What keeps the relay from being ready: one short phrase per problem, none when ready.
Readiness = Callable[[], Sequence[str]]

#: Seconds an HTTP connection has, from its accept, to send its request and take the
#: answer; then it is closed (a client that sends nothing, or one byte at a time, holds a
#: thread and a descriptor for no longer than this).
HTTP_TIMEOUT = 10.0
#: HTTP connections served at once, one thread each; a connection accepted beyond them is
#: closed at once, without a thread.
HTTP_CONNECTIONS = 32
#: Pending connections the kernel keeps for the HTTP listener (socketserver's default is 5).
HTTP_BACKLOG = 128
#: The largest request head (request line and headers) read, in bytes.
HTTP_HEAD_LIMIT = 16384
#: Seconds without an event-loop heartbeat after which /healthz and /readyz answer 503.
LOOP_STALL_LIMIT = 30.0

#: The `reason` label of dane_relay_dane_verifications_total for the tokens the relay logs
#: (relay.dane.match.DaneVerdict.reason, relay.delivery.secure, the policy's host skips);
#: tokens not listed here (expired, chain-invalid, name-mismatch, ...) are used as they are.
DANE_REASONS = {
    "no-match": "mismatch",
    "handshake": "handshake-error",
    "no-usable-records": "unusable-tlsa",
    "tlsa_unusable": "unusable-tlsa",
    "tlsa_lookup": "tlsa-lookup-error",
    "tlsa_malformed": "tlsa-malformed",
    "dane_required": "dane-required",
}

_DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)


class Metrics:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        """`clock` (epoch seconds) dates the oldest queued message's age at scrape time."""
        self._clock = clock
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.messages_received = Counter(
            "dane_relay_messages_received",
            "Messages accepted and queued (250 after DATA)",
            registry=r,
        )
        self.bytes_received = Counter(
            "dane_relay_received_bytes", "Bytes of message data accepted", registry=r
        )
        self.inbound_rejections = Counter(
            "dane_relay_inbound_rejections",
            "SMTP commands refused by the inbound policy",
            ["reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "dane_relay_auth_failures",
            "Failed SMTP AUTH attempts (wrong user or password)",
            registry=r,
        )
        self.inbound_sessions = Counter(
            "dane_relay_inbound_sessions",
            "Inbound SMTP connections by how they ended (quit, disconnected, timeout, "
            "shutdown, too_many_errors, tls_failed, refused) and whether STARTTLS was "
            "completed (yes, no)",
            ["outcome", "tls"],
            registry=r,
        )
        self.delivery_attempts = Counter(
            "dane_relay_delivery_attempts",
            "Per-recipient delivery attempt outcomes",
            ["result", "reason"],
            registry=r,
        )
        self.delivery_tls = Counter(
            "dane_relay_delivery_attempts_by_tls",
            "Per-recipient delivery attempt outcomes by the TLS level of the connection "
            "that decided them (verified, trusted, encrypted, none)",
            ["result", "tls"],
            registry=r,
        )
        self.dane_verifications = Counter(
            "dane_relay_dane_verifications",
            "DANE verification verdicts on STARTTLS sessions (RFC 7672)",
            ["result", "reason"],
            registry=r,
        )
        self.tls_sessions = Counter(
            "dane_relay_outbound_tls",
            "Outbound SMTP sessions by TLS outcome (verified/trusted/encrypted/none)",
            ["level"],
            registry=r,
        )
        self.tls_negotiated = Counter(
            "dane_relay_tls_negotiated",
            "TLS sessions by direction (inbound STARTTLS, outbound), protocol version and "
            "cipher suite",
            ["direction", "version", "cipher"],
            registry=r,
        )
        self.connection_reuse = Counter(
            "dane_relay_connection_reuse",
            "Cached outbound connections taken for a message: hit (RSET answered 250, the "
            "message went on it) or stale (closed, a new connection was needed)",
            ["result"],
            registry=r,
        )
        self.destination_suspensions = Counter(
            "dane_relay_destination_suspensions",
            "Destinations suspended because every connection attempt to them failed "
            "(delivery.dead_destination_time)",
            registry=r,
        )
        self.suspended_deliveries = Counter(
            "dane_relay_suspended_deliveries",
            "Recipients deferred without a connection attempt while their destination "
            "was suspended",
            registry=r,
        )
        self.dns_lookups = Counter(
            "dane_relay_dns_lookups",
            "Upstream DNS queries by record type and result (secure, insecure, servfail, "
            "bogus, timeout, refused, truncated, network, cname-loop, malformed, error)",
            ["rrtype", "result"],
            registry=r,
        )
        self.dns_lookup_seconds = Histogram(
            "dane_relay_dns_lookup_seconds",
            "Time taken by upstream DNS queries",
            ["rrtype"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.dns_cache_requests = Counter(
            "dane_relay_dns_cache_requests",
            "DNS cache consultations by result (hit, miss, coalesced)",
            ["result"],
            registry=r,
        )
        self.tlsa_malformed = Counter(
            "dane_relay_tlsa_malformed_records",
            "Secure TLSA records whose data is malformed (made unusable, RFC 7671 §4.1)",
            registry=r,
        )
        self.resolver_validating = Gauge(
            "dane_relay_resolver_validating",
            "0 when the resolver answered the validation probe without DNSSEC validation "
            "(DANE is off), else 1 (also while it has not answered yet)",
            registry=r,
        )
        self.bounces = Counter(
            "dane_relay_bounces_generated", "Delivery status notifications queued", registry=r
        )
        self.queue_size = Gauge(
            "dane_relay_queue_messages",
            "Messages in the queue by state: active (no attempt has failed yet), deferred "
            "(at least one has), held (by the operator)",
            ["state"],
            registry=r,
        )
        for state in ("active", "deferred", "held"):
            self.queue_size.labels(state).set(0)
        self._oldest_received: float | None = None
        self.queue_oldest_age = Gauge(
            "dane_relay_queue_oldest_message_age_seconds",
            "Age of the oldest queued message (0 when the queue is empty)",
            registry=r,
        )
        self.queue_oldest_age.set_function(self._oldest_age)
        self.delivery_delay = Histogram(
            "dane_relay_delivery_delay_seconds",
            "Time from acceptance to successful delivery, per recipient",
            buckets=_DELAY_BUCKETS,
            registry=r,
        )

    # relay.lookup.results.LookupObserver
    def dns_lookup(self, rrtype: str, result: str, seconds: float) -> None:
        self.dns_lookups.labels(rrtype, result).inc()
        self.dns_lookup_seconds.labels(rrtype).observe(seconds)

    def dns_cache(self, result: str) -> None:
        self.dns_cache_requests.labels(result).inc()

    def delivery_result(self, result: str, reason: str, tls: str) -> None:
        """One recipient's attempt outcome, by reason and by TLS level."""
        self.delivery_attempts.labels(result, reason).inc()
        self.delivery_tls.labels(result, tls).inc()

    def dane_result(self, result: str, reason: str) -> None:
        """A DANE outcome; `reason` is the logged token, counted as DANE_REASONS says."""
        self.dane_verifications.labels(result, DANE_REASONS.get(reason, reason)).inc()

    def tls_session(self, direction: str, version: str, cipher: str) -> None:
        self.tls_negotiated.labels(direction, version or "unknown", cipher or "unknown").inc()

    def set_queue(
        self, *, active: int, deferred: int, held: int, oldest_received: float | None
    ) -> None:
        """The queue by state, and the arrival time (epoch) of its oldest message."""
        self.queue_size.labels("active").set(active)
        self.queue_size.labels("deferred").set(deferred)
        self.queue_size.labels("held").set(held)
        self._oldest_received = oldest_received  # one reference: read safely at scrape time

    def _oldest_age(self) -> float:
        oldest = self._oldest_received
        return 0.0 if oldest is None else max(0.0, self._clock() - oldest)


class LoopHeartbeat:
    """Shows that the event loop serving SMTP still runs, for /healthz and /readyz.

    `run()`, a task on that loop, stamps `clock()` every `interval` seconds; `problems()`,
    called on the HTTP thread, reports a stall when the last stamp is older than `limit`
    (a blocked loop answers no SMTP command and delivers nothing, while the HTTP thread
    would go on answering 200).
    """

    def __init__(
        self,
        limit: float = LOOP_STALL_LIMIT,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self._interval = interval
        self._clock = clock
        self.last = clock()  # one float: written on the loop, read on the HTTP thread

    async def run(self) -> None:
        while True:
            self.last = self._clock()
            await asyncio.sleep(self._interval)

    def problems(self) -> Sequence[str]:
        stalled = self._clock() - self.last
        if stalled > self.limit:
            return (f"event loop stalled for {stalled:.0f}s",)
        return ()


class _Writer(io.RawIOBase):
    """The response side of a connection: every write is one `sendall` (its socket
    timeout bounds the whole write)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        return len(data)


class _RequestTooLarge(Exception):
    pass


def _read_head(sock: socket.socket, deadline: float) -> bytes:
    """The request line and headers, read before `deadline` (time.monotonic).

    Raises:
        TimeoutError: the head did not arrive in time (idle or slow client).
        _RequestTooLarge: more than HTTP_HEAD_LIMIT bytes without the blank line.
    """
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete request within {HTTP_TIMEOUT:g}s")
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            break  # the client closed its side: the parser answers what came
        data += chunk
        if len(data) > HTTP_HEAD_LIMIT:
            raise _RequestTooLarge(f"request head over {HTTP_HEAD_LIMIT} bytes")
    return data


class _Server(ThreadingHTTPServer):
    """prometheus_client's threaded server, bounded: at most `max_connections` handler
    threads (a connection beyond them is closed at once, without a thread), each
    connection closed `timeout` seconds after its accept, and errors logged as one DEBUG
    line instead of a traceback on stderr."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = HTTP_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[MetricsHandler],
        *,
        max_connections: int,
        timeout: float,
    ) -> None:
        self.connection_timeout = timeout
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug(
                "metrics: connection from %s closed: %s connections busy",
                client_address[0],
                self.max_connections,
            )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr here; a reset or timed-out client is
        # routine, so one DEBUG line through logging (the JSON format stays JSON).
        exc = sys.exc_info()[1]
        log.debug(
            "metrics: connection from %s ended: %s: %s",
            client_address[0] if client_address else "-",
            type(exc).__name__,
            exc,
        )


def _always_ready() -> Sequence[str]:
    return ()


def _handler_class(
    metrics: Metrics, readiness: Readiness, liveness: Readiness
) -> type[MetricsHandler]:
    base: type[MetricsHandler] = MetricsHandler.factory(metrics.registry)

    class Handler(base):  # type: ignore[valid-type,misc]
        server: _Server

        def setup(self) -> None:
            # Instead of StreamRequestHandler's per-recv timeout, which a client sending
            # a byte now and then never trips: one deadline for request and answer.
            self.connection = self.request
            deadline = time.monotonic() + self.server.connection_timeout
            self.rfile = io.BytesIO(_read_head(self.connection, deadline))
            self.connection.settimeout(max(0.001, deadline - time.monotonic()))
            self.wfile = _Writer(self.connection)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = urlsplit(self.path).path
            if path == "/healthz":
                stalled = liveness()
                if stalled:
                    self._plain(503, "; ".join(stalled))
                else:
                    self._plain(200, "ok")
            elif path == "/readyz":
                problems = (*liveness(), *readiness())
                if problems:
                    self._plain(503, "degraded: " + "; ".join(problems))
                else:
                    self._plain(200, "ok")
            else:
                super().do_GET()

        def _plain(self, status: int, text: str) -> None:
            body = (text + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

    return Handler


class MetricsServer:
    """Serves one registry and the health endpoints from a background thread.

    - `GET /metrics` (and any other path): the Prometheus text exposition.
    - `GET /healthz`: liveness: `200 ok`, or `503 <problem>` when `liveness()` reports one
      (relay.app passes LoopHeartbeat.problems: the event loop stalled).
    - `GET /readyz`: `200 ok` when neither `liveness()` nor `readiness()` reports a
      problem, else `503 degraded: <problem>; <problem>`. Both are called on an HTTP
      thread, so they must be quick: read state (`ResolverStatus.validating`) or touch one
      small file (relay.app.spool_readiness), never wait on the network.

    Bounded against idle, slow and numerous clients: `max_connections` handler threads at
    most (more connections are closed at once), each connection closed `timeout` seconds
    after its accept, a listen backlog of HTTP_BACKLOG.
    """

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        readiness: Readiness = _always_ready,
        liveness: Readiness = _always_ready,
        *,
        max_connections: int = HTTP_CONNECTIONS,
        timeout: float = HTTP_TIMEOUT,
    ) -> None:
        handler = _handler_class(metrics, readiness, liveness)
        server_class = (
            type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
            if ":" in host
            else _Server
        )
        self._server = server_class(
            (host, port), handler, max_connections=max_connections, timeout=timeout
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
