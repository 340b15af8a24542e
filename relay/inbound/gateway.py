"""Relay control at RCPT: who may send mail to which recipient (relaying vs gateway mode).

Contract:
- `rcpt_verdict(address, privileged, gateway)` is the whole decision, pure: it returns a
  `RcptVerdict` with `status` None (go on with the address checks) or the refusal
  (`status`, `reason` label for the metric, `why` for the log). It never raises.
- A privileged client (its address in `relay.networks`, or authenticated by AUTH) may
  relay to any domain. Anyone else may only send to a gateway domain ([gateway] domains);
  everything else is refused `550 5.7.1 Relay access denied` (RFC 5321 §3.6.2: a server
  that declines to relay for policy reasons SHOULD answer 550; RFC 3463 5.7.1 "delivery
  not authorized"). 554 is kept for a refused session or transaction (RFC 5321 §4.2.2,
  §3.1), not for one recipient.
- Domains are compared in their `ascii_domain` form (lower case, A-labels, one final dot
  dropped): `user@LOCAL.EXAMPLE.` is `user@local.example`. An address literal or a domain
  with bad syntax is never a gateway domain. Source routes (`<@a:u@b>`) never reach here:
  aiosmtpd keeps only the final mailbox, as RFC 5321 §3.6.1 and §4.1.4 require.
- Sender-specified routing in the local part (`u%outside@local`, `outside!u@local`,
  `"u@outside"@local`) is refused for an unprivileged client even for a gateway domain
  (Postfix reject_unauth_destination does the same): a downstream server that still
  honours the percent hack or bang paths would otherwise relay it onwards.
- With a recipient list (`[gateway] recipients` and/or `recipients_file`) a gateway-domain
  recipient not on it gets `550 5.1.1` (RFC 3463 "bad destination mailbox address"), from
  any client. Entries "user@domain" match the local part case-insensitively; "@domain"
  accepts every user of the domain. `postmaster@<gateway domain>` (any case) is accepted
  even when the list does not name it (RFC 5321 §4.5.1 MUST).
- `postmaster_route(address, hostname, configured, gateway)` (pure) says whether a
  recipient is the server's own postmaster, `<postmaster>` without a domain or
  `postmaster@<server.hostname>` (any case; RFC 5321 §4.5.1), and where it goes:
  `server.postmaster` when set, else `postmaster@<the first gateway domain>`, else ""
  (no address configured: the caller refuses it and says why).
- `RecipientTable` reads `recipients_file` (one entry a line, `#` comments) and reads it
  again when it changes; a file that became unreadable or malformed keeps the last good
  entries and logs an ERROR once per change. `load_gateway(cfg)` builds the `Gateway` at
  start-up and raises `ConfigError` naming the file and line of a bad entry.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from relay.config import Config, GatewayConfig, recipient_key
from relay.errors import ConfigError
from relay.files import open_regular
from relay.smtp.domain import DomainSyntaxError, ascii_domain

__all__ = [
    "Gateway",
    "RcptVerdict",
    "RecipientTable",
    "load_gateway",
    "postmaster_route",
    "rcpt_verdict",
]

log = logging.getLogger("relay.smtpd")

# Local-part characters that route mail onwards on some servers: RFC 1123 §5.2.16 and
# the percent hack, UUCP bang paths, and "@" inside a quoted local part.
_ROUTING = frozenset("%!@")


class RecipientFileError(ValueError):
    """A malformed recipients file; the message names the line."""


def parse_recipients(text: str, source: str) -> frozenset[str]:
    """The normalised entries of a recipients file.

    Raises:
        RecipientFileError: "SOURCE line N: expected …, got …".
    """
    keys = set()
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            keys.add(recipient_key(stripped))
        except ValueError as exc:
            raise RecipientFileError(
                f"{source} line {number}: expected {exc}, got {line[:60]!r}"
            ) from None
    return frozenset(keys)


_Stamp = tuple[int, int, int]


class RecipientTable:
    """`recipients_file`, read again when its inode, mtime or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: _Stamp | None = None
        self._failed: _Stamp | None = None
        self.keys: frozenset[str] = frozenset()
        self.load()

    def load(self) -> None:
        """Read the file now.

        Raises:
            OSError: unreadable. RecipientFileError: malformed (names the line).
        """
        with open_regular(self.path, encoding="utf-8") as fh:  # a FIFO would block
            st = os.fstat(fh.fileno())
            text = fh.read()
        self.keys = parse_recipients(text, str(self.path))
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> frozenset[str]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError as exc:
            stamp, why = (-1, -1, -1), f"cannot read: {exc.strerror or exc}"
        else:
            if stamp in (self._stamp, self._failed):
                return self.keys
            try:
                self.load()
            except (OSError, UnicodeDecodeError, RecipientFileError) as exc:
                why = str(exc)
            else:
                self._failed = None
                log.info("recipients_file=%s reloaded entries=%d", self.path, len(self.keys))
                return self.keys
        if stamp != self._failed:
            log.error(
                "recipients_file=%s not reloaded, the previous entries stay: %s", self.path, why
            )
        self._failed = stamp
        return self.keys


@dataclass
class Gateway:
    """The gateway domains and, when configured, the recipients accepted for them."""

    domains: frozenset[str]
    recipients: frozenset[str] = frozenset()
    table: RecipientTable | None = None
    # The first of gateway.domains as configured (`domains` is a set): where the bare
    # <postmaster> goes when server.postmaster is unset. "": the alphabetically first.
    first_domain: str = ""

    @property
    def postmaster(self) -> str:
        return f"postmaster@{self.first_domain or min(self.domains)}"

    @property
    def checks_recipients(self) -> bool:
        return bool(self.recipients) or self.table is not None

    def knows(self, key: str, domain: str) -> bool:
        """Whether the normalised `key` ("user@domain") is on the recipient list."""
        listed = self.recipients | (self.table.current() if self.table is not None else set())
        return key in listed or f"@{domain}" in listed


@dataclass(frozen=True, slots=True)
class RcptVerdict:
    status: str | None = None  # "550 5.7.1" / "550 5.1.1"; None: not refused here
    reason: str = ""  # metric label
    why: str = ""  # log text
    text: str = ""  # reply text after "<address>: "


_ACCEPT = RcptVerdict()


def rcpt_verdict(address: str, privileged: bool, gateway: Gateway | None) -> RcptVerdict:
    """May this recipient be accepted from this client (see the module docstring)?"""
    local, at, domain_text = address.rpartition("@")
    try:
        domain: str | None = ascii_domain(domain_text) if at and local else None
    except DomainSyntaxError:
        domain = None
    local_domain = gateway is not None and domain is not None and domain in gateway.domains
    if not privileged:
        if not local_domain:
            # RFC 5321 §3.6.2: not ours and not a client we relay for.
            return _denied("not-a-local-domain")
        if _ROUTING & set(local.strip('"')):
            # Sender-specified routing to a gateway domain (RFC 5321 §3.6.1, Postfix
            # reject_unauth_destination): the next server might relay it onwards.
            return _denied("sender-specified-routing")
    if (
        local_domain
        and gateway is not None
        and gateway.checks_recipients
        # RFC 5321 §4.5.1: postmaster at every domain the server accepts mail for, MUST.
        and local.lower() != "postmaster"
    ):
        assert domain is not None
        key = f"{local.lower()}@{domain}"
        if not gateway.knows(key, domain):
            return RcptVerdict(
                "550 5.1.1",
                "unknown_recipient",
                "not in the gateway recipient list",
                "Recipient address rejected: User unknown in local recipient table",
            )
    return _ACCEPT


def postmaster_route(
    address: str, hostname: str, configured: str, gateway: Gateway | None
) -> str | None:
    """None: `address` is not this server's postmaster. Otherwise the address it is
    rewritten to ("" when none is configured; see the module docstring)."""
    local, at, domain_text = address.rpartition("@")
    if not at:
        # RFC 5321 §4.5.1: "Postmaster" with no domain, the local part case-insensitive.
        if address.lower() != "postmaster":
            return None
    else:
        if local.lower() != "postmaster":
            return None
        try:
            if ascii_domain(domain_text) != ascii_domain(hostname):
                return None
        except DomainSyntaxError:
            return None
    if configured:
        return configured
    if gateway is not None and gateway.domains:
        return gateway.postmaster
    return ""


def _denied(why: str) -> RcptVerdict:
    return RcptVerdict("550 5.7.1", "relay_denied", why, "Relay access denied")


def load_gateway(cfg: Config) -> Gateway | None:
    """The `Gateway` of [gateway], None when gateway mode is off.

    Raises:
        ConfigError: recipients_file unreadable or malformed (names the file and line).
    """
    gw: GatewayConfig = cfg.gateway
    if not gw.enabled:
        return None
    table = None
    if gw.recipients_file is not None:
        try:
            table = RecipientTable(gw.recipients_file)
        except OSError as exc:
            raise ConfigError(
                f"{cfg.path}: gateway.recipients_file: expected a readable file, got "
                f"{str(gw.recipients_file)!r} ({exc.strerror or exc})"
            ) from exc
        except (UnicodeDecodeError, RecipientFileError) as exc:
            raise ConfigError(f"{cfg.path}: gateway.recipients_file: {exc}") from exc
        strays = sorted(k for k in table.keys if k.rpartition("@")[2] not in gw.domains)
        if strays:
            raise ConfigError(
                f"{cfg.path}: gateway.recipients_file: expected addresses in gateway.domains, "
                f"got {strays[0]!r} ({gw.recipients_file})"
            )
    return Gateway(frozenset(gw.domains), frozenset(gw.recipients), table, gw.domains[0])
