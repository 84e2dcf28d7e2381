"""The postcopy-preempt channel: header-less page records, and telling such a channel apart."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from migtap.errors import StreamError, TruncatedStream, UnsupportedStream
from migtap.wire.events import RamBlock, RamEndOfSection, RamPages
from migtap.wire.preempt import PreemptParser, looks_like_preempt
from tests import streams as s

PAGE = 4096
BLOCKS = (RamBlock("pc.ram", 64 * PAGE), RamBlock("pc.bios", 4 * PAGE))
NAMES = [b.idstr for b in BLOCKS]
# Requested pages in the order the destination asked: back and forth, two blocks, CONTINUE.
CHANNEL = b"".join(
    [
        s.page(40 * PAGE, "pc.ram"),
        s.page(41 * PAGE),
        s.zero(3 * PAGE),
        s.page(0, "pc.bios"),
        s.page(10 * PAGE, "pc.ram"),
        s.eos(),
    ]
)


def parse(data: bytes, cuts: list[int]) -> tuple[int, int, int, list[type]]:
    parser = PreemptParser(PAGE, BLOCKS)
    events = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        events += parser.feed(data[start:cut])
        start = cut
    events += parser.feed_eof()
    pages = [e for e in events if isinstance(e, RamPages)]
    normal = sum(e.normal for e in pages)
    zero = sum(e.zero for e in pages)
    eos = [e.offset for e in events if isinstance(e, RamEndOfSection)]
    return normal, zero, eos[0] if eos else -1, sorted({type(e) for e in events}, key=str)


def test_counts_pages_and_the_closing_eos() -> None:
    normal, zero, eos_at, kinds = parse(CHANNEL, [])
    assert (normal, zero) == (4, 1)
    assert eos_at == len(CHANNEL) - 8
    assert kinds == sorted({RamPages, RamEndOfSection}, key=str)


@given(st.lists(st.integers(0, len(CHANNEL)), max_size=12))
@example([7])  # inside the first record header
@example([9 + 6 + 100])  # inside a page payload
@example(list(range(len(CHANNEL))))  # byte by byte
def test_split_does_not_matter(cuts: list[int]) -> None:
    assert parse(CHANNEL, cuts) == parse(CHANNEL, [])


def test_memoryview_and_bytearray_input() -> None:
    parser = PreemptParser(PAGE, BLOCKS)
    events = parser.feed(memoryview(bytearray(CHANNEL)))
    assert sum(e.normal for e in events if isinstance(e, RamPages)) == 4


def test_a_record_cut_short_is_truncated() -> None:
    parser = PreemptParser(PAGE, BLOCKS)
    parser.feed(CHANNEL[:100])
    with pytest.raises(TruncatedStream) as err:
        parser.feed_eof()
    assert "inside a RAM record" in str(err.value)
    with pytest.raises(StreamError, match="stopped by an earlier error") as again:  # sticky
        parser.feed(b"")
    assert again.value.__cause__ is err.value


def test_unknown_block_and_foreign_records_are_stream_errors() -> None:
    with pytest.raises(StreamError) as err:
        PreemptParser(PAGE, BLOCKS).feed(s.page(0, "nope"))
    assert "unknown block" in str(err.value)
    with pytest.raises(UnsupportedStream) as unsupported:
        PreemptParser(PAGE, BLOCKS).feed(s.page(0, "pc.ram") + s.mem_size([("pc.ram", PAGE)]))
    assert "postcopy-preempt" in str(unsupported.value)
    parser = PreemptParser(PAGE, BLOCKS)
    with pytest.raises(StreamError) as info:
        parser.feed(s.page(0, "pc.ram") + b"\xff" * 8)
    assert sum(e.normal for e in info.value.events if isinstance(e, RamPages)) == 1


@pytest.mark.parametrize(
    ("head", "verdict"),
    [
        (s.page(40 * PAGE, "pc.ram"), True),
        (s.zero(0, "pc.bios"), True),
        (s.eos(), True),  # 7.2 closes an unused channel with a lone EOS
        (s.page(0, "pc.ram")[:8], None),  # the name has not arrived
        (s.page(0, "pc.ram")[:12], None),
        (b"\x00\x00\x00", None),
        (s.page(0, "other"), False),  # not a block of this migration
        (s.page(PAGE), False),  # CONTINUE cannot start a channel
        (s.xbzrle(0, "pc.ram"), False),  # not in postcopy
        (b"\x00" * 8 + b"\x04" + b"\x01\x02\x03\x04", False),  # no flags
        (b"\x00\x00\x00\x00\x00\x00\x00\x08\x04pc\x00m", False),  # not printable
        (b"\x08\x00\x00\x00\x00\x00\x00\x10", False),  # an EOS carries no offset
        (b"GET / HTTP/1.1\r\n", False),
    ],
)
def test_looks_like_preempt(head: bytes, verdict: bool | None) -> None:
    assert looks_like_preempt(head, NAMES) is verdict


def test_any_printable_block_name_when_the_block_list_is_unknown() -> None:
    assert looks_like_preempt(s.page(0, "other"), None) is True
    assert looks_like_preempt(s.page(0, "other"), []) is True
