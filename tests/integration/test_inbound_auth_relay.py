"""SMTP AUTH end to end (issue 6 acceptance): a real relay process with a submission
listener (STARTTLS + AUTH), Python's smtplib as the client, the credentials file made by
`dane-relay passwd`, and delivery to a DANE lab receiver.

The client connects from 127.0.0.1 and relay.networks is 192.0.2.0/24 (RFC 5737), so the
client may relay only once authenticated.
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from lab import DnsLab, ReceiverPool, RelayProcess
from lab.certs import make_self_signed

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]

SUBMISSION_PORT = 2587
SENDER = "app@client.example"
BODY = b"Subject: submitted\r\nMessage-ID: <auth@client.example>\r\n\r\nHello after AUTH.\r\n"


def _passwd(path: Path, user: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "passwd", str(path), user],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )


def _auth_relay(
    relay_factory: RelayFactory, dns_lab: DnsLab, tmp_path: Path, limit: int = 5
) -> RelayProcess:
    """A relay with a plain listener on :2525 and STARTTLS+AUTH on :2587."""
    cert, key = make_self_signed(["relay.test"]).write(tmp_path, "relay-tls")
    users = tmp_path / "users"
    done = _passwd(users, "alice", "s3cret pass")
    assert done.returncode == 0, done.stderr
    relay = relay_factory(start=False, networks=["192.0.2.0/24"])
    text = relay.config_path.read_text()
    plain = f'"{dns_lab.relay_addr}:2525"'
    submission = f'{{ address = "{dns_lab.relay_addr}:{SUBMISSION_PORT}", auth = true }}'
    text = text.replace(f"listen = [{plain}]", f"listen = [{plain}, {submission}]", 1)
    text = text.replace(
        'hostname = "relay.test"\n',
        'hostname = "relay.test"\n'
        f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\nauth_file = "{users}"\n'
        f"auth_failure_limit = {limit}\n",
        1,
    )
    relay.config_path.write_text(text)
    return relay.start()


def _client(relay: RelayProcess) -> smtplib.SMTP:
    host, _ = relay.smtp_addr
    client = smtplib.SMTP(host, SUBMISSION_PORT, local_hostname="client.test", timeout=10)
    client.ehlo()
    return client


def _starttls(client: smtplib.SMTP) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    client.starttls(context=ctx)
    client.ehlo()


def _auth_plain(client: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return client.docmd("AUTH", "PLAIN " + token)


def _metric(relay: RelayProcess, name: str, **labels: str) -> float:
    return relay.metrics().get((name, frozenset(labels.items())), 0.0)


def test_auth_refused_before_starttls_accepted_after_and_relays_to_an_outside_domain(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    (receiver,) = receivers.start("dane-ok.test")
    relay = _auth_relay(relay_factory, dns_lab, tmp_path)
    with _client(relay) as client:
        # Before STARTTLS: AUTH is not advertised and is refused (RFC 4954 §4, RFC 3207).
        assert not client.has_extn("auth")
        assert _auth_plain(client, "alice", "s3cret pass") == (
            538,
            b"5.7.11 Encryption required for requested authentication mechanism",
        )
        _starttls(client)
        assert client.has_extn("auth")
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        # A wrong password: 535 5.7.8, counted.
        client.user, client.password = "alice", "not the password"
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.auth("PLAIN", client.auth_plain)
        assert (info.value.smtp_code, info.value.smtp_error) == (
            535,
            b"5.7.8 Authentication credentials invalid",
        )
        relay.wait_log(r"auth client=127\.0\.0\.1 mechanism=PLAIN user=alice status=failed")
        assert _metric(relay, "dane_relay_auth_failures_total") == 1
        # The right one (smtplib's login, as applications use it): 235 2.7.0.
        assert client.login("alice", "s3cret pass") == (235, b"2.7.0 Authentication successful")
        refused = client.sendmail(SENDER, ["bob@dane-ok.test"], BODY)
        assert refused == {}
    (msg,) = receiver.wait_for(1, timeout=20)
    assert msg.rcpt_tos == ("bob@dane-ok.test",)
    assert msg.content.endswith(b"Hello after AUTH.\r\n")
    # RFC 3848: authenticated over TLS is ESMTPSA; the user name is not disclosed.
    received = msg.content.split(b"\r\n\r\n", 1)[0].decode()
    assert re.search(
        r"^Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
        r"\t\(using TLSv1\.[23] with cipher \S+ \((\d+)/\1 bits\)\)\r\n"
        r"\tby relay\.test \(dane-relay\) with ESMTPSA id [0-9A-F]+\r\n"
        r"\tfor <bob@dane-ok\.test>;\r\n\t",
        received,
    ), received
    assert "alice" not in received
    assert _metric(relay, "dane_relay_auth_failures_total") == 1
    assert _metric(relay, "dane_relay_inbound_rejections_total", reason="relay_denied") == 0


def test_unauthenticated_client_outside_networks_gets_550_5_7_1(
    dns_lab: DnsLab, receivers: ReceiverPool, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    relay = _auth_relay(relay_factory, dns_lab, tmp_path)
    with _client(relay) as client:
        _starttls(client)  # TLS alone does not allow relaying
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("bob@dane-ok.test") == (
            550,
            b"5.7.1 <bob@dane-ok.test>: Relay access denied",
        )
    relay.wait_log(
        r"reject=RCPT client=127\.0\.0\.1 from=<app@client\.example> to=<bob@dane-ok\.test> "
        r'reply="550 5\.7\.1" reason=relay-denied'
    )
    assert _metric(relay, "dane_relay_inbound_rejections_total", reason="relay_denied") == 1
    assert _metric(relay, "dane_relay_messages_received_total") == 0


def test_failure_limit_gives_421_to_that_address(
    dns_lab: DnsLab, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    relay = _auth_relay(relay_factory, dns_lab, tmp_path, limit=3)
    with _client(relay) as client:
        _starttls(client)
        for _ in range(3):
            assert _auth_plain(client, "alice", "guess")[0] == 535
        code, text = _auth_plain(client, "alice", "s3cret pass")
        assert (code, text) == (
            421,
            b"4.7.0 relay.test Error: too many failed authentication attempts",
        )
    # A new connection from the same address: still blocked, even with the right password.
    with _client(relay) as client:
        _starttls(client)
        assert _auth_plain(client, "alice", "s3cret pass")[0] == 421
    relay.wait_log(r'reject=AUTH client=127\.0\.0\.1 reply="421 4\.7\.0" reason=auth-rate-limited')
    assert _metric(relay, "dane_relay_auth_failures_total") == 3
    assert _metric(relay, "dane_relay_inbound_rejections_total", reason="auth_rate_limited") == 2


# -- dane-relay passwd ------------------------------------------------------------------


def test_passwd_creates_a_0600_file_adds_and_replaces(tmp_path: Path) -> None:
    users = tmp_path / "users"
    done = _passwd(users, "alice", "first")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{users}: added alice\n", "")
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600
    first = users.read_text()
    assert first.startswith("alice:scrypt$16384$8$1$")
    done = _passwd(users, "bob", "second")
    assert (done.returncode, done.stdout) == (0, f"{users}: added bob\n")
    done = _passwd(users, "alice", "third")
    assert (done.returncode, done.stdout) == (0, f"{users}: replaced alice\n")
    lines = users.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["alice", "bob"]
    assert lines[0] != first.splitlines()[0]  # a new hash (and salt)
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600


@pytest.mark.parametrize(
    ("user", "password", "message"),
    [
        ("al:ice", "pw", "expected a user name without ':' or white space, got 'al:ice'"),
        ("al ice", "pw", "expected a user name without ':' or white space, got 'al ice'"),
        ("alice", "", "expected a password, got an empty one"),
    ],
)
def test_passwd_usage_errors_exit_64(
    tmp_path: Path, user: str, password: str, message: str
) -> None:
    users = tmp_path / "users"
    done = _passwd(users, user, password)
    assert (done.returncode, done.stdout) == (64, "")
    assert done.stderr == f"dane-relay: passwd: {message}\n"
    assert not users.exists()


def test_passwd_refuses_a_malformed_file_with_78_and_leaves_it(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:plaintext\n")
    done = _passwd(users, "bob", "pw")
    assert done.returncode == 78
    assert done.stderr.startswith(f"dane-relay: passwd: {users} line 1: expected scrypt$")
    assert users.read_text() == "alice:plaintext\n"


def test_passwd_unwritable_directory_exits_73(tmp_path: Path) -> None:
    done = _passwd(tmp_path / "missing-dir" / "users", "alice", "pw")
    assert done.returncode == 73
    assert done.stderr.startswith(f"dane-relay: passwd: {tmp_path / 'missing-dir' / 'users'}: ")
