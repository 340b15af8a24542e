"""Crash safety acceptance (issue 6): 500 messages through a real relay that is SIGKILLed
three times while they flow, restarted on the same spool each time; every message that
was answered 250 arrives at the lab receiver, none is lost.

The clients behave like real ones: several SMTP connections in parallel, several
messages per connection; a message that got no 250 (the relay died mid-session, the
connection was refused while it was down) is submitted again until it gets one. Each
message carries a unique token (Subject and Message-ID), so the receiver's copies can be
matched to the 250s. Duplicates are allowed (at-least-once: a message delivered, or
committed, just before the kill is sent again) but counted and printed, with the seed of
the random kill moments (set DANE_RELAY_CRASH_SEED to repeat a run's choices).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from lab import ReceiverPool, RelayProcess, poll_until
from lab.hostile import SENDER, spool_entries

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., RelayProcess]

MESSAGES = 500
CLIENTS = 6
KILLS = 3
DEFAULT_SEED = 20261203
TOKEN = re.compile(rb"^Subject: crash-safety (t\d{4})\r$", re.MULTILINE)


def _body(token: str) -> bytes:
    return (
        f"Subject: crash-safety {token}\r\n"
        f"Message-ID: <{token}.crash-safety@client.test>\r\n"
        "\r\n"
        f"Message {token} of the crash safety test.\r\n"
    ).encode()


def _token(content: bytes) -> str:
    match = TOKEN.search(content)
    assert match, content[:300]
    return match.group(1).decode()


@dataclass
class Submissions:
    """What the clients did, shared between their threads."""

    pending: list[str]
    acked: dict[str, str] = field(default_factory=dict)  # token -> queue id of its 250
    # token -> attempts on a connection that broke before the 250 (the relay died)
    resubmitted: Counter[str] = field(default_factory=Counter)
    refused: int = 0  # connections refused while the relay was down
    cond: threading.Condition = field(default_factory=threading.Condition)

    def next_token(self) -> str | None:
        with self.cond:
            return self.pending.pop() if self.pending else None

    def ack(self, token: str, queue_id: str) -> None:
        with self.cond:
            self.acked[token] = queue_id
            self.cond.notify_all()

    def wait_acked(self, count: int, timeout: float) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.acked) >= count, timeout), (
                f"only {len(self.acked)} of {count} messages acknowledged in {timeout}s"
            )


def _client(host: str, port: int, subs: Submissions, errors: list[BaseException]) -> None:
    """Send tokens until none is left; reconnect and resubmit after any failure."""
    conn: smtplib.SMTP | None = None
    try:
        while (token := subs.next_token()) is not None:
            while True:
                connected = False
                try:
                    if conn is None:
                        conn = smtplib.SMTP(host, port, local_hostname="client.test", timeout=15)
                        conn.ehlo()
                    connected = True
                    code, text = conn.mail(SENDER)
                    if code == 250:
                        code, text = conn.rcpt(f"{token}@dane-ok.test")
                    if code == 250:
                        code, text = conn.data(_body(token))
                    if code == 250:
                        match = re.search(rb"queued as ([0-9A-F]+)", text)
                        assert match, text
                        subs.ack(token, match.group(1).decode())
                        break
                    raise smtplib.SMTPResponseException(code, text)
                except (OSError, smtplib.SMTPException):
                    # No 250: a real client keeps the message and tries again.
                    with subs.cond:
                        if connected:
                            subs.resubmitted[token] += 1
                        else:
                            subs.refused += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    time.sleep(0.05)
        if conn is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                conn.quit()  # the relay may just have been killed: nothing is lost here
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def test_sigkill_three_times_while_500_messages_flow_loses_none(
    receivers: ReceiverPool, relay_factory: RelayFactory
) -> None:
    seed = int(os.environ.get("DANE_RELAY_CRASH_SEED", DEFAULT_SEED))
    rng = random.Random(seed)
    # Kill when this many messages have been acknowledged (one moment in each part of
    # the run), plus a random instant more.
    part = MESSAGES // KILLS
    thresholds = [rng.randrange(k * part + 20, (k + 1) * part - 20) for k in range(KILLS)]
    pauses = [rng.uniform(0.0, 0.25) for _ in range(KILLS)]
    print(f"crash-safety seed={seed} kill_after_acks={thresholds} extra_pause={pauses}")

    (receiver,) = receivers.start("dane-ok.test")
    relay = relay_factory()
    host, port = relay.smtp_addr
    tokens = [f"t{i:04d}" for i in range(MESSAGES)]
    subs = Submissions(pending=list(reversed(tokens)))
    errors: list[BaseException] = []
    clients = [
        threading.Thread(target=_client, args=(host, port, subs, errors), name=f"client-{n}")
        for n in range(CLIENTS)
    ]
    for thread in clients:
        thread.start()

    recovered: list[int] = []
    for threshold, pause in zip(thresholds, pauses, strict=True):
        subs.wait_acked(threshold, timeout=60)
        time.sleep(pause)
        relay.kill(signal.SIGKILL)
        assert relay.returncode == -signal.SIGKILL
        relay.start()  # same config, same spool
        started = relay.wait_log(r"started .* queued=(\d+) ")
        recovered.append(int(started.group(1)))

    for thread in clients:
        thread.join(timeout=90)
        assert not thread.is_alive(), f"{thread.name} did not finish"
    assert errors == []
    assert sorted(subs.acked) == tokens  # every message got its 250 in the end

    def all_arrived() -> bool:
        return {_token(m.content) for m in receiver.messages} >= set(tokens)

    poll_until(all_arrived, timeout=60, what="every acknowledged message at the receiver")
    # Then the queue runs empty: every message, resubmitted copies included, is done.
    poll_until(
        lambda: spool_entries(relay, "env") == [],
        timeout=60,
        what=lambda: f"an empty queue, still {len(spool_entries(relay, 'env'))}",
    )
    assert relay.stop() == 0
    messages = receiver.messages
    received = Counter(_token(m.content) for m in messages)

    assert set(received) == set(subs.acked)  # none lost, nothing unknown
    assert all(m.tls for m in messages)
    duplicates = {t: n - 1 for t, n in received.items() if n > 1}
    print(
        f"crash-safety seed={seed} messages={MESSAGES} clients={CLIENTS} kills={KILLS} "
        f"recovered_queued={recovered} received={len(messages)} "
        f"duplicates={sum(duplicates.values())} duplicated_tokens={sorted(duplicates)} "
        f"resubmitted={sum(subs.resubmitted.values())} "
        f"resubmitted_tokens={sorted(subs.resubmitted)} refused_connects={subs.refused}"
    )
    assert len(messages) == MESSAGES + sum(duplicates.values())
    assert spool_entries(relay, "corrupt") == []
