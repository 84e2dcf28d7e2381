"""Demo: migrate a real QEMU VM through migtap on 127.0.0.1 and show what migtap logs.

Starts a destination QEMU (-incoming), a source QEMU with random data in guest RAM, and
``migtap listen`` between them; migrates, then checks that guest RAM is identical on both
sides. Run through ``scripts/demo.sh``, which installs what is missing first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.qemu.harness import vm_pair  # noqa: E402


def _echo(stream: object, ready: threading.Event, prefix: str) -> None:
    assert hasattr(stream, "readline")
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        sys.stderr.write(prefix + line)
        if "listening" in line:
            ready.set()


async def demo(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="migtap-demo-"))
    print(f"demo: work directory {workdir}", file=sys.stderr)
    async with vm_pair(workdir, mem_mib=args.mem_mib, random_mib=args.random_mib) as pair:
        caps = {"multifd": True} if args.multifd else {}
        params: dict[str, object] = {"multifd_channels": args.multifd} if args.multifd else {}
        # Throttled so that a person sees the live progress lines (0 = as fast as possible).
        params["max_bandwidth"] = (args.bandwidth_mib or 64 * 1024) * 1024 * 1024
        await pair.configure(caps, params)
        captures = workdir / "captures"
        cmd = [
            sys.executable,
            "-m",
            "migtap",
            "listen",
            f"127.0.0.1:{args.port}",
            "--forward",
            f"127.0.0.1:{pair.dst_port}",
            "--capture",
            str(captures),
            "--log-format",
            "console",
        ]
        print("demo: $ " + " ".join(cmd[2:]).replace("-m migtap", "migtap"), file=sys.stderr)
        tap = subprocess.Popen(cmd, stderr=subprocess.PIPE, cwd=ROOT)  # noqa: ASYNC220
        ready = threading.Event()
        reader = threading.Thread(
            target=_echo, args=(tap.stderr, ready, "  migtap | "), daemon=True
        )
        reader.start()
        try:
            if not await asyncio.to_thread(ready.wait, 15):
                print("demo: migtap did not start listening", file=sys.stderr)
                return 1
            uri = f"tcp:127.0.0.1:{args.port}"
            print(f"demo: source QMP: migrate uri={uri}", file=sys.stderr)
            result = await pair.migrate(uri)
            src = result.source
            ram = src.get("ram", {})
            print(
                f"demo: source says {src['status']}: total-time {src.get('total-time')} ms, "
                f"downtime {src.get('downtime')} ms, {ram.get('transferred', 0)} bytes, "
                f"normal pages {ram.get('normal')}, zero pages {ram.get('duplicate')}",
                file=sys.stderr,
            )
            if src["status"] != "completed":
                return 1
            await pair.assert_ram_identical()
            print("demo: guest RAM is identical on source and destination", file=sys.stderr)
            await asyncio.sleep(0.5)
        finally:
            tap.send_signal(signal.SIGINT)
            await asyncio.to_thread(tap.wait, 30)
            reader.join(5)
    show_capture(captures)
    return 0


def show_capture(captures: Path) -> None:
    """What a user looks at next: the capture directory, its annotated log, an offline parse."""
    dirs = sorted(captures.iterdir()) if captures.is_dir() else []
    if not dirs:
        print("demo: no capture directory was written", file=sys.stderr)
        return
    capture = dirs[-1]
    print(f"\ndemo: capture {capture}", file=sys.stderr)
    for f in sorted(capture.iterdir()):
        print(f"  {f.stat().st_mode & 0o777:o} {f.stat().st_size:>12,} {f.name}", file=sys.stderr)
    annotated = capture / "annotated.jsonl"
    if annotated.exists():
        lines = annotated.read_text().splitlines()
        print(
            f"\ndemo: annotated.jsonl, {len(lines)} device sections; the first three:",
            file=sys.stderr,
        )
        for line in lines[:3]:
            print("  " + (line if len(line) < 300 else line[:297] + "..."), file=sys.stderr)
    print(f"\ndemo: $ migtap analyze {capture / 'src-to-dst.bin'} --dump ram", file=sys.stderr)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "migtap",
            "analyze",
            str(capture / "src-to-dst.bin"),
            "--dump",
            "ram",
        ],
        cwd=ROOT,
        check=False,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("MIGTAP_DEMO_PORT", "4444")))
    parser.add_argument("--mem-mib", type=int, default=128)
    parser.add_argument(
        "--random-mib", type=int, default=64, help="random data placed in guest RAM"
    )
    parser.add_argument(
        "--multifd", type=int, default=0, metavar="N", help="use N multifd channels"
    )
    parser.add_argument(
        "--bandwidth-mib",
        type=int,
        default=24,
        help="QEMU max-bandwidth in MiB/s, so the progress is visible (0: unlimited)",
    )
    return asyncio.run(demo(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
