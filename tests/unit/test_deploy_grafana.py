"""deploy/grafana/dane-relay.json: a Grafana dashboard whose every PromQL expression
(panel targets and template variable queries) names only metrics relay/metrics.py
defines and is valid PromQL (promtool parses each one as a recording rule)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from deploykit import ROOT, defined_series_names, metric_names, promtool

DASHBOARD = ROOT / "deploy" / "grafana" / "dane-relay.json"


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _panels() -> list[dict[str, Any]]:
    out = []
    for panel in _dashboard()["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # collapsed rows keep theirs inside
    return out


def _panel_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels() for t in p.get("targets", [])]


def _variable_metrics() -> list[str]:
    names = []
    for var in _dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, query
        (name,) = metric_names(m.group(1))
        names.append(name)
    return names


def test_dashboard_shape() -> None:
    dash = _dashboard()
    assert dash["uid"] == "dane-relay"
    ids = [p["id"] for p in _panels()]
    assert len(ids) == len(set(ids))
    for p in _panels():
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"], p["title"]
    variables = [v["name"] for v in dash["templating"]["list"]]
    assert variables == ["datasource", "job", "instance"]


def test_every_expression_names_only_defined_metrics() -> None:
    defined = defined_series_names()
    exprs = _panel_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, (title, expr)
        assert names <= defined, (title, names - defined)
        # every selector is filtered by the job and instance variables
        assert expr.count('job=~"$job", instance=~"$instance"') == expr.count("dane_relay_"), expr
    assert set(_variable_metrics()) <= defined


def test_dashboard_covers_the_dane_dns_queue_and_delivery_metrics() -> None:
    used = set().union(*(metric_names(e) for _, e in _panel_exprs()))
    for name in (
        "dane_relay_dane_verifications_total",
        "dane_relay_tls_negotiated_total",
        "dane_relay_dns_lookups_total",
        "dane_relay_dns_lookup_seconds_bucket",
        "dane_relay_resolver_validating",
        "dane_relay_queue_messages",
        "dane_relay_queue_oldest_message_age_seconds",
        "dane_relay_delivery_attempts_total",
        "dane_relay_delivery_attempts_by_tls_total",
        "dane_relay_delivery_delay_seconds_bucket",
        "dane_relay_messages_received_total",
        "dane_relay_inbound_sessions_total",
        "dane_relay_inbound_rejections_total",
    ):
        assert name in used, name


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    exprs = [e for _, e in _panel_exprs()]
    rules = [
        {
            "record": f"dashboard:expr{i}",
            "expr": expr.replace("$__rate_interval", "5m")
            .replace("$job", ".*")
            .replace("$instance", ".*"),
        }
        for i, expr in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout
    # and promtool does reject a broken one
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "d", "rules": [{"record": "x:y", "expr": "sum("}]}]})
    )
    done = subprocess.run(
        [promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
