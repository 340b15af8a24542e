"""relay.inbound.auth: scrypt hashes, the credentials file (parse, write, reload) and the
per-client AUTH failure limit; `inbound_auth` turns file problems into ConfigError."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from relay.app import inbound_auth
from relay.config import load_config
from relay.errors import ConfigError
from relay.inbound.auth import (
    Credentials,
    CredentialsError,
    FailureLimiter,
    format_entry,
    hash_password,
    parse_credentials,
    valid_user,
    verify_password,
    write_entry,
)

# A cheap cost for the tests that only need some valid hash (N=2^4 instead of 2^14).
CHEAP = {"n": 16, "r": 1}


def _entry(user: str, password: bytes) -> str:
    return format_entry(user, hash_password(password, **CHEAP))


# -- hashes ---------------------------------------------------------------------------


def test_hash_and_verify_round_trip() -> None:
    encoded = hash_password(b"correct horse")
    parts = encoded.split("$")
    assert parts[:4] == ["scrypt", "16384", "8", "1"]
    assert len(parts[4]) == 24 and len(parts[5]) == 44  # 16-byte salt, 32-byte key
    assert verify_password(b"correct horse", encoded) is True


def test_wrong_password_does_not_verify() -> None:
    encoded = hash_password(b"correct horse", **CHEAP)
    assert verify_password(b"correct horsf", encoded) is False
    assert verify_password(b"", encoded) is False


def test_each_hash_has_its_own_salt() -> None:
    first, second = (hash_password(b"same", **CHEAP) for _ in range(2))
    assert first != second
    assert verify_password(b"same", first) and verify_password(b"same", second)


def test_the_same_salt_gives_the_same_hash() -> None:
    salt = b"0123456789abcdef"
    assert hash_password(b"pw", salt=salt, **CHEAP) == hash_password(b"pw", salt=salt, **CHEAP)


@pytest.mark.parametrize(
    "user, ok",
    [("alice", True), ("alice@example.org", True), ("", False), ("a:b", False),
     ("a b", False), ("a\tb", False), ("a\nb", False), ("a\x00b", False)],
)  # fmt: skip
def test_valid_user(user: str, ok: bool) -> None:
    assert valid_user(user) is ok


# -- parsing the file -------------------------------------------------------------------


def test_parse_skips_comments_and_blank_lines() -> None:
    alice, bob = _entry("alice", b"a"), _entry("bob", b"b")
    text = f"# users\n\n{alice}   \n{bob}"
    users = parse_credentials(text, "passwd")
    assert sorted(users) == ["alice", "bob"]
    assert verify_password(b"a", users["alice"]) and verify_password(b"b", users["bob"])


@pytest.mark.parametrize(
    "line, message",
    [
        ("alice", "passwd line 3: expected user:scrypt$…, got 'alice'"),
        (
            ":scrypt$16$1$1$AAAA$BBBB",
            "passwd line 3: expected user:scrypt$…, got ':scrypt$16$1$1$AAAA$BBBB'",
        ),
        ("alice:bcrypt$x", "passwd line 3: expected scrypt$N$r$p$SALT$KEY, got 'bcrypt$x'"),
        (
            "alice:scrypt$x$8$1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==",
            "passwd line 3: expected scrypt$N$r$p$SALT$KEY with base64 salt and key, "
            "got 'scrypt$x$8$1$AAAAAAAAAAA=$AAAAAAAAAAAAAA'",
        ),
        (
            "alice:scrypt$1000$8$1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==",
            "passwd line 3: expected scrypt parameters N (a power of 2), r and p in range, "
            "got 'scrypt$1000$8$1$AAAAAAAAAAA=$AAAAAAAAAAA'",
        ),
        (
            "alice:scrypt$16$1$1$AAAA$AAAAAAAAAAAAAAAAAAAAAA==",
            "passwd line 3: expected a salt of 8 bytes or more and a key of 16 or more, "
            "got 'scrypt$16$1$1$AAAA$AAAAAAAAAAAAAAAAAAAAA'",
        ),
    ],
)  # fmt: skip
def test_a_malformed_line_is_named_by_its_number(line: str, message: str) -> None:
    text = f"# users\n{_entry('bob', b'b')}{line}\n"
    with pytest.raises(CredentialsError) as info:
        parse_credentials(text, "passwd")
    assert str(info.value) == message


def test_a_user_listed_twice_is_refused() -> None:
    text = _entry("alice", b"a") + "\n" + _entry("alice", b"b")
    with pytest.raises(CredentialsError) as info:
        parse_credentials(text, "/etc/passwd-smtp")
    assert str(info.value) == (
        "/etc/passwd-smtp line 3: expected each user once, got 'alice' again"
    )


# -- writing the file -------------------------------------------------------------------


def test_write_entry_creates_the_file_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    old_umask = os.umask(0o022)
    try:
        assert write_entry(path, "alice", b"secret") is False
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = parse_credentials(path.read_text(), str(path))
    assert list(users) == ["alice"]
    assert verify_password(b"secret", users["alice"])


def test_write_entry_adds_and_replaces_keeping_the_other_lines(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    bob = _entry("bob", b"bob-pw")
    path.write_text(f"# smtp users\n{bob}\n#alice:old comment stays\n" + _entry("alice", b"old"))
    assert write_entry(path, "carol", b"carol-pw") is False
    assert write_entry(path, "alice", b"new") is True
    lines = path.read_text().splitlines()
    assert lines[0] == "# smtp users"
    assert lines[1] == bob.rstrip("\n")  # untouched, byte for byte
    assert lines[2] == ""
    assert lines[3] == "#alice:old comment stays"
    assert [line.partition(":")[0] for line in lines[4:]] == ["alice", "carol"]
    users = parse_credentials(path.read_text(), str(path))
    assert verify_password(b"new", users["alice"])
    assert not verify_password(b"old", users["alice"])
    assert verify_password(b"carol-pw", users["carol"])


def test_write_entry_replaces_atomically_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    write_entry(path, "alice", b"one")
    before = path.stat().st_ino
    write_entry(path, "alice", b"two")
    assert path.stat().st_ino != before  # a new file renamed over the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd"]


def test_write_entry_refuses_to_rewrite_a_malformed_file(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    original = _entry("alice", b"a") + "garbage line\n"
    path.write_text(original)
    with pytest.raises(CredentialsError) as info:
        write_entry(path, "bob", b"b")
    assert str(info.value) == f"{path} line 2: expected user:scrypt$…, got 'garbage line'"
    assert path.read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd"]


def test_write_entry_refuses_a_bad_user_name(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError) as info:
        write_entry(tmp_path / "passwd", "a:b", b"x")
    assert str(info.value) == "expected a user name without ':' or white space, got 'a:b'"
    assert not (tmp_path / "passwd").exists()


# -- the credentials object ---------------------------------------------------------------


def test_credentials_check(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text(_entry("alice", b"a-pw") + _entry("bob", b"b-pw"))
    creds = Credentials(path)
    assert len(creds) == 2
    assert creds.check("alice", b"a-pw") is True
    assert creds.check("alice", b"b-pw") is False
    assert creds.check("carol", b"a-pw") is False
    assert creds.check("ALICE", b"a-pw") is False  # user names are compared exactly


def test_credentials_reload_when_the_file_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "passwd"
    write_entry(path, "alice", b"one")
    creds = Credentials(path)
    assert creds.check("alice", b"one")
    # A same-size replacement (the hash has a fixed length) within the same clock tick
    # must still be seen: the rename gives the file a new inode.
    write_entry(path, "alice", b"two")
    with caplog.at_level(logging.INFO, logger="relay.smtpd"):
        assert creds.check("alice", b"two") is True
    assert creds.check("alice", b"one") is False
    assert f"auth_file={path} reloaded users=1" in caplog.messages
    write_entry(path, "bob", b"bob-pw")
    assert creds.check("bob", b"bob-pw") is True
    assert len(creds) == 2


def test_a_broken_file_keeps_the_previous_entries_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "passwd"
    write_entry(path, "alice", b"one")
    creds = Credentials(path)
    path.write_text(path.read_text() + "broken\n")
    with caplog.at_level(logging.ERROR, logger="relay.smtpd"):
        assert creds.check("alice", b"one") is True
        assert creds.check("alice", b"one") is True
    assert caplog.messages == [
        f"auth_file={path} not reloaded, the previous entries stay: "
        f"{path} line 2: expected user:scrypt$…, got 'broken'"
    ]
    # Fixed again: read at the next check.
    write_entry(tmp_path / "fixed", "carol", b"c")
    os.replace(tmp_path / "fixed", path)
    assert creds.check("carol", b"c") is True
    assert creds.check("alice", b"one") is False


def test_a_vanished_file_keeps_the_previous_entries_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "passwd"
    write_entry(path, "alice", b"one")
    creds = Credentials(path)
    path.unlink()
    with caplog.at_level(logging.ERROR, logger="relay.smtpd"):
        assert creds.check("alice", b"one") is True
        assert creds.check("alice", b"one") is True
    assert caplog.messages == [
        f"auth_file={path} not reloaded, the previous entries stay: "
        "cannot read: No such file or directory"
    ]


# -- the failure limit ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_limiter_blocks_at_the_limit_within_the_window() -> None:
    clock = Clock()
    limiter = FailureLimiter(3, 600.0, clock)
    assert limiter.failed("192.0.2.1") == 1
    clock.now += 100
    assert limiter.failed("192.0.2.1") == 2
    assert limiter.blocked("192.0.2.1") is False
    clock.now += 100
    assert limiter.failed("192.0.2.1") == 3
    assert limiter.blocked("192.0.2.1") is True
    assert limiter.blocked("192.0.2.2") is False  # per client address
    # The first failure leaves the window 600 s after it happened.
    clock.now = 1000.0 + 599.0
    assert limiter.blocked("192.0.2.1") is True
    clock.now = 1000.0 + 600.0
    assert limiter.blocked("192.0.2.1") is False
    assert limiter.failed("192.0.2.1") == 3
    assert limiter.blocked("192.0.2.1") is True


def test_failure_limiter_forgets_a_client_once_its_failures_expire() -> None:
    clock = Clock()
    limiter = FailureLimiter(2, 10.0, clock)
    limiter.failed("198.51.100.7")
    clock.now += 10.0
    assert limiter.blocked("198.51.100.7") is False
    assert limiter._failures == {}  # no memory kept for idle clients


# -- server.auth_file at start-up ---------------------------------------------------------------


def _config(tmp_path: Path, auth_file: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        f'[server]\nauth_file = "{auth_file}"\nauth_failure_limit = 3\nauth_failure_window = "1m"\n'
    )
    return path


def test_inbound_auth_loads_the_file_and_the_limit(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    write_entry(passwd, "alice", b"a")
    gate = inbound_auth(load_config(_config(tmp_path, passwd)))
    assert gate is not None
    assert gate.credentials.check("alice", b"a")
    assert (gate.failures.limit, gate.failures.window) == (3, 60.0)


def test_inbound_auth_without_a_file_is_none(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("[server]\n")
    assert inbound_auth(load_config(path)) is None


def test_a_missing_credentials_file_names_the_key(tmp_path: Path) -> None:
    cfg = _config(tmp_path, tmp_path / "nope")
    with pytest.raises(ConfigError) as info:
        inbound_auth(load_config(cfg))
    assert str(info.value) == (
        f"{cfg}: server.auth_file: expected a readable credentials file, "
        f"got {str(tmp_path / 'nope')!r} (No such file or directory)"
    )


def test_a_malformed_credentials_file_names_the_key_and_line(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("alice\n")
    cfg = _config(tmp_path, passwd)
    with pytest.raises(ConfigError) as info:
        inbound_auth(load_config(cfg))
    assert str(info.value) == (
        f"{cfg}: server.auth_file: expected lines user:scrypt$N$r$p$SALT$KEY "
        f"(dane-relay passwd), got {passwd} line 1: expected user:scrypt$…, got 'alice'"
    )
