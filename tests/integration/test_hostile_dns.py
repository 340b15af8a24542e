"""Hostile DNS data against the real relay: CNAMEs, unusable and malformed TLSA records,
CNAME loops, missing addresses, islands of security, bogus and expired signatures.

Each test states the correct behaviour (RFC 7672, docs/operations.md). Tests marked
xfail(strict=True) document a bug in the relay: they fail today and must start passing
when the bug is fixed.
"""

from __future__ import annotations

from collections.abc import Callable

import dns.flags
import dns.rcode
import dns.rdatatype
import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.hostile import metric, start_relay, submit

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
BODY = b"Subject: hostile dns\r\nMessage-ID: <dns@sender.example>\r\n\r\nHello.\r\n"


def _answer_types(lab: DnsLab, qname: str, rdtype: str) -> tuple[bool, int, set[str]]:
    resp = lab.query(qname, rdtype)
    types = {dns.rdatatype.to_text(rrset.rdtype) for rrset in resp.answer}
    return bool(resp.flags & dns.flags.AD), resp.rcode(), types


# --- the lab means what these tests assume -------------------------------------------


def test_lab_cname_mx_host_is_secure_and_tlsa_is_only_at_the_target(dns_lab: DnsLab) -> None:
    ad, rcode, types = _answer_types(dns_lab, "mx.cname-nostarttls.test", "A")
    assert (ad, rcode, types) == (True, dns.rcode.NOERROR, {"CNAME", "A", "RRSIG"})
    ad, rcode, types = _answer_types(dns_lab, "_25._tcp.real.cname-nostarttls.test", "TLSA")
    assert (ad, rcode) == (True, dns.rcode.NOERROR) and "TLSA" in types
    ad, rcode, _ = _answer_types(dns_lab, "_25._tcp.mx.cname-nostarttls.test", "TLSA")
    assert (ad, rcode) == (True, dns.rcode.NXDOMAIN)


def test_lab_expired_and_bogus_signatures_are_servfail(dns_lab: DnsLab) -> None:
    assert dns_lab.query("mx.expired-a.test", "A").rcode() == dns.rcode.SERVFAIL
    assert dns_lab.query("bogus-mx.test", "MX").rcode() == dns.rcode.SERVFAIL
    assert dns_lab.query("loop1.cname-loop.test", "A").rcode() == dns.rcode.SERVFAIL


# --- CNAME-expanded MX hosts (RFC 7672 §2.2.3) ----------------------------------------


def test_cname_mx_host_without_starttls_is_deferred_not_sent_in_plaintext(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("cname-nostarttls.test")
    relay = relay_factory()
    qid = submit(relay, "bob@cname-nostarttls.test", BODY)
    line = relay.attempt_line(qid, "sent|deferred")
    assert receiver.messages == []
    assert receiver.mail_commands == []
    assert "status=deferred" in line
    assert "dane=fail reason=no-starttls" in line
    assert "451 4.7.4" in line


def test_cname_mx_host_with_mismatching_certificate_is_deferred(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("cname-bad.test")
    relay = relay_factory()
    qid = submit(relay, "bob@cname-bad.test", BODY)
    line = relay.attempt_line(qid, "sent|deferred")
    assert receiver.mail_commands == []
    assert "status=deferred" in line
    assert "dane=fail reason=no-match" in line
    assert "451 4.7.5 Server certificate not verified" in line


def test_cname_mx_host_with_matching_tlsa_at_the_target_is_verified(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("cname-ok.test")
    relay = relay_factory()
    qid = submit(relay, "bob@cname-ok.test", BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.tls is True
    line = relay.attempt_line(qid)
    assert "dane=pass reason=match" in line
    assert "tls=verified" in line


# --- unusable and malformed TLSA -----------------------------------------------------


def test_only_pkix_tlsa_records_still_require_tls_and_send_nothing_in_plaintext(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("pkix-notls.test")
    relay = relay_factory()
    qid = submit(relay, "bob@pkix-notls.test", BODY)
    line = relay.attempt_line(qid, "deferred")
    assert "451 4.7.4 TLS is required, but was not offered by host" in line
    unusable = relay.wait_log(r"host=mx\.pkix-notls\.test dane=unusable records=(\S+)")
    assert sorted(unusable.group(1).split(",")) == ["0-0-1", "1-1-1"]
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert receiver.mail_commands == []
    assert (
        metric(
            relay, "dane_relay_delivery_attempts_total", result="deferred", reason="tls_not_offered"
        )
        == 1
    )


def test_only_pkix_tlsa_records_deliver_over_unauthenticated_tls(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("pkix-tls.test")
    relay = relay_factory()
    qid = submit(relay, "bob@pkix-tls.test", BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.tls is True
    line = relay.attempt_line(qid)
    assert "tls=encrypted(" in line
    assert "dane=none" in line


def test_wrong_length_tlsa_only_defers_and_sends_nothing(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("badlen.test")
    relay = start_relay(relay_factory, {"dns": {"timeout": '"3s"'}})
    qid = submit(relay, "bob@badlen.test", BODY)
    line = relay.attempt_line(qid, "deferred")
    assert 'reply="451 4.7.' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert receiver.mail_commands == []
    assert receiver.messages == []


def test_wrong_length_tlsa_next_to_a_good_one_is_ignored_and_mail_is_delivered(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("badlen-mixed.test")
    relay = start_relay(relay_factory, {"dns": {"timeout": '"3s"'}})
    qid = submit(relay, "bob@badlen-mixed.test", BODY)
    line = relay.attempt_line(qid, "sent|deferred")
    assert "status=sent" in line
    assert "dane=pass reason=match" in line
    assert len(receiver.messages) == 1


# --- names that lead nowhere ----------------------------------------------------------


def test_cname_loop_for_the_mx_host_is_a_logged_counted_deferral(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    qid = submit(relay, "bob@cname-loop.test", BODY)
    line = relay.attempt_line(qid, "deferred")
    assert "relay=loop1.cname-loop.test[-]" in line
    assert 'reply="451 4.4.3 DNS lookup of loop1.cname-loop.test/A failed' in line
    assert "error=dns" in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert metric(relay, "dane_relay_delivery_attempts_total", result="deferred", reason="dns") == 1
    # unbound answers a CNAME loop with SERVFAIL (no DNSSEC EDE); A and AAAA are asked apart.
    assert metric(relay, "dane_relay_dns_lookups_total", rrtype="A", result="servfail") == 1
    assert metric(relay, "dane_relay_dns_lookups_total", rrtype="AAAA", result="servfail") == 1


def test_mx_host_without_address_is_deferred(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    qid = submit(relay, "bob@mx-noaddr.test", BODY)
    line = relay.attempt_line(qid, "deferred")
    assert "Host or domain name not found: ghost.mx-noaddr.test" in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert metric(relay, "dane_relay_queue_messages", state="deferred") == 1


def test_mx_host_without_address_is_counted_as_a_dns_failure(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    qid = submit(relay, "bob@mx-noaddr.test", BODY)
    line = relay.attempt_line(qid, "deferred")
    assert "error=dns" in line
    assert 'reply="451 4.4.3' in line
    assert metric(relay, "dane_relay_delivery_attempts_total", result="deferred", reason="dns") == 1


# --- DNSSEC status -------------------------------------------------------------------


def test_island_of_security_is_insecure_and_its_tlsa_is_ignored(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    # The island's TLSA matches nothing; DANE must not apply (no DS: insecure).
    (receiver,) = receivers.start("island.test")
    relay = relay_factory()
    qid = submit(relay, "bob@island.test", BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.tls is True
    line = relay.attempt_line(qid)
    assert "dnssec=insecure" in line
    assert "dane=none" in line
    # RFC 7672 §2.2.2: insecure addresses: no TLSA lookup at all.
    assert metric(relay, "dane_relay_dns_lookups_total", rrtype="MX", result="insecure") == 1
    assert [
        key
        for key in relay.metrics()
        if key[0] == "dane_relay_dns_lookups_total" and ("rrtype", "TLSA") in key[1]
    ] == []


def test_bogus_mx_rrset_defers_without_contacting_anyone(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("bogus-mx.test")
    relay = relay_factory()
    qid = submit(relay, "bob@bogus-mx.test", BODY)
    line = relay.attempt_line(qid, "deferred")
    assert "relay=none" in line
    assert 'reply="451 4.4.3 DNS lookup of bogus-mx.test/MX failed' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert receiver.mail_commands == []
    assert metric(relay, "dane_relay_dns_lookups_total", rrtype="MX", result="bogus") == 1
    assert metric(relay, "dane_relay_delivery_attempts_total", result="deferred", reason="dns") == 1


def test_bogus_mx_log_line_carries_the_error_reason(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = relay_factory()
    qid = submit(relay, "bob@bogus-mx.test", BODY)
    line = relay.attempt_line(qid, "deferred")
    assert line.endswith(" error=dns")


def test_expired_rrsig_on_mx_host_address_is_a_temporary_failure(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("expired-a.test")
    relay = relay_factory()
    qid = submit(relay, "bob@expired-a.test", BODY)
    line = relay.attempt_line(qid, "deferred")
    assert 'reply="451 4.4.3 DNS lookup of mx.expired-a.test/A failed' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert receiver.mail_commands == []
    assert metric(relay, "dane_relay_dns_lookups_total", rrtype="A", result="bogus") == 1


def test_secure_mx_pointing_into_an_unsigned_zone_gets_opportunistic_tls(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("unsigned.test")
    relay = relay_factory()
    qid = submit(relay, "bob@unsigned-target.test", BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("bob@unsigned-target.test",)
    line = relay.attempt_line(qid)
    assert "relay=mx.unsigned.test[" in line
    assert "dnssec=insecure" in line
    assert "tls=encrypted(" in line
    assert "dane=none" in line
    assert metric(relay, "dane_relay_dns_lookups_total", rrtype="MX", result="secure") == 1
    assert metric(relay, "dane_relay_dns_lookups_total", rrtype="A", result="insecure") == 1
    assert metric(relay, "dane_relay_dns_lookups_total", rrtype="AAAA", result="insecure") == 1
