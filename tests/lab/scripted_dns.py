"""A scriptable in-process DNS server for tests: UDP and TCP on one loopback address.

Owns: `ScriptedDns`, an asyncio server that answers every query from a script keyed by
(query name, record type), built with dnspython message objects, and counts what it was
asked. It plays the part of the relay's validating resolver: the AD bit in each response is
whatever the script says.

Usage::

    async with ScriptedDns("127.0.0.1") as server:    # OS-chosen port, UDP and TCP
        server.answer("example.test", "MX", "10 mx.example.test.", ttl=300)  # AD set
        server.answer("mx.example.test", "A", "192.0.2.1", ad=False)         # insecure
        server.nodata("mx.example.test", "AAAA", negative_ttl=60)
        server.nxdomain("gone.example.test")                 # every type
        server.cname("www.example.test", "mx.example.test")  # every type at that name
        server.script("_25._tcp.mx.example.test", "TLSA", ServFail(ede=6))
        cfg = DnsConfig(resolvers=(server.endpoint,), timeout=0.5)
        ...
        assert server.count("example.test", "MX") == 1          # UDP + TCP
        assert server.count("example.test", "MX", "tcp") == 0
        assert server.errors == []

Replies (frozen dataclasses, pass them to `script`):
    `Answer(records, ttl, ad)`: records are RDATA in presentation form ("10 mx.test.";
        names without a final dot are absolute) or raw RDATA bytes, sent as they are (for
        malformed records).
    `NoData(ad, negative_ttl, zone, soa, soa_ttl)` / `NxDomain(...)`: NOERROR with no
        answer, or NXDOMAIN; with an SOA for `zone` (default: the parent of the name) in the
        authority section whose MINIMUM is `negative_ttl` and whose TTL is `soa_ttl`
        (default: `negative_ttl`), unless `soa=False` (RFC 2308 §3, §5).
    `ServFail(ede, ede_text)`: SERVFAIL, optionally with an RFC 8914 Extended DNS Error.
    `Refused(ede, ede_text)`, `Rcode(rcode)`: other error responses.
    `Drop()`: no reply at all (the client times out).
    `Truncated(tcp)`: TC set over UDP; over TCP the `tcp` reply, or TC again when None.
    `Garbage(payload, keep_id)`: raw bytes, prefixed with the query ID unless keep_id=False.
    `Cname(target, ttl, ad, follow)`: a CNAME. With follow=True the server expands the
        chain like a recursive resolver (the next link, then the target's own script, in
        the same response; loops stop at the first repeated name); with follow=False the
        chain stops after this link, so the client has to ask for the target itself.
        The response's AD bit is set only if every link and the final reply have ad=True.
    `Hold(reply, gate)`: waits for the asyncio.Event `gate`, then sends `reply` (a Hold met
        while expanding a CNAME chain is answered at once).
    `Custom(build)`: `build(query, transport)` returns the wire bytes to send (or None).
A script for type "*" applies to every type at that name without a script of its own.
Unscripted questions get the `default` reply given to the constructor (REFUSED).

Counting: `queries` is a Counter of (name, type, "udp"|"tcp"), with names in lower case
without the final dot ("." for the root); `count()` sums it and `wait_count()` waits for it
(no polling). `received` lists every query with its header flags and EDNS details, so tests
can check what the client sent. A script that cannot be rendered (e.g. bad RDATA text) is
answered with SERVFAIL and its exception is appended to `errors`; tests should assert that
it stays empty.

Guarantees: binds only the given loopback address; `close()` (or leaving the `async with`)
stops both listeners, closes open TCP connections and cancels held replies. No sleeps.

Does not: sign anything, validate, or implement a real zone (no wildcards, no delegation).
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from relay.config import Endpoint

__all__ = [
    "Answer",
    "Cname",
    "Custom",
    "Drop",
    "Garbage",
    "Hold",
    "NoData",
    "NxDomain",
    "Rcode",
    "ReceivedQuery",
    "Refused",
    "Reply",
    "ScriptedDns",
    "ServFail",
    "Truncated",
]

_MAX_EXPANSION = 32  # CNAME links the server follows within one response
_BIND_ATTEMPTS = 20


@dataclass(frozen=True)
class Answer:
    records: Sequence[str | bytes]
    ttl: int = 300
    ad: bool = True


@dataclass(frozen=True)
class NoData:
    ad: bool = True
    negative_ttl: int = 300  # the SOA MINIMUM field
    zone: str | None = None
    soa: bool = True
    soa_ttl: int | None = None  # the SOA record's own TTL; negative_ttl when None


@dataclass(frozen=True)
class NxDomain:
    ad: bool = True
    negative_ttl: int = 300  # the SOA MINIMUM field
    zone: str | None = None
    soa: bool = True
    soa_ttl: int | None = None  # the SOA record's own TTL; negative_ttl when None


@dataclass(frozen=True)
class ServFail:
    ede: int | None = None
    ede_text: str = ""


@dataclass(frozen=True)
class Refused:
    ede: int | None = None
    ede_text: str = ""


@dataclass(frozen=True)
class Rcode:
    rcode: int


@dataclass(frozen=True)
class Drop:
    pass


@dataclass(frozen=True)
class Truncated:
    tcp: Reply | None = None


@dataclass(frozen=True)
class Garbage:
    # A response header (QR, RD, RA; one question, one answer) followed by a name that is a
    # compression pointer past the end of the message.
    payload: bytes = b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\xc0\xff"
    keep_id: bool = True


@dataclass(frozen=True)
class Cname:
    target: str
    ttl: int = 300
    ad: bool = True
    follow: bool = True


@dataclass(frozen=True)
class Hold:
    reply: Reply
    gate: asyncio.Event


@dataclass(frozen=True)
class Custom:
    build: Callable[[dns.message.Message, str], bytes | None]


Reply = (
    Answer
    | NoData
    | NxDomain
    | ServFail
    | Refused
    | Rcode
    | Drop
    | Truncated
    | Garbage
    | Cname
    | Hold
    | Custom
)


@dataclass(frozen=True)
class ReceivedQuery:
    name: str
    rdtype: str
    transport: str  # "udp" or "tcp"
    flags: int  # header flags (dns.flags.RD, dns.flags.AD, dns.flags.CD ...)
    edns: int  # EDNS version, -1 without EDNS
    ednsflags: int  # dns.flags.DO ...
    payload: int  # advertised UDP buffer size


def _key_name(name: str | dns.name.Name) -> str:
    text = name.to_text() if isinstance(name, dns.name.Name) else name
    text = text.lower()
    return text if text == "." else text.rstrip(".")


def _abs(name: str) -> dns.name.Name:
    return dns.name.from_text(name, origin=dns.name.root)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: ScriptedDns) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.server._spawn(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        wire = await self.server._respond(data, "udp")
        if wire is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(wire, addr)


class ScriptedDns:
    """In-process DNS server answering from a script; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, default: Reply = Refused()):
        self.host = host
        self.port = port
        self.default = default
        self.queries: Counter[tuple[str, str, str]] = Counter()
        self.received: list[ReceivedQuery] = []
        self.errors: list[Exception] = []  # scripts the server could not render
        self._scripts: dict[tuple[str, str], Reply] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Condition()

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def endpoint(self) -> Endpoint:
        """Where the server listens, as the relay's config wants it."""
        return Endpoint(self.host, self.port)

    async def start(self) -> ScriptedDns:
        """Bind UDP and TCP on the same port (an OS-chosen one when port was 0)."""
        loop = asyncio.get_running_loop()
        for _ in range(_BIND_ATTEMPTS):
            tcp = await asyncio.start_server(self._serve_tcp, self.host, self.port)
            port = tcp.sockets[0].getsockname()[1]
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _Udp(self), local_addr=(self.host, port)
                )
            except OSError:
                tcp.close()
                await tcp.wait_closed()
                if self.port:
                    raise
                continue
            self._tcp, self._udp, self.port = tcp, udp, port
            return self
        raise OSError(f"no free port on {self.host} for both UDP and TCP")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    async def __aenter__(self) -> ScriptedDns:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- scripting ------------------------------------------------------------------------

    def script(self, name: str, rdtype: str, reply: Reply) -> None:
        """Answer questions for (name, rdtype) with `reply` from now on ("*": any type)."""
        self._scripts[(_key_name(name), rdtype.upper())] = reply

    def answer(
        self, name: str, rdtype: str, *records: str | bytes, ttl: int = 300, ad: bool = True
    ) -> None:
        self.script(name, rdtype, Answer(records, ttl, ad))

    def nodata(self, name: str, rdtype: str, *, ad: bool = True, negative_ttl: int = 300) -> None:
        self.script(name, rdtype, NoData(ad, negative_ttl))

    def nxdomain(
        self, name: str, rdtype: str = "*", *, ad: bool = True, negative_ttl: int = 300
    ) -> None:
        self.script(name, rdtype, NxDomain(ad, negative_ttl))

    def cname(
        self, name: str, target: str, *, ttl: int = 300, ad: bool = True, follow: bool = True
    ) -> None:
        self.script(name, "*", Cname(target, ttl, ad, follow))

    def count(self, name: str, rdtype: str, transport: str | None = None) -> int:
        """Queries received for (name, rdtype), over one transport or both."""
        key = _key_name(name)
        return sum(
            n
            for (qname, qtype, via), n in self.queries.items()
            if qname == key and qtype == rdtype.upper() and transport in (None, via)
        )

    async def wait_count(
        self, name: str, rdtype: str, n: int, transport: str | None = None
    ) -> None:
        """Return once `count(name, rdtype, transport)` has reached `n` (no polling)."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: self.count(name, rdtype, transport) >= n)

    def reset_counts(self) -> None:
        self.queries.clear()
        self.received.clear()

    # -- answering ------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                wire = await self._respond(await reader.readexactly(length), "tcp")
                if wire is not None:
                    writer.write(struct.pack("!H", len(wire)) + wire)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _find(self, name: dns.name.Name, rdtype: int) -> Reply:
        key = _key_name(name)
        specific = self._scripts.get((key, dns.rdatatype.to_text(rdtype)))
        if specific is not None:
            return specific
        return self._scripts.get((key, "*"), self.default)

    async def _respond(self, data: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
            question = query.question[0]
        except Exception:  # not a query we can read: say nothing, like a busy server
            return None
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries[(_key_name(question.name), rdtype, transport)] += 1
        async with self._arrived:
            self._arrived.notify_all()
        self.received.append(
            ReceivedQuery(
                _key_name(question.name),
                rdtype,
                transport,
                int(query.flags),
                query.edns,
                int(query.ednsflags),
                int(query.payload),
            )
        )
        reply = self._find(question.name, question.rdtype)
        try:
            return await self._build(query, reply, transport)
        except Exception as exc:  # a broken script: record it for the test, answer SERVFAIL
            self.errors.append(exc)
            response = self._response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()

    async def _build(
        self, query: dns.message.Message, reply: Reply, transport: str
    ) -> bytes | None:
        while isinstance(reply, Hold):
            await reply.gate.wait()
            reply = reply.reply
        if isinstance(reply, Drop):
            return None
        if isinstance(reply, Custom):
            return reply.build(query, transport)
        if isinstance(reply, Garbage):
            return (query.to_wire()[:2] if reply.keep_id else b"") + reply.payload
        if isinstance(reply, Truncated):
            if transport == "udp" or reply.tcp is None:
                response = self._response(query)
                response.flags |= dns.flags.TC
                return response.to_wire()
            return await self._build(query, reply.tcp, transport)
        return self._expand(query, reply).to_wire()

    def _response(
        self, query: dns.message.Message, options: Sequence[dns.edns.Option] = ()
    ) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if query.edns >= 0:
            response.use_edns(0, query.ednsflags & dns.flags.DO, 1232, options=list(options))
        return response

    def _expand(self, query: dns.message.Message, reply: Reply) -> dns.message.Message:
        """A full response: follow scripted CNAMEs, then the final reply's data or rcode."""
        question = query.question[0]
        name, rdtype = question.name, question.rdtype
        links: list[tuple[dns.name.Name, Cname]] = []
        seen = {name}
        final: Reply | None = reply
        while isinstance(final, Cname) and len(links) < _MAX_EXPANSION:
            links.append((name, final))
            name = _abs(final.target)
            if not final.follow or name in seen:
                final = None  # the chain stops here: the client has to go on
                break
            seen.add(name)
            final = self._find(name, rdtype)
            while isinstance(final, Hold):  # a held target inside a chain is answered at once
                final = final.reply
        if isinstance(final, ServFail | Refused):
            code = dns.rcode.SERVFAIL if isinstance(final, ServFail) else dns.rcode.REFUSED
            options = (
                [] if final.ede is None else [dns.edns.EDEOption(final.ede, final.ede_text or None)]
            )
            response = self._response(query, options)
            response.set_rcode(code)
            return response
        response = self._response(query)
        if isinstance(final, Rcode):
            response.set_rcode(final.rcode)
            return response
        if final is not None and not isinstance(final, Answer | NoData | NxDomain | Cname):
            # Drop, Garbage, Truncated or Custom at the end of a followed chain: a resolver
            # would have failed to finish it.
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        ad = all(link.ad for _, link in links)
        for owner, link in links:
            target = dns.rdata.from_text(
                dns.rdataclass.IN, dns.rdatatype.CNAME, link.target, dns.name.root, relativize=False
            )
            response.find_rrset(
                response.answer, owner, dns.rdataclass.IN, dns.rdatatype.CNAME, create=True
            ).add(target, link.ttl)
        if isinstance(final, Answer):
            ad = ad and final.ad
            rrset = response.find_rrset(
                response.answer, name, dns.rdataclass.IN, rdtype, create=True
            )
            for record in final.records:
                rdata = (
                    dns.rdata.GenericRdata(dns.rdataclass.IN, rdtype, record)
                    if isinstance(record, bytes)
                    else dns.rdata.from_text(
                        dns.rdataclass.IN, rdtype, record, dns.name.root, relativize=False
                    )
                )
                rrset.add(rdata, final.ttl)
        elif isinstance(final, NoData | NxDomain):
            ad = ad and final.ad
            if isinstance(final, NxDomain):
                response.set_rcode(dns.rcode.NXDOMAIN)
            if final.soa:
                response.authority.append(_soa(final, name))
        if ad:
            response.flags |= dns.flags.AD
        return response


def _soa(reply: NoData | NxDomain, name: dns.name.Name) -> dns.rrset.RRset:
    """RFC 2308 §3: the zone's SOA; MINIMUM is the negative TTL, the TTL soa_ttl if given."""
    if reply.zone:
        zone = _abs(reply.zone)
    else:
        zone = name.parent() if name != dns.name.root else name
    apex = zone.to_text()
    prefix = "" if apex == "." else apex
    rdata = f"ns.{prefix} hostmaster.{prefix} 1 3600 600 86400 {reply.negative_ttl}"
    ttl = reply.negative_ttl if reply.soa_ttl is None else reply.soa_ttl
    return dns.rrset.from_text(zone, ttl, "IN", "SOA", rdata)
