"""``migtap replay``: captures of real migrations fed back into a real destination QEMU.

Each test captures a migration through an in-process migtap (``make_relay``, as in
test_tap.py), then runs ``migtap replay CAPTURE --json --qemu -- QEMU_ARGV`` as a user would
and checks what it names: the failing record (section, instance, RAM block and both sizes),
QEMU's own lines, or a load whose guest RAM equals the source's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest
from qemu.qmp import QMPClient

from migtap.tap import TapSettings
from tests.qemu.harness import HOST_QEMU, MiB, Qemu, Vm, vm_pair, wait_migration
from tests.qemu.test_qemu10 import qemu10  # noqa: F401 - the fixture
from tests.qemu.test_tap import ONE_LOOP, capture_dir

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = ONE_LOOP


async def capture(
    tmp_path: Path,
    make_relay: Any,
    *,
    mem_mib: int = 64,
    dst_mem_mib: int | None = None,
    machine: str = "pc",
    random_mib: int = 0,
    src_extra: list[str] | None = None,
    dst_extra: list[str] | None = None,
    src_qemu: Qemu = HOST_QEMU,
    dst_qemu: Qemu = HOST_QEMU,
    caps: dict[str, bool] | None = None,
    params: dict[str, Any] | None = None,
    source_ram: bool = False,
) -> tuple[Path, dict[str, Any], str | None]:
    """A migration through migtap with a capture, whatever its outcome. Returns the capture
    directory, the source's query-migrate and (``source_ram``) the source's RAM sha256."""
    root = tmp_path / "captures"
    async with vm_pair(
        tmp_path,
        mem_mib=mem_mib,
        machine=machine,
        random_mib=random_mib,
        src_extra=src_extra,
        dst_extra=dst_extra,
        src_qemu=src_qemu,
        dst_qemu=dst_qemu,
    ) as pair:
        if dst_mem_mib is not None:
            await pair.dst.stop()
            pair.dst.mem_mib, pair.dst.proc, pair.dst.qmp = dst_mem_mib, None, None
            await pair.dst.start()
        await pair.configure(caps or {}, params or {})
        async with make_relay(pair.dst_port, tap=TapSettings(capture_dir=root)) as relay:
            await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
            info = await wait_migration(pair.src, timeout_s=60)
            async with asyncio.timeout(20):
                while not relay.sessions_ended:
                    await asyncio.sleep(0.02)
        digest = await pair.src.ram_sha256() if source_ram else None
    return capture_dir(root), info, digest


def qemu_argv(
    qemu: Qemu, *, mem_mib: int = 64, machine: str = "pc", extra: list[str] | None = None
) -> list[str]:
    """A destination's command line, as a user would give it to ``--qemu --``."""
    return [
        *qemu.command(),
        "-nodefaults",
        "-machine", f"{machine},accel=tcg",
        "-m", f"{mem_mib}M",
        "-display", "none",
        *(extra or []),
        "-S",
    ]  # fmt: skip


def replay(
    capture: Path, argv: list[str], *options: str, qemu: Qemu = HOST_QEMU
) -> tuple[int, dict[str, Any], str]:
    """``migtap replay CAPTURE --json [OPTIONS] --qemu -- ARGV``: exit code, JSON, stderr."""
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "migtap", "replay", str(capture), "--json", *options,
         "--qemu", "--", *argv],
        capture_output=True, text=True, check=False, timeout=240, env=qemu.environ(),
    )  # fmt: skip
    assert done.stdout, done.stderr
    doc = json.loads(done.stdout)
    doc["_wall_s"] = time.monotonic() - t0
    return done.returncode, doc, done.stderr


def replay_text(capture: Path, argv: list[str], qemu: Qemu = HOST_QEMU) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "migtap", "replay", str(capture), "--qemu", "--", *argv],
        capture_output=True, text=True, check=False, timeout=240, env=qemu.environ(),
    )  # fmt: skip
    return done.returncode, done.stdout


async def test_good_capture_loads_with_the_sources_ram(tmp_path: Path, make_relay: Any) -> None:
    d, info, source_ram = await capture(tmp_path, make_relay, random_mib=8, source_ram=True)
    assert info["status"] == "completed"
    qmp_path = tmp_path / "replayed.qmp"
    argv = qemu_argv(HOST_QEMU, extra=["-qmp", f"unix:{qmp_path},server=on,wait=off"])
    code, doc, stderr = replay(d, argv, "--keep")
    pid = doc["destination"]["pid"]
    try:
        assert code == 0, (doc, stderr)
        assert doc["outcome"] == "loaded"
        assert doc["failed_at"] is None
        assert doc["bytes_consumed"] == doc["bytes_total"] == (d / "src-to-dst.bin").stat().st_size
        assert doc["records_started"] == doc["records_total"]
        assert doc["destination"]["paused_by_S"] is True
        assert doc["destination"]["status"] in ("paused", "prelaunch", "postmigrate")
        vm = Vm("replayed", tmp_path, mem_mib=64)
        vm.qmp = QMPClient("replayed")
        await vm.qmp.connect(str(qmp_path))
        try:
            assert await vm.ram_sha256() == source_ram
        finally:
            with contextlib.suppress(Exception):
                await vm.cmd("quit")
            with contextlib.suppress(Exception):  # EOF: it quit first
                await vm.qmp.disconnect()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(doc["destination"]["workdir"], ignore_errors=True)  # --keep leaves it
    assert doc["_wall_s"] < 60


async def test_device_mismatch_names_the_section(tmp_path: Path, make_relay: Any) -> None:
    """A source with a virtio-rng the destination lacks: the replay names that section."""
    rng = ["-device", "virtio-rng-pci"]
    d, _, _ = await capture(tmp_path, make_relay, src_extra=rng)
    code, doc, stderr = replay(d, qemu_argv(HOST_QEMU))
    assert code == 1, (doc, stderr)
    assert doc["outcome"] == "failed"
    at = doc["failed_at"]
    assert at["kind"] == "section_full"
    assert at["idstr"].startswith("0000:00:0")
    assert at["idstr"].endswith(".0/virtio-rng")
    assert at["instance_id"] == 0
    assert at["confirmed_by_destination"] is True
    # It read the section's first byte and stopped inside it; the record after it never began.
    assert at["offset"] < doc["bytes_consumed"] <= at["end"]
    assert doc["records_started"] < doc["records_total"]
    unknown = [line for line in doc["destination_error"] if "Unknown savevm section" in line]
    assert unknown
    assert f"'{at['idstr']}' 0" in unknown[0]
    # The text report says the same.
    code, text = replay_text(d, qemu_argv(HOST_QEMU))
    assert code == 1
    assert f"section FULL '{at['idstr']}' instance 0" in text
    assert "Unknown savevm section or instance" in text


async def test_smaller_destination_names_the_ram_block(tmp_path: Path, make_relay: Any) -> None:
    """256 MiB source, 128 MiB destination: the RAM block list, pc.ram, both sizes."""
    d, _, _ = await capture(tmp_path, make_relay, mem_mib=256, dst_mem_mib=128)
    code, doc, stderr = replay(d, qemu_argv(HOST_QEMU, mem_mib=128))
    assert code == 1, (doc, stderr)
    at = doc["failed_at"]
    assert at["kind"] == "ram_block_list"
    assert at["idstr"] == "ram"
    assert at["section_kind"] == "START"
    sub = at["sub_record"]
    assert sub["block"] == "pc.ram"
    assert sub["stream_size"] == 256 * MiB
    assert sub["in_block_list"] == 256 * MiB
    assert sub["destination_size"] == 128 * MiB
    assert at["confirmed_by_destination"] is True
    assert at["offset"] < doc["bytes_consumed"] <= at["end"]
    assert any(
        "Size mismatch: pc.ram: 0x10000000 != 0x8000000" in x for x in doc["destination_error"]
    )
    # The capture is cut (the live destination failed early): a destination of the right size
    # reads all of it without failing, and the report says the capture ended first.
    assert doc["capture_complete"] is False
    code, doc, stderr = replay(d, qemu_argv(HOST_QEMU, mem_mib=256))
    assert code == 1, (doc, stderr)
    assert doc["outcome"] == "incomplete"
    assert doc["failed_at"] is None
    assert doc["bytes_consumed"] == doc["bytes_total"]
    assert doc["_wall_s"] < 20


@pytest.mark.qemu10
async def test_10_to_7_2_second_slirp_is_named(
    tmp_path: Path,
    make_relay: Any,
    qemu10: Qemu,  # noqa: F811 - the fixture
) -> None:
    """QEMU 10.0 with two user-mode backends into 7.2: 7.2 knows only ``slirp`` instance 0."""
    nets = [
        "-netdev", "user,id=n0", "-device", "e1000,netdev=n0",
        "-netdev", "user,id=n1", "-device", "e1000,netdev=n1",
    ]  # fmt: skip
    machine = "pc-i440fx-7.2"
    d, _, _ = await capture(
        tmp_path,
        make_relay,
        machine=machine,
        src_extra=nets,
        dst_extra=nets,
        src_qemu=qemu10,
    )
    code, doc, stderr = replay(d, qemu_argv(HOST_QEMU, machine=machine, extra=nets))
    assert code == 1, (doc, stderr)
    at = doc["failed_at"]
    assert (at["idstr"], at["instance_id"]) == ("slirp", 1)
    assert at["confirmed_by_destination"] is True
    assert any("'slirp' 1" in line for line in doc["destination_error"])


@pytest.mark.parametrize("version", ["7.2", pytest.param("10.0", marks=pytest.mark.qemu10)])
async def test_multifd_capture_replays(
    tmp_path: Path, make_relay: Any, version: str, request: pytest.FixtureRequest
) -> None:
    qemu = request.getfixturevalue("qemu10") if version == "10.0" else HOST_QEMU
    d, info, _ = await capture(
        tmp_path,
        make_relay,
        random_mib=8,
        src_qemu=qemu,
        dst_qemu=qemu,
        caps={"multifd": True},
        params={"multifd_channels": 2},
    )
    assert info["status"] == "completed"
    code, doc, stderr = replay(d, qemu_argv(qemu), qemu=qemu)
    assert code == 0, (doc, stderr)
    assert doc["outcome"] == "loaded"
    assert doc["needs"]["capabilities"]["multifd"] is True
    assert doc["needs"]["parameters"]["multifd-channels"] == 2
    assert [c["kind"] for c in doc["channels"]] == ["main", "multifd", "multifd"]
    assert all(c.get("error") is None for c in doc["channels"])


async def listening_destination(
    tmp_path: Path, uri: str, *, caps: dict[str, bool] | None = None, extra: list[str] | None = None
) -> tuple[Vm, str]:
    """A destination the test starts (``-incoming defer``), listening on ``uri``; returns it and
    the address for ``--to``."""
    vm = Vm("listening", tmp_path, mem_mib=64, incoming=True, extra=list(extra or []))
    await vm.start()
    await vm.set_capabilities(**(caps or {}))
    await vm.cmd("migrate-incoming", uri=uri)
    if uri.startswith("unix:"):
        return vm, uri
    info = await vm.query_migrate()
    return vm, f"127.0.0.1:{info['socket-address'][0]['port']}"


def replay_to(capture: Path, address: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "migtap", "replay", str(capture), "--json", "--to", address],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


async def test_to_tcp_reads_the_return_path(tmp_path: Path, make_relay: Any) -> None:
    """Over TCP at full speed: the destination's SHUT 0 on the return path says it loaded."""
    d, info, source_ram = await capture(
        tmp_path, make_relay, random_mib=4, caps={"return-path": True}, source_ram=True
    )
    assert info["status"] == "completed"
    vm, address = await listening_destination(tmp_path, "tcp:127.0.0.1:0")
    try:
        code, doc = replay_to(d, address)
        assert code == 0, doc
        assert doc["outcome"] == "loaded"
        assert doc["shut"] == 0
        assert [m["kind"] for m in doc["return_path"]][-1] == "RpShut"
        assert doc["bytes_written"] == doc["bytes_total"]
        assert doc["failed_at"] is None  # not located over TCP
        done = await wait_migration(vm, timeout_s=30, statuses={"completed", "failed"})
        assert done["status"] == "completed"
        assert await vm.ram_sha256() == source_ram
    finally:
        await vm.stop()


async def test_to_unix_names_the_section(tmp_path: Path, make_relay: Any) -> None:
    """Over a unix socket even a destination migtap did not start is fed record by record."""
    d, _, _ = await capture(tmp_path, make_relay, src_extra=["-device", "virtio-rng-pci"])
    vm, address = await listening_destination(tmp_path, f"unix:{tmp_path / 'in.sock'}")
    try:
        code, doc = replay_to(d, address)
    finally:
        await vm.stop()
    assert code == 1, doc
    assert doc["outcome"] == "failed"
    assert doc["failed_at"]["idstr"].endswith("/virtio-rng")
    assert doc["destination_error"] == []  # its stderr is the test's, not migtap's
    assert "virtio-rng" in vm.log_path.read_text()
