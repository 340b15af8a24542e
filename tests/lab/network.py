"""The lab's loopback address plan, unique per test session.

Owns: the choice of the session octet R and `AddressPlan`. All lab addresses live in
127.R.0.0/16 (Linux answers for all of 127.0.0.0/8 on `lo`):

    127.R.0.1:53    nsd, authoritative for ".", "test." and every scenario zone
    127.R.0.2:53    unbound, validating, trust anchor = the lab root's DS
    127.R.0.3-9     spare DNS servers a test starts itself (`AddressPlan.spare(n)`)
    127.R.0.10      the relay under test (SMTP listener, metrics)
    127.R.1.N:25    scenario receiver N (see scenarios.receiver_address)

Why random R: two pytest sessions on one machine (two worktrees, a CI job next to a
developer) must not collide on port 53 or 25. A session claims R by binding a TCP socket
on 127.R.255.254:53 and holding it until the session ends; the kernel releases it even if
pytest dies. Candidates whose service addresses are already bound are skipped.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass

__all__ = ["AddressPlan", "claim_address_plan"]

_OCTETS = range(100, 251)
_DNS_PORT = 53


@dataclass(frozen=True, slots=True)
class AddressPlan:
    octet: int

    @property
    def auth(self) -> str:
        return f"127.{self.octet}.0.1"

    @property
    def resolver(self) -> str:
        return f"127.{self.octet}.0.2"

    @property
    def relay(self) -> str:
        return f"127.{self.octet}.0.10"

    def spare(self, n: int) -> str:
        """Spare service address n (3..9), e.g. for a second, non-validating resolver."""
        if not 3 <= n <= 9:
            raise ValueError(f"spare address {n} out of range 3..9")
        return f"127.{self.octet}.0.{n}"

    @property
    def claim(self) -> str:
        return f"127.{self.octet}.255.254"


def _bindable(addr: str, port: int, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


def claim_address_plan(
    rng: random.Random | None = None, attempts: int = 60
) -> tuple[AddressPlan, socket.socket]:
    """Pick a free octet R; return the plan and the claim socket (close it at the end).

    Raises:
        RuntimeError: if no free octet was found in `attempts` tries.
    """
    rng = rng or random.SystemRandom()
    candidates = rng.sample(list(_OCTETS), k=min(attempts, len(_OCTETS)))
    for octet in candidates:
        plan = AddressPlan(octet)
        claim = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            claim.bind((plan.claim, _DNS_PORT))
        except OSError:
            claim.close()
            continue
        free = all(
            _bindable(addr, _DNS_PORT, kind)
            for addr in (plan.auth, plan.resolver)
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM)
        )
        if free:
            return plan, claim
        claim.close()
    raise RuntimeError(
        f"no free 127.R.0.0/16 lab network among {attempts} candidates; is a DNS server "
        "(a system nsd, unbound or dnsmasq) bound to 0.0.0.0:53? Stop it, or run as root "
        "if binding port 53 was refused"
    )
