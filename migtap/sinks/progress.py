"""The live picture of a migration: phase, rounds, pages, rates; progress lines and the summary.

``ProgressSink`` follows the events of every channel of one session. It logs ``migration_phase``
at every phase change, ``ram_round_finished`` per finished round, ``migration_progress`` at most
once a second (driven by ``tick()``), and one ``migration_summary`` line at the end: an interface
that users script against, so its keys only grow.

Rules (stated in docs/tap.md too):
- Phases: ``setup`` (header seen), ``bulk round`` (round 1), ``round N``, ``stop-and-copy``
  (first SECTION_END/FULL at top level: the source VM is stopped), ``postcopy`` (PACKAGED seen),
  then ``completed``/``failed``/``cancelled``/``unknown`` at the end.
- Pages: main-channel RAM records plus multifd packets; ``ram_zero_pages`` is QMP's
  ``duplicate``. Multifd pages count towards the main channel's current round.
- Wire downtime: from the first section sent with the VM stopped to EOF (precopy) or to the end
  of the PACKAGED blob (postcopy, when the destination starts running), extended to the
  destination's SHUT on the return path when that comes later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import structlog

from migtap.wire.constants import SectionType
from migtap.wire.events import (
    Configuration,
    DeviceState,
    EndOfState,
    Packaged,
    PackagedEnd,
    RamBlockList,
    RamMultifdFlush,
    RamPages,
    SectionHeader,
    StreamHeader,
    VmDescription,
)
from migtap.wire.generation import GenerationTracker
from migtap.wire.multifd import MultifdInit, MultifdPacket, ResentPages
from migtap.wire.return_path import RpReqPages, RpReqPagesId, RpShut

if TYPE_CHECKING:
    from collections.abc import Callable

    from migtap.relay.pipe import Direction
    from migtap.sinks import ChannelInfo, SessionSummary

log = structlog.get_logger("migtap.progress")
SRC_TO_DST: Final = "src-to-dst"  # the Direction the source writes (a StrEnum in migtap.relay)
MiB = 1024 * 1024

_STOPPED_KINDS = (SectionType.QEMU_VM_SECTION_END, SectionType.QEMU_VM_SECTION_FULL)


@dataclass(slots=True)
class Round:
    number: int
    started: float
    normal: int = 0
    zero: int = 0
    xbzrle: int = 0
    finished: bool = False

    @property
    def pages(self) -> int:
        return self.normal + self.zero + self.xbzrle


@dataclass(slots=True)
class SectionInFlight:
    offset: int
    kind: str
    section_id: int
    idstr: str | None

    def as_dict(self) -> dict[str, object]:
        return {
            "offset": self.offset,
            "kind": self.kind,
            "section_id": self.section_id,
            "idstr": self.idstr,
        }


@dataclass(slots=True)
class MigrationView:
    """What the wire has shown so far; updated from events, read for logs and the summary."""

    started: float = field(default_factory=time.monotonic)
    phase: str = "connecting"
    machine_type: str | None = None
    uuid: bytes | None = None  # the source VM's UUID (configuration, with validate-uuid)
    page_size: int = 4096
    ram_total: int = 0
    normal: int = 0
    zero: int = 0
    xbzrle: int = 0
    compressed: int = 0  # COMPRESS_PAGE records (7.2-9.0 multi-thread compression)
    preempt: int = 0  # pages (normal and zero) on the postcopy-preempt channel
    page_requests: int = 0  # postcopy: the destination's page requests (return path)
    rounds: list[Round] = field(default_factory=list)
    stopped_at: float | None = None  # first section sent with the VM stopped
    eof_at: float | None = None
    switched_at: float | None = None  # postcopy: end of the PACKAGED blob
    shut_at: float | None = None
    shut_value: int | None = None
    vmdesc: bool = False
    in_packaged: bool = False
    last_section: SectionInFlight | None = None
    device_sections: int = 0
    resent: ResentPages = field(default_factory=ResentPages)  # 7.2 multifd repeats

    @property
    def round(self) -> Round | None:
        return self.rounds[-1] if self.rounds else None

    def wire_downtime_ms(self) -> float | None:
        if self.stopped_at is None:
            return None
        end = self.switched_at if self.switched_at is not None else self.eof_at
        if end is None:
            return None
        if self.shut_at is not None and self.switched_at is None:
            end = max(end, self.shut_at)
        return round((end - self.stopped_at) * 1000, 1)


class ProgressSink:
    """Follows one session's events and logs its progress and summary (see module docstring)."""

    def __init__(
        self,
        session_id: int,
        *,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session_id = session_id
        self.interval_s = interval_s
        self.clock = clock
        self.view = MigrationView(started=clock())
        self.channels: list[ChannelInfo] = []
        self.log = log.bind(session=session_id)
        self._last_tick = self.view.started
        self._parser_round = 0  # the newest round number the main-channel parser reported
        self._flush_pending = False  # a MULTIFD_FLUSH (8.1+: a pass over RAM ended) not yet used
        self._adopt = False  # the current round was started by multifd pages, not the parser
        self._last_bytes: dict[int, int] = {}
        self.generation = GenerationTracker()
        self._handlers: dict[type, Callable[[ChannelInfo, object], None]] = {
            StreamHeader: self._on_header,
            Configuration: self._on_configuration,
            RamBlockList: self._on_blocks,
            RamPages: self._on_pages,
            RamMultifdFlush: self._on_flush,
            SectionHeader: self._on_section,
            DeviceState: self._on_device,
            Packaged: self._on_packaged,
            PackagedEnd: self._on_packaged_end,
            EndOfState: self._on_eof,
            VmDescription: self._on_vmdesc,
            MultifdPacket: self._on_multifd_packet,
            MultifdInit: self._on_multifd_init,
            RpShut: self._on_shut,
            RpReqPages: self._on_page_request,
            RpReqPagesId: self._on_page_request,
        }

    # -- Sink protocol ------------------------------------------------------------------------
    def on_channel(self, channel: ChannelInfo) -> None:
        self.channels.append(channel)

    def on_chunk(
        self, channel: ChannelInfo, direction: Direction, offset: int, chunk: bytes
    ) -> None:
        pass  # byte counts live in ChannelInfo, kept by the tap

    def on_event(self, channel: ChannelInfo, direction: Direction, event: object) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(channel, event)
        from_source = direction == SRC_TO_DST
        if self.generation.observe(event, from_source=from_source):
            estimate = self.generation.source if from_source else self.generation.destination
            self.log.info(
                "qemu_generation_inferred",
                side="source" if from_source else "destination",
                qemu=estimate.text(),
                sign=estimate.evidence[-1].sign,
                machine_type=self.generation.machine_type,
            )

    def on_channel_closed(self, channel: ChannelInfo) -> None:
        pass

    def on_close(self, summary: SessionSummary) -> None:
        self.log.info("migration_summary", **summary.fields)

    # -- periodic ----------------------------------------------------------------------------
    def tick(self) -> None:
        """Log one ``migration_progress`` line if ``interval_s`` has passed (call it often)."""
        now = self.clock()
        if now - self._last_tick < self.interval_s:
            return
        elapsed = now - self._last_tick
        self._last_tick = now
        v = self.view
        channels = []
        for ch in self.channels:
            total = ch.bytes_src_to_dst + ch.bytes_dst_to_src
            delta = total - self._last_bytes.get(ch.index, 0)
            self._last_bytes[ch.index] = total
            channels.append(
                {
                    "ch": ch.index,
                    "kind": ch.kind if ch.multifd_id is None else f"multifd-{ch.multifd_id}",
                    "bytes": total,
                    "rate_mib_s": round(delta / elapsed / MiB, 1),
                }
            )
        fields: dict[str, object] = {
            "phase": v.phase,
            "elapsed_s": round(now - v.started, 1),
            "bytes_src_to_dst": sum(c.bytes_src_to_dst for c in self.channels),
            "rate_mib_s": round(sum(c["rate_mib_s"] for c in channels), 1),  # type: ignore[misc]
            "ram_normal_pages": v.normal,
            "ram_zero_pages": v.zero,
            "ram_xbzrle_pages": v.xbzrle,
            "channels": channels,
        }
        rnd = v.round
        if rnd is not None:
            fields["round"] = rnd.number
            fields["round_pages"] = {"normal": rnd.normal, "zero": rnd.zero, "xbzrle": rnd.xbzrle}
            if rnd.number == 1 and v.ram_total and v.phase == "bulk round":
                covered = min(1.0, rnd.pages * v.page_size / v.ram_total)
                fields["bulk_covered_pct"] = round(covered * 100, 1)
                spent = now - rnd.started
                if 0 < covered < 1:
                    fields["bulk_eta_s"] = round(spent / covered * (1 - covered), 1)
        self.log.info("migration_progress", **fields)

    # -- summary -----------------------------------------------------------------------------
    def outcome(self) -> str:  # noqa: PLR0911 - one return per rule reads best
        """completed / failed / cancelled / unknown, from what the wire and the sockets showed.

        The destination's SHUT on the return path is the best witness (0 = loaded). Without a
        return path: a destination that closes before EOF failed; after EOF, one that resets the
        connection (it closed with bytes unread: QEMU exits when a load fails) failed, and one
        that closes cleanly, even before the source does, had read everything.
        """
        main = next((c for c in self.channels if c.kind == "main"), None)
        if main is None:
            return "unknown"
        v = self.view
        if v.shut_value is not None:
            return "completed" if v.shut_value == 0 and v.eof_at is not None else "failed"
        if v.eof_at is not None:
            return "failed" if main.reset_by is not None else "completed"
        if main.first_closed == "destination":
            return "failed"
        if main.parse_error is not None:
            return "unknown"
        if main.first_closed == "source" and main.close_reason in ("source_closed", "eof_both"):
            # The source closed cleanly before EOF: migrate_cancel (or a source that gave up).
            return "cancelled"
        return "failed"

    def summary_fields(self, outcome: str, capture_dir: str | None) -> dict[str, object]:
        v = self.view
        end = self.clock()
        return {
            "outcome": outcome,
            "duration_s": round(end - v.started, 3),
            "bytes_src_to_dst": sum(c.bytes_src_to_dst for c in self.channels),
            "bytes_dst_to_src": sum(c.bytes_dst_to_src for c in self.channels),
            "rounds": len(v.rounds),
            "ram_normal_pages": v.normal - v.resent.count,
            "ram_normal_pages_resent": v.resent.count,
            "ram_zero_pages": v.zero,
            "ram_xbzrle_pages": v.xbzrle,
            "ram_compressed_pages": v.compressed,
            "ram_preempt_pages": v.preempt,
            "postcopy_requests": v.page_requests,
            "wire_downtime_ms": v.wire_downtime_ms(),
            "channels": len(self.channels),
            "channel_kinds": [c.kind for c in self.channels],
            "machine_type": v.machine_type,
            "source_qemu": self.generation.source.text(),
            "destination_qemu": self.generation.destination.text(),
            "last_phase": v.phase,
            "last_section": None if v.last_section is None else v.last_section.as_dict(),
            "device_sections": v.device_sections,
            "vmdesc": v.vmdesc,
            "capture_dir": capture_dir,
        }

    def generation_details(self) -> dict[str, object]:
        """The version ranges with their evidence, for session.json."""
        return {
            "machine_type": self.generation.machine_type,
            "source": self.generation.source.as_dict(),
            "destination": self.generation.destination.as_dict(),
        }

    # -- event handlers ----------------------------------------------------------------------
    def _set_phase(self, phase: str, **fields: object) -> None:
        if phase == self.view.phase:
            return
        self.view.phase = phase
        self.log.info(
            "migration_phase",
            phase=phase,
            elapsed_s=round(self.clock() - self.view.started, 3),
            **fields,
        )

    def _on_header(self, channel: ChannelInfo, event: object) -> None:
        if channel.kind == "main":
            self._set_phase("setup")

    def _on_configuration(self, channel: ChannelInfo, event: object) -> None:
        assert isinstance(event, Configuration)
        self.view.machine_type = event.machine_type
        self.view.uuid = event.uuid

    def _on_blocks(self, channel: ChannelInfo, event: object) -> None:
        assert isinstance(event, RamBlockList)
        self.view.ram_total = event.total

    def _on_pages(self, channel: ChannelInfo, event: object) -> None:
        assert isinstance(event, RamPages)
        v = self.view
        rnd = v.round
        if channel.kind != "main":
            # Postcopy-preempt: requested pages, in the order asked for; they belong to the
            # main channel's current round.
            v.preempt += event.normal + event.zero
            if rnd is None:
                rnd = self._new_round()
        elif rnd is None or event.round > self._parser_round:
            self._parser_round = event.round
            if rnd is None or not self._adopt:
                rnd = self._new_round()
            self._adopt = False  # a round multifd pages started is the parser's new round
        v.normal += event.normal
        v.zero += event.zero
        v.xbzrle += event.xbzrle
        v.compressed += event.compressed
        rnd.normal += event.normal
        rnd.zero += event.zero
        rnd.xbzrle += event.xbzrle

    def _on_flush(self, channel: ChannelInfo, event: object) -> None:
        self._flush_pending = True

    def _new_round(self) -> Round:
        v = self.view
        now = self.clock()
        number = len(v.rounds) + 1
        self._flush_pending = False
        if v.round is not None:
            self._round_finished(v.round, now)
        rnd = Round(number, now)
        v.rounds.append(rnd)
        if v.phase in ("setup", "bulk round") or v.phase.startswith("round "):
            self._set_phase("bulk round" if number == 1 else f"round {number}")
        return rnd

    def _round_finished(self, prev: Round, now: float) -> None:
        v = self.view
        if prev.finished:
            return
        prev.finished = True
        duration = now - prev.started
        self.log.info(
            "ram_round_finished",
            round=prev.number,
            duration_s=round(duration, 3),
            pages_normal=prev.normal,
            pages_zero=prev.zero,
            pages_xbzrle=prev.xbzrle,
            # Pages sent in a later round were dirtied during the one before it.
            dirty_rate_mib_s=(
                round(prev.pages * v.page_size / duration / MiB, 1)
                if duration > 0 and prev.number > 1
                else None
            ),
        )

    def _on_section(self, channel: ChannelInfo, event: object) -> None:
        assert isinstance(event, SectionHeader)
        v = self.view
        v.last_section = SectionInFlight(
            event.offset, event.kind.name, event.section_id, event.idstr
        )
        if event.kind in _STOPPED_KINDS and not v.in_packaged and v.stopped_at is None:
            if v.phase == "postcopy":
                return
            v.stopped_at = self.clock()
            self._set_phase("stop-and-copy", first_section=event.idstr or event.section_id)

    def _on_device(self, channel: ChannelInfo, event: object) -> None:
        self.view.device_sections += 1

    def _on_packaged(self, channel: ChannelInfo, event: object) -> None:
        v = self.view
        v.in_packaged = True
        if v.stopped_at is None:
            v.stopped_at = self.clock()
        self._set_phase("postcopy")

    def _on_packaged_end(self, channel: ChannelInfo, event: object) -> None:
        v = self.view
        v.in_packaged = False
        if v.switched_at is None:
            v.switched_at = self.clock()

    def _on_eof(self, channel: ChannelInfo, event: object) -> None:
        if channel.kind == "main" and not self.view.in_packaged:
            self.view.eof_at = self.clock()
            if self.view.round is not None:  # the last round ends with the stream
                self._round_finished(self.view.round, self.view.eof_at)

    def _on_vmdesc(self, channel: ChannelInfo, event: object) -> None:
        assert isinstance(event, VmDescription)
        self.view.vmdesc = True
        if event.page_size:
            self.view.page_size = event.page_size

    def _on_multifd_init(self, channel: ChannelInfo, event: object) -> None:
        assert isinstance(event, MultifdInit)
        channel.multifd_id = event.channel_id

    def _on_multifd_packet(self, channel: ChannelInfo, event: object) -> None:
        assert isinstance(event, MultifdPacket)
        v = self.view
        v.resent.note(event)
        v.normal += event.normal_pages
        v.zero += event.zero_pages
        rnd = v.round
        if event.normal_pages + event.zero_pages and (rnd is None or self._flush_pending):
            # 10.0+ sends every page over multifd: the main channel's MULTIFD_FLUSH marks the
            # passes over RAM (one per round, 8.1+), so a page after one starts the next round.
            rnd = self._new_round()
            self._adopt = True
        if rnd is not None:
            rnd.normal += event.normal_pages
            rnd.zero += event.zero_pages

    def _on_page_request(self, channel: ChannelInfo, event: object) -> None:
        self.view.page_requests += 1

    def _on_shut(self, channel: ChannelInfo, event: object) -> None:
        assert isinstance(event, RpShut)
        self.view.shut_at = self.clock()
        self.view.shut_value = event.value
        self.log.info("destination_shut", value=event.value, ok=event.value == 0)
