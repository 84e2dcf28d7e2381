"""Real migrations with Debian trixie's QEMU 10.0 through migtap, and across 7.2 and 10.0.

QEMU 10.0 comes from a minimal trixie tree that scripts/qemu10.sh builds once into .cache/qemu-10
(debootstrap, needs root and the Debian mirror) and the harness runs with the tree's own loader
(``Qemu.trixie``). If the tree cannot be built the tests FAIL (never skip), like every QEMU test.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.qemu.harness import HOST_QEMU, Qemu, Vm, vm_pair
from tests.qemu.test_relay_migrations import assert_pages_match, migrate_through_relay, summary

pytestmark = pytest.mark.qemu10

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def qemu10() -> Qemu:
    """QEMU 10.0 from the trixie tree, built by scripts/qemu10.sh on first use (about 35 s)."""
    t0 = time.monotonic()
    try:
        # Under pytest-timeout's 300 s for the first test, so that a slow mirror gets this message.
        done = subprocess.run(
            ["bash", str(ROOT / "scripts/qemu10.sh")],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"scripts/qemu10.sh still running after {e.timeout} s", pytrace=False)
    if done.returncode != 0:
        pytest.fail(
            f"scripts/qemu10.sh failed ({done.returncode}) after {time.monotonic() - t0:.0f} s:\n"
            f"{done.stderr[-4000:]}",
            pytrace=False,
        )
    return Qemu.trixie(Path(done.stdout.strip().splitlines()[-1]))


async def qemu_version(tmp_path: Path, qemu: Qemu) -> tuple[int, int]:
    vm = Vm(f"version-{qemu.name}", tmp_path, qemu=qemu)
    try:
        await vm.start()
        v = (await vm.cmd("query-version"))["qemu"]
    finally:
        await vm.stop()
    return v["major"], v["minor"]


async def test_versions(tmp_path: Path, qemu10: Qemu) -> None:
    """The two QEMUs really are 7.2 (host, the default) and 10.0 (trixie tree)."""
    assert await qemu_version(tmp_path, HOST_QEMU) == (7, 2)
    assert await qemu_version(tmp_path, qemu10) == (10, 0)


async def test_precopy_10_to_10(tmp_path: Path, make_relay: Any, qemu10: Qemu) -> None:
    async with vm_pair(tmp_path, random_mib=16, src_qemu=qemu10, dst_qemu=qemu10) as pair:
        info, logs = await migrate_through_relay(pair, make_relay)
    s = summary(logs)
    assert s["channels"] == ["main"]
    assert s["bytes_src_to_dst"] >= info["ram"]["transferred"]
    assert info["ram"]["normal"] >= 16 * 256
    m = assert_pages_match(info, logs)
    assert m["vmdesc"] is True
    assert m["devices_failed"] == 0


async def test_multifd_4_channels_10_to_10(tmp_path: Path, make_relay: Any, qemu10: Qemu) -> None:
    async with vm_pair(tmp_path, random_mib=16, src_qemu=qemu10, dst_qemu=qemu10) as pair:
        info, logs = await migrate_through_relay(
            pair, make_relay, caps={"multifd": True}, params={"multifd_channels": 4}
        )
    s = summary(logs)
    assert sorted(s["channels"]) == ["main", "multifd", "multifd", "multifd", "multifd"]
    assert info["ram"]["normal"] >= 16 * 256
    # On 10.0 the zero pages travel inside the multifd packets; the counts must still agree.
    m = assert_pages_match(info, logs, multifd=True)
    # No page records on the main channel: rounds come from its MULTIFD_FLUSH records.
    assert m["rounds"] >= 1
    assert [e for e in logs if e["event"] == "ram_round_finished"]


@pytest.mark.parametrize("direction", ["7.2-to-10.0", "10.0-to-7.2"])
async def test_cross_version_pc_i440fx_7_2(
    tmp_path: Path, make_relay: Any, qemu10: Qemu, direction: str
) -> None:
    src, dst = (HOST_QEMU, qemu10) if direction == "7.2-to-10.0" else (qemu10, HOST_QEMU)
    async with vm_pair(
        tmp_path, machine="pc-i440fx-7.2", random_mib=16, src_qemu=src, dst_qemu=dst
    ) as pair:
        info, logs = await migrate_through_relay(pair, make_relay)
    assert summary(logs)["channels"] == ["main"]
    assert info["ram"]["normal"] >= 16 * 256
    m = assert_pages_match(info, logs)
    assert m["vmdesc"] is True
    assert m["devices_failed"] == 0
