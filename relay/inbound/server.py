"""Inbound SMTP listeners: aiosmtpd protocol instances on the configured addresses.

Contract:
- Every listener shares one `ConnectionLimiter`: at most `server.max_connections`
  connections at once, and `server.max_connections_per_client` from one client address
  (Postfix smtpd_client_connection_count_limit). A connection over either limit gets
  `421 4.7.0` instead of the greeting and is closed (RFC 5321 §3.8); it is logged and
  counted as `too_many_connections` / `too_many_connections_from_client`. The handler
  never sees it.
- Messages larger than `server.max_message_size` are refused: `SIZE=` too big at MAIL
  (aiosmtpd) and DATA beyond the limit both get `552`, and the data beyond the limit is
  discarded as it arrives (nothing is stored).
- DATA content is read by `relay.inbound.data` in chunks (bytes operations, not one
  `readuntil` per line) with exactly aiosmtpd's replies, limits and end-of-data rules; what
  a client pipelined after the end of data goes back to the command loop.
- STARTTLS (RFC 3207) is offered when a `TlsContextHolder` is given; each new connection
  takes the holder's current context (so a reload on SIGHUP reaches new connections only).
  On a listener with `require_tls`, every command but EHLO/HELO, STARTTLS, NOOP and QUIT
  gets `530 5.7.0 Must issue a STARTTLS command first` until TLS is up (counted as
  `tls_required`).
- Lines longer than 1000 octets with CRLF (RFC 5321 §4.5.3.1.6) are refused: in DATA
  after the end of data with `554 5.6.0` (the message is dropped), in commands at once
  with `500 5.5.2`.
- `server.timeout` is idle time: restarted by every command, every DATA chunk and every
  AUTH challenge; when it runs out the client gets `421 4.4.2` and the close.
- Every reply but the greeting and the replies to HELO/EHLO carries an RFC 3463 enhanced
  code (aiosmtpd's own ones get it in `push`); EHLO advertises ENHANCEDSTATUSCODES and
  PIPELINING. STARTTLS inside TLS gets `554 5.5.1` (RFC 3207 §4.2); a failed handshake is
  one INFO line (`starttls client=… tls=failed reason=…`) and ends the session.
- Error limits (`relay.inbound.errorlimit`, Postfix smtpd_*_error_limit): past
  `server.soft_error_limit` error replies each further one waits `server.error_sleep_time`
  (asyncio.sleep); the one reaching `server.hard_error_limit` is followed by `421 4.7.0`
  and the connection is closed. Nothing pipelined after a 421 is handled or answered.
- Graceful stop: every open session is in the `Sessions` given to `start_listeners`.
  After `Sessions.begin_shutdown()` an idle session gets `421 4.3.2 <host> Service shutting
  down` and is closed at once; a session in a transaction (after MAIL, in DATA) finishes
  it normally (its message is committed and answered 250) and then gets the 421; a
  connection that arrives late gets the 421 instead of the greeting. `Sessions.drain()`
  waits for the sessions to end and closes those still open after the grace with the 421
  (a message that got no 250 is still the client's to retry).
- One INFO line per session when it ends (logger `relay.smtpd`): `session client=… helo=…
  tls=… auth=yes|no messages=N queue_ids=… outcome=quit|disconnected|timeout|shutdown|
  too_many_errors|tls_failed duration=…`, counted in `dane_relay_inbound_sessions_total` (refused
  connections as outcome `refused`); a completed STARTTLS is counted in
  `dane_relay_tls_negotiated_total`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, TLSSetupException, syntax

from relay.config import Endpoint, Listener, ServerConfig
from relay.inbound.auth import Credentials, FailureLimiter
from relay.inbound.data import LINE_LIMIT, DataVerdict, receive_data
from relay.inbound.errorlimit import SessionErrors
from relay.inbound.handler import RelayHandler
from relay.inbound.helo import helo_problem
from relay.inbound.pathparse import simple_path
from relay.inbound.tls import TlsContextHolder
from relay.metrics import Metrics
from relay.smtp.address import escaped, log_quoted

__all__ = ["AuthGate", "ConnectionLimiter", "Sessions", "start_listeners"]

log = logging.getLogger("relay.smtpd")


class ConnectionLimiter:
    """Counts open connections overall and per client address (no I/O)."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total_limit = total
        self.per_client_limit = per_client
        self.total = 0
        self.by_client: dict[str, int] = {}

    def acquire(self, client: str) -> str | None:
        """Take a slot for `client`; None when taken, else the refusal reason."""
        if self.total >= self.total_limit:
            return "too_many_connections"
        if self.by_client.get(client, 0) >= self.per_client_limit:
            return "too_many_connections_from_client"
        self.total += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        left = self.by_client[client] - 1
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]


class Sessions:
    """The open SMTP sessions of every listener, for the graceful stop (SIGTERM)."""

    def __init__(self) -> None:
        self.closing = False
        self._open: set[LimitedSMTP] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, session: LimitedSMTP) -> None:
        self._open.add(session)
        self._empty.clear()

    def discard(self, session: LimitedSMTP) -> None:
        self._open.discard(session)
        if not self._open:
            self._empty.set()

    def begin_shutdown(self) -> int:
        """Close the idle sessions with 421 now; the others when their transaction ends.
        Returns how many are left to finish."""
        self.closing = True
        return sum(not session.shut_down_if_idle() for session in list(self._open))

    async def drain(self, grace: float) -> int:
        """Wait up to `grace` seconds for the sessions to end, then close the rest with
        421. Returns how many were cut off."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), grace)
        cut = list(self._open)
        for session in cut:
            session.shut_down("cut-off")
        if cut:
            # Closed transports report connection_lost on the next loop iterations.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), 2.0)
        return len(cut)


# aiosmtpd's fixed refusals, given the enhanced status codes (RFC 3463) and wording Postfix
# uses, with the reason each is counted under. Logged `reject=VERB`: the command being run,
# or COMMAND for a line aiosmtpd refuses before running any (too long, TLS required).
_ENHANCED = {
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds fixed limit",
        "message_too_big",
    ),
    "552 Error: Too much mail data": ("552 5.3.4 Error: message file too big", "message_too_big"),
    # Sent after the final dot, where RFC 5321 §4.3.2 allows only 250, 552, 554, 451, 452,
    # 450 and 550: 554 (transaction failed) for content that breaks RFC 5321 §4.5.3.1.6.
    "500 Line too long (see RFC5321 4.5.3.1.6)": (
        "554 5.6.0 Message content rejected: line longer than 1000 octets "
        "(RFC 5321 section 4.5.3.1.6)",
        "line_too_long",
    ),
    "500 Command line too long": ("500 5.5.2 Error: command line too long", "command_too_long"),
    # RFC 3207 §4: a server that requires TLS answers 530 until STARTTLS.
    "530 Must issue a STARTTLS command first": (
        "530 5.7.0 Must issue a STARTTLS command first",
        "tls_required",
    ),
    # aiosmtpd's MAIL FROM / RCPT TO path that does not parse (RFC 5321 §4.1.2).
    "553 5.1.3 Error: malformed address": ("553 5.1.3 Error: malformed address", "malformed"),
}
#: The reason of a malformed path, by command.
_MALFORMED = {"MAIL": "bad_sender", "RCPT": "bad_recipient"}


#: The start of RelayHandler.handle_DATA's reply once a message is queued.
_QUEUED = "250 2.0.0 Ok: queued as "

# RFC 2034 §3: with ENHANCEDSTATUSCODES advertised, every 2xx, 4xx and 5xx reply but the
# greeting and the replies to HELO/EHLO carries an RFC 3463 code. aiosmtpd's own replies
# that lack one get it here: by their exact text (with Postfix's wording where Postfix
# says the same thing), else by their reply code.
_CODED = {
    "250 OK": "250 2.0.0 Ok",
    "221 Bye": "221 2.0.0 Bye",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "503 Error: send HELO first": "503 5.5.1 Error: send HELO/EHLO first",
    "503 Error: send EHLO first": "503 5.5.1 Error: send EHLO first",
    "503 Already authenticated": "503 5.5.1 Error: already authenticated",
    "501 Not enough value": "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
    "501 Too many values": "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: need RCPT command": "503 5.5.1 Error: need RCPT command",
    "252 Cannot VRFY user, but will accept message and attempt delivery": (
        "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
    ),
}
# By reply code (RFC 3463 §3.6: X.5.1 a command out of sequence or not supported, X.5.2 a
# command that cannot be parsed, X.5.4 bad arguments; §3.8: X.7.0 a security refusal).
_CODE_DEFAULTS = {
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "555": "5.5.4",
    "454": "4.7.0",
    "530": "5.7.0",
    "554": "5.7.0",
}


def with_enhanced_code(status: str) -> str:
    """`status` (one reply line) with an RFC 3463 enhanced code (RFC 2034 §3)."""
    if status[5:6] == "." and status[4:5] in ("2", "4", "5"):
        return status  # it has one
    coded = _CODED.get(status)
    if coded is not None:
        return coded
    code, text = status[:3], status[4:]
    if code == "250" and text.startswith(("Syntax: ", "Supported commands: ")):
        return f"214 2.0.0 {text}"  # RFC 5321 §4.2.2: 214 answers HELP
    if code[:1] not in ("2", "4", "5") or status[3:4] != " ":
        return status  # 3xx needs none
    return f"{code} {_CODE_DEFAULTS.get(code, code[0] + '.0.0')} {text}"


class _Writable(Protocol):
    """What the limit and shutdown refusals need of a transport. uvloop's TCPTransport
    has these but is no asyncio.WriteTransport subclass, so no isinstance check."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


def _tls_failure_reason(error: BaseException | None) -> str:
    """A short word for why a STARTTLS handshake failed, for the log."""
    reason = getattr(error, "reason", None) or type(error).__name__
    return str(reason).replace(" ", "_")[:64]


@dataclass
class AuthGate:
    """What AUTH checks against: the credentials file and the per-client failure limit."""

    credentials: Credentials
    failures: FailureLimiter


class LimitedSMTP(SMTP):
    """aiosmtpd's SMTP with the connection limits applied before the greeting, and AUTH
    only where `auth` is given (a listener with auth = true and server.auth_file set)."""

    def __init__(
        self,
        handler: RelayHandler,
        limiter: ConnectionLimiter,
        metrics: Metrics,
        auth: AuthGate | None = None,
        sessions: Sessions | None = None,
        **kw: Any,
    ) -> None:
        # RFC 4954 §4 / RFC 4616 §6: PLAIN and LOGIN send the password in the clear, so
        # AUTH is offered and accepted only after STARTTLS (aiosmtpd's auth_require_tls).
        super().__init__(handler, auth_require_tls=True, **kw)
        self._limiter = limiter
        self._metrics = metrics
        self._client: str | None = None  # holds a limiter slot while set
        self._refused = False
        self._auth = auth
        self.auth_offered = auth is not None  # read by RelayHandler.handle_EHLO
        if auth is not None:
            self._authenticator = self._take_login
        self._login: tuple[str, LoginPassword] | None = None  # see _take_login
        self._authzid: bytes | None = None  # AUTH PLAIN's authorization identity
        self._sessions = sessions
        self._busy = False  # a command is being handled
        self._verb: str | None = None  # the command being handled, for refusal lines
        self._opened = time.monotonic()
        self._ended = "disconnected"  # how the session ended, for its log line and metric
        self._tls = "none"  # "TLSv1.3/TLS_AES_256_GCM_SHA384" once STARTTLS is done
        self._queued: list[str] = []  # queue ids answered 250 in this session
        self._greeted = False  # the 220 greeting has been sent
        self._plain_replies = False  # replying to HELO/EHLO (RFC 2034 §3: no enhanced code)
        limits = getattr(handler, "server_cfg", None) or ServerConfig()  # a bare test handler
        self._errors = SessionErrors(limits.soft_error_limit, limits.hard_error_limit)
        self._error_sleep = limits.error_sleep_time
        self._smtp_methods = {
            verb: method if verb == "QUIT" else self._guarded(verb, method)
            for verb, method in self._smtp_methods.items()
        }

    def _guarded(
        self, verb: str, method: Callable[[Any], Awaitable[None]]
    ) -> Callable[[Any], Awaitable[None]]:
        """`method` (an smtp_* command), answered with 421 instead while shutting down
        outside a transaction, and followed by 421 when it ends a transaction then."""

        @functools.wraps(method)  # keeps the __smtp_syntax__ HELP reads
        async def command(arg: Any) -> None:
            if self.transport is None or self.transport.is_closing():
                return  # pipelined after a 421 (shutdown, too many errors): not handled
            if self._shutting_down():
                self.shut_down("idle")
                return
            in_transaction = self._in_transaction()
            self._busy, self._verb = True, verb
            try:
                await method(arg)
            finally:
                self._busy, self._verb = False, None
            if self._shutting_down():
                self.shut_down("after-transaction" if in_transaction else "after-command")

        return command

    def _closing(self) -> bool:
        transport = self.transport
        return transport is None or transport.is_closing()

    def _in_transaction(self) -> bool:
        """After an accepted MAIL and until the end of DATA (or RSET)."""
        return self.envelope is not None and self.envelope.mail_from is not None

    def _shutting_down(self) -> bool:
        return self._sessions is not None and self._sessions.closing and not self._in_transaction()

    def shut_down_if_idle(self) -> bool:
        """421 and close unless a command or a transaction is under way; True if closed."""
        if self._busy or self._in_transaction():
            return False
        self.shut_down("idle")
        return True

    def shut_down(self, state: str) -> None:
        """Say 421 and close (`state` says when, for the log)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        log.info('shutdown client=%s reply="421 4.3.2" state=%s', self._client, state)
        self._ended = "shutdown"
        # RFC 5321 §3.8 and §4.2.3: 421 may answer any command when the service must shut
        # down; the server then closes the channel.
        self._writer.write(f"421 4.3.2 {self.hostname} Service shutting down\r\n".encode())
        transport.close()

    def _take_login(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """aiosmtpd's authenticator, called synchronously once PLAIN or LOGIN has the
        credentials. The scrypt check costs ~50 ms of CPU, which must not stall every other
        session and delivery on the event loop, so it only keeps them for `smtp_AUTH` to
        check in a worker thread; `handled=True` makes aiosmtpd send no reply itself."""
        assert isinstance(auth_data, LoginPassword)
        self._login = (mechanism, auth_data)
        return AuthResult(success=False, handled=True)

    async def _check_login(self, mechanism: str, auth_data: LoginPassword) -> None:
        assert self._auth is not None and self.session is not None
        user = auth_data.login.decode("utf-8", "backslashreplace")
        authzid, self._authzid = self._authzid, None
        # RFC 4616 §2: the server must check that the user may act as the authzid; the
        # relay has no proxy authorization, so only none or the user itself may be given.
        proxy = authzid not in (None, b"", auth_data.login)
        client = self._client or ""
        # The attempt is reserved before the check and counts against auth_failure_limit
        # while the password is checked in a thread: parallel sessions from one address
        # cannot all pass the limit together (at most the limit fails per window).
        if not self._auth.failures.begin(client):
            await self._refuse_rate_limited()
            return
        failed = True  # also when the connection is lost during the check
        try:
            if not proxy:
                failed = not await asyncio.to_thread(
                    self._auth.credentials.check, user, auth_data.password
                )
        finally:
            failures = self._auth.failures.end(client, failed=failed)
        if not failed:
            log.info(
                "auth client=%s mechanism=%s user=%s status=ok",
                self._client,
                mechanism,
                escaped(user)[:64],
            )
            # What aiosmtpd's smtp_AUTH records for a successful AuthResult.
            self.session.authenticated = True
            # aiosmtpd declares auth_data as None; it holds the authenticator's data.
            self.session.auth_data = auth_data  # type: ignore[assignment]
            await self.push("235 2.7.0 Authentication successful")
            return
        self._metrics.auth_failures.inc()
        log.warning(
            "auth client=%s mechanism=%s user=%s status=failed failures=%d%s",
            self._client,
            mechanism,
            escaped(user)[:64],
            failures,
            f" authzid={escaped(authzid.decode('utf-8', 'backslashreplace'))[:64]}"
            " reason=proxy-authorization"
            if proxy and authzid is not None
            else "",
        )
        # RFC 4954 §6: 535 5.7.8 for credentials that are not valid.
        await self.push("535 5.7.8 Authentication credentials invalid")

    async def smtp_AUTH(self, arg: str) -> None:
        if self._auth is None:
            await self.push("503 5.5.1 Error: authentication not enabled")
            return
        if self._auth.failures.blocked(self._client or ""):
            await self._refuse_rate_limited()
            return
        self._login = None
        self._authzid = None
        await super().smtp_AUTH(arg)
        login, self._login = self._login, None
        if login is not None:
            await self._check_login(*login)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        """aiosmtpd's PLAIN, with the same replies, that keeps the authorization identity
        (RFC 4616 §2: `authzid NUL authcid NUL passwd`) for `_check_login`."""
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        try:
            authzid, login, password = blob.split(b"\0")
        except ValueError:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        self._authzid = authzid
        return self._authenticate("PLAIN", LoginPassword(login, password))

    async def _refuse_rate_limited(self) -> None:
        self._metrics.inbound_rejections.labels("auth_rate_limited").inc()
        log.warning(
            'reject=AUTH client=%s reply="421 4.7.0" reason=auth-rate-limited', self._client
        )
        # RFC 4954 §4 leaves throttling to the server; Postfix answers 421 and closes.
        await self.push(f"421 4.7.0 {self.hostname} Error: too many failed authentication attempts")
        if self.transport is not None:
            self.transport.close()  # what the client pipelined after it is not read

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> Any:
        """aiosmtpd's AUTH challenge (334) and the client's answer, decoded; MISSING
        after a refusal. Here the idle timer runs from the challenge, and a line over the
        reader's limit is answered 500 5.5.6 instead of raising."""
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        # RFC 4954 §4: the trailing space is required even with no challenge data.
        await self.push(b"334 " + (base64.b64encode(raw) if encode_to_b64 else raw))
        # RFC 5321 §4.5.3.2.7: the server's timeout is idle time, waiting for this line too.
        self._reset_timeout()
        line = await self._read_auth_line()
        if line is None:
            # RFC 4954 §6: 500 5.5.6 for an exchange line too long; the session goes on.
            await self.push("500 5.5.6 Authentication Exchange line is too long")
            return MISSING
        blob = line.strip()
        if blob == b"*":
            # RFC 4954 §4: "*" cancels the exchange, answered 501.
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        try:
            return base64.b64decode(blob, validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING

    async def _read_auth_line(self) -> bytes | None:
        """The next line, or None when it is over the reader's limit (then all of it,
        up to its line end, is read and dropped, as aiosmtpd does with a command line)."""
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as error:
            await self._reader.read(error.consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return None
            except asyncio.LimitOverrunError as error:
                await self._reader.read(error.consumed)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            # RFC 3207 §4.2: no STARTTLS once TLS is active (Postfix's reply); session goes on.
            await self.push("554 5.5.1 Error: TLS already active")
            return
        try:
            await super().smtp_STARTTLS(arg)
        except TLSSetupException as error:
            self._tls_failed(error.__cause__)

    def _tls_failed(self, error: BaseException | None) -> None:
        """A failed handshake: one INFO line (a client must not be able to fill the log
        with tracebacks), and the session ends as aiosmtpd ends it."""
        log.info(
            "starttls client=%s tls=failed reason=%s", self._client, _tls_failure_reason(error)
        )
        if self._ended == "disconnected":
            self._ended = "tls_failed"
        if self.transport is not None:
            self.transport.close()
        # The TLS layer never reported connection_made, so it reports no connection_lost.
        self.connection_lost(None)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            if not await self._helo_refused("EHLO", hostname):
                await super().smtp_EHLO(hostname)
        finally:
            self._plain_replies = False

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            if not await self._helo_refused("HELO", hostname):
                await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    async def _helo_refused(self, verb: str, hostname: str | None) -> bool:
        """RFC 5321 §4.1.1.1: the argument is a Domain or an address literal
        (`relay.inbound.helo`); else 501, and (§4.1.4) the session stays as it was."""
        why = helo_problem(hostname) if hostname else None
        if why is None:
            return False  # aiosmtpd answers a missing argument itself
        assert hostname is not None
        self._metrics.inbound_rejections.labels("invalid_helo").inc()
        log.warning(
            'reject=%s client=%s helo=%s reply=501 reason=invalid-helo why="%s"',
            verb,
            self._client,
            escaped(hostname)[:255].replace(" ", "_"),
            log_quoted(why),
        )
        await self.push(f"501 Invalid {verb} name: a domain name or an address literal is expected")
        return True

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if command == "EHLO":
            # RFC 2920 (the command loop reads pipelined commands in order) and RFC 2034
            # (every reply carries an enhanced code): both served, so both advertised,
            # before aiosmtpd's last line ("250 HELP").
            responses = args[1]
            responses[-1:-1] = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        return await super()._call_handler_hook(command, *args)

    @syntax("QUIT")  # aiosmtpd's HELP lists the commands that carry a syntax
    async def smtp_QUIT(self, arg: str) -> None:
        if not arg:
            self._ended = "quit"
        await super().smtp_QUIT(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's MAIL FROM / RCPT TO path parse, without its per-call class and token
        tree for the simple `<local@domain>` (`relay.inbound.pathparse`, same results)."""
        simple = simple_path(arg) if arg else None
        if simple is None:
            return SMTP._getaddr(self, arg)  # explicit, so the differential tests can borrow it
        address, rest = simple
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the content read in chunks (`relay.inbound.data`) instead
        of one `readuntil` per line: the same replies, limits and content, less CPU."""
        if self._decode_data or "DATA" not in self._handle_hooks:
            await SMTP.smtp_DATA(self, arg)  # not how the relay runs; the library's own
            return
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            # RFC 5321 §4.5.3.2.5-6: the timeout is idle time, restarted by every chunk.
            data = await receive_data(
                self._reader, self.data_size_limit, LINE_LIMIT, self._reset_timeout
            )
        except asyncio.CancelledError:
            # The connection was lost during DATA (aiosmtpd closes the writer too).
            self._writer.close()
            raise
        # RFC 5321 §4.2.5: the refusal comes after the end of data, as in aiosmtpd.
        if data.verdict is DataVerdict.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            self._end_data()
            return
        if data.verdict is DataVerdict.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
            self._end_data()
            return
        self.envelope.content = data.content
        self.envelope.original_content = data.content
        status = await self._call_handler_hook("DATA")
        self._end_data()
        await self.push("250 OK" if status is MISSING else status)

    def _end_data(self) -> None:
        self._set_post_data_state()  # type: ignore[no-untyped-call]

    def _timeout_cb(self) -> None:  # aiosmtpd's idle timeout (server.timeout)
        self._ended = "timeout"
        if not self._closing():
            # RFC 5321 §3.8 and §4.5.3.2: a server that gives up on an idle client says 421
            # before closing (Postfix's text).
            self._writer.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None or self.transport is not None:
            super().connection_made(transport)  # the TLS layer after STARTTLS
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:  # called once the handshake is complete
                version, cipher = ssl_object.version() or "", (ssl_object.cipher() or ("",))[0]
                self._tls = f"{version}/{cipher}"
                self._metrics.tls_session("inbound", version, cipher)
            return
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        if self._sessions is not None and self._sessions.closing:
            # Accepted just before the listener closed: RFC 5321 §3.8, 421 and close.
            self._refused = True
            self._metrics.inbound_sessions.labels("refused", "no").inc()
            self._metrics.inbound_rejections.labels("shutting_down").inc()
            log.info('reject=CONNECT client=%s reply="421 4.3.2" reason=shutting-down', client)
            writable = cast(_Writable, transport)
            writable.write(f"421 4.3.2 {self.hostname} Service shutting down\r\n".encode())
            writable.close()
            return
        reason = self._limiter.acquire(client)
        if reason is not None:
            self._refused = True
            self._metrics.inbound_rejections.labels(reason).inc()
            self._metrics.inbound_sessions.labels("refused", "no").inc()
            log.warning(
                'reject=CONNECT client=%s reply="421 4.7.0" reason=%s open=%d from_client=%d',
                client,
                reason.replace("_", "-"),
                self._limiter.total,
                self._limiter.by_client.get(client, 0),
            )
            # RFC 5321 §3.8: a server that cannot serve the client may answer 421 and close.
            text = f"421 4.7.0 {self.hostname} Error: too many connections"
            if reason == "too_many_connections_from_client":
                text += f" from {client}"
            writable = cast(_Writable, transport)
            writable.write(text.encode("ascii", "replace") + b"\r\n")
            writable.close()
            return
        self._client = client
        if self._sessions is not None:
            self._sessions.add(self)
        super().connection_made(transport)

    async def push(self, status: Any) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # closed after a 421: what the client pipelined gets no reply
        if not isinstance(status, str):
            pass  # an AUTH challenge (334)
        elif not self._greeted:
            self._greeted = True  # RFC 2034 §3: the greeting has no enhanced code
        elif self._plain_replies:
            pass
        elif status in _ENHANCED:
            status, reason = _ENHANCED[status]
            verb = self._verb or "COMMAND"
            reason = _MALFORMED.get(verb, "bad_recipient") if reason == "malformed" else reason
            self._metrics.inbound_rejections.labels(reason).inc()
            log.warning(
                'reject=%s client=%s reply="%s" reason=%s',
                verb,
                self._client,
                status[:9],
                reason.replace("_", "-"),
            )
        elif status.startswith(_QUEUED):
            self._queued.append(status[len(_QUEUED) :].strip())
        else:
            status = with_enhanced_code(status)
        text = status if isinstance(status, str) else ""
        if self._errors.delayed(text):
            # Postfix smtpd_error_sleep_time: slow a client that keeps making errors
            # (recipient guessing) without holding up the other sessions.
            await asyncio.sleep(self._error_sleep)
        await super().push(status)
        if self._errors.record(text):
            self._too_many_errors()

    def _too_many_errors(self) -> None:
        """RFC 5321 §3.8, §4.2: 421 and close once the session reaches
        server.hard_error_limit error replies (Postfix smtpd_hard_error_limit)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._ended = "too_many_errors"
        self._metrics.inbound_rejections.labels("too_many_errors").inc()
        log.warning(
            'reject=SESSION client=%s reply="421 4.7.0" reason=too-many-errors errors=%d',
            self._client,
            self._errors.count,
        )
        self._writer.write(f"421 4.7.0 {self.hostname} Error: too many errors\r\n".encode())
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._client is not None:
            self._log_session()
            self._limiter.release(self._client)
            self._client = None
            if self._sessions is not None:
                self._sessions.discard(self)
        super().connection_lost(error)

    def _log_session(self) -> None:
        session = self.session
        helo = escaped(getattr(session, "host_name", None) or "-")
        authenticated = bool(getattr(session, "authenticated", False))
        tls = "no" if self._tls == "none" else "yes"
        self._metrics.inbound_sessions.labels(self._ended, tls).inc()
        log.info(
            "session client=%s helo=%s tls=%s auth=%s messages=%d queue_ids=%s outcome=%s "
            "duration=%.3f",
            self._client,
            helo[:255].replace(" ", "_") or "-",
            self._tls,
            "yes" if authenticated else "no",
            len(self._queued),
            ",".join(self._queued) or "-",
            self._ended,
            time.monotonic() - self._opened,
        )

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()


async def start_listeners(
    handler: RelayHandler,
    cfg: ServerConfig,
    hostname: str,
    tls: TlsContextHolder | None = None,
    auth: AuthGate | None = None,
    sessions: Sessions | None = None,
) -> list[asyncio.Server]:
    """Bind every listen address; raises OSError if one cannot be bound.

    AUTH is offered (after STARTTLS) on the listeners with auth = true when `auth` is given.
    Every session is kept in `sessions` (when given) for the graceful stop.
    """
    loop = asyncio.get_running_loop()
    limiter = ConnectionLimiter(cfg.max_connections, cfg.max_connections_per_client)

    def factory_for(ep: Endpoint) -> Callable[[], SMTP]:
        require_tls = isinstance(ep, Listener) and ep.require_tls
        gate = auth if isinstance(ep, Listener) and ep.auth else None

        def factory() -> SMTP:
            return LimitedSMTP(
                handler,
                limiter,
                handler.metrics,
                gate,
                sessions,
                hostname=hostname,
                ident="dane-relay",
                data_size_limit=cfg.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                timeout=cfg.timeout,
                tls_context=tls.context if tls is not None else None,
                require_starttls=require_tls,
            )

        return factory

    servers = []
    for ep in cfg.listen:
        servers.append(await _bind(loop, factory_for(ep), ep))
    return servers


async def _bind(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], SMTP], ep: Endpoint
) -> asyncio.Server:
    family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
    return await loop.create_server(
        factory,
        host=ep.host,
        port=ep.port,
        family=family,
        reuse_address=True,
    )
