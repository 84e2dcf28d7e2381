"""The capture sink: every byte of a session on disk, an event index and a session record.

One directory per session, ``<root>/<UTC yyyymmddThhmmssZ>-s<session_id>`` (``-1``, ``-2``, ...
appended if it exists), mode 0700; every file in it is 0600 whatever the umask:

``src-to-dst.bin`` / ``dst-to-src.bin``
    The first ``main`` channel, byte-exact. With ``capture_ram="full"`` the src-to-dst file is a
    complete migration stream (``-incoming "exec:cat src-to-dst.bin"``, ``analyze-migration.py``).
``conn-<index>-<kind>.<direction>.bin``
    Every other connection (multifd, tls, unknown, a second main), ``index`` being the order of
    acceptance in the session; ``session.json`` gives each channel's ``multifd_id``. A direction
    that carried no bytes has no file (``"file": null`` in ``session.json``).
``events.jsonl``
    The index: a ``capture_started`` line, then one line per parser event (:func:`event_record`),
    ``{"v": 1, "t": ..., "ch": 0, "dir": "src-to-dst", "offset": N, "kind": "ram_pages", ...}``.
    Read it with :func:`read_index`, which upgrades older versions (``UPGRADERS``).
``vmdesc.json``
    The JSON device description from the end of the main stream (also inside the raw file).
``session.json``
    Peers, timings, per-channel byte counts and files, outcome, config, and whether the capture
    is ``complete``; rewritten atomically (tmp + ``os.replace``) on channel changes and at close.

``capture_ram="none"`` removes guest RAM contents, and nothing else, from the files: the main
channel's src-to-dst file loses the bytes of every ``ram_pages`` event, ``[offset, offset +
length)`` (page record headers with their payloads, since the events give runs, not pages); a
multifd channel's src-to-dst file loses the payload of every RAM packet (``multifd_packet``
events: ``payload_bytes`` after the ``320 + 8 * (512 KiB / page_size)``-byte header, so
``page_size`` must be the parser's; each record must start where the last one ended, or the rest
of the file is left out as ``multifd_framing_mismatch``); the index
keeps every event, so page counts stay. Bytes the parser could not frame (``unparsed`` events,
a detached parser) might be RAM, so they are left out too, as is the src-to-dst direction of any
channel that is neither main nor multifd. The return path is kept. The resulting files are not
loadable streams; ``session.json`` says per file what was removed (``content``,
``bytes_removed``). To apply the cuts the sink holds a channel's bytes back until the parser's
events have framed them (at most :data:`HOLDBACK_MAX` bytes; past that, the rest of that file is
left out and ``session.json`` says from which offset).

Disk writes run on one writer thread per sink, fed by a queue whose size is tracked: above
``queue_high`` the sink calls ``throttle.pause("capture")``, below ``queue_low`` it resumes (via
``call_soon_threadsafe``, on the loop). A write error stops the capture, never the migration.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import json
import operator
import os
import re
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import structlog

from migtap.errors import CaptureError
from migtap.wire.events import DeviceState, RamPages, Unparsed, VmDescription
from migtap.wire.multifd import (
    MULTIFD_DEVICE_STATE_HDR_SIZE,
    MULTIFD_INIT_SIZE,
    MULTIFD_PACKET_SIZE,
    MULTIFD_RAM_HDR_FIXED,
    MultifdDeviceState,
    MultifdInit,
    MultifdPacket,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from migtap.relay.pipe import Direction
    from migtap.sinks import ChannelInfo, SessionSummary, Throttle

log = structlog.get_logger("migtap.capture")

FORMAT_VERSION: Final = 1
"""Version of ``events.jsonl`` and ``session.json`` (``"v"``)."""

MiB: Final = 1024 * 1024
HOLDBACK_MAX: Final = 64 * MiB
"""``capture_ram="none"``: most bytes of one channel direction held back awaiting events."""

SMALL_BYTES_MAX: Final = 64
"""``bytes`` fields up to this size go into the index as hex; longer ones as ``<name>_len``."""

EVENT_RECORD_OVERHEAD: Final = 256
"""Queue accounting: what an index line is assumed to cost before it is serialised."""

PAUSE_REASON: Final = "capture"
SRC_TO_DST: Final = "src-to-dst"
DST_TO_SRC: Final = "dst-to-src"
DIRECTIONS: Final = (SRC_TO_DST, DST_TO_SRC)

_ENVELOPE: Final = frozenset({"v", "t", "ch", "dir", "kind"})
_KIND_RE: Final = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SAFE_KIND_RE: Final = re.compile(r"[^a-z0-9_]")
_EXTRA_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RESERVED: Final = frozenset({"events.jsonl", "session.json"})
_DIR_MODE: Final = 0o700
_FILE_MODE: Final = 0o600


# -- the index -------------------------------------------------------------------------------------


def channel_file_name(index: int, kind: str, dir_name: str) -> str:
    """The capture file of a connection other than the main channel:
    ``conn-<index>-<kind>.<direction>.bin``, the kind made safe (``postcopy_preempt``)."""
    safe_kind = _SAFE_KIND_RE.sub("_", kind.lower())[:32] or "unknown"
    return f"conn-{int(index):d}-{safe_kind}.{dir_name}.bin"


def event_kind(event: object) -> str:
    """``RamPages`` -> ``ram_pages``, ``RpReqPagesId`` -> ``rp_req_pages_id``."""
    return _KIND_RE.sub("_", type(event).__name__).lower()


def _jsonable(value: object) -> object:  # noqa: PLR0911 - one return per JSON type
    """A JSON-ready form of an event field: enums by name, UUIDs as text, bytes as hex,
    dataclasses as dicts, tuples as lists."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, int | float):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def event_record(event: object, *, channel: int, direction: str, t: float) -> dict[str, Any]:
    """One ``events.jsonl`` line for a parser event (any frozen dataclass with ``offset``).

    Fields become keys, converted by type (enums by name, small bytes as hex, nested
    dataclasses as dicts). Big payloads are left out: ``DeviceState.payload`` becomes
    ``payload_len``, ``VmDescription.json_bytes`` ``json_len`` (``desc``, its parse, is
    dropped), any other ``bytes`` field over :data:`SMALL_BYTES_MAX` ``<name>_len``. A field
    whose name is an envelope key (``kind`` of a section) is stored as ``section_<name>``.
    """
    if not dataclasses.is_dataclass(event) or isinstance(event, type):
        raise TypeError(f"not an event dataclass: {type(event).__name__}")
    record: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "t": t,
        "ch": channel,
        "dir": str(direction),
        "offset": getattr(event, "offset", None),
        "kind": event_kind(event),
    }
    for f in dataclasses.fields(event):
        name = f.name
        if name == "offset":
            continue
        value = getattr(event, name)
        if isinstance(event, VmDescription) and name == "desc":
            continue
        if isinstance(event, VmDescription) and name == "json_bytes":
            record["json_len"] = len(value)
            continue
        if isinstance(event, DeviceState) and name == "payload":
            record["payload_len"] = len(value)
            continue
        if isinstance(value, bytes | bytearray | memoryview) and len(value) > SMALL_BYTES_MAX:
            record[f"{name}_len"] = len(value)
            continue
        key = f"section_{name}" if name in _ENVELOPE else name
        record[key] = _jsonable(value)
    return record


UPGRADERS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
"""``UPGRADERS[n]`` turns a version-``n`` index line into a version ``n + 1`` one (as mitmproxy
chains ``convert_X_Y``). Empty while only version 1 exists."""


def upgrade_record(record: dict[str, Any], *, where: str = "index") -> dict[str, Any]:
    """Bring one index line up to :data:`FORMAT_VERSION`; ``CaptureError`` if it cannot."""
    version = record.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CaptureError(f'{where}: no valid format version ("v": {version!r})')
    if version > FORMAT_VERSION:
        raise CaptureError(
            f"{where}: format version {version} is newer than this migtap reads "
            f"({FORMAT_VERSION}); upgrade migtap"
        )
    while version < FORMAT_VERSION:
        upgrader = UPGRADERS.get(version)
        if upgrader is None:
            raise CaptureError(f"{where}: no upgrade from format version {version}")
        record = upgrader(record)
        version = record["v"]
    return record


def read_index(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield the lines of an ``events.jsonl``, upgraded to the current version.

    Raises ``CaptureError`` naming the file and line for an unreadable file or line, or a
    version newer than known."""
    try:
        fh = Path(path).open("rb")  # noqa: SIM115 - closed below, in a generator
    except OSError as exc:
        raise CaptureError(f"{path}: cannot read the capture index: {exc}") from exc
    with fh:
        lineno = 0
        while True:
            where = f"{path}:{lineno + 1}"
            try:
                raw = fh.readline()
            except OSError as exc:
                raise CaptureError(f"{where}: unreadable line: {exc}") from exc
            if not raw:
                return
            lineno += 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise CaptureError(f"{where}: not UTF-8: {exc}") from exc
            except ValueError as exc:
                raise CaptureError(f"{where}: not JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise CaptureError(f"{where}: not a JSON object")
            yield upgrade_record(record, where=where)


# -- small helpers ---------------------------------------------------------------------------------


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (it may write fewer)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _make_session_dir(root: Path, session_id: int, now: float) -> Path:
    root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    # digits, letters and '-' only: cannot escape root
    base = f"{stamp}-s{operator.index(session_id):d}"
    for attempt in range(1000):
        name = base if attempt == 0 else f"{base}-{attempt}"
        path = root / name
        try:
            path.mkdir(mode=_DIR_MODE)
        except FileExistsError:
            continue
        path.chmod(_DIR_MODE)  # mkdir's mode is masked by the umask
        return path
    raise FileExistsError(f"{root / base}: 1000 directories of that name exist")


class _Cutter:
    """``capture_ram="none"``: holds one channel direction's bytes until events frame them,
    then releases them with the RAM ranges cut out.

    ``frontier`` is how far the parser has framed the stream: no later event can start before
    it, so bytes below it are final. ``cuts`` are ranges to leave out (they may run past the
    data received so far)."""

    __slots__ = (
        "cuts",
        "frontier",
        "kept",
        "late_cut_bytes",
        "pending",
        "pending_bytes",
        "released",
        "removed",
        "stopped_at",
        "stopped_reason",
        "total",
    )

    def __init__(self) -> None:
        self.pending: collections.deque[bytes] = collections.deque()
        self.pending_bytes = 0
        self.released = 0  # stream offset of the first pending byte
        self.total = 0  # bytes fed
        self.frontier = 0
        self.cuts: collections.deque[tuple[int, int]] = collections.deque()
        self.removed = 0  # bytes cut out
        self.kept = 0  # bytes released for writing
        self.late_cut_bytes = 0  # cut requested for bytes already written (should not happen)
        self.stopped_at: int | None = None
        self.stopped_reason: str | None = None

    def feed(self, chunk: bytes) -> list[bytes]:
        self.total += len(chunk)
        if self.stopped_at is not None:
            self.released = self.total
            return []
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        out = self.release()
        if self.pending_bytes > HOLDBACK_MAX:
            self.stop("holdback_exceeded")
        return out

    def cut(self, start: int, end: int) -> None:
        if end <= start:
            return
        if start < self.released:
            self.late_cut_bytes += min(end, self.released) - start
            start = self.released
            if end <= start:
                return
        if self.cuts and start <= self.cuts[-1][1]:
            last_start, last_end = self.cuts.pop()
            self.cuts.append((min(start, last_start), max(end, last_end)))
            if start < last_start:  # out of order: keep the deque sorted
                self.cuts = collections.deque(sorted(self.cuts))
        else:
            self.cuts.append((start, end))
            if len(self.cuts) > 1 and start < self.cuts[-2][0]:
                self.cuts = collections.deque(sorted(self.cuts))

    def advance(self, frontier: int) -> None:
        self.frontier = max(self.frontier, frontier)

    def stop(self, reason: str) -> None:
        """Leave out every byte from the first unreleased one on."""
        if self.stopped_at is None:
            self.stopped_at = self.released
            self.stopped_reason = reason
        self.pending.clear()
        self.pending_bytes = 0
        self.released = self.total

    def release(self, *, final: bool = False) -> list[bytes]:
        """Pieces of the pending bytes below the frontier (all of them if ``final``), cut."""
        limit = self.total if final else min(self.frontier, self.total)
        out: list[bytes] = []
        while self.pending and self.released < limit:
            chunk = self.pending[0]
            start = self.released
            take = min(len(chunk), limit - start)
            piece_end = start + take
            pos = start
            while pos < piece_end:
                while self.cuts and self.cuts[0][1] <= pos:
                    self.cuts.popleft()
                if self.cuts and self.cuts[0][0] <= pos:
                    skip_to = min(self.cuts[0][1], piece_end)
                    self.removed += skip_to - pos
                    pos = skip_to
                    continue
                keep_to = min(self.cuts[0][0], piece_end) if self.cuts else piece_end
                out.append(chunk[pos - start : keep_to - start])
                self.kept += keep_to - pos
                pos = keep_to
            if take == len(chunk):
                self.pending.popleft()
            else:
                self.pending[0] = chunk[take:]
            self.pending_bytes -= take
            self.released = piece_end
        return out


@dataclasses.dataclass(slots=True)
class _DirState:
    """What the sink knows about one direction of one channel."""

    file: str | None = None  # file name in the capture directory, once chosen
    content: str = "exact"  # exact | ram_removed | omitted
    bytes_seen: int = 0
    cutter: _Cutter | None = None
    next_record: int | None = None  # multifd: where the next record must start (self-check)


@dataclasses.dataclass(slots=True)
class _Op:
    """One unit of work for the writer thread."""

    name: str  # file name; "" for the stop sentinel
    data: bytes | None = None  # raw bytes to append
    record: dict[str, Any] | None = None  # an index line to serialise and append
    replace: bytes | None = None  # whole-file content, written atomically
    cost: int = 0  # bytes counted against the queue marks


# -- the sink --------------------------------------------------------------------------------------


class CaptureSink:
    """Writes one session's capture directory (see the module docstring). A ``Sink``."""

    _write: Callable[[int, bytes], None] = staticmethod(write_all)
    """The one place bytes go to disk; tests replace it to slow or fail writes."""

    def __init__(
        self,
        root: Path,
        session_id: int,
        *,
        throttle: Throttle,
        call_soon_threadsafe: Callable[[Callable[[], None]], object],
        capture_ram: Literal["full", "none"] = "full",
        queue_high: int = 64 * MiB,
        queue_low: int = 16 * MiB,
        config: dict[str, Any] | None = None,
        page_size: int = 4096,
        close_timeout_s: float = 30.0,
    ) -> None:
        if capture_ram not in ("full", "none"):
            raise ValueError(f"capture_ram must be 'full' or 'none', got {capture_ram!r}")
        if not 0 <= queue_low <= queue_high:
            raise ValueError(f"need 0 <= queue_low <= queue_high, got {queue_low}, {queue_high}")
        self.session_id = operator.index(session_id)  # an int, never a path
        self.capture_ram: Literal["full", "none"] = capture_ram
        self.config = dict(config) if config is not None else {}
        self.page_size = page_size
        self._multifd_hdr = MULTIFD_RAM_HDR_FIXED + 8 * (MULTIFD_PACKET_SIZE // page_size)
        self._throttle = throttle
        self._call_soon_threadsafe = call_soon_threadsafe
        self._high = queue_high
        self._low = queue_low
        self._close_timeout_s = close_timeout_s
        self.started_wall = time.time()
        self.ended_wall: float | None = None
        try:
            self.directory = _make_session_dir(Path(root), self.session_id, self.started_wall)
        except OSError as exc:
            raise CaptureError(f"{root}: cannot create the capture directory: {exc}") from exc
        self.complete = False
        self.error: str | None = None
        self._channels: dict[int, ChannelInfo] = {}
        self._dirs: dict[tuple[int, str], _DirState] = {}
        self._main_channel: int | None = None
        self._vmdesc_count = 0
        self._extra_files: list[str] = []
        self._summary: dict[str, Any] = {}
        self._closed = False
        # shared with the writer thread, under _cond
        self._cond = threading.Condition()
        self._ops: collections.deque[_Op] = collections.deque()
        self._queued = 0
        self._written: dict[str, int] = {}
        self._failed = False  # set by the writer; the loop then ignores chunks
        self._resume_scheduled = False
        self._paused = False  # set on the loop, read by the writer
        # loop side only
        self.paused_count = 0
        self._thread = threading.Thread(
            target=self._run, name=f"migtap-capture-s{self.session_id}", daemon=True
        )
        self._thread.start()
        self._enqueue(
            _Op(
                "events.jsonl",
                record={
                    "v": FORMAT_VERSION,
                    "t": self.started_wall,
                    "kind": "capture_started",
                    "session_id": self.session_id,
                    "directory": str(self.directory),
                    "capture_ram": self.capture_ram,
                    "page_size": self.page_size,
                },
                cost=EVENT_RECORD_OVERHEAD,
            )
        )
        self._enqueue_session_json()
        log.info(
            "capture_started",
            directory=str(self.directory),
            session_id=self.session_id,
            capture_ram=self.capture_ram,
        )

    # -- Sink protocol (on the loop) ---------------------------------------------------------------

    def on_channel(self, channel: ChannelInfo) -> None:
        self._channels[channel.index] = channel
        self._enqueue_session_json()

    def on_chunk(
        self, channel: ChannelInfo, direction: Direction, offset: int, chunk: bytes
    ) -> None:
        if self._failed or self._closed or not chunk:
            return
        self._channels.setdefault(channel.index, channel)
        state = self._dir_state(channel, str(direction))
        state.bytes_seen += len(chunk)
        if state.content == "omitted":
            return
        cutter = state.cutter
        if cutter is None:
            self._enqueue_data(state, chunk)
            return
        if channel.parse_error is not None:
            cutter.stop("parser_detached")
        for piece in cutter.feed(chunk):
            self._enqueue_data(state, piece)

    def on_event(self, channel: ChannelInfo, direction: Direction, event: object) -> None:
        if self._failed or self._closed:
            return
        dir_name = str(direction)
        if isinstance(event, VmDescription):
            self._vmdesc_count += 1
            name = "vmdesc.json" if self._vmdesc_count == 1 else f"vmdesc-{self._vmdesc_count}.json"
            self._enqueue(_Op(name, replace=event.json_bytes, cost=len(event.json_bytes)))
        try:
            record = event_record(event, channel=channel.index, direction=dir_name, t=time.time())
        except TypeError:
            record = {
                "v": FORMAT_VERSION,
                "t": time.time(),
                "ch": channel.index,
                "dir": dir_name,
                "offset": None,
                "kind": "unknown_event",
                "repr": repr(event)[:200],
            }
        self._enqueue(_Op("events.jsonl", record=record, cost=EVENT_RECORD_OVERHEAD))
        state = self._dirs.get((channel.index, dir_name))
        if state is not None and state.cutter is not None:
            self._frame(state, event)

    def on_channel_closed(self, channel: ChannelInfo) -> None:
        if self._closed:
            return
        for dir_name in DIRECTIONS:
            self._finish_cutter(channel.index, dir_name)
        self._enqueue_session_json()

    def on_close(self, summary: SessionSummary) -> None:
        """Flush, wait for the writer (at most ``close_timeout_s``) and write ``session.json``.
        Blocks the caller while the writer drains."""
        if self._closed:
            return
        for info in summary.channels:
            self._channels.setdefault(info.index, info)
        for index, dir_name in list(self._dirs):
            self._finish_cutter(index, dir_name)
        self._closed = True
        self.ended_wall = time.time()
        self._summary = {
            "outcome": summary.outcome,
            "started": _iso(summary.started_wall),
            "ended": _iso(summary.ended_wall),
            "fields": _jsonable(summary.fields),
            "details": _jsonable(summary.details),
        }
        with self._cond:
            self._ops.append(_Op(""))  # stop sentinel
            self._cond.notify()
        self._thread.join(self._close_timeout_s)
        with self._cond:
            failed = self._failed
            if self._thread.is_alive() and not failed:
                self._failed = True
                self.error = f"the writer did not finish within {self._close_timeout_s} s"
                self._ops.clear()
        self.complete = not failed and self.error is None and self._all_bytes_written()
        self._release_pause()  # the writer is gone; nothing holds the relay back any more
        try:
            self._replace("session.json", self._session_json())
        except OSError as exc:
            self.complete = False
            log.warning(
                "capture_session_file_failed",
                directory=str(self.directory),
                file="session.json",
                error=str(exc),
            )
        bytes_written = sum(self._written_snapshot().values())
        log.info(
            "capture_closed",
            directory=str(self.directory),
            bytes_written=bytes_written,
            complete=self.complete,
            error=self.error,
        )

    # -- for other sinks ------------------------------------------------------------------------

    def write_file(self, name: str, data: bytes) -> None:
        """Write a whole extra file (say ``annotated.jsonl``) into the capture directory: 0600,
        atomically, on the writer thread. ``name`` is a plain file name that none of the
        capture's own files use; call before ``on_close``."""
        if not _EXTRA_NAME_RE.fullmatch(name) or name in _RESERVED or name.endswith(".bin"):
            raise ValueError(f"not a free file name in a capture directory: {name!r}")
        if name.startswith("vmdesc") or self._closed:
            raise ValueError(f"cannot write {name!r}: reserved, or the capture is closed")
        if name not in self._extra_files:
            self._extra_files.append(name)
        self._enqueue(_Op(name, replace=bytes(data), cost=len(data)))

    # -- loop-side helpers -------------------------------------------------------------------------

    def _dir_state(self, channel: ChannelInfo, dir_name: str) -> _DirState:
        key = (channel.index, dir_name)
        state = self._dirs.get(key)
        if state is not None:
            return state
        state = _DirState()
        kind = channel.kind
        if kind == "main" and self._main_channel in (None, channel.index):
            self._main_channel = channel.index
            state.file = f"{dir_name}.bin"
        else:
            state.file = channel_file_name(channel.index, str(kind), dir_name)
        if self.capture_ram == "none" and dir_name == SRC_TO_DST:
            if kind in ("main", "multifd"):
                state.content = "ram_removed"
                state.cutter = _Cutter()
            else:
                state.content = "omitted"
                state.file = None
        self._dirs[key] = state
        return state

    def _frame(self, state: _DirState, event: object) -> None:
        """``capture_ram="none"``: what this event tells about where RAM bytes are."""
        cutter = state.cutter
        assert cutter is not None
        offset = getattr(event, "offset", None)
        if not isinstance(offset, int):
            return
        match event:
            case RamPages(length=length):
                cutter.cut(offset, offset + length)
                cutter.advance(offset + length)
            case Unparsed(length=None):
                cutter.advance(offset)
                for piece in cutter.release():
                    self._enqueue_data(state, piece)
                cutter.stop("unparsed")
                return
            case Unparsed(length=length) if length is not None:
                cutter.cut(offset, offset + length)
                cutter.advance(offset + length)
            case MultifdInit() | MultifdPacket() | MultifdDeviceState():
                # Records are back to back: each must start where the last one ended, or the
                # header length (from page_size) is wrong. Bytes are released only up to a
                # record start, which confirms the record before it.
                if offset != (state.next_record or 0):
                    cutter.stop("multifd_framing_mismatch")
                    return
                cutter.advance(offset)
                state.next_record = self._multifd_end(event, offset, cutter)
            case _:
                cutter.advance(offset)
        for piece in cutter.release():
            self._enqueue_data(state, piece)

    def _multifd_end(
        self, event: MultifdInit | MultifdPacket | MultifdDeviceState, offset: int, cutter: _Cutter
    ) -> int:
        """Where the multifd record at ``offset`` ends; cuts a RAM packet's payload."""
        if isinstance(event, MultifdInit):
            return offset + MULTIFD_INIT_SIZE
        if isinstance(event, MultifdDeviceState):
            return offset + MULTIFD_DEVICE_STATE_HDR_SIZE + event.payload_bytes
        start = offset + self._multifd_hdr
        cutter.cut(start, start + event.payload_bytes)
        return start + event.payload_bytes

    def _finish_cutter(self, index: int, dir_name: str) -> None:
        state = self._dirs.get((index, dir_name))
        if state is None or state.cutter is None or self._failed:
            return
        channel = self._channels.get(index)
        cutter = state.cutter
        if channel is not None and channel.parse_error is not None:
            for piece in cutter.release():
                self._enqueue_data(state, piece)
            cutter.stop("parser_detached")
            return
        if state.next_record is not None and state.next_record != cutter.total:
            cutter.stop("multifd_framing_mismatch")
            return
        for piece in cutter.release(final=True):
            self._enqueue_data(state, piece)

    def _enqueue_data(self, state: _DirState, data: bytes) -> None:
        if data and state.file is not None:
            self._enqueue(_Op(state.file, data=data, cost=len(data)))

    def _enqueue(self, op: _Op) -> None:
        with self._cond:
            if self._failed:
                return
            self._ops.append(op)
            self._queued += op.cost
            pause = self._queued > self._high and not self._paused
            if pause:
                self._paused = True
            self._cond.notify()
        if pause:
            self.paused_count += 1
            self._throttle.pause(PAUSE_REASON)

    def _enqueue_session_json(self) -> None:
        data = self._session_json()
        self._enqueue(_Op("session.json", replace=data, cost=len(data)))

    def _on_loop_resume(self) -> None:
        """Scheduled by the writer when the queue drained below the low mark (or it failed)."""
        with self._cond:
            self._resume_scheduled = False
            resume = self._paused and (self._queued <= self._low or self._failed)
            if resume:
                self._paused = False
        if resume:
            self._throttle.resume(PAUSE_REASON)

    def _release_pause(self) -> None:
        with self._cond:
            paused, self._paused = self._paused, False
        if paused:
            self._throttle.resume(PAUSE_REASON)

    def _written_snapshot(self) -> dict[str, int]:
        with self._cond:
            return dict(self._written)

    def _all_bytes_written(self) -> bool:
        """Every byte meant for a file reached it (cuts in ``none`` mode are intended)."""
        written = self._written_snapshot()
        for state in self._dirs.values():
            if state.file is None:
                continue
            expected = state.bytes_seen if state.cutter is None else state.cutter.kept
            if written.get(state.file, 0) != expected:
                return False
        return True

    def _session_json(self) -> bytes:
        written = self._written_snapshot()
        channels = []
        for index in sorted(self._channels):
            info = self._channels[index]
            files: dict[str, Any] = {}
            for dir_name in DIRECTIONS:
                files[dir_name] = self._file_entry(
                    self._dirs.get((index, dir_name)), written, info, dir_name
                )
            channels.append(
                {
                    "index": info.index,
                    "pipe_id": info.pipe_id,
                    "kind": info.kind,
                    "multifd_id": info.multifd_id,
                    "source": info.source,
                    "destination": info.destination,
                    "started": _iso(info.started_wall),
                    "ended": _iso(info.ended_wall),
                    "bytes_src_to_dst": info.bytes_src_to_dst,
                    "bytes_dst_to_src": info.bytes_dst_to_src,
                    "close_reason": info.close_reason,
                    "parse_error": info.parse_error,
                    "files": files,
                }
            )
        doc: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "session_id": self.session_id,
            "directory": str(self.directory),
            "started": _iso(self.started_wall),
            "ended": _iso(self.ended_wall),
            "outcome": self._summary.get("outcome"),
            "session_started": self._summary.get("started"),
            "session_ended": self._summary.get("ended"),
            "summary": self._summary.get("fields", {}),
            "qemu": self._summary.get("details", {}).get("qemu"),
            "capture_ram": self.capture_ram,
            "page_size": self.page_size,
            "complete": self.complete,
            "error": self.error,
            "closed": self._closed,
            "channels": channels,
            "vmdesc_files": [
                "vmdesc.json" if n == 1 else f"vmdesc-{n}.json"
                for n in range(1, self._vmdesc_count + 1)
            ],
            "extra_files": list(self._extra_files),
            "config": _jsonable(self.config),
        }
        return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()

    @staticmethod
    def _file_entry(
        state: _DirState | None, written: dict[str, int], info: ChannelInfo, dir_name: str
    ) -> dict[str, Any]:
        if state is None:
            seen = info.bytes_src_to_dst if dir_name == SRC_TO_DST else info.bytes_dst_to_src
            return {
                "file": None,
                "content": "empty" if seen == 0 else "omitted",
                "bytes_seen": 0,
                "bytes_written": 0,
            }
        entry: dict[str, Any] = {
            "file": state.file,
            "content": state.content,
            "bytes_seen": state.bytes_seen,
            "bytes_written": written.get(state.file, 0) if state.file is not None else 0,
        }
        if state.cutter is not None:
            entry["bytes_removed"] = state.cutter.removed
            entry["bytes_held"] = state.cutter.pending_bytes
            entry["left_out_from"] = state.cutter.stopped_at
            entry["left_out_reason"] = state.cutter.stopped_reason
            entry["late_cut_bytes"] = state.cutter.late_cut_bytes
        return entry

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        fds: dict[str, int] = {}
        try:
            while True:
                with self._cond:
                    while not self._ops:
                        self._cond.wait()
                    op = self._ops.popleft()
                if not op.name:
                    return
                if not self._failed:
                    try:
                        self._perform(op, fds)
                    except OSError as exc:
                        self._fail(op.name, exc)
                elif op.name == "session.json" and op.replace is not None:
                    with contextlib.suppress(OSError):  # best effort after a failure
                        self._replace(op.name, op.replace)
                self._done(op)
        finally:
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _perform(self, op: _Op, fds: dict[str, int]) -> None:
        if op.replace is not None:
            self._replace(op.name, op.replace)
            return
        data = op.data
        if op.record is not None:
            data = (json.dumps(op.record, separators=(",", ":")) + "\n").encode()
        if data is None:
            return
        fd = fds.get(op.name)
        if fd is None:
            fd = self._open(op.name, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            fds[op.name] = fd
        self._write(fd, data)
        if op.data is not None:
            with self._cond:
                self._written[op.name] = self._written.get(op.name, 0) + len(data)

    def _open(self, name: str, flags: int) -> int:
        path = self.directory / name
        fd = os.open(
            path, flags | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0), _FILE_MODE
        )
        try:
            os.fchmod(fd, _FILE_MODE)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _replace(self, name: str, data: bytes) -> None:
        tmp = f".{name}.{threading.get_ident()}.tmp"  # the loop and the writer never share one
        fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            self._write(fd, data)
        finally:
            os.close(fd)
        (self.directory / tmp).replace(self.directory / name)

    def _done(self, op: _Op) -> None:
        with self._cond:
            self._queued -= op.cost
            schedule = (
                self._paused
                and not self._resume_scheduled
                and (self._queued <= self._low or self._failed)
            )
            if schedule:
                self._resume_scheduled = True
        if schedule:
            self._call_soon_threadsafe(self._on_loop_resume)

    def _fail(self, name: str, exc: OSError) -> None:
        with self._cond:
            if self._failed:
                return
            self._failed = True
            self.error = f"{name}: {exc}"
            dropped = sum(op.cost for op in self._ops)
            self._ops = collections.deque(op for op in self._ops if not op.name)
            self._queued -= dropped
        self._call_soon_threadsafe(lambda: self._report_failure(name, exc))

    def _report_failure(self, name: str, exc: OSError) -> None:
        log.error(
            "capture_failed",
            directory=str(self.directory),
            file=name,
            error=str(exc),
            errno=exc.errno,
            action="capture stopped; the migration continues",
        )
        self._release_pause()
        if not self._closed:  # best effort: say so on disk now, from the writer thread
            data = self._session_json()
            with self._cond:
                self._ops.append(_Op("session.json", replace=data))
                self._cond.notify()
