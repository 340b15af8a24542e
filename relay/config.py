"""Configuration: one TOML file loaded once into frozen dataclasses.

Contract: `load_config(path)` returns a fully validated `Config` or raises
`ConfigError` whose message has the form ``FILE: KEY: expected …, got …``.
Unknown sections and keys, wrong types and out-of-range values are all errors;
nothing is silently ignored. Every default lives here and nowhere else.

This module does no I/O beyond reading the one file, and reads no system state
except when `server.hostname` is unset (then the host's FQDN is used; that is
resolved by the caller through `default_hostname`).
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from relay.errors import ConfigError
from relay.smtp.domain import DomainSyntaxError, ascii_domain

__all__ = [
    "Config",
    "DeliveryConfig",
    "DnsConfig",
    "Endpoint",
    "GatewayConfig",
    "Listener",
    "LogConfig",
    "MetricsConfig",
    "NextHop",
    "RelayConfig",
    "ServerConfig",
    "SpoolConfig",
    "ADDRESS_PREFERENCES",
    "BARE_LINE_ENDINGS",
    "INSECURE_MX_POLICIES",
    "PROBE_TYPES",
    "TLS_LEVELS",
    "TlsConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_endpoint",
    "parse_next_hop",
    "recipient_key",
    "NAME_LEVELS",
]

# Postfix-compatible security level names (DESIGN.md "TLS security levels").
TLS_LEVELS = ("none", "may", "encrypt", "dane", "dane-only", "verify", "secure")
# What level "dane" means for a host with secure TLSA reached through an insecure MX RRset
# (RFC 7672 §2.2.1; Postfix smtp_tls_dane_insecure_mx_policy).
INSECURE_MX_POLICIES = ("dane", "encrypt", "may")
# What the inbound listener does with a bare CR or LF in DATA (RFC 5321 §2.3.8).
BARE_LINE_ENDINGS = ("reject", "accept")
# Which address family of an MX host is tried first (Postfix smtp_address_preference).
ADDRESS_PREFERENCES = ("any", "ipv6", "ipv4")
# Record types the resolver validation probe may ask for.
PROBE_TYPES = ("DNSKEY", "SOA", "NS", "DS", "A", "AAAA", "MX", "TXT", "TLSA")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host and port to listen on or connect to."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Listener(Endpoint):
    """A listen address written as a table, with its own options.

    `require_tls`: MAIL before STARTTLS gets 530 5.7.0 (RFC 3207 §4). `auth`: AUTH is
    offered here (after STARTTLS, when `server.auth_file` is set).
    """

    require_tls: bool = False
    auth: bool = False


@dataclass(frozen=True, slots=True)
class NextHop:
    """Where mail for a domain goes instead of its own MX hosts (Postfix transport syntax).

    `[host]` or `[host]:port`: connect to that host, no MX lookup (`mx` False). `host` or
    `host:port`: look up the MX records of `host`. `port` None: `delivery.port`.
    `[192.0.2.1]`, `[IPv6:2001:db8::1]` (or `[2001:db8::1]`): an address literal; `host`
    holds the address in its compressed form and nothing is looked up (`literal`).
    """

    host: str
    port: int | None = None
    mx: bool = True

    @property
    def literal(self) -> bool:
        """Whether `host` is an IP address (an address literal next hop, never `mx`)."""
        return _is_ip(self.host)

    def __str__(self) -> str:
        if not self.mx and ":" in self.host:
            text = f"[IPv6:{self.host}]"  # RFC 5321 §4.1.3 IPv6-address-literal
        else:
            text = self.host if self.mx else f"[{self.host}]"
        return text if self.port is None else f"{text}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", 2525),)
    hostname: str | None = None
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 1000
    # RFC 5321 §6.3 loop detection: DATA with more Received: fields is refused 554 5.4.6
    # (Postfix hopcount_limit, default 50).
    max_received_headers: int = 50
    # RFC 5321 §4.5.3.2.7: a server should wait at least 5 minutes for the next command.
    timeout: float = 300.0
    # RFC 5321 §2.3.8/§4.1.1.4: a bare CR or LF in DATA ("reject": 550 5.5.2, nothing
    # queued; "accept": stored as received, delivery writes CRLF) - SMTP smuggling defence.
    bare_line_endings: str = "reject"
    # Simultaneous SMTP connections overall and from one client address; more get
    # 421 4.7.0 (Postfix smtpd_client_connection_count_limit, default_process_limit).
    max_connections: int = 100
    max_connections_per_client: int = 10
    # STARTTLS (RFC 3207) is offered when both are set: PEM certificate chain and key.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # AUTH PLAIN/LOGIN (RFC 4954), after STARTTLS, on listeners with auth = true: the
    # "user:scrypt$…" file (dane-relay passwd), and the per-client failure limit.
    auth_file: Path | None = None
    auth_failure_limit: int = 5
    auth_failure_window: float = 600.0
    # Received: header of an authenticated session: name the AUTH user in it (Postfix
    # smtpd_sasl_authenticated_header, default no: the user stays private).
    received_auth_user: bool = False
    # Error replies (4xx/5xx) one session may get without delivering mail (Postfix
    # smtpd_soft_error_limit, smtpd_hard_error_limit, smtpd_error_sleep_time): after
    # soft_error_limit errors each further error reply waits error_sleep_time; at
    # hard_error_limit the session gets 421 4.7.0 and is closed (RFC 5321 §3.8).
    soft_error_limit: int = 10
    hard_error_limit: int = 20
    error_sleep_time: float = 1.0
    # Free space the spool's file system must keep: MAIL gets 452 4.3.1 when less is free,
    # or less than this plus the SIZE= the client declared (RFC 1870 §6.1; Postfix
    # queue_minfree). 0: only the declared SIZE must fit.
    queue_minfree: int = 100 * 1024 * 1024
    # SIGTERM: listeners close at once; open SMTP sessions and running deliveries get this
    # long to finish, then whatever is left stays queued.
    shutdown_grace: float = 20.0
    # RFC 5321 §4.5.1: where RCPT TO:<postmaster> (no domain) and postmaster@hostname go,
    # from any client (Postfix: postmaster@$myorigin). "": unset (then the first gateway
    # domain's postmaster, or refused with a reply that says why).
    postmaster: str = ""


@dataclass(frozen=True, slots=True)
class RelayConfig:
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    directory: Path = Path("var/spool")


@dataclass(frozen=True, slots=True)
class DnsConfig:
    resolvers: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", 53),)
    timeout: float = 10.0
    # RFC 7672 §2.1 requires a validating resolver whose AD bit can be trusted:
    # only loopback resolvers are trusted unless the operator says otherwise.
    allow_remote_resolver: bool = False
    # Answer cache: entries (0 disables it) and the bounds put on the TTLs it honours.
    cache_size: int = 10000
    cache_min_ttl: float = 0.0
    cache_max_ttl: float = 3600.0
    cache_negative_ttl: float = 300.0  # upper bound for NXDOMAIN/NODATA (RFC 2308 §5)
    # The resolver must prove that it validates: this name/type must come back secure.
    validation_probe_name: str = "."
    validation_probe_type: str = "DNSKEY"
    validation_interval: float = 300.0
    require_validating_resolver: bool = False


@dataclass(frozen=True, slots=True)
class TlsConfig:
    level: str = "dane"
    insecure_mx_policy: str = "dane"
    # Levels verify/secure: PEM CA certificates that replace the system trust store.
    ca_file: Path | None = None
    # [tls.policy]: (domain or ".parent", level) pairs; exact beats ".parent" beats `level`.
    policy: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    port: int = 25
    concurrency: int = 20
    connect_timeout: float = 30.0
    # The general reply timeout (greeting, EHLO/HELO, STARTTLS, RSET, QUIT).
    command_timeout: float = 300.0
    # RFC 5321 §4.5.3.2 per-command reply timeouts (relay.delivery.client.TIMEOUTS holds the
    # same values; Postfix smtp_mail_timeout, smtp_rcpt_timeout, smtp_data_init_timeout,
    # smtp_data_xfer_timeout, smtp_data_done_timeout).
    mail_timeout: float = 300.0  # §4.5.3.2.2 MAIL
    rcpt_timeout: float = 300.0  # §4.5.3.2.3 RCPT
    data_init_timeout: float = 120.0  # §4.5.3.2.4 DATA initiation (the 354)
    data_block_timeout: float = 180.0  # §4.5.3.2.5 each block of message content written
    data_done_timeout: float = 600.0  # §4.5.3.2.6 the reply after the final "."
    # MX hosts considered per delivery attempt, most preferred first (the default of
    # relay.delivery.planner.MAX_MX_HOSTS). Postfix has no direct twin: it bounds the same
    # work with smtp_mx_address_limit and smtp_mx_session_limit.
    mx_host_limit: int = 10
    # Connection attempts (addresses tried) per next-hop domain and delivery attempt, over
    # all its MX hosts (relay.delivery.engine.MAX_CONNECTIONS_PER_DOMAIN; Postfix
    # smtp_mx_address_limit, default 5).
    mx_address_limit: int = 5
    # "any": each host's addresses as DNS gave them (A before AAAA); "ipv6"/"ipv4": that
    # family first (Postfix smtp_address_preference, default "any").
    address_preference: str = "any"
    # Deliveries in progress at once to one destination (next hop and level); Postfix
    # default_destination_concurrency_limit (20).
    destination_concurrency: int = 20
    # Connection reuse: an idle verified connection is kept this long for the next message
    # to the same destination (0: no reuse; Postfix smtp_connection_cache_time_limit, 2s),
    # used for at most connection_reuse_time seconds (smtp_connection_reuse_time_limit,
    # 300s) and connection_reuse_limit messages (smtp_connection_reuse_count_limit).
    connection_cache_time: float = 5.0
    connection_reuse_time: float = 300.0
    connection_reuse_limit: int = 100
    # A destination whose every connection failed in an attempt is not tried again for
    # this long: its mail is deferred at once (0: never; Postfix marks it dead until
    # minimal_backoff_time, 300s; shorter here, as a flush or success also lifts it).
    dead_destination_time: float = 60.0
    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    max_queue_lifetime: float = 5 * 86400.0
    # A delay warning DSN (RFC 3464, Action: delayed) goes to the sender once a recipient
    # has been deferred this long (0: never; Postfix delay_warning_time, default off).
    delay_warning_after: float = 0.0
    scan_interval: float = 60.0
    # Smarthost: every domain goes to this next hop unless [delivery.transport] says otherwise.
    relayhost: NextHop | None = None
    # [delivery.transport]: (domain or ".parent", next hop) pairs, as for [tls.policy].
    transport: tuple[tuple[str, NextHop], ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Inbound gateway mode ([gateway]); off while `domains` is empty.

    Mail for `domains` is accepted from any client and routed to `next_hop` at `tls_level`
    (parse_config adds them to [delivery.transport] and [tls.policy]). `recipients` holds
    "user@domain" (local part compared case-insensitively) and "@domain" (any user)
    entries, normalised; with it or `recipients_file`, other local recipients get 550 5.1.1.
    """

    domains: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()
    recipients_file: Path | None = None
    next_hop: NextHop | None = None
    # The internal hop is usually reached by a name without DNSSEC or TLSA and often has a
    # private certificate: opportunistic TLS, as Postfix's default for a relay transport.
    tls_level: str = "may"

    @property
    def enabled(self) -> bool:
        return bool(self.domains)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: Endpoint | None = Endpoint("127.0.0.1", 9425)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "text"  # text (key=value lines) or json (one JSON object per line)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as "300s", "5m", "5d".

    Raises:
        ValueError: not a non-negative duration.
    """
    if isinstance(value, bool):
        raise ValueError("a duration")
    seconds: float | None = None
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a non-negative duration")
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds is not None and math.isfinite(seconds):
        return seconds
    raise ValueError('a duration such as 300, "300s", "5m", "4h", "5d" or "1w"')


def parse_endpoint(value: str, default_port: int) -> Endpoint:
    """Parse "addr", "addr:port" or "[v6addr]:port"; the address must be an IP literal.

    Raises:
        ValueError: not an IP address with an optional port.
    """
    host, port = value, default_port
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError('an address such as "[::1]:25"')
        host, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError('an address such as "[::1]:25"')
            port = _port(rest[1:])
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        port = _port(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("an IP address, optionally with :port") from None
    return Endpoint(host, port)


def _port(text: str) -> int:
    # ASCII only: str.isdigit() also accepts "²" and "٢٥", which int() rejects or converts.
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError("a port between 1 and 65535")
    return int(text)


T = TypeVar("T")


_NEXT_HOP_WHAT = 'a next hop such as "[mx.example.net]:25" (no MX lookup) or "example.net"'
# The levels that need a host name: TLSA records (RFC 7672 §2.2.2) or a name to verify.
NAME_LEVELS = ("dane-only", "verify", "secure")


def parse_next_hop(value: str) -> NextHop:
    """Parse "[host]", "[host]:port", "host" or "host:port", where a bracketed host may
    also be an address literal: "[192.0.2.1]", "[IPv6:2001:db8::1]" or "[2001:db8::1]".

    Raises:
        ValueError: not one of these forms; for a bad port or address the message says
            what is wrong ("port 99999 is not 1..65535", "'300.1.1.1' is not an IP address").
    """
    text, port_text = value, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(_NEXT_HOP_WHAT)
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(_NEXT_HOP_WHAT)
            port_text = rest[1:]
        bracketed = True
    else:
        host = text
        if text.count(":") == 1:
            host, port_text = text.split(":")
        if _is_ip(text) or (_is_ip(host) and port_text is not None):
            # An IP address is not a name to look up MX records of (RFC 5321 §2.3.5).
            hint = f"[{text}]" if _is_ip(text) else f"[{host}]:{port_text}"
            raise ValueError(f"{_NEXT_HOP_WHAT} (an IP address goes in brackets: {hint})")
        if text.count(":") > 1 or host.rstrip(".").rsplit(".", 1)[-1].isdigit():
            raise ValueError(_NEXT_HOP_WHAT)  # not a host name (RFC 3696 §2: no numeric TLD)
        bracketed = False
    port = _next_hop_port(port_text)
    address = _literal(host) if bracketed else None
    if address is not None:
        # RFC 5321 §4.1.3 address literal: connect to this address, no lookup at all.
        return NextHop(address, port, mx=False)
    if not _HOSTNAME.fullmatch(host) or "[" in host or "]" in host:
        raise ValueError(_NEXT_HOP_WHAT)
    return NextHop(host.rstrip(".").lower(), port, not bracketed)


def _next_hop_port(text: str | None) -> int | None:
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{_NEXT_HOP_WHAT} (port {text!r} is not a number)")
    if not 0 < int(text) < 65536:
        raise ValueError(f"{_NEXT_HOP_WHAT} (port {int(text)} is not 1..65535)")
    return int(text)


def _literal(text: str) -> str | None:
    """The address in a bracketed next hop, or None when it holds a host name.

    Raises:
        ValueError: it is meant as an address (an "IPv6:" tag, a ":", or a last label of
            digits, which no top-level domain has, RFC 3696 §2) but is not a valid one.
    """
    tagged = text[:5].lower() == "ipv6:"
    body = text[5:] if tagged else text
    if not (tagged or ":" in body or body.rstrip(".").rsplit(".", 1)[-1].isdigit()):
        return None
    six = tagged or ":" in body
    try:
        ip = ipaddress.IPv6Address(body) if six else ipaddress.IPv4Address(body)
    except ValueError:
        kind = "an IPv6 address" if tagged else "an IP address"
        raise ValueError(f"{_NEXT_HOP_WHAT} ({body!r} is not {kind})") from None
    return ip.compressed


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _domain_map(
    file: Path, key: str, value: Callable[[Any], T], expected: str
) -> Callable[[Any], tuple[tuple[str, T], ...]]:
    """A table of "domain" or ".parent" keys (A-label form) to converted values."""

    def convert(raw: Any) -> tuple[tuple[str, T], ...]:
        if not isinstance(raw, Mapping):
            raise ValueError(f'a table such as {{ "example.com" = {expected} }}')
        out: list[tuple[str, T]] = []
        for name, item in raw.items():
            bare = name[1:] if name.startswith(".") else name
            if not bare.isascii() or not _HOSTNAME.fullmatch(bare) or bare.endswith("."):
                raise ConfigError(
                    f'{file}: {key}.{name}: expected a domain such as "example.com" or '
                    f'".example.com" (sub-domains), in A-label form, got {_show(name)}'
                )
            try:
                out.append((name.lower(), value(item)))
            except ValueError as exc:
                raise ConfigError(
                    f"{file}: {key}.{name}: expected {exc or expected}, got {_show(item)}"
                ) from None
        return tuple(out)

    return convert


class _Section:
    """Reads one TOML table, recording which keys were used, and reports errors."""

    def __init__(self, file: Path, name: str, table: object) -> None:
        self.file = file
        self.name = name
        if not isinstance(table, Mapping):
            raise ConfigError(f"{file}: {name}: expected a table, got {_show(table)}")
        self.table: Mapping[str, Any] = table
        self.used: set[str] = set()

    def get(self, key: str, default: T, convert: Callable[[Any], T], expected: str) -> T:
        self.used.add(key)
        if key not in self.table:
            return default
        raw = self.table[key]
        try:
            return convert(raw)
        except (ValueError, TypeError) as exc:
            what = str(exc) if str(exc) and isinstance(exc, ValueError) else expected
            raise ConfigError(
                f"{self.file}: {self.name}.{key}: expected {what}, got {_show(raw)}"
            ) from None

    def finish(self) -> None:
        for key in self.table:
            if key not in self.used:
                known = ", ".join(sorted(self.used))
                raise ConfigError(
                    f"{self.file}: {self.name}.{key}: expected one of the keys {known}, "
                    f"got unknown key {key!r}"
                )


def _show(raw: object) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"  # as written in TOML
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


def _typed(kind: type[T] | tuple[type, ...], what: str) -> Callable[[Any], T]:
    def convert(raw: Any) -> T:
        if isinstance(raw, bool) and kind is not bool:
            raise ValueError(what)
        if not isinstance(raw, kind):
            raise ValueError(what)
        return cast(T, raw)

    return convert


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    what = f"an integer from {low} to {high}"

    def convert(raw: Any) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
            raise ValueError(what)
        return raw

    return convert


def _duration(raw: Any) -> float:
    return parse_duration(raw)


def _duration_at_most(high: float, what: str) -> Callable[[Any], float]:
    def convert(raw: Any) -> float:
        seconds = parse_duration(raw)
        if seconds > high:
            raise ValueError(what)
        return seconds

    return convert


def _probe_name(raw: Any) -> str:
    if not isinstance(raw, str) or not (raw == "." or _HOSTNAME.fullmatch(raw)):
        raise ValueError('a DNS name such as "." or "example.org"')
    return raw if raw == "." else raw.rstrip(".").lower()


def _positive_float(what: str) -> Callable[[Any], float]:
    def convert(raw: Any) -> float:
        seconds = parse_duration(raw)
        if seconds <= 0:
            raise ValueError(what)
        return seconds

    return convert


def _list_of(
    item: Callable[[Any], T], what: str, *, min_items: int = 1
) -> Callable[[Any], tuple[T, ...]]:
    def convert(raw: Any) -> tuple[T, ...]:
        if not isinstance(raw, list) or len(raw) < min_items:
            raise ValueError(what)
        out = []
        for element in raw:
            if not isinstance(element, str):
                raise ValueError(what)
            out.append(item(element))
        return tuple(out)

    return convert


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    what = "one of " + ", ".join(f'"{o}"' for o in options)

    def convert(raw: Any) -> str:
        if not isinstance(raw, str) or raw.lower() not in options:
            raise ValueError(what)
        return raw.lower()

    return convert


def _choice_upper(options: tuple[str, ...]) -> Callable[[Any], str]:
    what = "one of " + ", ".join(f'"{o}"' for o in options)

    def convert(raw: Any) -> str:
        if not isinstance(raw, str) or raw.upper() not in options:
            raise ValueError(what)
        return raw.upper()

    return convert


def _hostname(raw: Any) -> str:
    # fullmatch: "$" would also match before a trailing newline ("name\n").
    if not isinstance(raw, str) or not _HOSTNAME.fullmatch(raw):
        raise ValueError('a host name such as "relay.example.org"')
    return raw.rstrip(".")


def _network(raw: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise ValueError('a list of networks such as ["127.0.0.0/8", "::1/128"]') from None


def _next_hop(raw: Any) -> NextHop:
    if not isinstance(raw, str):
        raise ValueError(_NEXT_HOP_WHAT)
    return parse_next_hop(raw)


_LISTEN_WHAT = (
    'a list of addresses such as ["127.0.0.1:25"] or tables such as '
    '{ address = "127.0.0.1:587", require_tls = true, auth = true }'
)
_LISTENER_KEYS = ("address", "auth", "require_tls")


def _listen_list(file: Path) -> Callable[[Any], tuple[Endpoint, ...]]:
    """server.listen: "host:port" strings (plain Endpoints) or inline tables (Listeners)."""

    def convert(raw: Any) -> tuple[Endpoint, ...]:
        if not isinstance(raw, list) or not raw:
            raise ValueError(_LISTEN_WHAT)
        out: list[Endpoint] = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                out.append(parse_endpoint(item, 25))
            elif isinstance(item, Mapping):
                out.append(_listener(file, i, item))
            else:
                raise ValueError(_LISTEN_WHAT)
        return tuple(out)

    return convert


def _listener(file: Path, index: int, table: Mapping[str, Any]) -> Listener:
    key = f"server.listen[{index}]"
    for name in table:
        if name not in _LISTENER_KEYS:
            raise ConfigError(
                f"{file}: {key}.{name}: expected one of the keys {', '.join(_LISTENER_KEYS)}, "
                f"got unknown key {name!r}"
            )
    address = table.get("address")
    if not isinstance(address, str):
        raise ConfigError(
            f'{file}: {key}.address: expected an address such as "127.0.0.1:587", '
            f"got {_show(address) if 'address' in table else 'nothing'}"
        )
    try:
        ep = parse_endpoint(address, 25)
    except ValueError as exc:
        raise ConfigError(f"{file}: {key}.address: expected {exc}, got {_show(address)}") from None
    flags = {}
    for name in ("require_tls", "auth"):
        value = table.get(name, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{file}: {key}.{name}: expected true or false, got {_show(value)}")
        flags[name] = value
    return Listener(ep.host, ep.port, require_tls=flags["require_tls"], auth=flags["auth"])


_GATEWAY_DOMAINS_WHAT = 'a list of mail domains such as ["example.com"]'
_GATEWAY_RECIPIENTS_WHAT = 'a list of addresses such as ["alice@example.com", "@example.org"]'


def _mail_domain(raw: str) -> str:
    try:
        return ascii_domain(raw)
    except DomainSyntaxError as exc:
        raise ValueError(f"{_GATEWAY_DOMAINS_WHAT} ({exc})") from None


_POSTMASTER_WHAT = 'a mail address with a domain such as "hostmaster@example.org", or ""'


def _postmaster(raw: Any) -> str:
    """server.postmaster: "" (unset) or local@domain, the domain in A-label form."""
    if not isinstance(raw, str):
        raise ValueError(_POSTMASTER_WHAT)
    if raw == "":
        return ""
    local, at, domain = raw.rpartition("@")
    if (
        not at
        or not local
        or "@" in local
        or local.startswith("<")
        or not local.isprintable()
        or any(c.isspace() for c in local)
        or domain.startswith("[")
    ):
        raise ValueError(_POSTMASTER_WHAT)
    try:
        name = ascii_domain(domain)
    except DomainSyntaxError as exc:
        raise ValueError(f"{_POSTMASTER_WHAT} ({exc})") from None
    if "." not in name:
        # The relay refuses such a recipient at RCPT (504 5.5.2): it must be routable.
        raise ValueError(f"{_POSTMASTER_WHAT} (the domain must be fully qualified)")
    return f"{local}@{name}"


def recipient_key(address: str) -> str:
    """A gateway recipient entry as it is compared: "user@domain" with the local part in
    lower case and the domain in A-label form, or "@domain" (every user of the domain).

    Raises:
        ValueError: not such an address (an empty local part other than "@domain", an "@"
            or white space in the local part, a domain mail cannot be routed by).
    """
    local, at, domain = address.rpartition("@")
    if not at or any(c.isspace() for c in local) or "@" in local or not local.isprintable():
        raise ValueError(_GATEWAY_RECIPIENTS_WHAT)
    try:
        return f"{local.lower()}@{ascii_domain(domain)}"
    except DomainSyntaxError as exc:
        raise ValueError(f"{_GATEWAY_RECIPIENTS_WHAT} ({exc})") from None


def _file_path(raw: Any) -> Path:
    if not isinstance(raw, str) or not raw:
        raise ValueError("a file path")
    return Path(raw)


def _metrics_listen(raw: Any) -> Endpoint | None:
    if not isinstance(raw, str):
        raise ValueError('an address such as "127.0.0.1:9425", or "" to disable')
    if raw == "":
        return None
    return parse_endpoint(raw, 9425)


def parse_config(data: Mapping[str, Any], file: Path) -> Config:
    """Validate an already-parsed TOML document.

    Raises:
        ConfigError: the first problem found, naming file and key.
    """
    sections = {"server", "relay", "spool", "dns", "tls", "delivery", "gateway", "metrics", "log"}
    for name in data:
        if name not in sections:
            raise ConfigError(
                f"{file}: {name}: expected one of the sections {', '.join(sorted(sections))}, "
                f"got unknown section {name!r}"
            )

    def section(name: str) -> _Section:
        return _Section(file, name, data.get(name, {}))

    d_server, d_delivery, d_dns = ServerConfig(), DeliveryConfig(), DnsConfig()

    s = section("server")
    server = ServerConfig(
        listen=s.get("listen", d_server.listen, _listen_list(file), _LISTEN_WHAT),
        hostname=s.get("hostname", d_server.hostname, _hostname, "a host name"),
        max_message_size=s.get(
            "max_message_size", d_server.max_message_size, _int_range(1024, 2**31), "an integer"
        ),
        max_recipients=s.get(
            "max_recipients", d_server.max_recipients, _int_range(1, 100000), "an integer"
        ),
        max_received_headers=s.get(
            "max_received_headers",
            d_server.max_received_headers,
            _int_range(1, 1000),
            "an integer",
        ),
        timeout=s.get(
            "timeout", d_server.timeout, _positive_float("a positive duration"), "a duration"
        ),
        bare_line_endings=s.get(
            "bare_line_endings",
            d_server.bare_line_endings,
            _choice(BARE_LINE_ENDINGS),
            "a choice",
        ),
        max_connections=s.get(
            "max_connections", d_server.max_connections, _int_range(1, 100000), "an integer"
        ),
        max_connections_per_client=s.get(
            "max_connections_per_client",
            d_server.max_connections_per_client,
            _int_range(1, 100000),
            "an integer",
        ),
        tls_cert_file=s.get("tls_cert_file", d_server.tls_cert_file, _file_path, "a file path"),
        tls_key_file=s.get("tls_key_file", d_server.tls_key_file, _file_path, "a file path"),
        auth_file=s.get("auth_file", d_server.auth_file, _file_path, "a file path"),
        auth_failure_limit=s.get(
            "auth_failure_limit", d_server.auth_failure_limit, _int_range(1, 1000), "an integer"
        ),
        auth_failure_window=s.get(
            "auth_failure_window",
            d_server.auth_failure_window,
            _positive_float("a positive duration"),
            "a duration",
        ),
        received_auth_user=s.get(
            "received_auth_user",
            d_server.received_auth_user,
            _typed(bool, "true or false"),
            "true or false",
        ),
        soft_error_limit=s.get(
            "soft_error_limit", d_server.soft_error_limit, _int_range(0, 100000), "an integer"
        ),
        hard_error_limit=s.get(
            "hard_error_limit", d_server.hard_error_limit, _int_range(1, 100000), "an integer"
        ),
        error_sleep_time=s.get(
            "error_sleep_time",
            d_server.error_sleep_time,
            _duration_at_most(300.0, "a duration from 0 to 300s"),
            "a duration",
        ),
        queue_minfree=s.get(
            "queue_minfree", d_server.queue_minfree, _int_range(0, 2**60), "a number of bytes"
        ),
        shutdown_grace=s.get("shutdown_grace", d_server.shutdown_grace, _duration, "a duration"),
        postmaster=s.get("postmaster", d_server.postmaster, _postmaster, _POSTMASTER_WHAT),
    )
    s.finish()
    if (
        server.postmaster
        and server.hostname
        and server.postmaster.lower() == f"postmaster@{ascii_domain(server.hostname)}"
    ):
        raise ConfigError(
            f"{file}: server.postmaster: expected a mailbox other than postmaster@"
            f"server.hostname (which is rewritten to server.postmaster), got "
            f"{_show(server.postmaster)}"
        )
    if server.soft_error_limit > server.hard_error_limit:
        raise ConfigError(
            f"{file}: server.soft_error_limit: expected an integer <= "
            f"server.hard_error_limit ({server.hard_error_limit}), "
            f"got {server.soft_error_limit}"
        )
    if (server.tls_cert_file is None) != (server.tls_key_file is None):
        given, missing = (
            ("tls_cert_file", "tls_key_file")
            if server.tls_key_file is None
            else ("tls_key_file", "tls_cert_file")
        )
        raise ConfigError(
            f"{file}: server.{missing}: expected a file path (server.{given} is set, STARTTLS "
            f"needs both), got nothing"
        )
    for ep in server.listen:
        if isinstance(ep, Listener) and ep.require_tls and server.tls_cert_file is None:
            raise ConfigError(
                f"{file}: server.listen: expected server.tls_cert_file and server.tls_key_file "
                f"for a listener with require_tls = true, got none for {str(ep)!r}"
            )
    for ep in server.listen:
        if isinstance(ep, Listener) and ep.auth and server.auth_file is None:
            raise ConfigError(
                f"{file}: server.auth_file: expected a credentials file for the listener "
                f"{str(ep)!r} with auth = true, got nothing"
            )
        if isinstance(ep, Listener) and ep.auth and server.tls_cert_file is None:
            # RFC 4954 §4: AUTH PLAIN/LOGIN only over TLS, so it needs STARTTLS.
            raise ConfigError(
                f"{file}: server.tls_cert_file: expected a certificate for the listener "
                f"{str(ep)!r} with auth = true (AUTH is offered only after STARTTLS), "
                "got nothing"
            )
    if server.max_connections_per_client > server.max_connections:
        raise ConfigError(
            f"{file}: server.max_connections_per_client: expected an integer <= "
            f"server.max_connections ({server.max_connections}), "
            f"got {server.max_connections_per_client}"
        )

    bound = [(ep.host, ep.port) for ep in server.listen]
    if len(set(bound)) != len(bound):
        dup = next(ep for ep in server.listen if bound.count((ep.host, ep.port)) > 1)
        raise ConfigError(
            f"{file}: server.listen: expected distinct addresses, got {str(dup)!r} twice"
        )

    s = section("relay")
    relay = RelayConfig(
        networks=s.get(
            "networks",
            RelayConfig().networks,
            _list_of(_network, 'a list of networks such as ["127.0.0.0/8"]', min_items=0),
            'a list of networks such as ["127.0.0.0/8"]',
        )
    )
    s.finish()

    s = section("spool")
    spool = SpoolConfig(
        directory=s.get(
            "directory",
            SpoolConfig().directory,
            lambda v: Path(_typed(str, "a directory path")(v)) if v else _raise("a directory path"),
            "a directory path",
        )
    )
    s.finish()

    s = section("dns")
    dns_cfg = DnsConfig(
        resolvers=s.get(
            "resolvers",
            d_dns.resolvers,
            _list_of(
                lambda v: parse_endpoint(v, 53),
                'a list of resolver addresses such as ["127.0.0.1"]',
            ),
            "a list of resolver addresses",
        ),
        timeout=s.get(
            "timeout", d_dns.timeout, _positive_float("a positive duration"), "a duration"
        ),
        allow_remote_resolver=s.get(
            "allow_remote_resolver",
            d_dns.allow_remote_resolver,
            _typed(bool, "true or false"),
            "true or false",
        ),
        cache_size=s.get("cache_size", d_dns.cache_size, _int_range(0, 10_000_000), "an integer"),
        cache_min_ttl=s.get("cache_min_ttl", d_dns.cache_min_ttl, _duration, "a duration"),
        cache_max_ttl=s.get("cache_max_ttl", d_dns.cache_max_ttl, _duration, "a duration"),
        cache_negative_ttl=s.get(
            "cache_negative_ttl", d_dns.cache_negative_ttl, _duration, "a duration"
        ),
        validation_probe_name=s.get(
            "validation_probe_name", d_dns.validation_probe_name, _probe_name, "a DNS name"
        ),
        validation_probe_type=s.get(
            "validation_probe_type",
            d_dns.validation_probe_type,
            _choice_upper(PROBE_TYPES),
            "a record type",
        ),
        validation_interval=s.get(
            "validation_interval",
            d_dns.validation_interval,
            _positive_float("a positive duration"),
            "a duration",
        ),
        require_validating_resolver=s.get(
            "require_validating_resolver",
            d_dns.require_validating_resolver,
            _typed(bool, "true or false"),
            "true or false",
        ),
    )
    s.finish()
    if dns_cfg.cache_max_ttl < dns_cfg.cache_min_ttl:
        raise ConfigError(
            f"{file}: dns.cache_max_ttl: expected a duration >= dns.cache_min_ttl "
            f"({dns_cfg.cache_min_ttl:g}s), got {dns_cfg.cache_max_ttl:g}s"
        )
    if not dns_cfg.allow_remote_resolver:
        for ep in dns_cfg.resolvers:
            # RFC 7672 §2.1 / Postfix dane_init: the AD bit is only meaningful from a
            # resolver on this host (or one explicitly trusted); refuse otherwise.
            if not ipaddress.ip_address(ep.host).is_loopback:
                raise ConfigError(
                    f"{file}: dns.resolvers: expected loopback resolver addresses (a validating "
                    f"resolver on this host) or dns.allow_remote_resolver = true, got {ep.host!r}"
                )

    s = section("tls")
    tls = TlsConfig(
        level=s.get("level", TlsConfig().level, _choice(TLS_LEVELS), "a TLS level"),
        insecure_mx_policy=s.get(
            "insecure_mx_policy",
            TlsConfig().insecure_mx_policy,
            _choice(INSECURE_MX_POLICIES),
            "a policy",
        ),
        ca_file=s.get(
            "ca_file",
            TlsConfig().ca_file,
            lambda v: Path(_typed(str, "a file path")(v)) if v else _raise("a file path"),
            "a file path",
        ),
        policy=s.get(
            "policy",
            TlsConfig().policy,
            _domain_map(file, "tls.policy", _choice(TLS_LEVELS), '"dane-only"'),
            "a table of TLS levels",
        ),
    )
    s.finish()

    s = section("delivery")
    dur = _positive_float("a positive duration")
    delivery = DeliveryConfig(
        port=s.get("port", d_delivery.port, _int_range(1, 65535), "a port"),
        concurrency=s.get("concurrency", d_delivery.concurrency, _int_range(1, 1000), "an integer"),
        connect_timeout=s.get("connect_timeout", d_delivery.connect_timeout, dur, "a duration"),
        command_timeout=s.get("command_timeout", d_delivery.command_timeout, dur, "a duration"),
        mail_timeout=s.get("mail_timeout", d_delivery.mail_timeout, dur, "a duration"),
        rcpt_timeout=s.get("rcpt_timeout", d_delivery.rcpt_timeout, dur, "a duration"),
        data_init_timeout=s.get(
            "data_init_timeout", d_delivery.data_init_timeout, dur, "a duration"
        ),
        data_block_timeout=s.get(
            "data_block_timeout", d_delivery.data_block_timeout, dur, "a duration"
        ),
        data_done_timeout=s.get(
            "data_done_timeout", d_delivery.data_done_timeout, dur, "a duration"
        ),
        mx_host_limit=s.get(
            "mx_host_limit", d_delivery.mx_host_limit, _int_range(1, 1000), "an integer"
        ),
        mx_address_limit=s.get(
            "mx_address_limit", d_delivery.mx_address_limit, _int_range(1, 1000), "an integer"
        ),
        address_preference=s.get(
            "address_preference",
            d_delivery.address_preference,
            _choice(ADDRESS_PREFERENCES),
            "an address preference",
        ),
        destination_concurrency=s.get(
            "destination_concurrency",
            d_delivery.destination_concurrency,
            _int_range(1, 1000),
            "an integer",
        ),
        connection_cache_time=s.get(
            "connection_cache_time",
            d_delivery.connection_cache_time,
            _duration,
            "a duration (0 turns connection reuse off)",
        ),
        connection_reuse_time=s.get(
            "connection_reuse_time", d_delivery.connection_reuse_time, dur, "a duration"
        ),
        connection_reuse_limit=s.get(
            "connection_reuse_limit",
            d_delivery.connection_reuse_limit,
            _int_range(1, 1_000_000),
            "an integer",
        ),
        dead_destination_time=s.get(
            "dead_destination_time",
            d_delivery.dead_destination_time,
            _duration,
            "a duration (0 turns destination suspension off)",
        ),
        min_backoff=s.get("min_backoff", d_delivery.min_backoff, dur, "a duration"),
        max_backoff=s.get("max_backoff", d_delivery.max_backoff, dur, "a duration"),
        max_queue_lifetime=s.get(
            "max_queue_lifetime", d_delivery.max_queue_lifetime, dur, "a duration"
        ),
        delay_warning_after=s.get(
            "delay_warning_after",
            d_delivery.delay_warning_after,
            _duration,
            "a duration (0 turns delay warnings off)",
        ),
        scan_interval=s.get("scan_interval", d_delivery.scan_interval, dur, "a duration"),
        relayhost=s.get("relayhost", d_delivery.relayhost, _next_hop, "a next hop"),
        transport=s.get(
            "transport",
            d_delivery.transport,
            _domain_map(file, "delivery.transport", _next_hop, '"[mx.example.net]:25"'),
            "a table of next hops",
        ),
    )
    s.finish()
    if delivery.max_backoff < delivery.min_backoff:
        raise ConfigError(
            f"{file}: delivery.max_backoff: expected a duration >= delivery.min_backoff "
            f"({delivery.min_backoff:g}s), got {delivery.max_backoff:g}s"
        )

    gateway = _gateway(section("gateway"), file)
    if gateway.enabled:
        tls, delivery = _route_gateway(gateway, tls, delivery, file)
    _check_literal_levels(file, tls, delivery, gateway)

    s = section("metrics")
    metrics = MetricsConfig(
        listen=s.get("listen", MetricsConfig().listen, _metrics_listen, "an address")
    )
    s.finish()

    if metrics.listen is not None and (metrics.listen.host, metrics.listen.port) in bound:
        raise ConfigError(
            f"{file}: metrics.listen: expected an address other than the SMTP listeners, "
            f"got {str(metrics.listen)!r} (also in server.listen)"
        )

    s = section("log")
    log = LogConfig(
        level=s.get("level", LogConfig().level, _choice(LOG_LEVELS), "a log level"),
        format=s.get("format", LogConfig().format, _choice(LOG_FORMATS), "text or json"),
    )
    s.finish()

    return Config(
        path=file,
        server=server,
        relay=relay,
        spool=spool,
        dns=dns_cfg,
        tls=tls,
        delivery=delivery,
        gateway=gateway,
        metrics=metrics,
        log=log,
    )


def _gateway(s: _Section, file: Path) -> GatewayConfig:
    """[gateway], checked on its own (see `_route_gateway` for how it meets the rest)."""
    d = GatewayConfig()
    gateway = GatewayConfig(
        domains=s.get(
            "domains",
            d.domains,
            _list_of(_mail_domain, _GATEWAY_DOMAINS_WHAT, min_items=0),
            _GATEWAY_DOMAINS_WHAT,
        ),
        recipients=s.get(
            "recipients",
            d.recipients,
            _list_of(recipient_key, _GATEWAY_RECIPIENTS_WHAT, min_items=0),
            _GATEWAY_RECIPIENTS_WHAT,
        ),
        recipients_file=s.get("recipients_file", d.recipients_file, _file_path, "a file path"),
        next_hop=s.get("next_hop", d.next_hop, _next_hop, "a next hop"),
        tls_level=s.get("tls_level", d.tls_level, _choice(TLS_LEVELS), "a TLS level"),
    )
    s.finish()
    if not gateway.domains:
        given = [k for k in ("next_hop", "recipients", "recipients_file") if s.table.get(k)]
        if given:
            raise ConfigError(
                f"{file}: gateway.domains: expected at least one domain (gateway.{given[0]} "
                f"is set), got {_show(s.table.get('domains', []))}"
            )
        return gateway
    seen: set[str] = set()
    for domain in gateway.domains:
        if domain in seen:
            raise ConfigError(
                f"{file}: gateway.domains: expected each domain once, got {domain!r} twice"
            )
        seen.add(domain)
    if gateway.next_hop is None:
        raise ConfigError(
            f"{file}: gateway.next_hop: expected the internal server for the gateway domains, "
            'such as "[mail.internal.example]:25", got nothing'
        )
    for key in gateway.recipients:
        if key.rpartition("@")[2] not in seen:
            raise ConfigError(
                f"{file}: gateway.recipients: expected addresses in gateway.domains, got {key!r}"
            )
    return gateway


def _route_gateway(
    gateway: GatewayConfig, tls: TlsConfig, delivery: DeliveryConfig, file: Path
) -> tuple[TlsConfig, DeliveryConfig]:
    """The gateway domains as [delivery.transport] and [tls.policy] entries, so delivery
    routes them to the next hop at gateway.tls_level like any other configured domain.

    Raises:
        ConfigError: either table already has an exact entry for a gateway domain.
    """
    assert gateway.next_hop is not None
    transport, policy = dict(delivery.transport), dict(tls.policy)
    for domain in gateway.domains:
        for name, table, says in (
            ("delivery.transport", transport, "gateway.next_hop routes it"),
            ("tls.policy", policy, "gateway.tls_level sets its level"),
        ):
            if domain in table:
                raise ConfigError(
                    f"{file}: {name}.{domain}: expected no entry for a gateway domain "
                    f"({says}), got {_show(str(table[domain]))}"
                )
    hop = gateway.next_hop
    return (
        replace(tls, policy=tls.policy + tuple((d, gateway.tls_level) for d in gateway.domains)),
        replace(delivery, transport=delivery.transport + tuple((d, hop) for d in gateway.domains)),
    )


def _entry(table: Mapping[str, T], domain: str) -> tuple[str, T] | None:
    """As relay.delivery.policymap.lookup_entry: exact beats ".parent", closest first."""
    labels = domain.split(".")
    for key in [domain] + ["." + ".".join(labels[i:]) for i in range(1, len(labels))]:
        if key in table:
            return key, table[key]
    return None


def _check_literal_levels(
    file: Path, tls: TlsConfig, delivery: DeliveryConfig, gateway: GatewayConfig
) -> None:
    """Refuse an address-literal next hop at a level that needs a host name.

    The level of a connection to a next hop is its own [tls.policy] entry (for an address,
    an exact entry only), else the recipient domain's entry, else tls.level (as
    relay.delivery.policymap). Every level that can apply to mail routed to the literal is
    checked: dane-only needs TLSA records, which live at _port._tcp.<host name> (RFC 7672
    §2.2.2), and verify/secure need a name to match the certificate against.

    Raises:
        ConfigError: naming the next-hop key, the literal, the level and where it is set.
    """
    policy, transport = dict(tls.policy), dict(delivery.transport)
    gateway_domains = set(gateway.domains)

    def where(domain_key: str | None) -> str:
        if domain_key is None:
            return "tls.level"
        if domain_key in gateway_domains:
            return "gateway.tls_level"
        return f"tls.policy.{domain_key}"

    def refuse(key: str, hop: NextHop, level: str, source: str) -> None:
        why = (
            "TLSA records are found only at _port._tcp.<host name> (RFC 7672 §2.2.2)"
            if level == "dane-only"
            else "a certificate is verified against a host name"
        )
        raise ConfigError(
            f"{file}: {key}: expected a next hop with a host name for TLS level "
            f"{level!r} (set by {source}), got {str(hop)!r}: an IP address has no name, and "
            f"{why}; use a host name, or level none, may, encrypt or dane"
        )

    def routed_to(domain: str, hop_key: str | None) -> bool:
        # Whether mail for `domain` goes to the next hop of `hop_key` (None: relayhost).
        entry = _entry(transport, domain)
        return (entry[0] if entry else None) == hop_key

    hops: list[tuple[str, str | None, NextHop]] = []
    if delivery.relayhost is not None:
        hops.append(("delivery.relayhost", None, delivery.relayhost))
    for name, hop in delivery.transport:
        key = "gateway.next_hop" if name in gateway_domains else f"delivery.transport.{name}"
        hops.append((key, name, hop))
    for key, hop_key, hop in hops:
        if not hop.literal:
            continue
        own = policy.get(hop.host)
        if own is not None:
            # The next hop's own entry decides the level of every connection to it.
            if own in NAME_LEVELS:
                refuse(key, hop, own, f"tls.policy.{hop.host}")
            continue
        # Which recipient-domain entries (or the default) can apply: "*." stands for a
        # name below a ".parent" key, which no exact key can be.
        samples: list[str] = []
        if hop_key is None:
            samples.append("*")
        else:
            samples.append("*" + hop_key if hop_key.startswith(".") else hop_key)
        for name in policy:
            samples.append("*" + name if name.startswith(".") else name)
        for sample in samples:
            if hop_key is not None and sample != samples[0]:
                base = hop_key.lstrip(".")
                if not (sample == base or sample.endswith("." + base)):
                    continue
            if not routed_to(sample, hop_key):
                continue
            found = _entry(policy, sample)
            level = found[1] if found else tls.level
            if level in NAME_LEVELS:
                refuse(key, hop, level, where(found[0] if found else None))


def _raise(what: str) -> Path:
    raise ValueError(what)


def load_config(path: Path) -> Config:
    """Read and validate the TOML file at `path`.

    Raises:
        ConfigError: unreadable file, TOML syntax error, or invalid content.
    """
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: expected a UTF-8 TOML file, got undecodable bytes: {exc}"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: expected valid TOML, got a syntax error: {exc}") from exc
    return parse_config(data, path)
