"""Events of every parser in ``migtap.wire``: frozen, slotted records of what was seen and where.

Every event carries ``offset``, the absolute offset (in its channel and direction) of the first
byte it describes. ``Event`` is the union of all of them: the main channel's (``StreamParser``;
``PreemptParser`` emits a subset), the multifd channels' (``MultifdEvent``) and the return
path's (``ReturnPathEvent``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from migtap.wire.constants import MULTIFD_FLAG_COMPRESSION_MASK, MigCmd, SectionType

if TYPE_CHECKING:
    import uuid


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
    iterable handlers). Its end was found by scanning for the footer (``docs/stream-format.md``
    §9.5), so ``inferred`` is True: the annotator settles it exactly once the vmdesc is known."""

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
    """``QEMU_VM_VMDESCRIPTION``: the JSON text, unparsed (``migtap.wire.vmdesc.parse_vmdesc``
    parses it, off the event loop if it is large: up to 64 MiB)."""

    offset: int
    json_bytes: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Unparsed:
    """Bytes from ``offset`` on that the parser could not frame (``length`` None: to the end)."""

    offset: int
    reason: str
    length: int | None = None


# -- multifd channels (migtap.wire.multifd) ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MultifdInit:
    offset: int  # absolute channel offset of the magic (always 0)
    version: int
    uuid: uuid.UUID  # source VM UUID; all zero without -uuid
    channel_id: int  # a single byte, so no endianness (docs/stream-format.md §5.1)


@dataclass(frozen=True, slots=True)
class MultifdPacket:
    offset: int  # absolute channel offset of the packet magic
    flags: int
    packet_num: int  # global sequence number across all channels
    pages_alloc: int  # sender's page_count (master SYNC packets: 0)
    normal_pages: int
    zero_pages: int  # 9.0+; 0 before
    next_packet_size: int  # as sent; stale in 7.2-8.1 empty packets
    ramblock: str  # may be stale (previous block) before 9.2
    payload_bytes: int  # bytes that follow the header (skipped)
    sync: bool  # MULTIFD_FLAG_SYNC: the sender's sync point (paired with EOS or MULTIFD_FLUSH)
    first_page: int | None = None  # offset in ramblock of the first normal page
    last_page: int | None = None  # offset in ramblock of the last normal page

    @property
    def compression(self) -> int:
        return self.flags & MULTIFD_FLAG_COMPRESSION_MASK


@dataclass(frozen=True, slots=True)
class MultifdDeviceState:
    offset: int  # absolute channel offset of the packet magic
    flags: int
    idstr: str
    instance_id: int
    payload_bytes: int  # next_packet_size: device state bytes that follow (skipped)


# -- the return path (migtap.wire.return_path) -----------------------------------------------------
@dataclass(frozen=True, slots=True)
class RpShut:
    offset: int  # absolute offset of the message type field
    value: int  # 0 = the destination finished fine; non-zero = it failed


@dataclass(frozen=True, slots=True)
class RpPong:
    offset: int
    value: int  # echo of the PING value


@dataclass(frozen=True, slots=True)
class RpReqPagesId:
    offset: int
    start: int  # byte offset inside the block
    length: int  # bytes requested
    ramblock: str


@dataclass(frozen=True, slots=True)
class RpReqPages:
    offset: int
    start: int
    length: int
    ramblock: str | None  # the block last named by a REQ_PAGES_ID (None if none came yet)


@dataclass(frozen=True, slots=True)
class RpRecvBitmap:
    offset: int  # of the message; emitted once the trailing bitmap size has been read
    ramblock: str
    bitmap_bytes: int  # size of the little-endian bitmap that follows (skipped)


@dataclass(frozen=True, slots=True)
class RpResumeAck:
    offset: int
    value: int  # MIGRATION_RESUME_ACK_VALUE


@dataclass(frozen=True, slots=True)
class RpSwitchoverAck:
    offset: int


MainEvent = (
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
MultifdEvent = MultifdInit | MultifdPacket | MultifdDeviceState
ReturnPathEvent = (
    RpShut | RpPong | RpReqPagesId | RpReqPages | RpRecvBitmap | RpResumeAck | RpSwitchoverAck
)
Event = MainEvent | MultifdEvent | ReturnPathEvent
