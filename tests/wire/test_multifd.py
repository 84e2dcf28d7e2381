from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from migtap.errors import StreamError, TruncatedStream, UnsupportedStream
from migtap.wire.events import MultifdDeviceState, MultifdInit, MultifdPacket
from migtap.wire.multifd import (
    MULTIFD_FLAG_SYNC,
    MULTIFD_FLAG_ZLIB,
    MultifdParser,
    MultifdStats,
)
from tests.fixtures import fixture
from tests.wire.mfd_streams import mfd_device_state, mfd_init, mfd_packet, mfd_sync

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from migtap.wire.events import Event

SMALL = 65536  # page size giving 8 pages per packet and a 384-byte header: short test streams

# 7.2-8.2: SYNC packets may carry pages, stale next_packet_size and ramblock in empty packets.
STREAM_72 = (
    mfd_init(channel_id=1, uuid=bytes(range(16)))
    + mfd_sync(0, ramblock="", page_size=SMALL)
    + mfd_packet(normal=3, packet_num=2, page_size=SMALL)
    + mfd_sync(5, normal=2, page_size=SMALL)
    + mfd_sync(7, next_packet_size=524288, page_size=SMALL)  # stale size, no payload
)
# 9.0+: zero pages in the header; SYNC header-only with pages_alloc 0 (9.2+), zlib payload.
STREAM_90 = (
    mfd_init()
    + mfd_sync(0, ramblock="", pages_alloc=0, page_size=SMALL)
    + mfd_packet(normal=1, zero=6, packet_num=1, page_size=SMALL)
    + mfd_packet(zero=8, packet_num=2, page_size=SMALL)
    + mfd_packet(flags=MULTIFD_FLAG_ZLIB, normal=4, payload=b"z" * 77, page_size=SMALL)
    + mfd_sync(9, ramblock="", pages_alloc=0, page_size=SMALL)
)
# 10.0+: device-state packets (VFIO) between RAM packets.
STREAM_100 = (
    mfd_init(channel_id=3)
    + mfd_device_state("0000:00:02.0/vfio", 0, b"\xaa" * 300)
    + mfd_packet(normal=1, zero=1, packet_num=4, page_size=SMALL)
    + mfd_device_state("dev/vfio", 2, b"")
    + mfd_sync(10, ramblock="", pages_alloc=0, page_size=SMALL)
)
STREAMS = {"7.2": STREAM_72, "9.0": STREAM_90, "10.0": STREAM_100}


def parse_in_pieces(
    data: bytes,
    cuts: Iterable[int],
    page_size: int = SMALL,
    kind: Callable[[bytes], object] = bytes,
) -> tuple[list[Event], MultifdStats]:
    parser, events, start = MultifdParser(page_size=page_size), [], 0
    for cut in [*sorted(cuts), len(data)]:
        events += parser.feed(kind(data[start:cut]))  # type: ignore[arg-type]
        start = cut
    events += parser.feed_eof()
    return events, parser.stats


def test_fixture_72_first_packets() -> None:
    data = fixture("multifd-ch0.first-packets.bin").read_bytes()
    parser = MultifdParser(page_size=4096)
    init, sync, loaded = parser.feed(data)
    assert init == MultifdInit(0, 1, uuid.UUID(int=0), 0)
    assert sync == MultifdPacket(
        offset=64,
        flags=MULTIFD_FLAG_SYNC,
        packet_num=0,
        pages_alloc=128,
        normal_pages=0,
        zero_pages=0,
        next_packet_size=0,
        ramblock="",
        payload_bytes=0,
        sync=True,
    )
    assert loaded.offset == 64 + 1344
    assert isinstance(loaded, MultifdPacket)
    assert (loaded.flags, loaded.pages_alloc, loaded.normal_pages) == (0, 128, 128)
    assert (loaded.packet_num, loaded.next_packet_size, loaded.ramblock) == (2, 524288, "pc.ram")
    assert loaded.payload_bytes == 128 * 4096
    assert not loaded.sync
    assert loaded.compression == 0
    assert parser.stats == MultifdStats(
        packets=2, sync_packets=1, normal_pages=128, bytes=len(data), payload_bytes=0
    )
    with pytest.raises(TruncatedStream) as info:
        parser.feed_eof()
    assert info.value.offset == len(data) == 2752
    assert "524288 more payload bytes" in str(info.value)
    assert "1408" in str(info.value)


def test_fixture_split_everywhere() -> None:
    data = fixture("multifd-ch0.first-packets.bin").read_bytes()

    def run(cuts: list[int]) -> list[Event]:
        parser, events, start = MultifdParser(), [], 0
        for cut in [*cuts, len(data)]:
            events += parser.feed(data[start:cut])
            start = cut
        return events

    whole = run([])
    assert len(whole) == 3
    for cut in range(len(data) + 1):
        assert run([cut]) == whole


def test_stream_72_events() -> None:
    events, stats = parse_in_pieces(STREAM_72, [])
    init, *packets = events
    assert init == MultifdInit(0, 1, uuid.UUID(bytes=bytes(range(16))), 1)
    header = 320 + 8 * 8
    assert [p.offset for p in packets] == [
        64,
        64 + header,
        64 + 2 * header + 3 * SMALL,
        64 + 3 * header + 5 * SMALL,
    ]
    assert [(p.sync, p.normal_pages, p.payload_bytes) for p in packets] == [  # type: ignore[union-attr]
        (True, 0, 0),
        (False, 3, 3 * SMALL),
        (True, 2, 2 * SMALL),
        (True, 0, 0),  # stale next_packet_size is not payload
    ]
    assert packets[3].next_packet_size == 524288  # type: ignore[union-attr]
    assert stats == MultifdStats(
        packets=4, sync_packets=3, normal_pages=5, payload_bytes=5 * SMALL, bytes=len(STREAM_72)
    )


def test_stream_90_zero_pages_and_compression() -> None:
    events, stats = parse_in_pieces(STREAM_90, [])
    packets = [e for e in events if isinstance(e, MultifdPacket)]
    assert [(p.normal_pages, p.zero_pages, p.payload_bytes) for p in packets] == [
        (0, 0, 0),
        (1, 6, SMALL),
        (0, 8, 0),
        (4, 0, 77),  # compressed: next_packet_size bytes
        (0, 0, 0),
    ]
    assert packets[0].pages_alloc == 0
    assert packets[3].compression == MULTIFD_FLAG_ZLIB
    assert (stats.zero_pages, stats.normal_pages, stats.sync_packets) == (14, 5, 2)
    assert stats.bytes == len(STREAM_90)


def test_stream_100_device_state() -> None:
    events, stats = parse_in_pieces(STREAM_100, [])
    states = [e for e in events if isinstance(e, MultifdDeviceState)]
    assert states == [
        MultifdDeviceState(64, 0x40, "0000:00:02.0/vfio", 0, 300),
        MultifdDeviceState(64 + 276 + 300 + 384 + SMALL, 0x40, "dev/vfio", 2, 0),
    ]
    assert stats.device_state_packets == 2
    assert stats.packets == 2
    assert stats.payload_bytes == 300 + SMALL


def test_default_page_size_header() -> None:
    data = mfd_init() + mfd_packet(normal=2, packet_num=1) + mfd_sync(2)
    events, stats = parse_in_pieces(data, [], page_size=4096)
    assert [e.offset for e in events] == [0, 64, 64 + 1344 + 2 * 4096]
    assert stats.bytes == len(data)


@pytest.mark.parametrize("version", sorted(STREAMS))
def test_split_anywhere(version: str) -> None:
    data = STREAMS[version]
    whole = parse_in_pieces(data, [])
    step = max(1, len(data) // 400)
    for cut in range(0, len(data) + 1, step):
        assert parse_in_pieces(data, [cut]) == whole
    # every split point near the records' edges (headers are short)
    for cut in range(min(len(data), 1200)):
        assert parse_in_pieces(data, [cut]) == whole


@pytest.mark.parametrize("version", sorted(STREAMS))
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_buffer_kinds_and_drip(version: str, kind: Callable[[bytes], object]) -> None:
    data = STREAMS[version]
    whole = parse_in_pieces(data, [])
    for size in (1, 2, 3, 7, 64, 383, 4096):
        cuts = range(size, len(data), size)
        assert parse_in_pieces(data, cuts, kind=kind) == whole


def test_byte_by_byte_72() -> None:
    data = STREAM_72[: 64 + 2 * 384 + SMALL]  # init, sync, a bit of the 3-page packet
    parser = MultifdParser(page_size=SMALL)
    events = [e for i in range(len(data)) for e in parser.feed(data[i : i + 1])]
    assert events == MultifdParser(page_size=SMALL).feed(data)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(STREAMS)), st.lists(st.integers(0, 10**6), max_size=20))
@example("7.2", [63, 64, 65, 64 + 11, 64 + 12, 64 + 13])  # around the init end and flags word
@example("10.0", [64 + 8, 64 + 12, 64 + 275, 64 + 276])  # device-state header edges
def test_split_does_not_matter(version: str, raw_cuts: list[int]) -> None:
    data = STREAMS[version]
    cuts = [c % (len(data) + 1) for c in raw_cuts]
    assert parse_in_pieces(data, cuts) == parse_in_pieces(data, [])


def _parse_all(parser: MultifdParser, data: bytes) -> list[Event]:
    return parser.feed(data) + parser.feed_eof()


def _errors_or_events(data: bytes, page_size: int = SMALL) -> None:
    """Only events or a StreamError; after the error the parser keeps refusing."""
    parser = MultifdParser(page_size=page_size)
    error: StreamError | None = None
    try:
        _parse_all(parser, data)
    except StreamError as exc:
        error = exc
    if error is not None:
        assert error.offset >= 0
        assert str(error)
        with pytest.raises(StreamError):
            parser.feed(b"\0")
        with pytest.raises(StreamError):
            parser.feed_eof()


@pytest.mark.parametrize("version", sorted(STREAMS))
def test_mutations(version: str) -> None:
    data = STREAMS[version]
    for pos in range(min(len(data), 800)):
        for value in (0x00, 0xFF, data[pos] ^ 0x01, data[pos] ^ 0x40):
            _errors_or_events(data[:pos] + bytes([value]) + data[pos + 1 :])
    for end in range(0, len(data), 97):
        _errors_or_events(data[:end])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
@example(mfd_init() + b"\x11\x22\x33\x44\x00\x00\x00\x01\xff\xff\xff\xff")
def test_garbage(data: bytes) -> None:
    _errors_or_events(data)
    _errors_or_events(mfd_init() + data)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_header_counts(alloc: int, normal: int, zero: int) -> None:
    """Arbitrary page counts: parsed when QEMU would accept them, else a StreamError."""
    data = mfd_init() + mfd_packet(
        normal=min(normal, 9),
        zero=zero,
        pages_alloc=alloc,
        page_size=SMALL,
        payload=b"",
        offsets=[],
    )
    _errors_or_events(data)


def _first_error(data: bytes, page_size: int = SMALL) -> StreamError:
    parser = MultifdParser(page_size=page_size)
    with pytest.raises(StreamError) as info:
        _parse_all(parser, data)
    return info.value


def test_bad_magic() -> None:
    exc = _first_error(b"QEVM" + bytes(60))
    assert type(exc) is StreamError
    assert exc.offset == 0
    assert "0x11223344" in str(exc)
    exc = _first_error(mfd_init() + b"\x11\x22\x33\x45" + bytes(400))
    assert exc.offset == 64


def test_unsupported_version_and_flags() -> None:
    assert isinstance(_first_error(mfd_init(version=2)), UnsupportedStream)
    bad_version = bytearray(mfd_sync(page_size=SMALL))
    bad_version[7] = 2
    exc = _first_error(mfd_init() + bytes(bad_version))
    assert isinstance(exc, UnsupportedStream)
    assert exc.offset == 64 + 4
    assert isinstance(_first_error(mfd_init() + mfd_packet(flags=0x80)), UnsupportedStream)
    assert isinstance(_first_error(mfd_init() + mfd_packet(flags=0x06)), UnsupportedStream)
    exc = _first_error(mfd_init() + mfd_device_state(flags=MULTIFD_FLAG_ZLIB))
    assert isinstance(exc, UnsupportedStream)


def test_page_counts_checked() -> None:
    exc = _first_error(mfd_init() + mfd_packet(normal=9, page_size=SMALL, payload=b"", offsets=[]))
    assert "9 normal pages" in str(exc)
    assert exc.offset == 64 + 16
    exc = _first_error(
        mfd_init() + mfd_packet(normal=4, zero=5, page_size=SMALL, payload=b"", offsets=[])
    )
    assert "5 zero pages" in str(exc)
    # a 4 KiB-page stream read with 64 KiB pages: pages_alloc 128 > 8 names the likely cause
    exc = _first_error(mfd_init() + mfd_sync(page_size=4096), page_size=SMALL)
    assert "page_size" in str(exc)


def test_truncation() -> None:
    data = STREAM_72
    for end, what in ((10, "init"), (64 + 5, "packet header"), (64 + 100, "RAM packet header")):
        exc = _first_error(data[:end])
        assert isinstance(exc, TruncatedStream)
        assert exc.offset == end
        assert what in str(exc)
    assert parse_in_pieces(b"", [])[0] == []  # a channel closed before sending anything


def test_feed_after_eof() -> None:
    parser = MultifdParser()
    parser.feed(mfd_init())
    assert parser.feed_eof() == []
    with pytest.raises(StreamError):
        parser.feed(b"x")


def test_bad_page_size() -> None:
    for size in (0, 256, 3000, 1 << 20):
        with pytest.raises(ValueError, match="page_size"):
            MultifdParser(page_size=size)


def test_payload_is_counted_not_buffered() -> None:
    """1 GiB of pages in 64 KiB chunks: payload is skipped, the buffer never holds it.

    Speed is measured by scripts/bench_parser.py, never asserted in a test.
    """
    header = mfd_packet(normal=128, payload=b"")
    payload_chunk = memoryview(bytes(65536))
    parser = MultifdParser()
    parser.feed(mfd_init())
    for _num in range(2048):
        parser.feed(header)
        for _ in range(8):
            parser.feed(payload_chunk)
        assert len(parser._buf) == 0
    assert parser.stats.normal_pages == 2048 * 128
    assert parser.stats.payload_bytes == 2**30
    assert parser.feed_eof() == []


def test_stats_are_live_mid_payload() -> None:
    parser = MultifdParser(page_size=SMALL)
    data = mfd_init() + mfd_packet(normal=2, page_size=SMALL)
    parser.feed(data[: 64 + 384 + 1000])
    assert (parser.stats.packets, parser.stats.normal_pages) == (1, 2)
    assert parser.stats.payload_bytes == 1000
    assert parser.stats.bytes == 64 + 384 + 1000


def test_events_are_frozen_and_slotted() -> None:
    event = MultifdInit(0, 1, uuid.UUID(int=0), 0)
    with pytest.raises(AttributeError):
        event.offset = 1  # type: ignore[misc]
    assert not hasattr(event, "__dict__")


def test_packet_reports_first_and_last_normal_page() -> None:
    parser = MultifdParser()
    data = mfd_init() + mfd_packet(
        normal=3, zero=2, offsets=[0x5000, 0x9000, 0x2000, 0x1000, 0x7000]
    )
    data += mfd_packet(normal=0, zero=1, offsets=[0x3000])
    events = parser.feed(data)
    packets = [e for e in events if isinstance(e, MultifdPacket)]
    assert (packets[0].first_page, packets[0].last_page) == (0x5000, 0x2000)
    assert (packets[1].first_page, packets[1].last_page) == (None, None)
