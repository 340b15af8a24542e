"""docs/operations.md and deploy/README.md say what deploy/ really holds: the example
configuration loads, the alert table lists the alert rules, the links lead to files."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from deploykit import ROOT

from relay.config import load_config

OPERATIONS = ROOT / "docs" / "operations.md"
DEPLOY_README = ROOT / "deploy" / "README.md"


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    nxt = re.search(r"\n#{2,3} ", text[start + len(heading) + 2 :])
    return text[start : start + len(heading) + 2 + (nxt.start() if nxt else len(text))]


def test_outbound_smarthost_example_loads(tmp_path: Path) -> None:
    section = _section(OPERATIONS.read_text(), "### Outbound smarthost")
    (toml,) = re.findall(r"```toml\n(.*?)```", section, re.S)
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    config = load_config(path)
    assert config.tls.level == "dane"
    assert config.dns.require_validating_resolver is True
    assert str(config.spool.directory) == "/var/lib/dane-relay/spool"
    assert [str(n) for n in config.relay.networks] == ["10.1.0.0/24"]


def test_prometheus_scrape_example_is_yaml_with_the_rules_file() -> None:
    section = _section(OPERATIONS.read_text(), "### Prometheus-monitored service")
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    config = yaml.safe_load(block)
    assert config["scrape_configs"][0]["job_name"] == "dane-relay"
    assert config["rule_files"] == ["/etc/prometheus/rules/dane-relay-rules.yml"]


def test_alert_table_lists_every_alert_rule() -> None:
    section = _section(OPERATIONS.read_text(), "### Prometheus-monitored service")
    documented = re.findall(r"^\| `(DaneRelay\w+)` \|", section, re.M)
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "dane-relay-rules.yml").read_text())
    defined = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    assert documented == defined


def test_relative_links_lead_to_files() -> None:
    for doc in (OPERATIONS, DEPLOY_README):
        links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text())
        assert links, doc
        for link in links:
            assert (doc.parent / link).exists(), (doc.name, link)


def test_deploy_paths_named_in_the_docs_exist() -> None:
    text = OPERATIONS.read_text() + DEPLOY_README.read_text()
    paths = set(re.findall(r"`((?:deploy/|\.\./)[\w./-]+)`", text))
    assert "deploy/systemd/dane-relay.service" in paths
    for path in paths:
        rel = path.removeprefix("../")
        assert (ROOT / rel).exists() or (ROOT / "deploy" / rel).exists(), path
