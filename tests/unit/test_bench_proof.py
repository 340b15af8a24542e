"""bench/run's own checks: the proof of DANE per run and the argument bounds."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "bench" / "harness.py"


@pytest.fixture(scope="module")
def harness() -> Iterator[ModuleType]:
    """bench/harness.py as bench/run runs it: its directory first on sys.path."""
    sys.path.insert(0, str(HARNESS.parent))
    try:
        spec = importlib.util.spec_from_file_location("bench_harness", HARNESS)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_harness"] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(HARNESS.parent))
        sys.modules.pop("bench_harness", None)


def run(harness: ModuleType, system: str, **kw: object) -> object:
    base = harness.RunResult(
        system=system,
        round=1,
        messages=10,
        arrived=10,
        over_tls=10,
        dane_verified=0 if system == "relay-may" else 2,
        throughput=1.0,
        cpu_ms_per_msg=1.0,
        sub_p50_ms=1.0,
        sub_p99_ms=1.0,
        del_p50_ms=1.0,
        del_p99_ms=1.0,
        peak_rss_mib=1.0,
        peak_pss_mib=1.0,
    )
    return replace(base, **kw)


def test_a_run_that_holds_the_proof_has_no_failures(harness: ModuleType) -> None:
    runs = [run(harness, s) for s in ("relay-dane", "relay-may", "postfix")]
    assert harness.proof_failures(runs) == []


def test_each_broken_proof_is_named(harness: ModuleType) -> None:
    runs = [
        run(harness, "relay-dane", dane_verified=0),
        run(harness, "relay-may", dane_verified=3),
        run(harness, "postfix", over_tls=7),
    ]
    assert harness.proof_failures(runs) == [
        "round 1 relay-dane: no verified TLS session",
        "round 1 relay-may: 3 verified TLS session(s) at level may",
        "round 1 postfix: 3 message(s) arrived without TLS",
    ]


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["-n", "0"], "argument --messages/-n: expected an integer >= 1, got 0"),
        (["--clients", "0"], "argument --clients/-c: expected an integer >= 1, got 0"),
        (["--rounds", "0"], "argument --rounds/-r: expected an integer >= 1, got 0"),
        (["--queue-depth", "-1"], "argument --queue-depth: expected an integer >= 0, got -1"),
        (
            ["--systems", "relay-dane,relay-dane"],
            "a system is named twice: relay-dane,relay-dane (use --rounds to repeat)",
        ),
        (["--systems", "", "--queue-depth", "0"], "nothing to run"),
    ],
)
def test_bad_arguments_are_usage_errors(
    harness: ModuleType, argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        harness.main(argv)
    assert exit_info.value.code == 2
    assert error in capsys.readouterr().err
