"""The RAM section ("ram", version 4) of the main channel: block list, page records, rounds.

Page payloads are counted and skipped, never buffered. Page records are reported as runs
(``RamPages``), not one object per page, and summed into ``RamStats``.

Rounds (passes over RAM, ``docs/stream-format.md`` §3.4) are inferred: a page record starts a
new round when its position (block index in MEM_SIZE order, then offset in the block) is not
after the previous page record's position, or when it is the first page after a
``MULTIFD_FLUSH`` (8.1+ writes one at every scan wrap). Postcopy page requests also move the
position back, so rounds in the postcopy phase are approximate; dirty-bitmap syncs are not on
the wire at all.

Multi-thread compression (7.2-9.0) writes a thread's records only when that thread is given
new work, so a slow page can come hundreds of pages late (400 seen on 7.2) within its round
(QEMU flushes every thread at a scan wrap, so never across rounds). Once a COMPRESS_PAGE record
has been seen, a step back by less than ``COMPRESS_REORDER_PAGES`` pages and less than an eighth
of RAM from the furthest position is taken as a late record, not a new round. So with
compression, rounds are approximate: a new round that starts close behind where the last one
ended is missed, and late zero pages before the first compressed page can look like rounds.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from migtap.wire.buffer import LimitCrossed, NeedData, be16_from, be32_from, be64_from
from migtap.wire.constants import (
    ENCODING_FLAG_XBZRLE,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MASK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
)
from migtap.wire.events import Event, RamMultifdFlush, RamPages

if TYPE_CHECKING:
    from migtap.wire.buffer import Buffer, Source

_KIND_MASK: Final = RAM_SAVE_FLAG_MASK & ~RAM_SAVE_FLAG_CONTINUE
_PAGE_KINDS: Final = frozenset(
    (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_COMPRESS_PAGE)
)


class RamFormatError(Exception):
    """Raised by the RAM reader; the parser turns it into a StreamError with its context."""

    def __init__(self, message: str, offset: int, *, unsupported: bool = False) -> None:
        super().__init__(message)
        self.offset = offset
        self.unsupported = unsupported


@dataclass(slots=True)
class RoundStats:
    """Page records of one round (or of the whole stream, ``round == 0``).

    ``*_bytes`` are wire bytes of those records, headers and block names included."""

    round: int
    first_offset: int | None = None
    normal_pages: int = 0
    zero_pages: int = 0
    xbzrle_pages: int = 0
    compressed_pages: int = 0
    normal_bytes: int = 0
    zero_bytes: int = 0
    xbzrle_bytes: int = 0
    compressed_bytes: int = 0

    @property
    def pages(self) -> int:
        return self.normal_pages + self.zero_pages + self.xbzrle_pages + self.compressed_pages

    @property
    def bytes(self) -> int:
        return self.normal_bytes + self.zero_bytes + self.xbzrle_bytes + self.compressed_bytes


@dataclass(slots=True)
class RamStats:
    """Running RAM statistics; ``total`` matches QMP ``query-migrate`` ``ram.normal``
    (normal pages on this channel), ``ram.duplicate`` (zero) and the XBZRLE record count."""

    total: RoundStats = field(default_factory=lambda: RoundStats(0))
    rounds: list[RoundStats] = field(default_factory=list)
    sections: int = 0  # RAM sections seen (START/PART/END)
    eos: int = 0
    multifd_flushes: int = 0


class _Block:
    __slots__ = ("base", "index", "length", "name")

    def __init__(self, name: str, index: int, length: int, base: int) -> None:
        self.name = name
        self.index = index
        self.length = length
        self.base = base  # position of the block's first byte in the concatenation of blocks


COMPRESS_REORDER_PAGES: Final = 4096  # 16 MiB at 4 KiB pages

#: The longest run :func:`count_page_run` checks at once (a power of two), in records.
MAX_RUN_CHECK: Final = 512
_LANE: Final = 1 << 64


@functools.cache
def _headers(stride: int, count: int) -> struct.Struct:
    """``count`` 8-byte record headers, ``stride`` bytes apart (the payloads skipped)."""
    return struct.Struct(">" + f"8s{stride - 8}x" * count)


@functools.cache
def _progression(count: int) -> tuple[int, int]:
    """``(r, t)``: the headers ``h, h + s, ..., h + (count - 1) * s``, big-endian u64s back to
    back and read as one big-endian integer, equal ``h * r + s * t`` (when each is < 2**64)."""
    r = (_LANE**count - 1) // (_LANE - 1)
    return r, (r - count) // (_LANE - 1)


def _is_progression(src: Source, pos: int, count: int, *, first: int, step: int,
                    stride: int) -> bool:  # fmt: skip
    """Are the ``count`` headers ``stride`` bytes apart from ``src[pos]`` on exactly
    ``first``, ``first + step``, ...? One strided copy and one big-integer comparison."""
    if stride % 8 == 0:
        with memoryview(src) as whole:
            heads = whole[pos : pos + count * stride].cast("Q")[:: stride // 8].tobytes()
    else:
        heads = b"".join(_headers(stride, count).unpack_from(src, pos))
    r, t = _progression(count)
    return int.from_bytes(heads) == first * r + step * t


def count_page_run(
    src: Source, pos: int, end: int, *, first: int, step: int, stride: int, limit: int
) -> int:
    """How many records lie whole in ``src[pos:end]`` (at most ``limit``) whose headers are
    ``first``, ``first + step``, ``first + 2 * step``, ..., each record ``stride`` bytes long
    (``first + limit * step`` must stay below 2**64).

    The bulk path of :meth:`RamReader.read_records`: a precopy stream is mostly long runs of
    same-shape page records at consecutive offsets (``PAGE | CONTINUE`` + a page, or ``ZERO |
    CONTINUE`` + one byte). Their headers are checked many at a time (:func:`_is_progression`),
    never one Python iteration per record: the batch grows 8-fold while the run lasts and is
    halved where it ends.
    """
    n = 0
    k = 1
    while True:
        room = min(limit - n, (end - pos) // stride, MAX_RUN_CHECK)
        k = min(k, 1 << (room.bit_length() - 1)) if room > 0 else 0
        if k == 0:
            return n
        if _is_progression(src, pos, k, first=first, step=step, stride=stride):
            n += k
            pos += k * stride
            first += k * step
            k *= 8
        else:
            k //= 2


class RamReader:
    """RAM record state that lives for the whole migration (CONTINUE crosses sections)."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.stats = RamStats()
        self.blocks: dict[bytes, _Block] = {}
        self._next_base = 0
        self._last: _Block | None = None  # last block named on this channel
        self._last_pos = -1  # linear position of the last page record
        self._flush_seen = False
        self._reorder = 0  # bytes of position a record may step back within a round
        self.skip = 0  # payload bytes of the last record still to come
        self.section_id = 0

    def add_block(self, name: bytes, length: int) -> None:
        blk = _Block(name.decode("ascii", "replace"), len(self.blocks), length, self._next_base)
        self.blocks[name] = blk
        self._next_base += length

    def note_flush(self) -> None:
        self._flush_seen = True
        self.stats.multifd_flushes += 1

    def read_records(self, b: Buffer, out: list[Event]) -> int:  # noqa: C901, PLR0912, PLR0915
        """Consume page records from ``b`` until a non-page record or the end of data.

        Returns the flags of the record that stopped it (EOS / MEM_SIZE, not consumed), or 0
        when the data ran out (``self.skip`` then holds the payload bytes still to come).
        The hot loop: keep it flat, with locals."""
        src = b.src
        pos = b.pos
        end = b.end
        base = b.base
        ps = self.page_size
        align = (ps - 1) & ~RAM_SAVE_FLAG_MASK
        blocks = self.blocks
        cur = self._last
        last_pos = self._last_pos
        reorder = self._reorder
        stats = self.stats
        rnd = len(stats.rounds)
        # runs of same-shape records in bulk (count_page_run): offsets a page apart must stay
        # clear of the flag bits and aligned (true of every page size the parsers accept)
        bulk = ps > RAM_SAVE_FLAG_MASK and not ps & (ps - 1)
        # the open run
        run_off = -1
        run_blk: _Block | None = None
        n_norm = n_zero = n_xb = n_comp = 0
        b_norm = b_zero = b_xb = b_comp = 0
        stop = 0
        try:
            while True:
                if pos + 8 > end:
                    b.need(8)
                (hdr,) = be64_from(src, pos)
                flags = hdr & RAM_SAVE_FLAG_MASK
                kind = flags & _KIND_MASK
                if kind in _PAGE_KINDS:
                    if flags & RAM_SAVE_FLAG_CONTINUE:
                        blk = cur
                        if blk is None:
                            raise RamFormatError(
                                "RAM_SAVE_FLAG_CONTINUE with no earlier block", base + pos
                            )
                        hl = 8
                    else:
                        if pos + 9 > end:
                            b.need(9)
                        n = src[pos + 8]
                        if pos + 9 + n > end:
                            b.need(9 + n)
                        name = bytes(src[pos + 9 : pos + 9 + n])
                        blk = blocks.get(name)
                        if blk is None:
                            raise RamFormatError(
                                f"RAM record names unknown block {name!r}", base + pos
                            )
                        hl = 9 + n
                    off = hdr - flags
                    if off >= blk.length or off & align:
                        raise RamFormatError(
                            f"RAM record offset {off:#x} outside block {blk.name!r} "
                            f"(length {blk.length:#x}) or not aligned to page size {ps}",
                            base + pos,
                        )
                    if kind == RAM_SAVE_FLAG_PAGE:
                        plen = ps
                    elif kind == RAM_SAVE_FLAG_ZERO:
                        plen = 1
                    elif kind == RAM_SAVE_FLAG_XBZRLE:
                        if pos + hl + 3 > end:
                            b.need(hl + 3)
                        if src[pos + hl] != ENCODING_FLAG_XBZRLE:
                            raise RamFormatError(
                                f"XBZRLE encoding byte {src[pos + hl]:#x}, expected 0x01",
                                base + pos + hl,
                            )
                        (plen,) = be16_from(src, pos + hl + 1)
                        if plen > ps:
                            raise RamFormatError(
                                f"XBZRLE length {plen} exceeds page size {ps}", base + pos + hl
                            )
                        hl += 3
                    else:
                        if pos + hl + 4 > end:
                            b.need(hl + 4)
                        (plen,) = be32_from(src, pos + hl)
                        if plen > 2 * ps + 64:
                            raise RamFormatError(
                                f"compressed page length {plen} implausible for page size {ps}",
                                base + pos + hl,
                            )
                        hl += 4
                        reorder = min(COMPRESS_REORDER_PAGES * ps, self._next_base // 8)
                    # the record header is complete: account for it
                    cur = blk
                    lin = blk.base + off
                    if (
                        lin <= last_pos
                        and reorder
                        and rnd
                        and not self._flush_seen
                        and last_pos - lin < reorder
                    ):
                        lin = last_pos  # a compression thread's late record: same round
                    elif lin <= last_pos or self._flush_seen or rnd == 0:
                        self._flush_seen = False
                        if run_blk is not None:
                            self._flush_run(
                                out,
                                run_off,
                                base + pos,
                                run_blk,
                                (n_norm, n_zero, n_xb, n_comp, b_norm, b_zero, b_xb, b_comp),
                            )
                            run_blk = None
                        rnd += 1
                        stats.rounds.append(RoundStats(rnd, base + pos))
                    last_pos = lin
                    if blk is not run_blk:
                        if run_blk is not None:
                            self._flush_run(
                                out,
                                run_off,
                                base + pos,
                                run_blk,
                                (n_norm, n_zero, n_xb, n_comp, b_norm, b_zero, b_xb, b_comp),
                            )
                        run_blk = blk
                        run_off = base + pos
                        n_norm = n_zero = n_xb = n_comp = 0
                        b_norm = b_zero = b_xb = b_comp = 0
                    rec = hl + plen
                    if kind == RAM_SAVE_FLAG_PAGE:
                        n_norm += 1
                        b_norm += rec
                    elif kind == RAM_SAVE_FLAG_ZERO:
                        n_zero += 1
                        b_zero += rec
                    elif kind == RAM_SAVE_FLAG_XBZRLE:
                        n_xb += 1
                        b_xb += rec
                    else:
                        n_comp += 1
                        b_comp += rec
                    if pos + rec > end:
                        if b.limit is not None and base + pos + rec > b.limit:
                            raise LimitCrossed
                        self.skip = pos + rec - end
                        pos = end
                        break
                    pos += rec
                    b.pos = pos  # commit: the record is complete
                    if (
                        bulk
                        and kind in (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO)
                        and lin == blk.base + off  # not a late compressed-thread record
                    ):
                        # more records of the same shape at the following offsets?
                        stride = 8 + plen
                        n = count_page_run(
                            src,
                            pos,
                            end,
                            first=off + ps + (kind | RAM_SAVE_FLAG_CONTINUE),
                            step=ps,
                            stride=stride,
                            limit=(blk.length - 1 - off) // ps,
                        )
                        if n:
                            pos += n * stride
                            b.pos = pos
                            last_pos = lin + n * ps
                            if kind == RAM_SAVE_FLAG_PAGE:
                                n_norm += n
                                b_norm += n * stride
                            else:
                                n_zero += n
                                b_zero += n * stride
                    continue
                if flags == RAM_SAVE_FLAG_MULTIFD_FLUSH and hdr == flags:
                    if run_blk is not None:
                        self._flush_run(
                            out,
                            run_off,
                            base + pos,
                            run_blk,
                            (n_norm, n_zero, n_xb, n_comp, b_norm, b_zero, b_xb, b_comp),
                        )
                        run_blk = None
                    out.append(RamMultifdFlush(base + pos, self.section_id))
                    self.note_flush()
                    pos += 8
                    b.pos = pos
                    continue
                if flags == RAM_SAVE_FLAG_EOS and hdr == flags:
                    stop = RAM_SAVE_FLAG_EOS
                elif flags == RAM_SAVE_FLAG_MEM_SIZE:
                    stop = RAM_SAVE_FLAG_MEM_SIZE
                elif flags & _KIND_MASK == RAM_SAVE_FLAG_HOOK:
                    raise RamFormatError(
                        "RAM_SAVE_FLAG_HOOK: RDMA control data, not valid on a byte stream",
                        base + pos,
                        unsupported=True,
                    )
                else:
                    raise RamFormatError(
                        f"unknown RAM record header {hdr:#018x} (flags {flags:#x})", base + pos
                    )
                break
        except NeedData:
            pass
        finally:
            b.pos = pos
            self._last = cur
            self._last_pos = last_pos
            self._reorder = reorder
            if run_blk is not None:
                self._flush_run(
                    out,
                    run_off,
                    base + pos + self.skip,
                    run_blk,
                    (n_norm, n_zero, n_xb, n_comp, b_norm, b_zero, b_xb, b_comp),
                )
        return stop

    def _flush_run(
        self,
        out: list[Event],
        start: int,
        stop: int,
        blk: _Block,
        counts: tuple[int, int, int, int, int, int, int, int],
    ) -> None:
        """Report the open run; it belongs to the newest round (a new round flushes first)."""
        n_norm, n_zero, n_xb, n_comp, b_norm, b_zero, b_xb, b_comp = counts
        rnd = len(self.stats.rounds)
        sid = self.section_id
        out.append(RamPages(start, stop - start, sid, blk.name, rnd, n_norm, n_zero, n_xb, n_comp))
        for st in (self.stats.total, self.stats.rounds[rnd - 1]):
            st.normal_pages += n_norm
            st.zero_pages += n_zero
            st.xbzrle_pages += n_xb
            st.compressed_pages += n_comp
            st.normal_bytes += b_norm
            st.zero_bytes += b_zero
            st.xbzrle_bytes += b_xb
            st.compressed_bytes += b_comp
