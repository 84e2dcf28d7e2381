"""The capture observer: every byte of a session on disk, an event index and a session record.

The files, their names and the index schema are the capture format's
(``migtap.capture_format``, which readers import); ``capture_ram="none"`` cuts RAM out with
``migtap.observers.redact``; every disk write goes through one writer thread
(``migtap.observers.capture_writer``), whose queue holds the relay back when it passes its high
mark. A write error stops the capture, never the migration.

Every method of :class:`CaptureObserver` runs on the event loop and only hands work over,
except :meth:`CaptureObserver.wait_closed` (a worker thread). Closing: :meth:`contribute` adds
``capture_dir`` to the summary; :meth:`close` finishes the redaction, snapshots what
``session.json`` needs and enqueues it last; the writer writes it (``complete`` decided once
every other byte is on disk), logs ``capture_closed`` on the loop and ends;
:meth:`wait_closed` joins it.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import structlog

from migtap.capture_format import (
    EVENTS_FILE,
    FORMAT_VERSION,
    MAIN_FILES,
    SESSION_FILE,
    channel_file_name,
    event_record,
    jsonable,
    vmdesc_file_name,
)
from migtap.errors import CaptureError
from migtap.observers.base import Observer
from migtap.observers.capture_writer import CaptureWriter
from migtap.observers.redact import RamRedactor
from migtap.vocabulary import ChannelKind, Direction
from migtap.wire.events import VmDescription

if TYPE_CHECKING:
    from collections.abc import Callable

    from migtap.model import Migration
    from migtap.observers.capture_writer import WriterState
    from migtap.vocabulary import ChannelInfo, SessionSummary, Throttle
    from migtap.wire.events import Event

__all__ = ["CaptureObserver"]

log = structlog.get_logger("migtap.capture")

MiB: Final = 1024 * 1024
_EXTRA_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RESERVED: Final = frozenset({EVENTS_FILE, SESSION_FILE})
_DIR_MODE: Final = 0o700


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")


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


@dataclasses.dataclass(slots=True)
class _DirState:
    """What the observer knows about one direction of one channel."""

    file: str | None = None  # file name in the capture directory, once chosen
    main: bool = False  # one of the main files (never renamed)
    content: str = "exact"  # exact | ram_removed | omitted
    bytes_seen: int = 0
    redactor: RamRedactor | None = None

    def expected(self) -> int:
        """Bytes its file must hold once everything is written."""
        return self.bytes_seen if self.redactor is None else self.redactor.kept


class CaptureObserver(Observer):
    """Writes one session's capture directory (module docstring; the format:
    ``migtap.capture_format``)."""

    wants_chunks = True

    def __init__(
        self,
        migration: Migration,
        capture_dir: Path,
        *,
        throttle: Throttle,
        call_soon_threadsafe: Callable[[Callable[[], None]], object],
        capture_ram: Literal["full", "none"] = "full",
        queue_high: int = 64 * MiB,
        queue_low: int = 16 * MiB,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(migration)
        if capture_ram not in ("full", "none"):
            raise ValueError(f"capture_ram must be 'full' or 'none', got {capture_ram!r}")
        if not 0 <= queue_low <= queue_high:
            raise ValueError(f"need 0 <= queue_low <= queue_high, got {queue_low}, {queue_high}")
        self.session_id = operator.index(migration.session_id)  # an int, never a path
        self.capture_ram: Literal["full", "none"] = capture_ram
        self.config = dict(config) if config is not None else {}
        self._config_json = jsonable(self.config)
        self.started_wall = time.time()
        self.ended_wall: float | None = None
        try:
            self.directory = _make_session_dir(
                Path(capture_dir), self.session_id, self.started_wall
            )
        except OSError as exc:
            raise CaptureError(
                f"{capture_dir}: cannot create the capture directory: {exc}"
            ) from exc
        self._channels: dict[int, ChannelInfo] = {}
        self._dirs: dict[tuple[int, Direction], _DirState] = {}
        self._main_channel: int | None = None
        self._vmdesc_count = 0
        self._extra_files: list[str] = []
        self._summary: dict[str, Any] = {}
        self._closed = False
        #: Called on the loop when the writer fails (``capture_failed``), e.g. by the metrics.
        self.failure_hooks: list[Callable[[], None]] = []
        self.writer = CaptureWriter(
            self.directory,
            throttle=throttle,
            call_soon_threadsafe=call_soon_threadsafe,
            queue_high=queue_high,
            queue_low=queue_low,
            on_failure=self._on_writer_failed,
            name=f"migtap-capture-s{self.session_id}",
        )
        self.writer.append_record(
            EVENTS_FILE,
            {
                "v": FORMAT_VERSION,
                "t": migration.started,
                "kind": "capture_started",
                "session_id": self.session_id,
                "directory": str(self.directory),
                "capture_ram": self.capture_ram,
                "page_size": migration.page_size,
            },
        )
        self._write_session()
        log.info(
            "capture_started",
            directory=str(self.directory),
            session_id=self.session_id,
            capture_ram=self.capture_ram,
        )

    # -- state, for the relay and tests ------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Every byte meant for a file reached it (known once the writer finished)."""
        return self.writer.complete

    @property
    def error(self) -> str | None:
        return self.writer.error

    @property
    def paused_count(self) -> int:
        """How often the queue passed its high mark."""
        return self.writer.paused_count

    # -- Observer (on the loop) --------------------------------------------------------------------

    def on_channel(self, channel: ChannelInfo) -> None:
        self._channels[channel.index] = channel
        if not self._closed:
            self._write_session()

    def on_channel_changed(self, channel: ChannelInfo) -> None:
        """A new kind renames the channel's files (on the writer thread, after the bytes queued
        for the old name); a detached parser ends the redaction of its bytes."""
        self._channels[channel.index] = channel
        if self._closed:
            return
        for direction in Direction:
            state = self._dirs.get((channel.index, direction))
            if state is None:
                continue
            if state.file is not None and not state.main and not self.writer.failed:
                new = channel_file_name(channel.index, channel.kind, direction)
                if new != state.file:
                    self.writer.rename(state.file, new)
                    state.file = new
            if state.redactor is not None and channel.parse_error is not None:
                self._write_pieces(state, state.redactor.detach())
        self._write_session()

    def on_chunk(
        self, channel: ChannelInfo, direction: Direction, offset: int, chunk: bytes
    ) -> None:
        if self.writer.failed or self._closed or not chunk:
            return
        state = self._dirs.get((channel.index, direction))
        if state is None:
            self._channels.setdefault(channel.index, channel)
            state = self._dir_state(channel, Direction(direction))
        state.bytes_seen += len(chunk)
        if state.content == "omitted":
            return
        redactor = state.redactor
        if redactor is None:
            self._write_pieces(state, (chunk,))
            return
        if channel.parse_error is not None:
            redactor.stop("parser_detached")
        self._write_pieces(state, redactor.feed(chunk))

    def on_event(self, channel: ChannelInfo, direction: Direction, event: Event) -> None:
        """One index line, its ``t`` the model's time for the event (``migration.now``)."""
        if self.writer.failed or self._closed:
            return
        if isinstance(event, VmDescription):
            self._vmdesc_count += 1
            self.writer.replace(vmdesc_file_name(self._vmdesc_count), event.json_bytes)
        record = event_record(
            event, channel=channel.index, direction=direction, t=self.migration.now
        )
        self.writer.append_record(EVENTS_FILE, record)
        state = self._dirs.get((channel.index, direction))
        if state is not None and state.redactor is not None:
            pieces = state.redactor.frame(event, page_size=self.migration.page_size)
            self._write_pieces(state, pieces)

    def on_channel_closed(self, channel: ChannelInfo) -> None:
        if self._closed:
            return
        self._channels[channel.index] = channel
        for direction in Direction:
            self._finish_redaction(channel.index, direction)
        self._write_session()

    def contribute(self, summary: SessionSummary) -> None:
        summary.fields["capture_dir"] = str(self.directory)

    def close(self, summary: SessionSummary) -> None:
        """Finish the redaction, snapshot what ``session.json`` needs and hand the final write
        to the writer thread; never blocks. ``capture_closed`` is logged on the loop once the
        writer is done."""
        if self._closed:
            return
        for info in summary.channels:
            self._channels.setdefault(info.index, info)
        for index, direction in list(self._dirs):
            self._finish_redaction(index, direction)
        self._closed = True
        self.ended_wall = time.time()
        self._summary = {
            "outcome": jsonable(summary.outcome),
            "started": _iso(summary.started_wall),
            "ended": _iso(summary.ended_wall),
            "started_t": summary.started_wall,
            "ended_t": summary.ended_wall,
            "fields": jsonable(summary.fields),
            "qemu": jsonable(summary.details.get("qemu")),
        }
        expected = {
            state.file: state.expected() for state in self._dirs.values() if state.file is not None
        }
        self.writer.finish(self._renderer(), expected=expected, on_closed=self._on_closed)
        self.writer.release_pause()  # the session's sockets are done; nothing to hold back

    def wait_closed(self, timeout_s: float) -> bool:
        """Join the writer thread (in a worker thread); False if it is still writing."""
        return self.writer.join(timeout_s)

    # -- for other observers -----------------------------------------------------------------------

    def write_file(self, name: str, data: bytes | Callable[[], bytes]) -> None:
        """Write a whole extra file (say ``annotated.jsonl``) into the capture directory: 0600,
        atomically, on the writer thread. ``name`` is a plain file name that none of the
        capture's own files use; call before :meth:`close`. ``data`` may be a callable, run on
        the writer thread (to keep serialising off the loop)."""
        if not _EXTRA_NAME_RE.fullmatch(name) or name in _RESERVED or name.endswith(".bin"):
            raise ValueError(f"not a free file name in a capture directory: {name!r}")
        if name.startswith("vmdesc") or self._closed:
            raise ValueError(f"cannot write {name!r}: reserved, or the capture is closed")
        if name not in self._extra_files:
            self._extra_files.append(name)
        self.writer.replace(name, data if callable(data) else bytes(data))

    # -- helpers (on the loop) ---------------------------------------------------------------------

    def _dir_state(self, channel: ChannelInfo, direction: Direction) -> _DirState:
        key = (channel.index, direction)
        state = self._dirs.get(key)
        if state is not None:
            return state
        state = _DirState()
        kind = channel.kind
        if kind is ChannelKind.MAIN and self._main_channel in (None, channel.index):
            self._main_channel = channel.index
            state.file = MAIN_FILES[direction.value]
            state.main = True
        else:
            state.file = channel_file_name(channel.index, kind, direction)
        if self.capture_ram == "none" and direction is Direction.SRC_TO_DST:
            if kind in (ChannelKind.MAIN, ChannelKind.MULTIFD):
                state.content = "ram_removed"
                state.redactor = RamRedactor()
            else:
                state.content = "omitted"
                state.file = None
        self._dirs[key] = state
        return state

    def _write_pieces(self, state: _DirState, pieces: tuple[bytes, ...] | list[bytes]) -> None:
        if state.file is None:
            return
        for piece in pieces:
            self.writer.append(state.file, piece)

    def _finish_redaction(self, index: int, direction: Direction) -> None:
        state = self._dirs.get((index, direction))
        if state is None or state.redactor is None or self.writer.failed:
            return
        channel = self._channels.get(index)
        detached = channel is not None and channel.parse_error is not None
        self._write_pieces(state, state.redactor.finish(parser_detached=detached))

    def _write_session(self) -> None:
        self.writer.write_session(self._renderer())

    def _on_writer_failed(self) -> None:
        """On the loop, after ``capture_failed`` was logged: say so on disk, best effort."""
        for hook in self.failure_hooks:
            hook()
        if not self._closed:
            self._write_session()

    def _on_closed(self, state: WriterState, session_error: OSError | None) -> None:
        """On the loop, once the writer wrote the last ``session.json`` and ended."""
        self.writer.release_pause()
        if session_error is not None:
            log.warning(
                "capture_session_file_failed",
                directory=str(self.directory),
                file=SESSION_FILE,
                error=str(session_error),
            )
        log.info(
            "capture_closed",
            directory=str(self.directory),
            bytes_written=sum(state.written.values()),
            complete=state.complete,
            error=state.error,
        )

    # -- session.json ------------------------------------------------------------------------------

    def _renderer(self) -> Callable[[WriterState], bytes]:
        """A snapshot of ``session.json`` taken now (on the loop), rendered later on the writer
        thread with its byte counts, ``error`` and ``complete``."""
        doc = self._session_doc()

        def render(state: WriterState) -> bytes:
            for channel in doc["channels"]:
                for entry in channel["files"].values():
                    name = entry["file"]
                    entry["bytes_written"] = state.written.get(name, 0) if name else 0
            doc["complete"] = state.complete
            doc["error"] = state.error
            return (json.dumps(doc, indent=2) + "\n").encode()

        return render

    def _session_doc(self) -> dict[str, Any]:
        channels = []
        for index in sorted(self._channels):
            info = self._channels[index]
            files = {
                direction.value: self._file_entry(
                    self._dirs.get((index, direction)), info, direction
                )
                for direction in Direction
            }
            channels.append(
                {
                    "index": info.index,
                    "pipe_id": info.pipe_id,
                    "kind": jsonable(info.kind),
                    "multifd_id": info.multifd_id,
                    "source": info.source,
                    "destination": info.destination,
                    "started": _iso(info.started_wall),
                    "ended": _iso(info.ended_wall),
                    "bytes_src_to_dst": info.bytes_src_to_dst,
                    "bytes_dst_to_src": info.bytes_dst_to_src,
                    "close_reason": info.close_reason,
                    "first_closed": jsonable(info.first_closed),
                    "reset_by": jsonable(info.reset_by),
                    "kernel_view": (
                        None if info.kernel_view is None else info.kernel_view.as_dict()
                    ),
                    "parse_error": info.parse_error,
                    "files": files,
                }
            )
        summary = self._summary
        return {
            "v": FORMAT_VERSION,
            "session_id": self.session_id,
            "directory": str(self.directory),
            "started": _iso(self.started_wall),
            "ended": _iso(self.ended_wall),
            "outcome": summary.get("outcome"),
            "session_started": summary.get("started"),
            "session_ended": summary.get("ended"),
            "started_t": summary.get("started_t"),
            "ended_t": summary.get("ended_t"),
            "summary": summary.get("fields", {}),
            "qemu": summary.get("qemu"),
            "capture_ram": self.capture_ram,
            "page_size": self.migration.page_size,
            "complete": False,
            "error": None,
            "closed": self._closed,
            "channels": channels,
            "vmdesc_files": [vmdesc_file_name(n) for n in range(1, self._vmdesc_count + 1)],
            "extra_files": list(self._extra_files),
            "config": self._config_json,
        }

    @staticmethod
    def _file_entry(
        state: _DirState | None, info: ChannelInfo, direction: Direction
    ) -> dict[str, Any]:
        if state is None:
            seen = info.bytes(direction)
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
            "bytes_written": 0,  # filled in by the writer
        }
        if state.redactor is not None:
            entry.update(state.redactor.entry())
        return entry
