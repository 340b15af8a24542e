"""Command line: `dane-relay` run, lookup, probe, tlsa verify|generate, config check,
queue list|show|flush|hold|release|delete (relay.queuetool),
passwd FILE USER (AUTH credentials; exit 64 for a bad user or password, 78 for a malformed
file, 73 when it cannot be written).

Exit codes follow sysexits(3): 0 ok, 64 usage, 78 configuration error,
73 spool cannot be created or is locked, 71 a listen address cannot be bound,
69 the resolver does not validate DNSSEC and dns.require_validating_resolver is true.
`lookup` and `probe` exit 0 when mail would be attempted (for `probe`: an address took
STARTTLS, and DANE when it applies, as delivery demands), 75 when it would be deferred and
69 when it would bounce (relay.report, relay.probe); both exit 64 for a DOMAIN that has no
DNS name (relay.smtp.domain.ascii_domain: bad syntax, an address literal, bytes that are not
UTF-8), and `probe` for a bad `--port` or `--resolver`. Arguments are shown escaped, never
with raw control characters.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from relay import __version__, queuetool, tlsatool
from relay.config import Config, DnsConfig, load_config, parse_endpoint
from relay.errors import ConfigError, SpoolError

if TYPE_CHECKING:
    from relay.report import Outcome

__all__ = ["main"]

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69  # run: the resolver does not validate; lookup/probe: mail would bounce
EX_OSERR = 71
EX_CANTCREAT = 73
EX_TEMPFAIL = 75  # lookup/probe: mail would be deferred
EX_CONFIG = 78
DEFAULT_CONFIG = queuetool.DEFAULT_CONFIG
CONFIG_HELP = queuetool.CONFIG_HELP


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dane-relay", description="SMTP relay with DANE (RFC 7672)")
    p.add_argument("--version", action="version", version=f"dane-relay {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    tlsatool.add_parser(sub)
    run = sub.add_parser("run", help="run the relay in the foreground")
    run.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG, help=CONFIG_HELP)
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="text (key=value lines) or json (one object per line); default: log.format",
    )
    look = sub.add_parser(
        "lookup",
        help="show how mail to DOMAIN would be routed: MX, addresses, TLSA, TLS level",
    )
    look.add_argument("domain", help="the next-hop domain (or an address: its domain)")
    look.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG, help=CONFIG_HELP)
    look.add_argument("--json", action="store_true", help="print the report as JSON")
    probe = sub.add_parser(
        "probe",
        help="connect to DOMAIN's MX hosts as delivery would: STARTTLS, certificate chain, "
        "DANE verdict (never sends mail)",
    )
    probe.add_argument("domain", help="the next-hop domain (or an address: its domain)")
    probe.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG, help=CONFIG_HELP)
    probe.add_argument(
        "--resolver",
        metavar="ADDR[:PORT]",
        help="use this validating resolver instead of dns.resolvers (loopback unless "
        "dns.allow_remote_resolver)",
    )
    probe.add_argument(
        "--port",
        type=int,
        metavar="N",
        help="TCP port to connect to (default: delivery.port); TLSA names always use 25",
    )
    probe.add_argument("--json", action="store_true", help="print the result as JSON")
    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a configuration file and exit")
    check.add_argument("file", type=Path)
    pw = sub.add_parser(
        "passwd",
        help="add or replace USER in the AUTH credentials FILE (password read from stdin)",
    )
    pw.add_argument("file", type=Path, help="the credentials file (server.auth_file)")
    pw.add_argument("user", help="the user name clients give to AUTH")
    queuetool.add_queue_parser(sub)
    return p


def _load(path: Path) -> Config:
    return load_config(path)


class _StartupHup:
    """The SIGHUP handler from the start of `run` until relay.app.serve installs its own:
    SIGHUP's default action ends the process, and a supervisor may send one as soon as it
    has started the relay (config load, imports and the event loop take a moment). Each
    one is ignored with relay.app's WARNING, held until logging is set up."""

    def __init__(self) -> None:
        self.pending = 0
        self._warn: Callable[[], None] | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self._warn is None:
            self.pending += 1
        else:
            self._warn()

    def logging_ready(self, warn: Callable[[], None]) -> None:
        self._warn = warn
        for _ in range(self.pending):
            warn()
        self.pending = 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    hup = _StartupHup()
    if args.command == "run" and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, hup)  # first: before the config load and the imports
    if args.command == "tlsa":
        return tlsatool.run(args)
    if args.command == "passwd":
        return _passwd(args.file, args.user)
    try:
        if args.command == "config":
            cfg = _load(args.file)
            from relay.app import inbound_auth, inbound_tls
            from relay.inbound.gateway import load_gateway

            inbound_tls(cfg)  # the STARTTLS certificate and key load and match
            inbound_auth(cfg)  # the credentials file reads
            load_gateway(cfg)  # and gateway.recipients_file
            print(
                f"{args.file}: ok (listen={','.join(str(e) for e in cfg.server.listen)}, "
                f"tls level={cfg.tls.level})"
            )
            return EX_OK
        cfg = _load(args.config)
    except ConfigError as exc:
        print(f"dane-relay: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "queue":
        return queuetool.run_queue_command(args, cfg)
    if args.command == "lookup":
        return _lookup(cfg, args.domain, args.json)
    if args.command == "probe":
        return _probe(cfg, args)
    return _run(cfg, args.log_format, hup)


def _run(cfg: Config, log_format: str | None = None, hup: _StartupHup | None = None) -> int:
    from relay.app import STARTUP_SIGHUP_WARNING, ResolverNotValidating, serve
    from relay.logsetup import setup_logging

    setup_logging(cfg.log.level, log_format or cfg.log.format)
    if hup is not None:
        hup.logging_ready(partial(logging.getLogger("relay").warning, STARTUP_SIGHUP_WARNING))
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is optional
            asyncio.run(serve(cfg))
        else:
            uvloop.run(serve(cfg))
    except SpoolError as exc:
        print(f"dane-relay: {exc}", file=sys.stderr)
        return EX_CANTCREAT
    except ConfigError as exc:  # tls.ca_file or the STARTTLS files (read at start-up)
        print(f"dane-relay: {exc}", file=sys.stderr)
        return EX_CONFIG
    except ResolverNotValidating as exc:
        print(f"dane-relay: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except OSError as exc:
        print(f"dane-relay: cannot listen: {exc}", file=sys.stderr)
        return EX_OSERR
    except KeyboardInterrupt:  # pragma: no cover
        return EX_OK
    return EX_OK


def _read_password() -> str | None:
    """From a terminal: asked twice, without echo. Otherwise: the first line of stdin."""
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != first:
            print("dane-relay: passwd: the passwords differ", file=sys.stderr)
            return None
        return first
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def _passwd(path: Path, user: str) -> int:
    from relay.inbound.auth import CredentialsError, valid_user, write_entry

    if not valid_user(user):
        print(
            f"dane-relay: passwd: expected a user name without ':' or white space, got {user!r}",
            file=sys.stderr,
        )
        return EX_USAGE
    password = _read_password()
    if password is None:
        return EX_USAGE
    if not password:
        print("dane-relay: passwd: expected a password, got an empty one", file=sys.stderr)
        return EX_USAGE
    try:
        replaced = write_entry(path, user, password.encode("utf-8"))
    except CredentialsError as exc:
        print(f"dane-relay: passwd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except OSError as exc:
        print(f"dane-relay: passwd: {path}: {exc.strerror or exc}", file=sys.stderr)
        return EX_CANTCREAT
    print(f"{path}: {'replaced' if replaced else 'added'} {user}")
    return EX_OK


def _exit_status(outcome: Outcome) -> int:
    """`lookup` and `probe`: 0 mail would be attempted, 75 deferred, 69 bounced."""
    from relay.report import Outcome

    return {Outcome.ATTEMPT: EX_OK, Outcome.DEFER: EX_TEMPFAIL, Outcome.BOUNCE: EX_UNAVAILABLE}[
        outcome
    ]


def _lookup(cfg: Config, target: str, as_json: bool) -> int:
    from relay.app import describe_resolvers, system_hostname
    from relay.delivery.policymap import PolicyMap
    from relay.delivery.route import Myself
    from relay.lookup.resolver import DnsResolver
    from relay.report import lookup, render_json, render_text

    domain = _domain_argument("lookup", target)
    if domain is None:
        return EX_USAGE
    # The configured resolvers, asked afresh: no cache.
    resolver = DnsResolver(replace(cfg.dns, cache_size=0))
    report = asyncio.run(
        lookup(
            resolver,
            domain,
            level=cfg.tls.level,
            insecure_mx_policy=cfg.tls.insecure_mx_policy,
            resolvers=describe_resolvers(cfg.dns),
            # Delivery's own per-destination level and next hop, and its loop check.
            policy=PolicyMap.from_config(cfg.tls, cfg.delivery),
            myself=partial(Myself.of, cfg.server.hostname or system_hostname(), cfg.server.listen),
            host_limit=cfg.delivery.mx_host_limit,
        )
    )
    print(render_json(report) if as_json else render_text(report))
    return _exit_status(report.outcome)


def _probe(cfg: Config, args: argparse.Namespace) -> int:
    from relay.app import describe_resolvers, system_hostname
    from relay.delivery.policymap import PolicyMap
    from relay.delivery.route import Myself
    from relay.delivery.tls import client_context, pkix_context
    from relay.delivery.transport import SmtpTransport
    from relay.lookup.resolver import DnsResolver
    from relay.probe import probe, render_json, render_text

    domain = _domain_argument("probe", args.domain)
    if domain is None:
        return EX_USAGE
    # --port overrides the port connected to; else the destination's ([host]:port, delivery.port).
    port = args.port
    if port is not None and not 1 <= port <= 65535:
        print(f"dane-relay: probe: --port {port}: expected 1..65535", file=sys.stderr)
        return EX_USAGE
    dns = cfg.dns
    if args.resolver is not None:
        try:
            dns = _resolver_override(dns, args.resolver)
        except ValueError as exc:
            print(f"dane-relay: probe: {exc}", file=sys.stderr)
            return EX_USAGE
    # The resolvers asked afresh (no cache); the EHLO name and timeouts of delivery.
    dns = replace(dns, cache_size=0)
    try:
        pkix = pkix_context(cfg.tls.ca_file)  # levels verify/secure (Postfix smtp_tls_CAfile)
    except (OSError, ssl.SSLError) as exc:
        print(f"dane-relay: probe: {cfg.path}: tls.ca_file: cannot be read: {exc}", file=sys.stderr)
        return EX_CONFIG
    helo_name = cfg.server.hostname or system_hostname()
    transport = SmtpTransport(helo_name, cfg.delivery.connect_timeout, cfg.delivery.command_timeout)
    report = asyncio.run(
        probe(
            DnsResolver(dns),
            transport,
            client_context(),
            domain,
            level=cfg.tls.level,
            insecure_mx_policy=cfg.tls.insecure_mx_policy,
            helo_name=helo_name,
            port=port,
            resolvers=describe_resolvers(dns),
            pkix_context=pkix,
            policy=PolicyMap.from_config(cfg.tls, cfg.delivery),
            myself=partial(Myself.of, helo_name, cfg.server.listen),
            host_limit=cfg.delivery.mx_host_limit,
            address_limit=cfg.delivery.mx_address_limit,
            address_preference=cfg.delivery.address_preference,
        )
    )
    print(render_json(report) if args.json else render_text(report))
    return _exit_status(report.outcome)


def _domain_argument(command: str, target: str) -> str | None:
    """The ASCII next-hop domain of `target` (a domain, or an address: its domain), the
    same name delivery would look up; None, with the reason on stderr, when it has none.
    """
    from relay.model import domain_of
    from relay.smtp.address import escaped
    from relay.smtp.domain import DomainSyntaxError, ascii_domain

    try:
        # RFC 5321 §2.3.5, RFC 5890/5891: the name delivery would look up (IDNA 2008).
        return ascii_domain(domain_of(target))
    except DomainSyntaxError as exc:
        # argv bytes that are not UTF-8 arrive as lone surrogates: shown escaped, like ESC.
        shown = escaped(target)
        print(f"dane-relay: {command}: not a mail domain: '{shown}': {exc}", file=sys.stderr)
        return None


def _resolver_override(dns: DnsConfig, text: str) -> DnsConfig:
    """`[dns]` with `probe --resolver ADDR[:PORT]` as its only resolver.

    Raises:
        ValueError: not an IP address with an optional port, or not a loopback address
            while `dns.allow_remote_resolver` is false.
    """
    try:
        endpoint = parse_endpoint(text, 53)
    except ValueError as exc:
        raise ValueError(f"--resolver {text!r}: expected {exc}") from exc
    # RFC 7672 §2.1: the AD bit is trusted only from a resolver on this host, as for
    # dns.resolvers in the configuration (relay.config).
    if not dns.allow_remote_resolver and not ipaddress.ip_address(endpoint.host).is_loopback:
        raise ValueError(
            f"--resolver {text!r}: expected a loopback address (a validating resolver on "
            "this host), or dns.allow_remote_resolver = true in the configuration"
        )
    return replace(dns, resolvers=(endpoint,))
