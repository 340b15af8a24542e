"""A private Postfix instance configured as a DANE client for the benchmark.

Everything lives under one directory: `etc/` (config_directory: main.cf, master.cf,
resolv.conf), `queue/` (queue_directory) and `data/` (data_directory); the log goes to
`maillog` through postlogd. The system Postfix (/etc/postfix) is neither read nor touched.

DNS: Postfix uses the libc stub resolver, which reads /etc/resolv.conf. The instance is
started inside a private mount namespace (`unshare -m`) in which `etc/resolv.conf` is
bind-mounted over /etc/resolv.conf: it names the lab's validating unbound and sets
`options trust-ad`, without which glibc (2.31 and later) clears the AD bit and Postfix
would see every answer as insecure. The master daemon and every process it forks stay in
that namespace; the rest of the machine keeps its own resolv.conf.

Postfix is configured as the relay is: `smtp_dns_support_level = dnssec`,
`smtp_tls_security_level = dane` (or `may`), no chroot, every non-local domain delivered
by smtp(8) on port 25. Postfix only accepts interface addresses it finds configured, and
the lab's 127.R.x.y addresses are reached through lo's 127/8 route without being configured:
so `inet_interfaces = loopback-only` (nothing binds there: the only inet service in
master.cf names its lab address explicitly, `127.R.0.20:2525`). Its own connection and
TLS-session reuse are switched on (`smtp_tls_connection_reuse`, a session cache), so it is
compared at its best.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PostfixInstance", "postfix_available"]

_DAEMON_DIR = Path("/usr/lib/postfix/sbin")

_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n - n 60   1 pickup
cleanup   unix  n - n -    0 cleanup
qmgr      unix  n - n 300  1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -    - trivial-rewrite
bounce    unix  - - n -    0 bounce
defer     unix  - - n -    0 bounce
trace     unix  - - n -    0 bounce
verify    unix  - - n -    1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -    - proxymap
proxywrite unix - - n -    1 proxymap
smtp      unix  - - n -    - smtp
relay     unix  - - n -    - smtp
showq     unix  n - n -    - showq
error     unix  - - n -    - error
retry     unix  - - n -    - error
discard   unix  - - n -    - discard
anvil     unix  - - n -    1 anvil
scache    unix  - - n -    1 scache
postlog   unix-dgram n - n - 1 postlogd
tlsproxy  unix  - - n -    0 tlsproxy
"""


def postfix_available() -> bool:
    return shutil.which("postfix") is not None and (_DAEMON_DIR / "master").exists()


class PostfixInstance:
    """One private Postfix: `start()`, submit mail to `listen`, `stop()`."""

    def __init__(
        self, *, listen_addr: str, port: int, resolver: str, tls_level: str = "dane"
    ) -> None:
        # Postfix daemons open files as mail_owner: every directory above data_directory
        # must be searchable by that user, which a pytest or mkdtemp directory (0700) is not.
        self.root = Path(tempfile.mkdtemp(prefix="dane-bench-postfix-"))
        self.root.chmod(0o755)
        self.listen_addr = listen_addr
        self.port = port
        self.resolver = resolver
        self.tls_level = tls_level
        self.etc = self.root / "etc"
        self.queue = self.root / "queue"
        self.data = self.root / "data"
        self.maillog = self.root / "maillog"

    def _main_cf(self) -> str:
        return f"""\
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
command_directory = /usr/sbin
daemon_directory = {_DAEMON_DIR}
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.maillog}
maillog_file_prefixes = {self.root}
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtputf8_enable = no
biff = no
append_dot_mydomain = no
smtp_host_lookup = dns
smtp_dns_support_level = dnssec
smtp_tls_security_level = {self.tls_level}
smtp_tls_loglevel = 1
smtp_tls_connection_reuse = yes
smtp_tls_session_cache_database = btree:{self.data}/smtp_scache
smtp_connection_cache_on_demand = yes
"""

    def start(self) -> PostfixInstance:
        """Write the configuration and start the master in its own mount namespace.

        Raises:
            RuntimeError: Postfix did not come up (with its log tail).
        """
        for d in (self.etc, self.data):
            d.mkdir(parents=True, exist_ok=True)
        self.queue.mkdir(parents=True, exist_ok=True)
        (self.etc / "main.cf").write_text(self._main_cf())
        (self.etc / "master.cf").write_text(
            _MASTER_CF.format(listen=f"{self.listen_addr}:{self.port}")
        )
        resolv = self.etc / "resolv.conf"
        # glibc keeps the AD bit only from resolvers it is told to trust (trust-ad).
        resolv.write_text(f"nameserver {self.resolver}\noptions trust-ad\n")
        shutil.chown(self.data, "postfix")
        self._postfix("check")
        script = 'mount --bind "$1" /etc/resolv.conf && exec postfix -c "$2" start'
        proc = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
            + [str(resolv), str(self.etc)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"postfix start failed: {proc.stdout}{proc.stderr}{self.log()}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.master_pid() is not None and self._listening():
                return self
            time.sleep(0.1)
        raise RuntimeError(
            f"postfix did not come up on {self.listen_addr}:{self.port}\n{self.log()}"
        )

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.listen_addr, self.port), timeout=1) as s:
                return s.recv(64).startswith(b"220")
        except OSError:
            return False

    def _postfix(self, *args: str) -> str:
        proc = subprocess.run(
            ["postfix", "-c", str(self.etc), *args], capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)}: {proc.stdout}{proc.stderr}")
        return proc.stdout + proc.stderr

    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def pids(self) -> list[int]:
        """The master and every process it started (Postfix daemons are its children)."""
        master = self.master_pid()
        if master is None:
            return []
        out = [master]
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
            if ppid == master:
                out.append(int(entry.name))
        return out

    def stop(self) -> None:
        if self.master_pid() is None:
            return
        try:
            self._postfix("stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pid = self.master_pid()
            if pid is not None:
                os.kill(pid, 9)
        deadline = time.monotonic() + 15
        while self.master_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.1)

    def cleanup(self) -> None:
        """Remove the instance directory (after `stop()`)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self, lines: int = 40) -> str:
        try:
            text = self.maillog.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def verified_tls_connections(self) -> int:
        """How many 'Verified TLS connection established' lines (DANE success) smtp(8) logged."""
        try:
            text = self.maillog.read_text(errors="replace")
        except OSError:
            return 0
        # smtp(8)'s line, not tlsproxy(8)'s copy of it for the same connection.
        return len(
            re.findall(r"postfix/smtp\[\d+\]: Verified TLS connection established to ", text)
        )
