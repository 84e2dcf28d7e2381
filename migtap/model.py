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

import bisect
import collections
import dataclasses
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
    wire_start: int = 0  # stream bytes (all channels, source to destination) when it began
    wire_end: int | None = None  # ... and when it ended

    @property
    def pages(self) -> int:
        return self.normal + self.zero + self.xbzrle

    @property
    def wire_bytes(self) -> int | None:
        return None if self.wire_end is None else self.wire_end - self.wire_start

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
class SectionStart:
    """A section header on the main channel, named (PART/END take the idstr of their START)."""

    offset: int
    kind: str
    section_id: int
    idstr: str | None
    instance_id: int | None

    def as_dict(self) -> dict[str, object]:
        return {
            "idstr": self.idstr,
            "instance_id": self.instance_id,
            "offset": self.offset,
            "kind": self.kind,
            "section_id": self.section_id,
        }


@dataclass(frozen=True, slots=True)
class FailureRange:
    """Where a destination that failed can have been reading: the stream offsets it can have
    consumed (``KernelView.consumed``), the sections those bytes belong to, its SHUT value."""

    offset_min: int
    offset_max: int
    sections: tuple[SectionStart, ...]
    shut: int | None
    acked: int | None  # what its kernel acknowledged
    reset: bool  # it closed with bytes unread
    sections_before: int | None = None  # the range starts before the sections kept

    def as_dict(self) -> dict[str, object]:
        return {
            "offset_min": self.offset_min,
            "offset_max": self.offset_max,
            "sections": [s.as_dict() for s in self.sections],
            "shut": self.shut,
            "acked": self.acked,
            "reset": self.reset,
            "sections_before": self.sections_before,
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


@dataclass(frozen=True, slots=True)
class Convergence:
    """The judgment over the last rounds (rules in :meth:`Migration._judge`)."""

    converging: bool
    rounds: tuple[int, ...]  # the round numbers judged
    round_pages: tuple[int, ...]
    working_set_bytes: int  # the most pages of a round judged, as bytes
    dirty_rate_bytes_s: float  # the guest: what it dirtied during a round, per second
    transfer_rate_bytes_s: float  # the wire, during the last round judged
    expected_downtime_ms: float  # the working set at the transfer rate

    def as_dict(self) -> dict[str, object]:
        return {
            "converging": self.converging,
            "rounds": list(self.rounds),
            "round_pages": list(self.round_pages),
            "working_set_bytes": self.working_set_bytes,
            "dirty_rate_mib_s": round(self.dirty_rate_bytes_s / MiB, 1),
            "transfer_rate_mib_s": round(self.transfer_rate_bytes_s / MiB, 1),
            "expected_downtime_ms": round(self.expected_downtime_ms, 1),
        }


@dataclass(frozen=True, slots=True)
class ConvergenceChanged:
    """A precopy migration stopped converging (``judgment.converging`` False), its picture
    changed while not converging, or it converged after all (True, at stop-and-copy)."""

    judgment: Convergence


Change = (
    PhaseChanged
    | RoundFinished
    | GenerationNarrowed
    | DestinationShut
    | DevicesDecoded
    | ConvergenceChanged
)

#: Rounds after the bulk round that a judgment looks at.
JUDGED_ROUNDS: Final = 4
#: "Not falling": the last two rounds hold at least this share of the pages of the two before.
NOT_FALLING: Final = 0.9
#: "Dirty rate at or above the transfer rate", with this much slack for measuring noise.
RATE_SLACK: Final = 0.9
#: A new warning when the working set or a rate moved by more than this share.
PICTURE_CHANGE: Final = 0.5
#: Section headers of the main channel kept to name what a failure range covers.
SECTIONS_KEPT: Final = 4096


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
        self.convergence: Convergence | None = None  # the latest judgment
        self.sections: collections.deque[SectionStart] = collections.deque(maxlen=SECTIONS_KEPT)
        self._section_names: dict[int, tuple[str | None, int | None]] = {}
        self.failure: FailureRange | None = None  # where a destination that failed was
        self.wire_bytes: dict[int, int] = {}  # per channel: stream bytes the events covered
        self._warned: Convergence | None = None  # the not-converging picture last reported
        self.postcopy = False  # the PACKAGED switch to postcopy was seen
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
        if from_source:  # after: a round that this event starts begins where the wire was
            self._note_wire(channel, event)
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
        if phase is Phase.POSTCOPY:
            self.postcopy = True
        if phase is Phase.STOP_AND_COPY and self._warned is not None:
            judgment = dataclasses.replace(self._warned, converging=True)
            self.convergence = judgment
            changes.append(ConvergenceChanged(judgment))

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

    def destination_failed(self, channel: ChannelInfo) -> FailureRange | None:
        """The main channel closed: if the destination failed (a SHUT other than 0, a reset, or
        a close before the stream's end), where it can have been reading. Kept in ``failure``."""
        shut_failed = self.shut_value is not None and self.shut_value != 0
        reset = channel.reset_by is Peer.DESTINATION
        early = channel.first_closed is Peer.DESTINATION and self.eof_at is None
        if self.shut_value == 0 or not (shut_failed or reset or early):
            return None
        forwarded = channel.bytes_src_to_dst
        view = channel.kernel_view
        lo, hi = view.consumed(forwarded) if view is not None else (0, forwarded)
        kept = list(self.sections)
        starts = [s.offset for s in kept]
        first = max(bisect.bisect_right(starts, lo) - 1, 0)  # the section holding offset lo
        covered = tuple(s for s in kept[first:] if s.offset <= hi)
        before = (
            kept[0].offset if kept and lo < kept[0].offset and len(kept) == SECTIONS_KEPT else None
        )
        self.failure = FailureRange(
            lo,
            hi,
            covered,
            self.shut_value,
            None if view is None else view.acked,
            reset,
            before,
        )
        return self.failure

    def _note_wire(self, channel: ChannelInfo, event: Event) -> None:
        """How far the source's bytes on this channel are covered by events (for the rates of
        rounds: the same live and offline, unlike socket counters)."""
        end = event.offset
        if isinstance(event, RamPages):
            end += event.length
        elif isinstance(event, MultifdPacket):
            end += event.payload_bytes
        if end > self.wire_bytes.get(channel.index, 0):
            self.wire_bytes[channel.index] = end

    def _new_round(self, changes: list[Change]) -> Round:
        now = self.now
        self._flush_pending = False
        if self.round is not None:
            self._finish_round(self.round, now, changes)
        rnd = Round(len(self.rounds) + 1, now, wire_start=sum(self.wire_bytes.values()))
        self.rounds.append(rnd)
        if self.phase in (Phase.SETUP, Phase.ROUND):
            self._set_phase(Phase.ROUND, changes)
        return rnd

    def _finish_round(self, rnd: Round, now: float, changes: list[Change]) -> None:
        if rnd.finished:
            return
        rnd.ended = now
        rnd.wire_end = sum(self.wire_bytes.values())
        duration = now - rnd.started
        # Pages sent in a later round were dirtied during the one before it.
        rate = rnd.pages * self.page_size / duration if duration > 0 and rnd.number > 1 else None
        changes.append(RoundFinished(rnd, rate))
        if self.phase is Phase.ROUND:
            self._judge(changes)

    def _judge(self, changes: list[Change]) -> None:
        """Is precopy converging? Over the last ``JUDGED_ROUNDS`` finished rounds after the bulk
        round (each a round QEMU chose to start rather than stop the VM): not when the last two
        hold at least ``NOT_FALLING`` of the pages of the two before them, and the guest dirtied
        pages (the later rounds', during the rounds before them) at least about as fast as the
        wire carried the later rounds. Pairs and runs of rounds, not single ones: a
        bandwidth-limited QEMU sends in bursts, so one round can take no time at all and the
        next catch only a few pages. Reported once, then again only when the picture changes by
        more than ``PICTURE_CHANGE``."""
        done = [r for r in self.rounds if r.number > 1 and r.ended is not None]
        if len(done) < JUDGED_ROUNDS:
            return
        last = done[-JUDGED_ROUNDS:]
        earlier, later = last[:-1], last[1:]
        earlier_s = sum(r.duration_s(self.now) for r in earlier)
        later_s = sum(r.duration_s(self.now) for r in later)
        wire = [r.wire_bytes for r in later]
        if earlier_s <= 0 or later_s <= 0 or None in wire:
            return
        pages = tuple(r.pages for r in last)
        dirty = sum(r.pages for r in later) * self.page_size / earlier_s
        transfer = sum(w for w in wire if w is not None) / later_s
        falling = pages[-1] + pages[-2] < NOT_FALLING * (pages[-3] + pages[-4])
        working_set = max(pages) * self.page_size
        judgment = Convergence(
            converging=falling or dirty < RATE_SLACK * transfer,
            rounds=tuple(r.number for r in last),
            round_pages=pages,
            working_set_bytes=working_set,
            dirty_rate_bytes_s=dirty,
            transfer_rate_bytes_s=transfer,
            # the working set at the wire's rate: how long stopping the VM now would take
            expected_downtime_ms=working_set / transfer * 1000,
        )
        self.convergence = judgment
        if not judgment.converging and _picture_changed(self._warned, judgment):
            self._warned = judgment
            changes.append(ConvergenceChanged(judgment))

    def convergence_figures(self) -> dict[str, object] | None:
        """The judgment behind ``converging()``: the not-converging picture when it never
        converged, else the latest judgment."""
        judgment = self._warned if self.converging() is False else self.convergence
        return None if judgment is None else judgment.as_dict()

    def converging(self) -> bool | None:
        """True once precopy reached stop-and-copy; False if it was judged not converging and
        never did (cancelled, failed, or rescued by postcopy); None when there is no telling."""
        if self.stopped_at is not None and not self.postcopy:
            return True
        if self._warned is not None:
            return False
        return None

    def _on_section(self, event: SectionHeader, changes: list[Change]) -> None:
        self.last_section = SectionInFlight(
            event.offset, event.kind.name, event.section_id, event.idstr
        )
        if event.idstr is not None:
            self._section_names[event.section_id] = (event.idstr, event.instance_id)
        idstr, instance = self._section_names.get(event.section_id, (None, None))
        if not self.in_packaged:  # offsets inside a PACKAGED blob are not the stream's order
            self.sections.append(
                SectionStart(event.offset, event.kind.name, event.section_id, idstr, instance)
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


def _picture_changed(before: Convergence | None, now: Convergence) -> bool:
    if before is None:
        return True
    pairs = (
        (before.working_set_bytes, now.working_set_bytes),
        (before.dirty_rate_bytes_s, now.dirty_rate_bytes_s),
        (before.transfer_rate_bytes_s, now.transfer_rate_bytes_s),
    )
    return any(abs(b - a) > PICTURE_CHANGE * max(a, 1) for a, b in pairs)


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
        "failure": None if m.failure is None else m.failure.as_dict(),
        "converging": m.converging(),
        "convergence": m.convergence_figures(),
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
