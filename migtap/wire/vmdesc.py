"""The VMDESCRIPTION record: collected by the parser, its JSON parsed outside it.

After ``QEMU_VM_EOF`` the source may send ``0x06``, a be32 length and that much JSON.
``StreamParser`` only collects the text (:class:`VmdescCollector`, into
``VmDescription.json_bytes``, up to 64 MiB): parsing it inside ``feed`` would stall the caller
(the event loop, live). :func:`parse_vmdesc` is the pure function that does it, for a caller to
run where it likes (a worker thread, live). See
``docs/stream-format.md`` §2.10 and §4, and QEMU's ``migration/savevm.c``
(``qemu_savevm_state_complete_precopy_non_iterable``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from migtap.errors import StreamError
from migtap.wire.constants import SectionType
from migtap.wire.events import VmDescription

if TYPE_CHECKING:
    from migtap.wire.buffer import Buffer

#: Largest VMDESCRIPTION JSON accepted.
MAX_VMDESC: Final = 64 << 20


@dataclass(frozen=True, slots=True)
class VmdescDocument:
    """The parsed VMDESCRIPTION: the JSON object and its ``page_size`` (None if absent or not an
    integer)."""

    offset: int  # of the QEMU_VM_VMDESCRIPTION record, like the event's
    desc: dict[str, Any] = field(hash=False, repr=False)
    page_size: int | None = None


def parse_vmdesc(event: VmDescription) -> VmdescDocument:
    """Parse the JSON of a ``VmDescription`` event; a ``StreamError`` (state ``"vmdesc"``, the
    event's offset) if it is not JSON or not a JSON object."""
    try:
        desc = json.loads(event.json_bytes)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, nesting
        raise StreamError(
            f"VMDESCRIPTION is not valid JSON: {exc}", offset=event.offset, state="vmdesc"
        ) from exc
    if not isinstance(desc, dict):
        raise StreamError(
            f"VMDESCRIPTION JSON is not an object but {type(desc).__name__}",
            offset=event.offset,
            state="vmdesc",
        )
    ps = desc.get("page_size")
    page_size = ps if isinstance(ps, int) and not isinstance(ps, bool) else None
    return VmdescDocument(event.offset, desc, page_size)


class VmdescCollector:
    """Reads the VMDESCRIPTION record: ``start`` on its header, then ``take`` until it returns
    the event. Keeps the JSON bytes (the one record the parser buffers whole, capped)."""

    __slots__ = ("_buf", "_left", "_offset")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0
        self._offset = 0

    def __len__(self) -> int:
        """Bytes held."""
        return len(self._buf)

    def start(self, b: Buffer) -> None:
        """Read the record header (type byte, be32 length) at ``b``; raises ``NeedData`` when
        short and ``StreamError`` when it is not a VMDESCRIPTION or too long."""
        self._offset = at = b.offset
        t = b.u8()
        if t != SectionType.QEMU_VM_VMDESCRIPTION:
            raise StreamError(
                f"expected QEMU_VM_VMDESCRIPTION (0x06) or the end after QEMU_VM_EOF, got {t:#04x}",
                offset=at,
                state="after_eof",
            )
        n = b.be32()
        if n > MAX_VMDESC:
            raise StreamError(
                f"VMDESCRIPTION of {n} bytes (at most {MAX_VMDESC})", offset=at, state="after_eof"
            )
        self._buf.clear()
        self._left = n

    def take(self, b: Buffer) -> VmDescription | None:
        """Take JSON bytes from ``b``; the event once all of them have arrived."""
        k = min(self._left, b.available)
        self._buf += b.src[b.pos : b.pos + k]
        b.pos += k
        self._left -= k
        if self._left:
            return None
        text = bytes(self._buf)
        self._buf.clear()
        return VmDescription(self._offset, text)
