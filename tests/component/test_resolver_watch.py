"""relay.app.ResolverWatch with a scripted probe: status, gauge, readiness and log lines.

The probe answers come from a list; `run()` and `start()` get a fake sleep that records
the interval and hands control back, so the loops are driven step by step without wall
time. The last tests use the real DnsResolver against ScriptedDns: a probe nobody answers
keeps DANE on (RFC 7672 §2.1: a failure is never "insecure").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import pytest_asyncio
from lab.scripted_dns import Drop, ScriptedDns, ServFail

from relay.app import RESOLVER_FIX, ResolverWatch
from relay.config import DnsConfig
from relay.dane.policy import Action
from relay.delivery.route import resolve_host, resolve_mx
from relay.lookup.resolver import DnsResolver
from relay.lookup.results import ProbeResult, ResolverStatus, Security
from relay.metrics import Metrics

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

GOOD = ProbeResult(True, ". DNSKEY secure")
BAD = ProbeResult(False, ". DNSKEY answered without AD")
SILENT = ProbeResult(False, ". DNSKEY timed out", conclusive=False)
COULD_NOT_CHECK = "resolver=127.0.0.1:53 could not be checked (. DNSKEY timed out): "


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
    return metrics.registry.get_sample_value("dane_relay_resolver_validating")


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


async def test_a_probe_that_raises_is_inconclusive_and_keeps_the_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "relay")
    metrics = Metrics()
    watch = _watch(Script(GOOD, RuntimeError("boom")), metrics)
    await watch.check()
    result = await watch.check()
    assert result == ProbeResult(False, "probe error: RuntimeError: boom", conclusive=False)
    assert (watch.status.validating, watch.status.answering) == (True, False)
    assert _gauge(metrics) == 1
    assert watch.readiness() == ("resolver not answering: probe error: RuntimeError: boom",)
    assert [level for level, _ in _messages(caplog)] == ["INFO", "ERROR", "WARNING"]


async def test_an_inconclusive_first_probe_keeps_dane_on_and_reports_not_answering(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # F2: a relay started before its resolver (or while an attacker blocks the resolver's
    # upstream) must not run without DANE: nothing was proven, so validating stays True.
    caplog.set_level(logging.DEBUG, "relay")
    metrics = Metrics()
    changes: list[bool] = []
    watch = ResolverWatch(
        Script(SILENT, SILENT, GOOD),
        ResolverStatus(),
        metrics,
        "127.0.0.1:53",
        300.0,
        on_change=lambda: changes.append(True),
    )
    assert await watch.check() == SILENT
    assert (watch.status.validating, watch.status.answering) == (True, False)
    assert watch.state == "unknown"
    assert _gauge(metrics) == 1
    assert watch.readiness() == ("resolver not answering: . DNSKEY timed out",)
    await watch.check()
    await watch.check()
    assert (watch.status.validating, watch.status.answering, watch.state) == (True, True, "yes")
    assert watch.readiness() == ()
    assert changes == []
    assert _messages(caplog) == [
        (
            "WARNING",
            COULD_NOT_CHECK + "validation unknown: DANE stays on, lookups that fail defer; "
            "retrying in 30s",
        ),
        ("DEBUG", "resolver=127.0.0.1:53 still not answering (. DNSKEY timed out)"),
        ("INFO", "resolver=127.0.0.1:53 validates DNSSEC (. DNSKEY secure)"),
    ]


async def test_an_inconclusive_probe_after_success_keeps_validating_true(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "relay")
    metrics = Metrics()
    changes: list[bool] = []
    watch = ResolverWatch(
        Script(GOOD, SILENT, SILENT, GOOD),
        ResolverStatus(),
        metrics,
        "127.0.0.1:53",
        300.0,
        on_change=lambda: changes.append(True),
    )
    for _ in range(3):
        await watch.check()
        assert watch.status.validating is True
        assert _gauge(metrics) == 1
    assert watch.status.answering is False
    await watch.check()
    assert watch.status.answering is True
    assert changes == []  # nothing changed: the cache is kept
    assert _messages(caplog) == [
        ("INFO", "resolver=127.0.0.1:53 validates DNSSEC (. DNSKEY secure)"),
        (
            "WARNING",
            COULD_NOT_CHECK + "last known to validate: DANE stays on, lookups that fail defer; "
            "retrying in 30s",
        ),
        ("INFO", "resolver=127.0.0.1:53 answers again and validates DNSSEC (. DNSKEY secure)"),
    ]


async def test_an_inconclusive_probe_after_a_failure_keeps_dane_off_and_both_are_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "relay")
    metrics = Metrics()
    watch = _watch(Script(BAD, SILENT), metrics)
    await watch.check()
    await watch.check()
    assert (watch.status.validating, watch.status.answering) == (False, False)
    assert _gauge(metrics) == 0
    assert watch.readiness() == (
        "resolver not answering: . DNSKEY timed out",
        "resolver does not validate DNSSEC (. DNSKEY answered without AD)",
    )
    assert _messages(caplog)[-1] == (
        "WARNING",
        COULD_NOT_CHECK + "last known not to validate: DANE stays off; retrying in 30s",
    )


async def test_run_retries_an_inconclusive_probe_sooner() -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 4:
            raise asyncio.CancelledError

    script = Script(SILENT, SILENT, GOOD)
    watch = ResolverWatch(script, ResolverStatus(), Metrics(), "127.0.0.1:53", 300.0, fake_sleep)
    with pytest.raises(asyncio.CancelledError):
        await watch.run()
    # sleep 300, SILENT, sleep 30, SILENT, sleep 30, GOOD, sleep 300: a probe nobody answers
    # is repeated after 30 s, and a shorter validation_interval caps that.
    assert slept == [300.0, 30.0, 30.0, 300.0]
    assert script.calls == 3
    short = ResolverWatch(Script(), ResolverStatus(), Metrics(), "127.0.0.1:53", 5.0)
    assert short.retry_interval == 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _starting(
    probe: Callable[[], Awaitable[ProbeResult]], clock: Clock, slept: list[float]
) -> ResolverWatch:
    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    return ResolverWatch(
        probe, ResolverStatus(), Metrics(), "127.0.0.1:53", 300.0, fake_sleep, clock=clock
    )


async def test_start_with_require_retries_a_silent_resolver_within_three_timeouts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "relay")
    clock, slept = Clock(), list[float]()
    script = Script(SILENT, SILENT, SILENT, GOOD)

    async def slow_probe() -> ProbeResult:
        clock.now += 4.0  # each probe takes 4 s of the 10 s timeout
        return await script()

    watch = _starting(slow_probe, clock, slept)
    result = await watch.start(required=True, patience=10.0)
    assert result == SILENT
    assert script.calls == 3
    # Probes start at 0, 10 and 20 s: the whole check ends within 3 × dns.timeout.
    assert slept == [6.0, 6.0]
    assert clock.now == 100.0 + 24.0
    # The caller reports the refusal: no "could not be checked" warning, no "DANE is off".
    assert [level for level, _ in _messages(caplog)] == ["INFO", "INFO"]


async def test_start_with_require_stops_retrying_once_the_resolver_answers() -> None:
    clock, slept = Clock(), list[float]()
    script = Script(SILENT, GOOD)
    watch = _starting(script, clock, slept)
    assert await watch.start(required=True, patience=10.0) == GOOD
    assert (script.calls, slept) == (2, [10.0])
    assert (watch.status.validating, watch.status.answering) == (True, True)


async def test_start_with_require_does_not_retry_a_conclusive_failure() -> None:
    clock, slept = Clock(), list[float]()
    script = Script(BAD)
    watch = _starting(script, clock, slept)
    assert await watch.start(required=True, patience=10.0) == BAD
    assert (script.calls, slept) == (1, [])


async def test_start_without_require_probes_once_and_starts_with_dane_on() -> None:
    clock, slept = Clock(), list[float]()
    script = Script(SILENT)
    watch = _starting(script, clock, slept)
    assert await watch.start(required=False, patience=10.0) == SILENT
    assert (script.calls, slept) == (1, [])
    assert (watch.status.validating, watch.status.answering) == (True, False)


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


# -- with the real resolver ------------------------------------------------------------------

DIGEST = "00" * 32


@pytest_asyncio.fixture
async def dns_server() -> AsyncIterator[ScriptedDns]:
    """A signed domain with a secure MX host and TLSA record; the probe is scripted per test."""
    async with ScriptedDns() as srv:
        srv.answer("example.test", "MX", "10 mx.example.test.")
        srv.answer("mx.example.test", "A", "192.0.2.25")
        srv.nodata("mx.example.test", "AAAA")
        srv.answer("_25._tcp.mx.example.test", "TLSA", f"3 1 1 {DIGEST}")
        yield srv
        assert srv.errors == []


async def _level_dane_action(resolver: DnsResolver, status: ResolverStatus) -> Action:
    """What route decides for example.test's MX host at level dane, as the engine reads it."""
    mx = await resolve_mx(resolver, "example.test", validating=status.validating)
    assert mx.answer is not None and mx.answer.security is Security.SECURE
    route = await resolve_host(
        resolver,
        mx.plan.hosts[0],
        next_hop="example.test",
        level="dane",
        mx_security=mx.answer.security,
        validating=status.validating,
    )
    return route.decision.action


@pytest.mark.parametrize("probe_reply", [Drop(), ServFail()], ids=["timeout", "servfail"])
async def test_a_probe_the_resolver_does_not_answer_keeps_dane_on(
    dns_server: ScriptedDns, probe_reply: Drop | ServFail
) -> None:
    dns_server.script(".", "DNSKEY", probe_reply)
    resolver = DnsResolver(DnsConfig(resolvers=(dns_server.endpoint,), timeout=0.3))
    watch = ResolverWatch(resolver.probe_validation, ResolverStatus(), Metrics(), "r", 300.0)
    result = await watch.check()
    assert (result.ok, result.conclusive) == (False, False)
    assert (watch.status.validating, watch.status.answering) == (True, False)
    # RFC 7672 §2.1: the secure TLSA RRset still makes DANE mandatory for the host.
    assert await _level_dane_action(resolver, watch.status) is Action.DANE


async def test_a_probe_answered_without_ad_turns_dane_off(dns_server: ScriptedDns) -> None:
    dns_server.answer(".", "DNSKEY", "257 3 13 " + "A" * 88, ad=False)
    resolver = DnsResolver(DnsConfig(resolvers=(dns_server.endpoint,), timeout=0.3))
    watch = ResolverWatch(resolver.probe_validation, ResolverStatus(), Metrics(), "r", 300.0)
    result = await watch.check()
    assert (result.ok, result.conclusive) == (False, True)
    assert (watch.status.validating, watch.status.answering) == (False, True)
    assert await _level_dane_action(resolver, watch.status) is Action.NO_DANE
