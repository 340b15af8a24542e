"""Real DNS daemons for the lab: nsd (authoritative) and unbound (validating).

Owns: writing their configuration files (everything under one work directory, nothing
under /etc), starting them in the foreground as `ManagedProcess`es, and waiting until
they answer.

Guarantees:
- nsd serves every `LabZone` on `plan.auth`:53 with a single server process, no
  database, no remote control and no privilege dropping or chroot.
- unbound listens on `plan.resolver`:53, resolves only through root hints naming nsd,
  validates with the lab root's DS as its only trust anchor, adds RFC 8914 Extended DNS
  Errors to its SERVFAILs (`ede: yes`), and is ready (it answered a validated `. SOA`
  query with AD) when `start_unbound` returns. `start_unbound(..., root_ds=None,
  address=..., name=...)` starts a second, non-validating one (iterator only, never AD)
  for the tests of the relay's resolver trust.
- Failure to start raises `LabStartError` with the daemon's own log tail.

Quirks handled here (both daemons' Debian defaults assume a system install):
- `username: ""` and `chroot: ""` keep them from dropping privileges or chrooting into
  /etc; `database: ""` keeps nsd from writing a zone database.
- unbound refuses to query 127.0.0.0/8 unless `do-not-query-localhost: no`.
- unbound answers NXDOMAIN for everything under "test." from a built-in local zone
  (RFC 6761 special-use names) unless told `local-zone: "test." nodefault`.
- With `logfile:` set, both daemons log to that file rather than to stderr; error reports
  include it as well as their console output.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
from dns.rdtypes.ANY.DS import DS

from .network import AddressPlan
from .procs import ManagedProcess, log_tail
from .waiting import LabTimeout, poll_until
from .zones import LabZone

__all__ = ["LabStartError", "start_nsd", "start_unbound"]

_START_TIMEOUT = 10.0
_PROBE_TIMEOUT = 0.2


class LabStartError(RuntimeError):
    """A lab daemon failed to start or to answer as configured."""


def _q(path: Path) -> str:
    return f'"{path}"'


def _failure(proc: ManagedProcess, daemon_log: Path, problem: str) -> LabStartError:
    return LabStartError(
        f"{proc.name}: {problem}\n"
        f"--- console ({proc.log_path}) ---\n{proc.log_tail()}\n"
        f"--- log ({daemon_log}) ---\n{log_tail(daemon_log)}"
    )


def _probe(
    proc: ManagedProcess, daemon_log: Path, addr: str, qname: str, rdtype: str
) -> dns.message.Message:
    """Query `addr` until it answers; fail early if the daemon exits."""
    query = dns.message.make_query(qname, rdtype, want_dnssec=True)

    def answered() -> dns.message.Message | None:
        if not proc.alive():
            raise _failure(proc, daemon_log, f"exited with status {proc.returncode}")
        try:
            return dns.query.udp(query, addr, port=53, timeout=_PROBE_TIMEOUT)
        except (dns.exception.Timeout, OSError):
            return None

    try:
        return poll_until(answered, timeout=_START_TIMEOUT, what=f"{proc.name} on {addr}:53")
    except LabTimeout as exc:
        raise _failure(proc, daemon_log, str(exc)) from exc


def write_nsd_conf(
    workdir: Path, plan: AddressPlan, zone_files: Sequence[tuple[str, Path]]
) -> Path:
    xfrdir = workdir / "nsd-xfr"
    xfrdir.mkdir(exist_ok=True)
    zones = "".join(
        f'zone:\n    name: "{origin}"\n    zonefile: {_q(path)}\n' for origin, path in zone_files
    )
    conf = workdir / "nsd.conf"
    conf.write_text(
        "server:\n"
        f"    ip-address: {plan.auth}\n"
        "    port: 53\n"
        "    do-ip4: yes\n"
        "    do-ip6: no\n"
        "    server-count: 1\n"
        '    username: ""\n'
        '    chroot: ""\n'
        '    database: ""\n'
        f"    zonesdir: {_q(workdir)}\n"
        f"    pidfile: {_q(workdir / 'nsd.pid')}\n"
        f"    logfile: {_q(workdir / 'nsd.log')}\n"
        f"    zonelistfile: {_q(workdir / 'nsd.zonelist')}\n"
        f"    xfrdfile: {_q(workdir / 'nsd.xfrd.state')}\n"
        f"    xfrdir: {_q(xfrdir)}\n"
        "    verbosity: 2\n"
        "    hide-version: yes\n"
        "remote-control:\n"
        "    control-enable: no\n" + zones
    )
    return conf


def start_nsd(workdir: Path, plan: AddressPlan, zones: Sequence[LabZone]) -> ManagedProcess:
    """Write the zones and nsd.conf, start nsd, and wait until it serves the root SOA.

    Raises:
        LabStartError: if nsd exits or does not answer authoritatively in time.
    """
    zonedir = workdir / "zones"
    zonedir.mkdir(exist_ok=True)
    zone_files = [(z.origin, z.write(zonedir)) for z in zones]
    conf = write_nsd_conf(workdir, plan, zone_files)
    proc = ManagedProcess("nsd", ["nsd", "-d", "-c", str(conf)], workdir / "nsd.console")
    proc.start()
    try:
        answer = _probe(proc, workdir / "nsd.log", plan.auth, ".", "SOA")
        if answer.rcode() != dns.rcode.NOERROR or not answer.flags & dns.flags.AA:
            raise _failure(proc, workdir / "nsd.log", f"bad root SOA answer:\n{answer}")
    except BaseException:
        proc.stop()
        raise
    return proc


def write_unbound_conf(
    workdir: Path,
    plan: AddressPlan,
    root_ds: DS | None,
    *,
    address: str | None = None,
    name: str = "unbound",
) -> Path:
    """unbound.conf for `name`, listening on `address` (default: the lab resolver).

    With `root_ds` the resolver validates with that DS as its only trust anchor; with
    None it only iterates (`module-config: "iterator"`): it answers everything and never
    sets AD, like a resolver someone forgot to make validating.
    """
    hints = workdir / "root.hints"
    hints.write_text(f". 3600000 IN NS ns.test.\nns.test. 3600000 IN A {plan.auth}\n")
    if root_ds is not None:
        anchor = workdir / f"{name}.root.ds"
        anchor.write_text(f". IN DS {root_ds.to_text()}\n")
        validation = (
            f"    trust-anchor-file: {_q(anchor)}\n"
            '    module-config: "validator iterator"\n'
            "    harden-dnssec-stripped: yes\n"
        )
    else:
        validation = '    module-config: "iterator"\n'
    conf = workdir / f"{name}.conf"
    conf.write_text(
        "server:\n"
        f"    interface: {address or plan.resolver}\n"
        "    port: 53\n"
        "    do-ip4: yes\n"
        "    do-ip6: no\n"
        "    do-udp: yes\n"
        "    do-tcp: yes\n"
        "    num-threads: 1\n"
        '    username: ""\n'
        '    chroot: ""\n'
        f"    directory: {_q(workdir)}\n"
        f"    pidfile: {_q(workdir / f'{name}.pid')}\n"
        "    use-syslog: no\n"
        f"    logfile: {_q(workdir / f'{name}.log')}\n"
        "    verbosity: 1\n"
        "    log-servfail: yes\n"
        "    val-log-level: 2\n"
        # RFC 8914 Extended DNS Errors on SERVFAIL: the relay tells bogus from other failures.
        "    ede: yes\n"
        "    access-control: 127.0.0.0/8 allow\n"
        "    do-not-query-localhost: no\n"
        f"    root-hints: {_q(hints)}\n"
        f"{validation}"
        "    qname-minimisation: no\n"
        # unbound serves "test." (RFC 6761) as a built-in NXDOMAIN local zone.
        '    local-zone: "test." nodefault\n'
        "    trust-anchor-signaling: no\n"
        "remote-control:\n"
        "    control-enable: no\n"
    )
    return conf


def start_unbound(
    workdir: Path,
    plan: AddressPlan,
    root_ds: DS | None,
    *,
    address: str | None = None,
    name: str = "unbound",
) -> ManagedProcess:
    """Start unbound on `address` (default: the lab resolver) and wait until it answers.

    With `root_ds` it must answer `. SOA` validated (AD set); with None (an iterating,
    non-validating resolver, see `write_unbound_conf`) it must answer without AD.

    Raises:
        LabStartError: if unbound exits, does not answer in time, or does not validate
            (or, when it must not, does validate) the lab root.
    """
    addr = address or plan.resolver
    conf = write_unbound_conf(workdir, plan, root_ds, address=addr, name=name)
    daemon_log = workdir / f"{name}.log"
    proc = ManagedProcess(name, ["unbound", "-d", "-c", str(conf)], workdir / f"{name}.console")
    proc.start()
    try:
        answer = _probe(proc, daemon_log, addr, ".", "SOA")
        validated = bool(answer.flags & dns.flags.AD)
        if answer.rcode() != dns.rcode.NOERROR or validated != (root_ds is not None):
            want = "validated (AD)" if root_ds is not None else "answered without AD"
            raise _failure(proc, daemon_log, f"root SOA not {want}:\n{answer}")
    except BaseException:
        proc.stop()
        raise
    return proc
