"""relay.spool.records: the optional "held" and "delay_warned" keys of format version 1,
and relay.spool.admin's record changes."""

from __future__ import annotations

import json

import pytest

from relay.spool.admin import flushable, on_hold, released
from relay.spool.records import (
    QueuedMessage,
    RecipientState,
    RecipientStatus,
    dump,
    from_doc,
    load,
    to_doc,
)

QID = "0123456789ABCDEF0123"


def message(**changes: object) -> QueuedMessage:
    fields: dict[str, object] = {
        "queue_id": QID,
        "sender": "alice@example.org",
        "recipients": (RecipientState("bob@example.net"),),
        "received": 1_700_000_000.0,
        "next_attempt": 1_700_000_300.0,
        "attempts": 1,
    }
    fields.update(changes)
    return QueuedMessage(**fields)  # type: ignore[arg-type]


def test_flags_are_absent_from_the_record_while_false() -> None:
    doc = json.loads(dump(message()))
    assert "held" not in doc and "delay_warned" not in doc
    assert load(dump(message())) == message()


@pytest.mark.parametrize("key", ["held", "delay_warned"])
def test_a_flag_is_written_when_true_and_read_back(key: str) -> None:
    msg = message(**{key: True})
    assert json.loads(dump(msg))[key] is True
    assert load(dump(msg)) == msg


@pytest.mark.parametrize("key", ["held", "delay_warned"])
@pytest.mark.parametrize("bad", [1, "yes", None])
def test_a_flag_that_is_not_a_boolean_is_refused(key: str, bad: object) -> None:
    doc = to_doc(message())
    doc[key] = bad
    with pytest.raises(ValueError, match="expected true or false"):
        from_doc(doc)


def test_to_doc_and_from_doc_are_inverses() -> None:
    msg = message(held=True, delay_warned=True)
    assert from_doc(json.loads(json.dumps(to_doc(msg)))) == msg


def test_from_doc_refuses_what_is_not_a_record() -> None:
    with pytest.raises(ValueError, match="envelope record is not an object"):
        from_doc([1, 2])


def test_hold_release_and_flushable() -> None:
    msg = message()
    assert on_hold(msg) == message(held=True)
    assert released(on_hold(msg), 1_700_000_050.0) == message(next_attempt=1_700_000_050.0)
    assert flushable(msg, 1_700_000_000.0)
    assert not flushable(msg, 1_700_000_300.0)  # due already
    assert not flushable(on_hold(msg), 1_700_000_000.0)
    delivered = message(recipients=(RecipientState("b@x.net", RecipientStatus.DELIVERED),))
    assert not flushable(delivered, 1_700_000_000.0)
