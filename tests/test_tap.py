"""The tap between parsers, the session model and the observers, with fake observers."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from structlog.testing import capture_logs

from migtap.decode import DeviceKeeper, decode_devices, run_inline
from migtap.model import DevicesDecoded, Migration
from migtap.observers.annotate import AnnotateObserver
from migtap.observers.base import Observer
from migtap.tap import ChannelTap, SessionTap
from migtap.vocabulary import ChannelInfo, ChannelKind, Direction, Outcome, Peer
from migtap.wire.constants import SectionType
from migtap.wire.events import DeviceState, MultifdInit, MultifdPacket, VmDescription
from migtap.wire.stream import StreamParser
from tests import streams as s
from tests.wire.mfd_streams import mfd_init, mfd_packet

if TYPE_CHECKING:
    import pytest

S2D, D2S = Direction.SRC_TO_DST, Direction.DST_TO_SRC


class Recorder(Observer):
    """Writes down every call it gets."""

    wants_chunks = True

    def __init__(self, migration: Migration, name: str, calls: list[tuple[str, str]]) -> None:
        super().__init__(migration)
        self.name = name
        self.calls = calls
        self.events: list[object] = []
        self.changes: list[object] = []

    def on_channel(self, channel: ChannelInfo) -> None:
        self.calls.append((self.name, "channel"))

    def on_chunk(self, channel, direction, offset, chunk) -> None:
        self.calls.append((self.name, "chunk"))

    def on_event(self, channel, direction, event) -> None:
        self.events.append(event)

    def on_change(self, change) -> None:
        self.changes.append(change)

    def contribute(self, summary) -> None:
        self.calls.append((self.name, "contribute"))
        summary.fields[f"from_{self.name}"] = True

    def close(self, summary) -> None:
        self.calls.append((self.name, "close"))
        assert summary.fields.get("from_first")
        assert summary.fields.get("from_last")


class Failing(Recorder):
    """Raises on the ``fail_on``-th event it is given."""

    def __init__(self, migration: Migration, calls: list[tuple[str, str]], fail_on: int) -> None:
        super().__init__(migration, "failing", calls)
        self.fail_on = fail_on

    def on_event(self, channel, direction, event) -> None:
        super().on_event(channel, direction, event)
        if len(self.events) == self.fail_on:
            raise RuntimeError("observer bug")


def make_tap(*observer_factories, **kw) -> tuple[SessionTap, Migration]:
    migration = Migration(1, started=100.0)
    observers = [f(migration) for f in observer_factories]
    tap = SessionTap(migration, observers, clock=lambda: 100.0, **kw)
    return tap, migration


def main_channel(tap: SessionTap, index: int = 0) -> ChannelTap:
    return tap.add_channel(ChannelInfo(index, index + 1, ChannelKind.MAIN, "s", "d", 100.0))


STREAM = s.sample_stream()


def test_a_failing_observer_is_detached_and_the_next_one_gets_every_event() -> None:
    calls: list[tuple[str, str]] = []
    failing: list[Failing] = []
    last: list[Recorder] = []

    def make_failing(m: Migration) -> Failing:
        failing.append(Failing(m, calls, fail_on=3))
        return failing[0]

    def make_last(m: Migration) -> Recorder:
        last.append(Recorder(m, "last", calls))
        return last[0]

    tap, _ = make_tap(make_failing, make_last)
    ch = main_channel(tap)
    with capture_logs() as logs:
        tap.on_chunk(ch, S2D, 0, STREAM.data)  # one chunk: one batch of events
    reference = StreamParser(page_size=s.PAGE).feed(STREAM.data)
    assert last[0].events == reference  # none missed, though the one before it failed mid-batch
    assert len(failing[0].events) == 3  # and the failing one got nothing after its failure
    detached = [e for e in logs if e["event"] == "observer_detached"]
    assert len(detached) == 1
    assert detached[0]["observer"] == "Failing"
    assert failing[0] not in tap.observers


def test_close_runs_contribute_for_all_then_close_for_all_in_factory_order() -> None:
    calls: list[tuple[str, str]] = []
    tap, _ = make_tap(lambda m: Recorder(m, "first", calls), lambda m: Recorder(m, "last", calls))
    main_channel(tap)
    calls.clear()
    summary = tap.close()
    assert calls == [
        ("first", "contribute"),
        ("last", "contribute"),
        ("first", "close"),
        ("last", "close"),
    ]
    assert summary.fields["from_first"]
    assert summary.fields["from_last"]


def test_events_before_a_parser_error_reach_the_model_and_observers() -> None:
    """A MultiFD init followed by a bad packet in the same chunk: the init is not lost."""
    calls: list[tuple[str, str]] = []
    rec: list[Recorder] = []
    tap, migration = make_tap(lambda m: rec.append(Recorder(m, "r", calls)) or rec[0])
    main_channel(tap)
    info = ChannelInfo(1, 2, ChannelKind.MULTIFD, "s", "d", 100.0)
    ch = tap.add_channel(info)
    bad = bytearray(mfd_packet(normal=1))
    bad[0:4] = b"\xff\xff\xff\xff"  # the packet's magic
    with capture_logs() as logs:
        tap.on_chunk(ch, S2D, 0, mfd_init(channel_id=3) + bytes(bad))
    assert [type(e) for e in rec[0].events] == [MultifdInit]
    assert info.multifd_id == 3  # the model saw it too
    (detached,) = [e for e in logs if e["event"] == "parser_detached"]
    assert detached["offset"] == 64
    assert info.parse_error is not None
    assert migration.channels[1] is info


def test_a_parser_bug_is_reported_as_a_crash_not_as_stream_damage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tap, _ = make_tap()
    ch = main_channel(tap)

    def broken_feed(data: object) -> list[object]:
        raise KeyError("a bug")

    assert ch.s2d is not None
    monkeypatch.setattr(ch.s2d, "feed", broken_feed)
    with capture_logs() as logs:
        tap.on_chunk(ch, S2D, 0, s.header())
    kinds = [e["event"] for e in logs]
    assert "parser_crashed" in kinds
    assert "parser_detached" not in kinds
    assert ch.s2d is None


def test_the_error_tail_keeps_following_the_main_channel_after_the_return_path_detaches() -> None:
    tap, _ = make_tap()
    ch = main_channel(tap)
    data = s.header() + s.configuration() + s.ram_start(2, [("pc.ram", 64 * s.PAGE)])
    tap.on_chunk(ch, S2D, 0, data)
    tap.on_chunk(ch, D2S, 0, b"\xff\xff\xff\xff\xff\xff\xff\xff")  # a broken return path
    assert ch.d2s is None
    more = s.ram_section(SectionType.QEMU_VM_SECTION_PART, 2, [s.page(0, "pc.ram")])
    tap.on_chunk(ch, S2D, len(data), more)
    with capture_logs() as logs:
        tap.channel_closed(ch, "destination_closed", Peer.DESTINATION)
    (early,) = [e for e in logs if e["event"] == "destination_closed_early"]
    end = len(data) + len(more)
    assert early["bytes_forwarded"] == end
    assert early["last_bytes_offset"] == end - 64
    assert early["last_bytes_hex"] == (data + more)[-64:].hex(" ")


def test_multifd_packets_are_framed_with_the_streams_page_size() -> None:
    """A 16 KiB-page target: the multifd packet header is sized from the stream's page size,
    not from the configured 4 KiB."""
    tap, migration = make_tap()
    ch = main_channel(tap)
    config = s.header() + s.configuration("virt-8.2", page_bits=14)
    tap.on_chunk(ch, S2D, 0, config + s.ram_start(2, [("pc.ram", 64 * 16384)]))
    assert migration.page_size == 16384
    info = ChannelInfo(1, 2, ChannelKind.MULTIFD, "s", "d", 100.0)
    mfd = tap.add_channel(info)
    packets = mfd_init(0) + mfd_packet(normal=2, page_size=16384, packet_num=1)
    packets += mfd_packet(normal=1, zero=1, page_size=16384, packet_num=2)
    with capture_logs() as logs:
        tap.on_chunk(mfd, S2D, 0, packets)
    assert not [e for e in logs if e["event"] in ("parser_detached", "parser_crashed")]
    assert (migration.normal, migration.zero) == (3, 1)


def test_device_state_is_decoded_off_the_callback_through_the_offload() -> None:
    jobs: list[tuple[object, object]] = []
    rec: list[Recorder] = []
    tap, migration = make_tap(
        lambda m: rec.append(Recorder(m, "r", [])) or rec[0],
        offload=lambda job, done: jobs.append((job, done)),
    )
    ch = main_channel(tap)
    tap.on_chunk(ch, S2D, 0, STREAM.data)
    assert len(jobs) == 1  # handed over when the vmdesc arrived ...
    assert not [c for c in rec[0].changes if isinstance(c, DevicesDecoded)]  # ... not run here
    assert migration.devices == []
    job, done = jobs.pop()
    done(job())  # the worker's result, back on the loop
    (decoded,) = [c for c in rec[0].changes if isinstance(c, DevicesDecoded)]
    assert len(decoded.batch.results) == len(STREAM.devices) + 1  # and blobdev, in PACKAGED
    assert migration.devices == list(decoded.batch.results)
    assert migration.generation.source.evidence  # the vmdesc's signs were read in the job


def test_an_oversized_vmdesc_is_not_decoded_live() -> None:
    keeper = DeviceKeeper(fallback=None)
    text = b'{"page_size": 4096, "devices": []}'
    huge = VmDescription(10, b" " * (16 * 1024 * 1024) + text)
    job = keeper.job(huge, live=True)
    assert job is not None
    batch = job()
    assert batch.vmdesc_error is not None
    assert "not decoded live" in str(batch.vmdesc_error)
    offline = keeper.job(huge, live=False)
    assert offline is not None
    assert offline().vmdesc_error is None


def test_a_wrong_footer_guess_is_a_warning() -> None:
    desc = {
        "page_size": 4096,
        "devices": [
            {
                "name": "timer",
                "instance_id": 0,
                "vmsd_name": "timer",
                "version": 2,
                "fields": [{"name": "ticks", "type": "uint32", "size": 4}],
            }
        ],
    }
    section = DeviceState(
        offset=50,
        kind=SectionType.QEMU_VM_SECTION_FULL,
        section_id=3,
        idstr="timer",
        instance_id=0,
        version_id=2,
        payload=b"\x00\x00\x00\x07\xaa\xbb",  # 4 bytes of state and 2 the footer scan took in
        payload_offset=60,
    )
    vmdesc = VmDescription(100, json.dumps(desc).encode())
    batch = decode_devices((section,), stream_vmdesc=vmdesc, fallback=None)
    migration = Migration(1, started=0.0)
    observer = AnnotateObserver(migration)
    with capture_logs() as logs:
        for change in migration.apply_devices(batch, 1.0):
            observer.on_change(change)
    (guess,) = [e for e in logs if e["event"] == "device_section_boundary_guessed"]
    assert guess["log_level"] == "warning"
    assert (guess["bytes"], guess["decoded_bytes"]) == (6, 4)


def test_a_postcopy_preempt_channel_is_identified_and_observers_hear_of_it() -> None:
    class Kinds(Observer):
        def __init__(self, m: Migration) -> None:
            super().__init__(m)
            self.seen: list[ChannelKind] = []

        def on_channel_changed(self, channel: ChannelInfo) -> None:
            self.seen.append(channel.kind)

    kinds: list[Kinds] = []
    tap, migration = make_tap(lambda m: kinds.append(Kinds(m)) or kinds[0])
    ch = main_channel(tap)
    tap.on_chunk(ch, S2D, 0, s.header() + s.ram_start(2, [("pc.ram", 64 * s.PAGE)]))
    info = ChannelInfo(1, 2, ChannelKind.UNKNOWN, "s", "d", 100.0)
    pre = tap.add_channel(info)
    tap.on_chunk(pre, S2D, 0, s.page(40 * s.PAGE, "pc.ram") + s.zero(41 * s.PAGE))
    assert info.kind is ChannelKind.POSTCOPY_PREEMPT
    assert kinds[0].seen == [ChannelKind.POSTCOPY_PREEMPT]
    assert migration.preempt == 2


def test_inline_offload_and_outcome_from_the_model() -> None:
    tap, migration = make_tap(offload=run_inline)
    ch = main_channel(tap)
    tap.on_chunk(ch, S2D, 0, STREAM.data)
    tap.channel_closed(ch, "eof_both", Peer.SOURCE)
    tap.finish()
    summary = tap.close()
    assert summary.outcome is Outcome.COMPLETED
    assert summary.fields["devices_decoded"] + summary.fields["devices_failed"] == len(
        migration.devices
    )
    assert migration.phase_text == "postcopy"  # the sample stream has a PACKAGED blob


def test_multifd_packet_counts_reach_the_model() -> None:
    tap, migration = make_tap()
    main_channel(tap)
    mfd = tap.add_channel(ChannelInfo(1, 2, ChannelKind.MULTIFD, "s", "d", 100.0))
    tap.on_chunk(mfd, S2D, 0, mfd_init(2) + mfd_packet(normal=3, zero=2, packet_num=1))
    assert (migration.normal, migration.zero) == (3, 2)
    assert migration.channels[1].multifd_id == 2
    events, failure = tap.parse(mfd, S2D, mfd_packet(normal=1, packet_num=2))
    assert failure is None
    assert [type(e) for e in events] == [MultifdPacket]
