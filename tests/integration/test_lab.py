"""Self-tests of the integration lab: real nsd, unbound, receivers, relay harness.

These prove the lab means what the relay tests assume it means: signed scenarios validate
(AD), the unsigned one is insecure, the corrupted RRSIG is SERVFAIL, the TLSA published is
the receiver's key, and receivers present the scenario certificate (or no STARTTLS).
"""

from __future__ import annotations

import hashlib
import signal
import smtplib
import socket
import ssl
import sys
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lab import DnsLab, ReceiverPool, RelayProcess, send_mail, tlsa_data, write_relay_config

pytestmark = pytest.mark.lab


def _ask(lab: DnsLab, qname: str, rdtype: str) -> dns.message.Message:
    query = dns.message.make_query(qname, rdtype, want_dnssec=True)
    return dns.query.udp(query, lab.resolver_addr, port=53, timeout=5)


def _rrset_texts(answer: dns.message.Message, rdtype: str) -> list[str]:
    wanted = dns.rdatatype.from_text(rdtype)
    return sorted(rd.to_text() for rrset in answer.answer if rrset.rdtype == wanted for rd in rrset)


def _unverified_client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- DNS ---------------------------------------------------------------------------


def test_lab_addresses_are_in_the_session_network(dns_lab: DnsLab) -> None:
    r = dns_lab.octet
    assert 100 <= r <= 250
    assert dns_lab.auth_addr == f"127.{r}.0.1"
    assert dns_lab.resolver_addr == f"127.{r}.0.2"
    assert dns_lab.scenarios["dane-ok.test"].address.startswith(f"127.{r}.1.")
    addresses = [h.address for h in dns_lab.hosts.values()]
    assert len(addresses) == len(set(addresses))


def test_signed_mx_is_validated(dns_lab: DnsLab) -> None:
    answer = _ask(dns_lab, "dane-ok.test", "MX")
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.flags & dns.flags.AD
    assert _rrset_texts(answer, "MX") == ["10 mx.dane-ok.test."]


def test_unsigned_delegation_is_insecure(dns_lab: DnsLab) -> None:
    answer = _ask(dns_lab, "unsigned.test", "MX")
    assert answer.rcode() == dns.rcode.NOERROR
    assert not answer.flags & dns.flags.AD
    assert _rrset_texts(answer, "MX") == ["10 mx.unsigned.test."]
    address = _ask(dns_lab, "mx.unsigned.test", "A")
    assert not address.flags & dns.flags.AD
    assert _rrset_texts(address, "A") == [dns_lab.scenarios["unsigned.test"].address]


def test_corrupted_tlsa_signature_is_servfail(dns_lab: DnsLab) -> None:
    answer = _ask(dns_lab, "_25._tcp.mx.bogus.test", "TLSA")
    assert answer.rcode() == dns.rcode.SERVFAIL
    assert answer.answer == []
    # Only the TLSA RRset is broken: the rest of bogus.test still validates.
    mx = _ask(dns_lab, "bogus.test", "MX")
    assert mx.flags & dns.flags.AD
    assert _rrset_texts(mx, "MX") == ["10 mx.bogus.test."]


def test_null_mx(dns_lab: DnsLab) -> None:
    answer = _ask(dns_lab, "nullmx.test", "MX")
    assert answer.flags & dns.flags.AD
    assert _rrset_texts(answer, "MX") == ["0 ."]


def test_implicit_mx_domain_has_no_mx_but_an_address(dns_lab: DnsLab) -> None:
    scenario = dns_lab.scenarios["implicit.test"]
    mx = _ask(dns_lab, "implicit.test", "MX")
    assert mx.rcode() == dns.rcode.NOERROR
    assert mx.flags & dns.flags.AD
    assert _rrset_texts(mx, "MX") == []
    address = _ask(dns_lab, "implicit.test", "A")
    assert address.flags & dns.flags.AD
    assert _rrset_texts(address, "A") == [scenario.address]
    tlsa = _ask(dns_lab, "_25._tcp.implicit.test", "TLSA")
    assert tlsa.flags & dns.flags.AD
    assert _rrset_texts(tlsa, "TLSA") == [scenario.tlsa[0].to_text()]


def test_dane_ok_tlsa_is_sha256_of_receiver_spki(dns_lab: DnsLab) -> None:
    scenario = dns_lab.scenarios["dane-ok.test"]
    cert = x509.load_pem_x509_certificate(scenario.leaf.cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = f"3 1 1 {hashlib.sha256(spki).hexdigest()}"
    answer = _ask(dns_lab, "_25._tcp.mx.dane-ok.test", "TLSA")
    assert answer.flags & dns.flags.AD
    assert _rrset_texts(answer, "TLSA") == [expected]
    assert scenario.mx_hosts == ("mx.dane-ok.test",)


def test_dane_ee_cert_tlsa_is_sha256_of_full_certificate(dns_lab: DnsLab) -> None:
    scenario = dns_lab.scenarios["dane-ee-cert.test"]
    expected = f"3 0 1 {hashlib.sha256(scenario.leaf.cert_der).hexdigest()}"
    answer = _ask(dns_lab, "_25._tcp.mx.dane-ee-cert.test", "TLSA")
    assert answer.flags & dns.flags.AD
    assert _rrset_texts(answer, "TLSA") == [expected]


def test_dane_bad_tlsa_matches_nothing(dns_lab: DnsLab) -> None:
    scenario = dns_lab.scenarios["dane-bad.test"]
    answer = _ask(dns_lab, "_25._tcp.mx.dane-bad.test", "TLSA")
    assert answer.flags & dns.flags.AD
    [published] = _rrset_texts(answer, "TLSA")
    assert published.startswith("3 1 1 ")
    assert published == scenario.tlsa[0].to_text()
    assert bytes.fromhex(published.split()[3]) != tlsa_data(scenario.leaf.cert_der, 1, 1)


def test_unsigned_domain_has_no_tlsa(dns_lab: DnsLab) -> None:
    answer = _ask(dns_lab, "_25._tcp.mx.unsigned.test", "TLSA")
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert not answer.flags & dns.flags.AD


def test_names_outside_the_lab_root_do_not_exist(dns_lab: DnsLab) -> None:
    # The lab root is the only root: a name outside it is a validated NXDOMAIN.
    answer = _ask(dns_lab, "example.com", "A")
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert answer.flags & dns.flags.AD


# --- receivers ---------------------------------------------------------------------


def test_starttls_receiver_presents_scenario_certificate(
    dns_lab: DnsLab, receivers: ReceiverPool
) -> None:
    scenario = dns_lab.scenarios["dane-ok.test"]
    [rx] = receivers.start("dane-ok.test")
    with smtplib.SMTP(scenario.address, 25, local_hostname="client.test", timeout=10) as c:
        c.ehlo()
        assert c.has_extn("starttls")
        code, _ = c.starttls(context=_unverified_client_context())
        assert code == 220
        assert isinstance(c.sock, ssl.SSLSocket)
        assert c.sock.getpeercert(binary_form=True) == scenario.leaf.cert_der
        c.ehlo()
        c.sendmail("sender@client.test", ["user@dane-ok.test"], b"Subject: hi\r\n\r\nbody\r\n")
    [msg] = rx.wait_for(1, timeout=5)
    assert msg.tls is True
    assert msg.mail_from == "sender@client.test"
    assert msg.rcpt_tos == ("user@dane-ok.test",)
    assert msg.content == b"Subject: hi\r\n\r\nbody\r\n"
    assert msg.helo == "client.test"
    assert rx.mail_commands == [("sender@client.test", True)]


def test_ca_issued_receiver_sends_issuer_chain(dns_lab: DnsLab) -> None:
    leaf = dns_lab.scenarios["dane-ok.test"].leaf
    assert leaf.chain_der == (leaf.cert_der, dns_lab.ca.cert_der)
    unsigned = dns_lab.scenarios["unsigned.test"].leaf
    assert unsigned.chain_der == (unsigned.cert_der,)
    assert unsigned.cert.issuer == unsigned.cert.subject


def test_nostarttls_receiver_does_not_offer_starttls(
    dns_lab: DnsLab, receivers: ReceiverPool
) -> None:
    scenario = dns_lab.scenarios["dane-nostarttls.test"]
    [rx] = receivers.start("dane-nostarttls.test")
    with smtplib.SMTP(scenario.address, 25, local_hostname="client.test", timeout=10) as c:
        code, _ = c.ehlo()
        assert code == 250
        assert not c.has_extn("starttls")
        assert c.docmd("STARTTLS")[0] == 454
        c.sendmail("a@client.test", ["b@dane-nostarttls.test"], b"plain\r\n")
    [msg] = rx.wait_for(1, timeout=5)
    assert msg.tls is False
    assert msg.content == b"plain\r\n"


def test_wait_for_reports_shortfall(dns_lab: DnsLab, receivers: ReceiverPool) -> None:
    [rx] = receivers.start("crash.test")
    with pytest.raises(AssertionError, match=r"expected 1 message\(s\) within 0.1s, got 0"):
        rx.wait_for(1, timeout=0.1)


def test_stall_receiver_then_normal_receiver_on_same_address(
    dns_lab: DnsLab, receivers: ReceiverPool
) -> None:
    scenario = dns_lab.scenarios["crash.test"]
    stall = receivers.start_stall("crash.test")
    assert not stall.connected.is_set()
    with socket.create_connection((scenario.address, 25), timeout=5) as conn:
        assert stall.connected.wait(timeout=5)
        conn.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.recv(1)  # no greeting, ever
    assert stall.connections == 1
    receivers.stop("crash.test")
    [rx] = receivers.start("crash.test")
    with smtplib.SMTP(scenario.address, 25, timeout=10) as c:
        assert c.ehlo()[0] == 250
    assert rx.messages == []


def test_all_receivers_start_on_their_own_addresses(
    dns_lab: DnsLab, receivers: ReceiverPool
) -> None:
    started = receivers.start()
    assert {r.host.name for r in started} == set(dns_lab.hosts)
    for rx in started:
        with smtplib.SMTP(rx.address, rx.port, timeout=10) as c:
            c.ehlo()
            assert c.has_extn("starttls") == rx.host.starttls


# --- relay process harness (run against a stand-in program, not the relay) ----------


def test_relay_process_harness_with_standin(dns_lab: DnsLab, tmp_path: Path) -> None:
    standin = Path(__file__).parents[1] / "lab" / "standin_relay.py"
    conf = write_relay_config(
        tmp_path / "relay.toml",
        listen=f"{dns_lab.relay_addr}:2599",
        spool_dir=tmp_path / "spool",
        resolvers=[dns_lab.resolver_addr],
        metrics_listen=f"{dns_lab.relay_addr}:9499",
    )
    log = tmp_path / "relay.log"
    relay = RelayProcess(conf, log, argv=[sys.executable, str(standin), str(conf)])
    try:
        relay.start()
        assert relay.wait_log(r"listening on (\S+)").group(1) == f"{dns_lab.relay_addr}:2599"
        with socket.create_connection((dns_lab.relay_addr, 2599), timeout=5) as conn:
            assert conn.recv(64) == b"220 standin ESMTP\r\n"
        relay.wait_log(r"connection from 127\.")
        metrics = relay.metrics()
        assert metrics[("standin_connections_total", frozenset({("listener", "smtp")}))] >= 2
        first_pid = relay.pid
        relay.wait_log(rf"standin\[{first_pid}\]: connection from")
        relay.kill(signal.SIGKILL)
        assert relay.returncode == -signal.SIGKILL
        relay.start()  # restart on the same log: wait_log sees only the new run
        assert relay.pid != first_pid
        relay.wait_log(rf"standin\[{relay.pid}\]: listening on")
        with pytest.raises(AssertionError, match="timed out after 0.3s waiting for log line"):
            relay.wait_log(rf"standin\[{first_pid}\]", timeout=0.3)
        assert relay.stop() == 0
        assert "SIGTERM, exiting" in log.read_text()
    finally:
        relay.stop()


def test_write_relay_config_format(tmp_path: Path) -> None:
    conf = write_relay_config(
        tmp_path / "relay.toml",
        listen="127.1.0.10:2525",
        spool_dir=Path("/tmp/x/spool"),
        resolvers=["127.1.0.2"],
        metrics_listen="127.1.0.10:9425",
        extra="[limits]\nmax_size = 1000\n",
    )
    assert conf.read_text() == (
        '[server]\nlisten = ["127.1.0.10:2525"]\nhostname = "relay.test"\n'
        '\n[relay]\nnetworks = ["127.0.0.0/8"]\n'
        '\n[spool]\ndirectory = "/tmp/x/spool"\n'
        '\n[dns]\nresolvers = ["127.1.0.2"]\n'
        '\n[tls]\nlevel = "dane"\ninsecure_mx_policy = "dane"\n'
        "\n[delivery]\nport = 25\n"
        '\n[metrics]\nlisten = "127.1.0.10:9425"\n'
        '\n[log]\nlevel = "debug"\n'
        "\n[limits]\nmax_size = 1000\n"
    )


def test_send_mail_returns_data_reply(dns_lab: DnsLab, receivers: ReceiverPool) -> None:
    scenario = dns_lab.scenarios["dane-nostarttls.test"]
    [rx] = receivers.start("dane-nostarttls.test")
    reply = send_mail(scenario.address, 25, "s@client.test", ["r@x.test"], "Subject: t\r\n\r\nx")
    assert reply.code == 250
    assert reply.text == "2.0.0 OK received by lab"
    [msg] = rx.wait_for(1, timeout=5)
    assert msg.rcpt_tos == ("r@x.test",)
