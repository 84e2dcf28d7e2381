"""The README's and docs/tap.md's diagnosis examples, from real QEMU 7.2 migrations.

    .venv/bin/python scripts/diagnosis_demo.py failed-device     # destination_closed_early
    .venv/bin/python scripts/diagnosis_demo.py not-converging    # migration_not_converging

``failed-device``: a source with ``-device virtio-rng-pci``, a destination without it, 8 MiB of
random RAM, captured; prints the ``destination_closed_early`` line and the destination QEMU's
last lines. ``not-converging``: a guest rewriting 512 KiB in a loop, ``max-bandwidth`` 2 MiB/s,
``downtime-limit`` 1 ms; prints ``migration_not_converging`` and the summary's convergence,
then cancels. The same scenarios are tests in tests/qemu/test_diagnosis.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from structlog.testing import capture_logs  # noqa: E402

from migtap.relay.server import Relay  # noqa: E402
from migtap.tap import TapSettings  # noqa: E402
from tests.qemu.conftest import relay_config  # noqa: E402
from tests.qemu.harness import (  # noqa: E402
    MiB,
    floppy,
    guest_args,
    vm_pair,
    wait_booted,
    wait_migration,
)

if TYPE_CHECKING:
    from collections.abc import Mapping


async def failed_device(workdir: Path) -> list[Mapping[str, Any]]:
    async with vm_pair(workdir, random_mib=8, src_extra=["-device", "virtio-rng-pci"]) as pair:
        await pair.configure({}, {})
        settings = TapSettings(capture_dir=workdir / "captures")
        with capture_logs() as logs:
            async with Relay(relay_config(pair.dst_port), tap=settings) as relay:
                await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
                await wait_migration(pair.src, timeout_s=30)
                async with asyncio.timeout(15):
                    while not relay.sessions_ended:  # noqa: ASYNC110 - polled like the tests
                        await asyncio.sleep(0.02)
        for line in pair.dst.log_path.read_text(errors="replace").strip().splitlines()[-2:]:
            print(f"destination: {line}")
    return [e for e in logs if e["event"] == "destination_closed_early"]


async def not_converging(workdir: Path) -> list[Mapping[str, Any]]:
    guest = guest_args(floppy(workdir))
    async with vm_pair(workdir, random_mib=1, src_extra=guest, dst_extra=guest) as pair:
        await wait_booted(pair.src)
        await pair.configure({}, {"max_bandwidth": 2 * MiB, "downtime_limit": 1})
        with capture_logs() as logs:
            async with Relay(relay_config(pair.dst_port), tap=TapSettings()) as relay:
                await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
                async with asyncio.timeout(60):
                    while not [e for e in logs if e["event"] == "migration_not_converging"]:  # noqa: ASYNC110
                        await asyncio.sleep(0.1)
                await pair.src.cmd("migrate_cancel")
                async with asyncio.timeout(15):
                    while not relay.sessions_ended:  # noqa: ASYNC110 - polled like the tests
                        await asyncio.sleep(0.02)
    keep = ("outcome", "rounds", "converging", "convergence")
    return [e for e in logs if e["event"] == "migration_not_converging"] + [
        {k: e[k] for k in keep} for e in logs if e["event"] == "migration_summary"
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=("failed-device", "not-converging"))
    args = parser.parse_args()
    run = failed_device if args.case == "failed-device" else not_converging
    with tempfile.TemporaryDirectory(prefix="migtap-diagnosis-") as tmp:
        for line in asyncio.run(run(Path(tmp))):
            print(json.dumps(line, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
