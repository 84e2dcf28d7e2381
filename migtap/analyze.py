"""``migtap analyze FILE|DIR``: parse a captured stream and print what it holds.

FILE is a main-channel stream (a capture's ``src-to-dst.bin``, or any file QEMU migrated to).
DIR is a capture directory: every channel file of it (main channel both ways, multifd and
postcopy-preempt channels) goes through the same parsers, the same tap and the same session
model as a live migration does, so the summary equals the live one by construction. With the
capture's index (``events.jsonl``), events of the channels are applied in the order, and at
the times, the live tap applied them; with ``session.json``, the channels carry their live
facts (kinds, bytes, how they closed). Files are read in chunks: memory stays bounded whatever
their size (page payloads are skipped; device sections and the vmdesc are kept, as live).
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import structlog

from migtap.annotate.render import DeviceState as DecodedDevice
from migtap.annotate.render import RamState
from migtap.annotate.render import state_dump as render_state
from migtap.annotate.vmsd import VmDescription as Desc
from migtap.annotate.walk import decode_section
from migtap.capture_format import channel_file_name, event_kind, read_index, read_session
from migtap.errors import MigtapError, StreamError
from migtap.model import Migration, summary_fields
from migtap.observers.base import Observer
from migtap.tap import ChannelTap, SessionTap
from migtap.vocabulary import ChannelInfo, ChannelKind, Direction, KernelView
from migtap.wire import events as ev
from migtap.wire.constants import SECTION_FOOTER_SIZE, SectionType
from migtap.wire.stream import StreamParser
from migtap.wire.vmdesc import parse_vmdesc

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from migtap.model import DeviceResult
    from migtap.wire.generation import GenerationTracker
    from migtap.wire.ram import RamStats, RoundStats

CHUNK_SIZE: Final = 1 << 20
MAIN_FILE: Final = "src-to-dst.bin"
#: Kinds of channel whose capture files hold pages (``conn-<index>-<kind>.src-to-dst.bin``).
CHANNEL_KINDS: Final = (ChannelKind.MULTIFD, ChannelKind.POSTCOPY_PREEMPT)
DUMPS: Final = ("sections", "ram", "desc", "state")
#: Summary keys that only a capture's index and session.json can tell (None without them).
LIVE_ONLY_KEYS: Final = ("outcome", "duration_s", "wire_downtime_ms", "capture_dir")
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
    """What one pass over a file or a capture collected."""

    migration: Migration
    rows: list[_Row] = field(default_factory=list)
    devices: list[ev.DeviceState] = field(default_factory=list)
    ram_blocks: list[ev.RamBlockList] = field(default_factory=list)
    vmdesc: ev.VmDescription | None = None
    error: StreamError | None = None
    ram: RamStats | None = None
    length: int = 0
    channels: list[ChannelAnalysis] = field(default_factory=list)  # other channels' files
    unread_channels: int = 0  # channel files beside a FILE argument, not read
    page_size: int = 4096  # as the main channel's parser ended up with
    live_facts: bool = False  # session.json and events.jsonl were read: timings and outcome
    capture_dir: str | None = None

    @property
    def generation(self) -> GenerationTracker:
        return self.migration.generation

    def all_channels(self) -> dict[str, int]:
        """RAM pages on every channel read, counted as QEMU counts them (``query-migrate``)."""
        m = self.migration
        return {
            "normal_pages": m.normal - m.resent.count,
            "normal_pages_resent": m.resent.count,
            "zero_pages": m.zero,
            "xbzrle_pages": m.xbzrle,
            "compressed_pages": m.compressed,
        }

    def summary(self) -> dict[str, object]:
        """The ``migration_summary`` of this capture, key for key as the live one."""
        fields_ = summary_fields(self.migration, capture_dir=self.capture_dir)
        if not self.live_facts:
            for key in LIVE_ONLY_KEYS:
                fields_[key] = None
        return fields_


class _Collector(Observer):
    """Collects the section table, the device sections and the per-channel page counts."""

    def __init__(self, a: Analysis) -> None:
        super().__init__(a.migration)
        self.a = a
        self._open: _Row | None = None
        self.by_channel: dict[int, ChannelAnalysis] = {}

    def on_event(self, channel: ChannelInfo, direction: Direction, event: ev.Event) -> None:
        if direction is not Direction.SRC_TO_DST:
            return
        if channel.kind is ChannelKind.MAIN:
            self._main(event)
            return
        ch = self.by_channel.get(channel.index)
        if ch is None:
            return
        if isinstance(event, ev.MultifdPacket):
            ch.packets += 1
            ch.normal_pages += event.normal_pages
            ch.zero_pages += event.zero_pages
        elif isinstance(event, ev.MultifdInit):
            ch.channel_id = event.channel_id
        elif isinstance(event, ev.RamPages):
            ch.normal_pages += event.normal
            ch.zero_pages += event.zero

    def _close(self, end: int) -> None:
        if self._open is not None:
            self._open.size = end - self._open.offset
            self._open = None

    def _main(self, e: ev.Event) -> None:  # noqa: C901 - one branch per event kind
        a = self.a
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


# -- the capture's files, replayed ---------------------------------------------------------------


@dataclass(slots=True)
class _File:
    """One direction of one channel, as a file of the capture."""

    tap: ChannelTap
    direction: Direction
    path: Path
    analysis: ChannelAnalysis | None = None  # other channels than main
    is_main: bool = False
    ended: bool = False  # the whole file was fed (a failure then is a stream cut at its end)


def channel_files(directory: Path) -> list[tuple[str, Path]]:
    """``(kind, path)`` of a capture directory's multifd and postcopy-preempt channel files, in
    connection order (by their names; ``session.json`` names them when it exists)."""
    found = []
    for kind in CHANNEL_KINDS:
        suffix = channel_file_name(0, kind.value, Direction.SRC_TO_DST.value).removeprefix("conn-0")
        for path in directory.glob(f"conn-*{suffix}"):
            index = path.name.removeprefix("conn-").removesuffix(suffix)
            if index.isdigit():
                found.append((int(index), kind.value, path))
    return [(kind, path) for _, kind, path in sorted(found)]


def _wall(doc: dict[str, Any], key_t: str, key_iso: str) -> float | None:
    value = doc.get(key_t)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    iso = doc.get(key_iso)
    if isinstance(iso, str):
        try:
            return datetime.fromisoformat(iso).timestamp()
        except ValueError:
            return None
    return None


def _infos_from_session(doc: dict[str, Any]) -> list[tuple[ChannelInfo, dict[str, Any]]]:
    out = []
    for ch in doc.get("channels", []):
        try:
            kind = ChannelKind(ch.get("kind") or "unknown")
        except ValueError:
            kind = ChannelKind.UNKNOWN
        info = ChannelInfo(
            index=int(ch["index"]),
            pipe_id=int(ch.get("pipe_id") or 0),
            kind=kind,
            source=ch.get("source"),
            destination=ch.get("destination"),
            started_wall=0.0,
            bytes_src_to_dst=int(ch.get("bytes_src_to_dst") or 0),
            bytes_dst_to_src=int(ch.get("bytes_dst_to_src") or 0),
            close_reason=ch.get("close_reason"),
            first_closed=ch.get("first_closed"),
            reset_by=ch.get("reset_by"),
            kernel_view=KernelView.from_dict(ch.get("kernel_view")),
        )
        out.append((info, ch.get("files") or {}))
    return out


def _quiet_logger() -> Any:  # noqa: ANN401 - a structlog BoundLogger
    """Offline, the tap's live log lines (progress, detaches) would only repeat what the
    analysis prints; drop them."""
    return structlog.wrap_logger(structlog.ReturnLogger())


class _Replay:
    """Drives a capture's files through one ``SessionTap`` (module docstring)."""

    def __init__(self, a: Analysis, tap: SessionTap, collector: _Collector) -> None:
        self.a = a
        self.tap = tap
        self.collector = collector
        self.files: list[_File] = []
        #: ``(ch, dir, offset, kind)`` -> (index line, time): the live order of events.
        self.order: dict[tuple[int, str, int | None, str], tuple[int, float]] = {}
        self.first_line: dict[tuple[int, str], int] = {}

    def load_index(self, path: Path) -> None:
        for line, record in enumerate(read_index(path)):
            ch, dir_ = record.get("ch"), record.get("dir")
            if not isinstance(ch, int) or not isinstance(dir_, str):
                continue
            key = (ch, dir_, record.get("offset"), str(record.get("kind")))
            t = record.get("t")
            self.order.setdefault(key, (line, float(t) if isinstance(t, int | float) else 0.0))
            self.first_line.setdefault((ch, dir_), line)

    def _events(self, f: _File) -> Iterator[tuple[ev.Event | Exception, int, float]]:
        """The file's events with their place in the live order (index line) and time; an
        exception item where the parser stopped."""
        info = f.tap.info
        dir_ = f.direction.value
        pos, t = self.first_line.get((info.index, dir_), -1), self.a.migration.started
        if f.tap.parser(f.direction) is None:
            self.tap.start_parser(f.tap)
        length = 0
        with f.path.open("rb") as fh:
            while True:
                chunk = fh.read(CHUNK_SIZE)
                f.ended = not chunk
                events, failure = self.tap.parse(f.tap, f.direction, chunk or None)
                length += len(chunk)
                if f.is_main:
                    self.a.length = length
                elif f.analysis is not None:
                    f.analysis.length = length
                for event in events:
                    key = (info.index, dir_, getattr(event, "offset", None), event_kind(event))
                    found = self.order.get(key)
                    if found is not None:
                        pos, t = max(pos, found[0]), found[1]
                    yield event, pos, t
                if failure is not None:
                    yield failure, pos, t
                    return
                if not chunk:
                    f.tap.detach(f.direction)  # at its end; nothing more to feed
                    return

    def run(self) -> None:
        # (place in the live order, file number, tie-breaker); a file starts when its turn comes
        heap: list[tuple[int, int, int]] = []
        for n, f in enumerate(self.files):
            start = self.first_line.get((f.tap.info.index, f.direction.value))
            # Without an index line, a file follows the ones that have one, in file order.
            heap.append((start if start is not None else 1 << 62, n, 0))
        heapq.heapify(heap)
        seq = 0
        streams: dict[int, Iterator[tuple[ev.Event | Exception, int, float]]] = {}
        pending: dict[int, tuple[ev.Event | Exception, int, float]] = {}
        while heap:
            _, n, _ = heapq.heappop(heap)
            f = self.files[n]
            if n not in streams:
                streams[n] = self._events(f)
            else:
                self._apply(f, *pending.pop(n))
            item = next(streams[n], None)
            if item is None:
                continue
            pending[n] = item
            seq += 1
            heapq.heappush(heap, (item[1], n, seq))

    def _apply(self, f: _File, item: ev.Event | Exception, pos: int, t: float) -> None:
        del pos
        if isinstance(item, Exception):
            self.tap.parser_failed(f.tap, f.direction, item, at_eof=f.ended)
            if isinstance(item, StreamError):
                if f.is_main:
                    self.a.error = item
                elif f.analysis is not None:
                    f.analysis.error = item
            return
        self.tap.deliver(f.tap, f.direction, [item], t)


def analyze_path(
    path: Path,
    *,
    page_size: int = 4096,
    start: str = "header",
    offset: int = 0,
    vmdesc: Desc | None = None,
) -> Analysis:
    """A main-channel file, or a capture directory with all its channels (module docstring).
    A stream error ends that file's pass and is kept in ``error``."""
    directory = path if path.is_dir() else None
    session: dict[str, Any] | None = None
    if directory is not None and (directory / "session.json").is_file():
        session = read_session(directory / "session.json")
    started = _wall(session, "started_t", "session_started") if session else None
    migration = Migration(
        int(session.get("session_id") or 0) if session else 0,
        started=started or 0.0,
        page_size=page_size,
    )
    a = Analysis(migration)
    collector = _Collector(a)
    clock_now = [started or 0.0]
    tap = SessionTap(
        migration,
        [collector],
        vmdesc=vmdesc,
        clock=lambda: clock_now[0],
        live=False,
        logger=_quiet_logger(),
    )
    replay = _Replay(a, tap, collector)
    main_parser = StreamParser(page_size, start="records" if start == "records" else "header",
                               offset=offset)  # fmt: skip
    if directory is None:
        info = ChannelInfo(0, 0, ChannelKind.MAIN, None, None, 0.0)
        info.bytes_src_to_dst = path.stat().st_size
        ch = tap.add_channel(info)
        ch.s2d, ch.d2s = main_parser, None
        replay.files.append(_File(ch, Direction.SRC_TO_DST, path, is_main=True))
        if path.name == MAIN_FILE:
            a.unread_channels = len(channel_files(path.parent))
    else:
        _add_capture_channels(directory, session, tap, replay, main_parser)
        index = directory / "events.jsonl"
        if session is not None and index.is_file():
            replay.load_index(index)
            a.live_facts = True
            a.capture_dir = session.get("directory")
    replay.run()
    tap.finish()
    if a.live_facts and session is not None:
        ended = _wall(session, "ended_t", "session_ended")
        migration.end(ended if ended is not None else migration.now)
        for t in tap.channels:
            tap.channel_closed(t, t.info.close_reason, t.info.first_closed, t.info.reset_by)
    a.ram = main_parser.ram_stats
    a.page_size = main_parser.page_size
    return a


def _capture_channels(
    directory: Path, session: dict[str, Any] | None
) -> list[tuple[ChannelInfo, dict[str, Any]]]:
    """Every channel of a capture with its ``files`` entries: as session.json lists them, or
    else found by their names. Byte counts default to the files' sizes."""
    if session is not None and session.get("channels"):
        channels = _infos_from_session(session)
    else:
        main = ChannelInfo(0, 0, ChannelKind.MAIN, None, None, 0.0)
        channels = [(main, {d.value: {"file": f"{d.value}.bin"} for d in Direction})]
        for n, (kind, found) in enumerate(channel_files(directory), start=1):
            info = ChannelInfo(n, 0, ChannelKind(kind), None, None, 0.0)
            channels.append((info, {Direction.SRC_TO_DST.value: {"file": found.name}}))
    for info, files in channels:
        for d in Direction:
            path = _file_of(directory, files, d)
            if path is None:
                continue
            if d is Direction.SRC_TO_DST:
                info.bytes_src_to_dst = info.bytes_src_to_dst or path.stat().st_size
            else:
                info.bytes_dst_to_src = info.bytes_dst_to_src or path.stat().st_size
    return channels


def _file_of(directory: Path, files: dict[str, Any], direction: Direction) -> Path | None:
    entry = files.get(direction.value) or {}
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not (directory / name).is_file():
        return None
    return directory / name


def _add_capture_channels(
    directory: Path,
    session: dict[str, Any] | None,
    tap: SessionTap,
    replay: _Replay,
    main_parser: StreamParser,
) -> None:
    """Every channel of a capture joins the tap, and its parsed files the replay."""
    main_seen = False
    for info, files in _capture_channels(directory, session):
        ch = tap.add_channel(info)
        is_main = info.kind is ChannelKind.MAIN and not main_seen
        pages = info.kind in CHANNEL_KINDS
        if is_main:
            main_seen = True
            ch.s2d = main_parser
        elif pages:
            # Started when its turn comes: by then the main channel has told the page size and
            # the RAM blocks, as it had live.
            ch.s2d = None
        for d in Direction:
            path = _file_of(directory, files, d)
            parsed = ch.parser(d) is not None or (pages and d is Direction.SRC_TO_DST)
            if path is None or not parsed:
                continue
            analysis = None
            if not is_main and d is Direction.SRC_TO_DST:
                analysis = ChannelAnalysis(path.name, info.kind.value)
                replay.a.channels.append(analysis)
                replay.collector.by_channel[info.index] = analysis
            replay.files.append(_File(ch, d, path, analysis, is_main=is_main))


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
    resent = (
        f" ({t['normal_pages_resent']} sent twice, counted once)"
        if t["normal_pages_resent"]
        else ""
    )
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
    return parse_vmdesc(a.vmdesc).desc


def state_dump(
    a: Analysis,
    desc_obj: Any,  # noqa: ANN401 - a JSON value
    err: TextIO,
    *,
    decoded: Mapping[int, DeviceResult] | None = None,
) -> dict[str, Any]:
    """Decode every device section with the vmdesc: analyze-migration.py -d state's shape.
    ``decoded``: what the tap already decoded with the stream's own vmdesc, by section offset
    (used instead of decoding again)."""
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
        done = decoded.get(d.offset) if decoded is not None else None
        if done is not None and done.error is not None:
            raise done.error
        if done is not None and done.decoded is not None:
            section = done.decoded
        else:
            dd = desc.find(d.idstr, d.instance_id or 0)
            if dd is None:
                err.write(f"migtap analyze: no vmdesc entry for {d.idstr} ({d.instance_id})\n")
                continue
            section = decode_section(dd, d.payload, base_offset=d.payload_offset)
        if section.consumed != len(d.payload):
            err.write(
                f"migtap analyze: {d.idstr} ({d.instance_id}): the vmdesc uses "
                f"{section.consumed} bytes, the footer scan found {len(d.payload)}\n"
            )
        sections.append(DecodedDevice(d.section_id, section))
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
    doc["summary"] = a.summary()
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
            own = {r.offset: r for r in a.migration.devices if r.vmdesc == "stream"}
            reuse = own if args.vmdesc is None else None
            doc["state"] = state_dump(a, _vmdesc_obj(a, args.vmdesc), err, decoded=reuse)
            if not args.json:
                out.write(json.dumps(doc["state"], indent=4, separators=(",", ": ")) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="migtap analyze", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
