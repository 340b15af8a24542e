"""Delivery status notifications (RFC 3464) for recipients that failed permanently
(`build_dsn`, Action: failed) and, once per message, for recipients still being retried
after `delivery.delay_warning_after` (`build_delay_dsn`, Action: delayed, with the last
reply and Will-Retry-Until).

Pure: builds the bytes of a multipart/report message from values; the runner
queues it with the null reverse-path so that it can never cause another bounce
(RFC 5321 §4.5.5).

Remote-MTA (RFC 3464 §2.3.5) is written only when the relay reached a server, and the
Diagnostic-Code (§2.3.6) is of type "smtp" only for a reply that server sent; a reply the
relay wrote itself (a mail loop, a DNS, DANE or TLS failure, queue lifetime expiry) is of
type "X-Dane-Relay" (relay.spool.runner decides both).

Each failed recipient gets a Last-Attempt-Date (RFC 3464 §2.3.7) and, in the
human-readable part, the last `DSN_STEPS` steps of its attempt history (time,
host[address]:port, TLS, DANE, reply), so the sender can see e.g. that the first MX
failed DANE and the second refused the recipient.

A report that names a non-ASCII address (a UTF-8 local part, a U-label domain) or holds
other non-ASCII text in its machine-readable part is internationalised (RFC 6533): the
status part is message/global-delivery-status (§6.1), a non-ASCII recipient is written
with the "utf-8" address type (§3), a returned header section that is not ASCII is
message/global-headers (§6.3), and the human-readable part says charset=utf-8 when it
is not ASCII. Such a report needs SMTPUTF8 to travel (`needs_smtputf8`). An ASCII-only
report is a plain RFC 3464 one, unchanged.
"""

from __future__ import annotations

import email.utils
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from relay.model import Step

__all__ = [
    "DSN_STEPS",
    "DelayedRecipient",
    "FailedRecipient",
    "build_delay_dsn",
    "build_dsn",
    "delay_status",
    "needs_smtputf8",
    "original_headers",
]

_MAX_HEADERS = 64 * 1024
_MAX_BOUNDARY = 70
#: Steps of a recipient's attempt history told in a DSN (the most recent ones).
DSN_STEPS = 6


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    address: str
    status: str  # enhanced status code, e.g. "5.1.1"
    diagnostic: str  # the reply, e.g. "550 5.1.1 user unknown"
    remote_mta: str = ""  # host name of the server the relay talked to, or "" (none)
    last_attempt: float | None = None  # epoch seconds of the last attempt (Last-Attempt-Date)
    # RFC 3464 §2.3.6: "smtp" for a reply the remote MTA sent; an X- type for the relay's own
    diagnostic_type: str = "smtp"
    history: tuple[Step, ...] = ()  # the recipient's attempt history, oldest first
    history_dropped: int = 0  # steps the queue record no longer holds


@dataclass(frozen=True, slots=True)
class DelayedRecipient:
    address: str
    status: str  # enhanced status code of the last attempt, 4.x.x (RFC 3464 §2.3.4)
    diagnostic: str  # the last reply, e.g. "451 4.7.5 Server certificate not verified"
    remote_mta: str = ""  # host name of the server the relay talked to, or "" (none)
    last_attempt: float | None = None  # epoch seconds of the last attempt
    diagnostic_type: str = "smtp"  # as FailedRecipient.diagnostic_type


def original_headers(body: bytes) -> bytes:
    """The header section of a message (up to the first empty line), capped in size."""
    text = body.replace(b"\r\n", b"\n")
    end = text.find(b"\n\n")
    headers = text if end < 0 else text[: end + 1]
    return headers[:_MAX_HEADERS].replace(b"\n", b"\r\n")


def build_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    sender: str,
    arrival: float,
    now: float,
    failed: Sequence[FailedRecipient],
    headers: bytes,
) -> bytes:
    # RFC 2046 §5.1.1: at most 70 characters; the host name is only a readable suffix.
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{reporting_mta}"[:_MAX_BOUNDARY]
    date = email.utils.formatdate(now, localtime=False)
    arrived = _date(arrival)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: {email.utils.make_msgid(domain=reporting_mta)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
    ]
    text = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It has been returned with the reasons below.",
        "",
    ]
    for f in failed:
        where = f" (from {f.remote_mta})" if f.remote_mta else ""
        text.append(f"<{f.address}>: {f.diagnostic}{where}")
        text += _history_lines(f)
    status = [f"Reporting-MTA: dns; {reporting_mta}", f"X-Queue-ID: {queue_id}"]
    if arrived:
        status.append(f"Arrival-Date: {arrived}")
    for f in failed:
        status += [
            "",
            f"Final-Recipient: {_recipient(f.address)}",
            "Action: failed",
            f"Status: {f.status}",
        ]
        if f.remote_mta:
            status.append(f"Remote-MTA: dns; {f.remote_mta}")
        status.append(f"Diagnostic-Code: {f.diagnostic_type}; {f.diagnostic}")
        if _date(f.last_attempt):
            status.append(f"Last-Attempt-Date: {_date(f.last_attempt)}")
    return _assemble(lines, boundary, text, status, headers)


def build_delay_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    sender: str,
    arrival: float,
    now: float,
    delayed: Sequence[DelayedRecipient],
    will_retry_until: float,
    headers: bytes,
) -> bytes:
    """A delay warning: the message is still queued and will be retried until
    `will_retry_until` (epoch seconds; the end of the queue lifetime)."""
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{reporting_mta}"[:_MAX_BOUNDARY]
    retry_until = _date(will_retry_until)
    until = retry_until or "the end of its queue lifetime"
    arrived = _date(arrival)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        "Subject: Delayed Mail (still being retried)",
        f"Date: {email.utils.formatdate(now, localtime=False)}",
        f"Message-ID: {email.utils.make_msgid(domain=reporting_mta)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
    ]
    text = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "####################################################################",
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
        "####################################################################",
        "",
        "Your message could not be delivered yet to the recipients below.",
        f"It is still queued and will be retried until {until}.",
        "",
    ]
    for d in delayed:
        where = f" (from {d.remote_mta})" if d.remote_mta else ""
        text.append(f"<{d.address}>: {d.diagnostic}{where}")
    status = [f"Reporting-MTA: dns; {reporting_mta}", f"X-Queue-ID: {queue_id}"]
    if arrived:
        status.append(f"Arrival-Date: {arrived}")
    for d in delayed:
        status += [
            "",
            f"Final-Recipient: {_recipient(d.address)}",
            "Action: delayed",  # RFC 3464 §2.3.3
            f"Status: {d.status}",
        ]
        if d.remote_mta:
            status.append(f"Remote-MTA: dns; {d.remote_mta}")
        status.append(f"Diagnostic-Code: {d.diagnostic_type}; {d.diagnostic}")
        if _date(d.last_attempt):
            status.append(f"Last-Attempt-Date: {_date(d.last_attempt)}")
        if retry_until:  # RFC 3464 §2.3.9: for "delayed" DSNs only
            status.append(f"Will-Retry-Until: {retry_until}")
    return _assemble(lines, boundary, text, status, headers)


def needs_smtputf8(report: bytes) -> bool:
    """Whether a report built here must travel with SMTPUTF8 (RFC 6531 §3.4): only when
    its own header section is not ASCII (a UTF-8 sender address in To:). Its
    message/global-* parts do not need it: RFC 6533 §6 lets them pass through non-SMTPUTF8
    (even 7-bit) infrastructure as 8bit or base64 body parts, so a report about
    jörg@bücher.test still reaches an ASCII sender whose server lacks SMTPUTF8."""
    head, _, _ = report.partition(b"\r\n\r\n")
    return not head.isascii()


def delay_status(enhanced: str) -> str:
    """The Status of a delayed recipient: its last reply's enhanced code when that is a
    4.x.x, else 4.0.0 (RFC 3464 §2.3.4: a delayed DSN carries a transient status)."""
    return enhanced if enhanced.startswith("4.") else "4.0.0"


def _history_lines(f: FailedRecipient) -> list[str]:
    """The most recent DSN_STEPS steps, one line each, for the human-readable part."""
    if not f.history:
        return []
    shown = f.history[-DSN_STEPS:]
    lines = ["    Delivery attempts (oldest first):"]
    earlier = f.history_dropped + len(f.history) - len(shown)
    if earlier:
        lines.append(f"    ({earlier} earlier not shown)")
    for step in shown:
        try:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(step.time))
        except (ValueError, OverflowError, OSError):
            when = "(no valid time)"  # a damaged record
        reply = " ".join(step.reply.split())  # one line, whatever the reply held
        lines.append(f"    {when} {step.where} tls={step.tls} dane={step.dane}: {reply}")
    return lines


def _date(epoch: float | None) -> str:
    """An RFC 5322 date, or "" for none or a time no date can show (a damaged queue
    record's NaN, infinity or far-off value): the DSN then omits that optional field
    rather than fail to be built, which would leave the bounce unsent."""
    if epoch is None:
        return ""
    try:
        return email.utils.formatdate(epoch, localtime=False)
    except (ValueError, OverflowError, OSError):
        return ""


def _recipient(address: str) -> str:
    """An original-/final-recipient field value: "rfc822" for an ASCII address (RFC 3464
    §2.3.2), else the "utf-8" type of RFC 6533 §3 in its utf-8-addr-unitext form."""
    if address.isascii():
        return f"rfc822; {address}"
    # RFC 6533 §3: QUCHAR is UTF-8 or printable ASCII but '\\', '+' and '='; those, space
    # and controls are written as EmbeddedUnicodeChar "\\x{HEXPOINT}" (2 hex digits).
    quoted = "".join(
        f"\\x{{{ord(c):02X}}}" if c.isascii() and (not c.isprintable() or c in " \\+=") else c
        for c in address
    )
    return f"utf-8; {quoted}"


def _assemble(
    head: list[str], boundary: str, text: list[str], status: list[str], headers: bytes
) -> bytes:
    """The report from its header lines, human-readable part, status fields and the
    returned header section; each part's type is chosen by what it holds (RFC 6533)."""
    text_ascii = all(line.isascii() for line in text)
    status_ascii = all(line.isascii() for line in status)
    lines = [*head, f"--{boundary}"]
    if text_ascii:
        lines.append("Content-Type: text/plain; charset=us-ascii")
    else:
        # RFC 2046 §4.1.2 / RFC 6152: UTF-8 text, sent as 8-bit.
        lines += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    lines += ["", *text, "", f"--{boundary}"]
    if status_ascii:
        lines.append("Content-Type: message/delivery-status")  # RFC 3464 §2.1: US-ASCII only
    else:
        # RFC 6533 §6.1: the status fields hold UTF-8 (an address, a host name, a reply).
        lines += ["Content-Type: message/global-delivery-status", "Content-Transfer-Encoding: 8bit"]
    lines += ["", *status, "", f"--{boundary}"]
    if headers.isascii():
        lines.append("Content-Type: text/rfc822-headers")  # RFC 6522 §4 (RFC 3462)
    else:
        # RFC 6533 §6.3: the returned header section holds UTF-8 header fields (RFC 6532).
        lines += ["Content-Type: message/global-headers", "Content-Transfer-Encoding: 8bit"]
    lines.append("")
    out = "\r\n".join(lines).encode("utf-8", "replace") + b"\r\n" + headers
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + f"\r\n--{boundary}--\r\n".encode()
