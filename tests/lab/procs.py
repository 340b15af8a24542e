"""Child processes owned by the test session (nsd, unbound, the relay).

Owns: `ManagedProcess`, a spawned program whose stdout and stderr are appended to a log
file, and the registry of every live one so a session finalizer can stop leftovers.

Guarantees:
- Processes are only ever signalled by their own pid, never by name.
- `stop()` sends SIGTERM, waits up to a grace period, then SIGKILLs and reaps.
- Where util-linux `setpriv` exists (always on Debian), children are started with
  `--pdeathsig TERM`, so they die with the pytest process even if it is SIGKILLed and no
  finalizer runs. `setpriv` execs the program, so the pid stays the program's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ManagedProcess", "log_tail", "stop_all"]

_LIVE: dict[int, ManagedProcess] = {}
_SETPRIV = shutil.which("setpriv")


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file (empty if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        argv = self.argv
        if _SETPRIV is not None:
            argv = [_SETPRIV, "--pdeathsig", "TERM", "--", *argv]
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        _LIVE[self._popen.pid] = self

    def send_signal(self, sig: int) -> None:
        """Send `sig` to this process (by pid) if it is still running."""
        if self._popen is not None and self._popen.poll() is None:
            os.kill(self._popen.pid, sig)

    def wait(self, timeout: float) -> int:
        """Wait for exit and return the exit status.

        Raises:
            subprocess.TimeoutExpired: if it is still running after `timeout` seconds.
        """
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        code = self._popen.wait(timeout)
        _LIVE.pop(self._popen.pid, None)
        return code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` (default SIGKILL); for SIGKILL, also reap the process."""
        self.send_signal(sig)
        if sig == signal.SIGKILL:
            self.wait(timeout=10)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit status."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self.send_signal(signal.SIGTERM)
            try:
                return self.wait(grace)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
        return self.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def __repr__(self) -> str:
        state = "never started" if self._popen is None else f"pid {self._popen.pid}"
        return f"<ManagedProcess {self.name} {state}>"


def stop_all() -> list[str]:
    """Stop every process still registered; return descriptions of the ones stopped."""
    stopped = []
    for proc in list(_LIVE.values()):
        if proc.alive():
            stopped.append(repr(proc))
        proc.stop()
    _LIVE.clear()
    return stopped
