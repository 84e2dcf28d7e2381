"""The session model's rules: phases, rounds, page counts, outcomes, wire downtime, resent and
preempt pages, page requests, the QEMU generation, rates; from synthetic events with explicit
times (``Migration.apply`` is given the time of every event)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, TypeVar, cast

import pytest

from migtap.errors import StreamError
from migtap.model import (
    Change,
    DestinationShut,
    DeviceBatch,
    DeviceResult,
    DevicesDecoded,
    GenerationNarrowed,
    Migration,
    PhaseChanged,
    RoundFinished,
    summarize,
    summary_fields,
)
from migtap.vocabulary import ChannelInfo, ChannelKind, Direction, Outcome, Peer, Phase
from migtap.wire.constants import MigCmd, SectionType
from migtap.wire.events import (
    Command,
    Configuration,
    EndOfState,
    Event,
    MultifdInit,
    MultifdPacket,
    Packaged,
    PackagedEnd,
    RamBlock,
    RamBlockList,
    RamMultifdFlush,
    RamPages,
    RpPong,
    RpReqPages,
    RpReqPagesId,
    RpShut,
    RpSwitchoverAck,
    SectionHeader,
    StreamHeader,
)
from migtap.wire.vmdesc import VmdescDocument

if TYPE_CHECKING:
    from migtap.annotate.walk import DecodedSection

S2D, D2S = Direction.SRC_TO_DST, Direction.DST_TO_SRC
FULL, END = SectionType.QEMU_VM_SECTION_FULL, SectionType.QEMU_VM_SECTION_END
HEADER = StreamHeader(0, 0x5145564D, 3)
T0 = 100.0  # when every session of these tests starts
MiB = 1024 * 1024
C = TypeVar("C")


def channel(index: int = 0, kind: ChannelKind = ChannelKind.MAIN) -> ChannelInfo:
    return ChannelInfo(index, index + 1, kind, "127.0.0.1:1", "127.0.0.1:2", T0)


def session(*kinds: ChannelKind, session_id: int = 1) -> tuple[Migration, list[ChannelInfo]]:
    """A migration started at ``T0`` with one channel per kind (a main channel by default)."""
    m = Migration(session_id, started=T0)
    channels = [channel(i, kind) for i, kind in enumerate(kinds or (ChannelKind.MAIN,))]
    for ch in channels:
        m.add_channel(ch)
    return m, channels


def pages(round_: int, normal: int = 0, zero: int = 0, xbzrle: int = 0) -> RamPages:
    return RamPages(0, 0, 2, "pc.ram", round_, normal, zero, xbzrle)


def packet(
    num: int, normal: int, first: int | None, last: int | None, zero: int = 0
) -> MultifdPacket:
    return MultifdPacket(
        0, 0, num, 128, normal, zero, 0, "pc.ram", normal * 4096, False, first, last
    )


def blocks(total: int) -> RamBlockList:
    return RamBlockList(10, 2, total, (RamBlock("pc.ram", total),))


def apply(
    m: Migration, ch: ChannelInfo, *events: Event, at: float, direction: Direction = S2D
) -> list[Change]:
    """Apply ``events`` at time ``at``; every change they made, in order."""
    changes: list[Change] = []
    for e in events:
        changes += m.apply(ch, direction, e, at)
    return changes


def precopy(m: Migration, ch: ChannelInfo) -> list[Change]:
    """Setup and the bulk round at T0, round 2 from T0+2, the VM stopped at T0+3, EOF 50 ms
    later."""
    changes = apply(m, ch, HEADER, blocks(16 * 4096), pages(1, normal=4, zero=4), at=T0)
    changes += apply(m, ch, pages(2, normal=2), at=T0 + 2)
    changes += apply(
        m,
        ch,
        SectionHeader(500, END, 2, None, None, None),
        pages(2, zero=1),
        SectionHeader(600, FULL, 3, "timer", 0, 2),
        at=T0 + 3,
    )
    changes += apply(m, ch, EndOfState(900), at=T0 + 3.05)
    return changes


def close(m: Migration, ch: ChannelInfo, reason: str) -> dict[str, object]:
    """The main channel closed for ``reason``: the summary fields."""
    ch.close_reason = reason
    ch.first_closed = Peer.DESTINATION if reason.startswith("destination") else Peer.SOURCE
    return summary_fields(m)


def of_type(changes: list[Change], cls: type[C]) -> list[C]:
    return [c for c in changes if isinstance(c, cls)]


# -- phases, rounds, counts ----------------------------------------------------------------------


def test_phases_rounds_and_counts() -> None:
    m, (ch,) = session()
    changes = precopy(m, ch)
    phases = of_type(changes, PhaseChanged)
    assert [p.text for p in phases] == ["setup", "bulk round", "round 2", "stop-and-copy"]
    assert [p.at for p in phases] == [T0, T0, T0 + 2, T0 + 3]
    assert phases[-1].first_section == 2  # an END section has no idstr: its section id
    first, last = of_type(changes, RoundFinished)
    assert first.round.number == 1
    assert first.round.duration_s(m.now) == 2.0
    assert (first.round.normal, first.round.zero) == (4, 4)
    assert first.dirty_rate_bytes_s is None  # the bulk round scans, nothing was dirtied yet
    assert last.round.number == 2  # the last round ends with EOF
    assert last.round.duration_s(m.now) == pytest.approx(1.05)
    assert (last.round.normal, last.round.zero) == (2, 1)
    assert last.dirty_rate_bytes_s == pytest.approx(3 * 4096 / 1.05)
    assert m.phase is Phase.STOP_AND_COPY
    assert [r.finished for r in m.rounds] == [True, True]
    assert m.last_section is not None
    assert m.last_section.as_dict() == {
        "offset": 600,
        "kind": "QEMU_VM_SECTION_FULL",
        "section_id": 3,
        "idstr": "timer",
    }
    fields = close(m, ch, "eof_both")
    assert fields["outcome"] == "completed"
    assert fields["rounds"] == 2
    assert (fields["ram_normal_pages"], fields["ram_zero_pages"]) == (6, 5)
    assert fields["wire_downtime_ms"] == 50.0
    assert fields["last_phase"] == "stop-and-copy"
    assert fields["duration_s"] == 3.05  # to the latest input: the session has not ended


def test_a_round_change_is_reported_every_round_other_phases_once() -> None:
    m, (ch,) = session()
    changes = apply(m, ch, HEADER, HEADER, pages(1, normal=1), at=T0)
    changes += apply(m, ch, pages(2, normal=1), pages(2, normal=1), pages(3, normal=1), at=T0 + 1)
    texts = [p.text for p in of_type(changes, PhaseChanged)]
    assert texts == ["setup", "bulk round", "round 2", "round 3"]
    assert m.phase_text == "round 3"
    assert [r.pages for r in m.rounds] == [1, 2, 1]


def test_a_header_on_another_channel_is_not_setup() -> None:
    m, (_main, mfd) = session(ChannelKind.MAIN, ChannelKind.MULTIFD)
    assert apply(m, mfd, HEADER, at=T0) == []
    assert m.phase is Phase.CONNECTING


# -- outcomes and wire downtime ------------------------------------------------------------------


def test_shut_extends_downtime_and_nonzero_shut_fails() -> None:
    m, (ch,) = session()
    precopy(m, ch)
    changes = apply(m, ch, RpShut(0, 1), at=T0 + 3.15, direction=D2S)
    assert changes == [DestinationShut(1)]
    assert (m.shut_at, m.shut_value) == (T0 + 3.15, 1)
    fields = close(m, ch, "eof_both")
    assert fields["wire_downtime_ms"] == 150.0
    assert fields["outcome"] == "failed"


def test_shut_zero_after_eof_completed() -> None:
    m, (ch,) = session()
    precopy(m, ch)
    assert apply(m, ch, RpShut(0, 0), at=T0 + 3.1, direction=D2S) == [DestinationShut(0)]
    # The destination's word beats how the socket closed.
    ch.reset_by = Peer.DESTINATION
    fields = close(m, ch, "destination_reset")
    assert fields["outcome"] == "completed"
    assert fields["wire_downtime_ms"] == 100.0


def test_shut_zero_before_eof_failed() -> None:
    m, (ch,) = session()
    apply(m, ch, HEADER, pages(1, normal=1), at=T0)
    apply(m, ch, RpShut(0, 0), at=T0 + 1, direction=D2S)
    assert close(m, ch, "eof_both")["outcome"] == "failed"


def test_destination_resetting_after_eof_without_return_path_failed() -> None:
    """The source can write everything, EOF included, into buffers of a dead destination: its
    kernel then resets the connection. A destination that read it all closes cleanly, maybe
    even before the source does."""
    m, (ch,) = session()
    precopy(m, ch)
    ch.reset_by = Peer.DESTINATION
    assert close(m, ch, "destination_reset")["outcome"] == "failed"
    ch.reset_by = None
    assert close(m, ch, "destination_closed")["outcome"] == "completed"
    assert m.outcome() is Outcome.COMPLETED


@pytest.mark.parametrize(
    ("reason", "outcome"),
    [("source_closed", "cancelled"), ("destination_closed", "failed"), ("source_reset", "failed")],
)
def test_outcome_before_eof(reason: str, outcome: str) -> None:
    m, (ch,) = session()
    apply(m, ch, HEADER, pages(1, normal=1), at=T0)
    assert close(m, ch, reason)["outcome"] == outcome
    assert m.wire_downtime_ms() is None  # the VM never stopped


def test_a_detached_parser_before_eof_is_unknown_unless_the_destination_closed_first() -> None:
    m, (ch,) = session()
    apply(m, ch, HEADER, at=T0)
    ch.parse_error = "src-to-dst: bad section type"
    assert close(m, ch, "source_closed")["outcome"] == "unknown"
    assert close(m, ch, "destination_closed")["outcome"] == "failed"


def test_no_main_channel_is_unknown() -> None:
    m, _ = session(ChannelKind.TLS)
    assert m.outcome() is Outcome.UNKNOWN
    assert summary_fields(m)["outcome"] == "unknown"
    assert summary_fields(m)["channel_kinds"] == ["tls"]


def test_postcopy_phase_and_downtime_until_the_package_ends() -> None:
    m, (ch,) = session()
    changes = apply(m, ch, HEADER, pages(1, normal=3), at=T0)
    changes += apply(m, ch, Packaged(100, 50, 109), at=T0 + 1)
    changes += apply(m, ch, SectionHeader(110, FULL, 3, "timer", 0, 2), at=T0 + 1)
    changes += apply(m, ch, PackagedEnd(159), at=T0 + 1.02)
    changes += apply(m, ch, pages(1, normal=2), EndOfState(300), at=T0 + 6.02)
    fields = close(m, ch, "eof_both")
    assert m.phase is Phase.POSTCOPY
    # FULL inside the package is not stop-and-copy: the VM stopped when the package was sent.
    assert [p.text for p in of_type(changes, PhaseChanged)] == ["setup", "bulk round", "postcopy"]
    assert (m.stopped_at, m.switched_at, m.eof_at) == (T0 + 1, T0 + 1.02, T0 + 6.02)
    assert fields["wire_downtime_ms"] == 20.0
    assert fields["outcome"] == "completed"
    assert fields["ram_normal_pages"] == 5
    assert fields["last_phase"] == "postcopy"


def test_eof_inside_the_package_is_not_the_end_of_the_stream() -> None:
    m, (ch,) = session()
    apply(m, ch, HEADER, Packaged(100, 50, 109), EndOfState(120), at=T0)
    assert m.eof_at is None
    apply(m, ch, PackagedEnd(159), EndOfState(160), at=T0 + 1)
    assert m.eof_at == T0 + 1


def test_a_full_section_during_setup_does_not_stop_the_vm() -> None:
    """8.0+: an early_setup device (virtio-mem) is saved as a top-level FULL section in the
    setup phase, while the VM runs; the stop is the first END/FULL after that."""
    m, (ch,) = session()
    ram_start = SectionHeader(20, SectionType.QEMU_VM_SECTION_START, 2, "ram", 0, 4)
    apply(m, ch, HEADER, ram_start, at=T0)
    apply(m, ch, SectionHeader(90, FULL, 5, "virtio-mem-device-early", 0, 1), at=T0)
    apply(m, ch, pages(1, normal=4), at=T0 + 1)
    apply(m, ch, SectionHeader(500, END, 2, None, None, None), at=T0 + 10)
    apply(m, ch, EndOfState(900), at=T0 + 10.05)
    assert m.stopped_at == T0 + 10
    assert m.wire_downtime_ms() == 50.0


# -- multifd, resent and preempt pages, page requests --------------------------------------------


def test_multifd_pages_count_and_resent_pages_are_not_double_counted() -> None:
    m, (main, mfd) = session(ChannelKind.MAIN, ChannelKind.MULTIFD)
    apply(m, main, HEADER, pages(1, zero=7), at=T0)
    apply(m, mfd, MultifdInit(0, 1, uuid.UUID(int=0), 3), at=T0)
    assert mfd.multifd_id == 3
    assert mfd.label == "multifd-3"
    # packet 5 ends with page 0x9000; packet 6 (seen first, on another channel) repeats it.
    apply(m, mfd, packet(6, 4, 0x9000, 0xC000), packet(5, 128, 0x1000, 0x9000), at=T0 + 1)
    apply(m, mfd, packet(7, 2, 0x20000, 0x21000, zero=3), at=T0 + 1)  # no repeat: 0xC000
    fields = close(m, main, "eof_both")
    assert fields["ram_normal_pages"] == 4 + 128 + 2 - 1
    assert fields["ram_normal_pages_resent"] == 1
    assert fields["ram_zero_pages"] == 10
    assert fields["channel_kinds"] == ["main", "multifd"]


def test_rounds_from_multifd_flushes_when_main_carries_no_pages() -> None:
    """10.0+: every page goes over multifd; MULTIFD_FLUSH on main marks each pass."""
    m, (main, mfd) = session(ChannelKind.MAIN, ChannelKind.MULTIFD)
    changes = apply(m, main, HEADER, RamMultifdFlush(10, 2), at=T0)
    changes += apply(
        m, mfd, packet(1, 100, 0, 0x63000, zero=20), packet(2, 28, 0x64000, 0x7F000), at=T0 + 1
    )
    changes += apply(m, main, RamMultifdFlush(20, 2), at=T0 + 2)
    changes += apply(m, mfd, packet(3, 0, None, None), at=T0 + 2)  # an empty SYNC packet
    assert len(m.rounds) == 1  # ... starts nothing
    changes += apply(m, mfd, packet(4, 5, 0x1000, 0x5000), at=T0 + 3)
    changes += apply(m, main, RamMultifdFlush(30, 2), EndOfState(40), at=T0 + 4)
    fields = close(m, main, "eof_both")
    assert fields["rounds"] == 2
    assert [r.normal for r in m.rounds] == [128, 5]
    assert [(r.started, r.ended) for r in m.rounds] == [(T0 + 1, T0 + 3), (T0 + 3, T0 + 4)]
    assert fields["ram_zero_pages"] == 20
    assert [p.text for p in of_type(changes, PhaseChanged)] == ["setup", "bulk round", "round 2"]


def test_multifd_and_main_pages_share_one_round() -> None:
    """7.2-9.x: zero pages on main, normal pages on multifd, in the same pass."""
    m, (main, mfd) = session(ChannelKind.MAIN, ChannelKind.MULTIFD)
    apply(m, main, HEADER, at=T0)
    apply(m, mfd, packet(1, 10, 0, 0x9000), at=T0)  # multifd speaks first
    apply(m, main, pages(1, zero=50), pages(2, zero=3), at=T0 + 1)
    apply(m, mfd, packet(2, 2, 0x20000, 0x21000), at=T0 + 1)
    fields = close(m, main, "eof_both")
    assert fields["rounds"] == 2
    assert [(r.normal, r.zero) for r in m.rounds] == [(10, 50), (2, 3)]


def test_preempt_pages_count_without_starting_rounds() -> None:
    m, (main, preempt) = session(ChannelKind.MAIN, ChannelKind.POSTCOPY_PREEMPT)
    apply(m, main, pages(1, normal=10), at=T0)
    apply(m, preempt, pages(1, normal=2), pages(2, normal=1), pages(3, zero=1), at=T0 + 1)
    requests = (RpReqPagesId(0, 0x1000, 4096, "pc.ram"), RpReqPages(20, 0x2000, 4096, "pc.ram"))
    apply(m, main, *requests, at=T0 + 1, direction=D2S)
    fields = close(m, main, "eof_both")
    assert fields["rounds"] == 1  # the preempt channel's page order says nothing of rounds
    assert (fields["ram_normal_pages"], fields["ram_zero_pages"]) == (13, 1)
    assert fields["ram_preempt_pages"] == 4
    assert fields["postcopy_requests"] == 2


def test_preempt_pages_before_any_main_page_start_the_first_round() -> None:
    m, (main, preempt) = session(ChannelKind.MAIN, ChannelKind.POSTCOPY_PREEMPT)
    apply(m, main, HEADER, at=T0)
    apply(m, preempt, pages(5, normal=2), at=T0 + 1)
    assert [(r.number, r.normal) for r in m.rounds] == [(1, 2)]
    assert m.preempt == 2


# -- the QEMU generation -------------------------------------------------------------------------


def test_qemu_generation_narrows_and_is_kept_for_session_json() -> None:
    m, (ch,) = session(session_id=3)
    changes = apply(m, ch, Configuration(8, "pc-q35-9.2"), at=T0)
    changes += apply(m, ch, Command(100, MigCmd.MIG_CMD_OPEN_RETURN_PATH), at=T0)
    changes += apply(m, ch, RpPong(0, 1), RpSwitchoverAck(12), at=T0 + 1, direction=D2S)
    changes += apply(m, ch, Command(5000, MigCmd.MIG_CMD_SWITCHOVER_START), at=T0 + 2)
    changes += apply(m, ch, Command(6000, MigCmd.MIG_CMD_SWITCHOVER_START), at=T0 + 2)  # once
    assert of_type(changes, GenerationNarrowed) == [
        GenerationNarrowed(Peer.SOURCE, "9.2 or newer", "machine type pc-q35-9.2"),
        GenerationNarrowed(Peer.DESTINATION, "8.1 or newer", "return path SWITCHOVER_ACK"),
        GenerationNarrowed(Peer.SOURCE, "10.0 or newer", "SWITCHOVER_START command"),
    ]
    assert m.machine_type == "pc-q35-9.2"
    fields = close(m, ch, "eof_both")
    assert (fields["source_qemu"], fields["destination_qemu"]) == ("10.0 or newer", "8.1 or newer")
    assert fields["machine_type"] == "pc-q35-9.2"
    summary = summarize(m, started_wall=T0, ended_wall=T0 + 3)
    details = summary.details["qemu"]
    assert isinstance(details, dict)
    assert details["machine_type"] == "pc-q35-9.2"
    source = details["source"]
    assert isinstance(source, dict)
    assert [e["offset"] for e in source["evidence"]] == [8, 5000]


# -- the model's own promises --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "number", "text"),
    [
        (Phase.CONNECTING, 0, "connecting"),
        (Phase.SETUP, 0, "setup"),
        (Phase.ROUND, 0, "bulk round"),
        (Phase.ROUND, 1, "bulk round"),
        (Phase.ROUND, 2, "round 2"),
        (Phase.ROUND, 3, "round 3"),
        (Phase.STOP_AND_COPY, 3, "stop-and-copy"),
        (Phase.POSTCOPY, 1, "postcopy"),
    ],
)
def test_phase_text(phase: Phase, number: int, text: str) -> None:
    assert phase.text(number) == text
    assert PhaseChanged(phase, number, T0).text == text


def test_phase_text_defaults_to_no_round() -> None:
    assert Phase.ROUND.text() == "bulk round"
    assert Phase.SETUP.text() == "setup"


@pytest.mark.parametrize(("bits", "page_size"), [(12, 4096), (14, 16384), (16, 65536)])
def test_page_size_from_the_streams_configuration(bits: int, page_size: int) -> None:
    m, (ch,) = session()
    m.page_size = 1  # anything: the stream's own word wins
    apply(m, ch, HEADER, Configuration(8, "virt-9.2", target_page_bits=bits), at=T0)
    assert m.page_size == page_size
    # ... and the rules that count bytes use it.
    apply(m, ch, blocks(16 * page_size), pages(1, normal=4), at=T0)
    assert m.remaining_bulk_bytes() == 12 * page_size
    apply(m, ch, pages(2, normal=8), at=T0 + 1)
    (done,) = of_type(apply(m, ch, pages(3, normal=1), at=T0 + 3), RoundFinished)
    assert done.dirty_rate_bytes_s == 8 * page_size / 2


def test_a_configuration_without_page_bits_keeps_the_page_size() -> None:
    m = Migration(1, started=T0, page_size=8192)
    ch = channel()
    m.add_channel(ch)
    apply(m, ch, Configuration(8, "pc-i440fx-7.2"), at=T0)
    assert m.page_size == 8192
    assert m.machine_type == "pc-i440fx-7.2"


def test_remaining_bulk_bytes() -> None:
    m, (ch,) = session()
    assert m.remaining_bulk_bytes() is None  # no round yet
    apply(m, ch, HEADER, pages(1, normal=1), at=T0)
    assert m.remaining_bulk_bytes() is None  # RAM size not known
    apply(m, ch, blocks(10 * 4096), at=T0)
    assert m.remaining_bulk_bytes() == 9 * 4096
    apply(m, ch, pages(1, normal=3, zero=2, xbzrle=1), at=T0 + 1)  # every kind of page counts
    assert m.remaining_bulk_bytes() == 3 * 4096
    apply(m, ch, pages(1, zero=5), at=T0 + 1)  # more pages than RAM (re-sent): never negative
    assert m.remaining_bulk_bytes() == 0
    apply(m, ch, pages(2, normal=1), at=T0 + 2)
    assert m.remaining_bulk_bytes() is None  # only in the bulk round


def test_remaining_bulk_bytes_is_none_once_the_vm_stopped() -> None:
    m, (ch,) = session()
    apply(m, ch, HEADER, blocks(10 * 4096), pages(1, normal=1), at=T0)
    apply(m, ch, SectionHeader(500, END, 2, None, None, None), at=T0 + 1)
    assert m.phase is Phase.STOP_AND_COPY
    assert m.round is not None
    assert m.round.number == 1
    assert m.remaining_bulk_bytes() is None


def test_sample_rates_per_channel() -> None:
    m, (main, mfd) = session(ChannelKind.MAIN, ChannelKind.MULTIFD)
    main.bytes_src_to_dst, main.bytes_dst_to_src = 3 * MiB, MiB  # both directions count
    mfd.bytes_src_to_dst = 2 * MiB
    m.sample(T0 + 2)
    assert m.channel_rates == {0: 2 * MiB, 1: MiB}
    assert m.rate_bytes_s == 3 * MiB
    assert m.now == T0 + 2
    main.bytes_src_to_dst += 4 * MiB
    m.sample(T0 + 3)  # since the previous sample, not since the start
    assert m.channel_rates == {0: 4 * MiB, 1: 0.0}
    assert m.rate_bytes_s == 4 * MiB
    m.sample(T0 + 3)  # no time passed: the rates stay
    assert m.channel_rates == {0: 4 * MiB, 1: 0.0}


def test_a_channel_that_joins_late_is_rated_from_its_first_sample() -> None:
    m, (main,) = session()
    m.sample(T0 + 1)
    late = channel(1, ChannelKind.MULTIFD)
    m.add_channel(late)
    late.bytes_src_to_dst = MiB
    m.sample(T0 + 2)
    assert m.channel_rates == {0: 0.0, 1: MiB}
    assert main.index == 0


def test_end_fixes_the_duration_and_summary_fields_take_the_capture_dir() -> None:
    m, (ch,) = session()
    precopy(m, ch)
    ch.bytes_src_to_dst, ch.bytes_dst_to_src = 1000, 10
    m.end(T0 + 4)
    m.end(T0 + 9)  # the first end stands
    fields = summary_fields(m, capture_dir="/tmp/cap/1")
    assert fields["duration_s"] == 4.0
    assert fields["capture_dir"] == "/tmp/cap/1"
    assert (fields["bytes_src_to_dst"], fields["bytes_dst_to_src"]) == (1000, 10)
    summary = summarize(m, started_wall=T0, ended_wall=T0 + 4)
    assert summary.session_id == 1
    assert summary.outcome is Outcome.COMPLETED
    assert summary.channels == [ch]
    assert summary.fields == summary_fields(m)
    assert summary.fields["capture_dir"] is None  # the capture observer adds its own


def test_device_results_and_the_streams_vmdesc() -> None:
    m, (ch,) = session()
    apply(m, ch, HEADER, Configuration(8, "pc-i440fx-7.2"), at=T0)
    doc = VmdescDocument(900, {"page_size": 16384, "devices": []}, page_size=16384)
    decoded = cast("DecodedSection", object())
    error = StreamError("short", offset=210, state="field")
    batch = DeviceBatch(
        "stream",
        (
            DeviceResult(100, "timer", 0, 2, 20, "stream", decoded=decoded),
            DeviceResult(200, "apic", 0, 3, 30, "stream", error=error),
            DeviceResult(300, "odd", 0, 1, 5, "stream", in_vmdesc=False),
        ),
        document=doc,
        dropped=2,
    )
    changes = m.apply_devices(batch, T0 + 5)
    # An 8.2+ vmdesc describes the configuration: this one does not.
    assert changes == [
        GenerationNarrowed(
            Peer.SOURCE, "7.2 to 8.1", "configuration record sent but not described in the vmdesc"
        ),
        DevicesDecoded(batch),
    ]
    assert m.page_size == 16384  # the vmdesc's page size
    assert m.now == T0 + 5
    assert (m.devices_decoded, m.devices_failed, m.devices_dropped) == (1, 2, 2)
    fields = summary_fields(m)
    assert (fields["devices_decoded"], fields["devices_failed"]) == (1, 2)
    assert fields["source_qemu"] == "7.2 to 8.1"


def test_device_results_without_any_vmdesc_are_neither_decoded_nor_failed() -> None:
    m, _ = session()
    batch = DeviceBatch(None, (DeviceResult(100, "timer", 0, 2, 20, None),))
    assert m.apply_devices(batch, T0 + 1) == [DevicesDecoded(batch)]
    assert (m.devices_decoded, m.devices_failed) == (0, 0)
    assert m.page_size == 4096
