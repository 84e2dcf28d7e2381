"""The metrics observer against a private registry: series appear, move and disappear with the
session; the counters end equal to the ``migration_summary``; faults the tap survived count."""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from structlog.testing import capture_logs

from migtap.model import Migration
from migtap.observers import build_observers
from migtap.observers.capture import CaptureObserver
from migtap.observers.metrics import MetricsObserver, MigtapMetrics
from migtap.tap import ChannelTap, SessionTap
from migtap.vocabulary import ChannelInfo, ChannelKind, Direction, Peer, SessionSummary
from migtap.wire.constants import SectionType
from tests import streams as s
from tests.observers.test_capture import FakeLoop, FakeThrottle, wait_idle

if TYPE_CHECKING:
    from pathlib import Path

S2D, D2S = Direction.SRC_TO_DST, Direction.DST_TO_SRC
PART, END = SectionType.QEMU_VM_SECTION_PART, SectionType.QEMU_VM_SECTION_END
PAGE = s.PAGE
RAM_PAGES = 16
T0 = 1000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


class Session:
    """One session's tap with only a metrics observer, fed real stream bytes."""

    def __init__(self, metrics: MigtapMetrics, session_id: int = 1, source: str = "10.0.0.5"):
        self.clock = Clock()
        self.migration = Migration(session_id, started=T0)
        self.observer = MetricsObserver(self.migration, metrics)
        self.tap = SessionTap(
            self.migration, [self.observer], clock=self.clock, progress_interval_s=1.0
        )
        info = ChannelInfo(0, 1, ChannelKind.MAIN, f"{source}:49152", "10.0.0.9:4445", T0)
        self.main: ChannelTap = self.tap.add_channel(info)
        self.offset = {S2D: 0, D2S: 0}

    def send(self, data: bytes, *, at: float, direction: Direction = S2D) -> None:
        self.clock.now = at
        self.tap.on_chunk(self.main, direction, self.offset[direction], data)
        self.offset[direction] += len(data)

    def tick(self, at: float) -> None:
        self.clock.now = at
        self.tap.tick(at)

    def close(self, at: float) -> SessionSummary:
        self.clock.now = at
        info = self.main.info
        info.close_reason, info.first_closed = "eof_both", Peer.SOURCE
        self.tap.channel_closed(self.main, "eof_both", Peer.SOURCE, ended_wall=at)
        self.tap.finish()
        return self.tap.close()


def opening() -> bytes:
    return s.header() + s.configuration() + s.ram_start(2, [("pc.ram", RAM_PAGES * PAGE)])


def bulk_part(first: int, count: int) -> bytes:
    return s.ram_section(PART, 2, [s.page(i * PAGE, "pc.ram") for i in range(first, count)])


def dirty_round(pages: int, kind: SectionType = PART) -> bytes:
    """A later round: the position goes back to the start of RAM."""
    records = [s.page(0, "pc.ram"), s.zero(PAGE), s.xbzrle(2 * PAGE)]
    records += [s.page(i * PAGE) for i in range(3, pages)]
    return s.ram_section(kind, 2, records)


def ending() -> bytes:
    return s.eof()


SHUT_OK = s.be16(1) + s.be16(4) + s.be32(0)  # the destination's SHUT 0 on the return path


SESSION_GAUGES = (
    "migtap_migration_round",
    "migtap_migration_transfer_rate_bytes",
    "migtap_migration_dirty_rate_bytes",
    "migtap_migration_remaining_bytes",
    "migtap_migration_start_time_seconds",
)


def test_series_appear_move_and_disappear_and_counters_equal_the_summary() -> None:
    registry = CollectorRegistry()
    metrics = MigtapMetrics(registry)
    labels = {"session": "1", "source": "10.0.0.5"}
    assert value(registry, "migtap_migrations_active") == 0
    for outcome in ("completed", "failed", "cancelled", "unknown"):
        assert value(registry, "migtap_migrations_total", outcome=outcome) == 0

    sess = Session(metrics)
    assert value(registry, "migtap_migrations_active") == 1
    sess.send(opening() + bulk_part(0, 4), at=T0 + 0.5)
    sess.tick(T0 + 1.0)
    assert value(registry, "migtap_migration_round", **labels) == 1
    assert value(registry, "migtap_migration_remaining_bytes", **labels) == (RAM_PAGES - 4) * PAGE
    assert value(registry, "migtap_migration_start_time_seconds", **labels) == T0
    rate1 = value(registry, "migtap_migration_transfer_rate_bytes", **labels)
    assert rate1 is not None
    assert rate1 > 0
    bytes1 = value(registry, "migtap_bytes_total", direction="src-to-dst")
    assert bytes1 == sess.offset[S2D]
    assert value(registry, "migtap_ram_pages_total", kind="normal") == 4

    sess.send(bulk_part(4, RAM_PAGES), at=T0 + 1.5)
    sess.tick(T0 + 2.0)
    assert value(registry, "migtap_migration_remaining_bytes", **labels) == 0
    sess.send(dirty_round(8), at=T0 + 2.5)  # round 2 starts: round 1 finished
    sess.tick(T0 + 3.0)
    assert value(registry, "migtap_migration_round", **labels) == 2
    assert value(registry, "migtap_migration_remaining_bytes", **labels) == 0
    sess.send(dirty_round(6), at=T0 + 3.5)  # round 3: round 2 finished with a dirty rate
    sess.tick(T0 + 4.0)
    assert value(registry, "migtap_migration_round", **labels) == 3
    dirty = value(registry, "migtap_migration_dirty_rate_bytes", **labels)
    assert dirty == 8 * PAGE / 1.0  # round 2's pages over its second
    bytes2 = value(registry, "migtap_bytes_total", direction="src-to-dst")
    assert bytes2 is not None
    assert bytes1 is not None
    assert bytes2 > bytes1

    sess.send(dirty_round(4, END) + ending(), at=T0 + 4.5)
    sess.send(SHUT_OK, at=T0 + 4.6, direction=D2S)  # no tick after it: only the summary adds it
    summary = sess.close(at=T0 + 5.0)
    f = summary.fields
    assert f["outcome"] == "completed"
    assert value(registry, "migtap_migrations_total", outcome="completed") == 1
    assert value(registry, "migtap_migrations_active") == 0
    assert value(registry, "migtap_bytes_total", direction="src-to-dst") == f["bytes_src_to_dst"]
    assert value(registry, "migtap_bytes_total", direction="dst-to-src") == f["bytes_dst_to_src"]
    assert f["bytes_dst_to_src"] == len(SHUT_OK)
    for kind in ("normal", "zero", "xbzrle", "compressed"):
        assert value(registry, "migtap_ram_pages_total", kind=kind) == f[f"ram_{kind}_pages"]
    assert f["ram_xbzrle_pages"] == 3
    duration = value(registry, "migtap_migration_duration_seconds_sum", outcome="completed")
    assert duration == f["duration_s"]
    assert value(registry, "migtap_migration_duration_seconds_count", outcome="completed") == 1
    assert f["wire_downtime_ms"] is not None
    downtime = value(registry, "migtap_migration_wire_downtime_seconds_sum")
    assert downtime == pytest.approx(f["wire_downtime_ms"] / 1000)
    text = generate_latest(registry).decode()
    assert 'session="1"' not in text  # every per-session series is gone
    for name in SESSION_GAUGES:
        assert value(registry, name, **labels) is None


def test_two_sessions_each_add_their_summary_once() -> None:
    registry = CollectorRegistry()
    metrics = MigtapMetrics(registry)
    first, second = Session(metrics, 1, "10.0.0.5"), Session(metrics, 2, "10.0.0.6")
    first.send(opening() + bulk_part(0, RAM_PAGES), at=T0 + 0.5)
    second.send(opening() + bulk_part(0, 5), at=T0 + 0.5)
    for sess in (first, second):
        sess.tick(T0 + 1.0)
    assert value(registry, "migtap_migrations_active") == 2
    assert value(registry, "migtap_migration_round", session="2", source="10.0.0.6") == 1
    first.send(dirty_round(5, END) + ending(), at=T0 + 1.2)
    done = first.close(at=T0 + 1.5)
    # the second session is cut before EOF: cancelled (its source closed first)
    cut = second.close(at=T0 + 2.0)
    assert cut.fields["outcome"] == "cancelled"
    assert value(registry, "migtap_migrations_total", outcome="completed") == 1
    assert value(registry, "migtap_migrations_total", outcome="cancelled") == 1
    assert value(registry, "migtap_migrations_active") == 0
    for key, name, labels in (
        ("bytes_src_to_dst", "migtap_bytes_total", {"direction": "src-to-dst"}),
        ("ram_normal_pages", "migtap_ram_pages_total", {"kind": "normal"}),
        ("ram_zero_pages", "migtap_ram_pages_total", {"kind": "zero"}),
        ("ram_xbzrle_pages", "migtap_ram_pages_total", {"kind": "xbzrle"}),
    ):
        assert value(registry, name, **labels) == done.fields[key] + cut.fields[key], key
    assert value(registry, "migtap_migration_wire_downtime_seconds_count") == 1  # cut: none
    assert 'session="' not in generate_latest(registry).decode()


def test_a_detached_parser_counts() -> None:
    registry = CollectorRegistry()
    sess = Session(MigtapMetrics(registry))
    with capture_logs() as logs:
        sess.send(s.header() + b"\x42" + bytes(20), at=T0 + 0.1)  # an unknown section type
    assert [e["event"] for e in logs if e["event"] == "parser_detached"] == ["parser_detached"]
    assert value(registry, "migtap_parser_detached_total") == 1
    sess.close(at=T0 + 0.5)
    assert value(registry, "migtap_migrations_total", outcome="unknown") == 1


def test_a_failed_capture_counts_through_the_factory(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = MigtapMetrics(registry)
    migration = Migration(1, started=time.time())
    loop = FakeLoop()
    observers = build_observers(
        migration,
        capture_dir=tmp_path,
        throttle=FakeThrottle(),
        call_soon_threadsafe=loop.call_soon_threadsafe,
        metrics=metrics,
    )
    kinds = [type(o).__name__ for o in observers]
    assert kinds.index("MetricsObserver") < kinds.index("CaptureObserver")  # capture last
    capture = next(o for o in observers if isinstance(o, CaptureObserver))
    tap = SessionTap(migration, observers)
    ch = tap.add_channel(ChannelInfo(0, 1, ChannelKind.MAIN, "[fd00::5]:5000", None, time.time()))
    wait_idle(capture, loop)

    def enospc(fd: int, data: bytes) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    capture.writer._write = enospc  # type: ignore[method-assign]
    with capture_logs() as logs:
        tap.on_chunk(ch, S2D, 0, s.header())
        deadline = time.monotonic() + 5
        while capture.error is None and time.monotonic() < deadline:
            time.sleep(0.002)
        wait_idle(capture, loop)
        loop.run()
    assert [e for e in logs if e["event"] == "capture_failed"]
    assert value(registry, "migtap_capture_failed_total") == 1
    tap.tick(time.time() + 2)
    assert value(registry, "migtap_migration_start_time_seconds", session="1", source="fd00::5")
    tap.close()
    capture.wait_closed(5)
    loop.run()
    assert value(registry, "migtap_capture_failed_total") == 1


def test_without_metrics_the_factory_makes_no_metrics_observer(tmp_path: Path) -> None:
    migration = Migration(1, started=time.time())
    observers = build_observers(
        migration, capture_dir=None, throttle=FakeThrottle(), call_soon_threadsafe=print
    )
    assert not [o for o in observers if isinstance(o, MetricsObserver)]


def test_a_migration_that_does_not_converge_shows_it() -> None:
    registry = CollectorRegistry()
    sess = Session(MigtapMetrics(registry))
    labels = {"session": "1", "source": "10.0.0.5"}
    sess.send(opening() + bulk_part(0, RAM_PAGES), at=T0 + 0.5)
    for n in range(5):  # rounds 2..6, each the same 8 pages a second later: the guest keeps up
        sess.send(dirty_round(8), at=T0 + 1.5 + n)
        sess.tick(T0 + 2.0 + n)
    assert value(registry, "migtap_migration_round", **labels) == 6  # rounds 2..5 judged
    assert value(registry, "migtap_migration_converging", **labels) == 0
    downtime = value(registry, "migtap_migration_expected_downtime_seconds", **labels)
    assert downtime is not None
    assert downtime > 0
    summary = sess.close(at=T0 + 7.0)  # cancelled: it never reached stop-and-copy
    assert summary.fields["converging"] is False
    assert value(registry, "migtap_migrations_not_converging_total") == 1
    assert value(registry, "migtap_migration_converging", **labels) is None
