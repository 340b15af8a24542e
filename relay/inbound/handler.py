"""aiosmtpd handler: relay access policy and the durable DATA commit.

Contract:
- RCPT goes through `relay.inbound.gateway.rcpt_verdict` first: a client whose address is
  not in `relay.networks` and that has not authenticated gets 550 5.7.1 (Postfix "Relay
  access denied"; RFC 5321 §3.6.2) unless the recipient is in a [gateway] domain; with a
  gateway recipient list an unknown local recipient gets 550 5.1.1. Logged with the
  client address and counted (`relay_denied`, `unknown_recipient`).
- RFC 5321 §4.5.1: `<postmaster>` (no domain) and `postmaster@<hostname>`, any case, are
  accepted from any client (no relay check; still under max_recipients and the session's
  error limits) and queued for `server.postmaster`, or `postmaster@<first gateway
  domain>` when that is unset (`relay.inbound.gateway.postmaster_route`). With neither,
  550 5.1.1 "no postmaster address configured (server.postmaster)", counted as
  `no_postmaster`. The `status=queued` line names the original as `orig_to=`.
- RCPT is refused with 550 5.1.2 for an address literal (delivery is by MX only) and
  with 553 5.1.3 for a domain that has no DNS name (`relay.smtp.domain.ascii_domain`:
  bad syntax, invalid IDNA 2008, escapes, over-long labels); logged and counted as
  `address_literal` / `bad_domain`. The address is queued as given (RFC 6531).
- DATA is answered 250 only after `SpoolStore.commit` has fsync'ed the body and
  the envelope and their directories (the durability point). If that fails the
  client gets 451 4.3.0 and nothing is queued; 452 4.3.1 Insufficient system storage
  when the file system is full or over quota (ENOSPC, EDQUOT). MAIL already gets that 452
  when the spool's file system has less free than `server.queue_minfree` plus the SIZE=
  the client declared (RFC 1870 §6.1). Logged and counted as `insufficient_storage`.
  A commit still running when the session is cancelled (the client went away) goes on
  in its thread; a message it stores is handed to the runner all the same.
- DATA containing a bare CR or LF (any CR not followed by LF, any LF not preceded by CR)
  is refused with 550 5.5.2 and nothing is queued, unless `server.bare_line_endings` is
  "accept" (then it is stored as received; delivery writes CRLF). aiosmtpd itself ends
  DATA only at CRLF.CRLF, so a smuggled `<LF>.<CR><LF>` or `<CR><LF>.<LF>` stays inside
  the one message, and rejecting it means one message can never become two (SMTP
  smuggling, RFC 5321 §2.3.8, §4.1.1.4). Logged and counted as `bare_line_ending`.
- A recipient given again in the same transaction (the same mailbox: local part exactly,
  domain case-insensitively, `relay.smtp.domain.mailbox_key`) is answered 250 and kept
  once, as Postfix does: the message is queued, delivered and reported once for it.
- DATA whose header holds more `Received:` fields than `server.max_received_headers` is
  refused with 554 5.4.6 and nothing is queued (RFC 5321 §6.3 loop detection; Postfix
  hopcount_limit). Logged and counted as `too_many_hops`.
- Unexpected exceptions become 451 4.3.0, never a 500 with exception text.
- Every queued message starts with a `Received:` header (RFC 5321 §4.4) naming the HELO
  name, the client address, the TLS version and cipher when STARTTLS was used, the
  protocol (RFC 3848: ESMTP, ESMTPS, ESMTPA, ESMTPSA; SMTP after HELO), the queue id and,
  for a single recipient, `for <address>` (left out when the address holds `;`, `(`, `)`,
  a quote, a backslash or white space). The HELO name is written by
  `relay.inbound.helo.trace_name`: never a character that breaks the header structure.
  The AUTH user is named only with `server.received_auth_user` (Postfix
  smtpd_sasl_authenticated_header, default no).
- Every log line writes client-supplied text (addresses, HELO name) through
  `relay.smtp.address.escaped`: no control character, C1 control or line separator from a
  client reaches the log as itself.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

from relay.config import RelayConfig, ServerConfig
from relay.errors import SpoolError
from relay.inbound.gateway import Gateway, postmaster_route, rcpt_verdict
from relay.inbound.helo import trace_name
from relay.metrics import Metrics
from relay.smtp.address import escaped, log_quoted, wire_safe
from relay.smtp.domain import DomainSyntaxError, ascii_domain, is_address_literal, mailbox_key
from relay.spool.records import QueuedMessage
from relay.spool.store import SpoolStore, new_queue_id

__all__ = ["RelayHandler", "has_bare_line_ending", "received_headers"]

log = logging.getLogger("relay.smtpd")

# The header section ends at the first empty line (RFC 5322 §2.1); bare LF allowed, as
# `server.bare_line_endings = "accept"` stores it.
_HEADER_END = re.compile(rb"^\r?$", re.MULTILINE)
# A Received: field (RFC 5322 §3.6.7; obsolete syntax allows white space before the colon).
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
# A full file system or quota: 452 4.3.1 instead of 451 4.3.0 (RFC 3463 X.3.1).
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
# What a recipient in the Received: FOR clause must not hold (see _received_header).
_TRACE_UNSAFE = re.compile(r'[;()"\\\s]')
# The envelope attribute holding the mailbox keys of the accepted recipients. aiosmtpd
# makes a new Envelope for each transaction (after DATA, RSET, a new MAIL), so it resets.
_RCPT_KEYS = "dane_relay_rcpt_keys"
# The envelope attribute mapping a rewritten recipient to the address the client gave.
_RCPT_ORIGINAL = "dane_relay_rcpt_original"


class RelayHandler:
    def __init__(
        self,
        store: SpoolStore,
        server_cfg: ServerConfig,
        relay_cfg: RelayConfig,
        hostname: str,
        metrics: Metrics,
        on_queued: Callable[[QueuedMessage], None],
        gateway: Gateway | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.gateway = gateway
        self.clock = clock
        self.server_cfg = server_cfg
        self.relay_cfg = relay_cfg
        self.hostname = hostname
        self.metrics = metrics
        self.on_queued = on_queued
        self._late: set[asyncio.Future[QueuedMessage]] = set()  # commits whose session ended

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if not getattr(server, "auth_offered", False):
            # AUTH only on listeners with auth = true (RFC 4954 §3: offered per listener).
            responses = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        return responses

    def _may_relay(self, peer: Any) -> bool:
        try:
            addr = ipaddress.ip_address(peer[0] if isinstance(peer, tuple) else str(peer))
        except (ValueError, IndexError, TypeError):
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.relay_cfg.networks)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        # aiosmtpd hands the null reverse-path over as the text "<>" (RFC 5321 §4.5.5).
        sender = "" if address in ("", "<>") else address
        # An address that could never be put on the wire again is refused at the door.
        if not wire_safe(sender) or (sender and "@" not in sender):
            self.metrics.inbound_rejections.labels("bad_sender").inc()
            log.warning(
                'reject=MAIL client=%s from=<%s> reply="501 5.1.7" reason=bad-sender-syntax',
                _peer_text(session.peer),
                escaped(sender),
            )
            return "501 5.1.7 Bad sender address syntax"
        short = self._storage_short(mail_options)
        if short is not None:
            # RFC 1870 §6.1 (and RFC 5321 §4.2.2, RFC 3463 X.3.1): not enough room now, try
            # later; checked at MAIL so that the client does not send the DATA in vain.
            self.metrics.inbound_rejections.labels("insufficient_storage").inc()
            log.warning(
                'reject=MAIL client=%s from=<%s> reply="452 4.3.1" reason=insufficient-storage '
                'why="%s"',
                _peer_text(session.peer),
                escaped(sender),
                log_quoted(short),
            )
            return "452 4.3.1 Insufficient system storage"
        # Keep aiosmtpd's "<>" (its RCPT state check needs a true value); _sender() maps it.
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        original = address
        route = postmaster_route(address, self.hostname, self.server_cfg.postmaster, self.gateway)
        if route == "":
            # RFC 5321 §4.5.1 makes postmaster a MUST; refused only because nobody is
            # named to receive it, and the reply says so.
            self._refused(
                session, envelope, address, "no_postmaster", "550 5.1.1", "no-postmaster-address"
            )
            return (
                f"550 5.1.1 <{escaped(address)}>: no postmaster address configured "
                "(server.postmaster)"
            )
        if route is not None:
            # RFC 5321 §4.5.1: accepted from any client, no relay check (Postfix rewrites
            # the bare postmaster to postmaster@$myorigin); the checks below still apply.
            address = route
        else:
            privileged = bool(session.authenticated) or self._may_relay(session.peer)
            verdict = rcpt_verdict(address, privileged, self.gateway)
            if verdict.status is not None:
                self._refuse_rcpt(
                    session, envelope, address, verdict.reason, verdict.status, verdict.why
                )
                return f"{verdict.status} <{escaped(address)}>: {verdict.text}"
        if not wire_safe(address):
            self._refused(session, envelope, address, "bad_recipient", "501 5.1.3", "syntax")
            return "501 5.1.3 Bad recipient address syntax"
        local, at, domain = address.rpartition("@")
        if at and local and is_address_literal(domain):
            # RFC 5321 §4.1.3 allows literals, but delivery here is by MX and DANE needs a
            # name (RFC 7672 §2.2.1): refuse now rather than bounce later.
            return self._refuse_rcpt(
                session,
                envelope,
                address,
                "address_literal",
                "550 5.1.2",
                "address literals are not accepted, mail is routed by MX only",
            )
        if not at or not local or not domain or "." not in domain.strip("[]"):
            self._refused(
                session, envelope, address, "bad_recipient", "504 5.5.2", "not-fully-qualified"
            )
            return (
                f"504 5.5.2 <{address}>: Recipient address rejected: need fully-qualified address"
            )
        try:
            # RFC 5321 §2.3.5, RFC 5890/5891, RFC 6531 §3.2: the domain must have a DNS name
            # (IDNA 2008 A-labels); what can never be looked up is refused, not queued.
            ascii_domain(domain)
        except DomainSyntaxError as exc:
            return self._refuse_rcpt(
                session, envelope, address, "bad_domain", "553 5.1.3", f"bad domain syntax: {exc}"
            )
        key = mailbox_key(address)
        seen: set[str] | None = getattr(envelope, _RCPT_KEYS, None)
        if seen is None:
            seen = {mailbox_key(r) for r in envelope.rcpt_tos}
            setattr(envelope, _RCPT_KEYS, seen)
        if key in seen and not rcpt_options:
            # The same mailbox again: accepted (RFC 5321 §4.1.1.3), kept once, so that it
            # is delivered once and its one result is not overwritten (Postfix cleanup).
            log.debug(
                "client=%s to=<%s> duplicate recipient kept once",
                _peer_text(session.peer),
                escaped(address),
            )
            return "250 2.1.5 Ok"
        if len(envelope.rcpt_tos) >= self.server_cfg.max_recipients:
            self._refused(
                session,
                envelope,
                address,
                "too_many_recipients",
                "452 4.5.3",
                f"limit-{self.server_cfg.max_recipients}",
            )
            return "452 4.5.3 Error: too many recipients"
        if rcpt_options:
            return "555 5.5.4 RCPT TO parameters not recognized"
        envelope.rcpt_tos.append(address)
        seen.add(key)
        if original != address:
            log.debug(
                "client=%s to=<%s> orig_to=<%s> postmaster rewritten (RFC 5321 section 4.5.1)",
                _peer_text(session.peer),
                escaped(address),
                escaped(original),
            )
            originals: dict[str, str] = getattr(envelope, _RCPT_ORIGINAL, None) or {}
            originals[address] = original
            setattr(envelope, _RCPT_ORIGINAL, originals)
        return "250 2.1.5 Ok"

    def _refuse_rcpt(
        self, session: Any, envelope: Any, address: str, reason: str, status: str, why: str
    ) -> str:
        """Count, log and word one refused recipient; the address is shown escaped."""
        self._refused(session, envelope, address, reason, status, why)
        return f"{status} <{escaped(address)}>: Recipient address rejected: {why}"

    def _refused(
        self, session: Any, envelope: Any, address: str, reason: str, status: str, why: str
    ) -> None:
        """Count and log one refused recipient (`status`: code and enhanced code)."""
        self.metrics.inbound_rejections.labels(reason).inc()
        shown = escaped(address)
        log.warning(
            'reject=RCPT client=%s from=<%s> to=<%s> reply="%s" reason=%s why=%s',
            _peer_text(session.peer),
            escaped(_sender(envelope)),
            shown,
            status,
            reason.replace("_", "-"),
            why,
        )

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        client = _peer_text(session.peer)
        qid = new_queue_id()
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        # RFC 5321 §2.3.8: CR and LF only as CRLF; a bare one is how SMTP smuggling starts.
        if self.server_cfg.bare_line_endings == "reject" and has_bare_line_ending(content):
            self.metrics.inbound_rejections.labels("bare_line_ending").inc()
            log.warning(
                'reject=DATA client=%s from=<%s> to=%s reply="550 5.5.2" reason=bare-line-ending',
                client,
                escaped(_sender(envelope)),
                _recipients_text(envelope),
            )
            return "550 5.5.2 Message contains bare CR or LF characters (RFC 5321 section 2.3.8)"
        hops = received_headers(content)
        if hops > self.server_cfg.max_received_headers:
            # RFC 5321 §6.3: a loop is detected by counting Received: fields; RFC 3463
            # X.4.6 routing loop detected. Permanent: the same message loops again.
            self.metrics.inbound_rejections.labels("too_many_hops").inc()
            log.warning(
                'reject=DATA client=%s from=<%s> to=%s reply="554 5.4.6" reason=too-many-hops '
                "hops=%d limit=%d",
                client,
                escaped(_sender(envelope)),
                _recipients_text(envelope),
                hops,
                self.server_cfg.max_received_headers,
            )
            return "554 5.4.6 Too many hops"
        body = self._received_header(session, envelope, qid) + content
        commit = asyncio.ensure_future(
            asyncio.to_thread(
                self.store.commit,
                sender=_sender(envelope),
                recipients=list(envelope.rcpt_tos),
                body=body,
                client=client,
                helo=session.host_name or "",
                queue_id=qid,
                smtputf8=_needs_smtputf8(envelope),
            )
        )
        try:
            msg = await asyncio.shield(commit)
        except asyncio.CancelledError:
            # The session was cancelled (its client went away) while the commit runs on in
            # its thread: a message it stores is queued like any other, so the runner gets
            # it too (no 250 was sent: the client may send it again).
            self._late.add(commit)
            commit.add_done_callback(self._committed_late)
            raise
        except SpoolError as exc:
            if exc.errno in _NO_SPACE:
                # RFC 5321 §4.2.2 452, RFC 3463 X.3.1: the system is out of storage.
                self.metrics.inbound_rejections.labels("insufficient_storage").inc()
                log.error(
                    'reject=DATA client=%s from=<%s> reply="452 4.3.1" '
                    'reason=insufficient-storage why="%s"',
                    client,
                    escaped(_sender(envelope)),
                    log_quoted(exc),
                )
                return "452 4.3.1 Insufficient system storage"
            self.metrics.inbound_rejections.labels("spool_error").inc()
            log.error(
                'reject=DATA client=%s from=<%s> reply="451 4.3.0" reason=spool-error why="%s"',
                client,
                escaped(_sender(envelope)),
                log_quoted(exc),
            )
            return "451 4.3.0 Error: queue file write error"
        self.metrics.messages_received.inc()
        self.metrics.bytes_received.inc(len(body))
        originals: dict[str, str] = getattr(envelope, _RCPT_ORIGINAL, None) or {}
        orig = ",".join(f"<{escaped(originals[r])}>" for r in envelope.rcpt_tos if r in originals)
        log.info(
            "queue_id=%s client=%s from=<%s> to=%s%s size=%d status=queued",
            qid,
            client,
            escaped(msg.sender),
            _recipients_text(envelope),
            f" orig_to={orig}" if orig else "",
            len(body),
        )
        self.on_queued(msg)
        return f"250 2.0.0 Ok: queued as {qid}"

    def _committed_late(self, commit: asyncio.Future[QueuedMessage]) -> None:
        self._late.discard(commit)
        if commit.cancelled():
            return  # the loop is closing: whatever the thread stored is recovered at start
        exc = commit.exception()
        if exc is not None:
            # Nothing is queued, and the client, gone, was told nothing.
            log.error(
                'reject=DATA reason=spool-error why="%s" (client gone before the reply)',
                log_quoted(exc),
            )
            return
        msg = commit.result()
        # Queued like any other (counted and logged with its recipients), but no 250 was
        # sent: the client may send it again.
        self.metrics.messages_received.inc()
        self.metrics.bytes_received.inc(msg.size)
        log.info(
            "queue_id=%s client=%s from=<%s> to=%s size=%d status=queued "
            "reason=client-gone-before-reply",
            msg.queue_id,
            msg.client,
            escaped(msg.sender),
            ",".join(f"<{escaped(r.address)}>" for r in msg.recipients),
            msg.size,
        )
        self.on_queued(msg)

    def _storage_short(self, mail_options: list[str]) -> str | None:
        """Why the spool cannot take this message now (None: it can): its file system has
        less free than server.queue_minfree plus the SIZE= the client declared."""
        declared = _declared_size(mail_options)
        need = self.server_cfg.queue_minfree + declared
        if need <= 0:
            return None
        try:
            st = os.statvfs(self.store.directory)
        except OSError as exc:
            return f"cannot check the free space: {exc.strerror or exc}"
        free = st.f_bavail * st.f_frsize  # what an unprivileged writer may use
        if free >= need:
            return None
        return (
            f"{free} bytes free, need {need} "
            f"(queue_minfree {self.server_cfg.queue_minfree} + SIZE {declared})"
        )

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtpd internal error: %r", error, exc_info=error)
        return "451 4.3.0 Internal error, try again later"

    def _received_header(self, session: Any, envelope: Any, qid: str) -> bytes:
        """RFC 5321 §4.4 trace header; the WITH protocol names per RFC 3848."""
        tls = getattr(session, "ssl", None) or {}
        ssl_object = tls.get("ssl_object") if isinstance(tls, dict) else None
        authenticated = bool(getattr(session, "authenticated", False))
        if not getattr(session, "extended_smtp", False):
            proto = "SMTP"
        else:
            proto = (
                "ESMTP" + ("S" if ssl_object is not None else "") + ("A" if authenticated else "")
            )
        # A HELO name is client data: validated at HELO/EHLO, and written here so that it
        # can never carry ";", "(", ")", CR, LF or a control (RFC 5322 §2.2, §3.6.7).
        helo = trace_name(session.host_name or "unknown")
        peer = _peer_text(session.peer)
        # RFC 5321 §4.1.3: an IPv6 address literal carries the "IPv6:" tag.
        literal = f"IPv6:{peer}" if ":" in peer else peer
        lines = [f"Received: from {helo} ([{literal}])"]
        if ssl_object is not None:
            cipher, version, bits = ssl_object.cipher() or ("unknown", "unknown", 0)
            # Python reports the secret bits only; every TLS 1.2+ cipher the listener allows
            # uses all of its algorithm's bits, so both figures of Postfix's form agree.
            lines.append(f"\t(using {version} with cipher {cipher} ({bits}/{bits} bits))")
        if authenticated and self.server_cfg.received_auth_user:
            login = getattr(getattr(session, "auth_data", None), "login", b"")
            user = login.decode("utf-8", "replace") if isinstance(login, bytes) else str(login)
            lines.append(f"\t(Authenticated sender: {escaped(user)[:255]})")
        rcpt = ""
        if len(envelope.rcpt_tos) == 1 and not _TRACE_UNSAFE.search(envelope.rcpt_tos[0]):
            # RFC 5321 §4.4: the FOR clause is optional; left out for an address whose
            # quoted local part holds ";", "(", ")" or a quote, which a reader of the header
            # could take for the end of the clauses or a comment (a forged date).
            rcpt = f"\r\n\tfor <{envelope.rcpt_tos[0]}>"
        date = email.utils.formatdate(self.clock(), localtime=False)
        lines.append(f"\tby {self.hostname} (dane-relay) with {proto} id {qid}{rcpt};")
        lines.append(f"\t{date}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def has_bare_line_ending(content: bytes) -> bool:
    """True when `content` has a CR not followed by LF or an LF not preceded by CR."""
    rest = content.replace(b"\r\n", b"")
    return b"\r" in rest or b"\n" in rest


def received_headers(content: bytes) -> int:
    """How many Received: fields the header section of `content` holds (the body and
    anything after the first empty line are not looked at)."""
    end = _HEADER_END.search(content)
    return len(_RECEIVED.findall(content, 0, end.start() if end else len(content)))


def _declared_size(mail_options: list[str]) -> int:
    """The SIZE= of MAIL FROM (RFC 1870 §6), 0 when absent or not a number."""
    for option in mail_options:
        key, _, value = str(option).partition("=")
        if key.upper() == "SIZE":
            return int(value) if value.isdigit() and len(value) <= 20 else 0
    return 0


def _sender(envelope: Any) -> str:
    """The reverse-path; aiosmtpd keeps the null path as the text "<>" (RFC 5321 §4.5.5)."""
    mail_from = str(envelope.mail_from or "")
    return "" if mail_from == "<>" else mail_from


def _needs_smtputf8(envelope: Any) -> bool:
    """RFC 6531 §3.4: the client asked for SMTPUTF8, or the envelope is not ASCII."""
    options = [str(o).upper() for o in envelope.mail_options]
    addresses = [_sender(envelope), *envelope.rcpt_tos]
    return "SMTPUTF8" in options or not all(a.isascii() for a in addresses)


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def _recipients_text(envelope: Any) -> str:
    """The transaction's recipients for a log line: `<a>,<b>`, each escaped."""
    return ",".join(f"<{escaped(r)}>" for r in envelope.rcpt_tos)
