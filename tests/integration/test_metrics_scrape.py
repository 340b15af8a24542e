"""Issue 7 acceptance: after a lab run, /metrics (scraped over HTTP from the real relay
process) holds exactly the DANE, DNS, queue, TLS and delivery values the run produced.

The run, through one fresh relay (empty DNS cache, empty queue), four messages, one per
domain, submitted in one session each:

- `dane-ok.test`: secure MX, DANE-EE 3 1 1 that matches: delivered, `tls=verified`.
- `dane-bad.test`: secure MX, 3 1 1 that matches nothing: deferred, DANE `mismatch`.
- `bogus.test`: the TLSA RRset's signature is corrupted, unbound answers SERVFAIL: the
  host is skipped (RFC 7672 §2.1), deferred, DANE `tlsa-lookup-error`.
- `unsigned.test`: insecure zone, self-signed receiver: delivered with opportunistic TLS
  (`tls=encrypted`), no DANE.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.hostile import submit
from lab.relayproc import MetricKey

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]

BODY = b"Subject: metrics\r\nMessage-ID: <metrics@sender.example>\r\n\r\nCount me.\r\n"

RelayFactory = Callable[..., RelayProcess]


def _family(samples: dict[MetricKey, float], name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample of `name`, keyed by its label set (zero-valued ones left out)."""
    return {
        labels: value for (sample, labels), value in samples.items() if sample == name and value
    }


def _labels(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def test_scrape_after_a_lab_run_has_the_exact_dane_dns_queue_and_delivery_values(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    ok_rx, bad_rx, insecure_rx = receivers.start("dane-ok.test", "dane-bad.test", "unsigned.test")
    relay = relay_factory()
    relay.wait_log(r"resolver=\S+ validates DNSSEC")
    started = time.time()
    ok = submit(relay, "bob@dane-ok.test", BODY)
    bad = submit(relay, "carol@dane-bad.test", BODY)
    bogus = submit(relay, "dave@bogus.test", BODY)
    insecure = submit(relay, "erin@unsigned.test", BODY)

    ok_rx.wait_for(1, timeout=30)
    insecure_rx.wait_for(1, timeout=30)
    for qid in (ok, insecure):
        relay.wait_log(rf"queue_id={qid} removed", timeout=30)
    for qid in (bad, bogus):
        relay.wait_log(rf"queue_id={qid} deferred pending=1", timeout=30)
    sizes = [
        int(relay.wait_log(rf"queue_id={qid} client=\S+ .* size=(\d+) status=queued").group(1))
        for qid in (ok, bad, bogus, insecure)
    ]
    for qid in (ok, bad, bogus, insecure):
        relay.wait_log(rf"session client=\S+ .*queue_ids={qid} outcome=quit ")
    assert bad_rx.mail_commands == []  # DANE failed: QUIT before MAIL FROM
    m = relay.metrics()
    scraped = time.time()

    # DANE: one verified, one mismatch, one host skipped for its failed TLSA lookup.
    assert _family(m, "dane_relay_dane_verifications_total") == {
        _labels(result="verified", reason="match"): 1,
        _labels(result="failed", reason="mismatch"): 1,
        _labels(result="failed", reason="tlsa-lookup-error"): 1,
    }
    # DNS: each name asked once upstream (fresh cache), plus the start-up validation probe.
    # unsigned.test's host has insecure addresses, so its TLSA RRset is never asked for.
    assert _family(m, "dane_relay_dns_lookups_total") == {
        _labels(rrtype="DNSKEY", result="secure"): 1,
        _labels(rrtype="MX", result="secure"): 3,
        _labels(rrtype="MX", result="insecure"): 1,
        _labels(rrtype="A", result="secure"): 3,
        _labels(rrtype="A", result="insecure"): 1,
        _labels(rrtype="AAAA", result="secure"): 3,
        _labels(rrtype="AAAA", result="insecure"): 1,
        _labels(rrtype="TLSA", result="secure"): 2,
        _labels(rrtype="TLSA", result="bogus"): 1,
    }
    assert m[("dane_relay_dns_lookup_seconds_count", _labels(rrtype="TLSA"))] == 3
    assert m[("dane_relay_dns_lookup_seconds_count", _labels(rrtype="MX"))] == 4
    # Delivery, per recipient: by reason, and by the TLS level of the deciding connection.
    assert _family(m, "dane_relay_delivery_attempts_total") == {
        _labels(result="delivered", reason="sent"): 2,
        _labels(result="deferred", reason="dane_verification"): 1,
        _labels(result="deferred", reason="tlsa_lookup"): 1,
    }
    assert _family(m, "dane_relay_delivery_attempts_by_tls_total") == {
        _labels(result="delivered", tls="verified"): 1,
        _labels(result="delivered", tls="encrypted"): 1,
        _labels(result="deferred", tls="none"): 2,
    }
    assert _family(m, "dane_relay_outbound_tls_total") == {
        _labels(level="verified"): 1,
        _labels(level="encrypted"): 1,
    }
    # Three handshakes completed (dane-ok, dane-bad before its verdict, unsigned), all with
    # the lab receivers' TLS 1.3 default suite; none inbound (the clients used plaintext).
    assert _family(m, "dane_relay_tls_negotiated_total") == {
        _labels(direction="outbound", version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384"): 3
    }
    assert m[("dane_relay_delivery_delay_seconds_count", frozenset())] == 2
    # Queue: the two deferred messages, nothing else; the oldest is one of this run's.
    assert {
        state: m[("dane_relay_queue_messages", _labels(state=state))]
        for state in ("active", "deferred", "held")
    } == {"active": 0, "deferred": 2, "held": 0}
    oldest = m[("dane_relay_queue_oldest_message_age_seconds", frozenset())]
    assert 0 < oldest <= scraped - started
    # Inbound: four sessions ended by QUIT without TLS, four messages and their bytes; and
    # the start-up check of the lab (RelayProcess.start), which read the 220 and hung up.
    assert _family(m, "dane_relay_inbound_sessions_total") == {
        _labels(outcome="quit", tls="no"): 4,
        _labels(outcome="disconnected", tls="no"): 1,
    }
    assert m[("dane_relay_messages_received_total", frozenset())] == 4
    assert m[("dane_relay_received_bytes_total", frozenset())] == sum(sizes)
    assert _family(m, "dane_relay_inbound_rejections_total") == {}
    assert m[("dane_relay_resolver_validating", frozenset())] == 1
