"""Real migrations with Debian trixie's QEMU 10.0 through migtap, and across 7.2 and 10.0.

QEMU 10.0 comes from a minimal trixie tree that scripts/qemu10.sh builds once into .cache/qemu-10
(debootstrap, needs root and the Debian mirror) and the harness runs with the tree's own loader
(``Qemu.trixie``). If the tree cannot be built the tests FAIL (never skip), like every QEMU test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import TYPE_CHECKING, Any

import pytest
from structlog.testing import capture_logs

from migtap.annotate.vmsd import VmDescription
from migtap.tap import TapSettings
from tests.qemu.conftest import qemu_tree
from tests.qemu.harness import (
    HOST_QEMU,
    MiB,
    Qemu,
    Vm,
    vm_pair,
    wait_migration,
)
from tests.qemu.test_relay_migrations import (
    ONE_LOOP,
    assert_pages_match,
    migrate_through_relay,
    summary,
)
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

pytestmark = pytest.mark.qemu10


@pytest.fixture(scope="module")
def qemu10() -> Qemu:
    """QEMU 10.0 from the trixie tree, built by scripts/qemu10.sh on first use (about 35 s)."""
    return Qemu.trixie(qemu_tree("qemu10.sh"))


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
    info, logs, d = await multifd_capture(tmp_path, make_relay, qemu10)
    s = summary(logs)
    assert sorted(s["channels"]) == ["main", "multifd", "multifd", "multifd", "multifd"]
    assert info["ram"]["normal"] >= 16 * 256
    # On 10.0 the zero pages travel inside the multifd packets; the counts must still agree.
    m = assert_pages_match(info, logs, multifd=True)
    assert m["ram_zero_pages"] > 0
    # No page records on the main channel: rounds come from its MULTIFD_FLUSH records.
    assert m["rounds"] >= 1
    assert [e for e in logs if e["event"] == "ram_round_finished"]
    lines = (d / "events.jsonl").read_text().splitlines()
    index = [json.loads(line) for line in lines]
    assert not [e for e in index if e["kind"] == "ram_pages"]  # no page on the main channel
    packets = [e for e in index if e["kind"] == "multifd_packet"]
    assert sum(p["zero_pages"] for p in packets) == info["ram"]["duplicate"]
    # Headers of one fixed size whatever the page count (320 + 8 * 128 bytes for 4 KiB pages):
    # on each channel a packet starts right after the previous one's header and payload.
    assert len({p["normal_pages"] + p["zero_pages"] for p in packets}) > 1
    for ch in {p["ch"] for p in packets}:
        mine = sorted((p for p in packets if p["ch"] == ch), key=lambda p: p["offset"])
        assert mine[0]["offset"] == 64  # after the channel's init message
        for a, b in itertools.pairwise(mine):
            assert b["offset"] - a["offset"] == 1344 + a["payload_bytes"]
            assert a["payload_bytes"] == a["normal_pages"] * 4096
    # Offline, from the capture directory: every channel's pages, as QEMU counted them.
    doc = assert_offline_counts(d, info)
    assert doc["ram"]["total"]["normal_pages"] == 0  # none on the main channel


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


@ONE_LOOP
async def test_xbzrle_10_to_10(tmp_path: Path, make_relay: Any, qemu10: Qemu) -> None:
    info, logs, d = await xbzrle_capture(tmp_path, make_relay, qemu10)
    m = assert_pages_match(info, logs)
    assert 0 < m["ram_xbzrle_pages"] <= info["xbzrle-cache"]["pages"]
    assert m["source_qemu"] == "10.0 or newer"
    doc = assert_offline_counts(d, info)  # offline: the same summary
    assert doc["summary"]["ram_xbzrle_pages"] == m["ram_xbzrle_pages"]


@ONE_LOOP
async def test_postcopy_10_to_10_annotated_with_an_earlier_vmdesc(
    tmp_path: Path, make_relay: Any, qemu10: Qemu
) -> None:
    """10.0 sends no vmdesc in postcopy; one from a precopy capture of the same machine decodes
    the device state inside the PACKAGED blob, live."""
    first = tmp_path / "precopy"
    first.mkdir()
    async with vm_pair(first, src_qemu=qemu10, dst_qemu=qemu10) as pair:
        # Past the firmware's first SMI: the cpu's msr_smi_count subsection is sent only once
        # the count is not 0, and the postcopy VM below switches later than that.
        await asyncio.sleep(2)
        await tap_migration(pair, make_relay, TapSettings(capture_dir=first / "captures"))
    vmdesc = VmDescription.from_json((capture_dir(first / "captures") / "vmdesc.json").read_bytes())
    root = tmp_path / "captures"
    async with vm_pair(
        tmp_path, mem_mib=128, random_mib=64, src_qemu=qemu10, dst_qemu=qemu10
    ) as pair:
        # Slow precopy, so that the switch to postcopy happens before it converges.
        info, logs = await tap_migration(
            pair,
            make_relay,
            TapSettings(capture_dir=root, vmdesc=vmdesc),
            caps={"postcopy-ram": True},
            params={"max_bandwidth": 64 * 1024 * 1024},
            postcopy=True,
        )
        await pair.assert_ram_identical()
    m = assert_pages_match(info, logs)
    assert m["vmdesc"] is False  # postcopy sends none
    assert any(e["event"] == "migration_phase" and e["phase"] == "postcopy" for e in logs)
    assert [e["value"] for e in logs if e["event"] == "destination_shut"] == [0]
    assert m["devices_decoded"] > 10
    assert m["devices_failed"] == 0
    assert only(logs, "device_state_annotated")["vmdesc"] == "--vmdesc"


@ONE_LOOP
async def test_device_rich_q35_10_to_10_with_switchover_ack(
    tmp_path: Path, make_relay: Any, qemu10: Qemu
) -> None:
    """10.0's own q35 with the return path and switchover-ack: SWITCHOVER_START goes one way,
    SWITCHOVER_ACK the other, and the vmdesc describes the configuration."""
    _, logs, d = await rich_q35_migration(
        tmp_path,
        make_relay,
        machine="q35",
        src=qemu10,
        dst=qemu10,
        caps={"return-path": True, "switchover-ack": True},
    )
    m = only(logs, "migration_summary")
    assert m["machine_type"] == "pc-q35-10.0"
    assert m["source_qemu"] == "10.0 or newer"
    assert m["destination_qemu"] == "8.1 or newer"
    assert [e["value"] for e in logs if e["event"] == "destination_shut"] == [0]
    index = [json.loads(line) for line in (d / "events.jsonl").read_text().splitlines()]
    kinds = [(e.get("dir"), e["kind"], e.get("cmd")) for e in index]
    assert ("src-to-dst", "command", "MIG_CMD_SWITCHOVER_START") in kinds
    assert ("dst-to-src", "rp_switchover_ack", None) in kinds
    # SWITCHOVER_START comes before the VM stops: before the first END/FULL section.
    switch = next(e["offset"] for e in index if e.get("cmd") == "MIG_CMD_SWITCHOVER_START")
    eof = next(e["offset"] for e in index if e["kind"] == "end_of_state")
    assert switch < eof
    desc = VmDescription.from_json((d / "vmdesc.json").read_bytes())
    assert desc.configuration is not None
    session = json.loads((d / "session.json").read_text())
    assert session["qemu"]["machine_type"] == "pc-q35-10.0"
    assert session["qemu"]["source"]["min"] == "10.0"
    signs = {e["sign"] for e in session["qemu"]["source"]["evidence"]}
    assert {"machine type pc-q35-10.0", "SWITCHOVER_START command"} <= signs
    inferred = [e for e in logs if e["event"] == "qemu_generation_inferred"]
    assert inferred[0]["side"] == "source"
    assert inferred[0]["qemu"] == "10.0 or newer"
    # Offline: every device decodes with the stream's own vmdesc, ending on its footer.
    state = json.loads(analyze(d / "src-to-dst.bin", "--dump", "state"))
    assert "configuration" not in state  # as analyze-migration.py -d state: devices and ram
    assert len(state) == len(desc.devices) + 1
    doc = json.loads(analyze(d / "src-to-dst.bin", "--json"))
    assert doc["error"] is None
    assert doc["qemu"]["qemu"] == "10.0 or newer"
    assert doc["qemu"]["machine_type"] == "pc-q35-10.0"
    commands = [r["name"] for r in doc["sections"] if r["type"] == "COMMAND"]
    assert commands[0] == "OPEN_RETURN_PATH"
    assert "SWITCHOVER_START" in commands


@ONE_LOOP
@pytest.mark.parametrize("direction", ["7.2-to-10.0", "10.0-to-7.2"])
async def test_cross_version_device_rich_pc_q35_7_2(
    tmp_path: Path, make_relay: Any, qemu10: Qemu, direction: str
) -> None:
    src, dst = (HOST_QEMU, qemu10) if direction == "7.2-to-10.0" else (qemu10, HOST_QEMU)
    # One slirp backend only: two do not migrate from 10.0 to 7.2 (see rich_devices).
    _, logs, d = await rich_q35_migration(
        tmp_path,
        make_relay,
        machine="pc-q35-7.2",
        src=src,
        dst=dst,
        caps={"return-path": True},
        slirps=1,
    )
    m = only(logs, "migration_summary")
    assert m["machine_type"] == "pc-q35-7.2"
    assert [e["value"] for e in logs if e["event"] == "destination_shut"] == [0]
    # What the stream shows of its writer: a 10.0 source on a 7.2 machine type still describes
    # the configuration in its vmdesc (8.2+); a 7.2 source does not (so at most 8.1).
    expected = "7.2 to 8.1" if direction == "7.2-to-10.0" else "8.2 or newer"
    assert m["source_qemu"] == expected
    assert json.loads(analyze(d / "src-to-dst.bin", "--dump", "state"))


@ONE_LOOP
@pytest.mark.parametrize("method", ["zlib", "zstd"])
async def test_multifd_compression_10_to_10(
    tmp_path: Path, make_relay: Any, qemu10: Qemu, method: str
) -> None:
    """Compressed multifd packets: the page counts come from the packet headers."""
    async with vm_pair(tmp_path, random_mib=16, src_qemu=qemu10, dst_qemu=qemu10) as pair:
        info, logs = await migrate_through_relay(
            pair,
            make_relay,
            caps={"multifd": True},
            params={"multifd_channels": 2, "multifd_compression": method},
        )
    assert sorted(summary(logs)["channels"]) == ["main", "multifd", "multifd"]
    assert info["ram"]["normal"] >= 16 * 256
    assert_pages_match(info, logs, multifd=True)


@ONE_LOOP
@pytest.mark.parametrize("version", ["7.2", "10.0"])
async def test_postcopy_preempt_requested_pages(
    tmp_path: Path, make_relay: Any, qemu10: Qemu, version: str
) -> None:
    """Postcopy with ``postcopy-preempt``: the destination reads guest RAM that has not arrived,
    asks for those pages on the return path, and the source sends them on the preempt channel.
    migtap finds that header-less channel, and counts its pages and the requests as QEMU does."""
    qemu = HOST_QEMU if version == "7.2" else qemu10
    root = tmp_path / "captures"
    async with vm_pair(tmp_path, mem_mib=128, random_mib=64, src_qemu=qemu, dst_qemu=qemu) as pair:
        await pair.configure(
            {"postcopy-ram": True, "postcopy-preempt": True},
            {"max_postcopy_bandwidth": 16 * MiB},  # about 4 s of background transfer
        )
        with capture_logs() as logs:
            settings = TapSettings(capture_dir=root, progress_interval_s=0.2)
            async with make_relay(pair.dst_port, tap=settings) as relay:
                await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
                await pair.src.cmd("migrate-start-postcopy")
                await wait_migration(
                    pair.dst, timeout_s=30, statuses={"postcopy-active", "completed", "failed"}
                )
                # The last 16 MiB of random RAM, which the background transfer reaches last.
                await pair.dst.cmd(
                    "pmemsave", val=0x1000000 + 48 * MiB, size=16 * MiB,
                    filename=str(tmp_path / "touched.ram"),
                )  # fmt: skip
                info = await wait_migration(pair.src, timeout_s=60)
                assert info["status"] == "completed", info
                loaded = await wait_migration(pair.dst, timeout_s=30, statuses={"completed"})
                assert loaded["status"] == "completed"
                async with asyncio.timeout(15):
                    while not relay.sessions_ended:
                        await asyncio.sleep(0.02)
        await pair.assert_ram_identical()
    assert info["ram"]["postcopy-requests"] > 0, info
    m = assert_pages_match(info, logs)
    assert m["postcopy_requests"] == info["ram"]["postcopy-requests"]
    assert m["ram_preempt_pages"] > 0
    assert m["channel_kinds"] == ["main", "postcopy-preempt"]
    assert only(logs, "channel_identified")["kind"] == "postcopy-preempt"
    assert [e["value"] for e in logs if e["event"] == "destination_shut"] == [0]
    session = json.loads((capture_dir(root) / "session.json").read_text())
    assert [c["kind"] for c in session["channels"]] == ["main", "postcopy-preempt"]
    assert session["channels"][1]["parse_error"] is None
    doc = assert_offline_counts(capture_dir(root), info)
    assert [c["kind"] for c in doc["channels"]] == ["postcopy-preempt"]
    assert (
        doc["channels"][0]["normal_pages"] + doc["channels"][0]["zero_pages"]
        == (m["ram_preempt_pages"])
    )
