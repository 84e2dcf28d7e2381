"""``capture_ram="none"``: guest RAM contents cut out of a channel's bytes before they are written.

What is removed, and what ``session.json`` says about it, is described with the capture format
(``migtap.capture_format``). Here: :class:`Cutter` holds one channel direction's bytes until the
parser's events have framed them and releases them with the RAM ranges cut out;
:class:`RamRedactor` turns a channel's events into cuts, with the multifd framing self-check
(each multifd record must start where the last one ended, or the rest is left out).

Everything here runs on the event loop, called by the capture observer; it does no IO.
"""

from __future__ import annotations

import collections
from typing import Final

from migtap.wire.events import (
    MultifdDeviceState,
    MultifdInit,
    MultifdPacket,
    RamPages,
    Unparsed,
)
from migtap.wire.multifd import (
    MULTIFD_DEVICE_STATE_HDR_SIZE,
    MULTIFD_INIT_SIZE,
    MULTIFD_PACKET_SIZE,
    MULTIFD_RAM_HDR_FIXED,
)

__all__ = ["HOLDBACK_MAX", "Cutter", "RamRedactor", "multifd_ram_header_size"]

MiB: Final = 1024 * 1024
HOLDBACK_MAX: Final = 64 * MiB
"""Most bytes of one channel direction held back awaiting events."""


def multifd_ram_header_size(page_size: int) -> int:
    """Bytes of a multifd RAM packet header: ``320 + 8 * (512 KiB / page_size)``; both QEMUs
    size the offset table for the stream's (target) page size."""
    return MULTIFD_RAM_HDR_FIXED + 8 * (MULTIFD_PACKET_SIZE // page_size)


class Cutter:
    """Holds one channel direction's bytes until events frame them, then releases them with the
    RAM ranges cut out.

    ``frontier`` is how far the parser has framed the stream: no later event can start before
    it, so bytes below it are final. ``cuts`` are ranges to leave out (they may run past the
    data received so far)."""

    __slots__ = (
        "cuts",
        "frontier",
        "kept",
        "late_cut_bytes",
        "pending",
        "pending_bytes",
        "released",
        "removed",
        "stopped_at",
        "stopped_reason",
        "total",
    )

    def __init__(self) -> None:
        self.pending: collections.deque[bytes] = collections.deque()
        self.pending_bytes = 0
        self.released = 0  # stream offset of the first pending byte
        self.total = 0  # bytes fed
        self.frontier = 0
        self.cuts: collections.deque[tuple[int, int]] = collections.deque()
        self.removed = 0  # bytes cut out
        self.kept = 0  # bytes released for writing
        self.late_cut_bytes = 0  # cut requested for bytes already written (should not happen)
        self.stopped_at: int | None = None
        self.stopped_reason: str | None = None

    def feed(self, chunk: bytes) -> list[bytes]:
        self.total += len(chunk)
        if self.stopped_at is not None:
            self.released = self.total
            return []
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        out = self.release()
        if self.pending_bytes > HOLDBACK_MAX:
            self.stop("holdback_exceeded")
        return out

    def cut(self, start: int, end: int) -> None:
        if end <= start:
            return
        if start < self.released:
            self.late_cut_bytes += min(end, self.released) - start
            start = self.released
            if end <= start:
                return
        if self.cuts and start <= self.cuts[-1][1]:
            last_start, last_end = self.cuts.pop()
            self.cuts.append((min(start, last_start), max(end, last_end)))
            if start < last_start:  # out of order: keep the deque sorted
                self.cuts = collections.deque(sorted(self.cuts))
        else:
            self.cuts.append((start, end))
            if len(self.cuts) > 1 and start < self.cuts[-2][0]:
                self.cuts = collections.deque(sorted(self.cuts))

    def advance(self, frontier: int) -> None:
        self.frontier = max(self.frontier, frontier)

    def stop(self, reason: str) -> None:
        """Leave out every byte from the first unreleased one on."""
        if self.stopped_at is None:
            self.stopped_at = self.released
            self.stopped_reason = reason
        self.pending.clear()
        self.pending_bytes = 0
        self.released = self.total

    def release(self, *, final: bool = False) -> list[bytes]:
        """Pieces of the pending bytes below the frontier (all of them if ``final``), cut."""
        limit = self.total if final else min(self.frontier, self.total)
        out: list[bytes] = []
        while self.pending and self.released < limit:
            chunk = self.pending[0]
            start = self.released
            take = min(len(chunk), limit - start)
            piece_end = start + take
            pos = start
            while pos < piece_end:
                while self.cuts and self.cuts[0][1] <= pos:
                    self.cuts.popleft()
                if self.cuts and self.cuts[0][0] <= pos:
                    skip_to = min(self.cuts[0][1], piece_end)
                    self.removed += skip_to - pos
                    pos = skip_to
                    continue
                keep_to = min(self.cuts[0][0], piece_end) if self.cuts else piece_end
                out.append(chunk[pos - start : keep_to - start])
                self.kept += keep_to - pos
                pos = keep_to
            if take == len(chunk):
                self.pending.popleft()
            else:
                self.pending[0] = chunk[take:]
            self.pending_bytes -= take
            self.released = piece_end
        return out


class RamRedactor:
    """The src-to-dst direction of one main or multifd channel, RAM cut out: bytes in
    (:meth:`feed`), events in (:meth:`frame`), pieces to write out of both."""

    __slots__ = ("cutter", "next_record")

    def __init__(self) -> None:
        self.cutter = Cutter()
        self.next_record: int | None = None  # multifd: where the next record must start

    @property
    def kept(self) -> int:
        """Bytes released for writing so far."""
        return self.cutter.kept

    def feed(self, chunk: bytes) -> list[bytes]:
        return self.cutter.feed(chunk)

    def stop(self, reason: str) -> None:
        self.cutter.stop(reason)

    def frame(self, event: object, *, page_size: int) -> list[bytes]:
        """What ``event`` tells about where RAM bytes are; the pieces it lets go.

        ``page_size`` is the stream's page size as known now: it sizes a multifd RAM packet's
        header. A wrong one is caught by the framing self-check, never leaks."""
        cutter = self.cutter
        offset = getattr(event, "offset", None)
        if not isinstance(offset, int):
            return []
        match event:
            case RamPages(length=length):
                cutter.cut(offset, offset + length)
                cutter.advance(offset + length)
            case Unparsed(length=None):
                cutter.advance(offset)
                out = cutter.release()
                cutter.stop("unparsed")
                return out
            case Unparsed(length=length) if length is not None:
                cutter.cut(offset, offset + length)
                cutter.advance(offset + length)
            case MultifdInit() | MultifdPacket() | MultifdDeviceState():
                # Records are back to back: each must start where the last one ended, or the
                # header length (from the page size) is wrong. Bytes are released only up to a
                # record start, which confirms the record before it.
                if offset != (self.next_record or 0):
                    cutter.stop("multifd_framing_mismatch")
                    return []
                cutter.advance(offset)
                self.next_record = self._multifd_end(event, offset, page_size)
            case _:
                cutter.advance(offset)
        return cutter.release()

    def _multifd_end(
        self, event: MultifdInit | MultifdPacket | MultifdDeviceState, offset: int, page_size: int
    ) -> int:
        """Where the multifd record at ``offset`` ends; cuts a RAM packet's payload."""
        if isinstance(event, MultifdInit):
            return offset + MULTIFD_INIT_SIZE
        if isinstance(event, MultifdDeviceState):
            return offset + MULTIFD_DEVICE_STATE_HDR_SIZE + event.payload_bytes
        start = offset + multifd_ram_header_size(page_size)
        self.cutter.cut(start, start + event.payload_bytes)
        return start + event.payload_bytes

    def detach(self) -> list[bytes]:
        """The channel's parser was detached: what is framed goes out, the rest is left out."""
        out = self.cutter.release()
        self.cutter.stop("parser_detached")
        return out

    def finish(self, *, parser_detached: bool) -> list[bytes]:
        """The channel closed: the last pieces, once the framing is checked."""
        if parser_detached:
            return self.detach()
        if self.next_record is not None and self.next_record != self.cutter.total:
            self.cutter.stop("multifd_framing_mismatch")
            return []
        return self.cutter.release(final=True)

    def entry(self) -> dict[str, object]:
        """The ``session.json`` file-entry keys of a ``ram_removed`` file."""
        c = self.cutter
        return {
            "bytes_removed": c.removed,
            "bytes_held": c.pending_bytes,
            "left_out_from": c.stopped_at,
            "left_out_reason": c.stopped_reason,
            "late_cut_bytes": c.late_cut_bytes,
        }
