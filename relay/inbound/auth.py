"""SMTP AUTH (RFC 4954) credentials: scrypt password hashes, the credentials file, and the
per-client failure limit.

Contract:
- The credentials file has one `user:hash` entry a line; blank lines and lines starting
  with `#` are ignored. A hash is `scrypt$N$r$p$SALT$KEY` (SALT and KEY base64), made by
  `hash_password` with hashlib.scrypt and a fresh 16-byte salt. `parse_credentials`
  raises `CredentialsError` naming the line of the first malformed entry.
- `Credentials.check(user, password)` is True only for a listed user with that password;
  the comparison is constant-time (hmac.compare_digest) and an unknown user costs one
  scrypt as well, so timing tells nothing about which users exist. The file is read
  again when its inode, modification time or size changes (so `dane-relay passwd`, which
  renames a new file into place, takes effect without a restart even within one clock
  tick); a file that became unreadable or malformed keeps the last good entries and logs
  an ERROR once per change.
- `write_entry(path, user, password)` adds or replaces one entry atomically (temporary
  file, fsync, rename, directory fsync; mode 0600).
- `FailureLimiter`: `limit` failures within `window` seconds from one client address block
  further AUTH from it until the oldest failure leaves the window. An attempt is reserved
  with `begin` before its password is checked (off the event loop, ~50 ms) and counts
  against the limit until `end`: parallel sessions cannot all pass the check and then
  all fail, so no more than `limit` failures per window are ever checked. Clients whose failures
  have all expired are forgotten (swept once 1024 clients are remembered), so the table
  stays bounded by the failures within one window.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.files import open_regular

__all__ = [
    "Credentials",
    "CredentialsError",
    "FailureLimiter",
    "format_entry",
    "hash_password",
    "parse_credentials",
    "valid_user",
    "verify_password",
    "write_entry",
]

log = logging.getLogger("relay.smtpd")

# scrypt cost: N=2^14, r=8, p=1 is the RFC 7914 §2 interactive-login example (16 MiB).
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_MAX_N = 2**20
# FailureLimiter drops the clients whose failures have expired once it holds this many.
_SWEEP_AT = 1024


class CredentialsError(ValueError):
    """A malformed credentials file; the message names the line."""


def hash_password(
    password: bytes, *, salt: bytes | None = None, n: int = SCRYPT_N, r: int = SCRYPT_R
) -> str:
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    key = _scrypt(password, salt, n, r, SCRYPT_P, _KEY_BYTES)
    return "$".join(
        ("scrypt", str(n), str(r), str(SCRYPT_P), _b64(salt), _b64(key)),
    )


def verify_password(password: bytes, encoded: str) -> bool:
    """True when `password` hashes to `encoded` (constant-time comparison)."""
    n, r, p, salt, key = _parse_hash(encoded)
    # RFC 4954 §4 leaves verification to the server; compare in constant time.
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(key)), key)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=129 * r * n * p + 2**20
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise CredentialsError("expected scrypt$N$r$p$SALT$KEY")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise CredentialsError("expected scrypt$N$r$p$SALT$KEY with base64 salt and key") from None
    if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= 64 and 1 <= p <= 16):
        raise CredentialsError("expected scrypt parameters N (a power of 2), r and p in range")
    if len(salt) < 8 or len(key) < 16:
        raise CredentialsError("expected a salt of 8 bytes or more and a key of 16 or more")
    return n, r, p, salt, key


def valid_user(user: str) -> bool:
    """A user name fits the file: printable, no ':' and no white space."""
    return (
        bool(user) and user.isprintable() and ":" not in user and not any(c.isspace() for c in user)
    )


def format_entry(user: str, encoded: str) -> str:
    return f"{user}:{encoded}\n"


def parse_credentials(text: str, source: str) -> dict[str, str]:
    """Users and their hashes.

    Raises:
        CredentialsError: "SOURCE line N: expected …, got …".
    """
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        user, sep, encoded = stripped.partition(":")
        where = f"{source} line {number}"
        if not sep or not valid_user(user):
            raise CredentialsError(f"{where}: expected user:scrypt$…, got {line[:40]!r}")
        try:
            _parse_hash(encoded)
        except CredentialsError as exc:
            raise CredentialsError(f"{where}: {exc}, got {encoded[:40]!r}") from None
        if user in users:
            raise CredentialsError(f"{where}: expected each user once, got {user!r} again")
        users[user] = encoded
    return users


_Stamp = tuple[int, int, int]
_MISSING: _Stamp = (-1, -1, -1)


def _stamp(st: os.stat_result) -> _Stamp:
    # The inode as well: a same-size file renamed into place within one coarse mtime tick.
    return (st.st_ino, st.st_mtime_ns, st.st_size)


_DUMMY = hash_password(b"dummy password", salt=b"\0" * _SALT_BYTES)


class Credentials:
    """The credentials file, read again when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: _Stamp | None = None
        self._users: dict[str, str] = {}
        self._failed_stamp: _Stamp | None = None
        self.load()

    def load(self) -> None:
        """Read the file now.

        Raises:
            OSError: unreadable. CredentialsError: malformed (names the line).
        """
        with open_regular(self.path, encoding="utf-8") as fh:  # a FIFO would block
            stamp = _stamp(os.fstat(fh.fileno()))
            text = fh.read()
        self._users = parse_credentials(text, str(self.path))
        self._stamp = stamp

    def _refresh(self) -> None:
        try:
            stamp = _stamp(os.stat(self.path))
        except OSError as exc:
            self._report(_MISSING, f"cannot read: {exc.strerror or exc}")
            return
        if stamp == self._stamp or stamp == self._failed_stamp:
            return
        try:
            self.load()
        except (OSError, UnicodeDecodeError, CredentialsError) as exc:
            self._report(stamp, str(exc))
        else:
            self._failed_stamp = None
            log.info("auth_file=%s reloaded users=%d", self.path, len(self._users))

    def _report(self, stamp: _Stamp, why: str) -> None:
        if self._failed_stamp != stamp:
            log.error("auth_file=%s not reloaded, the previous entries stay: %s", self.path, why)
        self._failed_stamp = stamp

    def __len__(self) -> int:
        return len(self._users)

    def check(self, user: str, password: bytes) -> bool:
        self._refresh()
        encoded = self._users.get(user)
        if encoded is None:
            verify_password(password, _DUMMY)  # same cost as a known user
            return False
        return verify_password(password, encoded)


def write_entry(path: Path, user: str, password: bytes) -> bool:
    """Add or replace `user` in the file at `path` (created if missing); True if replaced.

    Raises:
        OSError: the file or its directory cannot be read or written.
        CredentialsError: the existing file is malformed, or `user` is not a valid name.
    """
    if not valid_user(user):
        raise CredentialsError(f"expected a user name without ':' or white space, got {user!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    parse_credentials(text, str(path))  # refuse to rewrite a file we cannot read back
    entry = format_entry(user, hash_password(password))
    lines, replaced = [], False
    for line in text.splitlines(keepends=True):
        if line.strip().partition(":")[0] == user and not line.lstrip().startswith("#"):
            lines.append(entry)
            replaced = True
        else:
            lines.append(line if line.endswith("\n") else line + "\n")
    if not replaced:
        lines.append(entry)
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return replaced


@dataclass
class FailureLimiter:
    """AUTH failures per client address within a sliding window."""

    limit: int
    window: float
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._failures: dict[str, collections.deque[float]] = {}
        self._pending: dict[str, int] = {}  # attempts begun and not yet ended, per client

    def _recent(self, client: str) -> collections.deque[float]:
        now = self.clock()
        times = self._failures.get(client)
        if times is None:
            return collections.deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[client]
        return times

    def blocked(self, client: str) -> bool:
        """The failures in the window and the attempts under way reach the limit."""
        return len(self._recent(client)) + self._pending.get(client, 0) >= self.limit

    def begin(self, client: str) -> bool:
        """Reserve one attempt before its password is checked; False (nothing reserved)
        when `blocked`. Counting the attempts under way as failures-to-be keeps parallel
        sessions from passing the check together: at most `limit` failures per window."""
        if self.blocked(client):
            return False
        self._pending[client] = self._pending.get(client, 0) + 1
        return True

    def end(self, client: str, *, failed: bool) -> int:
        """End an attempt `begin` reserved; records it when it failed. Returns the
        failures now in the window."""
        left = self._pending.get(client, 0) - 1
        if left > 0:
            self._pending[client] = left
        else:
            self._pending.pop(client, None)
        return self.failed(client) if failed else len(self._recent(client))

    def failed(self, client: str) -> int:
        """Record one failure; returns the failures now in the window."""
        if len(self._failures) >= _SWEEP_AT:
            self._sweep()
        times = self._recent(client)
        times.append(self.clock())
        self._failures[client] = times
        return len(times)

    def _sweep(self) -> None:
        """Forget every client whose failures have all left the window: failures from
        many addresses (an IPv6 prefix holds plenty) must not grow the table for good."""
        for client in list(self._failures):
            self._recent(client)

    def __len__(self) -> int:
        """Clients remembered (some may have no failure left in the window)."""
        return len(self._failures)
