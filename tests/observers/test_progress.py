"""The progress observer's log lines: phases, finished rounds, progress, the QEMU generation, the
destination's SHUT and the summary; synthetic events delivered through the tap."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pytest
from structlog.testing import capture_logs

from migtap.model import Migration
from migtap.observers.progress import ProgressObserver
from migtap.tap import ChannelTap, SessionTap
from migtap.vocabulary import ChannelInfo, ChannelKind, Direction, Peer
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
    RamPages,
    RpPong,
    RpShut,
    RpSwitchoverAck,
    SectionHeader,
    StreamHeader,
)

if TYPE_CHECKING:
    from collections.abc import MutableMapping

S2D, D2S = Direction.SRC_TO_DST, Direction.DST_TO_SRC
FULL, END = SectionType.QEMU_VM_SECTION_FULL, SectionType.QEMU_VM_SECTION_END
HEADER = StreamHeader(0, 0x5145564D, 3)
T0 = 100.0
MiB = 1024 * 1024


class Clock:
    """The tap's clock: only ``close()`` reads it here (events and ticks get explicit times)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Session:
    """A ``SessionTap`` with only a ``ProgressObserver``, started at ``T0``."""

    def __init__(self, *kinds: ChannelKind, session_id: int = 1) -> None:
        self.clock = Clock()
        self.migration = Migration(session_id, started=T0)
        self.tap = SessionTap(self.migration, [ProgressObserver(self.migration)], clock=self.clock)
        self.channels = [
            self.tap.add_channel(ChannelInfo(i, i + 1, kind, "127.0.0.1:1", "127.0.0.1:2", T0))
            for i, kind in enumerate(kinds or (ChannelKind.MAIN,))
        ]

    @property
    def main(self) -> ChannelTap:
        return self.channels[0]

    def feed(
        self, *events: Event, at: float, ch: ChannelTap | None = None, direction: Direction = S2D
    ) -> None:
        self.tap.deliver(ch or self.main, direction, list(events), at)

    def close(self, reason: str = "eof_both", at: float | None = None) -> None:
        info = self.main.info
        info.close_reason = reason
        info.first_closed = Peer.DESTINATION if reason.startswith("destination") else Peer.SOURCE
        if at is not None:
            self.clock.now = at
        self.tap.close()


def pages(round_: int, normal: int = 0, zero: int = 0, xbzrle: int = 0) -> RamPages:
    return RamPages(0, 0, 2, "pc.ram", round_, normal, zero, xbzrle)


def blocks(total: int) -> RamBlockList:
    return RamBlockList(10, 2, total, (RamBlock("pc.ram", total),))


def packet(num: int, normal: int, first: int, last: int) -> MultifdPacket:
    return MultifdPacket(0, 0, num, 128, normal, 0, 0, "pc.ram", normal * 4096, False, first, last)


def precopy(s: Session) -> None:
    s.feed(HEADER, blocks(16 * 4096), pages(1, normal=4, zero=4), at=T0)
    s.feed(pages(2, normal=2), at=T0 + 2)
    s.feed(
        SectionHeader(500, END, 2, None, None, None),
        pages(2, zero=1),
        SectionHeader(600, FULL, 3, "timer", 0, 2),
        at=T0 + 3,
    )
    s.feed(EndOfState(900), at=T0 + 3.05)


def lines(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == event]


def test_phase_and_round_lines() -> None:
    s = Session()
    with capture_logs() as logs:
        precopy(s)
    phases = lines(logs, "migration_phase")
    assert [e["phase"] for e in phases] == ["setup", "bulk round", "round 2", "stop-and-copy"]
    assert [e["elapsed_s"] for e in phases] == [0.0, 0.0, 2.0, 3.0]
    assert [e.get("first_section") for e in phases] == [None, None, None, 2]
    assert {e["session"] for e in logs} == {1}
    first, last = lines(logs, "ram_round_finished")
    assert first["round"] == 1
    assert first["duration_s"] == 2.0
    assert first["pages_normal"] == 4
    assert first["pages_zero"] == 4
    assert first["dirty_rate_mib_s"] is None  # the bulk round scans, nothing was dirtied yet
    assert last["round"] == 2  # the last round ends with EOF
    assert last["duration_s"] == 1.05
    assert last["pages_normal"] == 2
    assert last["pages_zero"] == 1
    assert last["pages_xbzrle"] == 0


def test_round_line_dirty_rate() -> None:
    s = Session()
    s.feed(HEADER, pages(1, normal=100), at=T0)
    with capture_logs() as logs:
        s.feed(pages(2, normal=256, xbzrle=256), at=T0 + 1)  # 2 MiB of 4 KiB pages
        s.feed(pages(3, normal=1), at=T0 + 2)
    first, second = lines(logs, "ram_round_finished")
    assert first["dirty_rate_mib_s"] is None
    assert (second["round"], second["duration_s"]) == (2, 1.0)
    assert second["pages_xbzrle"] == 256
    assert second["dirty_rate_mib_s"] == 2.0  # pages sent in round 2 were dirtied during it


def test_stop_and_copy_line_names_the_first_section() -> None:
    s = Session()
    s.feed(HEADER, pages(1, normal=1), at=T0)
    with capture_logs() as logs:
        s.feed(SectionHeader(600, FULL, 3, "timer", 0, 2), at=T0 + 1.5)
        s.feed(SectionHeader(700, FULL, 4, "apic", 0, 2), at=T0 + 1.6)  # once
    (line,) = lines(logs, "migration_phase")
    assert line["phase"] == "stop-and-copy"
    assert line["first_section"] == "timer"
    assert line["elapsed_s"] == 1.5


def test_postcopy_line_and_no_stop_and_copy_inside_the_package() -> None:
    s = Session()
    s.feed(HEADER, pages(1, normal=3), at=T0)
    with capture_logs() as logs:
        s.feed(Packaged(100, 50, 109), SectionHeader(110, FULL, 3, "timer", 0, 2), at=T0 + 1)
        s.feed(PackagedEnd(159), at=T0 + 1.02)
        s.feed(pages(1, normal=2), EndOfState(300), at=T0 + 6)
        s.close(at=T0 + 7)
    assert [e["phase"] for e in lines(logs, "migration_phase")] == ["postcopy"]
    (summary,) = lines(logs, "migration_summary")
    assert summary["last_phase"] == "postcopy"
    assert summary["wire_downtime_ms"] == 20.0


def test_progress_lines_are_throttled() -> None:
    s = Session()
    s.feed(HEADER, blocks(100 * 4096), pages(1, normal=25), at=T0)
    now = T0
    with capture_logs() as logs:
        for _ in range(10):
            now += 0.25
            s.main.info.bytes_src_to_dst += MiB
            s.tap.tick(now)
    progress = lines(logs, "migration_progress")
    assert len(progress) == 2  # at T0+1 and T0+2
    assert progress[0]["phase"] == "bulk round"
    assert progress[0]["elapsed_s"] == 1.0
    assert progress[0]["bulk_covered_pct"] == 25.0
    assert progress[0]["bulk_eta_s"] == pytest.approx(3 * (now - T0 - 1.5), rel=0.5)
    assert progress[0]["channels"][0]["rate_mib_s"] == 4.0
    assert progress[1]["elapsed_s"] == 2.0


def test_progress_line_fields() -> None:
    s = Session(ChannelKind.MAIN, ChannelKind.MULTIFD)
    main, mfd = s.channels
    s.feed(HEADER, blocks(100 * 4096), pages(1, zero=10), at=T0)
    s.feed(MultifdInit(0, 1, uuid.UUID(int=0), 3), packet(1, 10, 0, 0x9000), ch=mfd, at=T0)
    main.info.bytes_src_to_dst, main.info.bytes_dst_to_src = 2 * MiB, MiB
    mfd.info.bytes_src_to_dst = MiB
    with capture_logs() as logs:
        s.tap.tick(T0 + 1)
    (line,) = lines(logs, "migration_progress")
    assert line["session"] == 1
    assert line["phase"] == "bulk round"
    assert line["elapsed_s"] == 1.0
    assert line["bytes_src_to_dst"] == 3 * MiB
    assert line["rate_mib_s"] == 4.0
    assert (line["ram_normal_pages"], line["ram_zero_pages"], line["ram_xbzrle_pages"]) == (
        10,
        10,
        0,
    )
    assert line["channels"] == [
        {"ch": 0, "kind": "main", "bytes": 3 * MiB, "rate_mib_s": 3.0},
        {"ch": 1, "kind": "multifd-3", "bytes": MiB, "rate_mib_s": 1.0},
    ]
    assert line["round"] == 1
    assert line["round_pages"] == {"normal": 10, "zero": 10, "xbzrle": 0}
    assert line["bulk_covered_pct"] == 20.0
    assert line["bulk_eta_s"] == 4.0  # 20% in 1 s: 80% in 4 s

    main.info.bytes_src_to_dst += 4 * MiB
    s.feed(pages(2, normal=5), at=T0 + 2)
    with capture_logs() as logs:
        s.tap.tick(T0 + 3)  # rates over the 2 s since the previous line
    (line,) = lines(logs, "migration_progress")
    assert line["phase"] == "round 2"
    assert line["rate_mib_s"] == 2.0
    assert [c["rate_mib_s"] for c in line["channels"]] == [2.0, 0.0]
    assert line["round"] == 2
    assert line["round_pages"] == {"normal": 5, "zero": 0, "xbzrle": 0}
    assert "bulk_covered_pct" not in line  # only in the bulk round
    assert "bulk_eta_s" not in line


def test_progress_line_before_any_round() -> None:
    s = Session()
    s.feed(HEADER, at=T0)
    with capture_logs() as logs:
        s.tap.tick(T0 + 1)
    (line,) = lines(logs, "migration_progress")
    assert line["phase"] == "setup"
    assert "round" not in line
    assert "bulk_covered_pct" not in line


def test_bulk_progress_uses_the_streams_page_size() -> None:
    s = Session()
    s.feed(HEADER, Configuration(8, "virt-9.2", target_page_bits=16), at=T0)
    s.feed(blocks(8 * 65536), pages(1, normal=2), at=T0)
    with capture_logs() as logs:
        s.tap.tick(T0 + 1)
    (line,) = lines(logs, "migration_progress")
    assert line["bulk_covered_pct"] == 25.0
    assert line["bulk_eta_s"] == 3.0


def test_no_eta_once_the_bulk_round_covered_all_ram() -> None:
    s = Session()
    s.feed(HEADER, blocks(4 * 4096), pages(1, normal=4), at=T0)
    with capture_logs() as logs:
        s.tap.tick(T0 + 1)
    (line,) = lines(logs, "migration_progress")
    assert line["bulk_covered_pct"] == 100.0
    assert "bulk_eta_s" not in line


def test_summary_is_logged_once_with_the_documented_keys() -> None:
    s = Session(session_id=7)
    precopy(s)
    s.main.info.bytes_src_to_dst = 1000
    with capture_logs() as logs:
        s.close(at=T0 + 4)
    (line,) = logs
    assert line["event"] == "migration_summary"
    assert line["session"] == 7
    for key in (
        "outcome",
        "duration_s",
        "bytes_src_to_dst",
        "bytes_dst_to_src",
        "rounds",
        "ram_normal_pages",
        "ram_normal_pages_resent",
        "ram_zero_pages",
        "ram_xbzrle_pages",
        "ram_compressed_pages",
        "ram_preempt_pages",
        "postcopy_requests",
        "wire_downtime_ms",
        "channels",
        "channel_kinds",
        "machine_type",
        "source_qemu",
        "destination_qemu",
        "last_phase",
        "last_section",
        "device_sections",
        "vmdesc",
        "capture_dir",
    ):
        assert key in line
    assert line["outcome"] == "completed"
    assert line["duration_s"] == 4.0
    assert line["rounds"] == 2
    assert line["wire_downtime_ms"] == 50.0
    assert line["bytes_src_to_dst"] == 1000
    assert line["channel_kinds"] == ["main"]
    assert line["capture_dir"] is None


def test_qemu_generation_is_logged_when_it_narrows() -> None:
    s = Session(session_id=3)
    with capture_logs() as logs:
        s.feed(Configuration(8, "pc-q35-9.2"), at=T0)
        s.feed(Command(100, MigCmd.MIG_CMD_OPEN_RETURN_PATH), at=T0)
        s.feed(RpPong(0, 1), RpSwitchoverAck(12), at=T0 + 1, direction=D2S)
        s.feed(Command(5000, MigCmd.MIG_CMD_SWITCHOVER_START), at=T0 + 2)
        s.feed(Command(6000, MigCmd.MIG_CMD_SWITCHOVER_START), at=T0 + 2)  # a sign counts once
        s.close(at=T0 + 3)
    inferred = lines(logs, "qemu_generation_inferred")
    assert [(e["side"], e["qemu"], e["sign"]) for e in inferred] == [
        ("source", "9.2 or newer", "machine type pc-q35-9.2"),
        ("destination", "8.1 or newer", "return path SWITCHOVER_ACK"),
        ("source", "10.0 or newer", "SWITCHOVER_START command"),
    ]
    assert {e["machine_type"] for e in inferred} == {"pc-q35-9.2"}
    assert {e["session"] for e in inferred} == {3}
    (summary,) = lines(logs, "migration_summary")
    assert (summary["source_qemu"], summary["destination_qemu"]) == (
        "10.0 or newer",
        "8.1 or newer",
    )


@pytest.mark.parametrize(("value", "ok", "outcome"), [(0, True, "completed"), (1, False, "failed")])
def test_destination_shut_is_logged(value: int, ok: bool, outcome: str) -> None:
    s = Session()
    precopy(s)
    with capture_logs() as logs:
        s.feed(RpShut(0, value), at=T0 + 3.15, direction=D2S)
        s.close(at=T0 + 4)
    (shut,) = lines(logs, "destination_shut")
    assert (shut["value"], shut["ok"]) == (value, ok)
    (summary,) = lines(logs, "migration_summary")
    assert summary["outcome"] == outcome
    assert summary["wire_downtime_ms"] == 150.0  # to the SHUT, after EOF
