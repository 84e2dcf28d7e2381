"""Main-channel parser on bad input: only events or one StreamError, never anything else."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migtap.errors import StreamError, TruncatedStream, UnsupportedStream
from migtap.wire.constants import MigCmd, SectionType
from migtap.wire.events import Unparsed
from migtap.wire.stream import StreamParser
from tests import streams as s
from tests.fixtures import fixture
from tests.wire.stream_helpers import chunked, cut, parse_chunks, parse_in_pieces

DATA = s.sample_stream().data
HEAD_TAIL = (
    fixture("file-precopy.head.bin").read_bytes() + fixture("file-precopy.tail.bin").read_bytes()
)
SWITCH = fixture("postcopy.switch.bin").read_bytes()
SWITCH_OFFSET = 2523256  # where the slice was cut: tests/data/qemu-7.2/README.md

HTTP = b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n"
CLIENT_HELLO = bytes.fromhex("16030100f4010000f00303") + bytes(range(32)) + b"\x00" * 40


# -- garbage ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "hint"),
    [(HTTP, "HTTP request"), (CLIENT_HELLO, "TLS"), (random.Random(1).randbytes(4096), None)],
)
def test_garbage_fails_at_offset_0_naming_the_magic(data: bytes, hint: str | None) -> None:
    for chunks in ([data], chunked(data, 1)):
        _, outcome = parse_chunks(chunks)
        assert outcome is not None
        cls, offset, message = outcome
        assert issubclass(cls, StreamError)
        assert offset == 0
        assert "while reading file header" in message
        assert "QEVM" in message
        if hint:
            assert hint in message


def test_error_is_sticky() -> None:
    parser = StreamParser()
    with pytest.raises(StreamError) as first:
        parser.feed(HTTP)
    with pytest.raises(StreamError, match="stopped by an earlier error") as again:
        parser.feed(s.header())
    assert again.value.__cause__ is first.value
    with pytest.raises(StreamError, match="stopped by an earlier error") as at_eof:
        parser.feed_eof()
    assert at_eof.value.__cause__ is first.value
    assert parser.error is first.value


def test_events_before_error_are_kept() -> None:
    bad = s.header() + s.ping(1) + b"\x42"
    parser = StreamParser()
    with pytest.raises(StreamError) as info:
        parser.feed(bad)
    assert info.value.offset == len(bad) - 1
    assert [type(e).__name__ for e in info.value.events] == ["StreamHeader", "Ping"]
    assert "unknown record type 0x42" in str(info.value)


def test_empty_stream() -> None:
    parser = StreamParser()
    with pytest.raises(TruncatedStream) as info:
        parser.feed_eof()
    assert info.value.offset == 0


def test_feed_after_eof() -> None:
    parser = StreamParser(start="records")
    parser.feed_eof()
    with pytest.raises(StreamError):
        parser.feed(b"\x00")


# -- specific damage -----------------------------------------------------------------------------
RAM = s.header() + s.ram_start(2, s.BLOCKS)


@pytest.mark.parametrize(
    ("data", "cls", "where", "words"),
    [
        (s.be32(0x5145564D) + s.be32(2), UnsupportedStream, 4, "obsolete"),
        (s.be32(0x5145564D) + s.be32(4), StreamError, 4, "VERSION"),
        (RAM[:-1] + b"\x03", StreamError, len(RAM) - 5, "footer names section 3"),
        (
            RAM + s.short_header(SectionType.QEMU_VM_SECTION_PART, 2) + s.page(0, "pc.ram")[:100],
            TruncatedStream,
            len(RAM) + 5 + 100,
            "page payload",
        ),
        (RAM + b"\x09", StreamError, len(RAM), "unknown record type 0x09"),
        (RAM + s.eof() + s.u8(6) + s.be32(1000) + b"{}", TruncatedStream, None, "ended"),
        (RAM + s.eof() + s.vmdesc({}) + b"x", StreamError, None, "after the VMDESCRIPTION"),
        (RAM + s.eof() + b"\x05", StreamError, len(RAM) + 1, "expected QEMU_VM_VMDESCRIPTION"),
        (
            RAM + s.ram_section(SectionType.QEMU_VM_SECTION_PART, 2, [s.zero(0, "nope")]),
            StreamError,
            len(RAM) + 5,
            "unknown block",
        ),
        (
            RAM + s.ram_section(SectionType.QEMU_VM_SECTION_PART, 2, [s.zero(0)]),
            StreamError,
            len(RAM) + 5,
            "CONTINUE",
        ),
        (
            RAM + s.ram_section(SectionType.QEMU_VM_SECTION_PART, 2, [s.zero(1 << 30, "pc.ram")]),
            StreamError,
            len(RAM) + 5,
            "outside block",
        ),
        (
            RAM + s.short_header(SectionType.QEMU_VM_SECTION_PART, 2) + s.be64(0x401),
            StreamError,
            len(RAM) + 5,
            "unknown RAM record",
        ),
        (
            RAM + s.short_header(SectionType.QEMU_VM_SECTION_PART, 2) + s.be64(0x80),
            UnsupportedStream,
            len(RAM) + 5,
            "HOOK",
        ),
        (RAM + s.short_header(SectionType.QEMU_VM_SECTION_PART, 9), StreamError, len(RAM), "id 9"),
        (RAM + s.command(MigCmd.MIG_CMD_PING, b"\x00"), StreamError, len(RAM), "length 1"),
        (RAM + s.u8(8) + s.be16(99) + s.be16(0), UnsupportedStream, len(RAM), "unknown command"),
        (RAM + s.packaged(s.ping(1))[:-2], TruncatedStream, None, "PACKAGED"),
        (
            RAM + s.command(MigCmd.MIG_CMD_PACKAGED, s.be32(3)) + s.ping(1),
            StreamError,
            None,
            "PACKAGED blob",
        ),
        (RAM + s.configuration(), StreamError, len(RAM), "CONFIGURATION"),
        (s.header() + s.ram_start(2, [("pc.ram", 4096)])[:-13], TruncatedStream, None, "ended"),
        (RAM, TruncatedStream, len(RAM), "before QEMU_VM_EOF"),
    ],
)
def test_damage(data: bytes, cls: type[StreamError], where: int | None, words: str) -> None:
    for chunks in ([data], chunked(data, 1), chunked(data, 7)):
        events, err = parse_chunks(chunks)
        assert err is not None, events
        assert issubclass(err[0], cls), err
        if where is not None:
            assert err[1] == where, err
        assert words in err[2], err


def test_multifd_flush_in_any_stream_is_accepted() -> None:
    data = RAM + s.ram_section(SectionType.QEMU_VM_SECTION_END, 2, [s.multifd_flush()]) + s.eof()
    _, err = parse_chunks([data])
    assert err is None


def test_device_section_without_footer_is_unparsed() -> None:
    data = RAM + s.full_header(SectionType.QEMU_VM_SECTION_FULL, 4, "timer") + b"\x01" * 50
    events, err = parse_chunks([data])
    assert err is not None
    assert err[0] is TruncatedStream
    assert "before its footer" in err[2]
    assert isinstance(events[-1], Unparsed)
    assert events[-1].offset == len(RAM) + 19


def test_device_section_cap() -> None:
    parser = StreamParser()
    parser.feed(RAM + s.full_header(SectionType.QEMU_VM_SECTION_FULL, 4, "timer"))
    events = []
    block = b"\x01" * (1 << 20)
    for _ in range(17):
        events += parser.feed(block)
    assert [type(e).__name__ for e in events] == ["Unparsed"]
    assert parser.feed(s.footer(4) + s.eof()) == []  # the rest is opaque
    assert parser.feed_eof() == []


def test_unparsed_section_in_blob_resumes_after_the_blob() -> None:
    # a FULL section inside the blob whose footer never comes: Unparsed, then on after the blob
    blob = s.full_header(SectionType.QEMU_VM_SECTION_FULL, 4, "dev") + b"\x02" * 30
    data = RAM + s.packaged(blob) + s.ping(4) + s.eof()
    for chunks in ([data], chunked(data, 1)):
        events, err = parse_chunks(chunks)
        assert err is None
        names = [type(e).__name__ for e in events]
        assert names[-5:] == ["SectionHeader", "Unparsed", "PackagedEnd", "Ping", "EndOfState"]


# -- mutations -------------------------------------------------------------------------------------
def _mutate(data: bytes, rnd: random.Random) -> bytes:
    i = rnd.randrange(len(data))
    op = rnd.randrange(4)
    if op == 0:
        return data[:i] + bytes([data[i] ^ (1 << rnd.randrange(8))]) + data[i + 1 :]
    if op == 1:
        return data[:i]
    if op == 2:
        return data[:i] + rnd.randbytes(rnd.randrange(1, 9)) + data[i:]
    return data[:i] + data[i + rnd.randrange(1, 9) :]


def _only_events_or_stream_error(data: bytes, **kw: object) -> None:
    # parse_chunks lets anything but StreamError escape, which fails the test
    whole = parse_chunks([data], **kw)
    assert parse_chunks(cut(data, [len(data) // 3, len(data) // 2]), **kw) == whole


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(1, 4))
def test_mutated_sample(seed: int, rounds: int) -> None:
    rnd = random.Random(seed)
    data = DATA
    for _ in range(rounds):
        data = _mutate(data, rnd)
    _only_events_or_stream_error(data)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32))
def test_mutated_fixtures(seed: int) -> None:
    rnd = random.Random(seed)
    _only_events_or_stream_error(_mutate(HEAD_TAIL, rnd))
    _only_events_or_stream_error(_mutate(SWITCH, rnd), start="records", offset=SWITCH_OFFSET)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_after_a_valid_prefix(tail: bytes) -> None:
    _only_events_or_stream_error(RAM + tail)
    _only_events_or_stream_error(tail, start="records")


def test_truncated_everywhere_in_fixture() -> None:
    whole, _ = parse_in_pieces(SWITCH, [], start="records", offset=SWITCH_OFFSET)
    for i in range(0, len(SWITCH), 7):
        events, err = parse_in_pieces(SWITCH[:i], [], start="records", offset=SWITCH_OFFSET)
        assert err is None or err[0] is TruncatedStream
        n = max(0, len(events) - 2)  # the last events may describe the cut-off part
        assert events[:n] == whole[:n]


def test_device_section_cap_inside_blob_resumes_after_it() -> None:
    big = b"\x01" * (18 << 20)  # the cap (16 MiB) is hit before the footer arrives
    blob = s.full_header(SectionType.QEMU_VM_SECTION_FULL, 4, "dev") + big + s.footer(4)
    data = RAM + s.packaged(blob) + s.ping(4) + s.eof()
    events, err = parse_chunks(chunked(data, 1 << 20))
    assert err is None
    names = [type(e).__name__ for e in events]
    assert names[-5:] == ["SectionHeader", "Unparsed", "PackagedEnd", "Ping", "EndOfState"]
