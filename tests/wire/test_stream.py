"""Main-channel parser: synthetic streams, split invariance, real QEMU 7.2 fixtures."""

from __future__ import annotations

import array
import json
from typing import TYPE_CHECKING

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from migtap.errors import TruncatedStream
from migtap.wire.constants import MigCmd, SectionType
from migtap.wire.events import (
    Command,
    Configuration,
    DeviceState,
    EndOfState,
    Packaged,
    PackagedEnd,
    Ping,
    PostcopyAdvise,
    PostcopyRamDiscard,
    RamBlockList,
    RamMultifdFlush,
    RamPages,
    SectionFooter,
    SectionHeader,
    StreamHeader,
    Unparsed,
    VmDescription,
)
from migtap.wire.stream import StreamParser
from migtap.wire.vmdesc import parse_vmdesc
from tests import streams as s
from tests.fixtures import fixture
from tests.wire.stream_helpers import Outcome, chunked, cut, parse_chunks, parse_in_pieces

if TYPE_CHECKING:
    from collections.abc import Sequence

    from migtap.wire.ram import RoundStats

SAMPLE = s.sample_stream()
DATA = SAMPLE.data
WHOLE = parse_in_pieces(DATA, [])

HEAD = fixture("file-precopy.head.bin").read_bytes()
TAIL = fixture("file-precopy.tail.bin").read_bytes()
TAIL_OFFSET = 1583333  # where each slice was cut: tests/data/qemu-7.2/README.md
PC_HEAD = fixture("postcopy.head.bin").read_bytes()
PC_SWITCH = fixture("postcopy.switch.bin").read_bytes()
PC_SWITCH_OFFSET = 2523256
VMDESC_JSON = fixture("vmdesc-pc-i440fx-7.2.json").read_bytes()

# the real head, then the real tail: a complete (RAM-less) precopy stream
HEAD_TAIL = HEAD + TAIL


def kinds(events: Sequence[object]) -> list[str]:
    return [type(e).__name__ for e in events]


# -- the synthetic sample --------------------------------------------------------------------------
def test_sample_parses_completely() -> None:
    events, err = WHOLE
    assert err is None
    assert isinstance(events[0], StreamHeader)
    assert isinstance(events[1], Configuration)
    assert events[1].machine_type == "pc-i440fx-7.2"
    assert isinstance(events[-2], EndOfState)
    vmdesc = events[-1]
    assert isinstance(vmdesc, VmDescription)
    assert parse_vmdesc(vmdesc).page_size == 4096
    devices = [e for e in events if isinstance(e, DeviceState)]
    top = [(d.idstr, d.instance_id) for d in devices if d.section_id != 9]
    assert top == SAMPLE.devices
    assert all(d.inferred for d in devices)
    trap = next(d for d in devices if d.idstr == "trap")
    assert s.footer(5) in trap.payload  # the fake footer inside the payload was not taken
    footers = [e.section_id for e in events if isinstance(e, SectionFooter)]
    assert footers == [2, 2, 2, 2, 2, 4, 5, 6, 5, 7, 9]


def test_sample_payload_offsets_are_absolute() -> None:
    events, _ = WHOLE
    for d in (e for e in events if isinstance(e, DeviceState)):
        assert DATA[d.payload_offset : d.payload_offset + len(d.payload)] == d.payload
        assert DATA[d.payload_offset + len(d.payload)] == 0x7E
    for h in (e for e in events if isinstance(e, SectionHeader)):
        assert DATA[h.offset] == h.kind


def test_sample_ram_counts_and_rounds() -> None:
    parser = StreamParser()
    events = parser.feed(DATA) + parser.feed_eof()
    stats = parser.ram_stats
    assert stats.total.normal_pages == SAMPLE.normal
    assert stats.total.zero_pages == SAMPLE.zero
    assert stats.total.xbzrle_pages == SAMPLE.xbzrle
    assert stats.total.compressed_pages == SAMPLE.compressed
    assert [r.round for r in stats.rounds] == list(range(1, SAMPLE.rounds + 1))
    assert sum(r.pages for r in stats.rounds) == stats.total.pages
    assert stats.total.normal_bytes == SAMPLE.normal * (8 + 4096) + 7  # one "pc.ram" name
    assert stats.sections == 5
    assert stats.eos == 5
    assert stats.multifd_flushes == 1
    runs = [e for e in events if isinstance(e, RamPages)]
    assert sum(r.normal for r in runs) == SAMPLE.normal
    assert sum(r.zero for r in runs) == SAMPLE.zero
    assert [r.round for r in runs] == [1, 1, 1, 2, 3]
    assert [r.block for r in runs] == ["pc.ram", "pc.ram", "pc.bios", "pc.ram", "pc.ram"]
    blocks = next(e for e in events if isinstance(e, RamBlockList))
    assert [(b.idstr, b.used_length) for b in blocks.blocks] == s.BLOCKS
    assert any(isinstance(e, RamMultifdFlush) for e in events)
    # runs cover exactly the bytes between section header and EOS
    for r in runs:
        assert DATA[r.offset + r.length : r.offset + r.length + 8] in (
            s.eos(),
            s.multifd_flush(),
        ) or isinstance(r, RamPages)


def test_packaged_blob_is_nested_with_absolute_offsets() -> None:
    events, _ = WHOLE
    i = next(i for i, e in enumerate(events) if isinstance(e, Packaged))
    pkg = events[i]
    assert isinstance(pkg, Packaged)
    inner = events[i + 1 : next(j for j, e in enumerate(events) if isinstance(e, PackagedEnd))]
    assert kinds(inner) == [
        "Command",
        "SectionHeader",
        "DeviceState",
        "SectionFooter",
        "Ping",
        "Command",
    ]
    assert inner[0].offset == pkg.blob_offset
    end = next(e for e in events if isinstance(e, PackagedEnd))
    assert end.offset == pkg.blob_offset + pkg.length


# -- split invariance ----------------------------------------------------------------------------
def test_every_split_point_sample() -> None:
    for i in range(len(DATA) + 1):
        assert parse_in_pieces(DATA, [i]) == WHOLE, i


def test_byte_by_byte_sample() -> None:
    assert parse_chunks(chunked(DATA, 1)) == WHOLE


@pytest.mark.parametrize("size", [*range(2, 34), 4095, 4096, 4097, 4104, 8192, 65536])
def test_chunk_sizes(size: int) -> None:
    assert parse_chunks(chunked(DATA, size)) == WHOLE


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_buffer_types(wrap: type) -> None:
    assert parse_chunks([wrap(c) for c in chunked(DATA, 777)]) == WHOLE


def test_memoryview_of_other_format() -> None:
    data = DATA + b"\x00" * (-len(DATA) % 4)  # trailing zero bytes: data after the vmdesc
    words = array.array("I", data)
    events, err = parse_chunks([memoryview(words)])
    assert events == WHOLE[0]
    assert err is not None
    assert err[1] == len(DATA)


def _offset_of(needle: bytes, start: int = 0) -> int:
    return DATA.index(needle, start)


_BIG = _offset_of(s.BIG_INSTANCE.to_bytes(4, "big"))
_LONG = _offset_of(s.LONG_IDSTR.encode())
_FOOTER_TIMER = _offset_of(s.footer(4) + bytes([SectionType.QEMU_VM_SECTION_FULL]))


@settings(max_examples=120, deadline=None)
@given(st.lists(st.integers(0, len(DATA)), max_size=12))
@example([_BIG + 2])  # inside the be32 instance_id >= 2**31
@example([_LONG - 1, _LONG + 64])  # inside a 143-byte idstr
@example([_FOOTER_TIMER])  # a footer on a chunk boundary
@example([_FOOTER_TIMER + 5])  # right after a footer
@example([_FOOTER_TIMER + 3])  # inside a footer's be32
@example([110, 111, 112, 113])  # inside the first PART header
def test_split_does_not_matter(cuts: list[int]) -> None:
    assert parse_in_pieces(DATA, cuts) == WHOLE


# -- real QEMU 7.2 fixtures ------------------------------------------------------------------------
def test_fixture_head() -> None:
    events, err = parse_in_pieces(HEAD, [])
    assert kinds(events) == [
        "StreamHeader",
        "Configuration",
        "SectionHeader",
        "RamBlockList",
        "RamEndOfSection",
        "SectionFooter",
    ]
    blocks = events[3]
    assert isinstance(blocks, RamBlockList)
    assert blocks.total == 34086912 == sum(b.used_length for b in blocks.blocks)
    assert [b.idstr for b in blocks.blocks][:3] == ["pc.ram", "/rom@etc/acpi/tables", "pc.bios"]
    assert err is not None
    assert err[0] is TruncatedStream
    assert err[1] == len(HEAD)


def test_fixture_head_every_split() -> None:
    whole = parse_in_pieces(HEAD, [])
    for i in range(len(HEAD) + 1):
        assert parse_in_pieces(HEAD, [i]) == whole


def _tail(chunks: list[bytes] | None = None) -> Outcome:
    kw = {"start": "records", "offset": TAIL_OFFSET}
    return parse_chunks(chunks if chunks is not None else [TAIL], **kw)


def test_fixture_tail_all_sections() -> None:
    events, err = _tail()
    assert err is None
    devices = [e for e in events if isinstance(e, DeviceState)]
    desc = json.loads(VMDESC_JSON)
    # 30 FULL sections, one per vmdesc device.
    assert len(devices) == 30 == len(desc["devices"])
    assert [(d.idstr, d.instance_id) for d in devices] == [
        (d["name"], d["instance_id"]) for d in desc["devices"]
    ]
    assert all(d.kind == SectionType.QEMU_VM_SECTION_FULL for d in devices)
    for d in devices:
        rel = d.payload_offset - TAIL_OFFSET
        assert TAIL[rel : rel + len(d.payload)] == d.payload
        assert TAIL[rel + len(d.payload)] == 0x7E
    glob = devices[-1]
    assert glob.idstr == "globalstate"
    assert glob.payload == b"\x00\x00\x00\x08running" + bytes(93)
    eof = next(e for e in events if isinstance(e, EndOfState))
    assert eof.offset == 0x185B3D
    vmdesc = events[-1]
    assert isinstance(vmdesc, VmDescription)
    assert vmdesc.json_bytes == VMDESC_JSON
    assert vmdesc.offset == 0x185B3E
    doc = parse_vmdesc(vmdesc)
    assert (doc.offset, doc.desc, doc.page_size) == (vmdesc.offset, desc, 4096)


def test_fixture_tail_byte_by_byte_and_chunks() -> None:
    whole = _tail()
    assert _tail(chunked(TAIL, 1)) == whole
    for size in (2, 3, 5, 7, 64, 1000, 4096):
        assert _tail(chunked(TAIL, size)) == whole


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(TAIL)), max_size=20))
def test_fixture_tail_splits(cuts: list[int]) -> None:
    assert _tail(cut(TAIL, cuts)) == _TAIL_WHOLE


_TAIL_WHOLE = _tail()


def test_head_plus_tail_is_a_complete_stream() -> None:
    events, err = parse_in_pieces(HEAD_TAIL, [])
    assert err is None
    assert sum(isinstance(e, DeviceState) for e in events) == 30
    assert isinstance(events[-1], VmDescription)


def test_fixture_postcopy_head() -> None:
    events, err = parse_in_pieces(PC_HEAD, [])
    assert kinds(events) == [
        "StreamHeader",
        "Configuration",
        "Command",
        "Ping",
        "PostcopyAdvise",
        "SectionHeader",
        "RamBlockList",
        "RamEndOfSection",
        "SectionFooter",
    ]
    assert events[2] == Command(26, MigCmd.MIG_CMD_OPEN_RETURN_PATH)
    assert events[3] == Ping(31, 1)
    assert events[4] == PostcopyAdvise(40, 4096, 4096)
    assert isinstance(events[6], RamBlockList)
    assert all(b.page_size is None for b in events[6].blocks)
    assert err is not None
    assert err[1] == len(PC_HEAD)


def _switch(chunks: list[bytes] | None = None) -> Outcome:
    kw = {"start": "records", "offset": PC_SWITCH_OFFSET}
    return parse_chunks(chunks if chunks is not None else [PC_SWITCH], **kw)


def test_fixture_postcopy_switch() -> None:
    events, err = _switch()
    assert err is None
    assert events[0] == PostcopyRamDiscard(PC_SWITCH_OFFSET, "pc.ram", ((0x10000, 0x80000),))
    assert events[1] == Ping(PC_SWITCH_OFFSET + 30, 2)
    pkg = events[2]
    assert isinstance(pkg, Packaged)
    assert pkg.length == 12907
    assert events[3] == Command(pkg.blob_offset, MigCmd.MIG_CMD_POSTCOPY_LISTEN)
    devices = [e for e in events if isinstance(e, DeviceState)]
    assert len(devices) == 30
    assert devices[0].idstr == "timer"
    assert devices[-1].idstr == "globalstate"
    assert kinds(events[-4:]) == ["Ping", "Command", "PackagedEnd", "Ping"]
    assert events[-4] == Ping(events[-4].offset, 3)
    assert events[-3] == Command(events[-3].offset, MigCmd.MIG_CMD_POSTCOPY_RUN)
    assert events[-2] == PackagedEnd(pkg.blob_offset + pkg.length)
    assert events[-1] == Ping(PC_SWITCH_OFFSET + len(PC_SWITCH) - 9, 4)


def test_fixture_postcopy_switch_splits() -> None:
    whole = _switch()
    assert _switch(chunked(PC_SWITCH, 1)) == whole
    for size in (2, 3, 5, 8, 13, 100, 4096):
        assert _switch(chunked(PC_SWITCH, size)) == whole


def test_postcopy_head_every_split() -> None:
    whole = parse_in_pieces(PC_HEAD, [])
    for i in range(len(PC_HEAD) + 1):
        assert parse_in_pieces(PC_HEAD, [i]) == whole


# -- more of the format ----------------------------------------------------------------------------
def test_configuration_subsections_and_page_size() -> None:
    uuid = bytes(range(16))
    ps = 16384
    data = (
        s.header()
        + s.configuration("virt-8.2", page_bits=14, caps=["x-ignore-shared"], uuid=uuid)
        + s.full_header(SectionType.QEMU_VM_SECTION_START, 3, "ram", 0, 4)
        + s.be64(4 * ps | 4)
        + s.cstr("mem")
        + s.be64(4 * ps)
        + s.be64(0x4000_0000)  # ignore-shared: the block's address
        + s.eos()
        + s.footer(3)
        + s.ram_section(SectionType.QEMU_VM_SECTION_END, 3, [s.page(ps, "mem", size=ps)])
        + s.eof()
    )
    parser = StreamParser()
    events = parser.feed(data) + parser.feed_eof()
    cfg = events[1]
    assert cfg == Configuration(8, "virt-8.2", 14, ("x-ignore-shared",), uuid)
    assert parser.page_size == ps
    blocks_ev = next(e for e in events if isinstance(e, RamBlockList))
    assert blocks_ev.blocks[0].addr == 0x4000_0000
    assert parser.ram_stats.total.normal_pages == 1
    assert parser.ram_stats.total.normal_bytes == 8 + 4 + ps


def test_postcopy_hugepage_block_page_size() -> None:
    blocks = [("pc.ram", 1 << 22), ("huge", 1 << 22)]
    data = (
        s.header()
        + s.advise(4096 | (1 << 21), 4096)
        + s.full_header(SectionType.QEMU_VM_SECTION_START, 2, "ram", 0, 4)
        + s.mem_size(blocks, page_sizes={"huge": 1 << 21})
        + s.eos()
        + s.footer(2)
        + s.eof()
    )
    events, err = parse_in_pieces(data, [])
    assert err is None
    blocks_ev = next(e for e in events if isinstance(e, RamBlockList))
    assert [b.page_size for b in blocks_ev.blocks] == [None, 1 << 21]


def test_no_footers() -> None:
    data = (
        s.header()
        + s.ram_start(2, s.BLOCKS, footers=False)
        + s.ram_section(SectionType.QEMU_VM_SECTION_END, 2, [s.zero(0, "pc.ram")], footers=False)
        + s.full_header(SectionType.QEMU_VM_SECTION_FULL, 4, "timer")
        + b"\x01\x02"
        + s.eof()
    )
    parser = StreamParser()
    events = parser.feed(data) + parser.feed_eof()
    assert parser.footers is False
    assert not any(isinstance(e, SectionFooter) for e in events)
    assert isinstance(events[-1], Unparsed)
    assert events[-1].offset == len(data) - 3
    assert parser.ram_stats.total.zero_pages == 1


def test_rounds_position_rule() -> None:
    recs = [
        s.zero(0, "pc.ram"),
        s.zero(4096),
        s.zero(4096),
        s.zero(0, "pc.bios"),
        s.zero(0, "pc.ram"),
    ]
    data = (
        s.header()
        + s.ram_start(2, s.BLOCKS)
        + s.ram_section(SectionType.QEMU_VM_SECTION_END, 2, recs)
        + s.eof()
    )
    parser = StreamParser()
    parser.feed(data)
    parser.feed_eof()
    # the same page twice starts a round; pc.bios comes after pc.ram; back to pc.ram: new round
    assert [r.zero_pages for r in parser.ram_stats.rounds] == [2, 2, 1]


def rounds_of(records: list[bytes]) -> list[RoundStats]:
    """The rounds of a stream whose one RAM block of 64 pages gets ``records`` in an END."""
    data = (
        s.header()
        + s.ram_start(2, [("pc.ram", 64 * 4096)])
        + s.ram_section(SectionType.QEMU_VM_SECTION_END, 2, records)
        + s.eof()
    )
    parser = StreamParser()
    parser.feed(data)
    parser.feed_eof()
    return parser.ram_stats.rounds


def test_rounds_with_compression_threads_allow_late_records() -> None:
    """7.2's compression threads write records late; a step back by less than an eighth of RAM
    (here 8 of 64 pages) after a COMPRESS_PAGE is a late record, further back a new round."""
    page = 4096
    recs = [
        s.page(0, "pc.ram"),
        s.compressed(1 * page),
        s.zero(4 * page),
        s.compressed(2 * page),  # late: 2 pages behind the furthest (4)
        s.zero(3 * page),  # late too
        s.zero(40 * page),
        s.compressed(35 * page),  # 5 behind: late
        s.zero(20 * page),  # 20 behind: a new round
        s.zero(21 * page),
    ]
    rounds = rounds_of(recs)
    assert [(r.normal_pages, r.compressed_pages, r.zero_pages) for r in rounds] == [
        (1, 3, 3),
        (0, 0, 2),
    ]


def test_without_compression_every_step_back_is_a_round() -> None:
    page = 4096
    recs = [s.zero(4 * page, "pc.ram"), s.zero(3 * page), s.zero(2 * page)]
    assert len(rounds_of(recs)) == 3


def test_page_payloads_are_not_buffered() -> None:
    pages = [s.page(i * 4096, "pc.ram" if i == 0 else None) for i in range(16)]
    data = (
        s.header()
        + s.ram_start(2, s.BLOCKS)
        + s.ram_section(SectionType.QEMU_VM_SECTION_PART, 2, pages)
    )
    parser = StreamParser()
    for chunk in chunked(data, 1500):
        parser.feed(chunk)
        assert len(parser._b._pending) < 64  # only partial headers are kept
    assert parser.ram_stats.total.normal_pages == 16


def test_event_is_frozen_and_slotted() -> None:
    ev = Ping(0, 1)
    with pytest.raises(AttributeError):
        ev.value = 2  # type: ignore[misc]
    assert not hasattr(ev, "__dict__")
