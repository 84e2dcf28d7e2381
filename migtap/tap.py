"""The tap: joins a relay session to the wire parsers and the sinks.

For every connection of a session it picks parsers by the channel's first bytes (main stream
and return path, multifd, or none), feeds them each chunk *after* the relay forwarded it, and
hands chunks and events to the sinks (progress, annotate, capture). A parser error is logged
once and that parser detached; a failing sink is logged once and detached; the bytes keep
flowing either way. Nothing here touches a socket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import structlog

from migtap.annotate.live import AnnotateSink
from migtap.errors import StreamError, TruncatedStream
from migtap.relay.pipe import Direction
from migtap.sinks import ChannelInfo, SessionSummary, Sink, Throttle
from migtap.sinks.progress import ProgressSink
from migtap.wire.channel import ChannelKind
from migtap.wire.multifd import MultifdParser
from migtap.wire.preempt import PROBE_BYTES, PreemptParser, looks_like_preempt
from migtap.wire.return_path import ReturnPathParser
from migtap.wire.stream import StreamParser

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from migtap.annotate.vmsd import VmDescription

log = structlog.get_logger("migtap.tap")

Parser = StreamParser | MultifdParser | ReturnPathParser | PreemptParser
TAIL_BYTES = 64  # how much of the main stream we keep to show where a destination gave up


@dataclass(frozen=True, slots=True)
class TapSettings:
    page_size: int = 4096
    capture_dir: Path | None = None
    capture_ram: Literal["full", "none"] = "full"
    vmdesc: VmDescription | None = None
    progress_interval_s: float = 1.0
    config: dict[str, object] | None = None


class ChannelTap:
    """The parsers of one connection, one per direction."""

    __slots__ = ("d2s", "failed", "info", "probe", "s2d", "tail")

    def __init__(self, info: ChannelInfo, kind: ChannelKind, page_size: int) -> None:
        self.info = info
        self.s2d: Parser | None = None
        self.d2s: Parser | None = None
        self.failed = False
        self.tail = b""
        # A header-less channel: its first bytes are kept until they tell whether it is a
        # postcopy-preempt channel (then parsed) or not (then only relayed and captured).
        self.probe: bytearray | None = bytearray() if kind is ChannelKind.UNKNOWN else None
        if kind is ChannelKind.MAIN:
            self.s2d = StreamParser(page_size=page_size)
            self.d2s = ReturnPathParser()
        elif kind is ChannelKind.MULTIFD:
            self.s2d = MultifdParser(page_size=page_size)


class SessionTap:
    """Everything the tap does for one migration session."""

    def __init__(
        self,
        session_id: int,
        settings: TapSettings,
        *,
        throttle: Throttle,
        call_soon_threadsafe: Callable[[Callable[[], None]], object],
    ) -> None:
        self.session_id = session_id
        self.settings = settings
        self.log = log.bind(session=session_id)
        self.started_wall = time.time()
        self.progress = ProgressSink(session_id, interval_s=settings.progress_interval_s)
        self.capture: Sink | None = None
        self.capture_dir: Path | None = None
        write_file: Callable[[str, bytes], None] | None = None
        if settings.capture_dir is not None:
            from migtap.sinks.capture import CaptureSink  # noqa: PLC0415 - only when capturing

            try:
                capture = CaptureSink(
                    settings.capture_dir,
                    session_id,
                    capture_ram=settings.capture_ram,
                    throttle=throttle,
                    call_soon_threadsafe=call_soon_threadsafe,
                    config=settings.config,
                    page_size=settings.page_size,
                )
            except Exception as exc:  # noqa: BLE001 - the tap never breaks a migration
                self.log.warning(
                    "capture_unavailable",
                    error=repr(exc),
                    action="migration continues without a capture",
                )
            else:
                self.capture = capture
                self.capture_dir = capture.directory
                write_file = capture.write_file
        self.annotate = AnnotateSink(session_id, fallback=settings.vmdesc, write_file=write_file)
        # Order matters at the end: progress logs the summary, annotate writes its file through
        # the capture, then the capture closes.
        self.sinks: list[Sink] = [self.progress, self.annotate]
        if self.capture is not None:
            self.sinks.append(self.capture)
        # Only the capture wants raw chunks; the others follow events (hot path: no idle calls).
        self.chunk_sinks: list[Sink] = [self.capture] if self.capture is not None else []
        self.channels: list[ChannelTap] = []
        #: Told the source VM's UUID once the main channel shows it (groups multifd channels).
        self.on_uuid: Callable[[bytes], None] | None = None
        self._uuid_told = False

    # -- channels -----------------------------------------------------------------------------
    def add_channel(self, info: ChannelInfo, kind: ChannelKind) -> ChannelTap:
        tap = ChannelTap(info, kind, self.settings.page_size)
        self.channels.append(tap)
        self._each_sink(lambda s: s.on_channel(info))
        if tap.s2d is None and tap.probe is None and kind is not ChannelKind.MULTIFD:
            self.log.info(
                "channel_not_parsed",
                ch=info.index,
                kind=kind.value,
                reason={
                    ChannelKind.TLS: "TLS: encrypted, passed through",
                    ChannelKind.HTTP: "an HTTP request, not QEMU: passed through",
                }.get(kind, "not a main or multifd channel: passed through"),
            )
        return tap

    def _probe(self, tap: ChannelTap, chunk: bytes) -> bytes | None:
        """A header-less channel's first bytes: None while undecided; once it is a
        postcopy-preempt channel, every byte so far (to parse); ``b""`` if it is not one."""
        probe = tap.probe
        assert probe is not None
        head = bytes(probe) + chunk[:PROBE_BYTES]
        main = next((t.s2d for t in self.channels if isinstance(t.s2d, StreamParser)), None)
        blocks = main.ram_blocks if main is not None else ()
        verdict = looks_like_preempt(head, [b.idstr for b in blocks])
        if verdict is None:
            probe += chunk[: PROBE_BYTES - len(probe)]
            return None
        tap.probe = None
        info = tap.info
        if not verdict:
            self.log.info(
                "channel_not_parsed",
                ch=info.index,
                kind=info.kind,
                reason="neither a main, multifd nor postcopy-preempt channel: passed through",
                first_bytes_hex=head[:16].hex(),
            )
            return b""
        info.kind = "postcopy-preempt"
        page_size = main.page_size if main is not None else self.settings.page_size
        tap.s2d = PreemptParser(page_size, blocks)
        self.log.info("channel_identified", ch=info.index, kind=info.kind)
        return bytes(probe) + chunk

    def on_chunk(self, tap: ChannelTap, direction: Direction, offset: int, chunk: bytes) -> None:
        info = tap.info
        s2d = direction is Direction.SRC_TO_DST
        if s2d:
            info.bytes_src_to_dst = offset + len(chunk)
            if tap.d2s is not None:  # main channel: keep its tail for error reports
                tap.tail = (tap.tail + chunk[-TAIL_BYTES:])[-TAIL_BYTES:]
        else:
            info.bytes_dst_to_src = offset + len(chunk)
        data: bytes | None = chunk
        if tap.probe is not None and s2d:
            data = self._probe(tap, chunk)  # may rename the channel before the capture sees it
        for sink in self.chunk_sinks:
            try:
                sink.on_chunk(info, direction, offset, chunk)
            except Exception as exc:  # noqa: BLE001 - a sink must never break the relay
                self._sink_failed(sink, exc)
        parser = tap.s2d if s2d else tap.d2s
        if parser is not None and data:
            self._parse(tap, direction, parser, data)

    def _parse(
        self, tap: ChannelTap, direction: Direction, parser: Parser, chunk: bytes | None
    ) -> None:
        try:
            events: Sequence[object] = (
                parser.feed(chunk) if chunk is not None else parser.feed_eof()
            )
        except TruncatedStream as exc:
            events = list(getattr(parser, "events_before_error", []))
            self._deliver(tap, direction, events)
            if chunk is None:  # the connection ended inside a record: say where, once
                self._stream_cut(tap, direction, exc)
            else:
                self._parser_failed(tap, direction, exc)
            return
        except StreamError as exc:
            events = list(getattr(parser, "events_before_error", []))
            self._deliver(tap, direction, events)
            self._parser_failed(tap, direction, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a parser bug must not break the migration
            self._parser_failed(tap, direction, exc)
            return
        if events:
            self._deliver(tap, direction, events)
            if not self._uuid_told and self.progress.view.uuid is not None:
                self._uuid_told = True
                if self.on_uuid is not None:
                    self.on_uuid(self.progress.view.uuid)

    def _deliver(self, tap: ChannelTap, direction: Direction, events: Sequence[object]) -> None:
        info = tap.info
        for sink in self.sinks:
            try:
                for event in events:
                    sink.on_event(info, direction, event)
            except Exception as exc:  # noqa: BLE001 - a sink must never break the relay
                self._sink_failed(sink, exc)

    def channel_closed(
        self,
        tap: ChannelTap,
        close_reason: str | None,
        first_closed: str | None = None,
        reset_by: str | None = None,
    ) -> None:
        info = tap.info
        info.ended_wall = time.time()
        info.close_reason = close_reason
        info.first_closed = first_closed
        info.reset_by = reset_by
        if tap.probe is not None:
            tap.probe = None
            self.log.info(
                "channel_not_parsed",
                ch=info.index,
                kind=info.kind,
                reason="closed before its first bytes told what it carries"
                if info.bytes_src_to_dst
                else "closed without sending a byte",
                bytes=info.bytes_src_to_dst,
            )
        for direction, parser in ((Direction.SRC_TO_DST, tap.s2d), (Direction.DST_TO_SRC, tap.d2s)):
            if parser is not None:
                self._parse(tap, direction, parser, None)
        if tap.d2s is not None or info.kind == "main":
            self._report_early_close(tap)
        self._each_sink(lambda s: s.on_channel_closed(info))

    # -- periodic and end ---------------------------------------------------------------------
    def tick(self) -> None:
        try:
            self.progress.tick()
        except Exception as exc:  # noqa: BLE001
            self._sink_failed(self.progress, exc)

    def close(self) -> SessionSummary:
        outcome = self.progress.outcome()
        fields = self.progress.summary_fields(
            outcome, str(self.capture_dir) if self.capture_dir is not None else None
        )
        summary = SessionSummary(
            session_id=self.session_id,
            outcome=outcome,
            started_wall=self.started_wall,
            ended_wall=time.time(),
            channels=[t.info for t in self.channels],
            fields=fields,
            details={"qemu": self.progress.generation_details()},
        )
        # Annotate first (it adds its counts to the summary), then the progress line, then the
        # capture, which writes session.json with everything.
        order = [
            self.annotate,
            self.progress,
            *(s for s in self.sinks if s not in (self.annotate, self.progress)),
        ]
        for sink in order:
            if sink in self.sinks:
                try:
                    sink.on_close(summary)
                except Exception as exc:  # noqa: BLE001
                    self._sink_failed(sink, exc)
        return summary

    # -- failures -----------------------------------------------------------------------------
    def _parser_failed(self, tap: ChannelTap, direction: Direction, exc: Exception) -> None:
        if direction is Direction.SRC_TO_DST:
            tap.s2d = None
        else:
            tap.d2s = None
        info = tap.info
        if info.parse_error is None:
            info.parse_error = f"{direction.value}: {exc}"
        fields: dict[str, object] = {
            "ch": info.index,
            "kind": info.kind,
            "direction": direction.value,
            "error": str(exc),
            "error_type": type(exc).__name__,
            "action": "parser detached; bytes keep flowing, the capture is kept",
        }
        if isinstance(exc, StreamError):
            fields.update(offset=exc.offset, state=exc.state)
            section = self.progress.view.last_section
            if section is not None and info.kind == "main" and direction is Direction.SRC_TO_DST:
                fields["section"] = section.as_dict()
            self.log.warning("parser_detached", **fields)
        else:
            self.log.error("parser_crashed", **fields, exc_info=exc)

    def _stream_cut(self, tap: ChannelTap, direction: Direction, exc: StreamError) -> None:
        section = self.progress.view.last_section
        self.log.info(
            "stream_cut",
            ch=tap.info.index,
            kind=tap.info.kind,
            direction=direction.value,
            offset=exc.offset,
            state=exc.state,
            section=None if section is None or direction is Direction.DST_TO_SRC else section.idstr,
            close_reason=tap.info.close_reason,
        )

    def _report_early_close(self, tap: ChannelTap) -> None:
        """The destination went away before EOF: say where in the stream that happened."""
        info = tap.info
        view = self.progress.view
        if info.first_closed != "destination" or view.shut_value == 0:
            return  # the source finished first, or the destination said it loaded fine
        if view.eof_at is not None and info.reset_by != "destination":
            return  # it read the whole stream and closed cleanly
        section = view.last_section
        end = info.bytes_src_to_dst
        self.log.warning(
            "destination_closed_early",
            ch=info.index,
            close_reason=info.close_reason,
            phase=view.phase,
            section_in_flight=None if section is None else section.as_dict(),
            bytes_forwarded=end,
            last_bytes_offset=end - len(tap.tail),
            last_bytes_hex=tap.tail.hex(" "),
            shut_value=view.shut_value,
            action="the destination QEMU failed to load: see its log for the reason",
        )

    def _sink_failed(self, sink: Sink, exc: Exception) -> None:
        if sink in self.chunk_sinks:
            self.chunk_sinks.remove(sink)
        if sink in self.sinks:
            self.sinks.remove(sink)
            self.log.error(
                "sink_detached",
                sink=type(sink).__name__,
                error=repr(exc),
                action="the migration continues without it",
                exc_info=exc,
            )

    def _each_sink(self, call: Callable[[Sink], None]) -> None:
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as exc:  # noqa: BLE001
                self._sink_failed(sink, exc)
