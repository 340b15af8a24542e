"""Every metric the relay exports, defined in one place, and the HTTP endpoint serving
them with liveness (/healthz) and readiness (/readyz).

Each `Metrics` instance owns its own registry, so two relays in one process (tests)
never share counters. Label values are small closed sets (outcome, reason tokens, TLS
protocol versions and the cipher suites OpenSSL can negotiate), never addresses or
domains, to keep cardinality bounded. docs/metrics.md lists every metric, label and value.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from http.server import ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler

__all__ = ["DANE_REASONS", "Metrics", "MetricsServer", "Readiness"]

# What keeps the relay from being ready: one short phrase per problem, none when ready.
Readiness = Callable[[], Sequence[str]]

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


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def _always_ready() -> Sequence[str]:
    return ()


def _handler_class(metrics: Metrics, readiness: Readiness) -> type[MetricsHandler]:
    base: type[MetricsHandler] = MetricsHandler.factory(metrics.registry)

    class Handler(base):  # type: ignore[valid-type,misc]
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = urlsplit(self.path).path
            if path == "/healthz":
                self._plain(200, "ok")
            elif path == "/readyz":
                problems = readiness()
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
    - `GET /healthz`: liveness, always `200 ok` while the process serves HTTP.
    - `GET /readyz`: `200 ok` when `readiness()` returns no problems, else
      `503 degraded: <problem>; <problem>`. `readiness` is called on the HTTP thread, so it
      must be quick: read state (`ResolverStatus.validating`) or touch one small file
      (relay.app.spool_readiness), never wait on the network.
    """

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        readiness: Readiness = _always_ready,
    ) -> None:
        handler = _handler_class(metrics, readiness)
        server_class = (
            type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
            if ":" in host
            else _Server
        )
        self._server = server_class((host, port), handler)
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
