"""Input buffer of the sans-IO parsers: tentative big-endian reads with commit/rollback.

During one ``feed`` the parser reads straight from the caller's chunk (no copy) when nothing
is pending; only an incomplete record header is copied into a small ``bytearray``, trimmed
with ``del buf[:n]``. No view of the caller's data is kept once ``unload`` has run.
"""

from __future__ import annotations

import struct
from typing import Final

_BE16: Final = struct.Struct(">H")
_BE32: Final = struct.Struct(">I")
_BE64: Final = struct.Struct(">Q")

be16_from = _BE16.unpack_from
be32_from = _BE32.unpack_from
be64_from = _BE64.unpack_from

Source = bytes | bytearray | memoryview


class NeedData(Exception):  # control flow, never escapes the parser
    """Not enough bytes yet for the current unit: roll back and wait for the next feed."""


class LimitCrossed(Exception):  # made a StreamError by the parser
    """A read would run past the end of the enclosing PACKAGED blob."""


class Buffer:
    """Bytes not yet consumed: ``src[pos:end]``; ``base`` is the stream offset of ``src[0]``.

    Reads advance ``pos`` and raise ``NeedData`` when short; the caller rolls back to the
    ``mark`` it set with ``commit``. ``limit`` (absolute, or None) bounds reads to a blob.
    """

    __slots__ = ("_pending", "_search", "base", "end", "limit", "mark", "pos", "src")

    def __init__(self, base: int = 0) -> None:
        self._pending = bytearray()
        self._search: bytes | bytearray | None = None
        self.src: Source = self._pending
        self.base = base
        self.pos = 0
        self.mark = 0
        self.end = 0
        self.limit: int | None = None

    # -- feed lifecycle ---------------------------------------------------------------------
    def load(self, data: bytes | memoryview) -> None:
        """Make ``data`` readable after whatever is pending (copying only if something is)."""
        if self._pending:
            self._pending += data
            self.src = self._pending
        else:
            self.src = data
        self.pos = self.mark = 0
        self._search = None
        self._clip()

    def unload(self) -> int:
        """Drop consumed bytes, copy the unconsumed tail out of the caller's data; return its
        length. Afterwards no view of the caller's data is held."""
        pos = self.pos
        if self.src is self._pending:
            del self._pending[:pos]
        else:
            self._pending += self.src[pos:]
        self.base += pos
        self.src = self._pending
        self.pos = self.mark = 0
        self._search = None
        self._clip()
        return len(self._pending)

    def set_limit(self, limit: int | None) -> None:
        self.limit = limit
        self._clip()

    def _clip(self) -> None:
        n = len(self.src)
        if self.limit is not None:
            n = max(min(n, self.limit - self.base), self.pos)
        self.end = n

    # -- positions --------------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Absolute stream offset of ``src[pos]``."""
        return self.base + self.pos

    @property
    def available(self) -> int:
        return self.end - self.pos

    def at_limit(self) -> bool:
        """True if the readable bytes end exactly where the enclosing blob ends."""
        return self.limit is not None and self.base + self.end == self.limit

    def commit(self) -> None:
        self.mark = self.pos

    def rollback(self) -> None:
        self.pos = self.mark

    # -- tentative reads ----------------------------------------------------------------------
    def need(self, n: int) -> None:
        if self.pos + n > self.end:
            if self.limit is not None and self.base + self.pos + n > self.limit:
                raise LimitCrossed
            raise NeedData

    def u8(self) -> int:
        self.need(1)
        v = self.src[self.pos]
        self.pos += 1
        return v

    def peek_u8(self) -> int:
        self.need(1)
        return self.src[self.pos]

    def be16(self) -> int:
        self.need(2)
        (v,) = be16_from(self.src, self.pos)
        self.pos += 2
        return int(v)

    def be32(self) -> int:
        self.need(4)
        (v,) = be32_from(self.src, self.pos)
        self.pos += 4
        return int(v)

    def be64(self) -> int:
        self.need(8)
        (v,) = be64_from(self.src, self.pos)
        self.pos += 8
        return int(v)

    def take(self, n: int) -> bytes:
        self.need(n)
        v = bytes(self.src[self.pos : self.pos + n])
        self.pos += n
        return v

    def cstr(self) -> bytes:
        """Counted string: u8 length, then that many bytes (``qemu_get_counted_string``)."""
        self.need(1)
        n = self.src[self.pos]
        self.need(1 + n)
        v = bytes(self.src[self.pos + 1 : self.pos + 1 + n])
        self.pos += 1 + n
        return v

    def skip(self, n: int) -> int:
        """Consume up to ``n`` bytes of what is readable; return how many."""
        k = min(n, self.end - self.pos)
        self.pos += k
        return k

    # -- searching (footer scan) --------------------------------------------------------------
    def searchable(self) -> bytes | bytearray:
        """``src`` as an object with ``find`` (same indices). A memoryview has no ``find``: it
        is copied, once per feed, and only when a footer scan needs it."""
        src = self.src
        if isinstance(src, memoryview):
            if self._search is None:
                self._search = bytes(src)
            return self._search
        return src
