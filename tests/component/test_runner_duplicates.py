"""The queue runner with a record that lists one mailbox twice (an old spool file, from
before inbound kept a repeated RCPT once): one delivery, one outcome for every listing,
one DSN entry (issue 5 review). Runner, spool and fakes as in test_runner."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from test_runner import DSN_DEFERRED, RELAY, SENT, UNKNOWN, Script, commit, dsn_parts, running

from relay.model import Outcome, RecipientResult
from relay.smtp.reply import SmtpReply
from relay.spool.records import RecipientStatus

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


def one_result_per_mailbox(outcome: Outcome, reply: SmtpReply, seen: list[list[str]]) -> Script:
    """Every recipient handed over gets `outcome`; `seen` records what each delivery of
    the original message was handed (DSNs stay deferred)."""

    def script(qid: str, sender: str, rcpts: Sequence[str]) -> list[RecipientResult]:
        if sender == "":
            return DSN_DEFERRED(qid, sender, rcpts)
        seen.append(list(rcpts))
        return [RecipientResult(r, outcome, reply, RELAY, "x") for r in rcpts]

    return script


async def test_a_mailbox_listed_twice_is_delivered_once_and_both_listings_are_done(
    tmp_path: Path,
) -> None:
    seen: list[list[str]] = []
    script = one_result_per_mailbox(Outcome.DELIVERED, SENT, seen)
    async with running(tmp_path, script) as (runner, store, _, _metrics, _clock):
        msg = commit(
            store, "bob@example.net", "carol@example.net", "bob@EXAMPLE.net", "bob@example.net"
        )
        runner.submit(msg)
        await store.until(lambda: ("remove", msg.queue_id) in store.ops)
    assert seen == [["bob@example.net", "carol@example.net"]]


async def test_a_deferred_mailbox_listed_twice_records_the_one_outcome_on_each_listing(
    tmp_path: Path,
) -> None:
    seen: list[list[str]] = []
    deferred = SmtpReply(451, "4.4.1", "Connection failed")
    script = one_result_per_mailbox(Outcome.DEFERRED, deferred, seen)
    async with running(tmp_path, script) as (runner, store, _, _metrics, _clock):
        msg = commit(store, "bob@example.net", "bob@Example.NET")
        runner.submit(msg)
        await store.until(lambda: ("update", msg.queue_id) in store.ops)
        states = store.envelope(msg.queue_id).recipients
    assert seen == [["bob@example.net"]]
    assert [(s.address, s.status, s.attempts, s.last_reply) for s in states] == [
        ("bob@example.net", RecipientStatus.PENDING, 1, "451 4.4.1 Connection failed"),
        ("bob@Example.NET", RecipientStatus.PENDING, 1, "451 4.4.1 Connection failed"),
    ]


async def test_a_bounced_mailbox_listed_twice_is_named_once_in_the_dsn(tmp_path: Path) -> None:
    seen: list[list[str]] = []
    script = one_result_per_mailbox(Outcome.BOUNCED, UNKNOWN, seen)
    async with running(tmp_path, script) as (runner, store, _, metrics, _clock):
        msg = commit(store, "bob@example.net", "bob@example.net")
        runner.submit(msg)
        await store.until(lambda: ("remove", msg.queue_id) in store.ops)
        (dsn_id,) = [q for op, q in store.ops if op == "commit" and q != msg.queue_id]
        parts = dsn_parts(store.read_body(dsn_id))
    assert seen == [["bob@example.net"]]
    finals = [p["Final-Recipient"] for p in parts if p["Final-Recipient"]]
    assert finals == ["rfc822; bob@example.net"]
    assert metrics.registry.get_sample_value("dane_relay_bounces_generated_total") == 1
