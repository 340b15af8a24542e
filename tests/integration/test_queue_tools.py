"""`dane-relay queue ...` against a running relay (issue 6 queue item 5): hold, list shows
it held, flush leaves it alone, release delivers it; delete removes a message without a
bounce; flush delivers a deferred message once its receiver is back. With the relay
stopped, the same tools edit the spool, and the restarted relay honours the edits.

The tools are real subprocesses (`python -m relay queue ... -c CONFIG`) talking to the
relay's control socket (<spool>/control.sock); they must not fall back to the spool
("relay not running" on stderr). Needs relay.cli to dispatch `queue` to
relay.queuetool and relay.app to run relay.control.ControlServer.

Backoff is one hour, so nothing is retried behind the test's back: every delivery after
the first attempt is one the tools asked for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest
from lab import ReceiverPool, RelayProcess
from lab.hostile import spool_entries, start_relay, submit

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]
SENDER = "alice@sender.example"
BODY = b"Subject: queue tools\r\n\r\nHello.\r\n"


def queue(
    relay: RelayProcess, *argv: str, running: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "relay", "queue", *argv, "-c", str(relay.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if running:
        assert "relay not running" not in done.stderr, done.stderr  # it used the socket
    return done


def deferred(relay: RelayProcess, rcpt: str) -> str:
    qid = submit(relay, rcpt, BODY, sender=SENDER)
    relay.wait_log(rf"queue_id={qid} deferred pending=1", timeout=20)
    return qid


def test_queue_tools_act_on_a_running_relay(
    receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = start_relay(relay_factory, {"delivery": {"min_backoff": '"1h"', "max_backoff": '"2h"'}})
    relay.wait_log(r"control socket listening path=\S+control\.sock", timeout=10)
    held = deferred(relay, "bob@dane-ok.test")  # no receiver yet: connection refused

    hold = queue(relay, "hold", held)
    assert (hold.returncode, hold.stdout) == (0, f"{held}: held\n"), hold.stderr
    relay.wait_log(rf"queue_id={held} held by operator")
    listing = queue(relay, "list")
    assert listing.returncode == 0
    (line,) = [x for x in listing.stdout.splitlines() if x.startswith(held)]
    assert line.endswith(" state=held")
    shown = queue(relay, "show", held, "--json")
    assert shown.returncode == 0
    record = json.loads(shown.stdout)["record"]
    assert (record["queue_id"], record["held"]) == (held, True)

    # delete: gone from the spool, no bounce.
    dropped = deferred(relay, "carol@unsigned.test")
    delete = queue(relay, "delete", dropped)
    assert (delete.returncode, delete.stdout) == (0, f"{dropped}: deleted (no bounce)\n")
    relay.wait_log(rf"queue_id={dropped} deleted by operator from=<{SENDER}>")
    assert dropped not in spool_entries(relay, "env")
    assert dropped not in spool_entries(relay, "data")
    assert f"queue_id={dropped} sender non-delivery notification" not in relay.log_path.read_text()

    # flush: the receiver is back; the deferred message goes, the held one stays.
    later = deferred(relay, "dave@dane-ok.test")
    (receiver,) = receivers.start("dane-ok.test")
    flush = queue(relay, "flush")
    assert (flush.returncode, flush.stdout) == (0, f"flushed 1 message(s)\n{later}\n")
    (first,) = receiver.wait_for(1, timeout=20)
    assert first.rcpt_tos == ("dave@dane-ok.test",)
    relay.wait_log(rf"queue_id={later} removed", timeout=20)
    assert spool_entries(relay, "env") == [held]

    # release: delivered now.
    release = queue(relay, "release", held)
    assert (release.returncode, release.stdout) == (0, f"{held}: released (due now)\n")
    _first, second = receiver.wait_for(2, timeout=20)
    assert second.rcpt_tos == ("bob@dane-ok.test",)
    relay.wait_log(rf"queue_id={held} removed", timeout=20)

    gone = queue(relay, "show", held)
    assert gone.returncode == 67
    assert gone.stderr == f"dane-relay: queue show: no queued message with id {held}\n"
    empty = queue(relay, "list")
    assert (empty.returncode, empty.stdout) == (0, "-- 0 message(s) in queue\n")
    assert len(receiver.messages) == 2


def test_queue_tools_edit_the_spool_of_a_stopped_relay(
    receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    relay = start_relay(relay_factory, {"delivery": {"min_backoff": '"1h"', "max_backoff": '"2h"'}})
    kept = deferred(relay, "bob@dane-ok.test")
    freed = deferred(relay, "dave@dane-ok.test")
    assert relay.stop() == 0
    assert "control.sock" not in spool_entries(relay, "")  # removed on the way out

    flush = queue(relay, "flush", running=False)
    assert flush.returncode == 0
    assert flush.stderr == "relay not running: acting on the spool directly\n"
    assert flush.stdout == f"flushed 2 message(s)\n{kept}\n{freed}\n"
    hold = queue(relay, "hold", kept, running=False)
    assert (hold.returncode, hold.stdout) == (0, f"{kept}: held\n")
    shown = json.loads(queue(relay, "show", kept, "--json", running=False).stdout)
    assert shown["record"]["held"] is True

    (receiver,) = receivers.start("dane-ok.test")
    relay.start()
    (first,) = receiver.wait_for(1, timeout=20)  # the flushed one, at once
    assert first.rcpt_tos == ("dave@dane-ok.test",)
    relay.wait_log(rf"queue_id={freed} removed", timeout=20)
    # Due but held since before the restart: still queued, and not being delivered.
    release = queue(relay, "release", kept)
    assert (release.returncode, release.stdout) == (0, f"{kept}: released (due now)\n")
    _first, second = receiver.wait_for(2, timeout=20)
    assert second.rcpt_tos == ("bob@dane-ok.test",)
    relay.wait_log(rf"queue_id={kept} removed", timeout=20)
    assert len(receiver.messages) == 2
