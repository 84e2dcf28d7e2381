"""The tap: parsers in, session model in the middle, observers out.

For every connection of a session it picks parsers by the channel's kind (main stream and return
path, multifd, postcopy-preempt once a header-less channel shows its first record, or none),
feeds them each chunk *after* the relay forwarded it, applies their events to the session model
(``migtap.model.Migration``) and hands chunks, events and model changes to the observers. Device
state is decoded off the loop (``migtap.decode``).

Failures: a parser that meets damage is logged once (``parser_detached``) and detached; a parser
bug (anything but a ``StreamError``) is logged as ``parser_crashed`` and detached the same way; an
observer that raises is logged once (``observer_detached``) and detached, and every other
observer still gets every call. The bytes keep flowing either way. Nothing here touches a socket;
the relay (live) or ``migtap analyze`` (offline) drives it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import structlog

from migtap.decode import DeviceKeeper, run_inline
from migtap.errors import StreamError, TruncatedStream
from migtap.model import summarize
from migtap.observers.base import Observer as ObserverBase
from migtap.vocabulary import ChannelKind, Direction, Peer
from migtap.wire.events import DeviceState, VmDescription
from migtap.wire.multifd import MultifdParser
from migtap.wire.preempt import PROBE_BYTES, PreemptParser, looks_like_preempt
from migtap.wire.return_path import ReturnPathParser
from migtap.wire.stream import StreamParser

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from migtap.annotate.vmsd import VmDescription as Desc
    from migtap.decode import Offload
    from migtap.model import Change, DeviceBatch, Migration
    from migtap.observers.base import Observer
    from migtap.observers.live_view import LiveView
    from migtap.vocabulary import ChannelInfo, SessionSummary
    from migtap.wire.events import Event
    from migtap.wire.parser import Parser

log = structlog.get_logger("migtap.tap")

TAIL_BYTES: Final = 64  # how much of the main stream we keep to show where a destination gave up


@dataclass(frozen=True, slots=True)
class TapSettings:
    page_size: int = 4096
    capture_dir: Path | None = None
    capture_ram: Literal["full", "none"] = "full"
    vmdesc: Desc | None = None
    progress_interval_s: float = 1.0
    config: dict[str, object] | None = None
    live_view: LiveView | None = None  # the process-wide live view (--progress bar), if any


class ChannelTap:
    """The parsers of one connection, one per direction."""

    __slots__ = ("d2s", "info", "probe", "s2d", "tail")

    def __init__(self, info: ChannelInfo, page_size: int) -> None:
        """Parsers by the channel's kind; ``page_size`` is the stream's as known so far."""
        self.info = info
        self.s2d: Parser | None = None
        self.d2s: Parser | None = None
        self.tail = b""  # the main channel's last bytes forwarded, for error reports
        # A header-less channel: its first bytes are kept until they tell whether it is a
        # postcopy-preempt channel (then parsed) or not (then only relayed and captured).
        self.probe: bytearray | None = None
        kind = info.kind
        if kind is ChannelKind.MAIN:
            self.s2d = StreamParser(page_size=page_size)
            self.d2s = ReturnPathParser()
        elif kind is ChannelKind.MULTIFD:
            self.s2d = MultifdParser(page_size=page_size)
        elif kind is ChannelKind.UNKNOWN:
            self.probe = bytearray()

    def parser(self, direction: Direction) -> Parser | None:
        return self.s2d if direction is Direction.SRC_TO_DST else self.d2s

    def detach(self, direction: Direction) -> None:
        if direction is Direction.SRC_TO_DST:
            self.s2d = None
        else:
            self.d2s = None


class SessionTap:
    """Everything the tap does for one migration session (module docstring).

    ``observers`` come from ``migtap.observers.build_observers``, in close order. ``offload``
    runs device-state decoding jobs (live: a worker thread; default: inline). ``clock`` gives
    the wall-clock time stamped on events, in the model and in the capture's index alike.
    """

    def __init__(
        self,
        migration: Migration,
        observers: Sequence[Observer],
        *,
        vmdesc: Desc | None = None,
        progress_interval_s: float = 1.0,
        offload: Offload = run_inline,
        clock: Callable[[], float] = time.time,
        live: bool = True,
        logger: Any = None,  # noqa: ANN401 - a structlog logger; offline passes a quiet one
        capture_dir: str | None = None,
    ) -> None:
        self.migration = migration
        self.capture_dir = capture_dir  # named in the replay command of a failure report
        self.session_id = migration.session_id
        self.log = (log if logger is None else logger).bind(session=migration.session_id)
        self.observers: tuple[Observer, ...] = tuple(observers)
        self._chunk_observers = tuple(o for o in self.observers if o.wants_chunks)
        # Per event, only the observers that listen to events or model changes (most do not).
        self._event_observers = tuple(o for o in self.observers if _hears_events(o))
        self.devices = DeviceKeeper(fallback=vmdesc)
        self.offload = offload
        self.clock = clock
        self.live = live
        self.progress_interval_s = progress_interval_s
        self._last_tick = migration.started
        self.channels: list[ChannelTap] = []
        self.closed = False
        self._model_failed = False
        #: Told the source VM's UUID once the main channel's configuration shows it (groups
        #: multifd channels), or None when the configuration has none (no ``validate-uuid``).
        self.on_uuid: Callable[[bytes | None], None] | None = None
        self._uuid_told = False

    # -- channels -----------------------------------------------------------------------------
    def add_channel(self, info: ChannelInfo) -> ChannelTap:
        tap = ChannelTap(info, self.migration.page_size)
        self.channels.append(tap)
        self.migration.add_channel(info)
        self._notify(lambda o: o.on_channel(info))
        kind = info.kind
        if tap.s2d is None and tap.probe is None and kind is not ChannelKind.POSTCOPY_PREEMPT:
            self.log.info(
                "channel_not_parsed",
                ch=info.index,
                kind=kind.value,
                reason={
                    ChannelKind.TLS: "TLS: encrypted, passed through",
                    ChannelKind.HTTP: "an HTTP request, not QEMU: passed through",
                }.get(kind, "not a main or multifd channel: passed through"),
            )
        if kind is ChannelKind.POSTCOPY_PREEMPT:  # offline: known from the capture
            self.start_parser(tap)
        return tap

    def start_parser(self, tap: ChannelTap) -> None:
        """(Re)start the source-to-destination parser of a multifd or postcopy-preempt channel
        with what the main channel told so far (page size, RAM blocks)."""
        if tap.info.kind is ChannelKind.MULTIFD:
            tap.s2d = MultifdParser(page_size=self.migration.page_size)
        elif tap.info.kind is ChannelKind.POSTCOPY_PREEMPT:
            tap.s2d = self._preempt_parser()

    def _preempt_parser(self) -> PreemptParser:
        m = self.migration
        return PreemptParser(m.page_size, m.ram_blocks)

    def _probe(self, tap: ChannelTap, chunk: bytes) -> bytes | None:
        """A header-less channel's first bytes: None while undecided; once it is a
        postcopy-preempt channel, every byte so far (to parse); ``b""`` if it is not one."""
        probe = tap.probe
        assert probe is not None
        head = bytes(probe) + chunk[:PROBE_BYTES]
        verdict = looks_like_preempt(head, [b.idstr for b in self.migration.ram_blocks])
        if verdict is None:
            probe += chunk[: PROBE_BYTES - len(probe)]
            return None
        tap.probe = None
        info = tap.info
        if not verdict:
            self.log.info(
                "channel_not_parsed",
                ch=info.index,
                kind=info.kind.value,
                reason="neither a main, multifd nor postcopy-preempt channel: passed through",
                first_bytes_hex=head[:16].hex(),
            )
            return b""
        info.kind = ChannelKind.POSTCOPY_PREEMPT
        tap.s2d = self._preempt_parser()
        self.log.info("channel_identified", ch=info.index, kind=info.kind.value)
        self._notify(lambda o: o.on_channel_changed(info))
        return bytes(probe) + chunk

    # -- bytes in -------------------------------------------------------------------------------
    def on_chunk(self, tap: ChannelTap, direction: Direction, offset: int, chunk: bytes) -> None:
        """``chunk`` was forwarded (live)."""
        info = tap.info
        s2d = direction is Direction.SRC_TO_DST
        data: bytes | None = chunk
        if s2d:
            info.bytes_src_to_dst = offset + len(chunk)
            if info.kind is ChannelKind.MAIN:  # keep its tail for error reports
                tap.tail = (tap.tail + chunk[-TAIL_BYTES:])[-TAIL_BYTES:]
            if tap.probe is not None:
                data = self._probe(tap, chunk)  # may rename the channel before the capture sees it
        else:
            info.bytes_dst_to_src = offset + len(chunk)
        for observer in self._chunk_observers:
            try:
                observer.on_chunk(info, direction, offset, chunk)
            except Exception as exc:  # noqa: BLE001 - an observer must never break the relay
                self._detach(observer, exc)
        if data and tap.parser(direction) is not None:
            self.feed(tap, direction, data)

    def feed(self, tap: ChannelTap, direction: Direction, data: bytes | None) -> None:
        """Parse ``data`` (None: the end of that direction) and deliver the events, stamped with
        the clock's time; a failure detaches that parser after its last events are delivered."""
        events, failure = self.parse(tap, direction, data)
        if events:
            self.deliver(tap, direction, events, self.clock())
        if failure is not None:
            self.parser_failed(tap, direction, failure, at_eof=data is None)

    @staticmethod
    def parse(
        tap: ChannelTap, direction: Direction, data: bytes | None
    ) -> tuple[Sequence[Event], Exception | None]:
        """Feed one direction's parser: its events, and the exception that stopped it, if any
        (with the events it parsed before that)."""
        parser = tap.parser(direction)
        if parser is None:
            return (), None
        try:
            return (parser.feed(data) if data is not None else parser.feed_eof()), None
        except StreamError as exc:
            return exc.events, exc
        except Exception as exc:  # noqa: BLE001 - a parser bug must not break the migration
            return (), exc

    def deliver(
        self, tap: ChannelTap, direction: Direction, events: Sequence[Event], now: float
    ) -> None:
        """Apply events to the model, then hand each (and what it changed) to the observers."""
        info = tap.info
        migration = self.migration
        for event in events:
            changes = self._apply(info, direction, event, now)
            for observer in self._event_observers:
                try:
                    observer.on_event(info, direction, event)
                    for change in changes:
                        observer.on_change(change)
                except Exception as exc:  # noqa: BLE001 - an observer must never break the relay
                    self._detach(observer, exc)
        if not self._uuid_told and migration.machine_type is not None:  # configuration seen
            self._uuid_told = True
            if self.on_uuid is not None:
                self.on_uuid(migration.uuid)

    def _apply(
        self, info: ChannelInfo, direction: Direction, event: Event, now: float
    ) -> list[Change]:
        """The model's update for one event (and device state kept for decoding)."""
        changes: list[Change] = []
        if not self._model_failed:
            try:
                changes = self.migration.apply(info, direction, event, now)
            except Exception as exc:  # a model bug must not break the relay
                self._model_failed = True
                self.log.exception(
                    "model_crashed",
                    error=repr(exc),
                    action="the live picture stops here; bytes keep flowing, the capture is kept",
                )
        if isinstance(event, DeviceState):
            self.devices.keep(event)
        elif isinstance(event, VmDescription):
            self._submit(self.devices.job(event, live=self.live))
        return changes

    def _submit(self, job: Callable[[], DeviceBatch] | None) -> None:
        if job is not None:
            self.offload(job, self._devices_done)

    def _devices_done(self, batch: DeviceBatch) -> None:
        """A decoding job's result, back on the loop."""
        if self.closed:
            return
        try:
            changes = self.migration.apply_devices(batch, self.clock())
        except Exception as exc:
            self.log.exception("model_crashed", error=repr(exc), exc_info=exc)
            return
        for change in changes:
            self._notify(lambda o, c=change: o.on_change(c))  # type: ignore[misc]

    def channel_closed(
        self,
        tap: ChannelTap,
        close_reason: str | None,
        first_closed: Peer | None = None,
        reset_by: Peer | None = None,
        *,
        ended_wall: float | None = None,
    ) -> None:
        info = tap.info
        info.ended_wall = ended_wall if ended_wall is not None else time.time()
        info.close_reason = close_reason
        info.first_closed = first_closed
        info.reset_by = reset_by
        if tap.probe is not None:
            tap.probe = None
            self.log.info(
                "channel_not_parsed",
                ch=info.index,
                kind=info.kind.value,
                reason="closed before its first bytes told what it carries"
                if info.bytes_src_to_dst
                else "closed without sending a byte",
                bytes=info.bytes_src_to_dst,
            )
        for direction in Direction:
            if tap.parser(direction) is not None:
                self.feed(tap, direction, None)
        if info.kind is ChannelKind.MAIN:
            self._report_early_close(tap)
        self._notify(lambda o: o.on_channel_closed(info))

    # -- periodic and end -----------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Call often; once per progress interval the model samples its rates and observers
        get ``on_tick``."""
        now = self.clock() if now is None else now
        if now - self._last_tick < self.progress_interval_s:
            return
        self._last_tick = now
        self.migration.sample(now)
        self._notify(lambda o: o.on_tick())

    def finish(self) -> None:
        """The last connection closed: hand the remaining device state to the decoder (the
        relay waits for the offloaded work before :meth:`close`)."""
        self._submit(self.devices.job(final=True, live=self.live))

    def close(self) -> SessionSummary:
        """End the session: the summary from the model, then the observers' two close phases
        (contribute, close), each in the factory's order. Never blocks."""
        self.closed = True
        now = self.clock()
        self.migration.end(now)
        summary = summarize(self.migration, started_wall=self.migration.started, ended_wall=now)
        self._notify(lambda o: o.contribute(summary))
        self._notify(lambda o: o.close(summary))
        return summary

    def wait_closed(self, timeout_s: float) -> bool:
        """Blocking: wait for the observers' threads (the capture writer). Run in a worker."""
        done = True
        for observer in self.observers:
            try:
                done &= observer.wait_closed(timeout_s)
            except Exception as exc:
                self.log.exception("observer_close_failed", observer=type(observer).__name__,
                               error=repr(exc))  # fmt: skip
                done = False
        return done

    # -- failures -------------------------------------------------------------------------------
    def parser_failed(
        self, tap: ChannelTap, direction: Direction, exc: Exception, *, at_eof: bool = False
    ) -> None:
        tap.detach(direction)
        info = tap.info
        if at_eof and isinstance(exc, TruncatedStream):
            self._stream_cut(tap, direction, exc)  # the connection ended inside a record
            return
        if info.parse_error is None:
            info.parse_error = f"{direction.value}: {exc}"
        fields: dict[str, object] = {
            "ch": info.index,
            "kind": info.kind.value,
            "direction": direction.value,
            "error": str(exc),
            "error_type": type(exc).__name__,
            "action": "parser detached; bytes keep flowing, the capture is kept",
        }
        if isinstance(exc, StreamError):
            fields.update(offset=exc.offset, state=exc.state)
            section = self.migration.last_section
            if (
                section is not None
                and info.kind is ChannelKind.MAIN
                and direction is Direction.SRC_TO_DST
            ):
                fields["section"] = section.as_dict()
            self.log.warning("parser_detached", **fields)
        else:
            self.log.error("parser_crashed", **fields, exc_info=exc)
        self._notify(lambda o: o.on_channel_changed(info))

    def _stream_cut(self, tap: ChannelTap, direction: Direction, exc: StreamError) -> None:
        section = self.migration.last_section
        self.log.info(
            "stream_cut",
            ch=tap.info.index,
            kind=tap.info.kind.value,
            direction=direction.value,
            offset=exc.offset,
            state=exc.state,
            section=None if section is None or direction is Direction.DST_TO_SRC else section.idstr,
            close_reason=tap.info.close_reason,
        )

    def _report_early_close(self, tap: ChannelTap) -> None:
        """The destination failed: say which stream offsets it can have been reading, and what
        sections they belong to (rules in docs/tap.md, "Where a destination failed")."""
        info = tap.info
        m = self.migration
        failure = m.destination_failed(info)
        if failure is None:
            return
        section = m.last_section
        end = info.bytes_src_to_dst
        names = [f"{s.idstr or s.section_id} ({s.instance_id})" for s in failure.sections]
        replay = (
            f"migtap replay {self.capture_dir} --qemu -- <the destination's QEMU command line>"
            if self.capture_dir is not None
            else "migtap listen ... --capture DIR, then migtap replay DIR/<session> --qemu -- "
            "<the destination's QEMU command line>"
        )
        self.log.warning(
            "destination_closed_early",
            ch=info.index,
            close_reason=info.close_reason,
            phase=m.phase_text,
            failure=failure.as_dict(),
            failed_in=names if len(names) <= 8 else [*names[:4], "...", *names[-3:]],
            section_in_flight=None if section is None else section.as_dict(),
            bytes_forwarded=end,
            last_bytes_offset=end - len(tap.tail),
            last_bytes_hex=tap.tail.hex(" "),
            shut_value=m.shut_value,
            action=f"the destination QEMU failed to load while reading offsets "
            f"{failure.offset_min}..{failure.offset_max}; its log names the field; for the "
            f"exact record: {replay}",
        )

    def _detach(self, observer: Observer, exc: Exception) -> None:
        if observer not in self.observers:
            return
        self.observers = tuple(o for o in self.observers if o is not observer)
        self._chunk_observers = tuple(o for o in self._chunk_observers if o is not observer)
        self._event_observers = tuple(o for o in self._event_observers if o is not observer)
        self.log.error(
            "observer_detached",
            observer=type(observer).__name__,
            error=repr(exc),
            action="the migration continues without it",
            exc_info=exc,
        )

    def _notify(self, call: Callable[[Observer], None]) -> None:
        """Call every observer, each guarded; a detach never makes another one miss the call."""
        for observer in self.observers:  # a tuple: detaching replaces it, never mutates it
            try:
                call(observer)
            except Exception as exc:  # noqa: BLE001 - an observer must never break the relay
                self._detach(observer, exc)


def _hears_events(observer: Observer) -> bool:
    """Whether ``observer`` overrides ``on_event`` or ``on_change`` (the base's are no-ops)."""
    cls = type(observer)
    return cls.on_event is not ObserverBase.on_event or cls.on_change is not ObserverBase.on_change
