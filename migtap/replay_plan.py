"""The pure half of ``migtap replay``: a capture's main channel cut into records, the
capabilities a destination needs to load it, where a destination that stopped was, and what
QEMU's own error lines say about it (``docs/replay.md``).

Nothing here touches a socket or a process: ``migtap.relay.replay`` does the feeding and hands
back how far the destination read; this module turns that into the failing record.

* :func:`plan_units` cuts the stream into :class:`Unit` records from the parser's events: each
  top-level record (header, configuration, command, EOF, vmdesc), each device section whole
  (header, state and footer: QEMU peeks at the byte after a device's fields, so the footer must
  travel with it), and inside a RAM section each sub-record (block list, a run of pages, EOS,
  MULTIFD_FLUSH) with the section's header and footer as units of their own.
* :func:`read_plan` does it for a capture directory and adds what the destination needs
  (:class:`Needs`), or raises :class:`NotReplayable` (postcopy, RAM left out, no main channel).
* :func:`failing_unit` names the record from the feeder's progress, and :func:`explain` reads
  QEMU's error lines for the sub-record (a RAM block with both sizes, a device, a field).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

from migtap.capture_format import MAIN_FILES, SRC_TO_DST, capture_file_name, read_session
from migtap.errors import MigtapError, StreamError
from migtap.vocabulary import ChannelKind
from migtap.wire import events as ev
from migtap.wire.constants import MULTIFD_FLAG_ZLIB, MULTIFD_FLAG_ZSTD, MigCmd, SectionType
from migtap.wire.multifd import MultifdParser
from migtap.wire.stream import StreamParser

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

__all__ = [
    "MAX_RAM_UNIT",
    "ChannelFile",
    "Needs",
    "NotReplayable",
    "Plan",
    "Progress",
    "Unit",
    "explain",
    "failing_unit",
    "plan_units",
    "read_plan",
    "scan_stream",
]

#: Runs of RAM pages are merged into one unit up to this many bytes (a failure inside a run is
#: named as the run; QEMU's message names the page).
MAX_RAM_UNIT: Final = 4 << 20
CHUNK: Final = 1 << 20

_SECTION_KIND: Final = {
    SectionType.QEMU_VM_SECTION_START: "section_start",
    SectionType.QEMU_VM_SECTION_PART: "section_part",
    SectionType.QEMU_VM_SECTION_END: "section_end",
    SectionType.QEMU_VM_SECTION_FULL: "section_full",
}
_SHORT: Final = {
    SectionType.QEMU_VM_SECTION_START: "START",
    SectionType.QEMU_VM_SECTION_PART: "PART",
    SectionType.QEMU_VM_SECTION_END: "END",
    SectionType.QEMU_VM_SECTION_FULL: "FULL",
}


class NotReplayable(MigtapError):
    """The capture cannot be replayed faithfully (postcopy, RAM left out, ...): a usage error."""


@dataclass(frozen=True, slots=True)
class Unit:
    """One record of the main channel as the feeder hands it over: ``[offset, end)``."""

    offset: int
    end: int
    kind: str  # stream_header, configuration, section_full, ram_block_list, command, ...
    section_id: int | None = None
    idstr: str | None = None
    instance_id: int | None = None
    version_id: int | None = None
    section_kind: str | None = None  # START/PART/END/FULL of the enclosing section
    detail: dict[str, Any] = field(default_factory=dict)  # blocks, command, block, pages
    truncated: bool = False  # the capture ends inside this record

    @property
    def length(self) -> int:
        return self.end - self.offset

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "offset": self.offset,
            "end": self.end,
            "kind": self.kind,
            "section_id": self.section_id,
            "idstr": self.idstr,
            "instance_id": self.instance_id,
            "version_id": self.version_id,
            "section_kind": self.section_kind,
        }
        doc.update(self.detail)
        if self.truncated:
            doc["truncated"] = True
        return doc

    def describe(self) -> str:
        """One line for people: ``section FULL 0000:00:03.0/virtio-rng instance 0 (id 42,
        version 1) at offset 1596087``."""
        where = f"at offset {self.offset} ({self.length} bytes)"
        if self.kind.startswith("section_") and self.kind != "section_footer":
            return (
                f"section {self.section_kind} {self.idstr!r} instance {self.instance_id} "
                f"(section id {self.section_id}, version {self.version_id}) {where}"
            )
        inside = ""
        if self.idstr is not None:
            inside = (
                f" of section {self.section_kind} {self.idstr!r} instance {self.instance_id} "
                f"(section id {self.section_id}, version {self.version_id})"
            )
        what = self.kind
        if self.kind == "command":
            what = f"command {self.detail.get('command')}"
        elif self.kind == "ram_pages":
            what = f"RAM pages of {self.detail.get('block')!r}"
        elif self.kind == "ram_block_list":
            what = "RAM block list"
        return f"{what}{inside} {where}"


# -- planning --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Open:
    section_id: int
    idstr: str | None
    instance_id: int | None
    version_id: int | None
    kind: str


def _in_section(kind: str, sec: _Open | None, offset: int, **detail: Any) -> Unit:  # noqa: ANN401
    if sec is None:
        return Unit(offset, offset, kind, detail=detail)
    return Unit(
        offset,
        offset,
        kind,
        section_id=sec.section_id,
        idstr=sec.idstr,
        instance_id=sec.instance_id,
        version_id=sec.version_id,
        section_kind=sec.kind,
        detail=detail,
    )


def plan_units(events: Iterable[ev.Event], end: int) -> list[Unit]:  # noqa: C901, PLR0912, PLR0915 - one case per event
    """The main channel ``[0, end)`` cut into units at the events' offsets (see the module
    docstring). Events must be one parser's, in order. A unit ends where the next begins; the
    last one at ``end``."""
    units: list[Unit] = []
    known: dict[int, _Open] = {}  # section id -> what its START/FULL said
    sec: _Open | None = None  # the section being read
    device = False  # the open unit is a whole device section (its footer joins it)

    def add(unit: Unit) -> None:
        if units and units[-1].offset == unit.offset:
            return  # a second event at the same offset (DeviceState after its SectionHeader)
        units.append(unit)

    for event in events:
        match event:
            case ev.StreamHeader():
                add(Unit(event.offset, event.offset, "stream_header"))
            case ev.Configuration():
                add(Unit(event.offset, event.offset, "configuration",
                         detail={"machine_type": event.machine_type}))  # fmt: skip
            case ev.SectionHeader():
                if event.idstr is not None:
                    known[event.section_id] = _Open(
                        event.section_id,
                        event.idstr,
                        event.instance_id,
                        event.version_id,
                        _SHORT[event.kind],
                    )
                base = known.get(event.section_id)
                sec = _Open(
                    event.section_id,
                    base.idstr if base else None,
                    base.instance_id if base else None,
                    base.version_id if base else None,
                    _SHORT[event.kind],
                )
                unit = _in_section(_SECTION_KIND[event.kind], sec, event.offset)
                device = False
                add(unit)
            case ev.DeviceState():
                device = True
            case ev.SectionFooter():
                if not device:
                    add(_in_section("section_footer", sec, event.offset))
                sec, device = None, False
            case ev.RamBlockList():
                blocks = [{"idstr": b.idstr, "used_length": b.used_length} for b in event.blocks]
                add(_in_section("ram_block_list", sec, event.offset, blocks=blocks))
            case ev.RamPages():
                last = units[-1] if units else None
                if (
                    last is not None
                    and last.kind == "ram_pages"
                    and last.detail.get("block") == event.block
                    and event.offset - last.offset < MAX_RAM_UNIT
                ):
                    pages = last.detail["pages"] + event.normal + event.zero + event.xbzrle
                    units[-1] = replace(last, detail={**last.detail, "pages": pages})
                    continue
                pages = event.normal + event.zero + event.xbzrle + event.compressed
                add(_in_section("ram_pages", sec, event.offset, block=event.block, pages=pages))
            case ev.RamEndOfSection():
                add(_in_section("ram_eos", sec, event.offset))
            case ev.RamMultifdFlush():
                add(_in_section("ram_multifd_flush", sec, event.offset))
            case (
                ev.Command()
                | ev.Ping()
                | ev.PostcopyAdvise()
                | ev.PostcopyRamDiscard()
                | ev.RecvBitmapRequest()
                | ev.Packaged()
            ):
                add(Unit(event.offset, event.offset, "command", detail={"command": event.cmd.name}))
            case ev.EndOfState():
                add(Unit(event.offset, event.offset, "eof"))
            case ev.VmDescription():
                add(Unit(event.offset, event.offset, "vm_description"))
            case ev.Unparsed():
                add(_in_section("unparsed", sec, event.offset, reason=event.reason))
            case _:
                continue  # PackagedEnd, other channels' events: no boundary of their own
    out = []
    for n, unit in enumerate(units):
        stop = units[n + 1].offset if n + 1 < len(units) else end
        out.append(replace(unit, end=stop))
    return [u for u in out if u.end > u.offset]


def scan_stream(
    path: Path, page_size: int = 4096
) -> tuple[list[ev.Event], int, StreamError | None]:
    """Parse a main-channel file in chunks: its events (page payloads are skipped, never kept),
    its length, and the ``StreamError`` that ended the parse (a cut capture), if any."""
    parser = StreamParser(page_size=page_size)
    out: list[ev.Event] = []
    length = 0
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                length += len(chunk)
                out += _keep_small(parser.feed(chunk))
            out += _keep_small(parser.feed_eof())
    except StreamError as exc:
        out += _keep_small(exc.events)
        return out, length, exc
    except OSError as exc:
        raise NotReplayable(f"{path}: cannot read the main channel: {exc}") from exc
    return out, length, None


def _keep_small(events: Iterable[ev.Event]) -> list[ev.Event]:
    """Events without their big payloads: device state and vmdesc bytes are not needed here."""
    out: list[ev.Event] = []
    for e in events:
        if isinstance(e, ev.DeviceState):
            out.append(replace(e, payload=b""))
        elif isinstance(e, ev.VmDescription):
            out.append(replace(e, json_bytes=b""))
        else:
            out.append(e)
    return out


# -- a capture directory ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelFile:
    """A channel to open on the destination, in the capture's acceptance order."""

    index: int
    kind: str  # "main" or "multifd"
    path: Path
    size: int
    multifd_id: int | None = None


@dataclass(slots=True)
class Needs:
    """What the destination must be told before ``migrate-incoming``."""

    capabilities: dict[str, bool] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    return_path: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"capabilities": self.capabilities, "parameters": self.parameters}


@dataclass(slots=True)
class Plan:
    """A capture ready to replay."""

    directory: Path
    units: list[Unit]
    channels: list[ChannelFile]  # main first, in acceptance order
    needs: Needs
    length: int  # bytes of the main channel
    complete: bool  # the stream reaches QEMU_VM_EOF (and its vmdesc, if any)
    cut: str | None = None  # why the parse stopped early (a cut capture), if it did
    machine_type: str | None = None
    ram_blocks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def main(self) -> ChannelFile:
        return self.channels[0]

    def unit_at(self, offset: int) -> Unit | None:
        """The unit holding stream offset ``offset``."""
        lo, hi = 0, len(self.units)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.units[mid].end <= offset:
                lo = mid + 1
            else:
                hi = mid
        return self.units[lo] if lo < len(self.units) and self.units[lo].offset <= offset else None


def read_plan(directory: Path, page_size: int | None = None) -> Plan:  # noqa: C901, PLR0912, PLR0915 - one check per fact
    """Plan the replay of a capture directory; :class:`NotReplayable` if it cannot be replayed
    faithfully (``migtap.errors.CaptureError`` for an unreadable session.json)."""
    if not directory.is_dir():
        raise NotReplayable(f"{directory}: not a capture directory")
    session = read_session(directory)
    if session.get("capture_ram") == "none":
        raise NotReplayable(
            f"{directory}: captured with --capture-ram none: the RAM pages were left out, "
            "so the files are not a loadable stream"
        )
    channels: list[ChannelFile] = []
    main_seen = False
    for ch in session["channels"]:
        kind = str(ch.get("kind"))
        entry = ch["files"].get(SRC_TO_DST) or {}
        if kind == ChannelKind.MAIN.value and not main_seen:
            name = MAIN_FILES[SRC_TO_DST]
            main_seen = True
        elif kind == ChannelKind.MULTIFD.value:
            name = entry.get("file") or capture_file_name(ch["index"], kind, SRC_TO_DST, main=False)
        elif kind == ChannelKind.POSTCOPY_PREEMPT.value:
            raise NotReplayable(
                f"{directory}: a postcopy migration (it has a postcopy-preempt channel): "
                "postcopy cannot be replayed faithfully, the destination's page requests "
                "steered what the source sent"
            )
        else:
            raise NotReplayable(
                f"{directory}: channel {ch['index']} is {kind!r}: only the main channel and "
                "multifd channels can be replayed"
            )
        if entry.get("content") not in (None, "exact"):
            raise NotReplayable(
                f"{directory}: {name} is not byte-exact ({entry.get('content')}): not replayable"
            )
        path = directory / name
        if not path.is_file():
            raise NotReplayable(f"{directory}: {name} is missing")
        channels.append(
            ChannelFile(ch["index"], kind, path, path.stat().st_size, ch.get("multifd_id"))
        )
    if not main_seen:
        raise NotReplayable(f"{directory}: the capture has no main channel")
    channels.sort(key=lambda c: (c.kind != ChannelKind.MAIN.value, c.index))
    # The main channel first (QEMU takes the first connection as the main one), then the others
    # in acceptance order.
    size = int(page_size or session.get("page_size") or 4096)
    events, length, error = scan_stream(channels[0].path, size)
    units = plan_units(events, length)
    needs = Needs()
    plan = Plan(directory, units, channels, needs, length, complete=False)
    multifd = [c for c in channels if c.kind == ChannelKind.MULTIFD.value]
    if multifd:
        needs.capabilities["multifd"] = True
        needs.parameters["multifd-channels"] = len(multifd)
        compression = multifd_compression(multifd[0].path, size)
        if compression is not None:
            needs.parameters["multifd-compression"] = compression
    for e in events:
        match e:
            case ev.Packaged():
                raise NotReplayable(
                    f"{directory}: a postcopy migration (MIG_CMD_PACKAGED at offset {e.offset}): "
                    "postcopy cannot be replayed faithfully, the destination's page requests "
                    "steered what the source sent; replay a precopy capture"
                )
            case ev.Command(cmd=MigCmd.MIG_CMD_OPEN_RETURN_PATH):
                needs.return_path = True
                needs.capabilities["return-path"] = True
            case ev.PostcopyAdvise() if e.ram_pagesize_summary is not None:
                needs.capabilities["postcopy-ram"] = True  # a 16-byte advise needs it
            case ev.Configuration():
                plan.machine_type = e.machine_type
                for cap in e.capabilities or ():
                    needs.capabilities[cap] = True
            case ev.RamBlockList() if not plan.ram_blocks:
                plan.ram_blocks = [
                    {"idstr": b.idstr, "used_length": b.used_length} for b in e.blocks
                ]
            case ev.RamPages() if e.xbzrle:
                needs.capabilities["xbzrle"] = True
            case ev.EndOfState():
                plan.complete = True
            case _:
                pass
    if error is not None:
        plan.cut = str(error)
        plan.complete = False
        if units:
            units[-1] = replace(units[-1], truncated=True)
    if not units:
        raise NotReplayable(f"{channels[0].path}: not a migration stream ({plan.cut})")
    return plan


def multifd_compression(path: Path, page_size: int) -> str | None:
    """The multifd-compression parameter a channel's first packets ask for (None: none)."""
    parser = MultifdParser(page_size)
    try:
        with path.open("rb") as fh:
            events = parser.feed(fh.read(64 * 1024))
    except (OSError, StreamError):
        return None
    for e in events:
        if isinstance(e, ev.MultifdPacket) and e.normal_pages:
            if e.compression == MULTIFD_FLAG_ZLIB:
                return "zlib"
            if e.compression == MULTIFD_FLAG_ZSTD:
                return "zstd"
            return None
    return None


# -- where the destination stopped -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """How far the feeder got with the destination, as ``migtap.relay.replay`` measured it.

    ``started`` is the index of the last unit the destination is known to have begun reading
    (it read that unit's first byte, which it asks for only once it is done with the unit
    before); -1 if none. ``consumed`` is the stream offset up to which it is known to have read
    everything. ``all_read``: it read every byte handed over.
    """

    started: int
    consumed: int
    written: int
    all_read: bool
    closed: bool  # the destination closed the main channel


def failing_unit(units: Sequence[Unit], progress: Progress) -> Unit | None:
    """The record the destination was reading when it stopped: the last one it began."""
    if progress.started < 0 or progress.started >= len(units):
        return None
    return units[progress.started]


_SIZE_MISMATCH: Final = re.compile(
    r"Size mismatch: (?P<block>\S+): 0x(?P<stream>[0-9a-fA-F]+) != 0x(?P<dest>[0-9a-fA-F]+)"
)
_UNKNOWN_BLOCK: Final = re.compile(r'Unknown ramblock "(?P<block>[^"]+)"')
_UNKNOWN_SECTION: Final = re.compile(
    r"Unknown savevm section or instance '(?P<idstr>[^']+)' (?P<instance>\d+)"
)
_DEVICE_LOAD: Final = re.compile(
    r"error while loading state for instance 0x(?P<instance>[0-9a-fA-F]+) of device "
    r"'(?P<idstr>[^']+)'"
)
_FIELD: Final = re.compile(r"Failed to load (?P<vmsd>[^:\s]+):(?P<field>\S+)")
_VERSION: Final = re.compile(r"savevm: unsupported version (?P<version>\d+) for '(?P<idstr>[^']+)'")


def explain(unit: Unit | None, lines: Sequence[str]) -> dict[str, Any]:
    """What QEMU's error lines say about the failing record: ``sub_record`` (the RAM block with
    the stream's and the destination's sizes, the field) and ``confirmed`` (QEMU's message
    names the same section, instance or block; None when it names none)."""
    out: dict[str, Any] = {"sub_record": None, "confirmed": None, "qemu_says": []}
    text = list(lines)
    for line in text:
        if m := _SIZE_MISMATCH.search(line):
            stream = int(m["stream"], 16)
            out["sub_record"] = {
                "block": m["block"],
                "stream_size": stream,
                "destination_size": int(m["dest"], 16),
                "in_block_list": _block_size(unit, m["block"]),
            }
            out["confirmed"] = unit is not None and unit.kind == "ram_block_list"
            out["qemu_says"].append(line)
        elif m := _UNKNOWN_BLOCK.search(line):
            out["sub_record"] = {
                "block": m["block"],
                "stream_size": _block_size(unit, m["block"]),
                "destination_size": None,
            }
            out["confirmed"] = unit is not None and unit.kind in ("ram_block_list", "ram_pages")
            out["qemu_says"].append(line)
        elif m := _UNKNOWN_SECTION.search(line):
            out["confirmed"] = (
                unit is not None
                and unit.idstr == m["idstr"]
                and unit.instance_id == int(m["instance"])
            )
            out["qemu_says"].append(line)
        elif m := _DEVICE_LOAD.search(line):
            if out["confirmed"] is None:
                out["confirmed"] = (
                    unit is not None
                    and unit.idstr == m["idstr"]
                    and unit.instance_id == int(m["instance"], 16)
                )
            out["qemu_says"].append(line)
        elif m := _FIELD.search(line):
            out["sub_record"] = out["sub_record"] or {"vmsd": m["vmsd"], "field": m["field"]}
            out["qemu_says"].append(line)
        elif m := _VERSION.search(line):
            out["sub_record"] = out["sub_record"] or {
                "stream_version": int(m["version"]),
                "idstr": m["idstr"],
            }
            out["confirmed"] = unit is not None and unit.idstr == m["idstr"]
            out["qemu_says"].append(line)
    return out


def _block_size(unit: Unit | None, block: str) -> int | None:
    if unit is None:
        return None
    for entry in unit.detail.get("blocks", ()):
        if entry.get("idstr") == block:
            return int(entry["used_length"])
    return None
