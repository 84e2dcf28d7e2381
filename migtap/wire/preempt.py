"""The postcopy-preempt channel (sans-IO): RAM page records back to back, no header
(``docs/stream-format.md`` §7.4).

With the ``postcopy-preempt`` capability the source sends the pages the destination asked for
on a connection of their own, so that they do not queue behind the background transfer on the
main channel. That connection has no magic and no sections: ZERO and PAGE records with their
own CONTINUE state, read by the destination's ``ram_load_postcopy``. A 7.2 source (or a newer
one on a machine type up to 7.2) may end it with an EOS. Block names refer to the main
channel's RAM block list, which the caller passes in.

``looks_like_preempt(prefix, blocks)`` tells such a channel from other header-less ones
(postcopy recovery, stray clients) by its first record.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final, NoReturn

from migtap.errors import StreamError, TruncatedStream, UnsupportedStream
from migtap.wire.buffer import Buffer, NeedData
from migtap.wire.constants import (
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MASK,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
)
from migtap.wire.events import Event, RamBlock, RamEndOfSection
from migtap.wire.ram import RamFormatError, RamReader, RamStats

if TYPE_CHECKING:
    from collections.abc import Iterable

    from typing_extensions import Buffer as BufferLike

MAX_PENDING: Final = 512  # a record header with its block name is at most 8 + 1 + 255 bytes
PROBE_BYTES: Final = 8 + 1 + 255
"""The most :func:`looks_like_preempt` ever needs."""


def looks_like_preempt(  # noqa: PLR0911 - one return per rule reads best
    prefix: BufferLike, blocks: Iterable[str] | None = None
) -> bool | None:
    """Whether a header-less connection starts like a postcopy-preempt channel; ``None``: send
    more bytes. The first record must be a lone EOS, or a ZERO or PAGE record (no CONTINUE: it
    is the channel's first) naming a block: one of ``blocks`` if given, else printable."""
    head = bytes(memoryview(prefix).cast("B")[:PROBE_BYTES])
    if len(head) < 8:
        return None
    hdr = int(struct.unpack_from(">Q", head)[0])
    flags = hdr & RAM_SAVE_FLAG_MASK
    if flags == RAM_SAVE_FLAG_EOS:
        return hdr == RAM_SAVE_FLAG_EOS
    if flags not in (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE):
        return False
    if len(head) < 9:
        return None
    n = head[8]
    if n == 0:
        return False
    if len(head) < 9 + n:
        return None
    name = head[9 : 9 + n]
    if not all(0x20 < c < 0x7F for c in name):
        return False
    known = None if blocks is None else set(blocks)
    return known is None or not known or name.decode("ascii") in known


class PreemptParser:
    """``feed(data) -> events``, ``feed_eof() -> events`` for one preempt channel (src->dst).

    Emits ``RamPages`` runs (``section_id`` 0; their ``round`` numbers mean nothing here: the
    pages come in the order the destination asked for them) and ``RamEndOfSection`` for an EOS.
    Errors follow :class:`migtap.wire.parser.Parser`.
    """

    def __init__(self, page_size: int = 4096, blocks: Iterable[RamBlock] = ()) -> None:
        self._b = Buffer()
        self._ram = RamReader(page_size)
        for blk in blocks:
            self._ram.add_block(blk.idstr.encode("ascii", "replace"), blk.used_length)
        self._error: StreamError | None = None
        self._eof = False

    @property
    def offset(self) -> int:
        return self._b.offset

    @property
    def state(self) -> str:
        return "ram record"

    @property
    def page_size(self) -> int:
        return self._ram.page_size

    @property
    def ram_stats(self) -> RamStats:
        return self._ram.stats

    def feed(self, data: BufferLike) -> list[Event]:
        self._check_usable()
        out: list[Event] = []
        with memoryview(data) as view, view.cast("B") as flat:
            self._parse(flat, out)
        return out

    def feed_eof(self) -> list[Event]:
        self._check_usable()
        self._eof = True
        missing = self._ram.skip or self._b.unload()
        if missing:
            self._fail(
                TruncatedStream(
                    "postcopy-preempt channel ended inside a RAM record",
                    offset=self.offset,
                    state=self.state,
                ),
                [],
            )
        return []

    def _check_usable(self) -> None:
        if self._error is not None:
            raise StreamError(
                f"postcopy-preempt parser stopped by an earlier error: {self._error}",
                offset=self.offset,
                state="error",
            ) from self._error
        if self._eof:
            raise StreamError(
                "postcopy-preempt parser fed after EOF", offset=self.offset, state="end"
            )

    def _fail(self, exc: StreamError, out: list[Event]) -> NoReturn:
        exc.events = tuple(out)
        self._error = exc
        raise exc

    def _parse(self, data: memoryview, out: list[Event]) -> None:  # noqa: C901
        b = self._b
        ram = self._ram
        b.load(data)
        error: StreamError | None = None
        try:
            while True:
                if ram.skip:
                    ram.skip -= b.skip(ram.skip)
                    if ram.skip:
                        break
                b.commit()
                stop = ram.read_records(b, out)
                if stop == 0:
                    break
                b.commit()
                if stop != RAM_SAVE_FLAG_EOS:
                    raise UnsupportedStream(
                        f"RAM record with flags {stop:#x} on the postcopy-preempt channel "
                        "(only ZERO, PAGE and EOS belong there)",
                        offset=b.offset,
                        state=self.state,
                    )
                out.append(RamEndOfSection(b.offset, 0))
                b.pos += 8
                ram.stats.eos += 1
        except NeedData:
            b.rollback()
        except RamFormatError as exc:
            cls = UnsupportedStream if exc.unsupported else StreamError
            error = cls(str(exc), offset=exc.offset, state=self.state)
        except StreamError as exc:
            error = exc
        finally:
            pending = b.unload()
        if error is None and pending > MAX_PENDING:
            error = StreamError(
                f"{pending} bytes pending in one record header",
                offset=self.offset,
                state=self.state,
            )
        if error is not None:
            self._fail(error, out)
