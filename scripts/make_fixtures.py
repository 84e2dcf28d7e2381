"""Make tests/data/qemu-7.2/: small byte-exact slices of real QEMU 7.2 migration streams.

Runs the host's QEMU (Debian bookworm's ``qemu-system-x86_64`` 7.2, TCG, over 127.0.0.1) with
the real-QEMU test harness (tests/qemu/harness.py) and the recording TCP relay of
tests/qemu/test_parse_real_streams.py, four times:

* a lone source migrated to ``exec:cat > FILE`` (file precopy);
* a precopy migration with the ``return-path`` capability;
* a multifd migration with 2 channels;
* a postcopy migration, switched to postcopy after a few precopy rounds.

Every guest is ``pc`` (pc-i440fx-7.2), 32 MiB, ``-nodefaults``, booting a 512-byte floppy boot
sector (made here) that rewrites guest RAM 0x10000..0x90000 in a loop, so that pages keep getting
dirty. Guest RAM page contents are never written out: each slice ends before, or starts after,
the RAM records, and the multifd slice stops where the first page payload begins. The slices,
their offsets in the whole capture and facts about the whole captures go to ``manifest.json``
beside them; tests/data/qemu-7.2/README.md explains each file.

    .venv/bin/python scripts/make_fixtures.py [--out tests/data/qemu-7.2]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from migtap.wire import events as ev  # noqa: E402
from migtap.wire.constants import SectionType  # noqa: E402
from migtap.wire.events import (  # noqa: E402
    MultifdInit,
    MultifdPacket,
    RpPong,
    RpReqPages,
    RpReqPagesId,
)
from migtap.wire.multifd import MultifdParser  # noqa: E402
from migtap.wire.return_path import ReturnPathParser  # noqa: E402
from tests.qemu.harness import (  # noqa: E402
    MiB,
    Pair,
    floppy,
    guest_args,
    qemu_binary,
    vm_pair,
    wait_booted,
    wait_migration,
)
from tests.qemu.test_parse_real_streams import (  # noqa: E402
    Conn,
    Parsed,
    migrate_recorded,
    parse_main,
    recording_relay,
)
from tests.qemu.test_parse_real_streams import capture_file as capture_stream_file  # noqa: E402

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

OUT = ROOT / "tests" / "data" / "qemu-7.2"
MEM_MIB = 32
PAGE = 4096
PING_RECORD = 9  # 0x08, be16 MIG_CMD_PING, be16 length 4, be32 value
FOOTER = 5  # 0x7E, be32 section id
# MultiFDPacket_t in 7.2: magic, version, flags, pages_alloc, normal_pages, next_packet_size (be32
# each), packet_num (be64), 4 unused be64, ramblock[256]; then pages_alloc be64 page offsets.
MULTIFD_PACKET_HEAD = 6 * 4 + 8 + 4 * 8 + 256


# -- slicing ----------------------------------------------------------------------------------
@dataclass
class Slices:
    """The files to write and, for manifest.json, where each came from."""

    files: dict[str, bytes] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, capture: str, data: bytes, start: int, end: int) -> None:
        piece = data[start:end]
        self.files[name] = piece
        self.manifest[name] = {
            "capture": capture,
            "start": start,
            "end": end,
            "capture_bytes": len(data),
            "bytes": len(piece),
            "sha256": hashlib.sha256(piece).hexdigest(),
        }


def no_ram_pages_in(p: Parsed, start: int, end: int) -> None:
    """Guest RAM must stay out of the fixtures: no page records between start and end."""
    for e in p.of(ev.RamPages):
        if e.normal and e.offset < end and start < e.offset + e.length:
            raise AssertionError(f"RAM pages at {e.offset} inside the slice {start}..{end}")


def head_end(p: Parsed) -> int:
    """End of the RAM START section (its footer): header, configuration, commands, block list."""
    (blocks,) = p.of(ev.RamBlockList)
    footer = next(f for f in p.of(ev.SectionFooter) if f.offset > blocks.offset)
    return footer.offset + FOOTER


def ram_facts(p: Parsed, info: dict[str, Any] | None) -> dict[str, Any]:
    total = p.parser.ram_stats.total
    facts: dict[str, Any] = {
        "normal_page_records": total.normal_pages,
        "zero_page_records": total.zero_pages,
        "xbzrle_page_records": total.xbzrle_pages,
        "ram_sections": p.parser.ram_stats.sections,
        "eos": p.parser.ram_stats.eos,
        "rounds": len(p.parser.ram_stats.rounds),
        "full_sections": sum(
            1 for d in p.of(ev.DeviceState) if d.kind == SectionType.QEMU_VM_SECTION_FULL
        ),
        "pings": [e.value for e in p.of(ev.Ping)],
        "vmdescription": bool(p.of(ev.VmDescription)),
    }
    if info is not None:
        facts["qmp_ram_normal"] = info["ram"]["normal"]
        facts["qmp_ram_duplicate"] = info["ram"]["duplicate"]
        facts["qmp_dirty_sync_count"] = info["ram"]["dirty-sync-count"]
    return facts


def rp_facts(data: bytes) -> dict[str, Any]:
    parser = ReturnPathParser()
    events = parser.feed(data) + parser.feed_eof()
    return {
        "messages": len(events),
        "pongs": [e.value for e in events if isinstance(e, RpPong)],
        "req_pages": sum(isinstance(e, RpReqPages | RpReqPagesId) for e in events),
        "kinds": [type(e).__name__ for e in events],
    }


# -- the four captures ------------------------------------------------------------------------
async def capture_file(workdir: Path, image: Path) -> tuple[bytes, dict[str, Any], str]:
    """The booted guest migrated to ``exec:cat > FILE``, as test_parse_real_streams does."""
    path, info, machine = await capture_stream_file(
        workdir, mem_mib=MEM_MIB, extra=guest_args(image), ready=wait_booted
    )
    return path.read_bytes(), info, machine


async def file_precopy(workdir: Path, image: Path, out: Slices) -> dict[str, Any]:
    vm_dir = workdir / "file"
    vm_dir.mkdir()
    data, info, machine = await capture_file(vm_dir, image)
    p = parse_main(data)
    head = head_end(p)
    first_full = next(
        h.offset for h in p.of(ev.SectionHeader) if h.kind == SectionType.QEMU_VM_SECTION_FULL
    )
    no_ram_pages_in(p, 0, head)
    no_ram_pages_in(p, first_full, len(data))
    (vmdesc,) = p.of(ev.VmDescription)
    assert data.endswith(vmdesc.json_bytes)
    (eof,) = p.of(ev.EndOfState)
    out.add("file-precopy.head.bin", "file-precopy", data, 0, head)
    out.add("file-precopy.tail.bin", "file-precopy", data, first_full, len(data))
    out.files["vmdesc-pc-i440fx-7.2.json"] = vmdesc.json_bytes
    out.manifest["vmdesc-pc-i440fx-7.2.json"] = {
        "capture": "file-precopy",
        "start": len(data) - len(vmdesc.json_bytes),
        "end": len(data),
        "capture_bytes": len(data),
        "bytes": len(vmdesc.json_bytes),
        "sha256": hashlib.sha256(vmdesc.json_bytes).hexdigest(),
    }
    return {
        "machine_type": machine,
        "bytes": len(data),
        "eof_offset": eof.offset,
        "vmdescription_offset": vmdesc.offset,
        **ram_facts(p, info),
    }


def booted_pair(workdir: Path, image: Path) -> AbstractAsyncContextManager[Pair]:
    args = guest_args(image)
    return vm_pair(workdir, mem_mib=MEM_MIB, src_extra=args, dst_extra=args)


async def precopy_return_path(workdir: Path, image: Path, out: Slices) -> dict[str, Any]:
    vm_dir = workdir / "rp"
    vm_dir.mkdir()
    async with booted_pair(vm_dir, image) as pair:
        await wait_booted(pair.src)
        info, conns = await migrate_recorded(pair, caps={"return-path": True})
    (main,) = conns
    p = parse_main(bytes(main.up))
    down = bytes(main.down)
    out.add("precopy-rp.returnpath.bin", "precopy-rp (dst->src)", down, 0, len(down))
    facts = ram_facts(p, info)
    facts["return_path"] = rp_facts(down)
    return facts


def channel_id(conn: Conn) -> int:
    data = bytes(conn.up)
    parser = MultifdParser(page_size=PAGE)
    init = next(e for e in parser.feed(data[:64]) if isinstance(e, MultifdInit))
    return init.channel_id


async def multifd(workdir: Path, image: Path, out: Slices) -> dict[str, Any]:
    vm_dir = workdir / "multifd"
    vm_dir.mkdir()
    async with booted_pair(vm_dir, image) as pair:
        await wait_booted(pair.src)
        info, conns = await migrate_recorded(
            pair, caps={"multifd": True}, params={"multifd_channels": 2}
        )
    (main,) = (c for c in conns if c.kind == "main")
    p = parse_main(bytes(main.up))
    facts = ram_facts(p, info)
    channels: dict[int, dict[str, Any]] = {}
    for conn in (c for c in conns if c.kind == "multifd"):
        data = bytes(conn.up)
        parser = MultifdParser(page_size=PAGE)
        events = parser.feed(data) + parser.feed_eof()
        packets = [e for e in events if isinstance(e, MultifdPacket)]
        cid = channel_id(conn)
        channels[cid] = {
            "bytes": len(data),
            "packets": len(packets),
            "sync_packets": sum(e.sync for e in packets),
            "normal_pages": parser.stats.normal_pages,
        }
        if cid == 0:
            loaded = next(e for e in packets if e.normal_pages)
            cut = loaded.offset + MULTIFD_PACKET_HEAD + 8 * loaded.pages_alloc
            assert len(data) - cut >= loaded.normal_pages * PAGE
            out.add("multifd-ch0.first-packets.bin", "multifd channel 0", data, 0, cut)
    facts["multifd_channels"] = {str(k): v for k, v in sorted(channels.items())}
    return facts


async def postcopy(workdir: Path, image: Path, out: Slices) -> dict[str, Any]:
    # Now and then (load?) precopy converges before the switch, or the destination asks for no
    # page: try again, a few times, for a run that shows both the switch and REQ_PAGES.
    for attempt in range(1, 6):
        vm_dir = workdir / f"postcopy-{attempt}"
        vm_dir.mkdir()
        async with booted_pair(vm_dir, image) as pair:
            await wait_booted(pair.src)
            info, conns = await postcopy_recorded(pair)
        (main,) = conns
        if info["ram"]["postcopy-requests"] > 0:
            break
        print(f"postcopy: attempt {attempt} had no page requests: {info}", file=sys.stderr)
    else:
        raise RuntimeError("postcopy: no run with page requests in 5 attempts")
    up, down = bytes(main.up), bytes(main.down)
    p = parse_main(up)
    head = head_end(p)
    no_ram_pages_in(p, 0, head)
    out.add("postcopy.head.bin", "postcopy (src->dst)", up, 0, head)
    if not p.of(ev.PostcopyRamDiscard):
        raise RuntimeError(f"postcopy: no POSTCOPY_RAM_DISCARD, did it switch? {info}")
    discard = p.of(ev.PostcopyRamDiscard)[0]
    (end,) = p.of(ev.PackagedEnd)
    after = next(e for e in p.of(ev.Ping) if e.offset >= end.offset)
    no_ram_pages_in(p, discard.offset, after.offset + PING_RECORD)
    out.add(
        "postcopy.switch.bin", "postcopy (src->dst)", up, discard.offset, after.offset + PING_RECORD
    )
    out.add("postcopy.returnpath.bin", "postcopy (dst->src)", down, 0, len(down))
    (pkg,) = p.of(ev.Packaged)
    return {
        **ram_facts(p, info),
        "bytes": len(up),
        "packaged_length": pkg.length,
        "discards": [(e.block, [list(r) for r in e.ranges]) for e in p.of(ev.PostcopyRamDiscard)],
        "return_path": rp_facts(down),
    }


async def postcopy_recorded(pair: Pair) -> tuple[dict[str, Any], list[Conn]]:
    """Precopy at 8 MiB/s that cannot converge (1 ms downtime), postcopy after 4 dirty syncs
    at 1 MiB/s, slow enough that the running destination asks for pages before they come.

    The destination is told to ``cont`` while still incoming, so it runs the guest as soon as
    postcopy starts: the guest touches pages it does not have yet and asks for them on the
    return path (REQ_PAGES). Its RAM then moves on, so there is no RAM comparison here.
    """
    await pair.configure(
        {"postcopy-ram": True},
        {"max_bandwidth": 8 * MiB, "downtime_limit": 1, "max_postcopy_bandwidth": MiB},
    )
    await pair.dst.cmd("cont")  # incoming: sets autostart, the guest starts at POSTCOPY_RUN
    async with recording_relay(pair.dst_port) as (port, conns):
        await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:
            info = await pair.src.query_migrate()
            if info.get("ram", {}).get("dirty-sync-count", 0) >= 4:
                break
            if info.get("status") not in {"setup", "active"} or time.monotonic() > deadline:
                raise RuntimeError(f"postcopy: precopy did not make 4 dirty syncs: {info}")
            await asyncio.sleep(0.05)
        await pair.src.cmd("migrate-start-postcopy")
        info = await wait_migration(pair.src, timeout_s=60)
        assert info["status"] == "completed", info
        dst = await wait_migration(pair.dst, timeout_s=30, statuses={"completed", "failed"})
        assert dst["status"] == "completed", dst
    status = await pair.dst.cmd("query-status")
    assert status["status"] == "running", status
    return info, conns


# -- main -----------------------------------------------------------------------------------
def qemu_version() -> str:
    out = subprocess.run(
        [qemu_binary(), "--version"], check=True, capture_output=True, text=True
    ).stdout
    return out.splitlines()[0].strip()


async def make_all(workdir: Path) -> tuple[Slices, dict[str, Any]]:
    image = floppy(workdir)
    out = Slices()
    facts = {}
    for name, run in (
        ("file-precopy", file_precopy),
        ("precopy-rp", precopy_return_path),
        ("multifd", multifd),
        ("postcopy", postcopy),
    ):
        t0 = time.monotonic()
        facts[name] = await run(workdir, image, out)
        print(f"{name}: captured in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return out, facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help="directory for the slices")
    ap.add_argument(
        "--any-version", action="store_true", help="do not insist on QEMU 7.2 (for trying)"
    )
    args = ap.parse_args(argv)
    version = qemu_version()
    print(version)
    if " 7.2." not in version and not args.any_version:
        print(f"make_fixtures: want QEMU 7.2 for qemu-7.2/, found {version!r}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="migtap-fixtures-") as tmp:
        slices, facts = asyncio.run(make_all(Path(tmp)))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in sorted(slices.files.items()):
        (args.out / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")
    manifest = {
        "qemu": version,
        "machine": "pc (pc-i440fx-7.2), TCG, 32 MiB, -nodefaults, floppy boot sector",
        "command": "python scripts/make_fixtures.py",
        "files": slices.manifest,
        "captures": facts,
    }
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    (args.out / "manifest.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
