"""``migtap analyze FILE|DIR``: parse a captured stream and print what it holds.

FILE is a main-channel stream (a capture's ``src-to-dst.bin``, or any file QEMU migrated to).
DIR is a capture directory: its main channel, and also its multifd and postcopy-preempt channel
files, whose pages are added to the RAM totals (on 10.0 every page travels on multifd).
Files are read in chunks through the sans-IO parsers, so memory stays bounded whatever their
size (page payloads are skipped; device sections and the vmdesc are kept, as the parser does).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from migtap.annotate.render import DeviceState as DecodedDevice
from migtap.annotate.render import RamState
from migtap.annotate.render import state_dump as render_state
from migtap.annotate.vmsd import VmDescription as Desc
from migtap.annotate.walk import decode_section
from migtap.errors import MigtapError, StreamError
from migtap.sinks.capture import SRC_TO_DST, channel_file_name
from migtap.wire import events as ev
from migtap.wire.constants import SECTION_FOOTER_SIZE, SectionType
from migtap.wire.generation import GenerationTracker
from migtap.wire.multifd import MultifdInit, MultifdPacket, MultifdParser, ResentPages
from migtap.wire.preempt import PreemptParser
from migtap.wire.stream import StreamParser

if TYPE_CHECKING:
    from collections.abc import Iterable

    from migtap.wire.ram import RamStats, RoundStats

CHUNK_SIZE: Final = 1 << 20
MAIN_FILE: Final = "src-to-dst.bin"
#: Kinds of channel whose capture files hold pages (``conn-<index>-<kind>.src-to-dst.bin``).
CHANNEL_KINDS: Final = ("multifd", "postcopy-preempt")
DUMPS: Final = ("sections", "ram", "desc", "state")
_SHORT_KIND: Final = {
    SectionType.QEMU_VM_SECTION_START: "START",
    SectionType.QEMU_VM_SECTION_PART: "PART",
    SectionType.QEMU_VM_SECTION_END: "END",
    SectionType.QEMU_VM_SECTION_FULL: "FULL",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        type=Path,
        help="raw main-channel stream (src-to-dst.bin), or a capture directory (all channels)",
    )
    parser.add_argument(
        "--dump",
        action="append",
        choices=DUMPS,
        help="what to print (repeatable; default: sections and ram). "
        "desc: the vmdesc JSON; state: device state decoded with the vmdesc, "
        "shaped like QEMU's analyze-migration.py -d state",
    )
    parser.add_argument("--json", action="store_true", help="one machine-readable JSON document")
    parser.add_argument(
        "--vmdesc", type=Path, help="decode with this vmdesc JSON instead of the stream's own"
    )
    parser.add_argument(
        "--page-size",
        type=int,
        default=None,
        help="target page size (default: the --vmdesc page_size, else 4096)",
    )
    parser.add_argument(
        "--start",
        choices=("header", "records"),
        default="header",
        help="'records' for a slice that starts between two records (no QEVM header)",
    )
    parser.add_argument(
        "--offset", type=int, default=0, help="stream offset of the file's first byte"
    )


@dataclass(slots=True)
class _Row:
    offset: int
    type: str
    section_id: int | None = None
    name: str | None = None
    instance_id: int | None = None
    version_id: int | None = None
    size: int | None = None


@dataclass(slots=True)
class ChannelAnalysis:
    """One multifd or postcopy-preempt channel file of a capture."""

    file: str
    kind: str
    channel_id: int | None = None  # multifd channel id from its init message
    packets: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    length: int = 0
    error: StreamError | None = None


@dataclass(slots=True)
class Analysis:
    """What one pass over the stream collected."""

    rows: list[_Row] = field(default_factory=list)
    devices: list[ev.DeviceState] = field(default_factory=list)
    ram_blocks: list[ev.RamBlockList] = field(default_factory=list)
    vmdesc: ev.VmDescription | None = None
    error: StreamError | None = None
    ram: RamStats | None = None
    length: int = 0
    generation: GenerationTracker = field(default_factory=GenerationTracker)
    channels: list[ChannelAnalysis] = field(default_factory=list)  # other channels' files
    resent: ResentPages = field(default_factory=ResentPages)  # 7.2 multifd repeats
    unread_channels: int = 0  # channel files beside a FILE argument, not read
    page_size: int = 4096  # as the main channel's parser ended up with

    def all_channels(self) -> dict[str, int]:
        """RAM pages on every channel read, counted as QEMU counts them (``query-migrate``)."""
        total = self.ram.total if self.ram is not None else None
        normal = (total.normal_pages if total else 0) + sum(c.normal_pages for c in self.channels)
        return {
            "normal_pages": normal - self.resent.count,
            "normal_pages_resent": self.resent.count,
            "zero_pages": (total.zero_pages if total else 0)
            + sum(c.zero_pages for c in self.channels),
            "xbzrle_pages": total.xbzrle_pages if total else 0,
            "compressed_pages": total.compressed_pages if total else 0,
        }


def channel_files(directory: Path) -> list[tuple[str, Path]]:
    """``(kind, path)`` of a capture directory's multifd and postcopy-preempt channel files, in
    connection order."""
    found = []
    for kind in CHANNEL_KINDS:
        suffix = channel_file_name(0, kind, SRC_TO_DST).removeprefix("conn-0")
        for path in directory.glob(f"conn-*{suffix}"):
            index = path.name.removeprefix("conn-").removesuffix(suffix)
            if index.isdigit():
                found.append((int(index), kind, path))
    return [(kind, path) for _, kind, path in sorted(found)]


def analyze_channel(path: Path, kind: str, a: Analysis, *, page_size: int) -> ChannelAnalysis:
    """Count the pages of one multifd or postcopy-preempt channel file into ``a``."""
    blocks = a.ram_blocks[-1].blocks if a.ram_blocks else ()
    parser: MultifdParser | PreemptParser = (
        MultifdParser(page_size=page_size)
        if kind == "multifd"
        else PreemptParser(page_size, blocks)
    )
    ch = ChannelAnalysis(path.name, kind)
    a.channels.append(ch)
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                _count_channel(ch, parser.feed(chunk), a.resent)
                ch.length += len(chunk)
        _count_channel(ch, parser.feed_eof(), a.resent)
    except StreamError as exc:
        _count_channel(ch, getattr(parser, "events_before_error", []), a.resent)
        ch.error = exc
    return ch


def _count_channel(ch: ChannelAnalysis, events: Iterable[object], resent: ResentPages) -> None:
    for e in events:
        if isinstance(e, MultifdPacket):
            ch.packets += 1
            ch.normal_pages += e.normal_pages
            ch.zero_pages += e.zero_pages
            resent.note(e)
        elif isinstance(e, MultifdInit):
            ch.channel_id = e.channel_id
        elif isinstance(e, ev.RamPages):
            ch.normal_pages += e.normal
            ch.zero_pages += e.zero


class _Collector:
    def __init__(self) -> None:
        self.a = Analysis()
        self._open: _Row | None = None

    def add(self, events: Iterable[ev.Event]) -> None:
        for e in events:
            self._one(e)

    def _close(self, end: int) -> None:
        if self._open is not None:
            self._open.size = end - self._open.offset
            self._open = None

    def _one(self, e: ev.Event) -> None:  # noqa: C901 - one branch per event kind
        a = self.a
        a.generation.observe(e)
        if isinstance(e, ev.SectionHeader):
            row = _Row(e.offset, _SHORT_KIND.get(e.kind, e.kind.name), e.section_id, e.idstr,
                       e.instance_id, e.version_id)  # fmt: skip
            a.rows.append(row)
            self._open = row
        elif isinstance(e, ev.SectionFooter):
            self._close(e.offset + SECTION_FOOTER_SIZE)
        elif isinstance(e, ev.RamEndOfSection):
            self._close(e.offset + 8)  # refined by the footer, if any
            a.rows[-1].size = e.offset + 8 - a.rows[-1].offset
        elif isinstance(e, ev.DeviceState):
            a.devices.append(e)
        elif isinstance(e, ev.RamBlockList):
            a.ram_blocks.append(e)
        elif isinstance(e, ev.Command | ev.Ping | ev.PostcopyAdvise | ev.PostcopyRamDiscard
                        | ev.RecvBitmapRequest | ev.Packaged):  # fmt: skip
            a.rows.append(_Row(e.offset, "COMMAND", name=_command_text(e)))
        elif isinstance(e, ev.StreamHeader):
            a.rows.append(_Row(e.offset, "HEADER", size=8))
        elif isinstance(e, ev.Configuration):
            a.rows.append(_Row(e.offset, "CONFIG", name=e.machine_type))
        elif isinstance(e, ev.EndOfState):
            a.rows.append(_Row(e.offset, "EOF", size=1))
        elif isinstance(e, ev.VmDescription):
            a.vmdesc = e
            a.rows.append(_Row(e.offset, "VMDESC", size=5 + len(e.json_bytes)))
        elif isinstance(e, ev.Unparsed):
            a.rows.append(_Row(e.offset, "UNPARSED", name=e.reason))
        elif isinstance(e, ev.PackagedEnd):
            a.rows.append(_Row(e.offset, "PKG END"))


def _command_text(e: ev.Event) -> str:
    text = type(e).__name__
    if isinstance(e, ev.Ping):
        text = f"PING {e.value}"
    elif isinstance(e, ev.PostcopyAdvise):
        text = f"POSTCOPY_ADVISE {e.ram_pagesize_summary} {e.target_page_size}"
    elif isinstance(e, ev.PostcopyRamDiscard):
        text = f"POSTCOPY_RAM_DISCARD {e.block} {len(e.ranges)} ranges"
    elif isinstance(e, ev.RecvBitmapRequest):
        text = f"RECV_BITMAP {e.block}"
    elif isinstance(e, ev.Packaged):
        text = f"PACKAGED {e.length} bytes"
    elif isinstance(e, ev.Command):
        text = e.cmd.name.removeprefix("MIG_CMD_")
    return text


def analyze_file(
    path: Path, *, page_size: int = 4096, start: str = "header", offset: int = 0
) -> Analysis:
    """Parse ``path`` in chunks; a stream error ends the pass and is kept in ``error``."""
    parser = StreamParser(page_size, start="records" if start == "records" else "header",
                          offset=offset)  # fmt: skip
    col = _Collector()
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                col.add(parser.feed(chunk))
                col.a.length += len(chunk)
        col.add(parser.feed_eof())
    except StreamError as exc:
        col.add(parser.events_before_error)
        col.a.error = exc
    col.a.ram = parser.ram_stats
    col.a.page_size = parser.page_size
    return col.a


def analyze_path(
    path: Path, *, page_size: int = 4096, start: str = "header", offset: int = 0
) -> Analysis:
    """A main-channel file, or a capture directory with all its channels."""
    if not path.is_dir():
        a = analyze_file(path, page_size=page_size, start=start, offset=offset)
        if path.name == MAIN_FILE:
            a.unread_channels = len(channel_files(path.parent))
        return a
    a = analyze_file(path / MAIN_FILE, page_size=page_size, start=start, offset=offset)
    for kind, channel in channel_files(path):
        analyze_channel(channel, kind, a, page_size=a.page_size)
    return a


# -- output ------------------------------------------------------------------------------------
def _fmt(v: int | None, hexa: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:#x}" if hexa else str(v)


def write_origin(a: Analysis, out: TextIO) -> None:
    """One line: which QEMU wrote the stream, as far as the stream shows, and why."""
    est = a.generation.source
    signs = "; ".join(e.sign for e in est.evidence) or "no version signs"
    out.write(f"source QEMU: {est.text()} ({signs})\n")


def write_sections(a: Analysis, out: TextIO) -> None:
    out.write(f"{'offset':>12}  {'type':<8} {'id':>4}  {'name':<32} {'inst':>10} {'ver':>4} "
              f"{'size':>10}\n")  # fmt: skip
    out.writelines(
        f"{r.offset:#12x}  {r.type:<8} {_fmt(r.section_id):>4}  {r.name or '':<32} "
        f"{_fmt(r.instance_id):>10} {_fmt(r.version_id):>4} {_fmt(r.size):>10}\n"
        for r in a.rows
    )


_ROUND_COLS: Final = ("normal", "zero", "xbzrle", "compressed")


def write_ram(a: Analysis, out: TextIO) -> None:
    stats = a.ram
    if stats is None:
        return
    out.write(f"RAM: {stats.sections} sections, {stats.eos} EOS, "
              f"{stats.multifd_flushes} multifd flushes, {len(stats.rounds)} rounds\n")  # fmt: skip
    head = "".join(f" {c + ' pages':>17} {c + ' bytes':>17}" for c in _ROUND_COLS)
    out.write(f"{'round':>6} {'first offset':>14}{head}\n")
    for r in [*stats.rounds, stats.total]:
        name = str(r.round) if r.round else "total"
        cells = "".join(
            f" {getattr(r, c + '_pages'):>17} {getattr(r, c + '_bytes'):>17}" for c in _ROUND_COLS
        )
        out.write(f"{name:>6} {_fmt(r.first_offset, hexa=True):>14}{cells}\n")
    if a.unread_channels:
        out.write(f"({a.unread_channels} more channel files beside this one: pass the capture "
                  "directory to count their pages too)\n")  # fmt: skip
    if not a.channels:
        return
    out.write(f"{'channel file':<36} {'kind':<17} {'id':>3} {'packets':>9} "
              f"{'normal pages':>13} {'zero pages':>11} {'bytes':>14}\n")  # fmt: skip
    out.writelines(
        f"{c.file:<36} {c.kind:<17} {_fmt(c.channel_id):>3} {c.packets:>9} "
        f"{c.normal_pages:>13} {c.zero_pages:>11} {c.length:>14}\n"
        for c in a.channels
    )
    t = a.all_channels()
    resent = f" ({t['normal_pages_resent']} sent twice, counted once)" if a.resent.count else ""
    out.write(f"RAM pages, all channels: normal {t['normal_pages']}{resent}, "
              f"zero {t['zero_pages']}, xbzrle {t['xbzrle_pages']}, "
              f"compressed {t['compressed_pages']}\n")  # fmt: skip


def _round_json(r: RoundStats) -> dict[str, Any]:
    return asdict(r)


def _vmdesc_obj(a: Analysis, vmdesc_file: Path | None) -> Any:  # noqa: ANN401 - JSON value
    if vmdesc_file is not None:
        return json.loads(vmdesc_file.read_bytes())
    if a.vmdesc is None:
        raise MigtapError("the stream has no VMDESCRIPTION (postcopy, suppress-vmdesc, cut "
                          "short?); pass one with --vmdesc")  # fmt: skip
    return a.vmdesc.desc


def state_dump(a: Analysis, desc_obj: Any, err: TextIO) -> dict[str, Any]:  # noqa: ANN401
    """Decode every device section with the vmdesc: analyze-migration.py -d state's shape."""
    desc = Desc.from_json(desc_obj)
    sections: list[DecodedDevice | RamState] = []
    ram_ids = {b.section_id for b in a.ram_blocks}
    for blocks in a.ram_blocks:
        sizes = {b.idstr: b.used_length for b in blocks.blocks}
        sections.append(RamState(blocks.section_id, sizes))
    for d in a.devices:
        full = d.kind == SectionType.QEMU_VM_SECTION_FULL
        if d.idstr is None or not full or d.section_id in ram_ids:
            continue
        dd = desc.find(d.idstr, d.instance_id or 0)
        if dd is None:
            err.write(f"migtap analyze: no vmdesc entry for {d.idstr} ({d.instance_id})\n")
            continue
        decoded = decode_section(dd, d.payload, base_offset=d.payload_offset)
        if decoded.consumed != len(d.payload):
            err.write(
                f"migtap analyze: {d.idstr} ({d.instance_id}): the vmdesc uses "
                f"{decoded.consumed} bytes, the footer scan found {len(d.payload)}\n"
            )
        sections.append(DecodedDevice(d.section_id, decoded))
    return render_state(sections)


def _error_json(e: StreamError) -> dict[str, Any]:
    return {"type": type(e).__name__, "message": str(e), "offset": e.offset, "state": e.state}


def run(args: argparse.Namespace) -> int:
    """Entry point of ``migtap analyze``; returns the exit code."""
    out: TextIO = sys.stdout
    err: TextIO = sys.stderr
    dumps: list[str] = args.dump or ["sections", "ram"]
    page_size = args.page_size
    try:
        if page_size is None and args.vmdesc is not None:
            ps = json.loads(args.vmdesc.read_bytes()).get("page_size")
            page_size = ps if isinstance(ps, int) else None
        a = analyze_path(args.file, page_size=page_size or 4096, start=args.start,
                         offset=args.offset)  # fmt: skip
        if not args.json and {"sections", "ram"} & set(dumps):  # not before JSON dumps
            write_origin(a, out)
        doc = _render(a, dumps, args, out, err)
    except (OSError, ValueError, MigtapError) as exc:
        err.write(f"migtap analyze: {args.file}: {exc}\n")
        return 1
    if args.json:
        json.dump(doc, out, indent=2)
        out.write("\n")
    failed = [(str(args.file), a.error)] if a.error is not None else []
    failed += [(c.file, c.error) for c in a.channels if c.error is not None]
    err.writelines(f"migtap analyze: {name}: {error}\n" for name, error in failed)
    return 1 if failed else 0


def _render(a: Analysis, dumps: list[str], args: argparse.Namespace, out: TextIO,
            err: TextIO) -> dict[str, Any]:  # fmt: skip
    doc: dict[str, Any] = {"file": str(args.file), "length": a.length}
    doc["error"] = _error_json(a.error) if a.error is not None else None
    doc["qemu"] = {"machine_type": a.generation.machine_type, **a.generation.source.as_dict()}
    for what in dumps:
        if what == "sections":
            doc["sections"] = [asdict(r) for r in a.rows]
            if not args.json:
                write_sections(a, out)
        elif what == "ram" and a.ram is not None:
            doc["ram"] = {
                "rounds": [_round_json(r) for r in a.ram.rounds],
                "total": _round_json(a.ram.total),
                "sections": a.ram.sections,
                "eos": a.ram.eos,
                "multifd_flushes": a.ram.multifd_flushes,
                "all_channels": a.all_channels(),
            }
            doc["channels"] = [
                {
                    **{f.name: getattr(c, f.name) for f in fields(c) if f.name != "error"},
                    "error": None if c.error is None else _error_json(c.error),
                }
                for c in a.channels
            ]
            if not args.json:
                write_ram(a, out)
        elif what == "desc":
            doc["vmdesc"] = _vmdesc_obj(a, args.vmdesc)
            if not args.json:
                json.dump(doc["vmdesc"], out, indent=2)
                out.write("\n")
        elif what == "state":
            doc["state"] = state_dump(a, _vmdesc_obj(a, args.vmdesc), err)
            if not args.json:
                out.write(json.dumps(doc["state"], indent=4, separators=(",", ": ")) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="migtap analyze", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
