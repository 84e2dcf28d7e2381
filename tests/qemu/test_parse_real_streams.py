"""Real QEMU 7.2 streams, parsed end to end.

Precopy streams are written to a file by the source alone (``migrate exec:cat > FILE``); the
multifd, return-path and postcopy streams need a destination and go through a small recording
TCP relay defined here (it keeps every byte of each connection, both directions).

What is checked against QEMU itself:

* the parse never fails, fed in uneven chunks;
* the RAM page counts equal the source's final ``query-migrate`` ``ram.normal`` and
  ``ram.duplicate`` (for multifd: main channel plus every multifd channel, less the pages 7.2
  sends twice across a packet boundary but counts once, see ``test_multifd_4_channels``);
* the FULL device sections are exactly the devices of the stream's VMDESCRIPTION, in order, and
  each payload decodes with its vmdesc entry ending exactly where the parser's footer scan put
  the footer;
* ``migtap analyze --dump state --json`` finishes without error and lists every device.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import struct
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from migtap import analyze
from migtap.annotate.vmsd import VmDescription as Desc
from migtap.annotate.walk import decode_section
from migtap.wire import events as ev
from migtap.wire.constants import SectionType
from migtap.wire.events import MultifdInit, MultifdPacket, RpPong, RpShut
from migtap.wire.multifd import MultifdParser
from migtap.wire.return_path import ReturnPathParser
from migtap.wire.stream import State, StreamParser
from migtap.wire.vmdesc import parse_vmdesc
from tests.qemu.harness import (
    MiB,
    Pair,
    Vm,
    make_qcow2,
    random_ram_file,
    rich_devices,
    vm_pair,
    wait_migration,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])

E = TypeVar("E")
PAGE = 4096
QEVM = b"QEVM"
MULTIFD_MAGIC = (0x11223344).to_bytes(4, "big")
# Chunk sizes that cut headers, be32s and footers at every kind of place.
UNEVEN = (1, 3, 4093, 7, 65537, 2, 1 << 20, 5, 131071, 4096, 11, 300_001)


# -- feeding -------------------------------------------------------------------------------------
def chunks(data: bytes, sizes: tuple[int, ...] = UNEVEN) -> Iterator[memoryview]:
    view = memoryview(data)
    pos = 0
    for size in itertools.cycle(sizes):
        if pos >= len(view):
            return
        yield view[pos : pos + size]
        pos += size


@dataclass
class Parsed:
    parser: StreamParser
    events: list[ev.Event]

    def of(self, cls: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, cls)]


def parse_main(data: bytes) -> Parsed:
    parser = StreamParser(page_size=PAGE)
    events: list[ev.Event] = []
    for piece in chunks(data):
        events += parser.feed(piece)
    events += parser.feed_eof()
    assert parser.error is None
    assert not [e for e in events if isinstance(e, ev.Unparsed)]
    return Parsed(parser, events)


# -- checks against QEMU -----------------------------------------------------------------------
async def resolved_machine(vm: Vm) -> str:
    """The versioned machine type QEMU writes in the configuration (``pc`` -> pc-i440fx-7.2)."""
    for m in await vm.cmd("query-machines"):
        if vm.machine in (m["name"], m.get("alias")):
            return str(m["name"])
    raise AssertionError(f"{vm.machine} not in query-machines")


def check_ram_counts(p: Parsed, info: dict[str, Any], *, multifd_normal: int = 0) -> None:
    total = p.parser.ram_stats.total
    assert total.normal_pages + multifd_normal == info["ram"]["normal"]
    assert total.zero_pages == info["ram"]["duplicate"]
    assert total.xbzrle_pages == 0
    assert total.compressed_pages == 0
    assert sum(r.normal_pages for r in p.parser.ram_stats.rounds) == total.normal_pages


def full_devices(p: Parsed) -> list[ev.DeviceState]:
    return [
        d
        for d in p.of(ev.DeviceState)
        if d.kind == SectionType.QEMU_VM_SECTION_FULL and d.idstr != "ram"
    ]


def check_devices_decode(devices: list[ev.DeviceState], desc: Desc) -> None:
    """Every payload decodes with its vmdesc entry, ending exactly where the footer scan ended."""
    mismatched = []
    for d in devices:
        assert d.idstr is not None
        assert d.instance_id is not None
        dd = desc.find(d.idstr, d.instance_id)
        assert dd is not None, f"no vmdesc entry for {d.idstr} ({d.instance_id})"
        assert dd.version in (None, d.version_id), d.idstr
        decoded = decode_section(dd, d.payload, base_offset=d.payload_offset)
        if decoded.consumed != len(d.payload):
            mismatched.append((d.idstr, d.instance_id, decoded.consumed, len(d.payload)))
    assert not mismatched, f"vmdesc-decoded length != footer-scan length: {mismatched}"


def check_precopy_stream(p: Parsed, machine_type: str) -> Desc:
    """Header, configuration, sections, EOF and vmdesc of a plain precopy stream."""
    assert p.parser.state is State.DONE
    (header,) = p.of(ev.StreamHeader)
    assert header.offset == 0
    assert header.version == 3
    (config,) = p.of(ev.Configuration)
    assert config.machine_type == machine_type
    headers = p.of(ev.SectionHeader)
    assert headers
    assert len(p.of(ev.SectionFooter)) == len(headers)  # 7.2 writes a footer after every section
    ram_ids = {h.section_id for h in headers if h.idstr == "ram"}
    assert len(ram_ids) == 1
    (blocks,) = p.of(ev.RamBlockList)
    assert blocks.blocks[0].idstr == "pc.ram"
    assert blocks.total == sum(b.used_length for b in blocks.blocks)
    assert len(p.of(ev.EndOfState)) == 1
    (vmdesc,) = p.of(ev.VmDescription)
    desc = Desc.from_json(vmdesc.json_bytes)
    assert parse_vmdesc(vmdesc).page_size == PAGE
    assert p.events[-1] == vmdesc

    # The FULL sections are the vmdesc's devices, in the same order (the vmdesc lists what was
    # written, one entry per FULL section).
    devices = full_devices(p)
    on_wire = [(d.idstr, d.instance_id) for d in devices]
    described = [(dd.name, dd.instance_id) for dd in desc.devices]
    assert on_wire == described
    assert all(d.inferred for d in devices)  # found by footer scan: the decoder must agree
    check_devices_decode(devices, desc)
    return desc


def check_analyze(path: Path, desc: Desc) -> dict[str, Any]:
    out = io.StringIO()
    err = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = analyze.main([str(path), "--dump", "state", "--json"])
    assert rc == 0, err.getvalue()
    assert err.getvalue() == ""  # no "vmdesc uses N bytes, the footer scan found M"
    doc: dict[str, Any] = json.loads(out.getvalue())
    assert doc["error"] is None
    names = [key.rsplit(" (", 1)[0] for key in doc["state"]]
    assert names[0] == "ram"
    assert names[1:] == [dd.name for dd in desc.devices]
    return doc


# -- file captures ---------------------------------------------------------------------------
async def capture_file(
    workdir: Path,
    *,
    mem_mib: int = 64,
    machine: str = "pc",
    extra: list[str] | None = None,
    ready: Callable[[Vm], Awaitable[None]] | None = None,
) -> tuple[Path, dict[str, Any], str]:
    """Migrate a lone source to ``exec:cat > FILE`` (once ``ready(vm)`` returns, if given);
    returns the file, final query-migrate and the resolved machine type."""
    vm = Vm("src", workdir, mem_mib=mem_mib, machine=machine, extra=list(extra or []))
    path = workdir / "stream.bin"
    part = workdir / "stream.part"
    try:
        await vm.start()
        if ready is not None:
            await ready(vm)
        machine_type = await resolved_machine(vm)
        await vm.set_parameters(max_bandwidth=8 * 1024 * MiB)
        # cat may still be writing when QEMU says completed: rename once it is done.
        await vm.cmd("migrate", uri=f"exec:cat > {part} && mv {part} {path}")
        info = await wait_migration(vm, timeout_s=60)
        assert info["status"] == "completed", info
    finally:
        await vm.stop()
    async with asyncio.timeout(10):
        while not path.exists():
            await asyncio.sleep(0.02)
    return path, info, machine_type


def loader(workdir: Path, mib: int) -> list[str]:
    blob = random_ram_file(workdir, mib * MiB)
    return ["-device", f"loader,file={blob},addr=0x1000000,force-raw=on"]


async def check_file_capture(
    tmp_path: Path, *, mem_mib: int = 64, machine: str = "pc", extra: list[str] | None = None
) -> tuple[Parsed, dict[str, Any], Desc]:
    path, info, machine_type = await capture_file(
        tmp_path, mem_mib=mem_mib, machine=machine, extra=extra
    )
    data = path.read_bytes()
    assert len(data) >= info["ram"]["transferred"] - 64  # the stream holds what QEMU counted
    p = parse_main(data)
    desc = check_precopy_stream(p, machine_type)
    check_ram_counts(p, info)
    check_analyze(path, desc)
    return p, info, desc


async def test_idle_pc_guest(tmp_path: Path) -> None:
    p, info, desc = await check_file_capture(tmp_path)
    # 64 MiB guest, all of it sent once: every page is either normal or zero.
    assert info["ram"]["normal"] + info["ram"]["duplicate"] >= 64 * MiB // PAGE
    assert {"cpu", "timer", "apic"} <= {dd.name.rsplit("/", 1)[-1] for dd in desc.devices}
    assert p.parser.ram_stats.rounds


async def test_random_ram_guest(tmp_path: Path) -> None:
    mib = 32
    _, info, _ = await check_file_capture(tmp_path, mem_mib=128, extra=loader(tmp_path, mib))
    assert info["ram"]["normal"] >= mib * MiB // PAGE  # random pages are never zero pages


async def test_device_rich_pc_guest(tmp_path: Path) -> None:
    extra = rich_devices(make_qcow2(tmp_path / "disk.qcow2"))
    _, _, desc = await check_file_capture(tmp_path, extra=extra)
    short = {dd.name.rsplit("/", 1)[-1] for dd in desc.devices}
    assert {"virtio-net", "e1000", "virtio-blk", "xhci", "usb-ptr"} <= short, sorted(short)


async def test_q35_guest(tmp_path: Path) -> None:
    _, _, desc = await check_file_capture(tmp_path, machine="q35")
    short = {dd.name.rsplit("/", 1)[-1] for dd in desc.devices}
    assert "ICH9LPC" in short, sorted(short)  # the q35 LPC bridge, absent on pc


# -- recorded TCP migrations ---------------------------------------------------------------
@dataclass
class Conn:
    up: bytearray = field(default_factory=bytearray)  # source -> destination
    down: bytearray = field(default_factory=bytearray)  # destination -> source
    done: asyncio.Event = field(default_factory=asyncio.Event)
    eof: set[str] = field(default_factory=set)  # "up", "down": directions that ended
    task: asyncio.Task[None] | None = None

    @property
    def kind(self) -> str:
        if self.up.startswith(QEVM):
            return "main"
        if self.up.startswith(MULTIFD_MAGIC):
            return "multifd"
        return "unknown"


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sink: bytearray, ended: set[str],
    name: str,
) -> None:  # fmt: skip
    while data := await reader.read(1 << 18):
        sink += data
        writer.write(data)
        await writer.drain()
    ended.add(name)
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


@contextlib.asynccontextmanager
async def recording_relay(dst_port: int) -> AsyncIterator[tuple[int, list[Conn]]]:
    """A TCP relay to the destination that records every connection, both directions."""
    conns: list[Conn] = []

    async def handle(src_r: asyncio.StreamReader, src_w: asyncio.StreamWriter) -> None:
        conn = Conn(task=asyncio.current_task())
        conns.append(conn)
        dst_r, dst_w = await asyncio.open_connection("127.0.0.1", dst_port)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pump(src_r, dst_w, conn.up, conn.eof, "up"))
                tg.create_task(_pump(dst_r, src_w, conn.down, conn.eof, "down"))
        finally:
            for w in (src_w, dst_w):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
            conn.done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with server:
            yield port, conns
            # The migration has completed on both sides, so every byte has been recorded. Now and
            # then a connection stayed open long after that (in 2 of 4 whole-suite runs, in the
            # multifd test, never when run alone; cause not found): wait a while, then close
            # what is left, and say which ones (kind, bytes each way, directions that ended).
            try:
                async with asyncio.timeout(10):
                    for conn in conns:
                        await conn.done.wait()
            except TimeoutError:
                left = [c for c in conns if not c.done.is_set()]
                print(
                    "recording_relay: still open 10 s after the migration completed:",
                    [(c.kind, len(c.up), len(c.down), sorted(c.eof)) for c in left],
                    file=sys.stderr,
                )
                for c in left:
                    assert c.task is not None
                    c.task.cancel()
                async with asyncio.timeout(10):
                    for c in left:
                        await c.done.wait()
    finally:
        server.close()


async def migrate_recorded(
    pair: Pair,
    *,
    caps: dict[str, bool] | None = None,
    params: dict[str, Any] | None = None,
    postcopy: bool = False,
) -> tuple[dict[str, Any], list[Conn]]:
    await pair.configure(caps or {}, params or {})
    async with recording_relay(pair.dst_port) as (port, conns):
        result = await pair.migrate(f"tcp:127.0.0.1:{port}", postcopy=postcopy, timeout_s=60)
        assert result.source["status"] == "completed", result.source
        assert result.destination.get("status") == "completed", result.destination
    await pair.assert_ram_identical()
    return result.source, conns


def parse_return_path(data: bytes) -> list[Any]:
    rp = ReturnPathParser()
    events: list[Any] = []
    for piece in chunks(data, (1, 2, 3, 5)):
        events += rp.feed(piece)
    events += rp.feed_eof()
    return events


async def test_multifd_4_channels(tmp_path: Path) -> None:
    channels = 4
    async with vm_pair(tmp_path, random_mib=16) as pair:
        info, conns = await migrate_recorded(
            pair, caps={"multifd": True}, params={"multifd_channels": channels}
        )
    kinds = sorted(c.kind for c in conns)
    assert kinds == ["main"] + ["multifd"] * channels
    (main,) = (c for c in conns if c.kind == "main")
    p = parse_main(bytes(main.up))
    machine = p.of(ev.Configuration)[0].machine_type
    desc = check_precopy_stream(p, machine)
    assert desc.devices

    multifd_normal = 0
    ids = []
    pages: dict[int, tuple[str, tuple[int, ...]]] = {}  # packet_num -> (block, page offsets)
    for conn in (c for c in conns if c.kind == "multifd"):
        data = bytes(conn.up)
        mp = MultifdParser(page_size=PAGE)
        events = []
        for piece in chunks(data):
            events += mp.feed(piece)
        events += mp.feed_eof()
        (init,) = (e for e in events if isinstance(e, MultifdInit))
        ids.append(init.channel_id)
        packets = [e for e in events if isinstance(e, MultifdPacket)]
        assert packets
        assert mp.stats.bytes == len(data)
        assert mp.stats.zero_pages == 0  # 7.2: zero pages stay on the main channel
        assert mp.stats.payload_bytes == mp.stats.normal_pages * PAGE
        multifd_normal += mp.stats.normal_pages
        for e in packets:
            if e.normal_pages:
                offsets = struct.unpack_from(f">{e.normal_pages}Q", data, e.offset + 320)
                pages[e.packet_num] = (e.ramblock, offsets)
        assert conn.down == b""
    assert sorted(ids) == list(range(channels))
    assert multifd_normal >= 16 * MiB // PAGE  # the random pages went over the channels

    # QEMU 7.2 sometimes sends the last page of a full packet again as the first page of the
    # next packet (same block, same offset, same bytes) but counts it once in ram.normal.
    repeats = sum(
        1
        for n, (block, offsets) in pages.items()
        if n + 1 in pages and pages[n + 1][0] == block and pages[n + 1][1][0] == offsets[-1]
    )
    p_total = p.parser.ram_stats.total
    assert p_total.normal_pages + multifd_normal - repeats == info["ram"]["normal"], repeats
    assert p_total.zero_pages == info["ram"]["duplicate"]


async def test_return_path(tmp_path: Path) -> None:
    async with vm_pair(tmp_path, random_mib=16) as pair:
        info, conns = await migrate_recorded(pair, caps={"return-path": True})
    (main,) = conns
    p = parse_main(bytes(main.up))
    check_precopy_stream(p, p.of(ev.Configuration)[0].machine_type)
    check_ram_counts(p, info)
    assert ev.Command in {type(e) for e in p.events}  # OPEN_RETURN_PATH
    pings = p.of(ev.Ping)
    rp = parse_return_path(bytes(main.down))
    assert rp
    assert rp[-1] == RpShut(rp[-1].offset, 0)
    pongs = [e for e in rp if isinstance(e, RpPong)]
    assert pongs
    assert sorted(e.value for e in pongs) == sorted(e.value for e in pings)


async def test_postcopy(tmp_path: Path) -> None:
    async with vm_pair(tmp_path, mem_mib=128, random_mib=32) as pair:
        # Slow precopy, so that the switch to postcopy happens before it converges.
        info, conns = await migrate_recorded(
            pair,
            caps={"postcopy-ram": True},
            params={"max_bandwidth": 32 * MiB},
            postcopy=True,
        )
    (main,) = conns
    p = parse_main(bytes(main.up))
    assert p.parser.state is not State.DONE or not p.of(ev.VmDescription)
    assert not p.of(ev.VmDescription)  # postcopy sends none: EOF is the last byte
    assert isinstance(p.events[-1], ev.EndOfState)
    (packaged,) = p.of(ev.Packaged)
    inside = p.events[p.events.index(packaged) + 1 : p.events.index(p.of(ev.PackagedEnd)[0])]
    devices = [e for e in inside if isinstance(e, ev.DeviceState)]
    assert devices
    assert all(d.kind == SectionType.QEMU_VM_SECTION_FULL for d in devices)
    assert {p.of(ev.PostcopyAdvise)[0].target_page_size} == {PAGE}
    check_ram_counts(p, info)

    rp = parse_return_path(bytes(main.down))
    assert rp[-1] == RpShut(rp[-1].offset, 0)
    assert any(isinstance(e, RpPong) for e in rp)
