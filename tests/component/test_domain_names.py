"""Domain names on their way into DNS and TLS, seen from a DNS server on loopback.

The real `DnsResolver` asks `lab.scripted_dns.ScriptedDns`; every test asserts which names
reached the server (and which never did). The adversarial findings each become a test:

F1   straße.de is looked up as xn--strae-oqa.de (IDNA 2008), never strasse.de; a soft hyphen,
     a zero-width joiner or a presentation escape is refused without any query, never looked
     up as paypal.de / example.de.
F7   names that can never resolve (a 64-octet label, empty labels, > 253 octets) are refused
     without a query.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from lab.scripted_dns import Answer, NoData, ScriptedDns

from relay.config import DnsConfig
from relay.errors import DnsTempFail
from relay.lookup.resolver import DnsResolver
from relay.lookup.results import AnswerKind, MxRecord

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

IDN = "straße.de"
IDN_ASCII = "xn--strae-oqa.de"
DIGEST = bytes(range(32))

# (name given to the resolver, the name IDNA 2003 / dnspython escapes would have asked for)
NEVER_ASKED = [
    ("pay\u00adpal.de", "paypal.de"),  # F1: soft hyphen, deleted by IDNA 2003
    ("pay\u200dpal.de", "paypal.de"),  # F1: zero-width joiner, deleted by IDNA 2003
    ("exampl\\101.de", "example.de"),  # F1: RFC 1035 §5.1 escape of "e"
    ("a..b.test", "a.b.test"),  # F7
    ("a" * 64 + ".test", "a" * 63 + ".test"),  # F7
    (".".join(["a" * 63] * 4), "a.test"),  # F7: 255 octets
]


@pytest_asyncio.fixture
async def server() -> AsyncIterator[ScriptedDns]:
    async with ScriptedDns() as srv:
        yield srv
        assert srv.errors == []


def asked(server: ScriptedDns, name: str) -> int:
    """Queries the server received for `name`, of any type, over UDP or TCP."""
    return sum(n for (qname, _, _), n in server.queries.items() if qname == name)


def resolver_for(server: ScriptedDns) -> DnsResolver:
    return DnsResolver(DnsConfig(resolvers=(server.endpoint,), timeout=0.5))


async def test_idn_is_looked_up_by_its_idna_2008_a_label(server: ScriptedDns) -> None:
    """F1, RFC 5891: straße.de is xn--strae-oqa.de; strasse.de is another domain."""
    server.answer(IDN_ASCII, "MX", f"10 mx.{IDN_ASCII}.")
    server.answer("strasse.de", "MX", "10 mx.strasse.de.")
    answer = await resolver_for(server).mx(IDN)
    assert answer.kind is AnswerKind.DATA
    assert answer.records == (MxRecord(10, f"mx.{IDN_ASCII}"),)
    assert server.count(IDN_ASCII, "MX") == 1
    assert asked(server, "strasse.de") == 0
    assert server.queries == Counter({(IDN_ASCII, "MX", "udp"): 1})


async def test_idn_host_and_tlsa_names_use_the_a_label(server: ScriptedDns) -> None:
    server.answer(f"mx.{IDN_ASCII}", "A", "192.0.2.25")
    server.nodata(f"mx.{IDN_ASCII}", "AAAA")
    server.answer(f"_25._tcp.mx.{IDN_ASCII}", "TLSA", f"3 1 1 {DIGEST.hex()}")
    resolver = resolver_for(server)
    assert (await resolver.addresses(f"mx.{IDN}")).records == ("192.0.2.25",)
    assert (await resolver.tlsa(f"mx.{IDN}", 25)).kind is AnswerKind.DATA
    assert server.count(f"mx.{IDN_ASCII}", "A") == 1
    assert server.count(f"_25._tcp.mx.{IDN_ASCII}", "TLSA") == 1
    assert asked(server, "mx.strasse.de") == asked(server, "_25._tcp.mx.strasse.de") == 0


@pytest.mark.parametrize(("name", "confused_with"), NEVER_ASKED)
async def test_names_that_are_not_dns_names_fail_without_a_query(
    server: ScriptedDns, name: str, confused_with: str
) -> None:
    """The resolver's last line of defence: DnsTempFail kind "error", nothing sent."""
    server.answer(confused_with, "MX", f"10 mx.{confused_with}.")
    server.answer(confused_with, "A", "192.0.2.1")
    server.script(confused_with, "AAAA", NoData())
    resolver = resolver_for(server)
    for lookup in (resolver.mx(name), resolver.addresses(name), resolver.tlsa(name, 25)):
        with pytest.raises(DnsTempFail) as info:
            await lookup
        assert info.value.kind == "error"
        assert "not a DNS name" in info.value.reply.text
        assert info.value.reply.text.isascii()
    assert server.queries == Counter()


async def test_tlsa_owner_names_keep_their_service_labels(server: ScriptedDns) -> None:
    """RFC 7672 §2.2.3: "_" is allowed where the owner name needs it."""
    server.script("_25._tcp.mx.example.test", "TLSA", Answer([f"3 1 1 {DIGEST.hex()}"]))
    answer = await resolver_for(server).tlsa("MX.Example.Test", 25)
    assert answer.kind is AnswerKind.DATA
    assert server.count("_25._tcp.mx.example.test", "TLSA") == 1
