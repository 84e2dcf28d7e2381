"""Helpers for the main-channel parser tests: parse in pieces, normalize split runs."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from migtap.errors import StreamError
from migtap.wire.events import Event, RamPages
from migtap.wire.stream import StreamParser

if TYPE_CHECKING:
    from collections.abc import Iterable

Outcome = tuple[list[Event], tuple[type[StreamError], int, str] | None]


def normalize(events: list[Event]) -> list[Event]:
    """Merge RamPages runs that a feed boundary split (contiguous, same section/block/round)."""
    out: list[Event] = []
    for ev in events:
        prev = out[-1] if out else None
        if (
            isinstance(ev, RamPages)
            and isinstance(prev, RamPages)
            and prev.offset + prev.length == ev.offset
            and (prev.section_id, prev.block, prev.round) == (ev.section_id, ev.block, ev.round)
        ):
            out[-1] = dataclasses.replace(
                prev,
                length=prev.length + ev.length,
                normal=prev.normal + ev.normal,
                zero=prev.zero + ev.zero,
                xbzrle=prev.xbzrle + ev.xbzrle,
                compressed=prev.compressed + ev.compressed,
            )
        else:
            out.append(ev)
    return out


def parse_chunks(chunks: Iterable[bytes | bytearray | memoryview], **kw: object) -> Outcome:
    """Feed ``chunks`` then EOF; return normalized events and (error type, offset, message)."""
    parser = StreamParser(**kw)  # type: ignore[arg-type]
    events: list[Event] = []
    try:
        for chunk in chunks:
            events += parser.feed(chunk)
        events += parser.feed_eof()
    except StreamError as exc:
        events += exc.events
        return normalize(events), (type(exc), exc.offset, str(exc))
    return normalize(events), None


def cut(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    pieces, start = [], 0
    for c in [*sorted(set(cuts)), len(data)]:
        pieces.append(data[start:c])
        start = c
    return pieces


def parse_in_pieces(data: bytes, cuts: Iterable[int], **kw: object) -> Outcome:
    return parse_chunks(cut(data, cuts), **kw)


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]
