"""relay.delivery.client: the SMTP client conversation, driven by scripted replies."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from relay.delivery.client import (
    TIMEOUTS,
    Capabilities,
    Command,
    ConnectionLost,
    Ending,
    Envelope,
    Hello,
    HelloFailed,
    PeerReply,
    Phase,
    Transaction,
    TransactionResult,
    TransactionStateError,
    ascii_address,
    parse_ehlo,
)
from relay.model import Outcome, RecipientResult
from relay.smtp.reply import SmtpReply

D, F, B = Outcome.DELIVERED, Outcome.DEFERRED, Outcome.BOUNCED
PLAIN = Capabilities(esmtp=True)
PIPE = Capabilities(esmtp=True, pipelining=True)
THREE = ("a@one.test", "b@two.test", "c@three.test")
BODY = None  # stands for the message content in the expected command lists

Event = PeerReply | ConnectionLost


def r(code: int, text: str = "") -> PeerReply:
    return PeerReply(code, text or {250: "Ok", 354: "Go ahead"}.get(code, "x"))


def env(*rcpts: str, sender: str = "s@relay.test", size: int = 100, **kw: bool) -> Envelope:
    return Envelope(sender, rcpts or THREE, size, **kw)


def run(
    tx: Transaction, script: Sequence[Event]
) -> tuple[list[list[str | None]], TransactionResult]:
    """Drive `tx` like the I/O layer would; returns the batches written and the result."""
    replies = list(script)
    batches: list[list[str | None]] = []
    batch = tx.start()
    while True:
        if batch:
            batches.append([c.line for c in batch])
        if tx.done:
            break
        assert tx.awaiting is not None
        batch = tx.receive(replies.pop(0))
    assert replies == [], "the machine stopped before the script ended"
    assert tx.awaiting is None
    return batches, tx.result()


def outcomes(result: TransactionResult) -> list[tuple[str, Outcome, str, str]]:
    return [(x.recipient, x.outcome, str(x.reply), x.reason) for x in result.recipients]


# -- the acceptance case: 250, 451 and 550 in one transaction ----------------------------


def test_three_recipients_three_outcomes_without_pipelining() -> None:
    script = [r(250), r(250, "2.1.5 Ok"), r(451, "4.7.1 greylisted"), r(550, "5.1.1 no such user")]
    script += [r(354), r(250, "2.0.0 Ok: queued as X")]
    batches, result = run(Transaction(env(), PLAIN), script)
    assert batches == [
        ["MAIL FROM:<s@relay.test>"],
        ["RCPT TO:<a@one.test>"],
        ["RCPT TO:<b@two.test>"],
        ["RCPT TO:<c@three.test>"],
        ["DATA"],
        [BODY],
    ]
    assert outcomes(result) == [
        ("a@one.test", D, "250 2.0.0 Ok: queued as X", "sent"),
        ("b@two.test", F, "451 4.7.1 greylisted", "remote_4xx"),
        ("c@three.test", B, "550 5.1.1 no such user", "remote_5xx"),
    ]
    assert result.ending is Ending.REUSABLE and result.reusable
    assert all(isinstance(x, RecipientResult) and x.relay == "" for x in result.recipients)


def test_three_recipients_three_outcomes_with_pipelining() -> None:
    script = [r(250), r(250), r(451, "4.7.1 greylisted"), r(550, "5.1.1 no such user")]
    script += [r(354), r(250, "2.0.0 Ok")]
    batches, result = run(Transaction(env(), PIPE), script)
    # RFC 2920 §3.1: one batch, then the message once DATA got 354.
    assert batches == [
        [
            "MAIL FROM:<s@relay.test>",
            "RCPT TO:<a@one.test>",
            "RCPT TO:<b@two.test>",
            "RCPT TO:<c@three.test>",
            "DATA",
        ],
        [BODY],
    ]
    assert [x.outcome for x in result.recipients] == [D, F, B]
    assert result.reusable


def test_awaiting_and_timeouts_follow_the_commands() -> None:
    tx = Transaction(env("a@one.test"), PIPE)
    batch = tx.start()
    assert [c.phase for c in batch] == [Phase.MAIL, Phase.RCPT, Phase.DATA]
    assert [c.timeout for c in batch] == [300.0, 300.0, 120.0]
    assert tx.awaiting == batch[0]
    assert tx.receive(r(250)) == []
    assert tx.awaiting == batch[1]
    assert tx.receive(r(250)) == []
    (message,) = tx.receive(r(354))
    assert message == Command(Phase.DATA_END, None) and message.timeout == 600.0
    assert not tx.done
    assert tx.receive(r(250)) == []
    assert tx.done


def test_rfc5321_timeouts() -> None:
    assert TIMEOUTS[Phase.GREETING] == 300  # RFC 5321 §4.5.3.2.1
    assert TIMEOUTS[Phase.MAIL] == TIMEOUTS[Phase.RCPT] == 300
    assert TIMEOUTS[Phase.DATA] == 120
    assert TIMEOUTS[Phase.DATA_BLOCK] == 180
    assert TIMEOUTS[Phase.DATA_END] == 600
    assert set(TIMEOUTS) == set(Phase)


def test_wire_encoding() -> None:
    assert Command(Phase.RCPT, "RCPT TO:<ü@ex.test>").wire() == "RCPT TO:<ü@ex.test>\r\n".encode()
    with pytest.raises(TransactionStateError):
        Command(Phase.DATA_END, None).wire()


# -- MAIL FROM parameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("caps", "envelope", "line"),
    [
        (PLAIN, env(), "MAIL FROM:<s@relay.test>"),
        (Capabilities(esmtp=True, size=1000), env(size=999), "MAIL FROM:<s@relay.test> SIZE=999"),
        (
            Capabilities(esmtp=True, size=0),
            env(size=10**9),
            "MAIL FROM:<s@relay.test> SIZE=1000000000",
        ),
        (
            Capabilities(esmtp=True, eightbitmime=True),
            env(eight_bit=True),
            "MAIL FROM:<s@relay.test> BODY=8BITMIME",
        ),
        (Capabilities(esmtp=True, eightbitmime=True), env(), "MAIL FROM:<s@relay.test>"),
        # No 8BITMIME: an 8-bit body goes as it is, undeclared (module docstring).
        (PLAIN, env(eight_bit=True), "MAIL FROM:<s@relay.test>"),
        (
            Capabilities(esmtp=True, smtputf8=True, size=0, eightbitmime=True),
            env("ü@ex.test", eight_bit=True, size=5),
            "MAIL FROM:<s@relay.test> SIZE=5 BODY=8BITMIME SMTPUTF8",
        ),
        (Capabilities(esmtp=True, smtputf8=True), env(), "MAIL FROM:<s@relay.test>"),
        (Capabilities(smtputf8=True), env(smtputf8=True), "MAIL FROM:<s@relay.test> SMTPUTF8"),
        (PLAIN, env(sender=""), "MAIL FROM:<>"),
    ],
)
def test_mail_from_parameters(caps: Capabilities, envelope: Envelope, line: str) -> None:
    assert Transaction(envelope, caps).start()[0] == Command(Phase.MAIL, line)


# -- refused before MAIL FROM ------------------------------------------------------------


def test_too_big_for_host_is_bounced_before_mail_from() -> None:
    batches, result = run(Transaction(env(size=1001), Capabilities(esmtp=True, size=1000)), [])
    assert batches == []
    assert {(x.outcome, x.reason) for x in result.recipients} == {(B, "message_too_big")}
    reply = result.recipients[0].reply
    assert (reply.code, reply.enhanced) == (552, "5.3.4")
    assert "too big for host" in reply.text
    assert result.reusable  # nothing was sent: the session can carry the next message


def test_exactly_the_size_limit_is_sent() -> None:
    tx = Transaction(env(size=1000), Capabilities(esmtp=True, size=1000))
    assert tx.start()[0].line == "MAIL FROM:<s@relay.test> SIZE=1000"


NO_UTF8_RCPT = (
    "550 5.6.7 SMTPUTF8 is required for this recipient address (its local part is not ASCII),"
    " but was not offered by host"
)
NO_UTF8_SENDER = (
    "550 5.6.7 SMTPUTF8 is required for the sender address (its local part is not ASCII),"
    " but was not offered by host"
)


@pytest.mark.parametrize(
    ("envelope", "text"),
    [
        (env("ü@ex.test"), NO_UTF8_RCPT),
        (env(sender="ö@relay.test"), NO_UTF8_SENDER),
        (env(sender="ö@bücher.test"), NO_UTF8_SENDER),
        (env(smtputf8=True), "550 5.6.7 SMTPUTF8 is required, but was not offered by host"),
    ],
)
def test_smtputf8_needed_but_not_offered_is_bounced(envelope: Envelope, text: str) -> None:
    batches, result = run(Transaction(envelope, PIPE), [])
    assert batches == []
    assert {(str(x.reply), x.outcome, x.reason) for x in result.recipients} == {
        (text, B, "smtputf8_not_offered")
    }


def test_without_smtputf8_only_non_ascii_local_parts_bounce_and_u_labels_become_a_labels() -> None:
    """RFC 6531 §3.2, issue 5 item 4: per recipient, not per message."""
    envelope = env("user@bücher.test", "jörg@bücher.test", "Ann@Straße.de", "b@two.test")
    script = [r(250), r(250), r(250), r(250), r(354), r(250, "2.0.0 Ok")]
    batches, result = run(Transaction(envelope, PIPE), script)
    assert batches == [
        [
            "MAIL FROM:<s@relay.test>",
            "RCPT TO:<user@xn--bcher-kva.test>",
            "RCPT TO:<Ann@xn--strae-oqa.de>",
            "RCPT TO:<b@two.test>",
            "DATA",
        ],
        [BODY],
    ]
    assert outcomes(result) == [
        ("user@bücher.test", D, "250 2.0.0 Ok", "sent"),
        ("jörg@bücher.test", B, NO_UTF8_RCPT, "smtputf8_not_offered"),
        ("Ann@Straße.de", D, "250 2.0.0 Ok", "sent"),
        ("b@two.test", D, "250 2.0.0 Ok", "sent"),
    ]


def test_without_smtputf8_a_u_label_sender_domain_goes_as_its_a_label() -> None:
    batches, _ = run(
        Transaction(env("b@two.test", sender="s@bücher.test"), PLAIN),
        [r(250), r(250), r(354), r(250)],
    )
    assert batches[0] == ["MAIL FROM:<s@xn--bcher-kva.test>"]
    assert batches[1] == ["RCPT TO:<b@two.test>"]


def test_with_smtputf8_addresses_go_as_they_are() -> None:
    caps = Capabilities(esmtp=True, pipelining=True, smtputf8=True)
    (mail, rcpt, _) = Transaction(env("user@bücher.test", sender="ö@relay.test"), caps).start()
    assert mail.line == "MAIL FROM:<ö@relay.test> SMTPUTF8"
    assert rcpt.line == "RCPT TO:<user@bücher.test>"


def test_without_smtputf8_a_domain_with_no_a_label_bounces_that_recipient() -> None:
    # U+00AD (soft hyphen) is DISALLOWED in IDNA 2008: no A-label exists.
    batches, result = run(
        Transaction(env("u@b\xadad.test", "b@two.test"), PLAIN), [r(250), r(250), r(354), r(250)]
    )
    assert ["RCPT TO:<b@two.test>"] in batches
    assert [(x.outcome, x.reason) for x in result.recipients] == [
        (B, "smtputf8_not_offered"),
        (D, "sent"),
    ]


@pytest.mark.parametrize(
    ("address", "wire"),
    [
        ("user@bücher.test", "user@xn--bcher-kva.test"),
        ("user@sub.BÜCHER.test", "user@sub.xn--bcher-kva.test"),
        ("User@Example.TEST", "User@Example.TEST"),  # ASCII: unchanged
        ("jörg@bücher.test", None),
        ("jörg", None),
        ("u@b\xadad.test", None),
        ("", ""),
    ],
)
def test_ascii_address(address: str, wire: str | None) -> None:
    assert ascii_address(address) == wire


def test_addresses_that_cannot_go_on_the_wire() -> None:
    _, result = run(Transaction(env(sender="s\r\n@x.test"), PIPE), [])
    assert {(x.reply.enhanced, x.reason) for x in result.recipients} == {("5.1.3", "bad_address")}
    batches, result = run(
        Transaction(env("a@one.test", "b\n@two.test"), PLAIN), [r(250), r(250), r(354), r(250)]
    )
    assert ["RCPT TO:<b\n@two.test>"] not in batches
    assert [(x.outcome, x.reason) for x in result.recipients] == [(D, "sent"), (B, "bad_address")]
    _, result = run(Transaction(env("b\x00@two.test"), PLAIN), [])
    assert [x.reason for x in result.recipients] == ["bad_address"]


# -- MAIL FROM refused ---------------------------------------------------------------------


@pytest.mark.parametrize(("code", "outcome"), [(451, F), (550, B), (553, B), (452, F)])
def test_mail_from_refused_without_pipelining(code: int, outcome: Outcome) -> None:
    batches, result = run(Transaction(env(), PLAIN), [r(code, "sender refused")])
    assert batches == [["MAIL FROM:<s@relay.test>"]]
    assert {(x.outcome, x.reply.code, x.reason) for x in result.recipients} == {
        (outcome, code, "mail_from")
    }
    assert result.reusable


def test_mail_from_refused_with_pipelining_reads_the_rest() -> None:
    script = [r(550, "5.7.1 no"), r(503), r(503), r(503), r(503, "5.5.1 no valid recipients")]
    batches, result = run(Transaction(env(), PIPE), script)
    assert len(batches) == 1
    assert {(x.outcome, str(x.reply)) for x in result.recipients} == {(B, "550 5.7.1 no")}
    assert result.reusable


def test_mail_from_refused_with_pipelining_and_a_354() -> None:
    script = [r(451), r(250), r(354), r(250)]
    batches, result = run(Transaction(env("a@one.test"), PIPE), script)
    assert batches[1] == ["."]  # no message content, just the end of an empty one
    assert [x.outcome for x in result.recipients] == [F]
    assert result.ending is Ending.QUIT


# -- no accepted recipient -----------------------------------------------------------------


def test_no_accepted_recipient_without_pipelining_sends_no_data() -> None:
    script = [r(250), r(550, "5.1.1 a"), r(450, "4.2.0 b"), r(550, "5.1.1 c")]
    batches, result = run(Transaction(env(), PLAIN), script)
    assert ["DATA"] not in batches and len(batches) == 4
    assert [x.outcome for x in result.recipients] == [B, F, B]
    assert [str(x.reply) for x in result.recipients] == [
        "550 5.1.1 a",
        "450 4.2.0 b",
        "550 5.1.1 c",
    ]
    assert result.reusable


@pytest.mark.parametrize("data_reply", [r(554, "5.5.1 no valid recipients"), r(503)])
def test_no_accepted_recipient_with_pipelining_expects_data_refused(data_reply: PeerReply) -> None:
    script = [r(250), r(550, "5.1.1 a"), r(450, "4.2.0 b"), r(550, "5.1.1 c"), data_reply]
    batches, result = run(Transaction(env(), PIPE), script)
    assert len(batches) == 1  # RFC 2920 §3.1: nothing more is sent
    assert [x.outcome for x in result.recipients] == [B, F, B]
    assert [str(x.reply) for x in result.recipients] == [
        "550 5.1.1 a",
        "450 4.2.0 b",
        "550 5.1.1 c",
    ]
    assert result.reusable


def test_no_accepted_recipient_with_pipelining_but_354() -> None:
    script = [r(250), r(550), r(354), r(250)]
    batches, result = run(Transaction(env("a@one.test"), PIPE), script)
    assert batches[1] == ["."]
    assert [x.outcome for x in result.recipients] == [B]
    assert result.ending is Ending.QUIT and not result.reusable


def test_552_to_rcpt_is_taken_as_452() -> None:
    script = [r(250), r(250), r(552, "5.5.3 too many recipients"), r(552), r(354), r(250)]
    _, result = run(Transaction(env(), PIPE), script)
    assert [(x.outcome, str(x.reply)) for x in result.recipients] == [
        (D, "250 2.0.0 Ok"),
        (F, "452 4.5.3 too many recipients"),
        (F, "452 4.0.0 x"),
    ]


# -- DATA and the final reply --------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "outcome", "reason"), [(451, F, "remote_4xx"), (554, B, "remote_5xx")]
)
def test_data_refused(code: int, outcome: Outcome, reason: str) -> None:
    script = [r(250), r(250), r(550), r(code, "no data")]
    _, result = run(Transaction(env("a@one.test", "b@two.test"), PLAIN), script)
    assert [(x.outcome, x.reply.code, x.reason) for x in result.recipients] == [
        (outcome, code, reason),
        (B, 550, "remote_5xx"),
    ]


def test_a_2xx_to_data_is_not_a_delivery() -> None:
    _, result = run(Transaction(env("a@one.test"), PLAIN), [r(250), r(250), r(250)])
    assert [x.outcome for x in result.recipients] == [F]


@pytest.mark.parametrize(
    ("code", "outcome", "reason"),
    [(250, D, "sent"), (452, F, "remote_4xx"), (552, B, "remote_5xx")],
)
def test_final_reply_applies_to_accepted_recipients(
    code: int, outcome: Outcome, reason: str
) -> None:
    script = [r(250), r(251, "will forward"), r(250), r(354), r(code, "final")]
    _, result = run(Transaction(env("a@one.test", "b@two.test"), PIPE), script)
    assert {(x.outcome, x.reply.code, x.reason) for x in result.recipients} == {
        (outcome, code, reason)
    }
    assert result.reusable


# -- 421 and a lost connection -------------------------------------------------------------


def test_421_after_rcpt_defers_the_rest() -> None:
    script = [r(250), r(250), r(550, "5.1.1 no"), r(421, "4.3.2 shutting down")]
    batches, result = run(Transaction(env(), PLAIN), script)
    assert batches[-1] == ["RCPT TO:<c@three.test>"]
    assert outcomes(result) == [
        ("a@one.test", F, "421 4.3.2 shutting down", "remote_4xx"),
        ("b@two.test", B, "550 5.1.1 no", "remote_5xx"),
        ("c@three.test", F, "421 4.3.2 shutting down", "remote_4xx"),
    ]
    assert result.ending is Ending.CLOSE and not result.reusable


def test_421_in_a_pipelined_batch_stops_reading() -> None:
    script = [r(250), r(250), r(421, "4.4.2 bye")]
    batches, result = run(Transaction(env(), PIPE), script)
    assert len(batches) == 1
    assert [x.outcome for x in result.recipients] == [F, F, F]
    assert {x.reply.code for x in result.recipients} == {421}
    assert result.ending is Ending.CLOSE


@pytest.mark.parametrize("step", [0, 1, 4, 5])
def test_421_anywhere_closes(step: int) -> None:
    replies: list[Event] = [r(250), r(250), r(250), r(250), r(354)]
    script = replies[:step]
    script.append(r(421))
    _, result = run(Transaction(env(), PLAIN), script)
    assert result.ending is Ending.CLOSE
    assert {x.outcome for x in result.recipients} == {F}


def test_connection_lost_after_data() -> None:
    script: list[Event] = [r(250), r(250), r(250), r(550), r(354), ConnectionLost()]
    batches, result = run(Transaction(env(), PIPE), script)
    assert batches[-1] == [BODY]
    assert outcomes(result) == [
        (
            "a@one.test",
            F,
            "451 4.4.2 lost connection after end of data (message may be sent more than once)",
            "connection_lost",
        ),
        ("b@two.test", F, outcomes(result)[0][2], "connection_lost"),
        ("c@three.test", B, "550 5.0.0 x", "remote_5xx"),
    ]
    assert result.ending is Ending.CLOSE


def test_timeout_while_waiting_for_rcpt() -> None:
    script: list[Event] = [r(250), r(250), ConnectionLost(timed_out=True)]
    _, result = run(Transaction(env(), PLAIN), script)
    assert {(str(x.reply), x.reason) for x in result.recipients} == {
        ("451 4.4.2 conversation timed out after RCPT TO", "timeout")
    }
    assert not result.reusable


# -- enhanced status codes -----------------------------------------------------------------


def test_enhanced_codes_kept_when_present_and_defaulted_when_absent() -> None:
    script = [r(250), r(250, "Ok"), r(450, "mailbox busy"), r(550, "no such user")]
    script += [r(354), r(250, "queued")]
    _, result = run(Transaction(env(), PLAIN), script)
    assert [x.reply for x in result.recipients] == [
        SmtpReply(250, "2.0.0", "queued"),
        SmtpReply(450, "4.0.0", "mailbox busy"),
        SmtpReply(550, "5.0.0", "no such user"),
    ]
    script = [r(250), r(250), r(452, "4.2.2 full"), r(550, "5.7.1 relay denied")]
    script += [r(354), r(250, "2.6.0 queued")]
    _, result = run(Transaction(env(), PLAIN), script)
    assert [x.reply.enhanced for x in result.recipients] == ["2.6.0", "4.2.2", "5.7.1"]


# -- EHLO / HELO -------------------------------------------------------------------------


def test_parse_ehlo() -> None:
    caps = parse_ehlo(
        "mx.example.test Hello\nPIPELINING\nSIZE 10240000\n8BITMIME\nSMTPUTF8\n"
        "ENHANCEDSTATUSCODES\nSTARTTLS\nCHUNKING\nAUTH PLAIN"
    )
    assert caps == Capabilities(
        esmtp=True,
        pipelining=True,
        size=10240000,
        eightbitmime=True,
        smtputf8=True,
        enhancedstatuscodes=True,
        starttls=True,
    )
    assert parse_ehlo("mx.example.test") == Capabilities(esmtp=True)
    assert parse_ehlo("mx\nsize").size == 0
    assert parse_ehlo("mx\nSIZE nonsense").size == 0
    # The greeting line is not a keyword, even if it looks like one.
    assert not parse_ehlo("PIPELINING").pipelining


def test_ehlo_accepted() -> None:
    hello = Hello("relay.test")
    assert hello.start() == Command(Phase.HELLO, "EHLO relay.test")
    caps = hello.receive(r(250, "mx.test\nPIPELINING"))
    assert caps == Capabilities(esmtp=True, pipelining=True)


@pytest.mark.parametrize("code", [500, 502, 550])
def test_ehlo_refused_falls_back_to_helo(code: int) -> None:
    hello = Hello("relay.test")
    hello.start()
    assert hello.receive(r(code, "what?")) == Command(Phase.HELLO, "HELO relay.test")
    caps = hello.receive(r(250, "mx.test\nPIPELINING"))
    assert caps == Capabilities()  # no extensions after HELO
    assert isinstance(caps, Capabilities)
    script = [r(250), r(250), r(354), r(250)]
    batches, result = run(Transaction(env("a@one.test", eight_bit=True, size=10), caps), script)
    # No SIZE, BODY or pipelining after HELO: one command at a time, no parameters.
    assert batches == [["MAIL FROM:<s@relay.test>"], ["RCPT TO:<a@one.test>"], ["DATA"], [BODY]]
    assert [x.outcome for x in result.recipients] == [D]


def test_helo_refused_too() -> None:
    hello = Hello("relay.test")
    hello.start()
    hello.receive(r(502))
    assert hello.receive(r(550, "5.7.1 go away")) == HelloFailed(SmtpReply(550, "5.7.1", "go away"))


@pytest.mark.parametrize(("code", "text"), [(421, "4.3.2 closing"), (451, "try later")])
def test_ehlo_4xx_is_a_temporary_host_failure(code: int, text: str) -> None:
    hello = Hello("relay.test")
    hello.start()
    failed = hello.receive(r(code, text))
    assert isinstance(failed, HelloFailed) and failed.reply.is_transient


def test_connection_lost_during_hello() -> None:
    hello = Hello("relay.test")
    hello.start()
    assert hello.receive(ConnectionLost()) == HelloFailed(
        SmtpReply(451, "4.4.2", "lost connection after EHLO")
    )


# -- driven out of order -----------------------------------------------------------------


def test_misuse_is_a_state_error() -> None:
    tx = Transaction(env(), PLAIN)
    with pytest.raises(TransactionStateError):
        tx.receive(r(250))
    with pytest.raises(TransactionStateError):
        tx.result()
    tx.start()
    with pytest.raises(TransactionStateError):
        tx.start()
    tx.receive(r(550))
    with pytest.raises(TransactionStateError):
        tx.receive(r(250))
    with pytest.raises(TransactionStateError):
        Hello("x").receive(r(250))
