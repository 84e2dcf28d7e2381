"""Benchmark: real 1 GiB migrations direct, via socat and via migtap, interleaved; raw throughput.

For each of ``--runs`` rounds it migrates a guest with ``--random-mib`` MiB of random RAM once per
path, in rotating order, with ``max-bandwidth`` raised so QEMU does not throttle itself. It
reports the median of QEMU's own ``total-time`` per path and the ratio to direct. Then it pushes
``--raw-gib`` GiB through each relay (and directly) with a socket sender and receiver and reports
GiB/s. Relays run as separate processes, as they would in production.

    .venv/bin/python scripts/bench_relay.py --runs 5 --out docs/bench-relay.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.qemu.harness import MiB, vm_pair  # noqa: E402

GiB = 1024 * MiB


def _free_port() -> int:
    # Only for socat/haproxy, which cannot report a port-0 bind; a benchmark may live with the race.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayProc:
    """A relay process listening on 127.0.0.1 and forwarding to 127.0.0.1:dst_port."""

    #: ``--baseline-tree``: the source tree that ``migtap-...@base`` paths run from.
    baseline_tree: Path | None = None

    def __init__(self, kind: str, dst_port: int, workdir: Path) -> None:
        self.kind = kind
        self.dst_port = dst_port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.capture_dir: Path | None = None
        self.metrics_port: int | None = None  # metrics_listen=HOST:PORT: not the relay's port

    def start(self) -> None:
        if self.kind.startswith("migtap"):
            # "migtap-LOOP" or "migtap-LOOP:option=value+option=value" (listen options); a
            # trailing "@base" runs the relay from --baseline-tree (an earlier commit's checkout)
            kind, _, tree = self.kind.partition("@")
            source = ROOT
            if tree:
                if tree != "base" or self.baseline_tree is None:
                    raise ValueError(f"{self.kind}: '@base' needs --baseline-tree")
                source = self.baseline_tree
            name, _, opts = kind.partition(":")
            loop = name.split("-", 1)[1]
            extra = []
            for opt in filter(None, opts.split("+")):
                key, _, value = opt.partition("=")
                if key == "capture":  # a fresh directory per run, on the same disk as .cache
                    self.capture_dir = Path(tempfile.mkdtemp(prefix="capture-", dir=self.workdir))
                    value = str(self.capture_dir)
                if key == "metrics_listen":  # port 0: pick one, so the relay's port is the other
                    host, _, port = value.rpartition(":")
                    self.metrics_port = int(port) or _free_port()
                    value = f"{host}:{self.metrics_port}"
                extra += [f"--{key.replace('_', '-')}"] + ([value] if value else [])
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "migtap",
                    "listen",
                    "127.0.0.1:0",
                    "--forward",
                    f"127.0.0.1:{self.dst_port}",
                    "--loop",
                    loop,
                    "--log-format",
                    "json",
                    "--log-level",
                    "warning",
                    *extra,
                ],
                stderr=(self.workdir / f"{self.kind.replace(':', '_')}.log").open("ab"),
                cwd=source,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(source)},
            )
            # Never probe with a connection: the relay would pass it on and QEMU would take it
            # as the main channel. Ask the socket table which port the process listens on.
            self.port = self._wait_listening_port()
        elif self.kind in ("socat", "socat-1m"):
            # socat-1m: socat with a 1 MiB buffer (-b), as anyone tuning socat would run it
            self.port = _free_port()
            self.proc = subprocess.Popen(
                [
                    "socat",
                    *(["-b", "1048576"] if self.kind == "socat-1m" else []),
                    f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork",
                    f"TCP:127.0.0.1:{self.dst_port}",
                ],
            )
            self._wait_listening_port()
        elif self.kind == "haproxy":
            self.port = _free_port()
            cfg = self.workdir / "haproxy.cfg"
            cfg.write_text(
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1m\n"
                f"  timeout server 1m\nlisten fwd\n  bind 127.0.0.1:{self.port}\n"
                f"  server dst 127.0.0.1:{self.dst_port}\n"
            )
            self.proc = subprocess.Popen(
                ["haproxy", "-f", str(cfg), "-db"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self._wait_listening_port()
        else:
            raise ValueError(self.kind)

    def _wait_listening_port(self) -> int:
        assert self.proc is not None
        pid = self.proc.pid
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["ss", "-Hltnp"], capture_output=True, text=True, check=False
            ).stdout
            for line in out.splitlines():
                port = int(line.split()[3].rsplit(":", 1)[1])
                if f"pid={pid}," in line and port != self.metrics_port:
                    return port
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} did not start listening")

    def cpu_s(self) -> float:
        """User + system CPU seconds of the relay process so far, with its children: live ones
        (socat forks one per connection) and reaped ones."""
        if self.proc is None:
            return 0.0
        ticks = 0
        todo, root = [self.proc.pid], True
        while todo:
            pid = todo.pop()
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:  # exited meanwhile: its time is in its parent's cutime
                continue
            utime, stime, cutime, cstime = (int(f) for f in stat[11:15])
            ticks += utime + stime + (cutime + cstime if root else 0)
            root = False
            for task in tasks:
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
        return ticks / os.sysconf("SC_CLK_TCK")

    def scrape_metrics(self) -> None:
        """With metrics_listen: show that the relay counted what it relayed."""
        if self.metrics_port is None:
            return
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        deadline = time.monotonic() + 10
        while True:  # the session ends a moment after the last byte: then the counters are final
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            if "migtap_migrations_active 0.0" in text or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        lines = [ln for ln in text.splitlines() if ln.startswith("migtap_bytes_total{")]
        print(f"bench: {self.kind} metrics: {'; '.join(lines)}", file=sys.stderr)

    def stop(self) -> None:
        self.scrape_metrics()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(
                signal.SIGINT if self.kind.startswith("migtap") else signal.SIGTERM
            )
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.capture_dir is not None:
            written = sum(f.stat().st_size for f in self.capture_dir.rglob("*") if f.is_file())
            print(f"bench: {self.kind} captured {written / GiB:.2f} GiB", file=sys.stderr)
            shutil.rmtree(self.capture_dir)
            self.capture_dir = None


async def one_migration(
    path: str, args: argparse.Namespace, workdir: Path, verify: bool
) -> dict[str, Any]:
    mem = args.random_mib + 256
    async with vm_pair(workdir, mem_mib=mem, random_mib=args.random_mib) as pair:
        await pair.configure({}, {"max_bandwidth": 64 * GiB})
        if args.guest == "paused":
            # A stopped guest dirties nothing: one pass over RAM, so run-to-run noise comes
            # from the transport, not from how many rounds the guest caused.
            await pair.src.cmd("stop")
        relay: RelayProc | None = None
        try:
            if path == "direct":
                port = pair.dst_port
            else:
                relay = RelayProc(path, pair.dst_port, workdir)
                relay.start()
                port = relay.port
            result = await pair.migrate(f"tcp:127.0.0.1:{port}", timeout_s=300)
            src = result.source
            if src["status"] != "completed":
                raise RuntimeError(f"{path}: migration {src['status']}: {src.get('error-desc')}")
            if verify:
                await pair.assert_ram_identical()
        finally:
            if relay is not None:
                relay.stop()
    ram = src["ram"]
    return {
        "path": path,
        "total_time_ms": src["total-time"],
        "downtime_ms": src.get("downtime"),
        "transferred": ram["transferred"],
        "mbps": ram.get("mbps"),
        "wall_s": round(result.elapsed_s, 3),
        "ram_verified": verify,
    }


def disk_write_rate(directory: Path, total: int = 3 * GiB) -> float:
    """MB/s of plain 1 MiB ``os.write`` calls to a file on the capture's disk, for comparison
    with the capture path (no fsync, as the capture does none: page cache and writeback)."""
    path = directory / "disk-check.bin"
    block = os.urandom(1024 * 1024)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    t0 = time.perf_counter()
    try:
        for _ in range(total // len(block)):
            os.write(fd, block)
    finally:
        os.close(fd)
        path.unlink()
    return total / 1e6 / (time.perf_counter() - t0)


def raw_throughput(
    kind: str, total: int, workdir: Path, stream: bytes | None = None
) -> tuple[float, float | None]:
    """GiB/s of ``total`` bytes from a sender through the relay (or direct) to a receiver, and
    the relay process's CPU seconds per GiB (None for direct). With ``stream``, those bytes are
    sent once instead (a real migration stream, so that the tap parses what it relays), from
    user memory as QEMU sends (``sendfile`` from the page cache slows every relay here)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    dst_port = server.getsockname()[1]
    received = [0]

    def receive() -> None:
        conn, _ = server.accept()
        buf = bytearray(4 * MiB)
        view = memoryview(buf)
        with conn:
            while n := conn.recv_into(view):
                received[0] += n

    relay = None
    if kind != "direct":
        relay = RelayProc(kind, dst_port, workdir)
        relay.start()
    port = relay.port if relay else dst_port
    rx = threading.Thread(target=receive)
    rx.start()
    cpu0 = relay.cpu_s() if relay else 0.0
    random_block = memoryview(os.urandom(4 * MiB))
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        sent = 0
        if stream is not None:
            view = memoryview(stream)
            for start in range(0, len(view), 4 * MiB):
                s.sendall(view[start : start + 4 * MiB])
            sent = len(view)
        else:
            while sent < total:
                s.sendall(random_block)
                sent += len(random_block)
        s.shutdown(socket.SHUT_WR)
        rx.join()
    elapsed = time.perf_counter() - t0
    cpu = relay.cpu_s() - cpu0 if relay else None
    server.close()
    if relay:
        relay.stop()
    if received[0] != sent:
        raise RuntimeError(f"{kind}: sent {sent}, received {received[0]}")
    return sent / GiB / elapsed, None if cpu is None else cpu / (sent / GiB)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--random-mib", type=int, default=1024)
    parser.add_argument("--raw-gib", type=float, default=4.0)
    parser.add_argument("--raw-runs", type=int, default=3)
    parser.add_argument(
        "--guest",
        choices=("paused", "running"),
        default="paused",
        help="paused: one pass over RAM, least noise (default); running: SeaBIOS idles meanwhile",
    )
    parser.add_argument("--paths", default="direct,socat,migtap-asyncio,migtap-uvloop")
    parser.add_argument("--out", type=Path, help="write all figures as JSON here")
    parser.add_argument(
        "--raw-stream",
        type=Path,
        help="raw runs send this real migration stream (e.g. .cache/bench-parser-1g.bin from "
        "scripts/bench_parser.py) instead of random bytes",
    )
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="a checkout of an earlier commit (git worktree add DIR COMMIT): paths ending in "
        "'@base' run migtap from it, for before/after figures in one run",
    )
    args = parser.parse_args()
    RelayProc.baseline_tree = args.baseline_tree.resolve() if args.baseline_tree else None
    stream = args.raw_stream.read_bytes() if args.raw_stream else None
    paths = args.paths.split(",")
    if "haproxy" not in paths and shutil.which("haproxy"):
        paths.append("haproxy")
    for tool in ("socat", "haproxy"):
        if tool in {p.split("-")[0] for p in paths} and not shutil.which(tool):
            print(
                f"bench: {tool} not installed (apt-get install -y {tool}); skipping it",
                file=sys.stderr,
            )
            paths = [p for p in paths if p.split("-")[0] != tool]

    workdir = Path(tempfile.mkdtemp(prefix="migtap-bench-"))
    cache = ROOT / ".cache"
    cache.mkdir(exist_ok=True)
    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        order = paths[i % len(paths) :] + paths[: i % len(paths)]  # rotate: no path always first
        for path in order:
            r = asyncio.run(one_migration(path, args, cache, verify=(i == 0)))
            r["run"] = i
            runs.append(r)
            print(
                f"bench: run {i} {path:15s} total-time {r['total_time_ms']:6d} ms "
                f"({r['transferred'] / GiB / (r['total_time_ms'] / 1000):.2f} GiB/s)",
                file=sys.stderr,
            )

    raw: dict[str, list[float]] = {p: [] for p in paths}
    raw_cpu: dict[str, list[float]] = {p: [] for p in paths}
    for i in range(args.raw_runs):
        for path in paths[i % len(paths) :] + paths[: i % len(paths)]:
            gibs, cpu = raw_throughput(path, int(args.raw_gib * GiB), workdir, stream)
            raw[path].append(gibs)
            if cpu is not None:
                raw_cpu[path].append(cpu)
            cpu_text = "" if cpu is None else f", {cpu:.2f} cpu-s/GiB"
            print(f"bench: raw {i} {path:15s} {gibs:.2f} GiB/s{cpu_text}", file=sys.stderr)

    disk = disk_write_rate(cache) if any("capture=" in p for p in paths) else None
    if disk is not None:
        print(f"bench: plain 1 MiB os.write to {cache}: {disk:.0f} MB/s", file=sys.stderr)
    direct_times = [r["total_time_ms"] for r in runs if r["path"] == "direct"]
    direct = statistics.median(direct_times) if direct_times else float("nan")
    if direct == 0 or direct != direct:  # --runs 0: raw runs only
        direct = float("nan")
    summary = []
    print(
        f"\n{'path':40s} {'median total-time':>18s} {'vs direct':>10s} "
        f"{'median GiB/s':>13s} {'raw GiB/s':>10s} {'raw cpu-s/GiB':>14s}"
    )
    for path in paths:
        times = [r["total_time_ms"] for r in runs if r["path"] == path]
        rates = [
            r["transferred"] / GiB / (r["total_time_ms"] / 1000) for r in runs if r["path"] == path
        ]
        med = statistics.median(times) if times else float("nan")
        rate = statistics.median(rates) if rates else float("nan")
        raw_med = statistics.median(raw[path]) if raw[path] else float("nan")
        cpu_med = statistics.median(raw_cpu[path]) if raw_cpu[path] else float("nan")
        summary.append(
            {
                "path": path,
                "median_total_time_ms": med,
                "ratio_to_direct": med / direct,
                "median_gib_s": rate,
                "raw_gib_s": raw_med,
                "total_times_ms": times,
                "raw_runs_gib_s": raw[path],
                "raw_cpu_s_per_gib": cpu_med,
                "raw_runs_cpu_s_per_gib": raw_cpu[path],
            }
        )
        print(
            f"{path:40s} {med:15.0f} ms {med / direct:10.2f} {rate:13.2f} {raw_med:10.2f} "
            f"{cpu_med:14.2f}"
        )
    if args.out:
        machine = {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "qemu": subprocess.run(
                ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
            ).stdout.splitlines()[0],
        }
        args.out.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "summary": summary,
                    "runs": runs,
                    "disk_write_mb_s": disk,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
