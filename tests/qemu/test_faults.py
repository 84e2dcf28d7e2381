"""Faults during real QEMU 7.2 migrations: who sees what, how fast, and what migtap records."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest
from structlog.testing import capture_logs

from migtap.tap import TapSettings
from tests.qemu.harness import MiB, Pair, Vm, vm_pair, wait_migration

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def wait_sessions(relay: Any, n: int = 1, limit_s: float = 15) -> None:
    async with asyncio.timeout(limit_s):
        while len(relay.sessions_ended) < n:
            await asyncio.sleep(0.02)


async def test_destination_accepting_and_closing_at_once(tmp_path: Path, make_relay: Any) -> None:
    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # 64 MiB of random RAM: more than every socket buffer on the way. A stream that fits in
        # them (an idle 64 MiB guest sends ~2 MiB) can be "completed" from the source's point
        # of view before any proxy learns the destination is gone (docs/reliability.md).
        async with vm_pair(tmp_path, mem_mib=128, random_mib=64) as pair:
            with capture_logs() as logs:
                async with make_relay(port) as relay:
                    t0 = time.monotonic()
                    await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
                    info = await wait_migration(pair.src, timeout_s=15)
                    elapsed = time.monotonic() - t0
                    await wait_sessions(relay)
    finally:
        server.close()
        await server.wait_closed()
    assert info["status"] == "failed"
    assert elapsed < 5
    (summary,) = events(logs, "migration_summary")
    assert summary["outcome"] == "failed"
    (early,) = events(logs, "destination_closed_early")
    assert early["phase"] in ("connecting", "setup", "bulk round")


async def test_destination_killed_capture_is_kept_and_marked(
    tmp_path: Path, make_relay: Any
) -> None:
    root = tmp_path / "captures"
    async with vm_pair(tmp_path, mem_mib=128, random_mib=64) as pair:
        await pair.configure({}, {"max_bandwidth": 16 * MiB})
        with capture_logs() as logs:
            async with make_relay(pair.dst_port, tap=TapSettings(capture_dir=root)) as relay:
                await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
                await asyncio.sleep(1.0)
                pair.dst.kill()
                t0 = time.monotonic()
                info = await wait_migration(pair.src, timeout_s=15)
                elapsed = time.monotonic() - t0
                await wait_sessions(relay)
    assert info["status"] == "failed"
    assert elapsed < 5
    (summary,) = events(logs, "migration_summary")
    assert summary["outcome"] == "failed"
    assert summary["last_phase"] == "bulk round"
    (early,) = events(logs, "destination_closed_early")
    assert early["section_in_flight"]["idstr"] == "ram"
    (capture,) = root.iterdir()
    session = json.loads((capture / "session.json").read_text())
    assert session["outcome"] == "failed"
    # The capture holds every byte that passed, and parses up to the cut.
    main = capture / "src-to-dst.bin"
    assert main.stat().st_size == summary["bytes_src_to_dst"]
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "migtap", "analyze", str(main), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1  # truncated: an error after what parsed
    assert "offset" in out.stderr
    report = json.loads(out.stdout)
    assert report["ram"]["total"]["normal_pages"] > 0


async def test_source_killed_destination_sees_it(tmp_path: Path, make_relay: Any) -> None:
    async with vm_pair(tmp_path, mem_mib=128, random_mib=64) as pair:
        await pair.configure({}, {"max_bandwidth": 16 * MiB})
        with capture_logs() as logs:
            async with make_relay(pair.dst_port) as relay:
                await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
                await asyncio.sleep(1.0)
                pair.src.kill()
                t0 = time.monotonic()
                # A 7.2 destination whose incoming migration fails reports it and exits.
                assert pair.dst.proc is not None
                code = await asyncio.to_thread(pair.dst.proc.wait, 15)
                elapsed = time.monotonic() - t0
                await wait_sessions(relay)
    assert code != 0
    assert "load of migration failed" in pair.dst.log_path.read_text()
    assert elapsed < 5
    (summary,) = events(logs, "migration_summary")
    # A killed source's kernel closes the socket with a FIN, exactly as migrate_cancel does:
    # the wire cannot tell them apart (docs/tap.md).
    assert summary["outcome"] == "cancelled"
    assert summary["last_phase"] == "bulk round"
    assert summary["last_section"]["idstr"] == "ram"
    assert events(logs, "stream_cut")


async def test_cancel_then_migrate_again(tmp_path: Path, make_relay: Any) -> None:
    async with vm_pair(tmp_path, mem_mib=128, random_mib=64) as pair:
        await pair.configure({}, {"max_bandwidth": 16 * MiB})
        port = pair.dst_port
        with capture_logs() as logs:
            async with make_relay(port) as relay:
                uri = f"tcp:127.0.0.1:{relay.port}"
                await pair.src.cmd("migrate", uri=uri)
                await asyncio.sleep(0.5)
                await pair.src.cmd("migrate_cancel")
                first = await wait_migration(pair.src, timeout_s=15)
                await wait_sessions(relay, 1)
                # The destination gave up with the first attempt: a fresh one on the same port.
                await pair.dst.stop()
                dst = Vm("dst2", tmp_path, mem_mib=128, incoming=True)
                try:
                    await dst.start()
                    await dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
                    await pair.src.set_parameters(max_bandwidth=8 * 1024 * MiB)
                    second = await Pair(pair.src, dst, port).migrate(uri)
                    await wait_sessions(relay, 2)
                    assert second.source["status"] == "completed"
                    assert await pair.src.ram_sha256() == await dst.ram_sha256()
                finally:
                    await dst.stop()
    assert first["status"] == "cancelled"
    outcomes = [e["outcome"] for e in events(logs, "migration_summary")]
    assert outcomes == ["cancelled", "completed"]
    assert [e["session"] for e in events(logs, "session_ended")] == [1, 2]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:  # noqa: PTH123 - a tiny procfs read
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def test_stalled_destination_keeps_migtap_bounded(tmp_path: Path) -> None:
    """SIGSTOP the destination mid-migration: migtap (a real process) must not grow."""
    log_path = tmp_path / "migtap.log"
    async with vm_pair(tmp_path, mem_mib=256, random_mib=192) as pair:
        # 256 MiB/s: still sending when the destination stops at 0.3 s, with 110+ MiB to go.
        await pair.configure({}, {"max_bandwidth": 256 * MiB})
        with log_path.open("wb") as log:
            tap = subprocess.Popen(  # noqa: ASYNC220 - spawn only
                [
                    sys.executable,
                    "-m",
                    "migtap",
                    "listen",
                    "127.0.0.1:0",
                    "--forward",
                    f"127.0.0.1:{pair.dst_port}",
                    "--log-format",
                    "json",
                ],
                stderr=log,
            )
        try:
            async with asyncio.timeout(15):
                while '"listening"' not in log_path.read_text():
                    await asyncio.sleep(0.05)
            listening = json.loads(log_path.read_text().splitlines()[0])
            port = int(listening["listen"][0].rsplit(":", 1)[1])
            base = rss_bytes(tap.pid)
            await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            await asyncio.sleep(0.3)
            assert pair.dst.proc is not None
            pid = pair.dst.proc.pid
            os.kill(pid, signal.SIGSTOP)
            # No QMP to the source while the destination is stopped: in stop-and-copy the
            # source holds its big lock while blocked on the socket, and would not answer.
            asyncio.get_running_loop().call_later(3.0, os.kill, pid, signal.SIGCONT)
            peak = base
            for _ in range(30):  # 3 s stalled
                await asyncio.sleep(0.1)
                peak = max(peak, rss_bytes(tap.pid))
            assert peak - base < 48 * MiB, f"migtap grew by {(peak - base) / MiB:.0f} MiB"
            await asyncio.sleep(0.2)  # SIGCONT is due
            info = await wait_migration(pair.src, timeout_s=120)
            assert info["status"] == "completed"
            # The source was held back for the stall, not let through into migtap's memory.
            assert info["total-time"] > 3000
            await wait_migration(pair.dst, timeout_s=30, statuses={"completed"})
            await pair.assert_ram_identical()
        finally:
            tap.send_signal(signal.SIGINT)
            await asyncio.to_thread(tap.wait, 30)
    summary = [json.loads(line) for line in log_path.read_text().splitlines()]
    (done,) = [e for e in summary if e["event"] == "migration_summary"]
    assert done["outcome"] == "completed"


async def test_many_migrations_through_one_listener(tmp_path: Path, make_relay: Any) -> None:
    """16 idle-VM migrations and 2 multifd ones at once through one migtap listener: all
    complete with RAM verified, and each capture holds its own session's stream only."""
    import uuid as uuidlib

    from migtap.wire.events import EndOfState, VmDescription
    from migtap.wire.stream import StreamParser
    from tests.qemu.switch import UuidSwitch

    n_plain, n_multifd = 16, 2
    root = tmp_path / "captures"
    async with contextlib.AsyncExitStack() as stack:
        pairs: list[tuple[Pair, bytes, bool]] = []
        for i in range(n_plain + n_multifd):
            vm_uuid = uuidlib.UUID(int=0xABC0 + i)
            work = tmp_path / f"vm{i}"
            work.mkdir()
            ident = ["-uuid", str(vm_uuid)]
            pair = await stack.enter_async_context(
                vm_pair(work, mem_mib=32, src_extra=[*ident, "-S"], dst_extra=ident)
            )
            multifd = i >= n_plain
            caps = {"validate-uuid": True, **({"multifd": True} if multifd else {})}
            await pair.configure(caps, {"multifd_channels": 2} if multifd else {})
            pairs.append((pair, vm_uuid.bytes, multifd))
        switch = await stack.enter_async_context(UuidSwitch({u: p.dst_port for p, u, _ in pairs}))
        with capture_logs() as logs:
            async with make_relay(switch.port, tap=TapSettings(capture_dir=root)) as relay:
                uri = f"tcp:127.0.0.1:{relay.port}"
                results = await asyncio.gather(
                    *(p.migrate(uri, timeout_s=120) for p, _, _ in pairs)
                )
                await wait_sessions(relay, len(pairs), limit_s=60)
        for pair, _, _ in pairs:
            await pair.assert_ram_identical()
    assert [r.source["status"] for r in results] == ["completed"] * len(pairs)
    assert switch.connections == n_plain + n_multifd * 3
    assert switch.unrouted == []
    summaries = events(logs, "migration_summary")
    assert len(summaries) == len(pairs)
    assert {s["outcome"] for s in summaries} == {"completed"}
    assert sorted(s["channels"] for s in summaries) == [1] * n_plain + [3] * n_multifd
    captures = sorted(root.iterdir())
    assert len(captures) == len(pairs)
    for capture in captures:
        session = json.loads((capture / "session.json").read_text())
        assert session["complete"] is True
        # The main file is one whole stream: bytes of another session would break it.
        parser = StreamParser()
        seen = []
        with (capture / "src-to-dst.bin").open("rb") as fh:
            while chunk := fh.read(1 << 20):
                seen += parser.feed(chunk)
        seen += parser.feed_eof()
        assert any(isinstance(e, EndOfState) for e in seen)
        assert any(isinstance(e, VmDescription) for e in seen)
