"""Real DNS daemons for the lab: nsd (authoritative) and unbound (validating).

Owns: writing their configuration files (everything under one work directory, nothing
under /etc), starting them in the foreground as `ManagedProcess`es, and waiting until
they answer.

Guarantees:
- nsd serves every `LabZone` on `plan.auth`:53 with a single server process, no
  database, no remote control and no privilege dropping or chroot.
- unbound listens on `plan.resolver`:53, resolves only through root hints naming nsd,
  validates with the lab root's DS as its only trust anchor, and is ready (it answered a
  validated `. SOA` query with AD) when `start_unbound` returns.
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


def write_unbound_conf(workdir: Path, plan: AddressPlan, root_ds: DS) -> Path:
    hints = workdir / "root.hints"
    hints.write_text(f". 3600000 IN NS ns.test.\nns.test. 3600000 IN A {plan.auth}\n")
    anchor = workdir / "root.ds"
    anchor.write_text(f". IN DS {root_ds.to_text()}\n")
    conf = workdir / "unbound.conf"
    conf.write_text(
        "server:\n"
        f"    interface: {plan.resolver}\n"
        "    port: 53\n"
        "    do-ip4: yes\n"
        "    do-ip6: no\n"
        "    do-udp: yes\n"
        "    do-tcp: yes\n"
        "    num-threads: 1\n"
        '    username: ""\n'
        '    chroot: ""\n'
        f"    directory: {_q(workdir)}\n"
        f"    pidfile: {_q(workdir / 'unbound.pid')}\n"
        "    use-syslog: no\n"
        f"    logfile: {_q(workdir / 'unbound.log')}\n"
        "    verbosity: 1\n"
        "    log-servfail: yes\n"
        "    val-log-level: 2\n"
        "    access-control: 127.0.0.0/8 allow\n"
        "    do-not-query-localhost: no\n"
        f"    root-hints: {_q(hints)}\n"
        f"    trust-anchor-file: {_q(anchor)}\n"
        '    module-config: "validator iterator"\n'
        "    qname-minimisation: no\n"
        "    harden-dnssec-stripped: yes\n"
        # unbound serves "test." (RFC 6761) as a built-in NXDOMAIN local zone.
        '    local-zone: "test." nodefault\n'
        "    trust-anchor-signaling: no\n"
        "remote-control:\n"
        "    control-enable: no\n"
    )
    return conf


def start_unbound(workdir: Path, plan: AddressPlan, root_ds: DS) -> ManagedProcess:
    """Start unbound and wait until it answers `. SOA` validated (AD set).

    Raises:
        LabStartError: if unbound exits, does not answer in time, or cannot validate the
            lab root with the configured trust anchor.
    """
    conf = write_unbound_conf(workdir, plan, root_ds)
    proc = ManagedProcess(
        "unbound", ["unbound", "-d", "-c", str(conf)], workdir / "unbound.console"
    )
    proc.start()
    try:
        answer = _probe(proc, workdir / "unbound.log", plan.resolver, ".", "SOA")
        if answer.rcode() != dns.rcode.NOERROR or not answer.flags & dns.flags.AD:
            raise _failure(
                proc, workdir / "unbound.log", f"root SOA not validated (no AD):\n{answer}"
            )
    except BaseException:
        proc.stop()
        raise
    return proc
