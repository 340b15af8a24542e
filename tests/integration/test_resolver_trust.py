"""Resolver trust at run time (issue 3 item 5, RFC 7672 §2.1), with the relay process.

A non-validating resolver is a second unbound in the lab that only iterates (no trust
anchor, `module-config: "iterator"`): it answers every lab name, bogus ones included, and
never sets AD. Against it the relay must keep running but say so: one WARNING line with
the fix, `dane_relay_resolver_validating 0`, `/readyz` 503 "degraded", level dane reduced to
opportunistic TLS, level dane-only deferred; and with `require_validating_resolver = true`
it must refuse to start (exit 69). Against the lab's validating unbound: gauge 1, 200.
The recovery test swaps the resolver behind one address from non-validating to
validating and waits for the periodic probe to notice. A resolver that does not answer at
all proves nothing (RFC 7672 §2.1): the relay starts with DANE on, defers what it cannot
look up, and reports "resolver not answering" on /readyz; with
`require_validating_resolver = true` it gives up after a bounded wait (exit 69).
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.hostile import metric, start_relay, submit

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
BODY = b"Subject: resolver trust\r\nMessage-ID: <trust@sender.example>\r\n\r\nHello.\r\n"
FIX = (
    "fix: run a validating resolver such as unbound with the root trust anchor on 127.0.0.1 "
    "(see deploy/unbound/unbound.conf) and list it in dns.resolvers"
)
PLAIN_SPARE = 3  # 127.R.0.3: the module's non-validating resolver
SWAP_SPARE = 4  # 127.R.0.4: the recovery test's resolver, swapped mid-test
DEAD_SPARE = 8  # 127.R.0.8: nothing listens there (a resolver that is down)


@pytest.fixture(scope="module")
def plain_resolver(dns_lab: DnsLab) -> Iterator[str]:
    """The address of a resolver that answers everything and never validates."""
    proc = dns_lab.start_resolver(PLAIN_SPARE, validating=False)
    try:
        yield dns_lab.plan.spare(PLAIN_SPARE)
    finally:
        proc.stop()


def _http(relay: RelayProcess, path: str) -> tuple[int, str]:
    host, port = relay.metrics_addr
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _log_lines(relay: RelayProcess, pattern: str) -> list[str]:
    text = relay.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if re.search(pattern, line)]


# --- a resolver that does not validate ----------------------------------------------


def test_non_validating_resolver_is_reported_loudly_with_the_fix(
    dns_lab: DnsLab, plain_resolver: str, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(resolvers=[plain_resolver])
    warning = relay.wait_log(
        rf"WARNING relay: resolver={re.escape(plain_resolver)}:53 does not validate DNSSEC "
        r"\((.+)\): DANE is off"
    )
    assert warning.string.endswith(FIX)
    assert warning.group(1) == f"./DNSKEY from {plain_resolver}:53 answered without the AD bit"
    relay.wait_log(r"started .* resolver_validating=no ")
    assert len(_log_lines(relay, r"WARNING relay: resolver=.* does not validate")) == 1
    assert metric(relay, "dane_relay_resolver_validating") == 0
    status, body = _http(relay, "/readyz")
    assert status == 503
    assert body == (
        "degraded: resolver does not validate DNSSEC "
        f"(./DNSKEY from {plain_resolver}:53 answered without the AD bit)\n"
    )
    assert _http(relay, "/healthz") == (200, "ok\n")


def test_dane_destination_gets_opportunistic_tls_without_a_validating_resolver(
    dns_lab: DnsLab, plain_resolver: str, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory(resolvers=[plain_resolver])
    qid = submit(relay, "bob@dane-ok.test", BODY)
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.tls is True
    line = relay.attempt_line(qid)
    assert "dnssec=unvalidated" in line
    assert "tls=encrypted(" in line
    assert "dane=none" in line
    assert (
        metric(relay, "dane_relay_dane_verifications_total", result="verified", reason="match") == 0
    )
    assert metric(relay, "dane_relay_outbound_tls_total", level="encrypted") == 1


def test_bogus_data_is_not_trusted_from_a_non_validating_resolver(
    dns_lab: DnsLab, plain_resolver: str, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    # The plain resolver hands out bogus-mx.test's MX without complaint; the relay must not
    # read it as secure: it is delivered, but only as insecure mail (no DANE, no "verified").
    (receiver,) = receivers.start("bogus-mx.test")
    relay = relay_factory(resolvers=[plain_resolver])
    qid = submit(relay, "bob@bogus-mx.test", BODY)
    receiver.wait_for(1, timeout=20)
    line = relay.attempt_line(qid)
    assert "dnssec=unvalidated" in line
    assert "dane=none" in line


def test_dane_only_destination_is_deferred_without_a_validating_resolver(
    dns_lab: DnsLab, plain_resolver: str, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory(resolvers=[plain_resolver], tls_level="dane-only")
    qid = submit(relay, "bob@dane-ok.test", BODY)
    line = relay.attempt_line(qid, "deferred")
    assert 'reply="451 4.7.5' in line
    relay.wait_log(rf"queue_id={qid} deferred pending=1")
    assert receiver.mail_commands == []
    assert receiver.server_names == []  # not even a TLS handshake
    assert metric(relay, "dane_relay_queue_messages", state="deferred") == 1


def test_require_validating_resolver_refuses_to_start_with_exit_69(
    dns_lab: DnsLab, plain_resolver: str, relay_factory: RelayFactory
) -> None:
    relay = start_relay(
        relay_factory,
        {"dns": {"require_validating_resolver": "true"}},
        start=False,
        resolvers=[plain_resolver],
    )
    relay.start(wait_ready=False)
    assert relay.wait(30) == 69
    log = relay.log_path.read_text(errors="replace")
    (line,) = [x for x in log.splitlines() if x.startswith("dane-relay: ")]
    assert line.startswith(f"dane-relay: resolver {plain_resolver}:53 does not validate DNSSEC (")
    assert "dns.require_validating_resolver is true; not starting." in line
    assert "deploy/unbound/unbound.conf" in line
    assert "Traceback" not in log
    assert " started " not in log
    assert "DANE is off" not in log  # it does not run at all, so no "running degraded" line


# --- a resolver that does not answer -------------------------------------------------


def test_unanswering_resolver_keeps_dane_on_and_readiness_says_not_answering(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    dead = dns_lab.plan.spare(DEAD_SPARE)
    (receiver,) = receivers.start("dane-ok.test")
    relay = start_relay(relay_factory, {"dns": {"timeout": '"1s"'}}, resolvers=[dead])
    warning = relay.wait_log(
        rf"WARNING relay: resolver={re.escape(dead)}:53 could not be checked \((.+)\): "
        r"validation unknown: DANE stays on, lookups that fail defer; retrying in 30s"
    )
    assert warning.group(1).startswith(f"./DNSKEY from {dead}:53 ")
    relay.wait_log(r"started .* resolver_validating=unknown ")
    assert _log_lines(relay, "DANE is off") == []
    assert metric(relay, "dane_relay_resolver_validating") == 1
    status, body = _http(relay, "/readyz")
    assert status == 503
    assert body.startswith(f"degraded: resolver not answering: ./DNSKEY from {dead}:53 ")
    assert "does not validate" not in body
    # No downgrade: the MX lookup fails, so the message waits instead of going out without DANE.
    qid = submit(relay, "bob@dane-ok.test", BODY)
    line = relay.attempt_line(qid, "deferred")
    assert 'reply="451 4.4.3' in line
    assert receiver.mail_commands == []
    assert metric(relay, "dane_relay_outbound_tls_total", level="encrypted") == 0


def test_require_validating_resolver_gives_up_on_an_unanswering_resolver_with_exit_69(
    dns_lab: DnsLab, relay_factory: RelayFactory
) -> None:
    dead = dns_lab.plan.spare(DEAD_SPARE)
    relay = start_relay(
        relay_factory,
        {"dns": {"require_validating_resolver": "true", "timeout": '"1s"'}},
        start=False,
        resolvers=[dead],
    )
    relay.start(wait_ready=False)
    # Three probes one dns.timeout apart, then the refusal: well within 30 s.
    assert relay.wait(30) == 69
    log = relay.log_path.read_text(errors="replace")
    (line,) = [x for x in log.splitlines() if x.startswith("dane-relay: ")]
    assert line.startswith(
        f"dane-relay: resolver {dead}:53 did not answer the validation probe (3 probes in 3s; "
        f"last: ./DNSKEY from {dead}:53 "
    )
    assert "whether it validates DNSSEC is unknown; not starting." in line
    assert "check that the resolver is running and reachable" in line
    assert (
        len(_log_lines(relay, r"INFO relay: resolver=.* did not answer the validation probe")) == 2
    )
    assert "Traceback" not in log
    assert " started " not in log
    assert "DANE is off" not in log


# --- the lab's validating resolver ---------------------------------------------------


def test_validating_resolver_gives_gauge_1_and_ready(
    dns_lab: DnsLab, relay_factory: RelayFactory
) -> None:
    relay = start_relay(relay_factory, {"dns": {"require_validating_resolver": "true"}})
    relay.wait_log(rf"INFO relay: resolver={re.escape(dns_lab.resolver_addr)}:53 validates DNSSEC")
    relay.wait_log(r"started .* resolver_validating=yes ")
    assert metric(relay, "dane_relay_resolver_validating") == 1
    assert _http(relay, "/readyz") == (200, "ok\n")
    assert _log_lines(relay, r"WARNING relay: resolver=") == []


def test_probe_notices_when_the_resolver_starts_validating(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    swap = dns_lab.plan.spare(SWAP_SPARE)
    plain = dns_lab.start_resolver(SWAP_SPARE, validating=False)
    validating = None
    try:
        relay = start_relay(
            relay_factory, {"dns": {"validation_interval": '"0.5s"'}}, resolvers=[swap]
        )
        relay.wait_log(r"WARNING relay: resolver=.* does not validate DNSSEC")
        assert metric(relay, "dane_relay_resolver_validating") == 0
        # Mail meanwhile goes out with opportunistic TLS, and its answers are cached.
        (receiver,) = receivers.start("dane-ok.test")
        first = submit(relay, "bob@dane-ok.test", BODY)
        line = relay.wait_log(rf"queue_id={first} .*status=sent.*", timeout=20).group(0)
        assert "dnssec=unvalidated" in line
        assert "tls=encrypted(" in line

        plain.stop()
        validating = dns_lab.start_resolver(SWAP_SPARE, validating=True)
        relay.wait_log(
            rf"INFO relay: resolver={re.escape(swap)}:53 validates DNSSEC again .*DANE is back on",
            timeout=20,
        )
        assert metric(relay, "dane_relay_resolver_validating") == 1
        assert _http(relay, "/readyz") == (200, "ok\n")
        # DANE applies again at once: the insecure answers cached before the recovery
        # (TTL 300 s) were dropped, not reused.
        second = submit(relay, "carol@dane-ok.test", BODY)
        line = relay.wait_log(rf"queue_id={second} .*status=sent.*", timeout=20).group(0)
        assert "dnssec=secure" in line
        assert "tls=verified" in line
        assert "dane=pass reason=match" in line
        assert len(receiver.wait_for(2, timeout=20)) == 2
    finally:
        plain.stop()
        if validating is not None:
            validating.stop()
