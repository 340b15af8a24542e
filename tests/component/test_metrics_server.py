"""relay.metrics.MetricsServer over real HTTP on 127.0.0.1:0: /metrics, /healthz, /readyz."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

import pytest

from relay.metrics import Metrics, MetricsServer

pytestmark = pytest.mark.timeout(30)


class Problems:
    """A readiness callable whose answer the test changes between requests."""

    def __init__(self) -> None:
        self.current: tuple[str, ...] = ()

    def __call__(self) -> Sequence[str]:
        return self.current


@pytest.fixture
def problems() -> Problems:
    return Problems()


@pytest.fixture
def server(problems: Problems) -> Iterator[tuple[MetricsServer, Metrics]]:
    metrics = Metrics()
    srv = MetricsServer(metrics, "127.0.0.1", 0, problems)
    srv.start()
    try:
        yield srv, metrics
    finally:
        srv.stop()


def _get(srv: MetricsServer, path: str) -> tuple[int, str, str]:
    host, port = srv.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_healthz_is_ok_even_when_not_ready(
    server: tuple[MetricsServer, Metrics], problems: Problems
) -> None:
    problems.current = ("resolver does not validate DNSSEC (x)",)
    assert _get(server[0], "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")


def test_readyz_follows_the_readiness_callable_on_every_request(
    server: tuple[MetricsServer, Metrics], problems: Problems
) -> None:
    srv, _ = server
    assert _get(srv, "/readyz") == (200, "text/plain; charset=utf-8", "ok\n")
    problems.current = ("resolver does not validate DNSSEC (no AD on . DNSKEY)", "spool full")
    status, _, body = _get(srv, "/readyz")
    assert status == 503
    assert body == "degraded: resolver does not validate DNSSEC (no AD on . DNSKEY); spool full\n"
    problems.current = ()
    assert _get(srv, "/readyz")[0] == 200


def test_readyz_ignores_a_query_string(
    server: tuple[MetricsServer, Metrics], problems: Problems
) -> None:
    problems.current = ("down",)
    assert _get(server[0], "/readyz?verbose=1")[:2] == (503, "text/plain; charset=utf-8")


def test_metrics_are_still_served_with_the_gauge(server: tuple[MetricsServer, Metrics]) -> None:
    srv, metrics = server
    metrics.resolver_validating.set(1)
    status, content_type, body = _get(srv, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert "\ndane_relay_resolver_validating 1.0\n" in body


def test_default_readiness_is_ready() -> None:
    srv = MetricsServer(Metrics(), "127.0.0.1", 0)
    srv.start()
    try:
        assert _get(srv, "/readyz") == (200, "text/plain; charset=utf-8", "ok\n")
    finally:
        srv.stop()
