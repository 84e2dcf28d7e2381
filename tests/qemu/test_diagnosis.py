"""Diagnosis, live: where a failed destination can have been reading, and a stall coming.

Real QEMU 7.2 migrations through migtap (TCG, 127.0.0.1). Over TCP migtap cannot see how far
the destination QEMU read (its kernel acknowledges bytes it only buffered), so it reports a
range of stream offsets and the sections in it; `migtap replay` gives the exact record.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from structlog.testing import capture_logs

from migtap.tap import TapSettings
from tests.qemu.harness import MiB, floppy, guest_args, vm_pair, wait_booted, wait_migration
from tests.qemu.test_tap import only

if TYPE_CHECKING:
    from pathlib import Path

    from tests.qemu.harness import Pair


async def restart_destination(pair: Pair, *, mem_mib: int | None = None, extra: list[str]) -> None:
    """The destination again, with other RAM or devices (vm_pair starts both alike)."""
    await pair.dst.stop()
    if mem_mib is not None:
        pair.dst.mem_mib = mem_mib
    pair.dst.extra = extra
    pair.dst.proc = None
    pair.dst.qmp = None
    await pair.dst.start()


async def failed_migration(pair: Pair, make_relay: Any) -> list[dict[str, Any]]:
    await pair.configure({}, {})
    with capture_logs() as logs:
        async with make_relay(pair.dst_port) as relay:
            await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
            await wait_migration(pair.src, timeout_s=30)  # may say completed: all fit in buffers
            async with asyncio.timeout(15):
                while not relay.sessions_ended:
                    await asyncio.sleep(0.02)
    return logs


def early_report(logs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [e for e in logs if e["event"] == "destination_closed_early"]
    summary = [e for e in logs if e["event"] in ("migration_summary", "session_ended")]
    assert len(found) == 1, summary
    return found[0]


def covered(failure: dict[str, Any]) -> list[str | None]:
    return [s["idstr"] for s in failure["sections"]]


async def test_a_missing_device_is_within_the_reported_range(
    tmp_path: Path, make_relay: Any
) -> None:
    """The source has a virtio-rng the destination lacks. The source writes the whole stream
    into socket buffers and closes first; the destination then fails on that section and
    resets. migtap used to say nothing at all."""
    rng = ["-device", "virtio-rng-pci"]
    async with vm_pair(tmp_path, random_mib=8, src_extra=rng) as pair:
        logs = await failed_migration(pair, make_relay)
        stderr = pair.dst.log_path.read_text(errors="replace")
    early = early_report(logs)
    failure = early["failure"]
    assert failure["reset"] is True  # it closed with bytes unread
    assert failure["offset_min"] <= failure["offset_max"]
    rng_sections = [s for s in failure["sections"] if s["idstr"].endswith("/virtio-rng")]
    assert rng_sections, covered(failure)
    assert rng_sections[0]["idstr"].startswith("0000:00:0")
    assert "migtap replay" in early["action"]
    summary = only(logs, "migration_summary")
    assert summary["outcome"] == "failed"
    assert summary["failure"] == failure
    assert "Unknown savevm section or instance" in stderr  # QEMU's own words, for the record
    assert rng_sections[0]["idstr"] in stderr


async def test_a_smaller_destination_fails_within_the_reported_range(
    tmp_path: Path, make_relay: Any
) -> None:
    """The destination has less RAM: it rejects the RAM block list of the ram START section."""
    async with vm_pair(tmp_path, mem_mib=64, random_mib=32) as pair:
        await restart_destination(pair, mem_mib=32, extra=[])
        logs = await failed_migration(pair, make_relay)
    failure = early_report(logs)["failure"]
    ram_start = [
        s
        for s in failure["sections"]
        if s["idstr"] == "ram" and s["kind"] == "QEMU_VM_SECTION_START"
    ]
    assert ram_start, covered(failure)
    assert failure["offset_min"] <= ram_start[0]["offset"] <= failure["offset_max"]
    assert only(logs, "migration_summary")["failure"] == failure


async def test_a_migration_that_cannot_converge_is_warned_within_five_rounds(
    tmp_path: Path, make_relay: Any
) -> None:
    """A guest rewriting 512 KiB in a loop, 2 MiB/s and a 1 ms downtime limit: every round
    sends the whole working set in the time the guest needs to dirty it again."""
    guest = guest_args(floppy(tmp_path))
    # The guest rewrites its 128 pages at about 5 MB/s (a TLB flush per page is slow under
    # TCG): a 2 MiB/s wire is slower, so every round carries them all. 1 MiB of random RAM:
    # the bulk round outlasts QEMU's first 100 ms bandwidth window (a bulk round done before it
    # leaves 7.2's threshold at 0, and it completes at once).
    async with vm_pair(tmp_path, random_mib=1, src_extra=guest, dst_extra=guest) as pair:
        await wait_booted(pair.src)
        await pair.configure({}, {"max_bandwidth": 2 * MiB, "downtime_limit": 1})
        with capture_logs() as logs:
            settings = TapSettings(progress_interval_s=0.2)
            async with make_relay(pair.dst_port, tap=settings) as relay:
                await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
                async with asyncio.timeout(60):
                    while not [e for e in logs if e["event"] == "migration_not_converging"]:
                        state = await pair.src.query_migrate()
                        assert state["status"] in ("setup", "active"), state
                        await asyncio.sleep(0.1)
                await pair.src.cmd("migrate_cancel")
                async with asyncio.timeout(15):
                    while not relay.sessions_ended:
                        await asyncio.sleep(0.02)
    warning = only(logs, "migration_not_converging")
    finished = [e for e in logs if e["event"] == "ram_round_finished"]
    rounds = [(e["round"], e["pages_normal"], e["duration_s"]) for e in finished]
    assert warning["rounds"][-1] <= 5, (rounds, warning)
    assert warning["dirty_rate_mib_s"] >= 0.9 * warning["transfer_rate_mib_s"]
    assert warning["working_set_bytes"] >= 64 * 4096  # of the 128 pages it keeps rewriting
    summary = only(logs, "migration_summary")
    if summary["outcome"] == "cancelled":
        assert summary["converging"] is False
        assert summary["convergence"]["converging"] is False
    else:  # a starved vCPU let it converge before migrate_cancel came: said so, then
        assert summary["outcome"] == "completed"
        assert summary["converging"] is True
        assert only(logs, "migration_converged")["rounds"] == warning["rounds"]
