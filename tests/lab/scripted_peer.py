"""A scripted, possibly hostile, SMTP server for the relay's outbound side.

Owns: `ScriptedPeer`, a threaded TCP server on one lab host address (port 25) that speaks
just enough SMTP to be scripted: its greeting, EHLO extensions, STARTTLS reply (and bytes
injected after it), per-recipient RCPT replies, DATA replies, and a command at which it
stalls forever. It records every command line (with whether TLS was up), every TLS
handshake and every message body, so tests can assert on what the relay did and did not
send.

Guarantees: every blocking read has a timeout; `close()` stops the listener and every
connection (stalled ones included) and joins the threads. The listener uses SO_REUSEADDR,
so a lab `Receiver` can bind the same address right after.

Does not: implement SMTP faithfully (no pipelining, no dot-unstuffing of bodies).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PeerScript", "ScriptedPeer"]

_IO_TIMEOUT = 30.0


@dataclass(frozen=True)
class PeerScript:
    """What the peer says. Reply strings are single lines without CRLF."""

    greeting: str | None = "220 peer.test ESMTP scripted"  # None: never greet
    close_after_greeting: bool = False
    extensions: Sequence[str] = ("PIPELINING", "SIZE 10240000", "8BITMIME", "STARTTLS")
    ehlo_reply: str | None = None  # e.g. "502 5.5.2 ...": EHLO refused (HELO still works)
    starttls_reply: str = "220 2.0.0 Ready to start TLS"
    inject_after_starttls: bytes = b""  # sent in the same write as the STARTTLS reply
    mail_reply: str = "250 2.1.0 Ok"
    rcpt_replies: Mapping[str, str] = field(default_factory=dict)  # address -> reply
    data_reply: str = "354 End data with <CR><LF>.<CR><LF>"
    dot_reply: str = "250 2.0.0 Ok: queued"
    stall_on: str | None = None  # a verb (e.g. "MAIL"): read it, then never answer


class ScriptedPeer:
    def __init__(
        self,
        address: str,
        script: PeerScript,
        *,
        cert_chain: Path | None = None,
        key: Path | None = None,
        port: int = 25,
    ) -> None:
        self.address = address
        self.port = port
        self.script = script
        self._ctx: ssl.SSLContext | None = None
        if cert_chain is not None and key is not None:
            self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ctx.load_cert_chain(cert_chain, key)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._commands: list[tuple[str, bool]] = []
        self._messages: list[bytes] = []
        self._handshakes = 0
        self._connections = 0
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((address, port))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"peer-{address}", daemon=True
        )
        self._accept_thread.start()

    # -- what happened -------------------------------------------------------------

    @property
    def commands(self) -> list[tuple[str, bool]]:
        """(command line, tls) for every command received, in order."""
        with self._lock:
            return list(self._commands)

    @property
    def verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].upper() for c, _ in self.commands]

    @property
    def messages(self) -> list[bytes]:
        with self._lock:
            return list(self._messages)

    @property
    def handshakes(self) -> int:
        with self._lock:
            return self._handshakes

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    def wait_for(self, predicate: str, timeout: float = 20.0) -> None:
        """Block until the peer saw a command starting with `predicate` (e.g. "QUIT").

        Raises:
            AssertionError: not seen within `timeout` seconds.
        """
        prefix = predicate.upper()
        with self._cond:
            seen = self._cond.wait_for(
                lambda: any(c.upper().startswith(prefix) for c, _ in self._commands), timeout
            )
            got = list(self._commands)
        if not seen:
            raise AssertionError(f"peer {self.address}: no {predicate!r} within {timeout}s: {got}")

    def wait_connections(self, count: int, timeout: float = 20.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: self._connections >= count, timeout)
        if not ok:
            raise AssertionError(f"peer {self.address}: fewer than {count} connections")

    # -- serving -------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(_IO_TIMEOUT)
            with self._cond:
                self._connections += 1
                self._socks.append(conn)
                self._cond.notify_all()
            t = threading.Thread(target=self._serve_quietly, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve_quietly(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError, ValueError):
            self._serve(conn)
        with contextlib.suppress(OSError):
            conn.close()

    def _record(self, line: str, tls: bool) -> None:
        with self._cond:
            self._commands.append((line, tls))
            self._cond.notify_all()

    def _serve(self, sock: socket.socket) -> None:
        s = self.script
        buf = bytearray()
        tls = False
        accepted = 0  # recipients accepted in the current transaction

        def send(data: bytes) -> None:
            sock.sendall(data)

        def readline() -> bytes | None:
            nonlocal buf
            while b"\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                buf.extend(chunk)
            line, _, rest = bytes(buf).partition(b"\r\n")
            buf = bytearray(rest)
            return line

        if s.greeting is None:
            self._stop.wait()
            return
        send(s.greeting.encode() + b"\r\n")
        if s.close_after_greeting:
            return
        while True:
            raw = readline()
            if raw is None:
                return
            line = raw.decode("utf-8", "replace")
            verb = line.split(" ", 1)[0].upper()
            self._record(line, tls)
            if s.stall_on is not None and verb == s.stall_on.upper():
                self._stop.wait()
                return
            if verb == "EHLO" and s.ehlo_reply is not None:
                send(s.ehlo_reply.encode() + b"\r\n")
            elif verb in ("EHLO", "HELO"):
                exts = [e for e in s.extensions if not (tls and e.upper() == "STARTTLS")]
                if verb == "HELO" or not exts:
                    send(b"250 peer.test\r\n")
                else:
                    lines = ["peer.test", *exts]
                    out = "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n"
                    send(out.encode())
            elif verb == "STARTTLS":
                send(s.starttls_reply.encode() + b"\r\n" + s.inject_after_starttls)
                if not s.starttls_reply.startswith("220"):
                    continue
                if self._ctx is None:
                    return  # hang up where the TLS handshake should start
                buf.clear()  # a server must not act on plaintext sent before the handshake
                sock = self._ctx.wrap_socket(sock, server_side=True)
                tls = True
                with self._cond:
                    self._handshakes += 1
                    self._socks.append(sock)
            elif verb == "MAIL":
                accepted = 0
                send(s.mail_reply.encode() + b"\r\n")
            elif verb == "RCPT":
                addr = line.partition(":")[2].strip()
                addr = addr.split(" ", 1)[0].strip("<>")
                reply = s.rcpt_replies.get(addr, "250 2.1.5 Ok")
                accepted += reply.startswith("2")
                send(reply.encode() + b"\r\n")
            elif verb == "DATA" and not accepted:
                # RFC 2920 §3.1: a pipelined DATA after every RCPT failed is refused.
                send(b"554 5.5.1 Error: no valid recipients\r\n")
            elif verb == "DATA":
                send(s.data_reply.encode() + b"\r\n")
                if not s.data_reply.startswith("354"):
                    continue
                body = bytearray()
                while True:
                    data_line = readline()
                    if data_line is None:
                        return
                    if data_line == b".":
                        break
                    body.extend(data_line + b"\r\n")
                with self._cond:
                    self._messages.append(bytes(body))
                    self._cond.notify_all()
                send(s.dot_reply.encode() + b"\r\n")
            elif verb == "QUIT":
                send(b"221 2.0.0 Bye\r\n")
                return
            elif verb in ("RSET", "NOOP"):
                accepted = 0 if verb == "RSET" else accepted
                send(b"250 2.0.0 Ok\r\n")
            else:
                send(b"502 5.5.2 Error: command not recognized\r\n")

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._accept_thread.join(timeout=5)
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> ScriptedPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
