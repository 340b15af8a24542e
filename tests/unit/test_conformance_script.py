"""bench/conformance: the real tool over the external DANE vectors, and its failure reports.

The vectors are read in place (``$DANE_VECTORS`` or ``../shared`` beside the repository,
as in ``test_dane_vectors.py``); a missing file fails these tests, it never skips them.
The doctored cases write a few vectors with altered expectations to ``tmp_path`` only.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "bench" / "conformance"
DEFAULT_PATH = REPO_ROOT.parent / "shared" / "conformance" / "dane-vectors" / "vectors.json"
VECTORS_PATH = Path(os.environ.get("DANE_VECTORS", DEFAULT_PATH))


def conformance(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, argv)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def real_vectors() -> list[dict[str, Any]]:
    with VECTORS_PATH.open(encoding="utf-8") as handle:
        vectors: list[dict[str, Any]] = json.load(handle)
    return vectors


def test_all_external_vectors_pass() -> None:
    done = conformance(VECTORS_PATH)
    assert done.stdout == "66 passed, 0 failed\n", done.stdout + done.stderr
    assert done.returncode == 0


def test_script_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)


def test_failures_are_reported_one_line_each(tmp_path: Path) -> None:
    by_id = {vector["id"]: vector for vector in real_vectors()}
    ee = by_id["openssl-danetest-01"]  # verified, depth 0
    assert ee["expected_smtp"]["status"] == "verified"
    wrong_status = copy.deepcopy(ee) | {"id": "doctored-status"}
    wrong_status["expected_smtp"] = {"status": "failed", "match_depth": None}
    wrong_depth = copy.deepcopy(ee) | {"id": "doctored-depth"}
    wrong_depth["expected_smtp"] = {"status": "verified", "match_depth": 5}
    path = tmp_path / "vectors.json"
    path.write_text(json.dumps([ee, wrong_status, wrong_depth]))

    done = conformance(path, "--verbose")

    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0] == "ok   openssl-danetest-01"
    assert lines[1].startswith(
        "FAIL doctored-status: expected failed, got verified depth 0 (match:"
    )
    assert lines[2].startswith(
        "FAIL doctored-depth: expected verified depth 5, got verified depth 0"
    )
    assert lines[3:] == ["1 passed, 2 failed"]


def test_a_vector_the_tool_cannot_run_is_a_failure(tmp_path: Path) -> None:
    broken = copy.deepcopy(real_vectors()[0]) | {"id": "doctored-time"}
    broken["validation_time"] = "not a time"
    path = tmp_path / "vectors.json"
    path.write_text(json.dumps([broken]))
    done = conformance(path)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "FAIL doctored-time: exit 64, no verdict: dane-relay tlsa verify: --at 'not a time': "
        "expected an ISO 8601 time such as 2025-06-01T12:00:00Z",
        "0 passed, 1 failed",
    ]


def test_missing_vectors_file(tmp_path: Path) -> None:
    done = conformance(tmp_path / "absent.json")
    assert (done.returncode, done.stdout) == (66, "")
    assert f"{tmp_path / 'absent.json'}: no such file" in done.stderr


def test_malformed_vectors_file(tmp_path: Path) -> None:
    for text in ("{", "{}", "[]", '[{"id": "x"}]'):
        path = tmp_path / "vectors.json"
        path.write_text(text)
        done = conformance(path)
        assert (done.returncode, done.stdout) == (65, ""), text
