"""End-to-end benchmark: dane-relay (DANE and `may`) against Postfix on the same lab.

`bench/run` runs this file. It starts the integration lab's DNS side (tests/lab: nsd with
zones signed at start, a validating unbound on 127.R.0.2) and a receiving sink (bench/sink.py,
its own process) on the address of `mx.dane-ok.test`, which publishes a DANE-EE 3 1 1 TLSA
record. Then, for each round, each system in turn (ABAB... interleaving, so drift on a busy
machine affects them alike):

  relay-dane  dane-relay, tls.level = "dane" (TLSA lookup, STARTTLS, DANE verification)
  relay-may   dane-relay, tls.level = "may"  (STARTTLS without authentication, no TLSA)
  postfix     Debian's Postfix as a DANE client (smtp_dns_support_level = dnssec,
              smtp_tls_security_level = dane) on the same resolver and sink (bench/postfix.py)

gets a fresh spool or queue, N messages of S bytes submitted over C parallel persistent
client connections to rcpt@dane-ok.test, and is measured until the sink holds them all:

  msg/s      end-to-end throughput: N / (last arrival at the sink - first MAIL FROM)
  cpu_ms/msg CPU time (user+system) the system spent per message, over all its processes
             (Postfix: live daemons plus those the master has reaped)
  sub p50/99 submission latency: MAIL FROM to the 250 after the final dot
  del p50/99 delivery latency: that 250 to the message's arrival at the sink
  peak RSS   the largest sum of VmRSS over the system's processes, sampled every 0.2 s
             (for the relay also its VmHWM); for Postfix, whose daemons share pages,
             peak PSS (proportional set size) is the fairer figure and is shown too

and whether DANE really happened: the relay's dane_relay_outbound_tls{level="verified"}
counter, Postfix's "Verified TLS connection established" log lines (smtp(8)).

A queue-depth run follows (relay-dane): Q messages submitted while the sink is down (the
relay defers them: connection refused), RSS measured while they are queued, then the sink
is started, `dane-relay queue flush` releases the queue, and the drain is timed.

`--profile DIR` records the relay with py-spy (raw collapsed stacks in DIR) and prints a
summary of where its samples went.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from lab import DnsLab, RelayProcess, start_dns_lab  # noqa: E402
from lab.relayproc import write_relay_config  # noqa: E402
from loadgen import Submission, submit_all  # noqa: E402
from postfix import PostfixInstance, postfix_available  # noqa: E402
from spyreport import summarize  # noqa: E402

DOMAIN = "dane-ok.test"
RCPT = f"rcpt@{DOMAIN}"
SYSTEMS = ("relay-dane", "relay-may", "postfix")
RELAY_PORT = 2525
POSTFIX_PORT = 2525


# -- the sink --------------------------------------------------------------------------


class Sink:
    """bench/sink.py as a child process; a thread collects its ARRIVED lines."""

    def __init__(self, lab: DnsLab, certdir: Path) -> None:
        host = lab.scenarios[DOMAIN].host()
        chain, key = host.leaf.write(certdir, host.name)
        self._argv = [
            sys.executable,
            str(HERE / "sink.py"),
            host.address,
            str(host.port),
            str(chain),
            str(key),
            host.name,
        ]
        self.address = host.address
        self._cond = threading.Condition()
        self.arrivals: dict[str, tuple[float, bool]] = {}
        self.duplicates = 0
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        setpriv = shutil.which("setpriv")  # the sink dies with the bench (as lab daemons do)
        argv = [setpriv, "--pdeathsig", "TERM", "--", *self._argv] if setpriv else self._argv
        self._proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, bufsize=1
        )
        assert self._proc.stdout is not None
        first = self._proc.stdout.readline()
        if first.strip() != "READY":
            self.stop()
            raise RuntimeError(f"sink did not start: {first!r}")
        self._reader = threading.Thread(target=self._read, args=(self._proc,), daemon=True)
        self._reader.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            parts = line.split()
            if len(parts) != 4 or parts[0] != "ARRIVED":
                continue
            with self._cond:
                if parts[1] in self.arrivals:
                    self.duplicates += 1
                else:
                    self.arrivals[parts[1]] = (float(parts[2]), parts[3] == "1")
                self._cond.notify_all()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            self._proc = None
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None

    def wait_all(self, ids: list[str], timeout: float) -> int:
        """Wait until every id arrived (or `timeout`); return how many did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                count = sum(1 for i in ids if i in self.arrivals)
                left = deadline - time.monotonic()
                if count == len(ids) or left <= 0:
                    return count
                self._cond.wait(min(left, 1.0))


# -- memory ----------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU of `pids` and of their reaped children (cutime/cstime)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / _TICK


class MemorySampler:
    """Samples the summed VmRSS and Pss of `pids()` every `interval` seconds."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.2) -> None:
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        pids = self._pids()
        rss = sum(_status_kib(p, "VmRSS:") for p in pids)
        pss = sum(_pss_kib(p) for p in pids)
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_pss_kib = max(self.peak_pss_kib, pss)
        return rss, pss

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# -- the systems under test ------------------------------------------------------------


class RelaySystem:
    def __init__(self, lab: DnsLab, workdir: Path, name: str, tls_level: str) -> None:
        self.name = name
        conf = write_relay_config(
            workdir / f"{name}.toml",
            listen=f"{lab.relay_addr}:{RELAY_PORT}",
            spool_dir=workdir / f"{name}-spool",
            resolvers=[lab.resolver_addr],
            metrics_listen=f"{lab.relay_addr}:9425",
            tls_level=tls_level,
            log_level="info",
        )
        self.config = conf
        self.spool = workdir / f"{name}-spool"
        self.log_path = workdir / f"{name}.log"
        self.relay = RelayProcess(conf, self.log_path)
        self.addr = (lab.relay_addr, RELAY_PORT)

    def start(self) -> None:
        self.relay.start()

    def pids(self) -> list[int]:
        return [self.relay.pid] if self.relay.alive() else []

    def hwm_kib(self) -> int:
        return _status_kib(self.relay.pid, "VmHWM:")

    def tls_sessions(self) -> dict[str, int]:
        """dane_relay_outbound_tls by level (verified, trusted, encrypted, none)."""
        out: dict[str, int] = {}
        for (name, labels), value in self.relay.metrics().items():
            if name == "dane_relay_outbound_tls_total":
                out[dict(labels).get("level", "?")] = int(value)
        return out

    def stop(self) -> None:
        self.relay.stop(grace=20)


class PostfixSystem:
    def __init__(self, lab: DnsLab) -> None:
        self.name = "postfix"
        self.instance = PostfixInstance(
            listen_addr=f"127.{lab.octet}.0.20", port=POSTFIX_PORT, resolver=lab.resolver_addr
        )
        self.addr = (self.instance.listen_addr, POSTFIX_PORT)

    def start(self) -> None:
        self.instance.start()

    def pids(self) -> list[int]:
        return self.instance.pids()

    def stop(self) -> None:
        self.instance.stop()


@dataclass
class RunResult:
    system: str
    round: int
    messages: int
    arrived: int
    over_tls: int
    dane_verified: int
    throughput: float
    cpu_ms_per_msg: float
    sub_p50_ms: float
    sub_p99_ms: float
    del_p50_ms: float
    del_p99_ms: float
    peak_rss_mib: float
    peak_pss_mib: float


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextmanager
def _py_spy(pid: int, out: Path | None, gil: bool = False) -> Iterator[None]:
    """py-spy record --format raw on `pid` while the block runs (no-op if out is None).

    Default: every thread that is not idle (wall time, fsyncs in worker threads included);
    `gil`: only the thread holding the GIL (where the interpreter spends its CPU)."""
    if out is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "-o", str(out)]
        + (["--gil"] if gil else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)  # let it attach before the load starts
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_one(
    system: RelaySystem | PostfixSystem,
    sink: Sink,
    args: argparse.Namespace,
    round_no: int,
    profile: Path | None,
) -> RunResult:
    tag = f"{system.name}-r{round_no}"
    ids = [f"{tag}-{i}" for i in range(args.messages)]
    try:
        system.start()  # inside the try: a half-started Postfix master is stopped too
        spy_out = profile / f"{tag}.raw" if profile and isinstance(system, RelaySystem) else None
        spy_pid = system.relay.pid if isinstance(system, RelaySystem) else 0
        cpu0 = cpu_seconds(system.pids())
        with MemorySampler(system.pids) as mem, _py_spy(spy_pid, spy_out, args.profile_gil):
            subs: list[Submission] = submit_all(
                *system.addr, ids, clients=args.clients, size=args.size, rcpt=RCPT
            )
            arrived = sink.wait_all(ids, timeout=args.timeout)
        cpu = cpu_seconds(system.pids()) - cpu0
        rss = mem.peak_rss_kib
        if isinstance(system, RelaySystem):
            rss = max(rss, system.hwm_kib())
            tls = system.tls_sessions()
            verified = tls.get("verified", 0)
        else:
            verified = system.instance.verified_tls_connections()
    finally:
        system.stop()
    if spy_out is not None and spy_out.exists():
        print(summarize(spy_out), flush=True)
    got = {i: sink.arrivals[i] for i in ids if i in sink.arrivals}
    first = min(s.started for s in subs)
    last = max(t for t, _ in got.values()) if got else first
    sub_lat = [(s.accepted - s.started) * 1000 for s in subs]
    del_lat = [(got[s.bench_id][0] - s.accepted) * 1000 for s in subs if s.bench_id in got]
    result = RunResult(
        system=system.name,
        round=round_no,
        messages=args.messages,
        arrived=arrived,
        over_tls=sum(1 for _, tls in got.values() if tls),
        dane_verified=verified,
        throughput=len(got) / (last - first) if last > first else 0.0,
        cpu_ms_per_msg=1000 * cpu / max(1, args.messages),
        sub_p50_ms=_pct(sub_lat, 0.50),
        sub_p99_ms=_pct(sub_lat, 0.99),
        del_p50_ms=_pct(del_lat, 0.50),
        del_p99_ms=_pct(del_lat, 0.99),
        peak_rss_mib=rss / 1024,
        peak_pss_mib=mem.peak_pss_kib / 1024,
    )
    print(
        f"round {round_no} {system.name:10s} {result.throughput:8.1f} msg/s  "
        f"cpu {result.cpu_ms_per_msg:.2f} ms/msg  "
        f"arrived {arrived}/{args.messages}  over TLS {result.over_tls}  verified TLS {verified}  "
        f"peak RSS {result.peak_rss_mib:.1f} MiB",
        flush=True,
    )
    return result


def queue_depth_run(
    lab: DnsLab, workdir: Path, sink: Sink, args: argparse.Namespace
) -> dict[str, Any]:
    """Q messages queued while the destination is down, then released with a flush."""
    system = RelaySystem(lab, workdir, "queue-depth", "dane")
    ids = [f"queue-{i}" for i in range(args.queue_depth)]
    sink.stop()  # the destination is down: connection refused at its MX
    try:
        system.start()
        with MemorySampler(system.pids) as mem:
            t0 = time.monotonic()
            submit_all(*system.addr, ids, clients=args.clients, size=args.size, rcpt=RCPT)
            queued_s = time.monotonic() - t0
            time.sleep(2.0)  # let the first, failing attempts settle
            rss_queued_kib, _ = mem.sample()
            sink.start()
            t1 = time.monotonic()
            flush = subprocess.run(
                [sys.executable, "-m", "relay", "queue", "flush", "-c", str(system.config)],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=ROOT,
            )
            if flush.returncode != 0:
                raise RuntimeError(f"queue flush failed: {flush.stdout}{flush.stderr}")
            arrived = sink.wait_all(ids, timeout=args.timeout * max(1, args.queue_depth // 5000))
            drain_s = time.monotonic() - t1
        peak_kib = max(mem.peak_rss_kib, system.hwm_kib())
    finally:
        system.stop()
    result = {
        "messages": args.queue_depth,
        "arrived": arrived,
        "submit_s": round(queued_s, 2),
        "rss_queued_mib": round(rss_queued_kib / 1024, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "drain_s": round(drain_s, 2),
        "drain_msg_s": round(arrived / drain_s, 1) if drain_s > 0 else 0.0,
    }
    return result


# -- output ----------------------------------------------------------------------------

_COLUMNS = (
    ("system", "{:>10}"),
    ("rounds", "{:>6}"),
    ("msg/s", "{:>8.1f}"),
    ("cpu_ms/msg", "{:>10.2f}"),
    ("sub_p50_ms", "{:>10.1f}"),
    ("sub_p99_ms", "{:>10.1f}"),
    ("del_p50_ms", "{:>10.1f}"),
    ("del_p99_ms", "{:>10.1f}"),
    ("peak_rss_mib", "{:>12.1f}"),
    ("peak_pss_mib", "{:>12.1f}"),
    ("arrived", "{:>9}"),
    ("dane_verified", "{:>13}"),
)


def medians(results: list[RunResult]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r.system for r in results):
        rows = [r for r in results if r.system == name]
        out[name] = {
            "system": name,
            "rounds": len(rows),
            "msg/s": statistics.median(r.throughput for r in rows),
            "cpu_ms/msg": statistics.median(r.cpu_ms_per_msg for r in rows),
            "sub_p50_ms": statistics.median(r.sub_p50_ms for r in rows),
            "sub_p99_ms": statistics.median(r.sub_p99_ms for r in rows),
            "del_p50_ms": statistics.median(r.del_p50_ms for r in rows),
            "del_p99_ms": statistics.median(r.del_p99_ms for r in rows),
            "peak_rss_mib": statistics.median(r.peak_rss_mib for r in rows),
            "peak_pss_mib": statistics.median(r.peak_pss_mib for r in rows),
            "arrived": f"{sum(r.arrived for r in rows)}/{sum(r.messages for r in rows)}",
            "dane_verified": min(r.dane_verified for r in rows),
        }
    return out


def print_table(med: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, float]:
    print(
        f"\nRESULTS (median of rounds; {args.messages} messages of {args.size} bytes, "
        f"{args.clients} client connections)"
    )
    widths = [
        max([len(name)] + [len(fmt.format(row[name])) for row in med.values()])
        for name, fmt in _COLUMNS
    ]
    print("  ".join(name.rjust(w) for (name, _), w in zip(_COLUMNS, widths, strict=True)))
    for row in med.values():
        cells = [fmt.format(row[name]) for name, fmt in _COLUMNS]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    ratios: dict[str, float] = {}
    tp = {name: row["msg/s"] for name, row in med.items()}
    if "relay-dane" in tp and "postfix" in tp and tp["postfix"] > 0:
        ratios["relay-dane/postfix"] = tp["relay-dane"] / tp["postfix"]
    if "relay-may" in tp and "postfix" in tp and tp["postfix"] > 0:
        ratios["relay-may/postfix"] = tp["relay-may"] / tp["postfix"]
    if "relay-dane" in tp and "relay-may" in tp and tp["relay-may"] > 0:
        ratios["relay-dane/relay-may"] = tp["relay-dane"] / tp["relay-may"]
    for name, value in ratios.items():
        print(f"RATIO throughput {name}: {value:.2f}")
    return ratios


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def proof_failures(results: list[RunResult]) -> list[str]:
    """The proof of DANE (docs/performance.md "Proof of DANE") that a run broke: relay-dane
    and Postfix verified at least one TLS session, relay-may none, and every message that
    arrived came over TLS."""
    problems = []
    for r in results:
        where = f"round {r.round} {r.system}"
        if r.system in ("relay-dane", "postfix") and r.dane_verified < 1:
            problems.append(f"{where}: no verified TLS session")
        if r.system == "relay-may" and r.dane_verified != 0:
            problems.append(f"{where}: {r.dane_verified} verified TLS session(s) at level may")
        if r.over_tls != r.arrived:
            problems.append(f"{where}: {r.arrived - r.over_tls} message(s) arrived without TLS")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/run",
        description=__doc__.split("\n\n")[0] + " Runs as root.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--messages", "-n", type=_at_least(1), default=5000, help="messages per run")
    ap.add_argument("--size", type=_at_least(64), default=10240, help="message size in bytes")
    ap.add_argument("--clients", "-c", type=_at_least(1), default=8, help="client connections")
    ap.add_argument("--rounds", "-r", type=_at_least(1), default=1, help="rounds of every system")
    ap.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}"
    )
    ap.add_argument(
        "--queue-depth",
        type=_at_least(0),
        default=20000,
        help="queue-depth run size (relay-dane), 0: none",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds to wait for arrivals (the queue-depth run: this x size/5000)",
    )
    ap.add_argument("--profile", type=Path, help="record the relay with py-spy into this dir")
    ap.add_argument(
        "--profile-gil", action="store_true", help="profile only the GIL holder (CPU view)"
    )
    ap.add_argument("--json", type=Path, help="also write all results as JSON here")
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if len(set(systems)) != len(systems):
        ap.error(f"a system is named twice: {args.systems} (use --rounds to repeat)")
    if not systems and args.queue_depth == 0:
        ap.error("nothing to run: no --systems and --queue-depth 0")
    if "postfix" in systems and not postfix_available():
        ap.error("postfix is not installed (apt-get install postfix; see README Benchmarks)")
    if os.geteuid() != 0:
        ap.error("must run as root (the lab binds port 53 and 25 on loopback)")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop Postfix (a daemon) and the lab.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    results: list[RunResult] = []
    queue: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="dane-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "dns").mkdir()
        (workdir / "certs").mkdir()
        with start_dns_lab(workdir / "dns") as lab:
            sink = Sink(lab, workdir / "certs")
            sink.start()
            try:
                for round_no in range(1, args.rounds + 1):
                    for name in systems:
                        rundir = workdir / f"r{round_no}"
                        rundir.mkdir(exist_ok=True)
                        system: RelaySystem | PostfixSystem
                        if name == "postfix":
                            system = PostfixSystem(lab)
                        else:
                            system = RelaySystem(lab, rundir, name, name.split("-", 1)[1])
                        try:
                            results.append(run_one(system, sink, args, round_no, args.profile))
                        finally:
                            if isinstance(system, PostfixSystem):
                                system.instance.cleanup()
                if args.queue_depth > 0:
                    queue = queue_depth_run(lab, workdir, sink, args)
            finally:
                sink.stop()
    med = medians(results)
    ratios = print_table(med, args)
    if queue is not None:
        print(
            f"QUEUE-DEPTH relay-dane: {queue['messages']} queued in {queue['submit_s']} s "
            f"with the destination down; RSS while queued {queue['rss_queued_mib']} MiB, "
            f"peak {queue['peak_rss_mib']} MiB; drain after flush {queue['drain_s']} s = "
            f"{queue['drain_msg_s']} msg/s; arrived {queue['arrived']}/{queue['messages']}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "runs": [asdict(r) for r in results],
                    "medians": med,
                    "ratios": ratios,
                    "queue_depth": queue,
                    "sink_duplicates": sink.duplicates,
                },
                indent=2,
            )
        )
    lost = sum(r.messages - r.arrived for r in results)
    if queue is not None:
        lost += queue["messages"] - queue["arrived"]
    failed = [f"{lost} message(s) did not arrive"] if lost else []
    failed += proof_failures(results)
    for problem in failed:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
