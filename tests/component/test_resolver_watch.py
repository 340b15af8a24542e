"""relay.app.ResolverWatch with a scripted probe: status, gauge, readiness and log lines.

The probe answers come from a list; `run()` gets a fake sleep that records the interval
and hands control back, so the loop is driven step by step without wall time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from relay.app import RESOLVER_FIX, ResolverWatch
from relay.lookup.results import ProbeResult, ResolverStatus
from relay.metrics import Metrics

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

GOOD = ProbeResult(True, ". DNSKEY secure")
BAD = ProbeResult(False, ". DNSKEY answered without AD")


class Script:
    """Probe answers in order; an Exception instance is raised instead of returned."""

    def __init__(self, *answers: ProbeResult | Exception) -> None:
        self._answers: Iterator[ProbeResult | Exception] = iter(answers)
        self.calls = 0

    async def __call__(self) -> ProbeResult:
        self.calls += 1
        answer = next(self._answers)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _watch(script: Script, metrics: Metrics | None = None) -> ResolverWatch:
    return ResolverWatch(script, ResolverStatus(), metrics or Metrics(), "127.0.0.1:53", 300.0)


def _gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("relay_resolver_validating")


def _messages(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "relay"]


async def test_validating_resolver_is_ready_with_gauge_1(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "relay")
    metrics = Metrics()
    watch = _watch(Script(GOOD), metrics)
    assert await watch.check() == GOOD
    assert (watch.status.validating, watch.status.detail) == (True, ". DNSKEY secure")
    assert _gauge(metrics) == 1
    assert watch.readiness() == ()
    assert _messages(caplog) == [
        ("INFO", "resolver=127.0.0.1:53 validates DNSSEC (. DNSKEY secure)")
    ]


async def test_failure_warns_once_with_the_fix_then_recovery_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "relay")
    metrics = Metrics()
    watch = _watch(Script(BAD, BAD, BAD, GOOD, GOOD), metrics)
    await watch.check()
    assert watch.status.validating is False
    assert _gauge(metrics) == 0
    assert watch.readiness() == (
        "resolver does not validate DNSSEC (. DNSKEY answered without AD)",
    )
    await watch.check()
    await watch.check()
    assert _gauge(metrics) == 0
    await watch.check()
    await watch.check()
    assert watch.status.validating is True
    assert _gauge(metrics) == 1
    assert watch.readiness() == ()
    assert _messages(caplog) == [
        (
            "WARNING",
            "resolver=127.0.0.1:53 does not validate DNSSEC (. DNSKEY answered without AD): "
            "DANE is off, level dane delivers with opportunistic TLS and dane-only mail is "
            f"deferred; fix: {RESOLVER_FIX}",
        ),
        (
            "INFO",
            "resolver=127.0.0.1:53 validates DNSSEC again (. DNSKEY secure); DANE is back on",
        ),
    ]


async def test_losing_validation_later_warns_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relay")
    watch = _watch(Script(GOOD, BAD, GOOD, BAD))
    for _ in range(4):
        await watch.check()
    levels = [level for level, _ in _messages(caplog)]
    assert levels == ["INFO", "WARNING", "INFO", "WARNING"]
    assert watch.status.validating is False


async def test_a_probe_that_raises_counts_as_not_validating(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "relay")
    metrics = Metrics()
    watch = _watch(Script(GOOD, RuntimeError("boom")), metrics)
    await watch.check()
    result = await watch.check()
    assert result == ProbeResult(False, "probe error: RuntimeError: boom")
    assert watch.status.validating is False
    assert _gauge(metrics) == 0
    assert [level for level, _ in _messages(caplog)] == ["INFO", "ERROR", "WARNING"]


async def test_run_sleeps_the_interval_before_each_probe() -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            raise asyncio.CancelledError

    script = Script(BAD, GOOD)
    metrics = Metrics()
    watch = ResolverWatch(script, ResolverStatus(), metrics, "127.0.0.1:53", 42.0, fake_sleep)
    with pytest.raises(asyncio.CancelledError):
        await watch.run()
    # sleep, probe (BAD), sleep, probe (GOOD), sleep (cancelled): the start-up probe is
    # serve()'s job, run() never probes without waiting first.
    assert slept == [42.0, 42.0, 42.0]
    assert script.calls == 2
    assert watch.status.validating is True
    assert _gauge(metrics) == 1


async def test_on_change_runs_on_each_flip_but_not_on_the_first_check() -> None:
    changes: list[bool] = []
    watch = ResolverWatch(
        Script(BAD, BAD, GOOD, GOOD, BAD),
        ResolverStatus(),
        Metrics(),
        "127.0.0.1:53",
        300.0,
        on_change=lambda: changes.append(watch.status.validating),
    )
    seen = []
    for _ in range(5):
        await watch.check()
        seen.append(len(changes))
    # BAD (first: no call), BAD, GOOD (flip), GOOD, BAD (flip); the status is already new.
    assert seen == [0, 0, 1, 1, 2]
    assert changes == [True, False]


async def test_a_first_failure_can_be_left_to_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "relay")
    metrics = Metrics()
    watch = _watch(Script(BAD), metrics)
    assert await watch.check(announce_failure=False) == BAD
    assert watch.status.validating is False
    assert _gauge(metrics) == 0
    assert _messages(caplog) == []
