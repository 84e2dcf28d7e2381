"""Benchmark: does the live view (``--progress bar``) slow the relay?

``bench_relay.py`` writes the relay's log to a file, where the live view never runs, so this one
runs ``migtap listen`` in a real terminal (a private tmux server), pushes a stream through it
with ``socat -b 1 MiB`` into a sink, and reads ``session_ended``'s ``duration_s`` off the screen:
``--progress bar`` and ``--progress log`` alternating, in the same terminal. It also times the
view's two costs in-process: the loop's per-tick snapshot and the refresh thread's frame.

    .venv/bin/python scripts/bench_live_view.py --runs 5 --stream .cache/bench-parser-1g.bin
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sink() -> tuple[socket.socket, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn:
                while conn.recv(1 << 20):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def tmux(sock: Path, *args: str) -> str:
    return subprocess.run(
        ["tmux", "-S", str(sock), *args], check=True, capture_output=True, text=True
    ).stdout


def wait_for(sock: Path, pattern: str, timeout_s: float = 120) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, tmux(sock, "capture-pane", "-p", "-J", "-S", "-"))
        if found:
            return found
        time.sleep(0.05)
    raise TimeoutError(pattern)


def one_run(mode: str, stream: Path, loop: str) -> float:
    server, thread = sink()
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "tmux.sock"
        argv = [
            sys.executable,
            "-m",
            "migtap",
            "listen",
            "127.0.0.1:0",
            "--forward",
            f"127.0.0.1:{server.getsockname()[1]}",
            "--progress",
            mode,
            "--loop",
            loop,
        ]
        command = f"{shlex.join(argv)}; echo MIGTAP_EXIT=$?; sleep 60"
        tmux(
            sock,
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-c",
            str(ROOT),
            "-x",
            "140",
            "-y",
            "30",
            command,
        )
        try:
            port = wait_for(sock, r"listen=\['127\.0\.0\.1:(\d+)'\]")[1]
            subprocess.run(
                ["socat", "-u", "-b", "1048576", f"OPEN:{stream}", f"TCP:127.0.0.1:{port}"],
                check=True,
            )
            duration = float(wait_for(sock, r"session_ended .*?duration_s=([\d.]+)")[1])
            tmux(sock, "send-keys", "C-c")
            wait_for(sock, "MIGTAP_EXIT=0", 30)
        finally:
            with contextlib.suppress(subprocess.SubprocessError):
                tmux(sock, "kill-server")
            server.close()
            thread.join(timeout=5)
    return duration


def render_costs() -> tuple[float, float]:
    """(µs per session tick on the loop, µs per frame of 4 sessions on the refresh thread)."""
    sys.path.insert(0, str(ROOT))
    from rich.console import Console  # noqa: PLC0415

    from migtap.model import Migration  # noqa: PLC0415
    from migtap.observers.live_view import LiveView, LiveViewObserver  # noqa: PLC0415
    from migtap.tap import SessionTap  # noqa: PLC0415
    from migtap.vocabulary import ChannelInfo, ChannelKind, Direction  # noqa: PLC0415
    from migtap.wire.events import RamBlock, RamBlockList, RamPages, StreamHeader  # noqa: PLC0415

    view = LiveView(Console(file=io.StringIO(), width=140, force_terminal=True))
    observers = []
    for sid in range(1, 5):
        m = Migration(sid, started=100.0)
        observer = LiveViewObserver(m, view)
        tap = SessionTap(m, [observer], clock=lambda: 104.0)
        main = tap.add_channel(ChannelInfo(0, 1, ChannelKind.MAIN, "a:1", "b:2", 100.0))
        ram = RamBlockList(10, 2, 1 << 30, (RamBlock("pc.ram", 1 << 30),))
        pages = RamPages(0, 0, 2, "pc.ram", 1, normal=100_000)
        tap.deliver(main, Direction.SRC_TO_DST, [StreamHeader(0, 0x5145564D, 3), ram, pages], 101)
        observers.append(observer)
    n = 20_000
    start = time.perf_counter()
    for i in range(n):
        observers[i % 4].on_tick()
    loop_us = (time.perf_counter() - start) / n * 1e6
    console = Console(file=io.StringIO(), width=140, force_terminal=True)
    frames = 2_000
    start = time.perf_counter()
    for _ in range(frames):
        console.print(view._render())  # noqa: SLF001 - what the refresh thread draws
    return loop_us, (time.perf_counter() - start) / frames * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stream", type=Path, default=ROOT / ".cache/bench-parser-1g.bin")
    parser.add_argument("--loop", default="uvloop", choices=("asyncio", "uvloop"))
    args = parser.parse_args()
    loop_us, frame_us = render_costs()
    print(f"loop: {loop_us:.1f} us per session tick; refresh thread: {frame_us:.0f} us per frame")
    results: dict[str, list[float]] = {"bar": [], "log": []}
    for n in range(args.runs):
        for mode in ("bar", "log") if n % 2 == 0 else ("log", "bar"):
            results[mode].append(one_run(mode, args.stream, args.loop))
            print(mode, results[mode][-1], flush=True)
    size_mib = args.stream.stat().st_size / 2**20
    for mode, durations in results.items():
        median = statistics.median(durations)
        print(f"{mode}: median {median:.2f} s, {size_mib / median:.0f} MiB/s; runs {durations}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
