"""The bulk path of the RAM reader (``count_page_run``) gives exactly the per-record result."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st

from migtap.errors import StreamError
from migtap.wire import ram
from migtap.wire.constants import (
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    SectionType,
)
from migtap.wire.ram import count_page_run
from migtap.wire.stream import StreamParser
from tests import streams as s
from tests.wire.stream_helpers import cut

if TYPE_CHECKING:
    from migtap.wire.events import Event

PAGE_RUN = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
ZERO_RUN = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE


def count_one_by_one(
    src: bytes, pos: int, end: int, *, first: int, step: int, stride: int, limit: int
) -> int:
    """The reference: one header at a time."""
    n = 0
    while n < limit and pos + stride <= end:
        if struct.unpack_from(">Q", src, pos)[0] != first + n * step:
            break
        n += 1
        pos += stride
    return n


@st.composite
def header_runs(draw: st.DrawFn) -> tuple[bytes, int, int, int, int, int, int]:
    """Records of one stride whose headers mostly follow a progression, some bytes damaged."""
    stride = draw(st.sampled_from([9, 16, 24, 4104]))
    step = draw(st.sampled_from([1024, 4096]))
    first = draw(st.integers(0, 2**40)) * step + draw(st.sampled_from([PAGE_RUN, ZERO_RUN]))
    count = draw(st.integers(0, 1100 if stride < 100 else 300))
    lead = draw(st.integers(0, 3))
    data = bytearray(b"\xaa" * lead)
    for i in range(count):
        data += struct.pack(">Q", first + i * step) + bytes([i % 256]) * (stride - 8)
    data += bytes(draw(st.integers(0, stride)))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
    end = draw(st.integers(lead, len(data)))
    limit = draw(st.integers(0, count + 2))
    return bytes(data), lead, end, first, step, stride, limit


@settings(max_examples=300)
@given(header_runs())
def test_count_page_run_matches_one_by_one(
    case: tuple[bytes, int, int, int, int, int, int],
) -> None:
    data, pos, end, first, step, stride, limit = case
    kw = {"first": first, "step": step, "stride": stride, "limit": limit}
    assert count_page_run(data, pos, end, **kw) == count_one_by_one(data, pos, end, **kw)
    assert count_page_run(memoryview(data), pos, end, **kw) == count_one_by_one(
        data, pos, end, **kw
    )


def test_count_page_run_long_run_and_its_end() -> None:
    stride, step, first = 4104, 4096, 8 * 4096 + PAGE_RUN
    heads = [first + i * step for i in range(2000)]
    heads[1500] += 4096  # a gap: the run ends there
    data = b"".join(struct.pack(">Q", h) + bytes(stride - 8) for h in heads)
    kw = {"first": first, "step": step, "stride": stride}
    assert count_page_run(data, 0, len(data), **kw, limit=5000) == 1500
    assert count_page_run(data, 0, len(data), **kw, limit=700) == 700
    assert count_page_run(data, 0, 1000 * stride - 1, **kw, limit=5000) == 999


# -- the whole parser, bulk path on and off ----------------------------------------------------
BLOCKS = [("pc.ram", 64), ("pc.bios", 8)]  # in pages


@st.composite
def ram_streams(draw: st.DrawFn) -> tuple[bytes, int]:
    """A main-channel stream whose RAM sections hold runs of same-shape records (the bulk
    path's case) mixed with every other record kind, then maybe damaged."""
    bits = draw(st.sampled_from([10, 12]))
    ps = 1 << bits
    blocks = [(name, pages * ps) for name, pages in BLOCKS]
    records: list[bytes] = []
    for _ in range(draw(st.integers(1, 12))):
        block, pages = draw(st.sampled_from(BLOCKS))
        start = draw(st.integers(0, pages - 1))
        run = draw(st.integers(1, pages + 2))  # may run past the block's end
        shape = draw(st.sampled_from(["page", "zero", "xbzrle", "compressed", "flush", "mixed"]))
        named = draw(st.booleans())
        for i in range(run):
            name = block if named and i == 0 else None
            off = (start + i) * ps
            kind = draw(st.sampled_from(["page", "zero"])) if shape == "mixed" else shape
            if kind == "page":
                records.append(s.page(off, name, data=bytes([i % 256]) * ps, size=ps))
            elif kind == "zero":
                records.append(s.zero(off, name))
            elif kind == "xbzrle":
                records.append(s.xbzrle(off, name))
            elif kind == "compressed":
                records.append(s.compressed(off, name))
            else:
                records.append(s.multifd_flush())
                break
    mid = draw(st.integers(0, len(records)))
    data = bytearray(
        s.header()
        + s.configuration(page_bits=bits)
        + s.ram_start(2, blocks)
        + s.ram_section(SectionType.QEMU_VM_SECTION_PART, 2, records[:mid])
        + s.ram_section(SectionType.QEMU_VM_SECTION_END, 2, records[mid:])
        + s.eof()
    )
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] ^= draw(st.integers(1, 255))
    return bytes(data), ps


def parse_both_ways(data: bytes, cuts: list[int]) -> tuple[object, object]:
    """Events (unmerged), error and RAM statistics with the bulk path, and without it."""

    def parse() -> object:
        parser = StreamParser()
        events: list[Event] = []
        error = None
        try:
            for chunk in cut(data, cuts):
                events += parser.feed(chunk)
            events += parser.feed_eof()
        except StreamError as exc:
            events += exc.events
            error = (type(exc), exc.offset, str(exc))
        return events, error, parser.ram_stats

    bulk = parse()
    with mock.patch.object(ram, "count_page_run", return_value=0):
        one_by_one = parse()
    return bulk, one_by_one


@settings(max_examples=200, deadline=None)
@given(ram_streams(), st.data())
def test_bulk_path_gives_the_per_record_result(
    stream: tuple[bytes, int], data: st.DataObject
) -> None:
    raw, _ = stream
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=6))
    bulk, one_by_one = parse_both_ways(raw, cuts)
    assert bulk == one_by_one


def page_run_stream(pages: int, ps: int = 4096) -> bytes:
    records = [s.page(0, "pc.ram", data=bytes(ps), size=ps)]
    records += [s.page(i * ps, data=bytes(ps), size=ps) for i in range(1, pages)]
    records += [s.zero(i * ps) for i in range(pages, 64)]
    return (
        s.header()
        + s.ram_start(2, [(name, n * ps) for name, n in BLOCKS])
        + s.ram_section(SectionType.QEMU_VM_SECTION_END, 2, records)
        + s.eof()
    )


@example(cuts=[])
@example(cuts=[4104 * 10 + 5])
@given(st.lists(st.integers(0, len(page_run_stream(40))), max_size=8))
def test_bulk_path_split_anywhere(cuts: list[int]) -> None:
    data = page_run_stream(40)
    bulk, one_by_one = parse_both_ways(data, cuts)
    assert bulk == one_by_one
    _, err, stats = bulk  # type: ignore[misc]
    assert err is None
    assert (stats.total.normal_pages, stats.total.zero_pages) == (40, 24)
