"""Throughput benchmark: the relay with DANE enforced against the same relay with DANE off.

Runs on the integration lab (tests/lab: nsd + validating unbound + TLS receivers on
127.R.x.y:25; needs root and the Debian packages that scripts/test.sh installs). For each
mode it starts a fresh relay (new spool), submits N messages over C parallel SMTP client
connections to recipients at `dane-ok.test` (secure MX, matching 3 1 1 TLSA), and
waits until the receiver has them all. Modes:

  dane  tls.level = "dane": TLSA lookup + STARTTLS + DANE verification per delivery
  may   tls.level = "may":  no TLSA lookup, STARTTLS without authentication (baseline)

Printed per mode and round: accept rate (messages answered 250 per second), end-to-end
rate (messages delivered per second, from the first submission to the last arrival) and
the relay's peak RSS. The modes alternate (dane, may, dane, may, …) so that machine drift
affects both; the ratio of medians is printed last.

Usage: .venv/bin/python bench/throughput.py [--messages N] [--clients C] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lab import ReceiverPool, RelayProcess, send_mail, start_dns_lab  # noqa: E402
from lab.relayproc import write_relay_config  # noqa: E402

BODY = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26


def _peak_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_once(
    lab: object, pool: ReceiverPool, workdir: Path, mode: str, n: int, clients: int, round_no: int
) -> tuple[float, float, int]:
    receiver = pool["dane-ok.test"]
    before = len(receiver.messages)
    conf = write_relay_config(
        workdir / f"{mode}-{round_no}.toml",
        listen=f"{lab.relay_addr}:2525",  # type: ignore[attr-defined]
        spool_dir=workdir / f"{mode}-{round_no}-spool",
        resolvers=[lab.resolver_addr],  # type: ignore[attr-defined]
        metrics_listen=f"{lab.relay_addr}:9425",  # type: ignore[attr-defined]
        tls_level=mode,
        log_level="warning",
    )
    relay = RelayProcess(conf, workdir / f"{mode}-{round_no}.log").start()
    host, port = relay.smtp_addr
    per_client = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]
    errors: list[str] = []

    def client(count: int) -> None:
        for _ in range(count):
            reply = send_mail(host, port, "bench@sender.example", ["rcpt@dane-ok.test"], BODY)
            if reply.code != 250:
                errors.append(str(reply))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in per_client]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = time.perf_counter()
    if errors:
        relay.stop()
        raise SystemExit(f"{mode}: {len(errors)} submissions failed, first: {errors[0]}")
    receiver.wait_for(before + n, timeout=600)
    delivered = time.perf_counter()
    rss = _peak_rss_kib(relay.pid)
    relay.stop()
    return n / (accepted - t0), n / (delivered - t0), rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, list[tuple[float, float, int]]] = {"dane": [], "may": []}
    with tempfile.TemporaryDirectory(prefix="dane-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "dns").mkdir()
        with start_dns_lab(workdir / "dns") as lab:
            certdir = workdir / "certs"
            certdir.mkdir()
            pool = ReceiverPool(lab.scenarios, certdir)
            try:
                pool.start("dane-ok.test")
                for r in range(args.rounds):
                    for mode in ("dane", "may"):
                        res = run_once(lab, pool, workdir, mode, args.messages, args.clients, r)
                        results[mode].append(res)
                        print(
                            f"round {r + 1} {mode:4s}: accept {res[0]:7.1f} msg/s  "
                            f"end-to-end {res[1]:7.1f} msg/s  peak RSS {res[2] / 1024:.1f} MiB",
                            flush=True,
                        )
            finally:
                pool.close()
    print(f"\n{args.messages} messages x {args.rounds} rounds, {args.clients} clients (medians):")
    med = {}
    for mode, rows in results.items():
        med[mode] = (
            statistics.median(r[0] for r in rows),
            statistics.median(r[1] for r in rows),
            statistics.median(r[2] for r in rows),
        )
        print(
            f"  {mode:4s}: accept {med[mode][0]:7.1f} msg/s  end-to-end {med[mode][1]:7.1f} "
            f"msg/s  peak RSS {med[mode][2] / 1024:.1f} MiB"
        )
    print(f"  end-to-end ratio dane/may: {med['dane'][1] / med['may'][1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
