"""The attempt history in the queue record and the DSN, with a real relay (issue 5 item 6).

Scripted peers (lab.scripted_peer) run on the hostile2.test hosts, whose 3 1 1 TLSA
records match their lab certificates: mx1 presents an impostor certificate (DANE fails),
mx2 its own and answers RCPT as scripted. The relay is a real process on the lab's
validating resolver; the assertions read its envelope record under spool/env/ and the
DSN it queues.
"""

from __future__ import annotations

import email
import email.utils
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lab import DnsLab, RelayProcess, make_self_signed
from lab.hostile import submit
from lab.scripted_peer import PeerScript, ScriptedPeer

from relay.spool.records import load

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
PeerFactory = Callable[..., ScriptedPeer]
BODY = b"Subject: history\r\nMessage-ID: <history@sender.example>\r\n\r\nHello.\r\n"
# No receiver runs for dane-ok.test here: the DSN to the sender is deferred (connection
# refused) and stays in the spool to be read.
SENDER = "alice@dane-ok.test"


@pytest.fixture
def peers(dns_lab: DnsLab, tmp_path: Path) -> Iterator[PeerFactory]:
    made: list[ScriptedPeer] = []

    def make(host: str, *, impostor: bool = False, **script: Any) -> ScriptedPeer:
        """A scripted peer on `host`'s lab address: with its own certificate (its TLSA
        matches) or, `impostor`, a self-signed one for the same name (DANE fails)."""
        mx = dns_lab.hosts[host]
        leaf = make_self_signed([host]) if impostor else mx.leaf
        chain, key = leaf.write(tmp_path, f"{host}-{len(made)}")
        peer = ScriptedPeer(mx.address, PeerScript(**script), cert_chain=chain, key=key)
        made.append(peer)
        return peer

    try:
        yield make
    finally:
        for peer in made:
            peer.close()


def envelope(tmp_path: Path, qid: str) -> dict[str, Any]:
    """The relay's envelope record for `qid` (relay_factory's spool: tmp_path/relay-spool)."""
    raw = (tmp_path / "relay-spool" / "env" / qid).read_bytes()
    assert load(raw).queue_id == qid  # it is a valid record
    doc: dict[str, Any] = json.loads(raw)
    return doc


def test_deferred_message_keeps_both_hosts_steps_in_its_record(
    dns_lab: DnsLab, peers: PeerFactory, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    mx1, mx2 = dns_lab.hosts["mx1.hostile2.test"], dns_lab.hosts["mx2.hostile2.test"]
    first = peers("mx1.hostile2.test", impostor=True)
    second = peers("mx2.hostile2.test", rcpt_replies={"bob@hostile2.test": "451 4.2.0 Try later"})
    relay = relay_factory()
    qid = submit(relay, "bob@hostile2.test", BODY, sender=SENDER)

    relay.wait_log(rf"queue_id={qid} deferred pending=1", timeout=20)
    (bob,) = envelope(tmp_path, qid)["recipients"]
    assert (bob["address"], bob["status"], bob["attempts"]) == ("bob@hostile2.test", "pending", 1)
    assert bob["last_reply"] == "451 4.2.0 Try later"
    assert bob["last_relay"] == f"mx2.hostile2.test[{mx2.address}]:25"
    assert bob["history_dropped"] == 0
    dane_failed, refused = bob["history"]
    assert {k: v for k, v in dane_failed.items() if k != "time"} == {
        "outcome": "deferred",
        "reply": "451 4.7.5 Server certificate not verified (no-match)",
        "host": "mx1.hostile2.test",
        "address": mx1.address,
        "port": 25,
        "tls": "none",  # the impostor was not used: no TLS level reached
        "dane": "fail reason=no-match",
    }
    assert {k: v for k, v in refused.items() if k != "time"} == {
        "outcome": "deferred",
        "reply": "451 4.2.0 Try later",
        "host": "mx2.hostile2.test",
        "address": mx2.address,
        "port": 25,
        "tls": "verified",
        "dane": "pass reason=match",
    }
    assert 0 < dane_failed["time"] <= refused["time"]
    assert "MAIL" not in first.verbs
    assert second.verbs.count("RCPT") == 1


def test_dsn_tells_that_mx1_failed_dane_and_mx2_refused_the_recipient(
    dns_lab: DnsLab, peers: PeerFactory, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    mx1, mx2 = dns_lab.hosts["mx1.hostile2.test"], dns_lab.hosts["mx2.hostile2.test"]
    peers("mx1.hostile2.test", impostor=True)
    peers("mx2.hostile2.test", rcpt_replies={"bob@hostile2.test": "550 5.1.1 No such user"})
    relay = relay_factory()
    qid = submit(relay, "bob@hostile2.test", BODY, sender=SENDER)

    match = relay.wait_log(
        rf"queue_id={qid} sender non-delivery notification: ([0-9A-F]+)", timeout=20
    )
    dsn_id = match.group(1)
    relay.wait_log(rf"queue_id={dsn_id} deferred pending=1", timeout=20)
    dsn = email.message_from_bytes((tmp_path / "relay-spool" / "data" / dsn_id).read_bytes())
    payload = dsn.get_payload()
    assert isinstance(payload, list) and len(payload) == 3
    text, status, _headers = payload
    *_, per_rcpt = status.get_payload()
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@hostile2.test"
    assert per_rcpt["Remote-MTA"] == "dns; mx2.hostile2.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert email.utils.parsedate_to_datetime(per_rcpt["Last-Attempt-Date"]) is not None
    told_bytes = text.get_payload(decode=True)
    assert isinstance(told_bytes, bytes)
    told = told_bytes.decode("ascii")
    assert (
        f"mx1.hostile2.test[{mx1.address}]:25 tls=none dane=fail reason=no-match: "
        "451 4.7.5 Server certificate not verified (no-match)"
    ) in told
    assert (
        f"mx2.hostile2.test[{mx2.address}]:25 tls=verified dane=pass reason=match: "
        "550 5.1.1 No such user"
    ) in told
