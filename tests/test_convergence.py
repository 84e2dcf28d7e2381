"""Seeing a stall coming: the model's convergence judgment and its log lines."""

from __future__ import annotations

from structlog.testing import capture_logs

from migtap.model import ConvergenceChanged, Migration, summary_fields
from migtap.observers.progress import ProgressObserver
from migtap.vocabulary import ChannelInfo, ChannelKind, Direction
from migtap.wire.constants import SectionType
from migtap.wire.events import RamPages, SectionHeader, StreamHeader

PAGE = 4096
T0 = 100.0


class Stream:
    """A main channel whose RAM rounds are written with realistic offsets and times."""

    def __init__(self) -> None:
        self.m = Migration(1, started=T0)
        self.ch = ChannelInfo(0, 1, ChannelKind.MAIN, "s", "d", T0)
        self.m.add_channel(self.ch)
        self.offset = 0
        self.now = T0
        self.changes: list[object] = []
        self.observer = ProgressObserver(self.m)
        self.apply(StreamHeader(0, 0x5145564D, 3))

    def apply(self, event: object) -> None:
        for change in self.m.apply(self.ch, Direction.SRC_TO_DST, event, self.now):  # type: ignore[arg-type]
            self.changes.append(change)
            self.observer.on_change(change)

    def round(self, number: int, pages: int, seconds: float) -> None:
        """``pages`` normal pages in round ``number``, on the wire over ``seconds``."""
        length = pages * (PAGE + 8)
        self.apply(RamPages(self.offset, length, 2, "pc.ram", number, normal=pages))
        self.offset += length
        self.now += seconds

    def stop(self) -> None:
        self.apply(SectionHeader(self.offset, SectionType.QEMU_VM_SECTION_END, 2, None, None, None))

    def judgments(self) -> list[bool]:
        return [c.judgment.converging for c in self.changes if isinstance(c, ConvergenceChanged)]


def test_a_working_set_sent_as_fast_as_it_is_dirtied_is_reported_once() -> None:
    s = Stream()
    s.round(1, 16384, 2.0)  # the bulk round
    with capture_logs() as logs:
        for n in range(2, 9):  # 512 pages every round, each taking as long as the last
            s.round(n, 512, 0.25)
    warnings = [e for e in logs if e["event"] == "migration_not_converging"]
    assert len(warnings) == 1  # once, though every later round looks the same
    (w,) = warnings
    assert w["log_level"] == "warning"
    assert w["rounds"] == [2, 3, 4, 5]  # within five rounds: judged when round 5 ended
    assert w["working_set_bytes"] == 512 * PAGE
    assert w["dirty_rate_mib_s"] == w["transfer_rate_mib_s"] > 0
    assert 240 < w["expected_downtime_ms"] < 250  # the 512 pages at the wire rate (with headers)
    assert "max-bandwidth" in w["action"]
    assert "postcopy" in w["action"]
    assert s.judgments() == [False]
    fields = summary_fields(s.m)
    assert fields["converging"] is False
    assert fields["convergence"]["converging"] is False  # type: ignore[index]


def test_it_is_said_again_when_the_picture_changes_and_when_it_converges_after_all() -> None:
    s = Stream()
    s.round(1, 16384, 2.0)
    for n in range(2, 6):
        s.round(n, 512, 0.25)
    for n in range(6, 10):  # the guest now dirties twice as much, as fast as it is sent
        s.round(n, 1024, 0.5)
    assert s.judgments() == [False, False]
    with capture_logs() as logs:
        s.stop()  # e.g. downtime-limit raised: stop-and-copy
    assert [e["event"] for e in logs if "converg" in e["event"]] == ["migration_converged"]
    assert s.judgments() == [False, False, True]
    assert summary_fields(s.m)["converging"] is True


def test_falling_rounds_are_converging_and_never_warned() -> None:
    s = Stream()
    s.round(1, 16384, 2.0)
    with capture_logs() as logs:
        for n, pages in enumerate([4096, 2048, 1024, 512, 256, 128], start=2):
            s.round(n, pages, pages / 2048)
        s.stop()
    assert not [e for e in logs if "converg" in e["event"]]
    assert s.judgments() == []
    fields = summary_fields(s.m)
    assert fields["converging"] is True
    assert fields["convergence"]["converging"] is True  # type: ignore[index]


def test_too_few_rounds_to_tell() -> None:
    s = Stream()
    s.round(1, 16384, 2.0)
    s.round(2, 512, 0.25)
    s.round(3, 512, 0.25)
    fields = summary_fields(s.m)
    assert fields["converging"] is None
    assert fields["convergence"] is None
