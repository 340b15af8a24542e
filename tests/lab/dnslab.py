"""The session's DNS lab: certificates -> signed zones -> nsd -> unbound.

Owns: `DnsLab` (what tests see) and `start_dns_lab()`, the context manager that builds
and tears down the whole DNS side of the lab.

Guarantees: on exit from `start_dns_lab` (normal or by exception) unbound and nsd are
stopped by pid and the address claim is released. Every file lives under `workdir`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
from dns.rdtypes.ANY.DS import DS

from .certs import CA, make_ca
from .dnsservers import start_nsd, start_unbound
from .network import AddressPlan, claim_address_plan
from .procs import ManagedProcess
from .scenarios import SCENARIOS, MxHost, Scenario, ScenarioSpec, build_scenarios
from .zones import LabZone, build_zones

__all__ = ["DnsLab", "start_dns_lab"]


@dataclass(frozen=True)
class DnsLab:
    plan: AddressPlan
    workdir: Path
    ca: CA
    scenarios: dict[str, Scenario]
    zones: tuple[LabZone, ...]
    nsd: ManagedProcess
    unbound: ManagedProcess

    @property
    def octet(self) -> int:
        return self.plan.octet

    @property
    def auth_addr(self) -> str:
        return self.plan.auth

    @property
    def resolver_addr(self) -> str:
        return self.plan.resolver

    @property
    def relay_addr(self) -> str:
        """Where the relay under test should listen (SMTP and metrics ports)."""
        return self.plan.relay

    @property
    def root_ds(self) -> DS:
        ds = self.zones[-1].ds
        assert ds is not None
        return ds

    @property
    def hosts(self) -> dict[str, MxHost]:
        """Every receiver host in the lab, keyed by host name."""
        return {h.name: h for s in self.scenarios.values() for h in s.hosts}

    def query(self, qname: str, rdtype: str, *, timeout: float = 5.0) -> dns.message.Message:
        """Ask the lab's validating resolver over UDP with the DO bit set."""
        q = dns.message.make_query(qname, rdtype, want_dnssec=True)
        return dns.query.udp(q, self.resolver_addr, port=53, timeout=timeout)

    def start_resolver(self, spare: int, *, validating: bool) -> ManagedProcess:
        """Start another unbound on `plan.spare(spare)`:53, resolving the lab's tree.

        `validating=False` gives a resolver that never sets AD (iterator only, no trust
        anchor). The caller stops it (`ManagedProcess.stop`, in a fixture's finally); like
        every lab daemon it dies with the pytest process anyway (procs: pdeathsig).

        Raises:
            LabStartError: if it does not come up as asked.
        """
        kind = "validating" if validating else "plain"
        return start_unbound(
            self.workdir,
            self.plan,
            self.root_ds if validating else None,
            address=self.plan.spare(spare),
            name=f"unbound-{kind}-{spare}",
        )


@contextlib.contextmanager
def start_dns_lab(workdir: Path, specs: list[ScenarioSpec] | None = None) -> Iterator[DnsLab]:
    """Build and start the DNS lab in `workdir`; stop it on exit.

    Raises:
        LabStartError: if nsd or unbound does not come up (with their log tails).
    """
    plan, claim = claim_address_plan()
    with contextlib.ExitStack() as stack:
        stack.callback(claim.close)
        ca = make_ca("DANE Lab CA")
        scenarios = build_scenarios(specs or SCENARIOS, octet=plan.octet, ca=ca)
        zones = build_zones(scenarios, auth_addr=plan.auth)
        nsd = start_nsd(workdir, plan, zones)
        stack.callback(nsd.stop)
        root_ds = zones[-1].ds
        assert root_ds is not None
        unbound = start_unbound(workdir, plan, root_ds)
        stack.callback(unbound.stop)
        yield DnsLab(
            plan=plan,
            workdir=workdir,
            ca=ca,
            scenarios=scenarios,
            zones=tuple(zones),
            nsd=nsd,
            unbound=unbound,
        )
