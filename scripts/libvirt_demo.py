"""Demo: ``virsh migrate --live --p2p`` between two libvirt daemons on this machine, through
``migtap listen``, and migtap's page counts beside libvirt's own (``virsh domjobinfo``).

Needs root and Debian's libvirt (``apt-get install libvirt-daemon-system libvirt-clients``;
scripts/setup.sh installs it). It starts two libvirtd daemons side by side, each in its own
mount namespace on its own loopback address (tests/libvirt/daemons.py says how), a small TCG
guest that keeps rewriting its RAM on the source, and ``migtap listen 127.0.0.1:0 --forward
DEST`` as a separate process; then it migrates and prints what happened. Everything it starts
is stopped at the end (``--keep``: left running until Ctrl-C, with the ``virsh -c`` commands
to look around).

    sudo .venv/bin/python scripts/libvirt_demo.py                # plain precopy
    sudo .venv/bin/python scripts/libvirt_demo.py --mode multifd
    sudo .venv/bin/python scripts/libvirt_demo.py --mode postcopy --keep
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.libvirt.daemons import (  # noqa: E402
    Libvirtd,
    LibvirtError,
    domain_xml,
    libvirt_pair,
    parse_rawstats,
)
from tests.qemu.harness import floppy  # noqa: E402

MODES: dict[str, list[str]] = {
    "precopy": [],
    "multifd": ["--parallel", "--parallel-connections", "2"],
    "postcopy": ["--postcopy", "--postcopy-after-precopy", "--bandwidth", "1"],
}
DOMAIN = "migtap-demo"


class Tap:
    """``migtap listen`` as a user runs it, its JSON log echoed and kept."""

    def __init__(self, forward_host: str, workdir: Path) -> None:
        cmd = [
            sys.executable, "-m", "migtap", "listen", "127.0.0.1:0", "--forward", forward_host,
            "--log-format", "json", "--progress-interval-s", "0.5",
        ]  # fmt: skip
        print(f"demo: {shlex.join(cmd)}", file=sys.stderr)
        self.log_path = workdir / "migtap.log"
        self.events: list[dict[str, Any]] = []
        self.port: int | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, cwd=ROOT)
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(15):
            self.stop()
            raise LibvirtError("migtap did not start listening in 15 s")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.log_path.open("w") as log:
            for raw in iter(self.proc.stderr.readline, b""):
                line = raw.decode(errors="replace")
                log.write(line)
                sys.stderr.write("migtap: " + line)
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                self.events.append(event)
                if event.get("event") == "listening":
                    self.port = int(str(event["listen"][0]).rsplit(":", 1)[1])
                    self._ready.set()

    def summary(self, timeout_s: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [e for e in self.events if e.get("event") == "migration_summary"]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise LibvirtError("migtap logged no migration_summary")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for_guest(src: Libvirtd) -> None:
    """Until the guest's loop has finished a pass (EAX counts them)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        regs = src.virsh_sync("qemu-monitor-command", "--hmp", DOMAIN, "info registers")
        if "EAX=0000" in regs and "EAX=00000000" not in regs:
            return
        time.sleep(0.1)
    raise LibvirtError("the guest did not start its loop")


def compare(summary: dict[str, Any], stats: dict[str, int]) -> bool:
    rows = [
        ("normal pages", summary["ram_normal_pages"], stats["memory_normal"]),
        ("zero (constant) pages", summary["ram_zero_pages"], stats["memory_constant"]),
        ("postcopy requests", summary["postcopy_requests"], stats["memory_postcopy_requests"]),
    ]
    print(f"\n{'':24}{'migtap':>10}{'libvirt':>10}")
    for name, ours, theirs in rows:
        print(f"{name:24}{ours:>10}{theirs:>10}  {'same' if ours == theirs else 'DIFFERENT'}")
    print(f"outcome: {summary['outcome']}, last phase: {summary['last_phase']}, ", end="")
    print(f"channels: {', '.join(summary['channel_kinds'])}")
    return summary["outcome"] == "completed" and all(a == b for _, a, b in rows)


def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="migtap-libvirt-"))
    print(f"demo: work directory {workdir}", file=sys.stderr)
    t0 = time.monotonic()
    with libvirt_pair(workdir / "libvirt") as (src, dst):
        print(
            f"demo: two libvirtd up in {time.monotonic() - t0:.1f} s "
            f"(PIDs {src.pid}, {dst.pid}); destination on {dst.address}",
            file=sys.stderr,
        )
        xml = workdir / f"{DOMAIN}.xml"
        xml.write_text(domain_xml(DOMAIN, floppy(workdir), mem_mib=args.mem_mib))
        src.virsh_sync("define", str(xml))
        src.virsh_sync("start", DOMAIN)
        wait_for_guest(src)
        tap = Tap(dst.address, workdir)
        try:
            migrate = [
                "migrate", "--live", "--p2p", "--verbose", *MODES[args.mode], DOMAIN, dst.tcp_uri,
                "--migrateuri", f"tcp://127.0.0.1:{tap.port}", "--listen-address", dst.address,
            ]  # fmt: skip
            print(f"demo: virsh -c '{src.uri}' {shlex.join(migrate)}", file=sys.stderr)
            t1 = time.monotonic()
            src.virsh_sync(*migrate, timeout_s=300)
            print(f"demo: migrated in {time.monotonic() - t1:.1f} s", file=sys.stderr)
            summary = tap.summary()
            raw = src.virsh_sync(
                "domjobinfo", "--completed", "--keep-completed", "--rawstats", DOMAIN
            )
            ok = compare(summary, parse_rawstats(raw))
            print(f"source: {src.virsh_sync('domstate', '--reason', DOMAIN).strip()}")
            print(f"destination: {dst.virsh_sync('domstate', DOMAIN).strip()}")
            if args.keep:
                print(
                    f"\nleft running; try:\n  virsh -c '{dst.uri}' list\n"
                    f"  virsh -c '{src.uri}' domjobinfo --completed --keep-completed {DOMAIN}\n"
                    f"migtap's log: {tap.log_path}\nCtrl-C stops everything."
                )
                try:
                    while True:
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
        finally:
            tap.stop()
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", choices=sorted(MODES), default="precopy")
    parser.add_argument("--mem-mib", type=int, default=64, help="guest RAM (default 64)")
    parser.add_argument("--keep", action="store_true", help="leave it running until Ctrl-C")
    args = parser.parse_args()
    try:
        return run(args)
    except LibvirtError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
