"""Acceptance tests of issue 3 against the real lab: nsd serving zones signed at test time,
unbound validating them with the lab root as its only trust anchor.

Part 1 asks the relay's own resolver adapter (`relay.lookup.resolver.DnsResolver`)
directly and checks how it classifies each zone, record type by record type: secure,
insecure (no DS, and an island of security), bogus (corrupted signature) and expired
(signature past its expiry date).

Part 2 runs the relay process end to end for the routing acceptance points. Where an
acceptance point is already covered elsewhere, this table says where:

| acceptance point | test |
|---|---|
| CNAME'd MX host into an insecure zone: no DANE | `test_cname_into_an_unsigned_zone_is_delivered_without_dane` |
| CNAME'd MX host, TLSA at the target: target is the base | `test_cname_mx_host_uses_the_target_as_tlsa_base_domain` |
| null MX bounces without any connection attempt | `test_null_mx_bounces_without_connecting_even_to_an_address_it_has` (and test_e2e_delivery.py `test_null_mx_bounces_to_the_sender`) |
| no MX: delivered to the domain's own address | test_e2e_delivery.py `test_implicit_mx_uses_the_domain_address_and_its_tlsa`, and `test_implicit_mx_host_is_the_domain_itself` below |
| bogus / expired data in delivery | test_e2e_delivery.py `test_bogus_tlsa_is_a_temporary_failure_not_insecure`, test_hostile_dns.py `test_bogus_mx_rrset_defers_without_contacting_anyone`, `test_expired_rrsig_on_mx_host_address_is_a_temporary_failure`, and `test_expired_zone_defers_the_domain` below |
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Callable

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.hostile import metric, submit

from relay.config import DnsConfig, Endpoint
from relay.dane.records import TlsaRecord
from relay.errors import DnsTempFail
from relay.lookup.resolver import DnsResolver
from relay.lookup.results import AnswerKind, MxRecord, Security

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
BODY = b"Subject: dnssec lookups\r\nMessage-ID: <dnssec@sender.example>\r\n\r\nHello.\r\n"


def _resolver(lab: DnsLab) -> DnsResolver:
    return DnsResolver(DnsConfig(resolvers=(Endpoint(lab.resolver_addr, 53),), timeout=5.0))


def _lab_tlsa(lab: DnsLab, host: str) -> tuple[TlsaRecord, ...]:
    return tuple(TlsaRecord(r.usage, r.selector, r.mtype, r.data) for r in lab.hosts[host].tlsa)


# --- part 1: classification, record type by record type ------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_secure_zone_every_rrtype_is_secure(dns_lab: DnsLab) -> None:
    r = _resolver(dns_lab)
    mx = await r.mx("dane-ok.test")
    assert (mx.kind, mx.security, mx.records) == (
        AnswerKind.DATA,
        Security.SECURE,
        (MxRecord(10, "mx.dane-ok.test"),),
    )
    addrs = await r.addresses("mx.dane-ok.test")
    assert (addrs.kind, addrs.security, addrs.records) == (
        AnswerKind.DATA,
        Security.SECURE,
        (dns_lab.hosts["mx.dane-ok.test"].address,),
    )
    tlsa = await r.tlsa("mx.dane-ok.test", 25)
    assert tlsa.name == "_25._tcp.mx.dane-ok.test"
    assert (tlsa.kind, tlsa.security) == (AnswerKind.DATA, Security.SECURE)
    assert tlsa.records == _lab_tlsa(dns_lab, "mx.dane-ok.test")
    assert [(t.usage, t.selector, t.mtype) for t in tlsa.records] == [(3, 1, 1)]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_secure_denials_are_answers_with_secure_status(dns_lab: DnsLab) -> None:
    r = _resolver(dns_lab)
    nx = await r.mx("nosuchname.dane-ok.test")
    assert (nx.kind, nx.security, nx.records) == (AnswerKind.NXDOMAIN, Security.SECURE, ())
    # implicit.test has an A record but no MX: NODATA, provably.
    nodata = await r.mx("implicit.test")
    assert (nodata.kind, nodata.security) == (AnswerKind.NODATA, Security.SECURE)
    no_tlsa = await r.tlsa("ns1.dane-ok.test", 25)
    assert (no_tlsa.kind, no_tlsa.security) == (AnswerKind.NXDOMAIN, Security.SECURE)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_zone_without_ds_is_insecure_for_every_rrtype(dns_lab: DnsLab) -> None:
    r = _resolver(dns_lab)
    mx = await r.mx("unsigned.test")
    assert (mx.kind, mx.security, mx.records) == (
        AnswerKind.DATA,
        Security.INSECURE,
        (MxRecord(10, "mx.unsigned.test"),),
    )
    addrs = await r.addresses("mx.unsigned.test")
    assert (addrs.kind, addrs.security) == (AnswerKind.DATA, Security.INSECURE)
    tlsa = await r.tlsa("mx.unsigned.test", 25)
    assert (tlsa.kind, tlsa.security) == (AnswerKind.NXDOMAIN, Security.INSECURE)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_signed_zone_without_ds_is_insecure_even_with_tlsa_data(dns_lab: DnsLab) -> None:
    # island.test is signed, but its parent has no DS: its signatures prove nothing.
    r = _resolver(dns_lab)
    mx = await r.mx("island.test")
    assert (mx.kind, mx.security) == (AnswerKind.DATA, Security.INSECURE)
    tlsa = await r.tlsa("mx.island.test", 25)
    assert (tlsa.kind, tlsa.security) == (AnswerKind.DATA, Security.INSECURE)
    assert tlsa.records == _lab_tlsa(dns_lab, "mx.island.test")


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_bad_signature_is_a_bogus_temporary_failure_for_that_rrtype_only(
    dns_lab: DnsLab,
) -> None:
    r = _resolver(dns_lab)
    # bogus.test: only the TLSA RRSIG is corrupted.
    assert (await r.mx("bogus.test")).security is Security.SECURE
    assert (await r.addresses("mx.bogus.test")).security is Security.SECURE
    with pytest.raises(DnsTempFail) as info:
        await r.tlsa("mx.bogus.test", 25)
    assert info.value.kind == "bogus"
    assert "_25._tcp.mx.bogus.test" in info.value.reply.text
    # bogus-mx.test: only the MX RRSIG is corrupted.
    with pytest.raises(DnsTempFail) as info:
        await r.mx("bogus-mx.test")
    assert info.value.kind == "bogus"
    assert (await r.addresses("mx.bogus-mx.test")).security is Security.SECURE


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_expired_signatures_are_bogus_temporary_failures(dns_lab: DnsLab) -> None:
    r = _resolver(dns_lab)
    # expired-a.test: one RRset (the MX host's A) carries an expired RRSIG.
    assert (await r.mx("expired-a.test")).security is Security.SECURE
    with pytest.raises(DnsTempFail) as info:
        await r.addresses("mx.expired-a.test")
    assert info.value.kind == "bogus"
    # expired.test: the RRSIG over the zone's DNSKEY RRset has expired, so nothing in the
    # zone validates: every record type fails, none is "insecure".
    for lookup in (
        r.mx("expired.test"),
        r.addresses("mx.expired.test"),
        r.tlsa("mx.expired.test", 25),
    ):
        with pytest.raises(DnsTempFail) as info:
            await lookup
        assert info.value.kind == "bogus"


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_cname_chains_are_secure_only_if_every_link_is(dns_lab: DnsLab) -> None:
    r = _resolver(dns_lab)
    secure = await r.addresses("mx.cname-ok.test")
    assert (secure.kind, secure.security, secure.canonical) == (
        AnswerKind.DATA,
        Security.SECURE,
        "real.cname-ok.test",
    )
    assert secure.records == (dns_lab.hosts["real.cname-ok.test"].address,)
    # A secure CNAME in a signed zone pointing into an unsigned one: the chain is insecure.
    mixed = await r.addresses("mx.cname-insecure.test")
    assert (mixed.kind, mixed.security, mixed.canonical) == (
        AnswerKind.DATA,
        Security.INSECURE,
        "real.cname-unsigned.test",
    )
    assert mixed.records == (dns_lab.hosts["real.cname-unsigned.test"].address,)


# --- part 2: through the relay -------------------------------------------------------


def test_cname_into_an_unsigned_zone_is_delivered_without_dane(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    # The target zone publishes a TLSA record that matches nothing: had the relay used it,
    # delivery would have been deferred.
    (receiver,) = receivers.start("real.cname-unsigned.test")
    relay = relay_factory()
    qid = submit(relay, "bob@cname-insecure.test", BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("bob@cname-insecure.test",)
    assert msg.tls is True
    line = relay.attempt_line(qid)
    assert "relay=mx.cname-insecure.test[" in line
    assert "dnssec=insecure" in line
    assert "tls=encrypted(" in line
    assert "dane=none" in line
    assert (
        metric(relay, "dane_relay_dane_verifications_total", result="failed", reason="mismatch")
        == 0
    )
    tlsa_lookups = [
        value
        for (name, labels), value in relay.metrics().items()
        if name == "dane_relay_dns_lookups_total" and ("rrtype", "TLSA") in labels
    ]
    assert sum(tlsa_lookups) == 0  # insecure addresses: TLSA is not even asked for
    # ... while the lookups that were made are counted (so the zero above means something).
    assert metric(relay, "dane_relay_dns_lookups_total", rrtype="MX", result="secure") == 1
    assert metric(relay, "dane_relay_dns_lookups_total", rrtype="A", result="insecure") >= 1


def test_cname_mx_host_uses_the_target_as_tlsa_base_domain(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("cname-ok.test")
    relay = relay_factory()
    qid = submit(relay, "bob@cname-ok.test", BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.tls is True
    # RFC 7672 §8.1: SNI carries the TLSA base domain: the CNAME target, not the MX name.
    assert receiver.server_names == ["real.cname-ok.test"]
    line = relay.attempt_line(qid)
    assert "relay=mx.cname-ok.test[" in line
    assert "tls=verified" in line
    assert "dane=pass reason=match" in line
    # RFC 7672 §2.2.3: the log names the base domain whose TLSA records were used.
    assert " tlsa_base=real.cname-ok.test " in line


def test_null_mx_bounces_without_connecting_even_to_an_address_it_has(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    # nullmx-addr.test has an A record; a relay that fell back to the implicit MX would
    # connect to it. The stall receiver counts every TCP connection.
    stall = receivers.start_stall("nullmx-addr.test")
    relay = relay_factory()
    qid = submit(relay, "bob@nullmx-addr.test", BODY)
    line = relay.attempt_line(qid, "bounced")
    assert "relay=none" in line
    assert "5.1.10" in line
    relay.wait_log(rf"queue_id={qid} sender non-delivery notification: [0-9A-F]+")
    relay.wait_log(rf"queue_id={qid} removed")
    assert stall.connections == 0
    assert (
        metric(relay, "dane_relay_delivery_attempts_total", result="bounced", reason="null_mx") == 1
    )
    address_lookups = [
        value
        for (name, labels), value in relay.metrics().items()
        if name == "dane_relay_dns_lookups_total"
        and any(k == "rrtype" and v in ("A", "AAAA", "A/AAAA") for k, v in labels)
    ]
    assert sum(address_lookups) == 0
    # The MX lookups made (the recipient's, the DSN's to sender.example) are counted.
    assert metric(relay, "dane_relay_dns_lookups_total", rrtype="MX", result="secure") >= 1


def test_implicit_mx_host_is_the_domain_itself(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("implicit.test")
    relay = relay_factory()
    qid = submit(relay, "bob@implicit.test", BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.peer is not None
    assert msg.rcpt_tos == ("bob@implicit.test",)
    # RFC 7672 §2.2.3: the implicit MX host's TLSA is at _25._tcp.<domain>; SNI names it.
    assert receiver.server_names == ["implicit.test"]
    line = relay.attempt_line(qid)
    assert f"relay=implicit.test[{dns_lab.hosts['implicit.test'].address}]" in line
    assert "tls=verified" in line


def test_expired_zone_defers_the_domain(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("expired.test")
    relay = relay_factory()
    qid = submit(relay, "bob@expired.test", BODY)
    line = relay.attempt_line(qid, "deferred")
    assert "relay=none" in line
    assert 'reply="451 4.4.3 DNS lookup of expired.test/MX' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert receiver.mail_commands == []
    assert receiver.server_names == []
    # unbound's Extended DNS Error (signature expired) makes it "bogus", not just SERVFAIL.
    assert metric(relay, "dane_relay_dns_lookups_total", rrtype="MX", result="bogus") == 1
    assert metric(relay, "dane_relay_delivery_attempts_total", result="deferred", reason="dns") == 1
