"""Real migrations with Debian sid's QEMU 11.1 through migtap, and into 11.1 from 7.2 and 10.0.

QEMU 11.1 comes from a minimal sid tree that scripts/qemu11.sh builds once into .cache/qemu-11
(debootstrap, needs root and the Debian mirror; CI keeps it in /var/cache/migtap/qemu-11) and
the harness runs with the tree's own loader (``Qemu.sid``). If the tree cannot be built the
tests FAIL (never skip), like every QEMU test. 10.0 comes from test_qemu10.py's fixture.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import pytest

from migtap.annotate.vmsd import VmDescription
from migtap.tap import TapSettings
from tests.qemu.conftest import qemu_tree
from tests.qemu.harness import (
    HOST_QEMU,
    Qemu,
    make_qcow2,
    vm_pair,
)
from tests.qemu.test_qemu10 import qemu10, qemu_version  # noqa: F401 - qemu10 is a fixture
from tests.qemu.test_relay_migrations import ONE_LOOP, assert_pages_match, summary
from tests.qemu.test_tap import (
    analyze,
    assert_offline_counts,
    capture_dir,
    multifd_capture,
    only,
    rich_q35_migration,
    tap_migration,
    xbzrle_capture,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.qemu11, ONE_LOOP]


@pytest.fixture(scope="module")
def qemu11() -> Qemu:
    """QEMU 11.1 from the sid tree, built by scripts/qemu11.sh on first use (about 40 s)."""
    return Qemu.sid(qemu_tree("qemu11.sh"))


def session(capture: Path) -> dict[str, Any]:
    return json.loads((capture / "session.json").read_text())  # type: ignore[no-any-return]


def signs(capture: Path) -> set[str]:
    return {e["sign"] for e in session(capture)["qemu"]["source"]["evidence"]}


def assert_in_range(capture: Path, version: tuple[int, int]) -> None:
    """The source range inferred from the stream contains ``version`` (the QEMU that sent it)."""
    src = session(capture)["qemu"]["source"]

    def parse(v: str | None) -> tuple[int, int] | None:
        return None if v is None else (int(v.split(".")[0]), int(v.split(".")[1]))

    lo, hi = parse(src["min"]), parse(src["max"])
    assert lo is None or lo <= version, src
    assert hi is None or version <= hi, src


async def test_version(tmp_path: Path, qemu11: Qemu) -> None:
    """The tree's QEMU really is 11.1."""
    assert await qemu_version(tmp_path, qemu11) == (11, 1)


async def test_precopy_11_to_11(tmp_path: Path, make_relay: Any, qemu11: Qemu) -> None:
    root = tmp_path / "captures"
    async with vm_pair(tmp_path, random_mib=16, src_qemu=qemu11, dst_qemu=qemu11) as pair:
        info, logs = await tap_migration(pair, make_relay, TapSettings(capture_dir=root))
        await pair.assert_ram_identical()
    assert summary(logs)["channels"] == ["main"]
    assert info["ram"]["normal"] >= 16 * 256
    m = assert_pages_match(info, logs)
    assert m["vmdesc"] is True
    assert m["devices_failed"] == 0
    assert m["machine_type"] == "pc-i440fx-11.1"
    assert m["source_qemu"] == "11.1 or newer"
    d = capture_dir(root)
    assert_in_range(d, (11, 1))
    assert_offline_counts(d, info)


async def test_multifd_4_channels_11_to_11(tmp_path: Path, make_relay: Any, qemu11: Qemu) -> None:
    info, logs, d = await multifd_capture(tmp_path, make_relay, qemu11)
    assert sorted(summary(logs)["channels"]) == ["main", "multifd", "multifd", "multifd", "multifd"]
    assert info["ram"]["normal"] >= 16 * 256
    m = assert_pages_match(info, logs, multifd=True)
    assert m["ram_zero_pages"] > 0  # inside the packets, as from 9.0
    assert m["rounds"] >= 1
    assert "zero pages inside multifd packets" in signs(d)
    assert_in_range(d, (11, 1))
    doc = assert_offline_counts(d, info)
    assert doc["ram"]["total"]["normal_pages"] == 0  # none on the main channel


async def test_xbzrle_11_to_11(tmp_path: Path, make_relay: Any, qemu11: Qemu) -> None:
    info, logs, d = await xbzrle_capture(tmp_path, make_relay, qemu11)
    m = assert_pages_match(info, logs)
    assert 0 < m["ram_xbzrle_pages"] <= info["xbzrle-cache"]["pages"]
    assert m["source_qemu"] == "11.1 or newer"
    doc = assert_offline_counts(d, info)
    assert doc["summary"]["ram_xbzrle_pages"] == m["ram_xbzrle_pages"]


async def test_postcopy_11_to_11(tmp_path: Path, make_relay: Any, qemu11: Qemu) -> None:
    """Postcopy with the return path: the package ends with PING 0x42 (10.2+), whose PONG
    tells the source that the destination loaded the device state."""
    first = tmp_path / "precopy"
    first.mkdir()
    async with vm_pair(first, src_qemu=qemu11, dst_qemu=qemu11) as pair:
        # Past the firmware's first SMI: the cpu's msr_smi_count subsection is sent only once
        # the count is not 0, and the postcopy VM below switches later than that.
        await asyncio.sleep(2)
        await tap_migration(pair, make_relay, TapSettings(capture_dir=first / "captures"))
    vmdesc_path = capture_dir(first / "captures") / "vmdesc.json"
    vmdesc = VmDescription.from_json(vmdesc_path.read_bytes())
    root = tmp_path / "captures"
    async with vm_pair(
        tmp_path, mem_mib=128, random_mib=64, src_qemu=qemu11, dst_qemu=qemu11
    ) as pair:
        info, logs = await tap_migration(
            pair,
            make_relay,
            TapSettings(capture_dir=root, vmdesc=vmdesc),
            caps={"postcopy-ram": True},
            params={"max_bandwidth": 64 * 1024 * 1024},  # slow precopy: postcopy starts first
            postcopy=True,
        )
        await pair.assert_ram_identical()
    m = assert_pages_match(info, logs)
    assert m["vmdesc"] is False  # postcopy sends none
    assert any(e["event"] == "migration_phase" and e["phase"] == "postcopy" for e in logs)
    assert [e["value"] for e in logs if e["event"] == "destination_shut"] == [0]
    assert m["devices_decoded"] > 10
    assert m["devices_failed"] == 0
    d = capture_dir(root)
    assert "PING 0x42 in the postcopy package" in signs(d)
    assert m["source_qemu"] == "11.1 or newer"
    assert_in_range(d, (11, 1))
    # Offline: QEMU's counts, and the live summary on every key but devices_decoded (the
    # summary of `migtap analyze DIR` decodes with the stream's own vmdesc only; postcopy has
    # none). With the same --vmdesc, --dump state decodes the devices in the PACKAGED blob.
    doc = json.loads(analyze(d, "--json"))
    assert doc["ram"]["all_channels"]["normal_pages"] == info["ram"]["normal"]
    assert doc["ram"]["all_channels"]["zero_pages"] == info["ram"]["duplicate"]
    live = session(d)["summary"]
    assert doc["summary"]["devices_decoded"] == 0
    assert {k: v for k, v in live.items() if k != "devices_decoded"} == {
        k: v for k, v in doc["summary"].items() if k != "devices_decoded"
    }
    state = json.loads(
        analyze(d / "src-to-dst.bin", "--dump", "state", "--vmdesc", str(vmdesc_path))
    )
    assert len(state) > 10


async def test_device_rich_q35_11_to_11(tmp_path: Path, make_relay: Any, qemu11: Qemu) -> None:
    _, logs, d = await rich_q35_migration(
        tmp_path,
        make_relay,
        machine="q35",
        src=qemu11,
        dst=qemu11,
        caps={"return-path": True, "switchover-ack": True},
    )
    m = only(logs, "migration_summary")
    assert m["machine_type"] == "pc-q35-11.1"
    assert m["source_qemu"] == "11.1 or newer"
    # From pc-*-11.1 switchover-ack is per device: with no device that asks for it (VFIO), the
    # destination sends no SWITCHOVER_ACK at all (10.0, and 11.1 on older machine types: one).
    index = [json.loads(line) for line in (d / "events.jsonl").read_text().splitlines()]
    assert not [e for e in index if e["kind"] == "rp_switchover_ack"]
    assert m["destination_qemu"] == "unknown"
    assert [e["value"] for e in logs if e["event"] == "destination_shut"] == [0]
    assert {"machine type pc-q35-11.1", "SWITCHOVER_START command"} <= signs(d)
    assert_in_range(d, (11, 1))
    desc = VmDescription.from_json((d / "vmdesc.json").read_bytes())
    state = json.loads(analyze(d / "src-to-dst.bin", "--dump", "state"))
    assert len(state) == len(desc.devices) + 1


async def test_nvme_11_to_11_ptr_markers(tmp_path: Path, make_relay: Any, qemu11: Qemu) -> None:
    """11.1 migrates NVMe controllers (10.0 refused them): their queue arrays are arrays of
    pointers saved with a ``ptr-marker`` byte before each element ('1' and the queue, or '0'),
    a vmdesc type that 11.1 introduced. Every field decodes; the stream shows 11.1."""
    disks = [make_qcow2(tmp_path / f"{name}.qcow2") for name in ("src", "dst")]
    root = tmp_path / "captures"

    def nvme(disk: Path) -> list[str]:
        return [
            "-drive", f"file={disk},if=none,id=nv0,format=qcow2",
            "-device", "nvme,serial=migtap0,drive=nv0",
        ]  # fmt: skip

    async with vm_pair(
        tmp_path,
        machine="q35",
        src_extra=nvme(disks[0]),
        dst_extra=nvme(disks[1]),
        src_qemu=qemu11,
        dst_qemu=qemu11,
    ) as pair:
        # SeaBIOS sets up the controller's admin queue when it tries the NVMe disk as a boot
        # device; it halts once every boot device failed: migrate after that.
        async with asyncio.timeout(60):
            while "HLT=1" not in await pair.src.hmp("info registers"):
                await asyncio.sleep(0.2)
        info, logs = await tap_migration(pair, make_relay, TapSettings(capture_dir=root))
        await pair.assert_ram_identical()
    m = assert_pages_match(info, logs)
    assert m["devices_failed"] == 0
    d = capture_dir(root)
    assert 'vmdesc field of type "ptr-marker"' in signs(d)
    assert "NVMe controller state" in signs(d)
    assert_in_range(d, (11, 1))
    state = json.loads(analyze(d / "src-to-dst.bin", "--dump", "state"))
    (key,) = [k for k in state if k.endswith("/nvme (0)") or "/nvme (" in k]
    markers = [v for v in state[key]["sq"] if isinstance(v, str)]
    assert "valid-ptr" in markers  # the admin queue
    assert set(markers) <= {"valid-ptr", "null-ptr"}


async def test_7_2_to_11_1_device_rich_pc_q35_7_2(
    tmp_path: Path, make_relay: Any, qemu11: Qemu
) -> None:
    _, logs, d = await rich_q35_migration(
        tmp_path,
        make_relay,
        machine="pc-q35-7.2",
        src=HOST_QEMU,
        dst=qemu11,
        caps={"return-path": True},
        slirps=1,
    )
    m = only(logs, "migration_summary")
    assert m["machine_type"] == "pc-q35-7.2"
    assert [e["value"] for e in logs if e["event"] == "destination_shut"] == [0]
    assert m["source_qemu"] == "7.2 to 8.1"
    assert_in_range(d, (7, 2))
    assert json.loads(analyze(d / "src-to-dst.bin", "--dump", "state"))


def rich_without_virtio(disk: Path) -> list[str]:
    """rich_devices() without virtio (11.1 refuses 10.0's virtio state, below): the e1000 card,
    the disk on the q35 AHCI controller, xhci with a USB tablet."""
    return [
        "-netdev", "user,id=n0", "-device", "e1000,netdev=n0",
        "-drive", f"file={disk},if=none,id=d0,format=qcow2",
        "-device", "ide-hd,drive=d0,bus=ide.0",
        "-device", "qemu-xhci,id=xhci",
        "-device", "usb-tablet,bus=xhci.0",
    ]  # fmt: skip


@pytest.mark.qemu10
async def test_10_0_to_11_1_device_rich_pc_q35_7_2(
    tmp_path: Path,
    make_relay: Any,
    qemu11: Qemu,
    qemu10: Qemu,  # noqa: F811 - the fixture
) -> None:
    disks = [make_qcow2(tmp_path / f"{name}.qcow2") for name in ("src", "dst")]
    root = tmp_path / "captures"
    async with vm_pair(
        tmp_path,
        machine="pc-q35-7.2",
        random_mib=16,
        src_extra=rich_without_virtio(disks[0]),
        dst_extra=rich_without_virtio(disks[1]),
        src_qemu=qemu10,
        dst_qemu=qemu11,
    ) as pair:
        info, logs = await tap_migration(
            pair, make_relay, TapSettings(capture_dir=root), caps={"return-path": True}
        )
        await pair.assert_ram_identical()
    m = assert_pages_match(info, logs)
    assert m["devices_failed"] == 0
    assert m["machine_type"] == "pc-q35-7.2"
    assert [e["value"] for e in logs if e["event"] == "destination_shut"] == [0]
    d = capture_dir(root)
    desc = VmDescription.from_json((d / "vmdesc.json").read_bytes())
    short = {dev.name.rsplit("/", 1)[-1] for dev in desc.devices}
    assert {"e1000", "ich9_ahci", "xhci", "usb-ptr", "ICH9LPC"} <= short
    assert m["source_qemu"] == "8.2 or newer"
    assert_in_range(d, (10, 0))
    assert json.loads(analyze(d / "src-to-dst.bin", "--dump", "state"))


@pytest.mark.qemu10
async def test_10_0_virtio_net_does_not_load_into_11_1(
    tmp_path: Path,
    make_relay: Any,
    qemu11: Qemu,
    qemu10: Qemu,  # noqa: F811 - the fixture
) -> None:
    """Found on the way: 11.1 checks each virtqueue's size on load ("VQ 0 vring.num 1024
    exceeds allocated max 256"; 10.0 has no such check) and 10.0's virtio-net state fails it,
    on pc-q35-7.2 as on pc-q35-10.0, with or without migtap (virtio-blk failed the same way in
    the device-rich set). migtap reports the failure with the virtio-net section inside the
    range the destination can have been reading."""
    args = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
    root = tmp_path / "captures"
    async with vm_pair(
        tmp_path,
        machine="pc-q35-7.2",
        src_extra=args,
        dst_extra=args,
        src_qemu=qemu10,
        dst_qemu=qemu11,
    ) as pair:
        _, logs = await tap_migration(
            pair,
            make_relay,
            TapSettings(capture_dir=root),
            caps={"return-path": True},
            expect="failed",
        )
        stderr = pair.dst.log_path.read_text(errors="replace")
    assert "exceeds allocated max" in stderr
    m = only(logs, "migration_summary")
    assert m["outcome"] == "failed"
    failure = m["failure"]
    assert failure is not None
    assert any(s["idstr"].endswith("/virtio-net") for s in failure["sections"]), failure


async def test_11_1_to_7_2_device_rich_pc_q35_7_2(
    tmp_path: Path, make_relay: Any, qemu11: Qemu
) -> None:
    """11.1 still offers pc-q35-7.2 (deprecated), and 7.2 loads what 11.1 sends on it."""
    _, logs, d = await rich_q35_migration(
        tmp_path,
        make_relay,
        machine="pc-q35-7.2",
        src=qemu11,
        dst=HOST_QEMU,
        caps={"return-path": True},
        slirps=1,
    )
    m = only(logs, "migration_summary")
    assert m["machine_type"] == "pc-q35-7.2"
    assert [e["value"] for e in logs if e["event"] == "destination_shut"] == [0]
    assert m["source_qemu"] == "8.2 or newer"
    assert_in_range(d, (11, 1))
