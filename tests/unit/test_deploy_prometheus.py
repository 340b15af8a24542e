"""deploy/prometheus: the alert rules pass `promtool check rules`, their unit tests pass
`promtool test rules` (series fed in, each alert asserted to fire for the relay in
trouble and not for the others), and they name only metrics relay/metrics.py defines."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from deploykit import ROOT, defined_series_names, metric_names, promtool

PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "dane-relay-rules.yml"
RULE_TESTS = PROM / "dane-relay-rules.test.yml"
ALERTS = {
    "DaneRelayDaneFailuresRising",
    "DaneRelayQueueGrowing",
    "DaneRelayQueueAgeing",
    "DaneRelayResolverNotValidating",
    "DaneRelayDnsLookupsFailing",
    "DaneRelayNoDeliveries",
}


def _rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def test_promtool_check_rules() -> None:
    done = _run("check", "rules", RULES.name, cwd=PROM)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout


def test_promtool_test_rules() -> None:
    done = _run("test", "rules", RULE_TESTS.name, cwd=PROM)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_rule_tests_fail_when_a_rule_is_wrong(tmp_path: Path) -> None:
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    text = RULES.read_text()
    assert text.count("> 4 * 3600") == 1
    (tmp_path / RULES.name).write_text(text.replace("> 4 * 3600", "> 48 * 3600"))
    done = _run("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert done.returncode == 1
    assert "alertname: DaneRelayQueueAgeing" in done.stdout + done.stderr


def test_every_alert_is_asserted_to_fire() -> None:
    assert {r["alert"] for r in _rules()} == ALERTS
    fired: dict[str, set[str]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            for alert in case["exp_alerts"]:
                fired.setdefault(case["alertname"], set()).add(alert["exp_labels"]["instance"])
    assert set(fired) == ALERTS
    # r0 is the relay in trouble in every test; r3 too in the no-delivery one
    assert {name: sorted(i) for name, i in fired.items()} == {
        name: (["r0", "r3"] if name == "DaneRelayNoDeliveries" else ["r0"]) for name in ALERTS
    }


def test_rules_name_only_defined_metrics() -> None:
    defined = defined_series_names()
    used: set[str] = set()
    for rule in _rules():
        names = metric_names(str(rule["expr"]))
        assert names, rule["alert"]
        assert names <= defined, (rule["alert"], names - defined)
        used |= names
    assert used == {
        "dane_relay_dane_verifications_total",
        "dane_relay_queue_messages",
        "dane_relay_queue_oldest_message_age_seconds",
        "dane_relay_resolver_validating",
        "dane_relay_dns_lookups_total",
        "dane_relay_delivery_attempts_total",
    }


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (job, instance) (rate(dane_relay_dns_lookups_total{result=~"a|b"}[10m]))'
        " > 0.5 * histogram_quantile(0.9, sum by (le) (rate(x_seconds_bucket[$__rate_interval])))"
        " and on (job) relay_queue_messages offset 1h unless up == bool 1"
    )
    assert metric_names(expr) == {
        "dane_relay_dns_lookups_total",
        "x_seconds_bucket",
        "relay_queue_messages",
        "up",
    }
    assert "relay_queue_messages" not in defined_series_names()
    assert "dane_relay_queue_messages" in defined_series_names()
    assert "dane_relay_dns_lookup_seconds_bucket" in defined_series_names()


def test_the_relays_exposition_passes_promtool_check_metrics() -> None:
    """The names the rules and dashboard rely on follow Prometheus' conventions
    (promtool's linter: counters end in _total, units in base units, no reserved names)."""
    from prometheus_client import generate_latest

    from relay.metrics import Metrics

    metrics = Metrics()
    metrics.dns_lookup("MX", "secure", 0.01)
    metrics.delivery_result("delivered", "sent", "verified")
    metrics.dane_result("failed", "no-match")
    metrics.tls_session("outbound", "TLSv1.3", "TLS_AES_256_GCM_SHA384")
    metrics.dns_cache("hit")
    exposition = generate_latest(metrics.registry).decode()
    assert 'dane_relay_dane_verifications_total{reason="mismatch",result="failed"} 1.0' in (
        exposition
    )
    done = subprocess.run(
        [promtool(), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    # and the linter does speak up about a counter without _total
    done = subprocess.run(
        [promtool(), "check", "metrics"],
        input="# HELP x_seconds a\n# TYPE x_seconds counter\nx_seconds 1\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3
    assert 'counter metrics should have "_total" suffix' in done.stdout + done.stderr
