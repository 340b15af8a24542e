"""Issue 7 health: /readyz on the real relay fails (503, with the reason) while the spool
cannot be written, and recovers when it can; /healthz stays 200 throughout. (The resolver
side, "resolver not answering" and "does not validate", is in test_resolver_trust.py.)
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from lab import RelayProcess

pytestmark = [pytest.mark.lab, pytest.mark.timeout(60)]

RelayFactory = Callable[..., RelayProcess]


def _http(relay: RelayProcess, path: str) -> tuple[int, str]:
    host, port = relay.metrics_addr
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_readyz_fails_while_the_spool_is_not_writable(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    relay = relay_factory()
    relay.wait_log(r"resolver=\S+ validates DNSSEC")
    tmp = tmp_path / "relay-spool" / "tmp"
    assert tmp.is_dir()
    assert _http(relay, "/readyz") == (200, "ok\n")
    assert list(tmp.iterdir()) == []  # the probe file is removed again

    # The directory every commit starts in is gone, a plain file in its place (the test
    # runs as root, for whom permission bits do not stop a write).
    tmp.rename(tmp_path / "saved-tmp")
    tmp.write_text("not a directory\n")
    assert _http(relay, "/readyz") == (
        503,
        f"degraded: spool not writable: {tmp}: Not a directory\n",
    )
    assert _http(relay, "/healthz") == (200, "ok\n")
    assert relay.alive()

    tmp.unlink()
    (tmp_path / "saved-tmp").rename(tmp)
    assert _http(relay, "/readyz") == (200, "ok\n")
