from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from migtap.errors import StreamError, TruncatedStream, UnsupportedStream
from migtap.wire.events import (
    RpPong,
    RpRecvBitmap,
    RpReqPages,
    RpReqPagesId,
    RpResumeAck,
    RpShut,
    RpSwitchoverAck,
)
from migtap.wire.return_path import ReturnPathParser
from tests.fixtures import fixture
from tests.wire.mfd_streams import (
    rp,
    rp_pong,
    rp_recv_bitmap,
    rp_req_pages,
    rp_req_pages_id,
    rp_resume_ack,
    rp_shut,
    rp_switchover_ack,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from migtap.wire.events import Event

# Every message type, with postcopy recovery's RECV_BITMAP trailer (and an empty bitmap).
ALL_TYPES = (
    rp_pong(1)
    + rp_switchover_ack()  # 8.1+
    + rp_req_pages(0x1000)  # before any REQ_PAGES_ID: no block known
    + rp_req_pages_id(0x3F000, 4096, "pc.ram")
    + rp_req_pages(0x43000)
    + rp_recv_bitmap("pc.ram", bytes(range(256)) * 4)
    + rp_recv_bitmap("x" * 255, b"")
    + rp_resume_ack()
    + rp_req_pages_id(0, 2 << 20, "")
    + rp_shut(0)
)


def parse_in_pieces(
    data: bytes, cuts: Iterable[int], kind: Callable[[bytes], object] = bytes
) -> list[Event]:
    parser, events, start = ReturnPathParser(), [], 0
    for cut in [*sorted(cuts), len(data)]:
        events += parser.feed(kind(data[start:cut]))  # type: ignore[arg-type]
        start = cut
    return events + parser.feed_eof()


def test_postcopy_fixture() -> None:
    data = fixture("postcopy.returnpath.bin").read_bytes()
    events = parse_in_pieces(data, [])
    assert len(events) == 10
    assert events[:5] == [
        RpPong(0, 1),
        RpPong(8, 2),
        # PING 3 rides in the PACKAGED blob, PING 4 follows it: the destination's listen thread
        # answers 4 while its main thread is still loading the blob.
        RpPong(16, 4),
        RpPong(24, 3),
        RpReqPagesId(32, 0x8E000, 4096, "pc.ram"),
    ]
    assert events[5] == RpReqPages(55, 0x3F000, 4096, "pc.ram")
    middle = events[5:-1]
    assert all(isinstance(e, RpReqPages) for e in middle)
    assert all(e.length == 4096 and e.ramblock == "pc.ram" for e in middle)  # type: ignore[union-attr]
    assert events[-1] == RpShut(len(data) - 8, 0)


def test_precopy_fixture() -> None:
    data = fixture("precopy-rp.returnpath.bin").read_bytes()
    assert parse_in_pieces(data, []) == [RpPong(0, 1), RpShut(8, 0)]


def test_all_types() -> None:
    events = parse_in_pieces(ALL_TYPES, [])
    bitmap_at = 8 + 4 + 16 + 23 + 16
    second_bitmap_at = bitmap_at + 4 + 7 + 8 + 1024 + 8
    assert events == [
        RpPong(0, 1),
        RpSwitchoverAck(8),
        RpReqPages(12, 0x1000, 4096, None),
        RpReqPagesId(28, 0x3F000, 4096, "pc.ram"),
        RpReqPages(51, 0x43000, 4096, "pc.ram"),
        RpRecvBitmap(bitmap_at, "pc.ram", 1024),
        RpRecvBitmap(second_bitmap_at, "x" * 255, 0),
        RpResumeAck(second_bitmap_at + 4 + 256 + 16, 1),
        RpReqPagesId(second_bitmap_at + 4 + 256 + 16 + 8, 0, 2 << 20, ""),
        RpShut(len(ALL_TYPES) - 8, 0),
    ]


def test_shut_error_value_and_stats() -> None:
    parser = ReturnPathParser()
    assert parser.feed(rp_shut(0xFFFFFFFF)) == [RpShut(0, 0xFFFFFFFF)]
    parser.feed(rp_recv_bitmap("a", bytes(64)))
    assert (parser.messages, parser.bitmap_bytes, parser.offset) == (2, 64, 8 + 6 + 80)


def test_split_anywhere() -> None:
    whole = parse_in_pieces(ALL_TYPES, [])
    for cut in range(len(ALL_TYPES) + 1):
        assert parse_in_pieces(ALL_TYPES, [cut]) == whole
    fixture_data = fixture("postcopy.returnpath.bin").read_bytes()
    expected = parse_in_pieces(fixture_data, [])
    for cut in range(len(fixture_data) + 1):
        assert parse_in_pieces(fixture_data, [cut]) == expected


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_buffer_kinds_and_drip(kind: Callable[[bytes], object]) -> None:
    whole = parse_in_pieces(ALL_TYPES, [])
    for size in range(1, 40):
        assert parse_in_pieces(ALL_TYPES, range(size, len(ALL_TYPES), size), kind) == whole


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, len(ALL_TYPES)), max_size=30))
@example([1, 2, 3, 4, 5, 6, 7])
@example([100, 104, 106, 107])  # inside the RECV_BITMAP size/end words
def test_split_does_not_matter(cuts: list[int]) -> None:
    assert parse_in_pieces(ALL_TYPES, cuts) == parse_in_pieces(ALL_TYPES, [])


def _parse_all(parser: ReturnPathParser, data: bytes) -> list[Event]:
    return parser.feed(data) + parser.feed_eof()


def _first_error(data: bytes) -> StreamError:
    with pytest.raises(StreamError) as info:
        _parse_all(ReturnPathParser(), data)
    return info.value


def _errors_or_events(data: bytes) -> None:
    parser = ReturnPathParser()
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


def test_mutations() -> None:
    for pos in range(len(ALL_TYPES)):
        for value in (0x00, 0xFF, ALL_TYPES[pos] ^ 0x01, ALL_TYPES[pos] ^ 0x80):
            _errors_or_events(ALL_TYPES[:pos] + bytes([value]) + ALL_TYPES[pos + 1 :])
    for end in range(len(ALL_TYPES)):
        _errors_or_events(ALL_TYPES[:end])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
@example(rp(5, b"\x00") + b"\xff" * 8)
def test_garbage(data: bytes) -> None:
    _errors_or_events(data)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (rp(0), "INVALID"),
        (rp(1, bytes(3)), "SHUT has length 3, expected 4"),
        (rp(2, bytes(5)), "PONG has length 5, expected 4"),
        (rp(4, bytes(13)), "REQ_PAGES has length 13, expected 12"),
        (rp(3, bytes(12)), "REQ_PAGES_ID has length 12"),
        (rp(3, bytes(12) + b"\x03ab"), "REQ_PAGES_ID has length 15"),
        (rp(3, bytes(12) + b"\x01ab"), "REQ_PAGES_ID has length 15"),
        (rp(5, b""), "RECV_BITMAP has length 0"),
        (rp(5, b"\x02a"), "RECV_BITMAP has length 2"),
        (rp(6, b"\0\0\0\2"), "RESUME_ACK carries 2, expected 1"),
        (rp(7, b"\0"), "SWITCHOVER_ACK has length 1, expected 0"),
        (rp(3, bytes(513)), "at most 512"),
        (rp_recv_bitmap("pc.ram", bytes(8), end=0), "expected end mark 0x0123456789abcdef"),
        (rp(5, b"\x01a") + (7).to_bytes(8, "big"), "multiple of 8"),
    ],
)
def test_rejected(data: bytes, words: str) -> None:
    exc = _first_error(rp_pong(1) + data)
    assert type(exc) is StreamError
    assert words in str(exc)
    assert exc.offset >= 8


def test_unknown_type_is_unsupported() -> None:
    exc = _first_error(rp_pong(1) + rp(8, b"hi"))
    assert isinstance(exc, UnsupportedStream)
    assert exc.offset == 8
    assert "unknown type 8" in str(exc)


def test_truncated() -> None:
    for end, what in ((3, "header"), (6, "payload"), (40, "bitmap bytes"), (1049, "end mark")):
        data = rp_recv_bitmap("pc.ram", bytes(1024))
        exc = _first_error(data[:end])
        assert isinstance(exc, TruncatedStream)
        assert exc.offset == end
        assert what in str(exc)
    assert parse_in_pieces(b"", []) == []


def test_error_and_eof_are_final() -> None:
    parser = ReturnPathParser()
    with pytest.raises(StreamError):
        parser.feed(rp(0))
    with pytest.raises(StreamError, match="earlier error"):
        parser.feed(rp_pong(1))
    parser = ReturnPathParser()
    assert parser.feed_eof() == []
    with pytest.raises(StreamError, match="after EOF"):
        parser.feed(rp_pong(1))
