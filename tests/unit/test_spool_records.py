"""relay.spool.records: the versioned on-disk envelope format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.model import Outcome, Step
from relay.spool.records import (
    FORMAT_VERSION,
    HISTORY_KEPT,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
    dump,
    load,
    valid_queue_id,
)

SPOOL_V1 = Path(__file__).resolve().parents[1] / "data" / "spool_v1"
QID = "0123456789ABCDEF01234567"
DANE_FAILED = Step(
    time=1700000000.5,
    outcome=Outcome.DEFERRED,
    reply="451 4.7.5 Server certificate not verified (no-match)",
    host="mx1.example.com",
    address="192.0.2.1",
    port=25,
    tls="encrypted",
    dane="fail reason=no-match",
)
SENT = Step(
    time=1700000001.0,
    outcome=Outcome.DELIVERED,
    reply="250 2.0.0 Ok",
    host="mx2.example.com",
    address="2001:db8::2",
    port=25,
    tls="verified",
    dane="pass reason=match",
)


def message(**changes: Any) -> QueuedMessage:
    fields: dict[str, Any] = {
        "queue_id": QID,
        "sender": "alice@example.org",
        "recipients": (
            RecipientState("bob@example.net"),
            RecipientState(
                "carol@example.com",
                RecipientStatus.DELIVERED,
                attempts=1,
                last_reply="250 2.0.0 Ok",
                last_relay="mx2.example.com[2001:db8::2]:25",
                history=(DANE_FAILED, SENT),
            ),
        ),
        "received": 1700000000.25,
        "next_attempt": 1700000300.25,
        "client": "192.0.2.7",
        "helo": "client.example.org",
        "size": 42,
        "attempts": 1,
    }
    fields.update(changes)
    return QueuedMessage(**fields)


def document(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(dump(message()))
    doc.update(changes)
    return doc


def encode(doc: object) -> bytes:
    return json.dumps(doc).encode()


# -- the format ----------------------------------------------------------------------------


def test_dump_is_the_documented_json() -> None:
    assert json.loads(dump(message())) == {
        "version": 1,
        "queue_id": QID,
        "sender": "alice@example.org",
        "recipients": [
            {
                "address": "bob@example.net",
                "status": "pending",
                "attempts": 0,
                "last_reply": "",
                "last_relay": "",
                "history": [],
                "history_dropped": 0,
            },
            {
                "address": "carol@example.com",
                "status": "delivered",
                "attempts": 1,
                "last_reply": "250 2.0.0 Ok",
                "last_relay": "mx2.example.com[2001:db8::2]:25",
                "history": [
                    {
                        "time": 1700000000.5,
                        "outcome": "deferred",
                        "reply": "451 4.7.5 Server certificate not verified (no-match)",
                        "host": "mx1.example.com",
                        "address": "192.0.2.1",
                        "port": 25,
                        "tls": "encrypted",
                        "dane": "fail reason=no-match",
                    },
                    {
                        "time": 1700000001.0,
                        "outcome": "delivered",
                        "reply": "250 2.0.0 Ok",
                        "host": "mx2.example.com",
                        "address": "2001:db8::2",
                        "port": 25,
                        "tls": "verified",
                        "dane": "pass reason=match",
                    },
                ],
                "history_dropped": 0,
            },
        ],
        "received": 1700000000.25,
        "next_attempt": 1700000300.25,
        "client": "192.0.2.7",
        "helo": "client.example.org",
        "size": 42,
        "attempts": 1,
        "is_bounce": False,
        "extra": {},
    }


def test_dump_is_deterministic_and_compact() -> None:
    raw = dump(message())
    assert raw == dump(message())
    assert raw.startswith(b'{"attempts":1,"client":"192.0.2.7",')
    assert b'", "' not in raw and b'": ' not in raw


def test_round_trip() -> None:
    msg = message(is_bounce=True, sender="", extra={"dsn": {"notify": ["FAILURE"]}})
    assert load(dump(msg)) == msg


def test_pending_and_done() -> None:
    msg = message()
    assert [r.address for r in msg.pending] == ["bob@example.net"]
    assert not msg.done
    finished = msg.with_recipients(
        tuple(
            RecipientState(r.address, RecipientStatus.BOUNCED)
            if r.status is RecipientStatus.PENDING
            else r
            for r in msg.recipients
        )
    )
    assert finished.pending == ()
    assert finished.done


def test_frozen_v1_records_still_load() -> None:
    paths = sorted(SPOOL_V1.glob("*.env"))
    assert paths, f"no fixtures in {SPOOL_V1}"
    msg = load((SPOOL_V1 / "0000000000001F4A2B3C4D5E.env").read_bytes())
    assert msg == QueuedMessage(
        queue_id="0000000000001F4A2B3C4D5E",
        sender="sender@client.example",
        recipients=(
            RecipientState(
                "a@secure.example",
                RecipientStatus.PENDING,
                2,
                "451 4.7.5 Server certificate not verified (no-match)",
                "mx1.secure.example[192.0.2.25]:25",
            ),
            RecipientState(
                "b@other.example",
                RecipientStatus.DELIVERED,
                1,
                "250 2.0.0 Ok",
                "mx.other.example[198.51.100.7]:25",
            ),
            # last_relay was added after v1's first records: it may be missing.
            # So may history and history_dropped (added later still): an empty history.
            RecipientState("c@other.example", RecipientStatus.BOUNCED, 1, "550 5.1.1 user unknown"),
        ),
        received=1700000000.0,
        next_attempt=1700001200.5,
        client="192.0.2.10",
        helo="client.example",
        size=1234,
        attempts=2,
        is_bounce=False,
        extra={"note": "frozen v1 record"},
    )
    for path in paths:
        assert load(path.read_bytes()).queue_id == path.stem


# -- property: dump and load are inverses --------------------------------------------------

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False)
    | st.text()
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
steps = st.builds(
    Step,
    time=st.floats(allow_nan=False, allow_infinity=False),
    outcome=st.sampled_from(Outcome),
    reply=st.text(),
    host=st.text(),
    address=st.text(),
    port=st.integers(min_value=0, max_value=65535),
    tls=st.text(),
    dane=st.text(),
)
recipient_states = st.builds(
    RecipientState,
    address=st.text(),
    status=st.sampled_from(RecipientStatus),
    attempts=st.integers(min_value=0, max_value=2**40),
    last_reply=st.text(),
    last_relay=st.text(),
    history=st.lists(steps, max_size=3).map(tuple),
    history_dropped=st.integers(min_value=0, max_value=2**40),
)
messages = st.builds(
    QueuedMessage,
    queue_id=st.from_regex(r"\A[0-9A-F]{10,32}\Z"),
    sender=st.text(),
    recipients=st.lists(recipient_states, max_size=6).map(tuple),
    received=st.floats(allow_nan=False, allow_infinity=False),
    next_attempt=st.floats(allow_nan=False, allow_infinity=False),
    client=st.text(),
    helo=st.text(),
    size=st.integers(min_value=0, max_value=2**40),
    attempts=st.integers(min_value=0, max_value=2**20),
    is_bounce=st.booleans(),
    extra=st.dictionaries(st.text(), json_value, max_size=4),
)


@settings(max_examples=100, deadline=None)
@given(messages)
def test_dump_load_round_trip_property(msg: QueuedMessage) -> None:
    raw = dump(msg)
    assert raw.isascii()  # lone surrogates and control characters are escaped
    assert load(raw) == msg
    assert dump(load(raw)) == raw


# -- rejection -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, "1", None, 1.5, True])
def test_rejects_other_versions(version: object) -> None:
    with pytest.raises(ValueError, match="version"):
        load(encode(document(version=version)))


def test_rejects_missing_version() -> None:
    doc = document()
    del doc["version"]
    with pytest.raises(ValueError, match="version"):
        load(encode(doc))


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[]", b'"x"', b"null", b"\xff\xfe{}", b"1"],
    ids=["empty", "truncated", "list", "string", "null", "not-utf8", "number"],
)
def test_rejects_non_records(raw: bytes) -> None:
    with pytest.raises(ValueError):
        load(raw)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("queue_id", 12345678901),
        ("sender", None),
        ("sender", ["a@b"]),
        ("recipients", "bob@example.net"),
        ("recipients", [{"address": "x@y"}]),
        ("recipients", [{"address": 5, "status": "pending", "attempts": 0, "last_reply": ""}]),
        ("recipients", [{"address": "x@y", "status": "gone", "attempts": 0, "last_reply": ""}]),
        (
            "recipients",
            [{"address": "x@y", "status": "pending", "attempts": "0", "last_reply": ""}],
        ),
        (
            "recipients",
            [{"address": "x@y", "status": "pending", "attempts": True, "last_reply": ""}],
        ),
        ("recipients", [{"address": "x@y", "status": "pending", "attempts": 0, "last_reply": 5}]),
        ("received", "1700000000"),
        ("received", True),
        ("next_attempt", None),
        ("client", 7),
        ("helo", None),
        ("size", 1.5),
        ("size", False),
        ("attempts", "1"),
        ("is_bounce", "no"),
        ("is_bounce", 0),
        ("is_bounce", None),
        ("extra", []),
        ("extra", "x"),
    ],
)
def test_rejects_wrong_types(key: str, value: object) -> None:
    with pytest.raises(ValueError):
        load(encode(document(**{key: value})))


@pytest.mark.parametrize(
    "key", ["queue_id", "sender", "recipients", "received", "next_attempt", "is_bounce", "size"]
)
def test_rejects_missing_fields(key: str) -> None:
    doc = document()
    del doc[key]
    with pytest.raises(ValueError, match="malformed envelope record"):
        load(encode(doc))


@pytest.mark.parametrize(
    "qid",
    [
        "",
        "0123456789abcdef",  # lower case
        "012345678",  # too short
        "0" * 33,  # too long
        "0123456789ABCDEG",
        "../0123456789ABCDEF",
        "0123456789ABCDEF\n",  # a trailing newline must not pass a "$" anchor
        "0123456789ABCDEF/",
    ],
)
def test_rejects_bad_queue_ids(qid: str) -> None:
    assert not valid_queue_id(qid)
    with pytest.raises(ValueError, match="bad queue id"):
        load(encode(document(queue_id=qid)))


@pytest.mark.parametrize("qid", ["0123456789", "0" * 32, "0123456789ABCDEF01234567"])
def test_valid_queue_ids(qid: str) -> None:
    assert valid_queue_id(qid)


def test_format_version_is_1() -> None:
    assert FORMAT_VERSION == 1


# -- attempt history -------------------------------------------------------------------------


def carol(**changes: Any) -> dict[str, Any]:
    """The record's second recipient (with a two-step history), changed."""
    recipient: dict[str, Any] = document()["recipients"][1]
    recipient.update(changes)
    return recipient


def step_doc(**changes: Any) -> dict[str, Any]:
    step: dict[str, Any] = carol()["history"][0]
    step.update(changes)
    return step


def test_history_round_trips_in_order() -> None:
    msg = load(dump(message()))
    assert msg.recipients[1].history == (DANE_FAILED, SENT)
    assert msg.recipients[1].history[0].where == "mx1.example.com[192.0.2.1]:25"
    assert msg.recipients[1].history[1].where == "mx2.example.com[2001:db8::2]:25"


def test_step_without_a_connection_round_trips() -> None:
    lookup = Step(1700000000.0, Outcome.DEFERRED, "451 4.4.3 MX lookup failed")
    tlsa = Step(1700000000.0, Outcome.DEFERRED, "451 4.7.5 TLSA lookup error", host="mx.x.test")
    msg = message(recipients=(RecipientState("a@x.test", history=(lookup, tlsa)),))
    assert load(dump(msg)) == msg
    assert (lookup.where, lookup.port, tlsa.where) == ("-", 0, "mx.x.test")


def test_record_without_history_keys_loads_with_an_empty_history() -> None:
    doc = document()
    for recipient in doc["recipients"]:
        del recipient["history"], recipient["history_dropped"]
    loaded = load(encode(doc))
    assert [(r.history, r.history_dropped) for r in loaded.recipients] == [((), 0), ((), 0)]


@pytest.mark.parametrize(
    "recipient",
    [
        carol(history="mx1"),
        carol(history={"time": 1}),
        carol(history=None),
        carol(history=["mx1"]),
        carol(history=[step_doc(time="1700000000")]),
        carol(history=[step_doc(time=True)]),
        carol(history=[step_doc(outcome="lost")]),
        carol(history=[step_doc(outcome=None)]),
        carol(history=[step_doc(reply=451)]),
        carol(history=[step_doc(host=None)]),
        carol(history=[step_doc(address=["192.0.2.1"])]),
        carol(history=[step_doc(port="25")]),
        carol(history=[step_doc(port=25.0)]),
        carol(history=[step_doc(port=-1)]),
        carol(history=[step_doc(port=65536)]),
        carol(history=[step_doc(tls=1)]),
        carol(history=[step_doc(dane=False)]),
        carol(history_dropped="3"),
        carol(history_dropped=-1),
        carol(history_dropped=1.0),
        carol(history_dropped=None),
    ],
)
def test_rejects_malformed_history(recipient: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        load(encode(document(recipients=[recipient])))


@pytest.mark.parametrize(
    "key", ["time", "outcome", "reply", "host", "address", "port", "tls", "dane"]
)
def test_rejects_a_step_without_a_field(key: str) -> None:
    step = step_doc()
    del step[key]
    with pytest.raises(ValueError, match="malformed envelope record"):
        load(encode(document(recipients=[carol(history=[step])])))


def numbered(n: int) -> Step:
    return Step(1700000000.0 + n, Outcome.DEFERRED, f"451 4.4.1 refused #{n}", host="mx.x.test")


def test_history_is_kept_whole_up_to_the_bound() -> None:
    assert HISTORY_KEPT == 20
    state = RecipientState("a@x.test").with_steps(numbered(n) for n in range(21))
    assert [s.reply for s in state.history] == [f"451 4.4.1 refused #{n}" for n in range(21)]
    assert state.history_dropped == 0


def test_history_keeps_the_first_and_the_most_recent_steps() -> None:
    state = RecipientState("a@x.test")
    for attempt in range(5):  # five attempts of ten steps each
        state = state.with_steps(numbered(10 * attempt + n) for n in range(10))
    assert len(state.history) == 21
    assert state.history[0] == numbered(0)
    assert state.history[1:] == tuple(numbered(n) for n in range(30, 50))
    assert state.history_dropped == 29
    # The bound holds on disk too, and the count survives a round trip.
    msg = load(dump(message(recipients=(state,))))
    assert msg.recipients[0].history_dropped == 29
    again = msg.recipients[0].with_steps([numbered(50)])
    assert again.history[0] == numbered(0)
    assert again.history[-2:] == (numbered(49), numbered(50))
    assert again.history_dropped == 30


def test_no_steps_change_nothing() -> None:
    state = RecipientState("a@x.test", history=(DANE_FAILED,))
    assert state.with_steps([]) == state
