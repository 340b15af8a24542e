"""Smoke test of `bench/run` (issue 8): all three systems with N=50 and a small queue-depth run.

Runs the real command (its own lab, sink, relays and a private Postfix) and checks the shape
of its results table and that every message arrived, over TLS, with DANE verified where
DANE was asked for. No timing is asserted: the figures themselves are the benchmark's
business, not the test suite's.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
N = 50
QUEUE = 60
HEADER = (
    "system rounds msg/s cpu_ms/msg sub_p50_ms sub_p99_ms del_p50_ms del_p99_ms "
    "peak_rss_mib peak_pss_mib arrived dane_verified"
)


def test_bench_run_all_systems_small(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [str(ROOT / "bench" / "run"), "--messages", str(N), "--queue-depth", str(QUEUE)]
        + ["--json", str(out_json)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()

    header_at = next(i for i, line in enumerate(lines) if line.startswith("RESULTS "))
    assert lines[header_at] == (
        f"RESULTS (median of rounds; {N} messages of 10240 bytes, 8 client connections)"
    )
    assert " ".join(lines[header_at + 1].split()) == HEADER
    rows = {}
    for line in lines[header_at + 2 : header_at + 5]:
        cells = line.split()
        assert len(cells) == 12, line
        rows[cells[0]] = cells
    assert list(rows) == ["relay-dane", "relay-may", "postfix"]
    for name, cells in rows.items():
        assert cells[1] == "1", name  # rounds
        for number in cells[2:10]:
            assert float(number) > 0, (name, cells)
        assert cells[10] == f"{N}/{N}", name  # arrived
    # DANE really happened where it was asked for, and not at `may`.
    assert int(rows["relay-dane"][11]) >= 1
    assert int(rows["relay-may"][11]) == 0
    assert int(rows["postfix"][11]) >= 1

    ratios = [line for line in lines if line.startswith("RATIO throughput ")]
    assert [r.split(":")[0] for r in ratios] == [
        "RATIO throughput relay-dane/postfix",
        "RATIO throughput relay-may/postfix",
        "RATIO throughput relay-dane/relay-may",
    ]
    for r in ratios:
        assert re.fullmatch(r"RATIO throughput \S+: \d+\.\d\d", r), r
    queue_line = next(line for line in lines if line.startswith("QUEUE-DEPTH relay-dane: "))
    assert f"{QUEUE} queued in " in queue_line
    assert queue_line.endswith(f"arrived {QUEUE}/{QUEUE}")

    data = json.loads(out_json.read_text())
    assert [r["system"] for r in data["runs"]] == ["relay-dane", "relay-may", "postfix"]
    for run in data["runs"]:
        assert run["messages"] == N and run["arrived"] == N, run
        assert run["over_tls"] == N, run  # every message reached the sink over STARTTLS
    assert data["queue_depth"]["arrived"] == QUEUE
    assert data["sink_duplicates"] == 0
