"""Review 7, SIGHUP on a real relay process: one sent while the relay is still reading
its configuration (before the event loop exists) is ignored with a WARNING instead of
ending the process (exit 129), and a reload whose configuration path has become a FIFO
is refused without stopping the event loop that serves SMTP.
"""

from __future__ import annotations

import os
import signal
import smtplib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from lab import DnsLab, RelayProcess
from lab.relayproc import write_relay_config
from lab.waiting import poll_until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(90)]

RelayFactory = Callable[..., RelayProcess]


def _fifo_writer(fifo: Path) -> int | None:
    """A write descriptor for `fifo` once a reader has it open, else None (ENXIO)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


def _ehlo(relay: RelayProcess) -> int:
    host, port = relay.smtp_addr
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=10) as smtp:
        return smtp.ehlo()[0]


def test_sighup_while_the_config_is_read_at_start_up_is_ignored(
    dns_lab: DnsLab, tmp_path: Path
) -> None:
    config = write_relay_config(
        tmp_path / "relay.toml",
        listen=f"{dns_lab.relay_addr}:2525",
        spool_dir=tmp_path / "spool",
        resolvers=[dns_lab.resolver_addr],
        metrics_listen=f"{dns_lab.relay_addr}:9425",
        log_level="info",
    )
    # The configuration comes through a FIFO (as with `-c <(envsubst < relay.toml.in)`):
    # the relay is held in its config load, before any import of relay.app, until the
    # test writes it, so the SIGHUP below lands in that window every time.
    fifo = tmp_path / "relay-fifo.toml"
    os.mkfifo(fifo)
    argv = [sys.executable, "-m", "relay", "run", "-c", str(fifo)]
    relay = RelayProcess(config, tmp_path / "relay.log", argv=argv)
    relay.start(wait_ready=False)
    try:
        fd = poll_until(lambda: _fifo_writer(fifo), timeout=20, what="the relay to open the FIFO")
        relay.kill(signal.SIGHUP)
        try:
            os.write(fd, config.read_bytes())
        finally:
            os.close(fd)
        relay.wait_log(r"WARNING relay: SIGHUP during start-up ignored; send it again")
        relay.wait_log(r"started hostname=\S+ listen=", timeout=20)
        assert relay.alive(), relay.log_tail()
        assert _ehlo(relay) == 250
    finally:
        assert relay.stop() == 0


def test_reload_refuses_a_fifo_and_smtp_goes_on(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    relay = relay_factory(log_level="info")
    config = relay.config_path
    saved = tmp_path / "saved.toml"
    config.rename(saved)
    os.mkfifo(config)  # a reload that opened this on the event loop would wait for ever
    relay.kill(signal.SIGHUP)
    line = relay.wait_log(r"ERROR relay: SIGHUP: new configuration refused.*").group(0)
    assert line.endswith(f"{config}: expected a regular file, got a FIFO")
    assert _ehlo(relay) == 250

    config.unlink()
    saved.rename(config)
    relay.kill(signal.SIGHUP)
    relay.wait_log(r"reloaded config=\S+ applied=-")
    assert _ehlo(relay) == 250
