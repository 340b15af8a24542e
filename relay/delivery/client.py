"""The outbound SMTP conversation as pure protocol logic (sans-I/O, h11-style).

Contract: this module owns every SMTP client decision from EHLO to the end of one mail
transaction, and nothing else. It never reads or writes a socket, never sleeps, never
raises for anything a peer says: peer replies and a lost connection are *inputs*, commands
and per-recipient results are *outputs*. `TransactionStateError` is raised only when the
caller drives a machine out of order (a bug in the caller).

Theory of operation:

- `Hello(name)`: `start()` gives the EHLO command; `receive(reply)` gives the next command
  (HELO after a refused EHLO), the peer's `Capabilities`, or a `HelloFailed` (host-scoped
  failure; the reply says whether it was temporary). `parse_ehlo()` reads the keywords.
- `Transaction(envelope, capabilities)`: `start()` gives the first batch of commands
  (possibly empty: the message was refused locally, e.g. too big or SMTPUTF8 missing);
  each `receive(reply | ConnectionLost)` consumes the reply to the oldest command still
  awaiting one (`awaiting`) and gives the next batch to write, in order. With PIPELINING
  the batch is MAIL, every RCPT and DATA (RFC 2920 §3.1), otherwise one command. A
  `Command` whose `line` is None stands for the message content: the I/O layer writes the
  dot-stuffed body and the end-of-data marker, each write bounded by
  `TIMEOUTS[Phase.DATA_BLOCK]`. When `done`, `result()` gives one `RecipientResult` per
  recipient (envelope order; `relay` left empty for the caller) and an `Ending`.
- Every command carries its `Phase`; `TIMEOUTS` maps phases to the RFC 5321 §4.5.3.2
  reply timeouts (seconds), the defaults a configuration may override.

Replies: enhanced status codes (RFC 3463) are split off when present, else "X.0.0" by
reply class, as Postfix's smtp_chat does (`SmtpReply.from_peer`). An 8-bit body to a peer
without 8BITMIME is sent as it is, without BODY=8BITMIME: no conversion (Postfix converts
8-bit MIME parts to quoted-printable for such a peer); MIME downgrade is out of scope.

SMTPUTF8 (RFC 6531): to a peer that offers it, MAIL FROM carries SMTPUTF8 when the message
asked for it or an address is not ASCII, and addresses go as they are. To a peer that does
not (§3.2), the decision is per address: a U-label domain goes as its A-label
(`ascii_address`, IDNA 2008), a recipient whose local part is not ASCII is bounced alone
(5.6.7) while the others are sent, and a sender whose local part is not ASCII bounces
every recipient. The message content (UTF-8 header fields included) is sent unchanged
either way. The relay's own replies use 4.4.2 for a lost connection or timeout (Postfix
smtp_trouble), 5.3.4 for SIZE and 5.6.7 for SMTPUTF8.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from relay.model import Outcome, RecipientResult
from relay.smtp.address import wire_safe
from relay.smtp.domain import DomainSyntaxError, ascii_domain
from relay.smtp.reply import SmtpReply

__all__ = [
    "TIMEOUTS",
    "Capabilities",
    "Command",
    "ConnectionLost",
    "Ending",
    "Envelope",
    "Hello",
    "HelloFailed",
    "Phase",
    "PeerReply",
    "Transaction",
    "TransactionResult",
    "TransactionStateError",
    "ascii_address",
    "parse_ehlo",
]


class Phase(enum.Enum):
    """Which reply timeout applies to a command (RFC 5321 §4.5.3.2)."""

    GREETING = "greeting"  # §4.5.3.2.1 initial 220: 5 minutes
    HELLO = "hello"  # no RFC value: the 5-minute default, as Postfix smtp_helo_timeout
    MAIL = "mail"  # §4.5.3.2.2: 5 minutes
    RCPT = "rcpt"  # §4.5.3.2.3: 5 minutes
    DATA = "data"  # §4.5.3.2.4 DATA initiation: 2 minutes
    DATA_BLOCK = "data_block"  # §4.5.3.2.5: 3 minutes per block written
    DATA_END = "data_end"  # §4.5.3.2.6 DATA termination: 10 minutes
    RSET = "rset"  # no RFC value: 5 minutes
    QUIT = "quit"  # no RFC value: 5 minutes


_DATA_PHASES = {Phase.DATA: 120.0, Phase.DATA_BLOCK: 180.0, Phase.DATA_END: 600.0}
TIMEOUTS: Mapping[Phase, float] = MappingProxyType({**dict.fromkeys(Phase, 300.0), **_DATA_PHASES})


class TransactionStateError(RuntimeError):
    """The caller drove a machine out of order (a bug, never a peer's doing)."""


@dataclass(frozen=True, slots=True)
class Command:
    """One thing to write: a command line (without CRLF), or the message when `line` is None."""

    phase: Phase
    line: str | None

    @property
    def timeout(self) -> float:
        return TIMEOUTS[self.phase]

    def wire(self) -> bytes:
        if self.line is None:
            raise TransactionStateError("the message content is written by the I/O layer")
        return self.line.encode("utf-8") + b"\r\n"


@dataclass(frozen=True, slots=True)
class PeerReply:
    """A reply as read from the wire: code and text, lines joined with "\\n"."""

    code: int
    message: str

    def parsed(self) -> SmtpReply:
        return SmtpReply.from_peer(self.code, self.message)


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """The connection closed, failed or timed out before the awaited reply arrived."""

    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the peer announced in its EHLO reply; all False/None after HELO."""

    esmtp: bool = False
    pipelining: bool = False
    size: int | None = None  # None: no SIZE keyword; 0: SIZE without a limit (RFC 1870 §4)
    eightbitmime: bool = False
    smtputf8: bool = False
    enhancedstatuscodes: bool = False
    starttls: bool = False


def parse_ehlo(message: str) -> Capabilities:
    """Capabilities from an EHLO reply's text (first line: the greeting; RFC 5321 §4.1.1.1)."""
    found: dict[str, str] = {}
    for line in message.splitlines()[1:]:
        keyword, _, param = line.strip().partition(" ")
        found[keyword.upper()] = param.strip()
    size: int | None = None
    if "SIZE" in found:
        # RFC 1870 §4: a missing or unreadable number means no fixed limit.
        value = found["SIZE"]
        size = int(value) if value.isdigit() else 0
    return Capabilities(
        esmtp=True,
        pipelining="PIPELINING" in found,
        size=size,
        eightbitmime="8BITMIME" in found,
        smtputf8="SMTPUTF8" in found,
        enhancedstatuscodes="ENHANCEDSTATUSCODES" in found,
        starttls="STARTTLS" in found,
    )


@dataclass(frozen=True, slots=True)
class HelloFailed:
    """EHLO and HELO failed: a host-scoped failure (try the next MX), temporary if 4xx."""

    reply: SmtpReply


class Hello:
    """EHLO, with fallback to HELO when EHLO is refused."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._sent: str | None = None

    def start(self) -> Command:
        self._sent = "EHLO"
        return Command(Phase.HELLO, f"EHLO {self.name}")

    def receive(self, event: PeerReply | ConnectionLost) -> Command | Capabilities | HelloFailed:
        sent, self._sent = self._sent, None
        if sent is None:
            raise TransactionStateError("no EHLO/HELO awaiting a reply")
        if isinstance(event, ConnectionLost):
            return HelloFailed(_lost_reply(event, sent))
        if event.code == 250:
            return parse_ehlo(event.message) if sent == "EHLO" else Capabilities()
        if sent == "EHLO" and event.code >= 500:
            # RFC 5321 §3.2, §4.1.1.1: a server refusing EHLO (500/502/5xx) gets HELO.
            self._sent = "HELO"
            return Command(Phase.HELLO, f"HELO {self.name}")
        # RFC 5321 §4.2.1: 4xx (421 included) is a temporary failure of this host.
        return HelloFailed(event.parsed())


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message to one peer: what decides the commands."""

    sender: str  # "" for the null reverse-path
    recipients: Sequence[str]
    size: int  # bytes, as they will be sent
    eight_bit: bool = False  # the body has bytes above 127
    smtputf8: bool = False  # the message needs SMTPUTF8 (RFC 6531 §3.1)

    @property
    def needs_smtputf8(self) -> bool:
        """SMTPUTF8 goes with MAIL FROM: asked for, or some address is not ASCII."""
        addresses = [self.sender, *self.recipients]
        return self.smtputf8 or not all(a.isascii() for a in addresses)


def ascii_address(address: str) -> str | None:
    """`address` as it can go to a server without SMTPUTF8, or None if it cannot.

    RFC 6531 §3.2: only a non-ASCII local part needs SMTPUTF8; a U-label domain is sent
    as its A-label (IDNA 2008, RFC 5891 §5; the same conversion DNS lookups use). None
    for a non-ASCII local part, or a domain that has no A-label. An ASCII address is
    returned unchanged.
    """
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        return None  # no domain: the whole address is a (non-ASCII) local part
    if not local.isascii():
        return None
    try:
        return f"{local}@{ascii_domain(domain)}"
    except DomainSyntaxError:
        return None


class Ending(enum.Enum):
    """How the session may continue after the transaction."""

    REUSABLE = "reusable"  # transaction complete: RSET and send the next message, or QUIT
    QUIT = "quit"  # send QUIT and close; do not reuse (the peer went off the protocol)
    CLOSE = "close"  # 421 or connection lost: close without another command (RFC 5321 §3.8)


@dataclass(frozen=True, slots=True)
class TransactionResult:
    recipients: tuple[RecipientResult, ...]
    ending: Ending

    @property
    def reusable(self) -> bool:
        return self.ending is Ending.REUSABLE


_REASON = {Outcome.DELIVERED: "sent", Outcome.DEFERRED: "remote_4xx", Outcome.BOUNCED: "remote_5xx"}


def _outcome(reply: SmtpReply) -> Outcome:
    if reply.is_positive:
        return Outcome.DELIVERED
    # Anything neither 2xx nor 5xx (4xx, or a code out of place) is worth retrying.
    return Outcome.BOUNCED if reply.is_permanent else Outcome.DEFERRED


def _lost_reply(event: ConnectionLost, after: str) -> SmtpReply:
    what = "conversation timed out" if event.timed_out else "lost connection"
    return SmtpReply(451, "4.4.2", f"{what} after {after}")


_AFTER = {
    Phase.MAIL: "MAIL FROM",
    Phase.RCPT: "RCPT TO",
    Phase.DATA: "DATA",
    Phase.DATA_END: "end of data (message may be sent more than once)",
}


class Transaction:
    """One mail transaction: MAIL, RCPT…, DATA, message; replies in, results out."""

    def __init__(self, envelope: Envelope, capabilities: Capabilities) -> None:
        self.envelope = envelope
        self.capabilities = capabilities
        self._pending: deque[tuple[Command, int]] = deque()  # (command, recipient index)
        self._final: dict[int, RecipientResult] = {}
        self._accepted: list[int] = []
        self._to_send: deque[int] = deque()
        self._wire: dict[int, str] = {}  # recipient index -> the address RCPT TO carries
        self._mail_failed = False
        self._ending: Ending | None = None
        self._started = False

    @property
    def done(self) -> bool:
        return self._ending is not None

    @property
    def awaiting(self) -> Command | None:
        """The command whose reply is read next (its `timeout` applies), or None."""
        return self._pending[0][0] if self._pending and not self.done else None

    def start(self) -> list[Command]:
        if self._started:
            raise TransactionStateError("transaction already started")
        self._started = True
        env, caps = self.envelope, self.capabilities
        refusal = self._refusal()
        if refusal is not None:
            reply, reason = refusal
            self._finish_all(_outcome(reply), reply, reason, Ending.REUSABLE)
            return []
        for i, rcpt in enumerate(env.recipients):
            wire = rcpt if caps.smtputf8 else ascii_address(rcpt)
            if not wire_safe(rcpt):
                # STYLE.md 7.7: control characters never reach the wire (RFC 5321 §4.1.2).
                self._final[i] = self._rr(i, _BAD_ADDRESS, Outcome.BOUNCED, "bad_address")
            elif wire is None:
                # RFC 6531 §3.2: only this recipient needs SMTPUTF8; the others go on.
                reply = _NO_SMTPUTF8_RCPT
                self._final[i] = self._rr(i, reply, Outcome.BOUNCED, "smtputf8_not_offered")
            else:
                self._wire[i] = wire
                self._to_send.append(i)
        if not self._to_send:
            self._ending = Ending.REUSABLE
            return []
        params = []
        if caps.size is not None:
            params.append(f" SIZE={env.size}")  # RFC 1870 §6
        if env.eight_bit and caps.eightbitmime:
            params.append(" BODY=8BITMIME")  # RFC 6152 §2; without it: sent as is (docstring)
        sender = env.sender
        if caps.smtputf8 and env.needs_smtputf8:
            params.append(" SMTPUTF8")  # RFC 6531 §3.4
        elif not caps.smtputf8:
            # RFC 6531 §3.2: no SMTPUTF8: U-label domains go as A-labels (RFC 5891 §5);
            # `_refusal` has already refused a sender that cannot.
            sender = ascii_address(sender) or sender
        mail = Command(Phase.MAIL, f"MAIL FROM:<{sender}>{''.join(params)}")
        if not caps.pipelining:
            return self._queue([(mail, -1)])
        # RFC 2920 §3.1: MAIL, every RCPT and DATA go as one batch; replies come in order.
        batch = [(mail, -1)]
        while self._to_send:
            batch.append(self._rcpt(self._to_send.popleft()))
        batch.append((Command(Phase.DATA, "DATA"), -1))
        return self._queue(batch)

    def receive(self, event: PeerReply | ConnectionLost) -> list[Command]:
        if self.done or not self._pending:
            raise TransactionStateError("no command awaiting a reply")
        command, index = self._pending.popleft()
        phase = command.phase
        if isinstance(event, ConnectionLost):
            # RFC 5321 §3.8: whatever was not finally answered is deferred.
            self._finish_all(
                Outcome.DEFERRED,
                _lost_reply(event, _AFTER[phase]),
                "timeout" if event.timed_out else "connection_lost",
                Ending.CLOSE,
            )
            return []
        reply = event.parsed()
        if reply.code == 421:
            # RFC 5321 §3.8: the server is closing; defer the rest, do not reuse.
            self._finish_all(Outcome.DEFERRED, reply, "remote_4xx", Ending.CLOSE)
            return []
        if phase is Phase.MAIL:
            return self._on_mail(reply)
        if phase is Phase.RCPT:
            return self._on_rcpt(index, reply)
        if phase is Phase.DATA:
            return self._on_data(reply)
        return self._on_end(command, reply)

    def result(self) -> TransactionResult:
        if self._ending is None:
            raise TransactionStateError("transaction not finished")
        results = tuple(self._final[i] for i in range(len(self.envelope.recipients)))
        return TransactionResult(results, self._ending)

    # -- decisions ---------------------------------------------------------------------

    def _refusal(self) -> tuple[SmtpReply, str] | None:
        env, caps = self.envelope, self.capabilities
        if env.smtputf8 and not caps.smtputf8:
            # RFC 6531 §3.2: the caller said this message needs SMTPUTF8 (the engine
            # says so only to a server that offers it).
            text = "SMTPUTF8 is required, but was not offered by host"
            return SmtpReply(550, "5.6.7", text), "smtputf8_not_offered"
        if not caps.smtputf8 and ascii_address(env.sender) is None:
            # RFC 6531 §3.2: a non-ASCII sender local part cannot be sent without
            # SMTPUTF8, and no recipient can be sent without a sender.
            return _NO_SMTPUTF8_SENDER, "smtputf8_not_offered"
        if caps.size and env.size > caps.size:
            # RFC 1870 §6: never send what the server said it will refuse (SIZE 0: no limit).
            text = f"message too big for host: size {env.size} exceeds its limit {caps.size}"
            return SmtpReply(552, "5.3.4", text), "message_too_big"
        if not wire_safe(env.sender):
            return _BAD_ADDRESS, "bad_address"
        return None

    def _on_mail(self, reply: SmtpReply) -> list[Command]:
        if reply.is_positive:
            if self.capabilities.pipelining:
                return []
            return self._queue([self._rcpt(self._to_send.popleft())])
        # RFC 5321 §3.3: a refused MAIL ends the transaction for every recipient.
        self._mail_failed = True
        outcome = _outcome(reply)
        for i in range(len(self.envelope.recipients)):
            self._final.setdefault(i, self._rr(i, reply, outcome, "mail_from"))
        if not self._pending:
            self._ending = Ending.REUSABLE
        return []  # RFC 2920 §3.1: with PIPELINING, the RCPT and DATA replies still come

    def _on_rcpt(self, index: int, reply: SmtpReply) -> list[Command]:
        if reply.code == 552:
            # RFC 5321 §4.5.3.1.10: 552 to RCPT ("too many recipients") is temporary.
            reply = SmtpReply(452, "4" + reply.enhanced[1:], reply.text)
        if not self._mail_failed:
            if reply.is_positive:  # 250 or 251 (RFC 5321 §3.4)
                self._accepted.append(index)
            else:  # RFC 5321 §4.2.5: a refused recipient does not end the transaction
                outcome = _outcome(reply)
                self._final[index] = self._rr(index, reply, outcome, _REASON[outcome])
        if self.capabilities.pipelining:
            return []
        if self._to_send:
            return self._queue([self._rcpt(self._to_send.popleft())])
        if not self._accepted:
            # RFC 5321 §3.3: no DATA without an accepted recipient.
            self._ending = Ending.REUSABLE
            return []
        return self._queue([(Command(Phase.DATA, "DATA"), -1)])

    def _on_data(self, reply: SmtpReply) -> list[Command]:
        live = [i for i in self._accepted if not self._mail_failed]
        if reply.code == 354:
            if live:
                return self._queue([(Command(Phase.DATA_END, None), -1)])
            # RFC 2920 §3.1: DATA must be refused when no recipient was accepted; a server
            # that says 354 anyway gets an empty message (Postfix), and no further use.
            return self._queue([(Command(Phase.DATA_END, "."), -1)])
        if live:
            # RFC 5321 §4.2.5: DATA refused: its reply applies to every accepted recipient;
            # a 2xx here is out of place and retried, never taken as delivery.
            outcome = Outcome.BOUNCED if reply.is_permanent else Outcome.DEFERRED
            for i in live:
                self._final[i] = self._rr(i, reply, outcome, _REASON[outcome])
        # RFC 2920 §3.1: with nothing accepted, the expected 503/554 ends the transaction.
        self._ending = Ending.REUSABLE
        return []

    def _on_end(self, command: Command, reply: SmtpReply) -> list[Command]:
        if command.line is not None:  # the bare "." after an unexpected 354
            self._ending = Ending.QUIT
            return []
        # RFC 5321 §4.1.1.4: the reply to end of data applies to every accepted recipient.
        outcome = _outcome(reply)
        for i in self._accepted:
            self._final[i] = self._rr(i, reply, outcome, _REASON[outcome])
        self._ending = Ending.REUSABLE
        return []

    # -- helpers -----------------------------------------------------------------------

    def _rcpt(self, index: int) -> tuple[Command, int]:
        line = f"RCPT TO:<{self._wire[index]}>"
        return Command(Phase.RCPT, line), index

    def _queue(self, batch: list[tuple[Command, int]]) -> list[Command]:
        self._pending.extend(batch)
        return [command for command, _ in batch]

    def _rr(self, index: int, reply: SmtpReply, outcome: Outcome, reason: str) -> RecipientResult:
        return RecipientResult(self.envelope.recipients[index], outcome, reply, "", reason)

    def _finish_all(self, outcome: Outcome, reply: SmtpReply, reason: str, end: Ending) -> None:
        for i in range(len(self.envelope.recipients)):
            self._final.setdefault(i, self._rr(i, reply, outcome, reason))
        self._ending = end
        self._pending.clear()


_BAD_ADDRESS = SmtpReply(553, "5.1.3", "address contains characters that cannot be sent")
_NO_SMTPUTF8_RCPT = SmtpReply(
    550,
    "5.6.7",
    "SMTPUTF8 is required for this recipient address (its local part is not ASCII), "
    "but was not offered by host",
)
_NO_SMTPUTF8_SENDER = SmtpReply(
    550,
    "5.6.7",
    "SMTPUTF8 is required for the sender address (its local part is not ASCII), "
    "but was not offered by host",
)
