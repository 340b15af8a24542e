"""Helpers for the deploy/ tests: the metric names relay/metrics.py defines, the metric
names a PromQL expression uses, and promtool."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from relay.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]

# Functions, aggregations and keywords of PromQL that can stand where a metric name could.
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "start", "end"}
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)


def defined_series_names() -> set[str]:
    """Every series name the relay's registry can expose: counters as NAME_total (and
    NAME_created), histograms as NAME_bucket/_count/_sum, gauges as NAME."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}{s}" for s in ("_bucket", "_count", "_sum", "_created")}
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)  # by (label, ...)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\s*(\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def promtool() -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool is needed: apt-get install prometheus (scripts/test.sh does)"
    return tool
