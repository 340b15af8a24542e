"""Fixtures for integration tests against the real lab (see tests/lab).

- `dns_lab` (session): certificates, signed zones, nsd and a validating unbound, on
  127.R.0.0/16. Attributes: `resolver_addr`, `auth_addr`, `relay_addr`, `octet`,
  `scenarios` (domain -> Scenario), `hosts` (host name -> MxHost), `root_ds`, `ca`,
  `workdir`, `query(qname, rdtype)`.
- `receivers` (function): a `ReceiverPool`; nothing runs until the test calls
  `receivers.start(*domains_or_hosts)` (no names = every host) or
  `receivers.start_stall(domain_or_host)`. Everything is stopped after the test.
- `relay_factory` (function): `relay_factory(**config)` writes a relay config pointing
  at the lab and returns a started `RelayProcess`; every relay it made is stopped after
  the test. Relays that escaped (made directly with RelayProcess) are stopped at the end
  of the session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess, start_dns_lab, stop_all_relays
from lab.relayproc import write_relay_config

RELAY_SMTP_PORT = 2525
RELAY_METRICS_PORT = 9425


@pytest.fixture(scope="session")
def dns_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsLab]:
    with start_dns_lab(tmp_path_factory.mktemp("dns-lab")) as lab:
        yield lab


@pytest.fixture
def receivers(dns_lab: DnsLab, tmp_path: Path) -> Iterator[ReceiverPool]:
    certdir = tmp_path / "receiver-certs"
    certdir.mkdir()
    pool = ReceiverPool(dns_lab.scenarios, certdir)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session", autouse=True)
def _stop_leftover_relays() -> Iterator[None]:
    yield
    stop_all_relays()


@pytest.fixture
def relay_factory(dns_lab: DnsLab, tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    made: list[RelayProcess] = []

    def make(
        *,
        start: bool = True,
        smtp_port: int = RELAY_SMTP_PORT,
        metrics_port: int = RELAY_METRICS_PORT,
        name: str = "relay",
        **config: Any,
    ) -> RelayProcess:
        """Config defaults: the lab resolver, a spool in tmp_path, listen on relay_addr."""
        options: dict[str, Any] = {
            "listen": f"{dns_lab.relay_addr}:{smtp_port}",
            "spool_dir": tmp_path / f"{name}-spool",
            "resolvers": [dns_lab.resolver_addr],
            "metrics_listen": f"{dns_lab.relay_addr}:{metrics_port}",
        }
        options.update(config)
        conf = write_relay_config(tmp_path / f"{name}.toml", **options)
        relay = RelayProcess(conf, tmp_path / f"{name}.log")
        made.append(relay)
        return relay.start() if start else relay

    try:
        yield make
    finally:
        for relay in made:
            relay.stop()
