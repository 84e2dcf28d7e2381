"""The live picture: phases, rounds, page counts, outcome and the summary, from synthetic events."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from migtap.relay.pipe import Direction
from migtap.sinks import ChannelInfo, SessionSummary
from migtap.sinks.progress import ProgressSink
from migtap.wire.constants import SectionType
from migtap.wire.events import (
    EndOfState,
    Packaged,
    PackagedEnd,
    RamBlock,
    RamBlockList,
    RamPages,
    SectionHeader,
    StreamHeader,
)
from migtap.wire.multifd import MultifdInit, MultifdPacket
from migtap.wire.return_path import RpShut

S2D, D2S = Direction.SRC_TO_DST, Direction.DST_TO_SRC
FULL, END = SectionType.QEMU_VM_SECTION_FULL, SectionType.QEMU_VM_SECTION_END


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def channel(index: int = 0, kind: str = "main") -> ChannelInfo:
    return ChannelInfo(index, index + 1, kind, "127.0.0.1:1", "127.0.0.1:2", 0.0)


def pages(round_: int, normal: int = 0, zero: int = 0, xbzrle: int = 0) -> RamPages:
    return RamPages(0, 0, 2, "pc.ram", round_, normal, zero, xbzrle)


def packet(
    num: int, normal: int, first: int | None, last: int | None, zero: int = 0
) -> MultifdPacket:
    return MultifdPacket(
        0, 0, num, 128, normal, zero, 0, "pc.ram", normal * 4096, False, first, last
    )


def feed(sink: ProgressSink, ch: ChannelInfo, *events: object, direction: Direction = S2D) -> None:
    for e in events:
        sink.on_event(ch, direction, e)


def precopy(sink: ProgressSink, clock: Clock, ch: ChannelInfo) -> None:
    feed(sink, ch, StreamHeader(0, 0x5145564D, 3))
    feed(sink, ch, RamBlockList(10, 2, 16 * 4096, (RamBlock("pc.ram", 16 * 4096),)))
    feed(sink, ch, pages(1, normal=4, zero=4))
    clock.now += 2
    feed(sink, ch, pages(2, normal=2))
    clock.now += 1
    feed(sink, ch, SectionHeader(500, END, 2, None, None, None))
    feed(sink, ch, pages(2, zero=1))
    feed(sink, ch, SectionHeader(600, FULL, 3, "timer", 0, 2))
    clock.now += 0.05
    feed(sink, ch, EndOfState(900))


def close(sink: ProgressSink, ch: ChannelInfo, reason: str) -> dict[str, object]:
    ch.close_reason = reason
    ch.first_closed = "destination" if reason.startswith("destination") else "source"
    return sink.summary_fields(sink.outcome(), None)


def test_phases_rounds_and_counts() -> None:
    clock = Clock()
    sink = ProgressSink(1, clock=clock)
    ch = channel()
    sink.on_channel(ch)
    with capture_logs() as logs:
        precopy(sink, clock, ch)
    phases = [e["phase"] for e in logs if e["event"] == "migration_phase"]
    assert phases == ["setup", "bulk round", "round 2", "stop-and-copy"]
    first, last = [e for e in logs if e["event"] == "ram_round_finished"]
    assert first["round"] == 1
    assert first["duration_s"] == 2.0
    assert first["pages_normal"] == 4
    assert first["dirty_rate_mib_s"] is None  # the bulk round scans, nothing was dirtied yet
    assert last["round"] == 2  # the last round ends with EOF
    assert last["duration_s"] == 1.05
    assert last["pages_normal"] == 2
    assert last["pages_zero"] == 1
    fields = close(sink, ch, "eof_both")
    assert fields["outcome"] == "completed"
    assert fields["rounds"] == 2
    assert (fields["ram_normal_pages"], fields["ram_zero_pages"]) == (6, 5)
    assert fields["wire_downtime_ms"] == 50.0


def test_shut_extends_downtime_and_nonzero_shut_fails() -> None:
    clock = Clock()
    sink = ProgressSink(1, clock=clock)
    ch = channel()
    sink.on_channel(ch)
    precopy(sink, clock, ch)
    clock.now += 0.1
    feed(sink, ch, RpShut(0, 1), direction=D2S)
    fields = close(sink, ch, "eof_both")
    assert fields["wire_downtime_ms"] == 150.0
    assert fields["outcome"] == "failed"


def test_destination_resetting_after_eof_without_return_path_failed() -> None:
    """The source can write everything, EOF included, into buffers of a dead destination: its
    kernel then resets the connection. A destination that read it all closes cleanly, maybe
    even before the source does."""
    clock = Clock()
    sink = ProgressSink(1, clock=clock)
    ch = channel()
    sink.on_channel(ch)
    precopy(sink, clock, ch)
    ch.reset_by = "destination"
    assert close(sink, ch, "destination_reset")["outcome"] == "failed"
    ch.reset_by = None
    assert close(sink, ch, "destination_closed")["outcome"] == "completed"


@pytest.mark.parametrize(
    ("reason", "outcome"),
    [("source_closed", "cancelled"), ("destination_closed", "failed"), ("source_reset", "failed")],
)
def test_outcome_before_eof(reason: str, outcome: str) -> None:
    sink = ProgressSink(1)
    ch = channel()
    sink.on_channel(ch)
    feed(sink, ch, StreamHeader(0, 0x5145564D, 3), pages(1, normal=1))
    assert close(sink, ch, reason)["outcome"] == outcome


def test_no_main_channel_is_unknown() -> None:
    sink = ProgressSink(1)
    sink.on_channel(channel(kind="tls"))
    assert sink.outcome() == "unknown"


def test_postcopy_phase_and_downtime_until_the_package_ends() -> None:
    clock = Clock()
    sink = ProgressSink(1, clock=clock)
    ch = channel()
    sink.on_channel(ch)
    feed(sink, ch, StreamHeader(0, 0x5145564D, 3), pages(1, normal=3))
    feed(sink, ch, Packaged(100, 50, 109))
    feed(sink, ch, SectionHeader(110, FULL, 3, "timer", 0, 2))
    clock.now += 0.02
    feed(sink, ch, PackagedEnd(159))
    clock.now += 5
    feed(sink, ch, pages(1, normal=2), EndOfState(300))
    fields = close(sink, ch, "eof_both")
    assert sink.view.phase == "postcopy"
    assert fields["wire_downtime_ms"] == 20.0
    assert fields["outcome"] == "completed"
    assert fields["ram_normal_pages"] == 5


def test_multifd_pages_count_and_resent_pages_are_not_double_counted() -> None:
    sink = ProgressSink(1)
    main, mfd = channel(0), channel(1, "multifd")
    sink.on_channel(main)
    sink.on_channel(mfd)
    feed(sink, main, StreamHeader(0, 0x5145564D, 3), pages(1, zero=7))
    feed(sink, mfd, MultifdInit(0, 1, None, 3))  # type: ignore[arg-type]
    assert mfd.multifd_id == 3
    # packet 5 ends with page 0x9000; packet 6 (seen first, on another channel) repeats it.
    feed(sink, mfd, packet(6, 4, 0x9000, 0xC000), packet(5, 128, 0x1000, 0x9000))
    feed(sink, mfd, packet(7, 2, 0x20000, 0x21000, zero=3))  # no repeat: 0xC000 != 0x20000
    fields = close(sink, main, "eof_both")
    assert fields["ram_normal_pages"] == 4 + 128 + 2 - 1
    assert fields["ram_normal_pages_resent"] == 1
    assert fields["ram_zero_pages"] == 10


def test_progress_lines_are_throttled() -> None:
    clock = Clock()
    sink = ProgressSink(1, interval_s=1.0, clock=clock)
    ch = channel()
    sink.on_channel(ch)
    feed(sink, ch, StreamHeader(0, 0x5145564D, 3))
    feed(sink, ch, RamBlockList(10, 2, 100 * 4096, (RamBlock("pc.ram", 100 * 4096),)))
    feed(sink, ch, pages(1, normal=25))
    with capture_logs() as logs:
        for _ in range(10):
            clock.now += 0.25
            ch.bytes_src_to_dst += 1024 * 1024
            sink.tick()
    lines = [e for e in logs if e["event"] == "migration_progress"]
    assert len(lines) == 2
    assert lines[0]["bulk_covered_pct"] == 25.0
    assert lines[0]["bulk_eta_s"] == pytest.approx(3 * (clock.now - 100 - 1.5), rel=0.5)
    assert lines[0]["channels"][0]["rate_mib_s"] == 4.0


def test_summary_is_logged_once_with_the_documented_keys() -> None:
    sink = ProgressSink(7)
    ch = channel()
    sink.on_channel(ch)
    fields = close(sink, ch, "eof_both")
    with capture_logs() as logs:
        sink.on_close(SessionSummary(7, "unknown", 0.0, 1.0, [ch], fields))
    (line,) = logs
    assert line["event"] == "migration_summary"
    for key in (
        "outcome",
        "duration_s",
        "bytes_src_to_dst",
        "bytes_dst_to_src",
        "rounds",
        "ram_normal_pages",
        "ram_zero_pages",
        "ram_xbzrle_pages",
        "wire_downtime_ms",
        "channels",
        "capture_dir",
    ):
        assert key in line


def test_rounds_from_multifd_flushes_when_main_carries_no_pages() -> None:
    """10.0+: every page goes over multifd; MULTIFD_FLUSH on main marks each pass."""
    from migtap.wire.events import RamMultifdFlush

    sink = ProgressSink(1)
    main, mfd = channel(0), channel(1, "multifd")
    sink.on_channel(main)
    sink.on_channel(mfd)
    feed(sink, main, StreamHeader(0, 0x5145564D, 3), RamMultifdFlush(10, 2))
    feed(sink, mfd, packet(1, 100, 0, 0x63000, zero=20), packet(2, 28, 0x64000, 0x7F000))
    feed(sink, main, RamMultifdFlush(20, 2))
    feed(sink, mfd, packet(3, 0, None, None))  # an empty SYNC packet starts nothing
    feed(sink, mfd, packet(4, 5, 0x1000, 0x5000))
    feed(sink, main, RamMultifdFlush(30, 2), EndOfState(40))
    fields = close(sink, main, "eof_both")
    assert fields["rounds"] == 2
    assert [r.normal for r in sink.view.rounds] == [128, 5]
    assert fields["ram_zero_pages"] == 20


def test_multifd_and_main_pages_share_one_round() -> None:
    """7.2-9.x: zero pages on main, normal pages on multifd, in the same pass."""
    sink = ProgressSink(1)
    main, mfd = channel(0), channel(1, "multifd")
    sink.on_channel(main)
    sink.on_channel(mfd)
    feed(sink, main, StreamHeader(0, 0x5145564D, 3))
    feed(sink, mfd, packet(1, 10, 0, 0x9000))  # multifd speaks first
    feed(sink, main, pages(1, zero=50), pages(2, zero=3))
    feed(sink, mfd, packet(2, 2, 0x20000, 0x21000))
    fields = close(sink, main, "eof_both")
    assert fields["rounds"] == 2
    assert [(r.normal, r.zero) for r in sink.view.rounds] == [(10, 50), (2, 3)]


def test_qemu_generation_is_logged_when_it_narrows_and_kept_for_session_json() -> None:
    from migtap.wire.constants import MigCmd
    from migtap.wire.events import Command, Configuration
    from migtap.wire.return_path import RpPong, RpSwitchoverAck

    sink = ProgressSink(3)
    ch = channel()
    sink.on_channel(ch)
    with capture_logs() as logs:
        feed(sink, ch, Configuration(8, "pc-q35-9.2"))
        feed(sink, ch, Command(100, MigCmd.MIG_CMD_OPEN_RETURN_PATH))
        feed(sink, ch, RpPong(0, 1), RpSwitchoverAck(12), direction=D2S)
        feed(sink, ch, Command(5000, MigCmd.MIG_CMD_SWITCHOVER_START))
        feed(sink, ch, Command(6000, MigCmd.MIG_CMD_SWITCHOVER_START))  # a sign counts once
    inferred = [e for e in logs if e["event"] == "qemu_generation_inferred"]
    assert [(e["side"], e["qemu"], e["sign"]) for e in inferred] == [
        ("source", "9.2 or newer", "machine type pc-q35-9.2"),
        ("destination", "8.1 or newer", "return path SWITCHOVER_ACK"),
        ("source", "10.0 or newer", "SWITCHOVER_START command"),
    ]
    fields = close(sink, ch, "eof_both")
    assert (fields["source_qemu"], fields["destination_qemu"]) == ("10.0 or newer", "8.1 or newer")
    details = sink.generation_details()
    assert details["machine_type"] == "pc-q35-9.2"
    source = details["source"]
    assert isinstance(source, dict)
    assert [e["offset"] for e in source["evidence"]] == [8, 5000]


def test_preempt_pages_count_without_starting_rounds() -> None:
    from migtap.wire.return_path import RpReqPages, RpReqPagesId

    sink = ProgressSink(4)
    main, preempt = channel(0), channel(1, "postcopy-preempt")
    for ch in (main, preempt):
        sink.on_channel(ch)
    feed(sink, main, pages(1, normal=10))
    feed(sink, preempt, pages(1, normal=2), pages(2, normal=1), pages(3, zero=1))
    requests = (RpReqPagesId(0, 0x1000, 4096, "pc.ram"), RpReqPages(20, 0x2000, 4096, "pc.ram"))
    feed(sink, main, *requests, direction=D2S)
    fields = close(sink, main, "eof_both")
    assert fields["rounds"] == 1  # the preempt channel's page order says nothing of rounds
    assert (fields["ram_normal_pages"], fields["ram_zero_pages"]) == (13, 1)
    assert fields["ram_preempt_pages"] == 4
    assert fields["postcopy_requests"] == 2
