"""The capture observer: byte-exact files, modes, the index, session.json, backpressure, failures,
closing off the loop."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import queue
import re
import stat
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, cast

import pytest
from structlog.testing import capture_logs

from migtap import capture_format as capture_mod
from migtap.capture_format import (
    FORMAT_VERSION,
    UPGRADERS,
    event_kind,
    event_record,
    read_index,
)
from migtap.errors import CaptureError
from migtap.model import Migration
from migtap.observers.capture import CaptureObserver
from migtap.observers.capture_writer import write_all
from migtap.vocabulary import ChannelInfo, ChannelKind, Direction, Outcome, Peer, SessionSummary
from migtap.wire import events as ev
from migtap.wire.constants import MigCmd, SectionType
from migtap.wire.multifd import MultifdParser
from migtap.wire.stream import StreamParser
from tests.fixtures import fixture
from tests.streams import sample_stream
from tests.wire.mfd_streams import mfd_device_state, mfd_init, mfd_packet, mfd_sync, rp_shut

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

S2D = Direction.SRC_TO_DST
D2S = Direction.DST_TO_SRC


# -- fakes -----------------------------------------------------------------------------------------


class FakeThrottle:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def pause(self, reason: str) -> None:
        self.calls.append(("pause", reason))

    def resume(self, reason: str) -> None:
        self.calls.append(("resume", reason))


class FakeLoop:
    """call_soon_threadsafe collects callbacks; ``run()`` runs them on the test thread."""

    def __init__(self) -> None:
        self.callbacks: queue.Queue[Callable[[], None]] = queue.Queue()

    def call_soon_threadsafe(self, cb: Callable[[], None]) -> None:
        self.callbacks.put(cb)

    def run(self) -> int:
        n = 0
        while True:
            try:
                cb = self.callbacks.get_nowait()
            except queue.Empty:
                return n
            cb()
            n += 1


def make_sink(
    tmp_path: Path, *, session_id: Any = 7, page_size: int = 4096, **kw: Any
) -> tuple[CaptureObserver, FakeThrottle, FakeLoop]:
    throttle, loop = FakeThrottle(), FakeLoop()
    migration = Migration(session_id, started=time.time(), page_size=page_size)
    sink = CaptureObserver(
        migration,
        tmp_path / "captures",
        throttle=throttle,
        call_soon_threadsafe=loop.call_soon_threadsafe,
        config={"listen": "127.0.0.1:4444", "capture_ram": kw.get("capture_ram", "full")},
        **kw,
    )
    return sink, throttle, loop


def channel(index: int, kind: ChannelKind = ChannelKind.MAIN, **kw: Any) -> ChannelInfo:
    return ChannelInfo(
        index=index,
        pipe_id=100 + index,
        kind=kind,
        source="127.0.0.1:5000",
        destination="127.0.0.1:6000",
        started_wall=time.time(),
        **kw,
    )


def summary(channels: list[ChannelInfo], outcome: Outcome = Outcome.COMPLETED) -> SessionSummary:
    now = time.time()
    return SessionSummary(7, outcome, now - 1, now, channels, {"ram_normal_pages": 5})


def close(sink: CaptureObserver, s: SessionSummary, loop: FakeLoop | None = None) -> None:
    """Close as the relay does: contribute, close (on the loop), wait_closed (a worker thread);
    then run what the writer handed back to the loop."""
    sink.contribute(s)
    sink.close(s)
    assert sink.wait_closed(10)
    if loop is not None:
        loop.run()


def wait_idle(sink: CaptureObserver, loop: FakeLoop | None = None, timeout: float = 5.0) -> None:
    writer = sink.writer
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if loop is not None:
            loop.run()
        with writer._cond:
            if writer._shared.queued == 0 and not writer._shared.ops:
                return
        time.sleep(0.002)
    pytest.fail("the writer did not drain")


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def feed_parsed(
    sink: CaptureObserver,
    ch: ChannelInfo,
    data: bytes,
    size: int,
    parser: StreamParser | MultifdParser,
) -> list[object]:
    """Drive the sink as the tap does: on_chunk, then the events parsing that chunk produced."""
    seen: list[object] = []
    offset = 0
    for piece in chunks(data, size):
        sink.on_chunk(ch, S2D, offset, piece)
        ch.bytes_src_to_dst += len(piece)
        offset += len(piece)
        for event in parser.feed(piece):
            sink.on_event(ch, S2D, event)
            seen.append(event)
    for event in parser.feed_eof():
        sink.on_event(ch, S2D, event)
        seen.append(event)
    return seen


def feed_main(sink: CaptureObserver, ch: ChannelInfo, data: bytes, size: int) -> list[object]:
    return feed_parsed(sink, ch, data, size, StreamParser(page_size=4096))


def feed_multifd(sink: CaptureObserver, ch: ChannelInfo, data: bytes, size: int) -> list[object]:
    return feed_parsed(sink, ch, data, size, MultifdParser(page_size=4096))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def multifd_stream() -> bytes:
    return (
        mfd_init(channel_id=1)
        + mfd_packet(normal=3, zero=1, packet_num=1)
        + mfd_device_state(data=b"DEVSTATE" * 4)
        + mfd_sync(packet_num=2)
        + mfd_packet(normal=2, packet_num=3, ramblock="pc.bios")
    )


# -- byte-exact files ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1 << 16, 997, 7])
def test_bytes_identical_per_channel_and_direction(tmp_path: Path, size: int) -> None:
    sample = sample_stream().data
    mstream = multifd_stream()
    ret = rp_shut(0) + os.urandom(3000)
    sink, throttle, loop = make_sink(tmp_path)
    main, mf, other = channel(0), channel(1, ChannelKind.MULTIFD), channel(2, ChannelKind.TLS)
    for ch in (main, mf, other):
        sink.on_channel(ch)
    feed_main(sink, main, sample, size)
    for offset, piece in enumerate(chunks(ret, 1000)):
        sink.on_chunk(main, D2S, offset * 1000, piece)
    main.bytes_dst_to_src = len(ret)
    feed_multifd(sink, mf, mstream, size)
    mf.multifd_id = 1
    tls = os.urandom(5000)
    sink.on_chunk(other, S2D, 0, tls)
    other.bytes_src_to_dst = len(tls)
    for ch in (main, mf, other):
        sink.on_channel_closed(ch)
    close(sink, summary([main, mf, other]))
    d = sink.directory
    assert sha((d / "src-to-dst.bin").read_bytes()) == sha(sample)
    assert sha((d / "dst-to-src.bin").read_bytes()) == sha(ret)
    assert sha((d / "conn-1-multifd.src-to-dst.bin").read_bytes()) == sha(mstream)
    assert sha((d / "conn-2-tls.src-to-dst.bin").read_bytes()) == sha(tls)
    assert not (d / "conn-1-multifd.dst-to-src.bin").exists()
    assert sink.complete
    assert sink.error is None
    assert throttle.calls == []
    session = json.loads((d / "session.json").read_text())
    assert session["complete"] is True
    files = session["channels"][1]["files"]
    assert files["src-to-dst"] == {
        "file": "conn-1-multifd.src-to-dst.bin",
        "content": "exact",
        "bytes_seen": len(mstream),
        "bytes_written": len(mstream),
    }
    assert files["dst-to-src"]["file"] is None
    assert files["dst-to-src"]["content"] == "empty"
    # the vmdesc JSON, separately
    desc = json.loads((d / "vmdesc.json").read_text())
    assert desc["page_size"] == 4096
    loop.run()


def test_root_created_and_name(tmp_path: Path) -> None:
    sink, _, _ = make_sink(tmp_path, session_id=42)
    assert sink.directory.parent == tmp_path / "captures"
    assert re.fullmatch(r"\d{8}T\d{6}Z-s42", sink.directory.name)
    sink2, _, _ = make_sink(tmp_path, session_id=42)  # same second: a suffix, not a clash
    assert sink2.directory != sink.directory
    assert sink2.directory.parent == tmp_path / "captures"
    for s in (sink, sink2):
        close(s, summary([]))


@pytest.mark.parametrize("bad", ["../../etc", "1/../..", "x", 1.5])
def test_directory_name_cannot_escape_root(tmp_path: Path, bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        make_sink(tmp_path, session_id=cast("Any", bad))
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "captures"])
    if (tmp_path / "captures").exists():
        assert list((tmp_path / "captures").iterdir()) == []


def test_negative_or_huge_session_id_stays_under_root(tmp_path: Path) -> None:
    for sid in (-1, 10**30):
        sink, _, _ = make_sink(tmp_path, session_id=sid)
        assert sink.directory.resolve().parent == (tmp_path / "captures").resolve()
        close(sink, summary([]))


# -- permissions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        sink, _, _ = make_sink(tmp_path)
        main = channel(0)
        sink.on_channel(main)
        feed_main(sink, main, sample_stream().data, 4096)
        sink.on_chunk(main, D2S, 0, rp_shut(0))
        sink.on_channel_closed(main)
        close(sink, summary([main]))
    finally:
        os.umask(old)
    assert stat.S_IMODE(sink.directory.stat().st_mode) == 0o700
    names = sorted(p.name for p in sink.directory.iterdir())
    assert names == [
        "dst-to-src.bin",
        "events.jsonl",
        "session.json",
        "src-to-dst.bin",
        "vmdesc.json",
    ]
    for p in sink.directory.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name


# -- the index -------------------------------------------------------------------------------------

UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")
ALL_EVENTS: list[object] = [
    ev.StreamHeader(0, 0x5145564D, 3),
    ev.Configuration(8, "pc-q35-7.2", 12, ("x-ignore-shared",), bytes(range(16))),
    ev.SectionHeader(30, SectionType.QEMU_VM_SECTION_START, 2, "ram", 0, 4),
    ev.SectionFooter(40, 2),
    ev.RamBlockList(50, 2, 4096, (ev.RamBlock("pc.ram", 4096), ev.RamBlock("x", 8, 2048, 16))),
    ev.RamPages(60, 8200, 2, "pc.ram", 1, normal=2, zero=1),
    ev.RamEndOfSection(9000, 2),
    ev.RamMultifdFlush(9008, 2),
    ev.DeviceState(9100, SectionType.QEMU_VM_SECTION_FULL, 3, "cpu", 0, 1, b"\x01" * 500, 9120),
    ev.Command(9700, MigCmd.MIG_CMD_OPEN_RETURN_PATH),
    ev.Ping(9705, 7),
    ev.PostcopyAdvise(9710, 4096, 4096),
    ev.PostcopyRamDiscard(9730, "pc.ram", ((0, 4096), (8192, 4096))),
    ev.RecvBitmapRequest(9800, "pc.ram"),
    ev.Packaged(9810, 100, 9819),
    ev.PackagedEnd(9919),
    ev.EndOfState(9920),
    ev.VmDescription(9921, b'{"page_size": 4096}'),
    ev.Unparsed(9950, "unknown section type 0x42", None),
    ev.MultifdInit(0, 1, UUID, 3),
    ev.MultifdPacket(64, 1, 9, 128, 3, 1, 12288, "pc.ram", 12288, sync=True),
    ev.MultifdDeviceState(20000, 64, "vfio", 0, 100),
    ev.RpShut(0, 0),
    ev.RpPong(4, 7),
    ev.RpReqPagesId(12, 0, 4096, "pc.ram"),
    ev.RpReqPages(40, 4096, 4096, None),
    ev.RpRecvBitmap(60, "pc.ram", 64),
    ev.RpResumeAck(100, 1),
    ev.RpSwitchoverAck(108),
]


def test_every_event_class_has_a_sample() -> None:
    classes = {
        obj
        for module in (ev,)
        for obj in vars(module).values()
        if isinstance(obj, type)
        and dataclasses.is_dataclass(obj)
        and obj.__module__ == module.__name__
        and "offset" in {f.name for f in dataclasses.fields(obj)}
    }
    assert classes == {type(e) for e in ALL_EVENTS}


@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: type(e).__name__)
def test_event_record_generic(event: object) -> None:
    record = event_record(event, channel=3, direction="dst-to-src", t=12.5)
    assert record["v"] == 1
    assert record["t"] == 12.5
    assert record["ch"] == 3
    assert record["dir"] == "dst-to-src"
    assert record["offset"] == cast("Any", event).offset
    assert record["kind"] == event_kind(event)
    assert re.fullmatch(r"[a-z][a-z0-9_]*", record["kind"])
    json.dumps(record, allow_nan=False)  # plain JSON
    names = {f.name for f in dataclasses.fields(cast("Any", event))}
    covered = set(record) | {"desc", "payload", "json_bytes", "kind"}
    assert names <= covered | {n for n in names if f"section_{n}" in record}


def test_event_record_special_cases() -> None:
    by_kind = {
        event_kind(e): event_record(e, channel=0, direction="src-to-dst", t=0.0) for e in ALL_EVENTS
    }
    assert event_kind(ev.RamPages(0, 0, 0, "", 0)) == "ram_pages"
    assert event_kind(ev.RpReqPagesId(0, 0, 0, "")) == "rp_req_pages_id"
    assert by_kind["ram_pages"] | {} == {
        "v": 1,
        "t": 0.0,
        "ch": 0,
        "dir": "src-to-dst",
        "offset": 60,
        "kind": "ram_pages",
        "length": 8200,
        "section_id": 2,
        "block": "pc.ram",
        "round": 1,
        "normal": 2,
        "zero": 1,
        "xbzrle": 0,
        "compressed": 0,
    }
    dev = by_kind["device_state"]
    assert dev["payload_len"] == 500
    assert "payload" not in dev
    assert dev["section_kind"] == "QEMU_VM_SECTION_FULL"
    assert by_kind["section_header"]["section_kind"] == "QEMU_VM_SECTION_START"
    vm = by_kind["vm_description"]
    assert vm["json_len"] == len(b'{"page_size": 4096}')
    assert "desc" not in vm
    assert "json_bytes" not in vm
    assert by_kind["configuration"]["uuid"] == bytes(range(16)).hex()
    assert by_kind["configuration"]["capabilities"] == ["x-ignore-shared"]
    assert by_kind["ram_block_list"]["blocks"] == [
        {"idstr": "pc.ram", "used_length": 4096, "page_size": None, "addr": None},
        {"idstr": "x", "used_length": 8, "page_size": 2048, "addr": 16},
    ]
    assert by_kind["command"]["cmd"] == "MIG_CMD_OPEN_RETURN_PATH"
    assert by_kind["postcopy_ram_discard"]["ranges"] == [[0, 4096], [8192, 4096]]
    assert by_kind["multifd_init"]["uuid"] == str(UUID)
    assert by_kind["multifd_packet"]["sync"] is True
    assert by_kind["unparsed"]["length"] is None


def index_of(sink: CaptureObserver) -> list[dict[str, Any]]:
    return list(read_index(sink.directory / "events.jsonl"))


def test_index_lines_offsets_and_kinds(tmp_path: Path) -> None:
    sink, _, _ = make_sink(tmp_path)
    main = channel(0)
    sink.on_channel(main)
    events = feed_main(sink, main, sample_stream().data, 1000)
    sink.on_chunk(main, D2S, 0, rp_shut(0))
    sink.on_event(main, D2S, ev.RpShut(0, 0))
    sink.on_channel_closed(main)
    close(sink, summary([main]))
    raw = (sink.directory / "events.jsonl").read_text().splitlines()
    assert all(json.loads(line)["v"] == 1 for line in raw)
    lines = index_of(sink)
    assert lines[0]["kind"] == "capture_started"
    assert lines[0]["capture_ram"] == "full"
    assert lines[0]["directory"] == str(sink.directory)
    body = lines[1:]
    assert [(r["kind"], r["offset"]) for r in body[:-1]] == [
        (event_kind(e), cast("Any", e).offset) for e in events
    ]
    assert body[-1]["kind"] == "rp_shut"
    assert body[-1]["dir"] == "dst-to-src"
    assert {r["ch"] for r in body} == {0}
    assert {"stream_header", "ram_pages", "device_state", "vm_description"} <= {
        r["kind"] for r in body
    }


def test_read_index_rejects_newer_and_broken_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"v": 1, "kind": "capture_started"}\n{"v": 2, "kind": "x"}\n')
    with pytest.raises(CaptureError, match=r"events\.jsonl:2: .*newer"):
        list(read_index(path))
    path.write_text('{"v": 1, "kind": "capture_started"}\n{"v": 1, \n')
    with pytest.raises(CaptureError, match=r"events\.jsonl:2: not JSON"):
        list(read_index(path))
    path.write_text("[1]\n")
    with pytest.raises(CaptureError, match=r"events\.jsonl:1: not a JSON object"):
        list(read_index(path))
    path.write_text('{"kind": "x"}\n')
    with pytest.raises(CaptureError, match=r"events\.jsonl:1: no valid format version"):
        list(read_index(path))
    path.write_bytes(b'{"v": 1}\n\xff\xfe\n')
    with pytest.raises(CaptureError, match=r"events\.jsonl:2"):
        list(read_index(path))
    with pytest.raises(CaptureError, match="cannot read"):
        list(read_index(tmp_path / "missing.jsonl"))


def test_read_index_upgrades_through_the_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pretend the current version is 3: v1 lines go through UPGRADERS[1] then [2]."""
    monkeypatch.setattr(capture_mod, "FORMAT_VERSION", 3)
    monkeypatch.setitem(UPGRADERS, 1, lambda r: {**r, "v": 2, "one": True})
    monkeypatch.setitem(UPGRADERS, 2, lambda r: {**r, "v": 3, "two": True})
    path = tmp_path / "events.jsonl"
    path.write_text('{"v": 1, "kind": "a"}\n\n{"v": 3, "kind": "b"}\n')
    assert list(read_index(path)) == [
        {"v": 3, "kind": "a", "one": True, "two": True},
        {"v": 3, "kind": "b"},
    ]
    monkeypatch.delitem(UPGRADERS, 2)
    with pytest.raises(CaptureError, match="no upgrade from format version 2"):
        list(read_index(path))


def test_format_version_is_1() -> None:
    assert FORMAT_VERSION == 1
    assert UPGRADERS == {}


# -- session.json ----------------------------------------------------------------------------------


def test_session_json(tmp_path: Path) -> None:
    sink, _, _ = make_sink(tmp_path)
    main = channel(0)
    sink.on_channel(main)
    wait_idle(sink)
    early = json.loads((sink.directory / "session.json").read_text())
    assert early["complete"] is False
    assert early["closed"] is False
    assert [c["index"] for c in early["channels"]] == [0]
    data = sample_stream().data
    feed_main(sink, main, data, 4096)
    main.ended_wall = time.time()
    main.close_reason = "eof_both"
    main.first_closed = Peer.SOURCE
    sink.on_channel_closed(main)
    s = summary([main], outcome=Outcome.COMPLETED)
    close(sink, s)
    doc = json.loads((sink.directory / "session.json").read_text())
    assert doc["v"] == 1
    assert doc["session_id"] == 7
    assert doc["outcome"] == "completed"
    assert doc["summary"] == {"ram_normal_pages": 5, "capture_dir": str(sink.directory)}
    assert s.fields["capture_dir"] == str(sink.directory)  # contributed to the summary
    assert doc["started_t"] == s.started_wall  # exact, beside the ISO form
    assert doc["ended_t"] == s.ended_wall
    assert doc["session_started"].endswith("Z")
    assert doc["session_ended"].endswith("Z")
    assert doc["capture_ram"] == "full"
    assert doc["complete"] is True
    assert doc["error"] is None
    assert doc["config"] == {"listen": "127.0.0.1:4444", "capture_ram": "full"}
    assert doc["started"].endswith("Z")
    assert doc["ended"].endswith("Z")
    assert doc["vmdesc_files"] == ["vmdesc.json"]
    (ch,) = doc["channels"]
    assert ch["kind"] == "main"
    assert ch["source"] == "127.0.0.1:5000"
    assert ch["destination"] == "127.0.0.1:6000"
    assert ch["close_reason"] == "eof_both"
    assert ch["first_closed"] == "source"
    assert ch["reset_by"] is None
    assert ch["bytes_src_to_dst"] == len(data)
    assert ch["parse_error"] is None
    assert ch["ended"].endswith("Z")
    assert ch["files"]["src-to-dst"]["file"] == "src-to-dst.bin"
    assert ch["files"]["src-to-dst"]["bytes_written"] == len(data)
    assert ch["files"]["dst-to-src"] == {
        "file": None,
        "content": "empty",
        "bytes_seen": 0,
        "bytes_written": 0,
    }
    assert not list(sink.directory.glob(".*.tmp"))


# -- backpressure ----------------------------------------------------------------------------------


def test_backpressure_pause_once_resume_after_drain(tmp_path: Path) -> None:
    sink, throttle, loop = make_sink(tmp_path, queue_high=20_000, queue_low=5_000)
    main = channel(0, ChannelKind.UNKNOWN)
    sink.on_channel(main)
    wait_idle(sink, loop)
    gate = threading.Event()

    def slow(fd: int, data: bytes) -> None:
        gate.wait(5)
        write_all(fd, data)

    sink.writer._write = slow
    payload = os.urandom(4000)
    for i in range(12):  # 48 KB queued, the writer is stuck
        sink.on_chunk(main, S2D, i * 4000, payload)
    assert throttle.calls == [("pause", "capture")]
    assert sink.paused_count == 1
    loop.run()
    assert throttle.calls == [("pause", "capture")]  # no resume while the queue is full
    gate.set()
    wait_idle(sink, loop)
    loop.run()
    assert throttle.calls == [("pause", "capture"), ("resume", "capture")]
    # and again: a second burst pauses again
    gate.clear()
    for i in range(12, 24):
        sink.on_chunk(main, S2D, i * 4000, payload)
    assert throttle.calls[-1] == ("pause", "capture")
    gate.set()
    close(sink, summary([main]))
    loop.run()
    assert throttle.calls.count(("pause", "capture")) == 2
    assert throttle.calls.count(("resume", "capture")) == 2
    assert sink.complete
    assert (sink.directory / "conn-0-unknown.src-to-dst.bin").read_bytes() == payload * 24


# -- failures --------------------------------------------------------------------------------------


def enospc(fd: int, data: bytes) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_stops_the_capture_not_the_caller(tmp_path: Path) -> None:
    sink, throttle, loop = make_sink(tmp_path, queue_high=20_000, queue_low=5_000)
    main = channel(0)
    sink.on_channel(main)
    sink.on_chunk(main, S2D, 0, b"QEVM" + bytes(100))
    wait_idle(sink, loop)
    gate = threading.Event()

    def full(fd: int, data: bytes) -> None:
        gate.wait(5)
        enospc(fd, data)

    sink.writer._write = full
    with capture_logs() as logs:
        for i in range(10):
            sink.on_chunk(main, S2D, 104 + i * 4000, bytes(4000))
        assert throttle.calls == [("pause", "capture")]
        gate.set()
        deadline = time.monotonic() + 5
        while sink.error is None and time.monotonic() < deadline:
            time.sleep(0.002)
        wait_idle(sink, loop)
        loop.run()
        for i in range(10):  # ignored, cheaply, and never raise
            sink.on_chunk(main, S2D, 40_104 + i * 4000, bytes(4000))
            sink.on_event(main, S2D, ev.EndOfState(40_104 + i))
        loop.run()
        sink.writer._write = write_all
        close(sink, summary([main], outcome=Outcome.COMPLETED))
        loop.run()
    failed = [e for e in logs if e["event"] == "capture_failed"]
    assert len(failed) == 1
    assert failed[0]["log_level"] == "error"
    assert failed[0]["directory"] == str(sink.directory)
    assert failed[0]["file"] == "src-to-dst.bin"
    assert "No space left" in failed[0]["error"]
    assert "migration continues" in failed[0]["action"]
    assert throttle.calls == [("pause", "capture"), ("resume", "capture")]
    assert sink.complete is False
    assert sink.error is not None
    assert "No space left" in sink.error
    assert (sink.directory / "src-to-dst.bin").stat().st_size == 104
    doc = json.loads((sink.directory / "session.json").read_text())
    assert doc["complete"] is False
    assert "No space left" in doc["error"]
    closed = [e for e in logs if e["event"] == "capture_closed"]
    assert closed[0]["complete"] is False


def test_failure_on_close_never_raises(tmp_path: Path) -> None:
    sink, _, loop = make_sink(tmp_path)
    main = channel(0)
    sink.on_channel(main)
    wait_idle(sink, loop)
    sink.writer._write = enospc
    with capture_logs() as logs:
        sink.on_chunk(main, S2D, 0, b"x" * 10)
        close(sink, summary([main]))
        loop.run()
    assert not sink.complete
    assert [e["event"] for e in logs].count("capture_failed") == 1


# -- capture_ram none ------------------------------------------------------------------------------


def expected_without(data: bytes, ranges: list[tuple[int, int]]) -> bytes:
    keep = bytearray(data)
    for start, end in sorted(ranges, reverse=True):
        del keep[start:end]
    return bytes(keep)


@pytest.mark.parametrize("size", [1 << 16, 333, 5])
def test_capture_ram_none_main_and_multifd(tmp_path: Path, size: int) -> None:
    sample = sample_stream().data
    mstream = multifd_stream()
    ret = rp_shut(0)
    sink, _, _ = make_sink(tmp_path, capture_ram="none")
    main, mf, other = channel(0), channel(1, ChannelKind.MULTIFD), channel(2, ChannelKind.UNKNOWN)
    for ch in (main, mf, other):
        sink.on_channel(ch)
    main_events = feed_main(sink, main, sample, size)
    sink.on_chunk(main, D2S, 0, ret)
    mf_events = feed_multifd(sink, mf, mstream, size)
    sink.on_chunk(other, S2D, 0, os.urandom(9000))
    for ch in (main, mf, other):
        sink.on_channel_closed(ch)
    close(sink, summary([main, mf, other]))
    d = sink.directory

    ram = [(e.offset, e.offset + e.length) for e in main_events if isinstance(e, ev.RamPages)]
    main_file = (d / "src-to-dst.bin").read_bytes()
    assert main_file == expected_without(sample, ram)
    assert len(main_file) < len(sample) - 5 * 4096
    hdr = 320 + 8 * 128
    cuts = [
        (e.offset + hdr, e.offset + hdr + e.payload_bytes)
        for e in mf_events
        if isinstance(e, ev.MultifdPacket)
    ]
    mf_file = (d / "conn-1-multifd.src-to-dst.bin").read_bytes()
    assert mf_file == expected_without(mstream, cuts)
    assert b"DEVSTATE" * 4 in mf_file  # device state kept
    assert len(mf_file) == len(mstream) - 5 * 4096
    assert (d / "dst-to-src.bin").read_bytes() == ret  # the return path is kept
    assert not list(d.glob("conn-2-*"))  # unclassifiable: left out
    assert json.loads((d / "vmdesc.json").read_text())["page_size"] == 4096
    assert sink.complete

    doc = json.loads((d / "session.json").read_text())
    assert doc["capture_ram"] == "none"
    main_files = doc["channels"][0]["files"]
    assert main_files["src-to-dst"]["content"] == "ram_removed"
    assert main_files["src-to-dst"]["bytes_removed"] == len(sample) - len(main_file)
    assert main_files["src-to-dst"]["bytes_written"] == len(main_file)
    assert main_files["src-to-dst"]["left_out_from"] is None
    assert main_files["src-to-dst"]["late_cut_bytes"] == 0
    assert main_files["dst-to-src"]["content"] == "exact"
    assert doc["channels"][1]["files"]["src-to-dst"]["bytes_removed"] == 5 * 4096
    other_files = doc["channels"][2]["files"]["src-to-dst"]
    assert other_files == {
        "file": None,
        "content": "omitted",
        "bytes_seen": 9000,
        "bytes_written": 0,
    }
    first = index_of(sink)[0]
    assert first["capture_ram"] == "none"
    pages = [r for r in index_of(sink) if r["kind"] == "ram_pages"]
    assert sum(r["normal"] for r in pages) == 5  # counts stay in the index


def test_capture_ram_none_detached_parser_leaves_the_rest_out(tmp_path: Path) -> None:
    sample = sample_stream().data
    sink, _, _ = make_sink(tmp_path, capture_ram="none")
    main = channel(0)
    sink.on_channel(main)
    parser = StreamParser(page_size=4096)
    first = sample[:200]
    sink.on_chunk(main, S2D, 0, first)
    for event in parser.feed(first):
        sink.on_event(main, S2D, event)
    main.parse_error = "StreamError: pretend"
    sink.on_chunk(main, S2D, 200, sample[200:])
    sink.on_channel_closed(main)
    close(sink, summary([main]))
    out = (sink.directory / "src-to-dst.bin").read_bytes()
    assert len(out) <= 200
    assert sample.startswith(out)
    entry = json.loads((sink.directory / "session.json").read_text())["channels"][0]["files"]
    assert entry["src-to-dst"]["left_out_reason"] == "parser_detached"
    # a stream offset: what was written plus what was cut before it
    assert entry["src-to-dst"]["left_out_from"] == len(out) + entry["src-to-dst"]["bytes_removed"]
    assert entry["src-to-dst"]["left_out_from"] <= 200


def test_capture_ram_none_unparsed_rest(tmp_path: Path) -> None:
    sink, _, _ = make_sink(tmp_path, capture_ram="none")
    main = channel(0)
    sink.on_channel(main)
    sink.on_chunk(main, S2D, 0, b"A" * 100)
    sink.on_event(main, S2D, ev.StreamHeader(0, 0x5145564D, 3))
    sink.on_event(main, S2D, ev.Unparsed(40, "garbage", None))
    sink.on_chunk(main, S2D, 100, b"B" * 100)
    close(sink, summary([main]))
    assert (sink.directory / "src-to-dst.bin").read_bytes() == b"A" * 40
    files = json.loads((sink.directory / "session.json").read_text())["channels"][0]["files"]
    assert files["src-to-dst"]["left_out_from"] == 40
    assert files["src-to-dst"]["left_out_reason"] == "unparsed"


def test_capture_ram_must_be_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="capture_ram"):
        make_sink(tmp_path, capture_ram="some")


# -- extra files, real bytes -----------------------------------------------------------------------


def test_write_file(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        sink, _, _ = make_sink(tmp_path)
        sink.write_file("annotated.jsonl", b'{"a": 1}\n')
        for bad in ("../x", "session.json", "events.jsonl", "src-to-dst.bin", ".hidden", "a/b"):
            with pytest.raises(ValueError, match="capture"):
                sink.write_file(bad, b"")
        close(sink, summary([]))
    finally:
        os.umask(old)
    path = sink.directory / "annotated.jsonl"
    assert path.read_bytes() == b'{"a": 1}\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads((sink.directory / "session.json").read_text())
    assert doc["extra_files"] == ["annotated.jsonl"]
    with pytest.raises(ValueError, match="closed"):
        sink.write_file("late.txt", b"")


def test_capture_ram_none_real_multifd_header(tmp_path: Path) -> None:
    """QEMU 7.2 channel 0: init, an empty SYNC packet, a packet with 128 pages whose payload
    the fixture leaves out; we add a fake payload and expect exactly it to be cut."""
    real = fixture("multifd-ch0.first-packets.bin").read_bytes()
    data = real + b"\xaa" * (128 * 4096)
    sink, _, _ = make_sink(tmp_path, capture_ram="none")
    mf = channel(0, ChannelKind.MULTIFD)
    sink.on_channel(mf)
    feed_multifd(sink, mf, data, 1000)
    sink.on_channel_closed(mf)
    close(sink, summary([mf]))
    assert (sink.directory / "conn-0-multifd.src-to-dst.bin").read_bytes() == real
    assert sink.complete


def test_capture_ram_none_wrong_page_size_is_caught(tmp_path: Path) -> None:
    """The model's page size disagrees with the stream's: the rest is left out, never leaked."""
    data = multifd_stream()
    sink, _, _ = make_sink(tmp_path, capture_ram="none", page_size=8192)
    mf = channel(0, ChannelKind.MULTIFD)
    sink.on_channel(mf)
    feed_multifd(sink, mf, data, 4096)
    sink.on_channel_closed(mf)
    close(sink, summary([mf]))
    out = (sink.directory / "conn-0-multifd.src-to-dst.bin").read_bytes()
    assert out == data[:64]  # only the confirmed init message
    files = json.loads((sink.directory / "session.json").read_text())["channels"][0]["files"]
    assert files["src-to-dst"]["left_out_reason"] == "multifd_framing_mismatch"
    assert files["src-to-dst"]["left_out_from"] == 64


# -- closing off the loop --------------------------------------------------------------------------


def test_close_never_blocks_and_wait_closed_finds_session_final(tmp_path: Path) -> None:
    sink, _, loop = make_sink(tmp_path)
    main = channel(0)
    sink.on_channel(main)
    wait_idle(sink, loop)
    delay = 0.3

    def slow(fd: int, data: bytes) -> None:
        time.sleep(delay)
        write_all(fd, data)

    sink.writer._write = slow
    sink.on_chunk(main, S2D, 0, b"QEVM" + bytes(100))
    main.bytes_src_to_dst = 104
    sink.on_channel_closed(main)
    s = summary([main])
    with capture_logs() as logs:
        sink.contribute(s)
        started = time.monotonic()
        sink.close(s)
        assert time.monotonic() - started < delay / 3  # on the loop: hands over, never waits
        assert [e["event"] for e in logs] == []  # capture_closed comes from the writer
        assert sink.wait_closed(0.01) is False  # still writing: the relay logs it
        assert sink.wait_closed(10) is True
        loop.run()
    doc = json.loads((sink.directory / "session.json").read_text())
    assert doc["closed"] is True
    assert doc["complete"] is True
    assert doc["outcome"] == "completed"
    assert doc["channels"][0]["files"]["src-to-dst"]["bytes_written"] == 104
    assert sink.complete
    closed = [e for e in logs if e["event"] == "capture_closed"]
    assert len(closed) == 1
    assert closed[0]["complete"] is True
    assert closed[0]["bytes_written"] == 104
    assert not list(sink.directory.glob(".*.tmp"))


def test_index_time_is_the_model_time(tmp_path: Path) -> None:
    """Each index line's ``t`` is ``migration.now`` (set by the tap before observers run), so
    ``migtap analyze`` can replay the capture with the live timings."""
    sink, _, _ = make_sink(tmp_path)
    main = channel(0)
    sink.on_channel(main)
    parser = StreamParser(page_size=4096)
    times: list[float] = []
    offset = 0
    for i, piece in enumerate(chunks(sample_stream().data, 5000)):
        sink.on_chunk(main, S2D, offset, piece)
        offset += len(piece)
        for event in parser.feed(piece):
            sink.migration.now = 1_000_000.0 + i * 0.25  # the model's time, not the clock's
            sink.on_event(main, S2D, event)
            times.append(sink.migration.now)
    close(sink, summary([main]))
    lines = index_of(sink)
    assert lines[0]["kind"] == "capture_started"
    assert lines[0]["t"] == sink.migration.started
    assert [r["t"] for r in lines[1:]] == times


# -- a channel identified late ---------------------------------------------------------------------


@pytest.mark.parametrize("capture_ram", ["full", "none"])
def test_preempt_channel_recognised_late_is_renamed(tmp_path: Path, capture_ram: str) -> None:
    """The tap learns that an ``unknown`` channel is postcopy-preempt after its first chunk: its
    files get the new kind's name, after the bytes already queued for the old one."""
    sink, _, loop = make_sink(tmp_path, capture_ram=capture_ram)
    main, pre = channel(0), channel(1, ChannelKind.UNKNOWN)
    for ch in (main, pre):
        sink.on_channel(ch)
    wait_idle(sink, loop)
    gate = threading.Event()

    def gated(fd: int, data: bytes) -> None:
        gate.wait(5)
        write_all(fd, data)

    sink.writer._write = gated  # appends stay queued: the rename must come after them
    first, later, ret1, ret2 = os.urandom(3000), os.urandom(5000), b"r" * 100, b"s" * 50
    sink.on_chunk(pre, S2D, 0, first)
    sink.on_chunk(pre, D2S, 0, ret1)
    pre.kind = ChannelKind.POSTCOPY_PREEMPT
    sink.on_channel_changed(pre)
    sink.on_chunk(pre, S2D, 3000, later)
    sink.on_chunk(pre, D2S, 100, ret2)
    pre.bytes_src_to_dst, pre.bytes_dst_to_src = 8000, 150
    gate.set()
    sink.on_channel_closed(pre)
    close(sink, summary([main, pre]), loop)
    d = sink.directory
    names = ["conn-1-postcopy_preempt.dst-to-src.bin"]
    if capture_ram == "full":
        names.append("conn-1-postcopy_preempt.src-to-dst.bin")
    assert sorted(p.name for p in d.glob("conn-*")) == names
    assert (d / "conn-1-postcopy_preempt.dst-to-src.bin").read_bytes() == ret1 + ret2
    doc = json.loads((d / "session.json").read_text())
    ch = doc["channels"][1]
    assert ch["kind"] == "postcopy-preempt"
    assert ch["files"]["dst-to-src"]["file"] == "conn-1-postcopy_preempt.dst-to-src.bin"
    assert ch["files"]["dst-to-src"]["bytes_written"] == 150
    if capture_ram == "full":
        assert (d / "conn-1-postcopy_preempt.src-to-dst.bin").read_bytes() == first + later
        assert ch["files"]["src-to-dst"]["file"] == "conn-1-postcopy_preempt.src-to-dst.bin"
        assert ch["files"]["src-to-dst"]["bytes_written"] == 8000
    else:  # neither main nor multifd: its RAM pages are left out, as before
        assert ch["files"]["src-to-dst"]["file"] is None
        assert ch["files"]["src-to-dst"]["content"] == "omitted"
    assert sink.complete


# -- the stream's page size ------------------------------------------------------------------------


def test_capture_ram_none_multifd_16k_pages(tmp_path: Path) -> None:
    """A 16 KiB-page stream (target page bits 14) captured by a tap configured for 4 KiB: the
    multifd RAM header size follows the stream's page size, as the model learns it from the
    main channel's configuration, so exactly the payloads are cut."""
    page = 16384
    mstream = (
        mfd_init(channel_id=0)
        + mfd_packet(normal=3, zero=1, packet_num=1, page_size=page)
        + mfd_sync(packet_num=2, page_size=page)
        + mfd_packet(normal=2, packet_num=3, page_size=page, ramblock="pc.bios")
    )
    sink, _, _ = make_sink(tmp_path, capture_ram="none", page_size=4096)
    main, mf = channel(0), channel(1, ChannelKind.MULTIFD)
    for ch in (main, mf):
        sink.on_channel(ch)
    config = ev.Configuration(8, "pc-q35-9.2", target_page_bits=14)
    sink.migration.apply(main, S2D, config, time.time())  # as the tap does, before observers
    sink.on_event(main, S2D, config)
    assert sink.migration.page_size == page
    events = feed_parsed(sink, mf, mstream, 7000, MultifdParser(page_size=page))
    sink.on_channel_closed(mf)
    close(sink, summary([main, mf]))
    hdr = 320 + 8 * (512 * 1024 // page)
    cuts = [
        (e.offset + hdr, e.offset + hdr + e.payload_bytes)
        for e in events
        if isinstance(e, ev.MultifdPacket)
    ]
    out = (sink.directory / "conn-1-multifd.src-to-dst.bin").read_bytes()
    assert out == expected_without(mstream, cuts)
    assert len(out) == len(mstream) - 5 * page
    doc = json.loads((sink.directory / "session.json").read_text())
    files = doc["channels"][1]["files"]
    assert files["src-to-dst"]["left_out_reason"] is None
    assert files["src-to-dst"]["bytes_removed"] == 5 * page
    assert doc["page_size"] == page
    assert sink.complete
