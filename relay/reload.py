"""SIGHUP: read the configuration file again and apply what can change while running.

Contract (`Reloader.request`, the SIGHUP handler, runs `Reloader.reload` as a task; a
SIGHUP during a reload makes one more reload after it):

- The file named at start-up is loaded and validated as at start-up (`load_config`), and
  the [tls] trust store (`tls.ca_file`) is read, all on a worker thread (asyncio.to_thread),
  so no read ever stops the event loop; the file must be a regular file of at most
  `CONFIG_SIZE_LIMIT` bytes (a FIFO would wait for a writer). Any error refuses the whole new
  configuration: one ERROR line names the file, the key, what was expected and what was
  found (`FILE: key: expected …, got …`), and everything keeps running as before.
- Applied at once, to what starts after the reload (a session or delivery under way
  finishes under the settings it started with; no connection is closed):
  [relay] (networks: the next RCPT), [tls] (level, policy map, insecure_mx_policy, the
  CA file, read again even when unchanged), [delivery] except the keys in
  `RESTART_KEYS`, [gateway] and `log.level`. The STARTTLS certificate and key files are
  read again (relay.inbound.tls.TlsContextHolder.reload: a broken pair is refused and
  logged, the old one stays), as at every SIGHUP.
- [gateway] is applied whole and at once: `load_gateway` builds the new acceptance
  (domains, recipients, recipients_file, read now: a bad file refuses the whole new
  configuration) before anything changes, and `_apply` then swaps the handler's
  `Gateway` and the engine's routes (the transport and policy entries `load_config`
  derives from domains, next_hop and tls_level) with no await in between, so no RCPT or
  delivery ever sees the new acceptance with the old routes or the reverse. Mail queued
  before the reload is routed by the new configuration when it is next tried.
- Everything else needs a restart: the sections [server], [spool], [dns], [metrics],
  `log.format` and the [delivery] keys in `RESTART_KEYS`. When one of them changed, one
  WARNING line names them; the running values stay.
- One INFO line says which keys were applied (`reloaded config=… applied=…`).

Does not: rebind listeners, reopen the spool, or rebuild the resolver.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from relay.config import Config, load_config
from relay.delivery.engine import DeliveryEngine, EngineSettings
from relay.delivery.transport import SmtpTransport
from relay.errors import ConfigError
from relay.files import file_kind
from relay.inbound.gateway import Gateway, load_gateway
from relay.inbound.handler import RelayHandler
from relay.inbound.tls import TlsContextHolder
from relay.logsetup import set_level
from relay.spool.runner import QueueRunner

__all__ = ["CONFIG_SIZE_LIMIT", "LIVE_SECTIONS", "RESTART_KEYS", "Reloader", "changed_keys"]

log = logging.getLogger("relay")

#: Sections whose keys take effect on SIGHUP (apart from RESTART_KEYS).
LIVE_SECTIONS = ("relay", "tls", "delivery", "gateway", "log")
#: Keys of the live sections that are read only at start-up.
RESTART_KEYS = frozenset(
    {
        "delivery.concurrency",  # the runner's worker slots
        "delivery.destination_concurrency",  # slots held by running deliveries
        "delivery.connection_cache_time",  # the cache of open connections
        "delivery.connection_reuse_time",
        "delivery.connection_reuse_limit",
        "log.format",  # the handler of every log line
    }
)


#: The largest configuration file a reload reads, in bytes.
CONFIG_SIZE_LIMIT = 1 << 20


def _check_file(path: Path) -> None:
    """Refuse what would block or swamp the reading thread: anything but a regular file
    (a FIFO waits for a writer, a device may never end) and a file over CONFIG_SIZE_LIMIT.

    Raises:
        ConfigError: naming the file, what was expected and what was found.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: expected a regular file, got {file_kind(info.st_mode)}")
    if info.st_size > CONFIG_SIZE_LIMIT:
        raise ConfigError(f"{path}: expected at most {CONFIG_SIZE_LIMIT} bytes, got {info.st_size}")


def changed_keys(old: Config, new: Config) -> Iterator[str]:
    """`section.key` for every key whose value differs, in file order."""
    for section in fields(Config):
        if section.name == "path":
            continue
        before, after = getattr(old, section.name), getattr(new, section.name)
        if not (is_dataclass(before) and is_dataclass(after)):
            if before != after:
                yield section.name
            continue
        for key in fields(before):
            if getattr(before, key.name) != getattr(after, key.name):
                yield f"{section.name}.{key.name}"


def _merged(old: Config, new: Config) -> Config:
    """`new` with the running values of everything that needs a restart."""
    kept: dict[str, Any] = {
        f.name: getattr(old, f.name)
        for f in fields(Config)
        if f.name not in LIVE_SECTIONS and f.name != "path"
    }
    sections: dict[str, Any] = {}
    for name in LIVE_SECTIONS:
        frozen = {
            key.split(".", 1)[1]: getattr(getattr(old, name), key.split(".", 1)[1])
            for key in RESTART_KEYS
            if key.startswith(name + ".")
        }
        sections[name] = replace(getattr(new, name), **frozen)
    return replace(new, **kept, **sections)


@dataclass
class Reloader:
    """What SIGHUP reconfigures; `cfg` is the configuration in force."""

    cfg: Config
    hostname: str
    settings: Callable[[Config], EngineSettings]  # relay.app.engine_settings
    pkix: Callable[[Config], ssl.SSLContext]  # the tls.ca_file trust store; ConfigError
    handler: RelayHandler
    engine: DeliveryEngine
    runner: QueueRunner
    tls: TlsContextHolder | None = None

    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _again: bool = field(default=False, init=False, repr=False)

    def request(self) -> None:
        """The SIGHUP handler: start a reload, or, while one runs, one more after it (a
        file edited again during a reload is read again; further signals meanwhile add
        nothing)."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._reloads(), name="reload")

    async def _reloads(self) -> None:
        while True:
            self._again = False
            try:
                await self.reload()
            except Exception:
                log.exception("SIGHUP: reload failed, the running configuration stays")
            if not self._again:
                return

    async def reload(self) -> bool:
        """Reload; True when the new configuration was taken (even if only in part).

        The files (configuration, CA file, recipients file, STARTTLS pair) are read on a
        worker thread, so a slow or stuck read never stops the event loop; the new
        settings are then applied on the loop, with no await in between.
        """
        path = self.cfg.path
        log.info("SIGHUP: reloading config=%s", path)
        try:
            new, pkix, gateway = await asyncio.to_thread(self._read, path)
        except ConfigError as exc:
            log.error("SIGHUP: new configuration refused, the running one stays: %s", exc)
            return False
        changed = list(changed_keys(self.cfg, new))
        restart = [
            k for k in changed if k.split(".", 1)[0] not in LIVE_SECTIONS or k in RESTART_KEYS
        ]
        if restart:
            log.warning(
                "SIGHUP: config=%s changed keys that need a restart, not applied: %s",
                path,
                ",".join(restart),
            )
        merged = _merged(self.cfg, new)
        self._apply(merged, pkix, gateway)
        self.cfg = merged
        applied = [k for k in changed if k not in restart]
        # RFC 7672 §2.2: a cached session's DANE/PKIX verdict was reached under the old
        # settings and files (insecure_mx_policy, ca_file, levels): none is reused.
        dropped = self.engine.cache.drop()
        log.info(
            "reloaded config=%s applied=%s tls_level=%s cached_connections_closed=%d",
            path,
            ",".join(applied) or "-",
            merged.tls.level,
            dropped,
        )
        return True

    def _read(self, path: Path) -> tuple[Config, ssl.SSLContext, Gateway | None]:
        """On a worker thread: every file a reload reads.

        Raises:
            ConfigError: a file cannot be read or is refused (named).
        """
        if self.tls is not None:
            self.tls.reload()  # the certificate files, re-read whatever the config says
        _check_file(path)
        new = load_config(path)
        return new, self.pkix(new), load_gateway(new)  # gateway.recipients_file, read now

    def _apply(self, cfg: Config, pkix: ssl.SSLContext, gateway: Gateway | None) -> None:
        # No await in here: the event loop runs no RCPT and no delivery step until every
        # assignment below is done, so the gateway and the routes change together.
        settings = self.settings(cfg)
        engine = self.engine
        # The next delivery reads these; one running keeps the objects it already holds.
        engine.settings = settings
        engine.routes = settings.policy or engine.routes
        engine.pkix_context = pkix
        engine.transport = SmtpTransport(
            self.hostname,
            cfg.delivery.connect_timeout,
            cfg.delivery.command_timeout,
            settings.timeouts,
        )
        self.runner.cfg = cfg.delivery
        self.runner.load([])  # wakes the queue: retry times follow the new backoffs
        self.handler.relay_cfg = cfg.relay  # the next RCPT
        self.handler.gateway = gateway  # the next RCPT; its routes are engine.routes above
        set_level(cfg.log.level)
