"""Check ``migtap analyze --dump state`` against QEMU's ``analyze-migration.py -d state``.

Runs a matrix of real migrations (QEMU 7.2 from the host, 10.0 from the trixie tree that
scripts/qemu10.sh builds, 11.1 from the sid tree that scripts/qemu11.sh builds) through an
in-process migtap with a capture, then decodes each captured main channel with both tools and
compares their output byte for byte.

QEMU's script is not part of migtap and is not shipped by Debian's binary packages (the sid
tree has no copy either): pass the ``scripts/analyze-migration.py`` of a QEMU source tree, e.g.
Debian's ``qemu_11.1.*+ds.orig.tar.xz``. Only 11.1's script (or newer) reads 11.1's
``ptr-marker`` fields (NVMe); older scripts read the other captures. It cannot read streams
with a return path (it stops at the OPEN_RETURN_PATH command), so the matrix migrates without
one. ``--only TEXT`` runs the cases whose name contains TEXT (e.g. ``11.1``).

    .venv/bin/python scripts/compare_state_dump.py \
        --analyze-migration ~/src/qemu-11.1/scripts/analyze-migration.py \
        --out docs/state-dump-check.json

Exit status 0 only if every capture decodes identically; the report goes to stdout (and to
``--out`` as JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from migtap.config import Address, Config  # noqa: E402
from migtap.log import configure_logging  # noqa: E402
from migtap.relay.server import Relay  # noqa: E402
from migtap.tap import TapSettings  # noqa: E402
from tests.qemu.harness import (  # noqa: E402
    HOST_QEMU,
    Qemu,
    make_qcow2,
    rich_devices,
    vm_pair,
)


@dataclass(frozen=True)
class Case:
    name: str
    src: str  # "7.2", "10.0" or "11.1"
    dst: str
    machine: str
    rich: int  # -1: no extra devices; else the number of slirp backends (rich_devices)
    caps: tuple[tuple[str, bool], ...] = ()
    params: tuple[tuple[str, int], ...] = ()
    nvme: bool = False  # an NVMe controller too (migrates from 11.1: ptr-marker fields)


CASES = (
    Case("7.2-to-7.2 pc device-rich", "7.2", "7.2", "pc", 2),
    Case("10.0-to-10.0 pc", "10.0", "10.0", "pc", -1),
    Case("10.0-to-10.0 q35 device-rich", "10.0", "10.0", "q35", 2),
    Case(
        "10.0-to-10.0 q35 multifd (main channel)",
        "10.0",
        "10.0",
        "q35",
        2,
        caps=(("multifd", True),),
        params=(("multifd_channels", 2),),
    ),
    Case("7.2-to-10.0 pc-q35-7.2 device-rich", "7.2", "10.0", "pc-q35-7.2", 1),
    Case("10.0-to-7.2 pc-q35-7.2 device-rich", "10.0", "7.2", "pc-q35-7.2", 1),
    Case("10.0-to-7.2 pc-i440fx-7.2", "10.0", "7.2", "pc-i440fx-7.2", -1),
    Case("11.1-to-11.1 pc", "11.1", "11.1", "pc", -1),
    Case("11.1-to-11.1 q35 device-rich", "11.1", "11.1", "q35", 2),
    Case("11.1-to-11.1 q35 NVMe (ptr-marker)", "11.1", "11.1", "q35", -1, nvme=True),
    Case(
        "11.1-to-11.1 q35 multifd (main channel)",
        "11.1",
        "11.1",
        "q35",
        2,
        caps=(("multifd", True),),
        params=(("multifd_channels", 2),),
    ),
    Case("7.2-to-11.1 pc-q35-7.2 device-rich", "7.2", "11.1", "pc-q35-7.2", 1),
    Case("11.1-to-7.2 pc-q35-7.2 device-rich", "11.1", "7.2", "pc-q35-7.2", 1),
    Case("10.0-to-11.1 pc-i440fx-7.2", "10.0", "11.1", "pc-i440fx-7.2", -1),
)


def nvme_devices(disk: Path) -> list[str]:
    return [
        "-drive", f"file={disk},if=none,id=nv0,format=qcow2",
        "-device", "nvme,serial=migtap0,drive=nv0",
    ]  # fmt: skip


async def capture(case: Case, workdir: Path, qemus: dict[str, Qemu]) -> Path:
    """Migrate once through migtap and return the capture's main-channel file."""
    workdir.mkdir(parents=True)  # noqa: ASYNC240 - a one-off script
    extra: list[list[str]] = [[], []]
    if case.rich >= 0:
        extra = [
            rich_devices(make_qcow2(workdir / f"{side}.qcow2"), slirps=case.rich)
            for side in ("src", "dst")
        ]
    if case.nvme:
        extra = [
            [*ex, *nvme_devices(make_qcow2(workdir / f"{side}-nvme.qcow2"))]
            for ex, side in zip(extra, ("src", "dst"), strict=True)
        ]
    root = workdir / "captures"
    async with vm_pair(
        workdir,
        machine=case.machine,
        random_mib=8,
        src_extra=extra[0],
        dst_extra=extra[1],
        src_qemu=qemus[case.src],
        dst_qemu=qemus[case.dst],
    ) as pair:
        await pair.configure(dict(case.caps), dict(case.params))
        config = Config(listen=Address("127.0.0.1", 0), forward=Address("127.0.0.1", pair.dst_port))
        async with Relay(config, tap=TapSettings(capture_dir=root)) as relay:
            result = await pair.migrate(f"tcp:127.0.0.1:{relay.port}")
            if result.source["status"] != "completed":
                raise RuntimeError(f"{case.name}: migration {result.source}")
            async with asyncio.timeout(15):
                while not relay.sessions_ended:  # noqa: ASYNC110 - polled like the tests do
                    await asyncio.sleep(0.05)
        await pair.assert_ram_identical()
    (capture_dir,) = root.iterdir()
    return capture_dir / "src-to-dst.bin"


def run(cmd: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, capture_output=True, check=False, timeout=300)


def compare(stream: Path, analyze_migration: Path) -> dict[str, Any]:
    theirs = run([sys.executable, str(analyze_migration), "-f", str(stream), "-d", "state"])
    ours = run([sys.executable, "-m", "migtap", "analyze", str(stream), "--dump", "state"])
    origin = run([sys.executable, "-m", "migtap", "analyze", str(stream), "--json"])
    qemu = json.loads(origin.stdout)["qemu"]["qemu"] if origin.returncode == 0 else None
    return {
        "bytes": stream.stat().st_size,
        "equal": theirs.returncode == 0 and ours.returncode == 0 and theirs.stdout == ours.stdout,
        "analyze_migration_rc": theirs.returncode,
        "migtap_rc": ours.returncode,
        "state_bytes": len(ours.stdout),
        "devices": len(json.loads(ours.stdout)) - 1 if ours.returncode == 0 else None,
        "source_qemu_inferred": qemu,
        "analyze_migration_error": theirs.stderr.decode(errors="replace").strip()[-300:] or None,
        "migtap_error": ours.stderr.decode(errors="replace").strip()[-300:] or None,
    }


def tree(script: str) -> Path | None:
    """The QEMU tree that scripts/<script> builds (or finds built); None if it failed."""
    done = run(["bash", str(ROOT / "scripts" / script)])
    if done.returncode != 0:
        sys.stderr.write(done.stderr.decode(errors="replace"))
        return None
    return Path(done.stdout.decode().split()[-1])


async def main_async(args: argparse.Namespace) -> int:
    cases = [c for c in CASES if args.only is None or args.only in c.name]
    trees = {"10.0": "qemu10.sh", "11.1": "qemu11.sh"}
    qemus: dict[str, Qemu] = {"7.2": HOST_QEMU}
    for version, script in trees.items():
        if any(version in (c.src, c.dst) for c in cases):
            built = tree(script)
            if built is None:
                return 2
            qemus[version] = Qemu.debian_tree(built, script.removesuffix(".sh"))
    report: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="compare-state-") as tmp:
        for n, case in enumerate(cases):
            stream = await capture(case, Path(tmp) / str(n), qemus)
            result = {"case": case.name, **compare(stream, args.analyze_migration)}
            report.append(result)
            verdict = "EQUAL" if result["equal"] else "DIFFERENT"
            print(
                f"{verdict:9} {case.name}: {result['devices']} devices, "
                f"{result['state_bytes']} bytes of state dump; "
                f"source QEMU inferred {result['source_qemu_inferred']}"
            )
            for key in ("analyze_migration_error", "migtap_error"):
                if result[key]:
                    print(f"          {key}: {result[key]}")
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {
                    "analyze_migration": str(args.analyze_migration),
                    "analyze_migration_sha256": hashlib.sha256(
                        args.analyze_migration.read_bytes()
                    ).hexdigest(),
                    "cases": report,
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if all(r["equal"] for r in report) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--analyze-migration",
        type=Path,
        required=True,
        help="QEMU's scripts/analyze-migration.py (from a QEMU source tree)",
    )
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    configure_logging("json", level="warning", stream=sys.stderr)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
