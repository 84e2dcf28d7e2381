"""Where a section without a length ends: the footer scan (``docs/stream-format.md`` §9.5).

A FULL device section (and any iterable section the parser does not decode) carries no length:
only the VMSD JSON at the end of the stream describes it. With section footers on (the
default since QEMU 2.x, ``save_section_footer`` in ``migration/savevm.c``), the payload ends
at ``0x7E`` + be32 section id. Those five bytes can also occur inside the payload, so a match
counts only if a plausible record starts right after it. The result is a guess (``inferred``);
the annotator settles it once the vmdesc is known.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

from migtap.wire.buffer import be32_from
from migtap.wire.constants import MIG_CMD_LEN, MIG_CMD_MAX, SECTION_FOOTER_SIZE, MigCmd, SectionType

if TYPE_CHECKING:
    from collections.abc import Callable, Container

#: Section version ids above this make a guessed record header implausible.
_MAX_PLAUSIBLE_VERSION: Final = 0x10000


def printable(raw: bytes | bytearray | memoryview) -> bool:
    return all(0x20 <= c < 0x7F for c in raw)


def find_footer(
    buf: bytes | bytearray,
    start: int,
    end: int,
    section_id: int,
    sections: Container[int],
    *,
    final: bool,
) -> tuple[int, bool | None]:
    """Look in ``buf[start:end]`` for the footer of ``section_id`` followed by a plausible
    record (``sections``: the ids a PART/END may name; ``final``: no byte comes after ``end``).

    Returns ``(k, True)``: the footer is at ``buf[k]``; ``(k, None)``: a footer at ``k`` that
    cannot be judged before more bytes arrive; ``(-1, False)``: no footer in the range.
    """
    pattern = bytes([SectionType.QEMU_VM_SECTION_FOOTER]) + section_id.to_bytes(4, "big")
    i = start
    while (k := buf.find(pattern, i, end)) >= 0:
        verdict = _plausible_next(buf, k + SECTION_FOOTER_SIZE, end, sections, final=final)
        if verdict is None or verdict:
            return k, verdict
        i = k + 1
    return -1, False


def _plausible_next(
    buf: bytes | bytearray, j: int, end: int, sections: Container[int], *, final: bool
) -> bool | None:
    """Does a valid record start at ``buf[j]``? None: can't tell yet (need more bytes)."""
    if j >= end:
        return True if final else None
    check = _NEXT_CHECKS.get(buf[j])
    if check is None:
        return False
    try:
        return check(buf, j, end, sections)
    except _Short:
        return False if final else None


def _next_full(buf: bytes | bytearray, j: int, end: int, sections: Container[int]) -> bool:
    del sections
    _have(j + 6, end)
    n = buf[j + 5]
    _have(j + 6 + n + 8, end)
    (ver,) = be32_from(buf, j + 6 + n + 4)
    return n > 0 and printable(buf[j + 6 : j + 6 + n]) and ver < _MAX_PLAUSIBLE_VERSION


def _next_part(buf: bytes | bytearray, j: int, end: int, sections: Container[int]) -> bool:
    _have(j + 5, end)
    (sid,) = be32_from(buf, j + 1)
    return sid in sections


def _next_command(buf: bytes | bytearray, j: int, end: int, sections: Container[int]) -> bool:
    del sections
    _have(j + 5, end)
    num, length = struct.unpack_from(">HH", buf, j + 1)
    if not 0 < num < MIG_CMD_MAX:
        return False
    want = MIG_CMD_LEN[MigCmd(num)]
    return want is None or want == length


def _next_eof(buf: bytes | bytearray, j: int, end: int, sections: Container[int]) -> bool:
    del sections
    _have(j + 2, end)  # at the very end: accepted by the caller's ``final``
    if buf[j + 1] != SectionType.QEMU_VM_VMDESCRIPTION:
        return False
    _have(j + 7, end)
    return buf[j + 6] == ord("{")


_NEXT_CHECKS: Final[dict[int, Callable[[bytes | bytearray, int, int, Container[int]], bool]]] = {
    SectionType.QEMU_VM_SECTION_START: _next_full,
    SectionType.QEMU_VM_SECTION_FULL: _next_full,
    SectionType.QEMU_VM_SECTION_PART: _next_part,
    SectionType.QEMU_VM_SECTION_END: _next_part,
    SectionType.QEMU_VM_COMMAND: _next_command,
    SectionType.QEMU_VM_EOF: _next_eof,
}


class _Short(Exception):  # the bytes to decide have not arrived
    pass


def _have(n: int, end: int) -> None:
    if n > end:
        raise _Short
