"""The tap during real QEMU 7.2 migrations: capture, annotated log, summary, failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest
from structlog.testing import capture_logs

from migtap.annotate.vmsd import VmDescription
from migtap.tap import TapSettings
from tests.qemu.harness import (
    HOST_QEMU,
    MiB,
    Pair,
    Qemu,
    Vm,
    floppy,
    guest_args,
    make_qcow2,
    rich_devices,
    vm_pair,
    wait_booted,
    wait_migration,
)
from tests.qemu.test_relay_migrations import assert_pages_match

if TYPE_CHECKING:
    from pathlib import Path

ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])


async def tap_migration(
    pair: Pair,
    make_relay: Any,
    settings: TapSettings,
    *,
    caps: dict[str, bool] | None = None,
    params: dict[str, Any] | None = None,
    postcopy: bool = False,
    expect: str = "completed",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    await pair.configure(caps or {}, params or {})
    with capture_logs() as logs:
        async with make_relay(pair.dst_port, tap=settings) as relay:
            result = await pair.migrate(f"tcp:127.0.0.1:{relay.port}", postcopy=postcopy)
            assert result.source["status"] == expect, result.source
            async with asyncio.timeout(15):
                while not relay.sessions_ended:
                    await asyncio.sleep(0.02)
    return result.source, logs


def only(logs: list[dict[str, Any]], event: str) -> dict[str, Any]:
    found = [e for e in logs if e["event"] == event]
    assert len(found) == 1, (event, found)
    return found[0]


def capture_dir(root: Path) -> Path:
    (d,) = root.iterdir()
    return d


def assert_private(directory: Path) -> None:
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = list(directory.iterdir())
    assert files
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def analyze(path: Path, *args: str) -> str:
    """``migtap analyze`` as a user runs it, on a capture's file or whole directory: its
    stdout, after checking that it succeeded and printed nothing on stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "migtap", "analyze", str(path), *args],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def assert_offline_counts(capture: Path, info: dict[str, Any]) -> dict[str, Any]:
    """``migtap analyze DIR`` counts every channel's pages as QEMU did (``query-migrate``),
    and its summary is the live one (session.json's) on every key."""
    doc = json.loads(analyze(capture, "--json"))
    counts = doc["ram"]["all_channels"]
    assert counts["normal_pages"] == info["ram"]["normal"], doc["channels"]
    assert counts["zero_pages"] == info["ram"]["duplicate"], doc["channels"]
    assert all(c["error"] is None for c in doc["channels"])
    assert_offline_summary_is_live(capture, doc)
    return doc


def assert_offline_summary_is_live(capture: Path, doc: dict[str, Any]) -> None:
    """Offline is the live pipeline: the same summary, key for key, timings and outcome too."""
    live = json.loads((capture / "session.json").read_text())["summary"]
    offline = doc["summary"]
    assert set(offline) == set(live)
    differ = {k: (live[k], offline[k]) for k in live if live[k] != offline[k]}
    assert not differ, differ


@ONE_LOOP
async def test_capture_replays_into_a_fresh_destination(tmp_path: Path, make_relay: Any) -> None:
    root = tmp_path / "captures"
    async with vm_pair(tmp_path, mem_mib=128, random_mib=32) as pair:
        info, logs = await tap_migration(pair, make_relay, TapSettings(capture_dir=root))
        await pair.assert_ram_identical()
        source_ram = await pair.src.ram_sha256()
        d = capture_dir(root)
        # QEMU itself loads the captured main channel.
        replay = Vm(
            "replay",
            tmp_path,
            mem_mib=128,
            extra=["-incoming", f"exec:cat {d / 'src-to-dst.bin'}", "-S"],
        )
        try:
            await replay.start()
            replay.incoming = True
            loaded = await wait_migration(replay, timeout_s=60, statuses={"completed", "failed"})
            assert loaded["status"] == "completed", loaded
            assert await replay.ram_sha256() == source_ram
        finally:
            await replay.stop()
    assert_private(d)
    session = json.loads((d / "session.json").read_text())
    assert session["complete"] is True
    assert session["outcome"] == "completed"
    summary = only(logs, "migration_summary")
    assert summary["capture_dir"] == str(d)
    assert summary["ram_normal_pages"] == info["ram"]["normal"]
    # The annotated log names every device the vmdesc lists, each decoded.
    desc = VmDescription.from_json((d / "vmdesc.json").read_bytes())
    records = [json.loads(line) for line in (d / "annotated.jsonl").read_text().splitlines()]
    assert {(r["idstr"], r["instance_id"]) for r in records} == {
        (dev.name, dev.instance_id) for dev in desc.devices
    }
    assert all(r["decoded"] for r in records)
    assert len([e for e in logs if e["event"] == "device_state"]) == len(records)
    index = [json.loads(line) for line in (d / "events.jsonl").read_text().splitlines()]
    assert all(e["v"] == 1 for e in index)
    assert {"stream_header", "configuration", "end_of_state", "vm_description"} <= {
        e["kind"] for e in index
    }


@ONE_LOOP
async def test_capture_ram_none_is_small_and_indexed(tmp_path: Path, make_relay: Any) -> None:
    root = tmp_path / "captures"
    async with vm_pair(tmp_path, mem_mib=128, random_mib=32) as pair:
        info, logs = await tap_migration(
            pair, make_relay, TapSettings(capture_dir=root, capture_ram="none")
        )
    d = capture_dir(root)
    assert_private(d)
    total = sum(f.stat().st_size for f in d.iterdir())
    sent = only(logs, "migration_summary")["bytes_src_to_dst"]
    assert sent > 32 * 1024 * 1024
    assert total < sent / 50  # page contents left out
    session = json.loads((d / "session.json").read_text())
    assert session["capture_ram"] == "none"
    assert session["complete"] is True
    index = [json.loads(line) for line in (d / "events.jsonl").read_text().splitlines()]
    normal = sum(e.get("normal", 0) for e in index if e["kind"] == "ram_pages")
    assert normal == info["ram"]["normal"]  # the index still counts every page
    assert (d / "annotated.jsonl").exists()


async def multifd_capture(
    tmp_path: Path, make_relay: Any, qemu: Qemu = HOST_QEMU
) -> tuple[dict[str, Any], list[dict[str, Any]], Path]:
    """16 MiB of random RAM over 4 multifd channels, captured; RAM checked. Returns
    query-migrate, the logs and the capture directory."""
    root = tmp_path / "captures"
    async with vm_pair(tmp_path, random_mib=16, src_qemu=qemu, dst_qemu=qemu) as pair:
        info, logs = await tap_migration(
            pair,
            make_relay,
            TapSettings(capture_dir=root),
            caps={"multifd": True},
            params={"multifd_channels": 4},
        )
        await pair.assert_ram_identical()
    return info, logs, capture_dir(root)


def xbzrle_records(relay: Any) -> int:
    """XBZRLE records the live tap counted so far, over the relay's open sessions."""
    return sum(
        s.tap.migration.xbzrle for s in relay.registry.sessions.values() if s.tap is not None
    )


async def xbzrle_capture(
    tmp_path: Path, make_relay: Any, qemu: Qemu = HOST_QEMU
) -> tuple[dict[str, Any], list[dict[str, Any]], Path]:
    """A guest rewriting 64 bytes of each page of 512 KiB in a loop (small xbzrle deltas),
    migrated with xbzrle and captured: held at 2 MiB/s and a 1 ms downtime limit (no
    convergence while the guest writes) until 32 XBZRLE records crossed the wire (xbzrle
    encodes a page from its third sending on), then let converge. RAM checked. Returns
    query-migrate, the logs and the capture directory.

    A vCPU starved by a busy machine can stop dirtying long enough for the migration to converge
    before 32 records; some records are enough then, none is not a migtap failure: a fresh pair
    tries again (3 in all).
    """
    for attempt in range(3):
        work = tmp_path / f"attempt-{attempt}"
        work.mkdir()
        result = await _xbzrle_attempt(work, make_relay, qemu)
        if result is not None:
            return result
    pytest.fail("three xbzrle migrations converged before any XBZRLE record crossed the wire")


async def _xbzrle_attempt(
    work: Path, make_relay: Any, qemu: Qemu
) -> tuple[dict[str, Any], list[dict[str, Any]], Path] | None:
    root = work / "captures"
    guest = guest_args(floppy(work, partial=True))
    async with vm_pair(
        work, random_mib=2, src_extra=guest, dst_extra=guest, src_qemu=qemu, dst_qemu=qemu
    ) as pair:
        await wait_booted(pair.src)
        await pair.configure({"xbzrle": True}, {"downtime_limit": 1, "max_bandwidth": 2 * MiB})
        with capture_logs() as logs:
            async with make_relay(pair.dst_port, tap=TapSettings(capture_dir=root)) as relay:
                await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
                async with asyncio.timeout(60):
                    while xbzrle_records(relay) < 32:  # XBZRLE records seen on the wire
                        state = await pair.src.query_migrate()
                        if state.get("status") == "completed":
                            break  # converged early: enough if some records crossed
                        assert state.get("status") in ("setup", "active"), state
                        await asyncio.sleep(0.05)
                with contextlib.suppress(Exception):  # it may have completed meanwhile
                    await pair.src.set_parameters(downtime_limit=2000)
                info = await wait_migration(pair.src, timeout_s=60)
                assert info["status"] == "completed", info
                await wait_migration(pair.dst, timeout_s=30, statuses={"completed"})
                async with asyncio.timeout(15):
                    while not relay.sessions_ended:
                        await asyncio.sleep(0.02)
        await pair.assert_ram_identical()
    recorded = [e["ram_xbzrle_pages"] for e in logs if e["event"] == "migration_summary"]
    if recorded != [] and recorded[0] == 0:
        return None  # a starved guest dirtied nothing between two syncs: try again
    return info, logs, capture_dir(root)


@ONE_LOOP
async def test_multifd_capture_lists_every_channel(tmp_path: Path, make_relay: Any) -> None:
    info, _, d = await multifd_capture(tmp_path, make_relay)
    session = json.loads((d / "session.json").read_text())
    doc = assert_offline_counts(d, info)
    assert sorted(c["channel_id"] for c in doc["channels"]) == [0, 1, 2, 3]
    kinds = sorted((c["kind"], c["multifd_id"]) for c in session["channels"])
    assert kinds == [("main", None), ("multifd", 0), ("multifd", 1), ("multifd", 2), ("multifd", 3)]
    assert session["complete"] is True


@ONE_LOOP
async def test_postcopy_annotates_with_a_vmdesc_from_an_earlier_capture(
    tmp_path: Path, make_relay: Any
) -> None:
    from tests.fixtures import fixture

    vmdesc = fixture("vmdesc-pc-i440fx-7.2.json")
    root = tmp_path / "captures"
    settings = TapSettings(capture_dir=root, vmdesc=VmDescription.from_json(vmdesc.read_bytes()))
    async with vm_pair(tmp_path, mem_mib=128, random_mib=32) as pair:
        _, logs = await tap_migration(
            pair,
            make_relay,
            settings,
            caps={"postcopy-ram": True},
            params={"max_bandwidth": 32 * 1024 * 1024},
            postcopy=True,
        )
        await pair.assert_ram_identical()
    summary = only(logs, "migration_summary")
    assert summary["vmdesc"] is False  # postcopy sends none
    assert summary["outcome"] == "completed"
    assert summary["devices_decoded"] > 10
    assert summary["devices_failed"] == 0
    annotated = only(logs, "device_state_annotated")
    assert annotated["vmdesc"] == "--vmdesc"


@ONE_LOOP
async def test_destination_that_fails_to_load_is_located(tmp_path: Path, make_relay: Any) -> None:
    """A destination with less RAM rejects the RAM block list: migtap names that section."""
    async with vm_pair(tmp_path, mem_mib=64, random_mib=32) as pair:
        pair.dst.mem_mib = 32
        await pair.dst.stop()
        pair.dst.proc = None
        pair.dst.qmp = None
        await pair.dst.start()
        await pair.configure({}, {})
        with capture_logs() as logs:
            async with make_relay(pair.dst_port) as relay:
                await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
                # The source may even say "completed": everything fit in socket buffers.
                await wait_migration(pair.src, timeout_s=30)
                async with asyncio.timeout(15):
                    while not relay.sessions_ended:
                        await asyncio.sleep(0.02)
    early = only(logs, "destination_closed_early")
    # The destination rejected the RAM START; by the time it closed, the source had moved on
    # to later RAM sections (the kernel buffers in between), still in "ram".
    assert early["section_in_flight"]["idstr"] == "ram"
    assert early["last_bytes_hex"]
    assert only(logs, "migration_summary")["outcome"] == "failed"


async def rich_q35_migration(
    tmp_path: Path,
    make_relay: Any,
    *,
    machine: str = "q35",
    src: Qemu = HOST_QEMU,
    dst: Qemu = HOST_QEMU,
    caps: dict[str, bool] | None = None,
    slirps: int = 2,
) -> tuple[dict[str, Any], list[dict[str, Any]], Path]:
    """A device-rich q35 migration through migtap with a capture; RAM and the annotated log
    (every vmdesc device decoded) checked. Returns query-migrate, the logs, the capture dir."""
    disks = [make_qcow2(tmp_path / f"{name}.qcow2") for name in ("src", "dst")]
    root = tmp_path / "captures"
    async with vm_pair(
        tmp_path,
        machine=machine,
        random_mib=16,
        src_extra=rich_devices(disks[0], slirps=slirps),
        dst_extra=rich_devices(disks[1], slirps=slirps),
        src_qemu=src,
        dst_qemu=dst,
    ) as pair:
        info, logs = await tap_migration(pair, make_relay, TapSettings(capture_dir=root), caps=caps)
        await pair.assert_ram_identical()
    d = capture_dir(root)
    desc = VmDescription.from_json((d / "vmdesc.json").read_bytes())
    short = {dev.name.rsplit("/", 1)[-1] for dev in desc.devices}
    assert {"virtio-net", "e1000", "virtio-blk", "xhci", "usb-ptr", "ICH9LPC"} <= short
    records = [json.loads(line) for line in (d / "annotated.jsonl").read_text().splitlines()]
    assert {(r["idstr"], r["instance_id"]) for r in records} == {
        (dev.name, dev.instance_id) for dev in desc.devices
    }
    assert all(r["decoded"] for r in records), [r for r in records if not r["decoded"]]
    m = assert_pages_match(info, logs)
    assert m["devices_failed"] == 0
    assert m["machine_type"].startswith("pc-q35-")
    return info, logs, d


@ONE_LOOP
async def test_device_rich_q35_is_annotated_field_by_field(tmp_path: Path, make_relay: Any) -> None:
    await rich_q35_migration(tmp_path, make_relay)
