"""Events of the main-channel parser: frozen, slotted records of what was seen and where.

Every event carries ``offset``, the absolute stream offset of the first byte it describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from migtap.wire.constants import MigCmd, SectionType


@dataclass(frozen=True, slots=True)
class StreamHeader:
    offset: int
    magic: int
    version: int


@dataclass(frozen=True, slots=True)
class Configuration:
    """``QEMU_VM_CONFIGURATION``: machine type and the subsections that were present."""

    offset: int
    machine_type: str
    target_page_bits: int | None = None
    capabilities: tuple[str, ...] | None = None
    uuid: bytes | None = None


@dataclass(frozen=True, slots=True)
class SectionHeader:
    offset: int  # absolute stream offset of the section-type byte
    kind: SectionType  # START, PART, END or FULL
    section_id: int
    idstr: str | None  # START and FULL carry it; PART/END get it from the earlier START
    instance_id: int | None
    version_id: int | None


@dataclass(frozen=True, slots=True)
class SectionFooter:
    offset: int
    section_id: int


@dataclass(frozen=True, slots=True)
class RamBlock:
    """One entry of the ``RAM_SAVE_FLAG_MEM_SIZE`` block list (not an event)."""

    idstr: str
    used_length: int
    page_size: int | None = None  # postcopy-ram, block page size != host page size
    addr: int | None = None  # x-ignore-shared: the block's guest-physical address


@dataclass(frozen=True, slots=True)
class RamBlockList:
    offset: int
    section_id: int
    total: int
    blocks: tuple[RamBlock, ...]


@dataclass(frozen=True, slots=True)
class RamPages:
    """A run of consecutive page records of one RAM section, block and round.

    ``length`` is the wire size of the run, record headers included (a run can end in a page
    whose payload has not arrived yet). Page records of a run are contiguous on the wire, so
    runs split by ``feed`` boundaries can be merged (``offset + length`` == next ``offset``).
    """

    offset: int
    length: int
    section_id: int
    block: str
    round: int
    normal: int = 0
    zero: int = 0
    xbzrle: int = 0
    compressed: int = 0


@dataclass(frozen=True, slots=True)
class RamEndOfSection:
    """``RAM_SAVE_FLAG_EOS``."""

    offset: int
    section_id: int


@dataclass(frozen=True, slots=True)
class RamMultifdFlush:
    """``RAM_SAVE_FLAG_MULTIFD_FLUSH`` (8.1+): a multifd sync point."""

    offset: int
    section_id: int


@dataclass(frozen=True, slots=True)
class DeviceState:
    """The payload of a section the parser does not decode itself (FULL device state, unknown
    iterable handlers). Its end was found by scanning for the footer (§9.5), so ``inferred``
    is True: the annotator settles it exactly once the vmdesc is known."""

    offset: int  # of the section header
    kind: SectionType
    section_id: int
    idstr: str | None
    instance_id: int | None
    version_id: int | None
    payload: bytes
    payload_offset: int
    inferred: bool = True


@dataclass(frozen=True, slots=True)
class Command:
    """A ``QEMU_VM_COMMAND`` without arguments (OPEN_RETURN_PATH, LISTEN, RUN, ...)."""

    offset: int
    cmd: MigCmd


@dataclass(frozen=True, slots=True)
class Ping:
    offset: int
    value: int
    cmd: MigCmd = MigCmd.MIG_CMD_PING


@dataclass(frozen=True, slots=True)
class PostcopyAdvise:
    offset: int
    ram_pagesize_summary: int | None  # None: the 0-length form (dirty-bitmaps only)
    target_page_size: int | None
    cmd: MigCmd = MigCmd.MIG_CMD_POSTCOPY_ADVISE


@dataclass(frozen=True, slots=True)
class PostcopyRamDiscard:
    offset: int
    block: str
    ranges: tuple[tuple[int, int], ...]  # (start byte offset, byte length)
    cmd: MigCmd = MigCmd.MIG_CMD_POSTCOPY_RAM_DISCARD


@dataclass(frozen=True, slots=True)
class RecvBitmapRequest:
    offset: int
    block: str
    cmd: MigCmd = MigCmd.MIG_CMD_RECV_BITMAP


@dataclass(frozen=True, slots=True)
class Packaged:
    """``MIG_CMD_PACKAGED``: the next ``length`` bytes (from ``blob_offset``) are a nested
    stream fragment, parsed like the top level; its events follow, then ``PackagedEnd``."""

    offset: int
    length: int
    blob_offset: int
    cmd: MigCmd = MigCmd.MIG_CMD_PACKAGED


@dataclass(frozen=True, slots=True)
class PackagedEnd:
    offset: int  # first byte after the blob


@dataclass(frozen=True, slots=True)
class EndOfState:
    """``QEMU_VM_EOF``."""

    offset: int


@dataclass(frozen=True, slots=True)
class VmDescription:
    """``QEMU_VM_VMDESCRIPTION``: the JSON text and its parsed form."""

    offset: int
    json_bytes: bytes
    desc: dict[str, Any] = field(hash=False, repr=False)
    page_size: int | None = None


@dataclass(frozen=True, slots=True)
class Unparsed:
    """Bytes from ``offset`` on that the parser could not frame (``length`` None: to the end)."""

    offset: int
    reason: str
    length: int | None = None


Event = (
    StreamHeader
    | Configuration
    | SectionHeader
    | SectionFooter
    | RamBlockList
    | RamPages
    | RamEndOfSection
    | RamMultifdFlush
    | DeviceState
    | Command
    | Ping
    | PostcopyAdvise
    | PostcopyRamDiscard
    | RecvBitmapRequest
    | Packaged
    | PackagedEnd
    | EndOfState
    | VmDescription
    | Unparsed
)
