"""Benchmark: parse a real >= 1 GiB QEMU capture with StreamParser; compare with analyze tools.

Makes (once) or takes a capture: a source guest with ``--random-mib`` MiB of random RAM (placed
with ``-device loader``) migrated to ``exec:cat > FILE``, kept under ``.cache/`` (git-ignored).
Then, each measurement in a fresh child process so that its peak RSS is its own:

* ``StreamParser.feed`` over the file in ``--chunk`` byte reads (``readinto`` a reused buffer),
  then ``feed_eof``: MB/s (10**6 bytes) and peak RSS;
* ``python -m migtap analyze FILE --dump state --json`` (wall time, peak RSS);
* optionally QEMU's ``analyze-migration.py -f FILE`` (``-d state``), given with
  ``--analyze-migration PATH`` (not shipped with migtap).

Medians of ``--runs`` runs; the file is read once first so every run sees a warm page cache.

    .venv/bin/python scripts/bench_parser.py --runs 5 --analyze-migration /tmp/analyze-migration.py
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from migtap.wire.stream import StreamParser  # noqa: E402
from tests.qemu.harness import MiB, Vm, random_ram_file, wait_migration  # noqa: E402

GiB = 1024 * MiB
# Runs a tool in this interpreter and reports its peak RSS. VmHWM belongs to the process's own
# address space; ru_maxrss does not help here: Linux carries the parent's high-water mark over
# fork and exec, so every child would report at least the benchmark's own RSS.
_WRAPPER = """
import os, runpy, sys
target = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
finally:
    os.write(2, f"\\nVMHWM_KIB={vmhwm_kib()}\\n".encode())
"""
LOADER_ADDR = 0x1000000  # where the random blob goes in guest RAM (above the BIOS areas)


# -- capture -----------------------------------------------------------------------------------
async def make_capture(path: Path, random_mib: int) -> dict[str, Any]:
    """Migrate a lone source with ``random_mib`` MiB of random RAM into ``path``."""
    workdir = path.parent
    blob = random_ram_file(workdir, random_mib * MiB)
    mem_mib = random_mib + LOADER_ADDR // MiB + 64
    vm = Vm(
        "bench-src",
        workdir,
        mem_mib=mem_mib,
        extra=["-device", f"loader,file={blob},addr={LOADER_ADDR:#x},force-raw=on"],
    )
    part = path.with_suffix(".part")
    try:
        await vm.start()
        await vm.set_parameters(max_bandwidth=64 * GiB)
        await vm.cmd("migrate", uri=f"exec:cat > {part} && mv {part} {path}")
        info = await wait_migration(vm, timeout_s=600)
        if info["status"] != "completed":
            raise RuntimeError(f"capture migration ended {info['status']}: {info}")
    finally:
        await vm.stop()
    deadline = time.monotonic() + 60
    while not path.exists():  # noqa: ASYNC240 - a stat per 50 ms poll
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        await asyncio.sleep(0.05)
    path.with_suffix(".query-migrate.json").write_text(json.dumps(info, indent=2))
    return info


# -- measurements (each in its own child process) ----------------------------------------------
def vmhwm_kib() -> int:
    """Peak RSS of this process (``VmHWM`` of /proc/self/status), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def parse_worker(path: Path, chunk: int) -> dict[str, Any]:
    """Feed the whole file to a StreamParser; runs inside the child process."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    parser = StreamParser(page_size=4096)
    events = 0
    t0 = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            events += len(parser.feed(view[:n]))
        events += len(parser.feed_eof())
    seconds = time.perf_counter() - t0
    total = parser.ram_stats.total
    return {
        "seconds": seconds,
        "events": events,
        "normal_pages": total.normal_pages,
        "zero_pages": total.zero_pages,
        "rounds": len(parser.ram_stats.rounds),
        "peak_rss_kib": vmhwm_kib(),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # see _WRAPPER
    }


def run_tool(target: str, args: list[str]) -> tuple[float, int]:
    """Run ``python -m target`` (or a ``.py`` path) with ``args``, output discarded by reading
    it; returns wall seconds and the tool's peak RSS in KiB."""
    prelude = "from pathlib import Path\n" + inspect.getsource(vmhwm_kib)
    argv = [sys.executable, "-c", prelude + _WRAPPER, target, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, check=False)
    seconds = time.perf_counter() - t0
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{target} {args} exited {proc.returncode}: {err[-2000:]}")
    hwm = int(err.rsplit("VMHWM_KIB=", 1)[1].split()[0])
    return seconds, hwm


def warm(path: Path) -> None:
    with path.open("rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu[0] if qemu else "?",
    }


def median_of(runs: list[tuple[float, int]]) -> dict[str, float]:
    return {
        "seconds_median": statistics.median(s for s, _ in runs),
        "seconds_min": min(s for s, _ in runs),
        "maxrss_mib": max(r for _, r in runs) / 1024,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capture", type=Path, default=ROOT / ".cache" / "bench-parser-1g.bin")
    ap.add_argument("--random-mib", type=int, default=1024)
    ap.add_argument("--remake", action="store_true", help="make the capture again")
    ap.add_argument("--chunk", type=int, default=256 * 1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--analyze-migration", type=Path, help="QEMU's scripts/analyze-migration.py")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument("--parse-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.parse_worker:
        print(json.dumps(parse_worker(args.capture, args.chunk)))
        return 0

    path: Path = args.capture
    if args.remake or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"making {path} ({args.random_mib} MiB of random guest RAM)...", flush=True)
        asyncio.run(make_capture(path, args.random_mib))
    size = path.stat().st_size
    print(f"capture: {path} ({size / GiB:.3f} GiB)", flush=True)
    warm(path)

    me = [sys.executable, str(Path(__file__).resolve())]
    parse_runs: list[tuple[float, int]] = []
    detail: dict[str, Any] = {}
    for _ in range(args.runs):
        argv = [*me, "--parse-worker", "--capture", str(path), "--chunk", str(args.chunk)]
        detail = json.loads(subprocess.run(argv, capture_output=True, check=True).stdout)
        parse_runs.append((detail["seconds"], detail["peak_rss_kib"]))
    results: dict[str, Any] = {
        "machine": machine(),
        "capture_bytes": size,
        "chunk": args.chunk,
        "runs": args.runs,
        "parse": {**median_of(parse_runs), **{k: detail[k] for k in detail if k != "seconds"}},
    }
    results["parse"]["mb_per_s_median"] = size / 1e6 / results["parse"]["seconds_median"]

    tools: dict[str, tuple[str, list[str]]] = {
        "migtap analyze --dump state --json": (
            "migtap",
            ["analyze", str(path), "--dump", "state", "--json"],
        ),
    }
    if args.analyze_migration is not None:
        tools["analyze-migration.py -f FILE"] = (str(args.analyze_migration), ["-f", str(path)])
    for name, (target, targs) in tools.items():
        results[name] = median_of([run_tool(target, targs) for _ in range(args.runs)])

    print(json.dumps(results, indent=2))
    p = results["parse"]
    print("\n| what | median s | min s | MB/s (median) | peak RSS MiB |\n|---|---|---|---|---|")
    print(
        f"| StreamParser, {args.chunk // 1024} KiB chunks | {p['seconds_median']:.3f} | "
        f"{p['seconds_min']:.3f} | {p['mb_per_s_median']:.0f} | {p['maxrss_mib']:.0f} |"
    )
    for name in tools:
        r = results[name]
        mbs = size / 1e6 / r["seconds_median"]
        print(f"| {name} | {r['seconds_median']:.3f} | {r['seconds_min']:.3f} | {mbs:.0f} | "
              f"{r['maxrss_mib']:.0f} |")  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
