"""The one contract of every channel parser (``migtap.wire.parser.Parser``), tested on all four.

Behaviour, not shape: events before damage travel on the exception, errors are sticky, nothing
may be fed after EOF, and how the bytes are split never changes the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from migtap.errors import StreamError, TruncatedStream
from migtap.wire.events import (
    MultifdInit,
    MultifdPacket,
    Ping,
    RamBlock,
    RamPages,
    RpPong,
    RpShut,
    StreamHeader,
)
from migtap.wire.multifd import MultifdParser
from migtap.wire.preempt import PreemptParser
from migtap.wire.return_path import ReturnPathParser
from migtap.wire.stream import StreamParser
from tests import streams as s
from tests.wire.mfd_streams import mfd_init, mfd_packet, mfd_sync, rp_pong, rp_req_pages, rp_shut
from tests.wire.stream_helpers import normalize

if TYPE_CHECKING:
    from collections.abc import Callable

    from migtap.wire.events import Event
    from migtap.wire.parser import Parser

MFD_PAGE = 65536  # 8 pages per packet: short packets
PREEMPT_BLOCKS = (RamBlock("pc.ram", 64 * s.PAGE), RamBlock("pc.bios", 4 * s.PAGE))


@dataclass(frozen=True)
class Case:
    make: Callable[[], Parser]
    good: bytes  # a complete, valid channel
    bad: bytes  # valid records, then damage, all in one piece
    before: list[type]  # the events the valid records of ``bad`` give


CASES = {
    "stream": Case(
        lambda: StreamParser(page_size=s.PAGE),
        s.sample_stream().data,
        s.header() + s.ping(1) + b"\x42",
        [StreamHeader, Ping],
    ),
    "multifd": Case(
        lambda: MultifdParser(page_size=MFD_PAGE),
        mfd_init()
        + mfd_packet(normal=2, zero=1, packet_num=1, page_size=MFD_PAGE)
        + mfd_sync(2, page_size=MFD_PAGE),
        # a MultiFD init, then a packet with a bad magic: the init must not be lost
        mfd_init() + b"\x00" * 12,
        [MultifdInit],
    ),
    "multifd-packet": Case(
        lambda: MultifdParser(page_size=MFD_PAGE),
        mfd_init() + mfd_sync(0, page_size=MFD_PAGE),
        # then a packet of an unknown version
        mfd_init() + mfd_sync(0, page_size=MFD_PAGE) + bytes.fromhex("11223344 00000009 00000000"),
        [MultifdInit, MultifdPacket],
    ),
    "return-path": Case(
        ReturnPathParser,
        rp_pong(1) + rp_req_pages(0x1000) + rp_shut(0),
        rp_pong(1) + rp_shut(0) + b"\x00\x00\x00\x00",  # type 0: INVALID
        [RpPong, RpShut],
    ),
    "preempt": Case(
        lambda: PreemptParser(s.PAGE, PREEMPT_BLOCKS),
        s.page(40 * s.PAGE, "pc.ram") + s.zero(3 * s.PAGE) + s.page(0, "pc.bios") + s.eos(),
        s.page(0, "pc.ram") + b"\xff" * 8,
        [RamPages],
    ),
}
params = pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())

Outcome = tuple[list["Event"], tuple[type[StreamError], int] | None]


def run(case: Case, data: bytes, cuts: list[int], *, kind: type = bytes) -> Outcome:
    """Feed ``data`` cut at ``cuts`` (as ``kind``) then EOF; events (normalized) and the error."""
    parser = case.make()
    events: list[Event] = []
    start = 0
    try:
        for cut in [*sorted(set(cuts)), len(data)]:
            events += parser.feed(kind(data[start:cut]))
            start = cut
        events += parser.feed_eof()
    except StreamError as exc:
        return normalize(events + list(exc.events)), (type(exc), exc.offset)
    return normalize(events), None


@params
def test_a_good_channel_parses_and_ends_at_its_length(case: Case) -> None:
    parser = case.make()
    events = parser.feed(case.good)
    events += parser.feed_eof()
    assert events
    assert parser.offset == len(case.good)
    assert isinstance(parser.state, str)
    assert isinstance(parser.page_size, int)


@params
def test_events_before_damage_are_on_the_exception(case: Case) -> None:
    parser = case.make()
    with pytest.raises(StreamError) as info:
        parser.feed(case.bad)
    assert [type(e) for e in info.value.events] == case.before
    # events returned by an earlier call are not repeated on the exception
    cut = len(case.bad) - 1
    parser = case.make()
    first = parser.feed(case.bad[:cut])
    with pytest.raises(StreamError) as later:
        parser.feed(case.bad[cut:])
    assert [type(e) for e in normalize(first + list(later.value.events))] == case.before
    assert not set(map(id, first)) & set(map(id, later.value.events))


@params
def test_an_error_is_sticky(case: Case) -> None:
    parser = case.make()
    with pytest.raises(StreamError) as first:
        parser.feed(case.bad)
    for data in (case.good, b"", None):
        with pytest.raises(StreamError, match="stopped by an earlier error") as again:
            parser.feed_eof() if data is None else parser.feed(data)
        assert again.value is not first.value
        assert again.value.__cause__ is first.value
        assert again.value.events == ()


@params
def test_truncation_at_eof_is_one_truncated_stream(case: Case) -> None:
    parser = case.make()
    parser.feed(case.good[:-1])
    with pytest.raises(TruncatedStream) as info:
        parser.feed_eof()
    assert info.value.events == ()
    with pytest.raises(StreamError, match="stopped by an earlier error"):
        parser.feed_eof()


@params
def test_nothing_may_follow_eof(case: Case) -> None:
    parser = case.make()
    parser.feed(case.good)
    parser.feed_eof()
    with pytest.raises(StreamError) as info:
        parser.feed(b"")
    assert info.value.events == ()
    with pytest.raises(StreamError):
        parser.feed_eof()


@params
@settings(max_examples=40, deadline=None)
@given(data=st.data())
@example(data=None)  # byte by byte, below
def test_split_does_not_matter(case: Case, data: st.DataObject | None) -> None:
    for stream in (case.good, case.bad, case.good[: len(case.good) // 2]):
        whole = run(case, stream, [])
        if data is None:
            cuts = list(range(len(stream)))
            assert run(case, stream, cuts) == whole
            continue
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
        kind = data.draw(st.sampled_from([bytes, bytearray, memoryview]))
        assert run(case, stream, cuts, kind=kind) == whole


@params
@settings(max_examples=60, deadline=None)
@given(tail=st.binary(max_size=200), at=st.integers(0, 1 << 16))
def test_garbage_gives_events_or_one_stream_error(case: Case, tail: bytes, at: int) -> None:
    stream = case.good[: at % (len(case.good) + 1)] + tail
    whole = run(case, stream, [])  # anything but a StreamError escapes and fails the test
    assert run(case, stream, [len(stream) // 3, len(stream) // 2]) == whole
