"""SMTP receivers for the lab's scenario hosts: where the relay under test delivers.

Owns:
- `Receiver`: an aiosmtpd `Controller` (own thread and event loop) on a host's address,
  port 25, presenting that host's certificate chain on STARTTLS (or not offering STARTTLS
  at all) and offering SMTPUTF8, recording every MAIL command, the SNI name of every TLS
  handshake and every message it accepts.
- `StallReceiver`: a bare TCP listener that accepts connections and never sends a
  greeting, to hold the relay mid-delivery (e.g. while it is SIGKILLed).
- `ReceiverPool`: starts receivers by domain or host name and stops them all at once.

Guarantees: records are thread-safe; `Receiver.wait_for` and `StallReceiver.connected`
block on a condition/event (no polling); `close()`/`stop()` release port 25 so another
receiver can bind the same address immediately (SO_REUSEADDR on both kinds).

Does not: check anything about the client; every MAIL, RCPT and DATA is accepted.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from .scenarios import MxHost, Scenario

__all__ = ["ReceivedMessage", "Receiver", "ReceiverPool", "StallReceiver"]


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    tls: bool  # STARTTLS had completed when DATA arrived
    helo: str | None
    peer: tuple[str, int] | None
    smtputf8: bool = False  # MAIL FROM carried SMTPUTF8 (RFC 6531 §3.4)


class _Recorder:
    """The aiosmtpd handler; all state is guarded by one condition variable."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.messages: list[ReceivedMessage] = []
        self.mail_commands: list[tuple[str, bool]] = []  # (address, tls)
        self.server_names: list[str | None] = []  # SNI of every TLS handshake, in order

    def sni(self, sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: object) -> None:
        with self.cond:
            self.server_names.append(name)
            self.cond.notify_all()

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        with self.cond:
            self.mail_commands.append((address, session.ssl is not None))
            self.cond.notify_all()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        peer = session.peer if isinstance(session.peer, tuple) else None
        msg = ReceivedMessage(
            # aiosmtpd keeps the null reverse-path as the text "<>"; record it as "".
            mail_from="" if envelope.mail_from == "<>" else (envelope.mail_from or ""),
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=content,
            tls=session.ssl is not None,
            helo=session.host_name,
            peer=peer,
            smtputf8=bool(envelope.smtp_utf8),
        )
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()
        return "250 2.0.0 OK received by lab"


class Receiver:
    """A running SMTP receiver for one `MxHost`."""

    def __init__(self, host: MxHost, certdir: Path) -> None:
        self.host = host
        self._recorder = _Recorder()
        kwargs: dict[str, Any] = {}
        if host.starttls:
            chain, key = host.leaf.write(certdir, host.name)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(chain, key)
            ctx.sni_callback = self._recorder.sni
            kwargs["tls_context"] = ctx
            kwargs["require_starttls"] = False
        self._controller = Controller(
            self._recorder,
            hostname=host.address,
            port=host.port,
            server_hostname=host.name,
            enable_SMTPUTF8=True,  # offered, as by Postfix's default (smtputf8_enable)
            **kwargs,
        )
        self._running = False

    @property
    def address(self) -> str:
        return self.host.address

    @property
    def port(self) -> int:
        return self.host.port

    def start(self) -> Receiver:
        self._controller.start()
        self._running = True
        return self

    def stop(self) -> None:
        if self._running:
            self._controller.stop()
            self._running = False

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of the messages received so far."""
        with self._recorder.cond:
            return list(self._recorder.messages)

    @property
    def mail_commands(self) -> list[tuple[str, bool]]:
        """(reverse-path, tls) for every MAIL command seen, accepted or not."""
        with self._recorder.cond:
            return list(self._recorder.mail_commands)

    @property
    def server_names(self) -> list[str | None]:
        """The SNI name the client sent in each TLS handshake (None: no SNI), in order."""
        with self._recorder.cond:
            return list(self._recorder.server_names)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until at least `count` messages arrived; return them all.

        Raises:
            AssertionError: if fewer than `count` arrived within `timeout` seconds.
        """
        with self._recorder.cond:
            arrived = self._recorder.cond.wait_for(
                lambda: len(self._recorder.messages) >= count, timeout
            )
            got = list(self._recorder.messages)
        if not arrived:
            raise AssertionError(
                f"{self.host.name} ({self.address}): expected {count} message(s) "
                f"within {timeout}s, got {len(got)}"
            )
        return got

    def __repr__(self) -> str:
        tls = "STARTTLS" if self.host.starttls else "no STARTTLS"
        return f"<Receiver {self.host.name} {self.address}:{self.port} {tls}>"


class StallReceiver:
    """Accepts TCP connections on a host's address and never says anything."""

    def __init__(self, host: MxHost) -> None:
        self.host = host
        self.connected = threading.Event()
        self._listener = socket.create_server((host.address, host.port))
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._accepted: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"stall-{host.name}", daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._accepted)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = self._listener.accept()
                        with self._lock:
                            self._accepted.append(conn)
                        self.connected.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        with self._lock:
            for conn in self._accepted:
                conn.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __repr__(self) -> str:
        return f"<StallReceiver {self.host.name} {self.host.address}:{self.host.port}>"


class ReceiverPool:
    """The receivers running for one test; `close()` stops every one of them."""

    def __init__(self, scenarios: dict[str, Scenario], certdir: Path) -> None:
        self._scenarios = scenarios
        self._hosts = {h.name: h for s in scenarios.values() for h in s.hosts}
        self._certdir = certdir
        self._running: dict[str, Receiver | StallReceiver] = {}

    def _hosts_for(self, name: str) -> list[MxHost]:
        if name in self._hosts:
            return [self._hosts[name]]
        if name in self._scenarios:
            return list(self._scenarios[name].hosts)
        raise KeyError(f"no scenario domain or host named {name!r}")

    def start(self, *names: str) -> list[Receiver]:
        """Start normal receivers for the named domains/hosts (all hosts if none named).

        Hosts that already have a receiver running are left as they are. Returns the
        receivers for the named hosts, in table order.
        """
        hosts = (
            list(self._hosts.values())
            if not names
            else [h for n in names for h in self._hosts_for(n)]
        )
        started = []
        for host in hosts:
            current = self._running.get(host.name)
            if current is None:
                current = Receiver(host, self._certdir).start()
                self._running[host.name] = current
            if not isinstance(current, Receiver):
                raise RuntimeError(f"{host.name} is running a {current!r}; stop it first")
            started.append(current)
        return started

    def start_stall(self, name: str) -> StallReceiver:
        """Start a stall receiver on the (single) host of a domain, or on a named host."""
        hosts = self._hosts_for(name)
        if len(hosts) != 1:
            raise ValueError(f"{name} has {len(hosts)} hosts; name one")
        host = hosts[0]
        if host.name in self._running:
            raise RuntimeError(f"{host.name} already has {self._running[host.name]!r}")
        stall = StallReceiver(host)
        self._running[host.name] = stall
        return stall

    def stop(self, name: str) -> None:
        """Stop whatever runs on the named host(s), freeing their addresses."""
        for host in self._hosts_for(name):
            running = self._running.pop(host.name, None)
            if isinstance(running, Receiver):
                running.stop()
            elif running is not None:
                running.close()

    def __getitem__(self, name: str) -> Receiver:
        """The running normal receiver of a host, or of a single-host domain."""
        hosts = self._hosts_for(name)
        if len(hosts) != 1:
            raise KeyError(f"{name} has {len(hosts)} hosts; index by host name")
        running = self._running.get(hosts[0].name)
        if not isinstance(running, Receiver):
            raise KeyError(f"no normal receiver running for {hosts[0].name}")
        return running

    def running(self) -> list[Receiver | StallReceiver]:
        return list(self._running.values())

    def total_messages(self) -> int:
        return sum(len(r.messages) for r in self._running.values() if isinstance(r, Receiver))

    def close(self) -> None:
        errors: list[BaseException] = []
        for name in list(self._running):
            try:
                self.stop(name)
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]
