"""The session model: one ``Migration`` per migration holds everything known about it.

Parser events update it in one place, :meth:`Migration.apply` (the reducer, a ``match`` over the
event union that ends in ``assert_never``: a new record type fails mypy here until handled).
Device-state decoding results, which are worked out off the event loop, arrive through
:meth:`Migration.apply_devices`. Observers (progress log, capture, annotated log, ...) read the
model and never write it; what changed beyond the raw event is reported back as ``Change``
records that the tap hands to them. The summary is a pure function of the model
(:func:`summarize`). Live (``migtap listen``) and offline (``migtap analyze DIR``) drive the
same model with the same parsers, so they agree by construction.

Rules (stated in docs/tap.md too):

- Phases: ``setup`` (header seen), ``bulk round`` (round 1), ``round N``, ``stop-and-copy``
  (first SECTION_END/FULL at top level: the source VM is stopped), ``postcopy`` (PACKAGED seen).
- Pages: main-channel RAM records plus multifd packets; ``ram_zero_pages`` is QMP's
  ``duplicate``. Multifd pages count towards the main channel's current round.
- Wire downtime: from the first section sent with the VM stopped to EOF (precopy) or to the end
  of the PACKAGED blob (postcopy, when the destination starts running), extended to the
  destination's SHUT on the return path when that comes later.

Times are wall-clock seconds (``time.time()``) given by the caller with every event, so that an
event's time in the model is the one the capture's index records for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, assert_never

from migtap.vocabulary import (
    ChannelInfo,
    ChannelKind,
    Direction,
    Outcome,
    Peer,
    Phase,
    SessionSummary,
)
from migtap.wire.constants import SectionType
from migtap.wire.events import (
    Command,
    Configuration,
    DeviceState,
    EndOfState,
    MultifdDeviceState,
    MultifdInit,
    MultifdPacket,
    Packaged,
    PackagedEnd,
    Ping,
    PostcopyAdvise,
    PostcopyRamDiscard,
    RamBlock,
    RamBlockList,
    RamEndOfSection,
    RamMultifdFlush,
    RamPages,
    RecvBitmapRequest,
    RpPong,
    RpRecvBitmap,
    RpReqPages,
    RpReqPagesId,
    RpResumeAck,
    RpShut,
    RpSwitchoverAck,
    SectionFooter,
    SectionHeader,
    StreamHeader,
    Unparsed,
    VmDescription,
)
from migtap.wire.generation import GenerationTracker
from migtap.wire.multifd import ResentPages

if TYPE_CHECKING:
    from migtap.annotate.walk import DecodedSection
    from migtap.errors import StreamError
    from migtap.wire.events import Event
    from migtap.wire.vmdesc import VmdescDocument

MiB: Final = 1024 * 1024
_STOPPED_KINDS: Final = (SectionType.QEMU_VM_SECTION_END, SectionType.QEMU_VM_SECTION_FULL)
_SETUP_PHASES: Final = (Phase.CONNECTING, Phase.SETUP)


@dataclass(slots=True)
class Round:
    """One pass over guest RAM (round 1 is the bulk round)."""

    number: int
    started: float
    normal: int = 0
    zero: int = 0
    xbzrle: int = 0
    ended: float | None = None

    @property
    def pages(self) -> int:
        return self.normal + self.zero + self.xbzrle

    @property
    def finished(self) -> bool:
        return self.ended is not None

    def duration_s(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started


@dataclass(frozen=True, slots=True)
class SectionInFlight:
    """The last section header seen on the main channel: where the stream was."""

    offset: int
    kind: str  # QEMU_VM_SECTION_START, ...
    section_id: int
    idstr: str | None

    def as_dict(self) -> dict[str, object]:
        return {
            "offset": self.offset,
            "kind": self.kind,
            "section_id": self.section_id,
            "idstr": self.idstr,
        }


@dataclass(frozen=True, slots=True)
class DeviceResult:
    """One device section, decoded with a vmdesc (``decoded``), not decodable (``error``), not in
    the vmdesc (both None, ``in_vmdesc`` False), or kept without any vmdesc (``vmdesc`` None)."""

    offset: int
    idstr: str
    instance_id: int
    version_id: int
    size: int
    vmdesc: str | None  # "stream" or "--vmdesc"; None: no vmdesc, fields not decoded
    decoded: DecodedSection | None = None
    error: StreamError | None = None
    in_vmdesc: bool = True

    @property
    def ok(self) -> bool:
        return self.decoded is not None


@dataclass(frozen=True, slots=True)
class DeviceBatch:
    """What one decoding job worked out (see ``migtap.decode``)."""

    vmdesc: str | None  # "stream", "--vmdesc", or None (no vmdesc at all)
    results: tuple[DeviceResult, ...]
    document: VmdescDocument | None = None  # the stream's own vmdesc, parsed
    vmdesc_error: StreamError | None = None  # the stream's vmdesc could not be read
    dropped: int = 0  # sections not kept (over the cap), never decoded


# -- changes: what observers hear about besides the raw events ------------------------------------


@dataclass(frozen=True, slots=True)
class PhaseChanged:
    phase: Phase
    round: int  # the round number for Phase.ROUND
    at: float
    first_section: str | int | None = None  # stop-and-copy: the first section sent stopped

    @property
    def text(self) -> str:
        return self.phase.text(self.round)


@dataclass(frozen=True, slots=True)
class RoundFinished:
    round: Round
    dirty_rate_bytes_s: float | None  # pages of this round / its duration (rounds after the bulk)


@dataclass(frozen=True, slots=True)
class GenerationNarrowed:
    side: Peer
    qemu: str
    sign: str


@dataclass(frozen=True, slots=True)
class DestinationShut:
    value: int


@dataclass(frozen=True, slots=True)
class DevicesDecoded:
    batch: DeviceBatch


Change = PhaseChanged | RoundFinished | GenerationNarrowed | DestinationShut | DevicesDecoded


# -- the model -------------------------------------------------------------------------------------


class Migration:
    """Everything known about one migration (module docstring). Written only by ``apply`` and
    ``apply_devices``, ``sample`` and ``end``; read by everyone."""

    def __init__(self, session_id: int, *, started: float, page_size: int = 4096) -> None:
        self.session_id = session_id
        self.started = started
        self.now = started  # time of the latest input
        self.ended: float | None = None
        self.channels: list[ChannelInfo] = []
        self.phase = Phase.CONNECTING
        self.machine_type: str | None = None
        self.uuid: bytes | None = None  # the source VM's UUID (configuration, validate-uuid)
        self.page_size = page_size
        self.ram_total = 0
        self.ram_blocks: tuple[RamBlock, ...] = ()  # the MEM_SIZE list (the preempt channel's)
        self.normal = 0
        self.zero = 0
        self.xbzrle = 0
        self.compressed = 0  # COMPRESS_PAGE records (7.2-9.0 multi-thread compression)
        self.preempt = 0  # pages (normal and zero) on the postcopy-preempt channel
        self.page_requests = 0  # postcopy: the destination's page requests (return path)
        self.rounds: list[Round] = []
        self.stopped_at: float | None = None  # first section sent with the VM stopped
        self.eof_at: float | None = None
        self.switched_at: float | None = None  # postcopy: end of the PACKAGED blob
        self.shut_at: float | None = None
        self.shut_value: int | None = None
        self.vmdesc = False
        self.in_packaged = False
        self.last_section: SectionInFlight | None = None
        self.device_sections = 0
        self.devices: list[DeviceResult] = []
        self.devices_dropped = 0
        self.resent = ResentPages()  # 7.2 multifd repeats
        self.generation = GenerationTracker()
        # transfer rates, from the last two samples (``sample``)
        self.rate_bytes_s = 0.0
        self.channel_rates: dict[int, float] = {}
        self._sampled_at = started
        self._sampled_bytes: dict[int, int] = {}
        # reducer state
        self._parser_round = 0  # the newest round number the main-channel parser reported
        self._flush_pending = False  # a MULTIFD_FLUSH (8.1+: a pass over RAM ended) not yet used
        self._adopt = False  # the current round was started by multifd pages, not the parser

    # -- read-side helpers ---------------------------------------------------------------------
    @property
    def round(self) -> Round | None:
        return self.rounds[-1] if self.rounds else None

    @property
    def round_number(self) -> int:
        return len(self.rounds)

    @property
    def phase_text(self) -> str:
        return self.phase.text(self.round_number)

    @property
    def main(self) -> ChannelInfo | None:
        return next((c for c in self.channels if c.kind is ChannelKind.MAIN), None)

    @property
    def devices_decoded(self) -> int:
        return sum(1 for d in self.devices if d.decoded is not None)

    @property
    def devices_failed(self) -> int:
        return sum(1 for d in self.devices if d.vmdesc is not None and d.decoded is None)

    def bytes_total(self, direction: Direction) -> int:
        return sum(c.bytes(direction) for c in self.channels)

    def wire_downtime_ms(self) -> float | None:
        if self.stopped_at is None:
            return None
        end = self.switched_at if self.switched_at is not None else self.eof_at
        if end is None:
            return None
        if self.shut_at is not None and self.switched_at is None:
            end = max(end, self.shut_at)
        return round((end - self.stopped_at) * 1000, 1)

    def remaining_bulk_bytes(self) -> int | None:
        """In the bulk round: bytes of guest RAM not yet sent (None outside it)."""
        rnd = self.round
        if rnd is None or rnd.number != 1 or self.phase is not Phase.ROUND or not self.ram_total:
            return None
        return max(0, self.ram_total - rnd.pages * self.page_size)

    def outcome(self) -> Outcome:  # noqa: PLR0911 - one return per rule reads best
        """From what the wire and the sockets showed (rules in docs/tap.md).

        The destination's SHUT on the return path is the best witness (0 = loaded). Without a
        return path: a destination that closes before EOF failed; after EOF, one that resets the
        connection (it closed with bytes unread: QEMU exits when a load fails) failed, and one
        that closes cleanly, even before the source does, had read everything.
        """
        main = self.main
        if main is None:
            return Outcome.UNKNOWN
        if self.shut_value is not None:
            ok = self.shut_value == 0 and self.eof_at is not None
            return Outcome.COMPLETED if ok else Outcome.FAILED
        if self.eof_at is not None:
            return Outcome.FAILED if main.reset_by is not None else Outcome.COMPLETED
        if main.first_closed is Peer.DESTINATION:
            return Outcome.FAILED
        if main.parse_error is not None:
            return Outcome.UNKNOWN
        if main.first_closed is Peer.SOURCE and main.close_reason in ("source_closed", "eof_both"):
            # The source closed cleanly before EOF: migrate_cancel (or a source that gave up).
            return Outcome.CANCELLED
        return Outcome.FAILED

    # -- inputs --------------------------------------------------------------------------------
    def add_channel(self, channel: ChannelInfo) -> None:
        """Channels are kept in acceptance order (their index), whatever order their first bytes
        told their kind in (a multifd channel may speak before its main channel)."""
        self.channels.append(channel)
        self.channels.sort(key=lambda c: c.index)

    def sample(self, now: float) -> None:
        """Transfer rates since the previous sample (the tap calls this once per interval)."""
        elapsed = now - self._sampled_at
        if elapsed <= 0:
            return
        self.now = max(self.now, now)
        total = 0.0
        for ch in self.channels:
            moved = ch.bytes_src_to_dst + ch.bytes_dst_to_src
            rate = (moved - self._sampled_bytes.get(ch.index, 0)) / elapsed
            self._sampled_bytes[ch.index] = moved
            self.channel_rates[ch.index] = rate
            total += rate
        self.rate_bytes_s = total
        self._sampled_at = now

    def end(self, now: float) -> None:
        self.now = max(self.now, now)
        if self.ended is None:
            self.ended = now

    def apply_devices(self, batch: DeviceBatch, now: float) -> list[Change]:
        """A decoding job's results (the vmdesc parsed, device sections decoded)."""
        self.now = max(self.now, now)
        changes: list[Change] = []
        doc = batch.document
        if doc is not None:
            if doc.page_size:
                self.page_size = doc.page_size
            if self.generation.observe_vmdesc(doc):
                changes.append(self._generation_change(Peer.SOURCE))
        self.devices.extend(batch.results)
        self.devices_dropped += batch.dropped
        changes.append(DevicesDecoded(batch))
        return changes

    def apply(  # noqa: C901, PLR0912, PLR0915 - one case per record type, as the union has them
        self, channel: ChannelInfo, direction: Direction, event: Event, now: float
    ) -> list[Change]:
        """Update the model from one parser event; return what changed for the observers."""
        self.now = now
        changes: list[Change] = []
        from_source = direction is Direction.SRC_TO_DST
        if self.generation.observe(event, from_source=from_source):
            changes.append(
                self._generation_change(Peer.SOURCE if from_source else Peer.DESTINATION)
            )
        match event:
            case StreamHeader():
                if channel.kind is ChannelKind.MAIN:
                    self._set_phase(Phase.SETUP, changes)
            case Configuration():
                self.machine_type = event.machine_type
                self.uuid = event.uuid
                if event.target_page_bits:  # the stream's own page size (8.x+ sends it)
                    self.page_size = 1 << event.target_page_bits
            case RamBlockList():
                self.ram_total = event.total
                self.ram_blocks = event.blocks
            case RamPages():
                self._on_pages(channel, event, changes)
            case RamMultifdFlush():
                self._flush_pending = True
            case SectionHeader():
                self._on_section(event, changes)
            case DeviceState():
                self.device_sections += 1
            case Packaged():
                self.in_packaged = True
                if self.stopped_at is None:
                    self.stopped_at = now
                self._set_phase(Phase.POSTCOPY, changes)
            case PackagedEnd():
                self.in_packaged = False
                if self.switched_at is None:
                    self.switched_at = now
            case EndOfState():
                if channel.kind is ChannelKind.MAIN and not self.in_packaged:
                    self.eof_at = now
                    if self.round is not None:  # the last round ends with the stream
                        self._finish_round(self.round, now, changes)
            case VmDescription():
                self.vmdesc = True
            case MultifdInit():
                channel.multifd_id = event.channel_id
            case MultifdPacket():
                self._on_multifd_packet(event, changes)
            case RpShut():
                self.shut_at = now
                self.shut_value = event.value
                changes.append(DestinationShut(event.value))
            case RpReqPages() | RpReqPagesId():
                self.page_requests += 1
            case (
                SectionFooter()
                | RamEndOfSection()
                | Command()
                | Ping()
                | PostcopyAdvise()
                | PostcopyRamDiscard()
                | RecvBitmapRequest()
                | Unparsed()
                | MultifdDeviceState()
                | RpPong()
                | RpRecvBitmap()
                | RpResumeAck()
                | RpSwitchoverAck()
            ):
                pass  # in the capture's index; nothing to count (yet)
            case _:
                assert_never(event)
        return changes

    # -- reducer helpers -----------------------------------------------------------------------
    def _generation_change(self, side: Peer) -> GenerationNarrowed:
        g = self.generation
        estimate = g.source if side is Peer.SOURCE else g.destination
        return GenerationNarrowed(side, estimate.text(), estimate.evidence[-1].sign)

    def _set_phase(
        self, phase: Phase, changes: list[Change], first_section: str | int | None = None
    ) -> None:
        if phase is self.phase and phase is not Phase.ROUND:
            return
        self.phase = phase
        changes.append(PhaseChanged(phase, self.round_number, self.now, first_section))

    def _on_pages(self, channel: ChannelInfo, event: RamPages, changes: list[Change]) -> None:
        rnd = self.round
        if channel.kind is not ChannelKind.MAIN:
            # Postcopy-preempt: requested pages, in the order asked for; they belong to the
            # main channel's current round.
            self.preempt += event.normal + event.zero
            if rnd is None:
                rnd = self._new_round(changes)
        elif rnd is None or event.round > self._parser_round:
            self._parser_round = event.round
            if rnd is None or not self._adopt:
                rnd = self._new_round(changes)
            self._adopt = False  # a round multifd pages started is the parser's new round
        self.normal += event.normal
        self.zero += event.zero
        self.xbzrle += event.xbzrle
        self.compressed += event.compressed
        rnd.normal += event.normal
        rnd.zero += event.zero
        rnd.xbzrle += event.xbzrle

    def _on_multifd_packet(self, event: MultifdPacket, changes: list[Change]) -> None:
        self.resent.note(event)
        self.normal += event.normal_pages
        self.zero += event.zero_pages
        rnd = self.round
        if event.normal_pages + event.zero_pages and (rnd is None or self._flush_pending):
            # 10.0+ sends every page over multifd: the main channel's MULTIFD_FLUSH marks the
            # passes over RAM (one per round, 8.1+), so a page after one starts the next round.
            rnd = self._new_round(changes)
            self._adopt = True
        if rnd is not None:
            rnd.normal += event.normal_pages
            rnd.zero += event.zero_pages

    def _new_round(self, changes: list[Change]) -> Round:
        now = self.now
        self._flush_pending = False
        if self.round is not None:
            self._finish_round(self.round, now, changes)
        rnd = Round(len(self.rounds) + 1, now)
        self.rounds.append(rnd)
        if self.phase in (Phase.SETUP, Phase.ROUND):
            self._set_phase(Phase.ROUND, changes)
        return rnd

    def _finish_round(self, rnd: Round, now: float, changes: list[Change]) -> None:
        if rnd.finished:
            return
        rnd.ended = now
        duration = now - rnd.started
        # Pages sent in a later round were dirtied during the one before it.
        rate = rnd.pages * self.page_size / duration if duration > 0 and rnd.number > 1 else None
        changes.append(RoundFinished(rnd, rate))

    def _on_section(self, event: SectionHeader, changes: list[Change]) -> None:
        self.last_section = SectionInFlight(
            event.offset, event.kind.name, event.section_id, event.idstr
        )
        if event.kind in _STOPPED_KINDS and not self.in_packaged and self.stopped_at is None:
            if self.phase is Phase.POSTCOPY:
                return
            if event.kind is SectionType.QEMU_VM_SECTION_FULL and self.phase in _SETUP_PHASES:
                # 8.0+: a device whose vmsd sets early_setup (virtio-mem) is saved whole in the
                # setup phase (qemu_savevm_state_setup), while the VM runs.
                return
            self.stopped_at = self.now
            self._set_phase(
                Phase.STOP_AND_COPY, changes, first_section=event.idstr or event.section_id
            )


# -- the summary -----------------------------------------------------------------------------------


def summary_fields(m: Migration, *, capture_dir: str | None = None) -> dict[str, object]:
    """The ``migration_summary`` fields: an interface scripts rely on (keys only grow)."""
    end = m.ended if m.ended is not None else m.now
    return {
        "outcome": m.outcome().value,
        "duration_s": round(end - m.started, 3),
        "bytes_src_to_dst": m.bytes_total(Direction.SRC_TO_DST),
        "bytes_dst_to_src": m.bytes_total(Direction.DST_TO_SRC),
        "rounds": len(m.rounds),
        "ram_normal_pages": m.normal - m.resent.count,
        "ram_normal_pages_resent": m.resent.count,
        "ram_zero_pages": m.zero,
        "ram_xbzrle_pages": m.xbzrle,
        "ram_compressed_pages": m.compressed,
        "ram_preempt_pages": m.preempt,
        "postcopy_requests": m.page_requests,
        "wire_downtime_ms": m.wire_downtime_ms(),
        "channels": len(m.channels),
        "channel_kinds": [c.kind.value for c in m.channels],
        "machine_type": m.machine_type,
        "source_qemu": m.generation.source.text(),
        "destination_qemu": m.generation.destination.text(),
        "last_phase": m.phase_text,
        "last_section": None if m.last_section is None else m.last_section.as_dict(),
        "device_sections": m.device_sections,
        "vmdesc": m.vmdesc,
        "devices_decoded": m.devices_decoded,
        "devices_failed": m.devices_failed,
        "capture_dir": capture_dir,
    }


def generation_details(m: Migration) -> dict[str, object]:
    """The version ranges with their evidence, for session.json."""
    g = m.generation
    return {
        "machine_type": g.machine_type,
        "source": g.source.as_dict(),
        "destination": g.destination.as_dict(),
    }


def summarize(m: Migration, *, started_wall: float, ended_wall: float) -> SessionSummary:
    """The session's summary: a pure function of the model. Observers may then add their own
    facts (the capture adds ``capture_dir``) before it is logged and written."""
    return SessionSummary(
        session_id=m.session_id,
        outcome=m.outcome(),
        started_wall=started_wall,
        ended_wall=ended_wall,
        channels=list(m.channels),
        fields=summary_fields(m),
        details={"qemu": generation_details(m)},
    )
