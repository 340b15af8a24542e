"""DnsResolver's transport on both event loops the relay runs on: asyncio's and uvloop.

UDP, the TCP retry after truncation, the timeout and an unreachable resolver (ICMP port
unreachable reported on a connected UDP socket) are driven on a fresh loop of each kind
against `lab.scripted_dns.ScriptedDns`.
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from lab.scripted_dns import Answer, Drop, ScriptedDns, Truncated

from relay.config import DnsConfig
from relay.errors import DnsTempFail
from relay.lookup.resolver import DnsResolver
from relay.lookup.results import MxRecord

pytestmark = pytest.mark.timeout(30)

DOMAIN = "example.test"
MX = "10 mx.example.test."


@pytest.mark.parametrize("loop_name", ["stdlib", "uvloop"])
def test_udp_tcp_timeout_and_unreachable_on_both_event_loops(loop_name: str) -> None:
    async def scenario() -> list[object]:
        async with ScriptedDns() as gone:
            dead = gone.endpoint
        async with ScriptedDns() as srv:
            srv.answer(DOMAIN, "MX", MX)
            srv.script(f"tc.{DOMAIN}", "MX", Truncated(tcp=Answer([MX])))
            srv.script(f"drop.{DOMAIN}", "MX", Drop())
            resolver = DnsResolver(DnsConfig(resolvers=(srv.endpoint,), timeout=0.3))
            outcomes: list[object] = []
            for name in (DOMAIN, f"tc.{DOMAIN}", f"drop.{DOMAIN}"):
                try:
                    outcomes.append((await resolver.mx(name)).records)
                except DnsTempFail as exc:
                    outcomes.append(exc.kind)
            try:
                await DnsResolver(DnsConfig(resolvers=(dead,), timeout=2.0)).mx(DOMAIN)
            except DnsTempFail as exc:
                outcomes.append(exc.kind)
            assert srv.count(f"tc.{DOMAIN}", "MX", "tcp") == 1
            return outcomes

    loop = uvloop.new_event_loop() if loop_name == "uvloop" else asyncio.new_event_loop()
    try:
        outcomes = loop.run_until_complete(asyncio.wait_for(scenario(), 10))
    finally:
        loop.close()
    assert outcomes == [
        (MxRecord(10, "mx.example.test"),),
        (MxRecord(10, "mx.example.test"),),
        "timeout",
        "network",
    ]
