"""Sans-IO parser for one multifd channel (src->dst), ``docs/stream-format.md`` §5.

A channel is a 64-byte ``MultiFDInit_t`` followed by packets. A RAM packet is a fixed-length header
(``320 + 8 * page_count`` bytes, where ``page_count = MULTIFD_PACKET_SIZE // page_size``; both QEMUs
compute it locally, it is not on the wire) and then its payload; from 10.0 a packet whose flags have
``MULTIFD_FLAG_DEVICE_STATE`` has a 276-byte header instead. Payload bytes are counted and skipped,
never buffered; only headers are kept, in a bytearray capped at the largest header length.

Layout facts, all versions 7.2..master unless noted:

* the init message and every packet carry ``MULTIFD_MAGIC`` and ``MULTIFD_VERSION`` (1);
* ``zero_pages`` (offset 32) exists from 9.0; before it is the first unused word, always 0;
* payload of a RAM packet: ``normal_pages * page_size`` bytes uncompressed, ``next_packet_size``
  bytes compressed, and nothing when ``normal_pages == 0`` (7.2-8.1 leave a stale
  ``next_packet_size`` in empty packets, so it is never trusted for the uncompressed case);
* 7.2-8.2 SYNC packets may carry pages; 9.0+ SYNC packets never do (same rule covers both);
* ``ramblock`` and unused ``offset[]`` slots may be stale before 9.2: reported, never checked.
"""

from __future__ import annotations

import collections
import struct
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Final, assert_never

from typing_extensions import Buffer

from migtap.errors import StreamError, UnsupportedStream
from migtap.wire.constants import (
    MULTIFD_FLAG_COMPRESSION_MASK,
    MULTIFD_FLAG_DEVICE_STATE,
    MULTIFD_FLAG_NOCOMP,
    MULTIFD_FLAG_QATZIP,
    MULTIFD_FLAG_QPL,
    MULTIFD_FLAG_SYNC,
    MULTIFD_FLAG_UADK,
    MULTIFD_FLAG_ZLIB,
    MULTIFD_FLAG_ZSTD,
)
from migtap.wire.events import MultifdDeviceState, MultifdInit, MultifdPacket
from migtap.wire.framing import FramedParser

if TYPE_CHECKING:
    from migtap.wire.events import Event

__all__ = [
    "MIN_PAGE_SIZE",
    "MULTIFD_COMPRESSIONS",
    "MULTIFD_DEVICE_STATE_HDR_SIZE",
    "MULTIFD_FLAG_COMPRESSION_MASK",
    "MULTIFD_FLAG_DEVICE_STATE",
    "MULTIFD_FLAG_NOCOMP",
    "MULTIFD_FLAG_QATZIP",
    "MULTIFD_FLAG_QPL",
    "MULTIFD_FLAG_SYNC",
    "MULTIFD_FLAG_UADK",
    "MULTIFD_FLAG_ZLIB",
    "MULTIFD_FLAG_ZSTD",
    "MULTIFD_HDR_SIZE",
    "MULTIFD_IDSTR_SIZE",
    "MULTIFD_INIT_SIZE",
    "MULTIFD_KNOWN_FLAGS",
    "MULTIFD_MAGIC",
    "MULTIFD_PACKET_SIZE",
    "MULTIFD_RAM_HDR_FIXED",
    "MULTIFD_VERSION",
    "MultifdParser",
    "MultifdStats",
    "ResentPages",
]

MULTIFD_MAGIC: Final = 0x11223344
MULTIFD_VERSION: Final = 1
MULTIFD_PACKET_SIZE: Final = 512 * 1024

MULTIFD_KNOWN_FLAGS: Final = (
    MULTIFD_FLAG_SYNC | MULTIFD_FLAG_COMPRESSION_MASK | MULTIFD_FLAG_DEVICE_STATE
)
MULTIFD_COMPRESSIONS: Final = frozenset(
    {
        MULTIFD_FLAG_NOCOMP,
        MULTIFD_FLAG_ZLIB,
        MULTIFD_FLAG_ZSTD,
        MULTIFD_FLAG_QPL,
        MULTIFD_FLAG_UADK,
        MULTIFD_FLAG_QATZIP,
    }
)

MULTIFD_INIT_SIZE: Final = 64  # MultiFDInit_t
MULTIFD_HDR_SIZE: Final = 12  # MultiFDPacketHdr_t: magic, version, flags
MULTIFD_RAM_HDR_FIXED: Final = 320  # MultiFDPacket_t up to offset[]
MULTIFD_DEVICE_STATE_HDR_SIZE: Final = 276  # MultiFDPacketDeviceState_t
MULTIFD_IDSTR_SIZE: Final = 256  # ramblock / idstr fields, NUL-padded
MIN_PAGE_SIZE: Final = 512  # keeps the header buffer (320 + 8 * page_count) under 8.5 KiB

_INIT = struct.Struct(">II16sB")
_RAM = struct.Struct(">IIIIIIQI")  # magic version flags alloc normal next packet_num zero
_BE64 = struct.Struct(">Q")
_DEVICE_STATE_TAIL = struct.Struct(">II")  # instance_id, next_packet_size (at 268)


@dataclass(slots=True)
class MultifdStats:
    """Running totals, updated as bytes are fed; the live tap reads them without events."""

    packets: int = 0  # RAM packets, SYNC ones included
    sync_packets: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    device_state_packets: int = 0
    payload_bytes: int = 0  # payload bytes skipped so far (pages, compressed data, device state)
    bytes: int = 0  # every byte consumed, headers included


class ResentPages:
    """QEMU 7.2 multifd sometimes queues the last page of a full packet again, as the first page
    of the next packet it fills, and counts it once in ``ram.normal`` (``multifd_queue_page()``
    looks at the packet it just handed over, which the channel may have emptied already). Feed
    it every packet with pages, in any order close to the sending order; ``count`` is how many
    such repeats were seen.

    Packet numbers only roughly follow the sending order: a sync renumbers the packets that
    channels have not sent yet (real ``virsh migrate --parallel`` runs showed a repeat across a
    number that never appeared, and one in a packet numbered after the next block's). So a
    repeat is a packet whose first page is the last page of a full packet of the same block
    within ``GAP`` numbers of it; each packet's first page counts at most once, and so does
    each packet's last page.
    """

    __slots__ = ("_by_first", "_by_last", "_order", "_repeated_first", "_repeated_last", "count")

    WINDOW: ClassVar[int] = 1024  # channels interleave only within a few packets
    GAP: ClassVar[int] = 64  # how far apart in numbers a packet and its repeat may be

    def __init__(self) -> None:
        self.count = 0
        self._by_first: dict[tuple[str, int], int] = {}  # (block, first page) -> packet
        self._by_last: dict[tuple[str, int], int] = {}  # full packets: (block, last page)
        self._order: collections.deque[tuple[int, tuple[str, int], tuple[str, int] | None]] = (
            collections.deque()
        )
        self._repeated_first: set[int] = set()
        self._repeated_last: set[int] = set()

    def note(self, packet: MultifdPacket) -> None:
        first, last = packet.first_page, packet.last_page
        if first is None or last is None:
            return
        num, block = packet.packet_num, packet.ramblock
        first_key = (block, first)
        last_key = (block, last) if packet.normal_pages == packet.pages_alloc else None
        earlier = self._by_last.get(first_key)
        if earlier is not None and self._near(earlier, num) and earlier not in self._repeated_last:
            self._link(earlier, num)
        if last_key is not None:
            later = self._by_first.get(last_key)
            if later is not None and self._near(later, num) and later not in self._repeated_first:
                self._link(num, later)
        self._by_first[first_key] = num
        if last_key is not None:
            self._by_last[last_key] = num
        self._order.append((num, first_key, last_key))
        if len(self._order) > self.WINDOW:
            old, old_first, old_last = self._order.popleft()
            if self._by_first.get(old_first) == old:
                del self._by_first[old_first]
            if old_last is not None and self._by_last.get(old_last) == old:
                del self._by_last[old_last]
            self._repeated_first.discard(old)
            self._repeated_last.discard(old)

    def _near(self, other: int, num: int) -> bool:
        return other != num and abs(other - num) <= self.GAP

    def _link(self, full: int, repeat: int) -> None:
        """``repeat``'s first page is ``full``'s last page, sent again."""
        if repeat in self._repeated_first:
            return
        self._repeated_first.add(repeat)
        self._repeated_last.add(full)
        self.count += 1


class _State(Enum):
    INIT = "multifd init message"
    PACKET_HEADER = "multifd packet header"
    RAM_HEADER = "multifd RAM packet header"
    DEVICE_STATE_HEADER = "multifd device-state packet header"
    PAYLOAD = "multifd packet payload"
    EOF = "end of channel"
    ERROR = "error"


def be32(buf: Buffer, at: int = 0) -> int:
    return int.from_bytes(memoryview(buf)[at : at + 4], "big")


def _cstring(raw: bytes) -> str:
    """A NUL-padded fixed-size name field; never fails, whatever the bytes."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


class MultifdParser(FramedParser[_State]):
    """Parse one multifd channel: ``feed(data) -> events``, ``feed_eof() -> events``."""

    NAME = "multifd"

    def __init__(self, page_size: int = 4096) -> None:
        if (
            page_size < MIN_PAGE_SIZE
            or page_size & (page_size - 1)
            or page_size > MULTIFD_PACKET_SIZE
        ):
            raise ValueError(
                f"page_size must be a power of two from 512 bytes to 512 KiB, got {page_size}"
            )
        self.page_size = page_size
        self.page_count = MULTIFD_PACKET_SIZE // page_size
        self.ram_header_size = MULTIFD_RAM_HDR_FIXED + 8 * self.page_count
        self.stats = MultifdStats()
        super().__init__(_State.INIT, _State.EOF, _State.ERROR)
        self._remaining = 0  # payload bytes still to skip

    def _unfinished(self, state: _State) -> str | None:
        if (state is _State.PACKET_HEADER and not self._buf) or (
            state is _State.INIT and self._offset == 0
        ):
            return None
        if state is _State.PAYLOAD:
            what = f"{self._remaining} more payload bytes of the packet at {self._record_offset}"
        else:
            what = f"the rest of the {state.value} at {self._record_offset}"
        return f"multifd channel ended inside a record: expected {what}"

    def _consumed(self, n: int) -> None:
        self.stats.bytes += n

    def _error_at(self, message: str, at: int, cls: type[StreamError] = StreamError) -> StreamError:
        return cls(message, offset=at, state=self._state.value)

    def _step(self, view: memoryview, pos: int, events: list[Event]) -> int:
        match self._state:
            case _State.INIT:
                return self._read_init(view, pos, events)
            case _State.PACKET_HEADER:
                return self._read_packet_header(view, pos)
            case _State.RAM_HEADER:
                return self._read_ram_header(view, pos, events)
            case _State.DEVICE_STATE_HEADER:
                return self._read_device_state_header(view, pos, events)
            case _State.PAYLOAD:
                return self._skip_payload(view, pos)
            case _State.EOF | _State.ERROR:  # pragma: no cover - feed() checks first
                raise self._error_at("multifd parser is closed", self._offset)
            case _:  # pragma: no cover
                assert_never(self._state)

    def _check_magic_version(self, record: str) -> None:
        magic, version = be32(self._buf, 0), be32(self._buf, 4)
        if magic != MULTIFD_MAGIC:
            raise self._error_at(
                f"bad magic in {record}: expected {MULTIFD_MAGIC:#010x}, got {magic:#010x}",
                self._record_offset,
            )
        if version != MULTIFD_VERSION:
            raise self._error_at(
                f"unsupported {record} version {version}, expected {MULTIFD_VERSION}",
                self._record_offset + 4,
                UnsupportedStream,
            )

    # -- one method per state --------------------------------------------------------------------

    def _read_init(self, view: memoryview, pos: int, events: list[Event]) -> int:
        pos = self._fill(view, pos, MULTIFD_INIT_SIZE)
        if len(self._buf) < MULTIFD_INIT_SIZE:
            return pos
        self._check_magic_version("multifd init message")
        _, version, raw_uuid, channel_id = _INIT.unpack_from(self._buf)
        events.append(
            MultifdInit(self._record_offset, version, uuid.UUID(bytes=raw_uuid), channel_id)
        )
        self._next_record()
        return pos

    def _next_record(self) -> None:
        del self._buf[:]
        self._record_offset = self._offset
        self._state = _State.PACKET_HEADER

    def _read_packet_header(self, view: memoryview, pos: int) -> int:
        pos = self._fill(view, pos, MULTIFD_HDR_SIZE)
        if len(self._buf) < MULTIFD_HDR_SIZE:
            return pos
        self._check_magic_version("multifd packet")
        flags = be32(self._buf, 8)
        if flags & ~MULTIFD_KNOWN_FLAGS:
            raise self._error_at(
                f"multifd packet has unknown flags {flags & ~MULTIFD_KNOWN_FLAGS:#x} "
                f"(flags {flags:#x}, known {MULTIFD_KNOWN_FLAGS:#x})",
                self._record_offset + 8,
                UnsupportedStream,
            )
        compression = flags & MULTIFD_FLAG_COMPRESSION_MASK
        if compression not in MULTIFD_COMPRESSIONS:
            raise self._error_at(
                f"multifd packet has unknown compression bits {compression:#x} (flags {flags:#x})",
                self._record_offset + 8,
                UnsupportedStream,
            )
        if flags & MULTIFD_FLAG_DEVICE_STATE:
            self._state = _State.DEVICE_STATE_HEADER
        else:
            self._state = _State.RAM_HEADER
        return pos

    def _read_ram_header(self, view: memoryview, pos: int, events: list[Event]) -> int:
        pos = self._fill(view, pos, self.ram_header_size)
        if len(self._buf) < self.ram_header_size:
            return pos
        _, _, flags, alloc, normal, next_size, packet_num, zero = _RAM.unpack_from(self._buf)
        at = self._record_offset
        if alloc > self.page_count:
            raise self._error_at(
                f"multifd packet claims {alloc} allocated pages, at most {self.page_count} "
                f"fit a packet with {self.page_size}-byte pages (is page_size right?)",
                at + 12,
            )
        if normal > self.page_count:
            raise self._error_at(
                f"multifd packet has {normal} normal pages, at most {self.page_count} expected",
                at + 16,
            )
        if zero > self.page_count - normal:
            raise self._error_at(
                f"multifd packet has {zero} zero pages after {normal} normal ones, "
                f"at most {self.page_count - normal} expected",
                at + 32,
            )
        ramblock = _cstring(bytes(self._buf[64:MULTIFD_RAM_HDR_FIXED]))
        if normal == 0:
            payload = 0
        elif flags & MULTIFD_FLAG_COMPRESSION_MASK == MULTIFD_FLAG_NOCOMP:
            payload = normal * self.page_size
        else:
            payload = next_size
        stats = self.stats
        stats.packets += 1
        sync = bool(flags & MULTIFD_FLAG_SYNC)
        stats.sync_packets += sync
        stats.normal_pages += normal
        stats.zero_pages += zero
        # First and last normal page offsets: enough to spot a page sent twice in a row.
        first_page = last_page = None
        if normal:
            first_page = _BE64.unpack_from(self._buf, MULTIFD_RAM_HDR_FIXED)[0]
            last_page = _BE64.unpack_from(self._buf, MULTIFD_RAM_HDR_FIXED + 8 * (normal - 1))[0]
        events.append(
            MultifdPacket(
                at,
                flags,
                packet_num,
                alloc,
                normal,
                zero,
                next_size,
                ramblock,
                payload,
                sync,
                first_page,
                last_page,
            )
        )
        self._start_payload(payload)
        return pos

    def _read_device_state_header(self, view: memoryview, pos: int, events: list[Event]) -> int:
        pos = self._fill(view, pos, MULTIFD_DEVICE_STATE_HDR_SIZE)
        if len(self._buf) < MULTIFD_DEVICE_STATE_HDR_SIZE:
            return pos
        flags = be32(self._buf, 8)
        if flags & MULTIFD_FLAG_COMPRESSION_MASK != MULTIFD_FLAG_NOCOMP:
            raise self._error_at(
                f"multifd device-state packet has compression flags {flags:#x}, expected none",
                self._record_offset + 8,
                UnsupportedStream,
            )
        idstr_end = MULTIFD_HDR_SIZE + MULTIFD_IDSTR_SIZE
        idstr = _cstring(bytes(self._buf[MULTIFD_HDR_SIZE:idstr_end]))
        instance_id, size = _DEVICE_STATE_TAIL.unpack_from(self._buf, idstr_end)
        self.stats.device_state_packets += 1
        events.append(MultifdDeviceState(self._record_offset, flags, idstr, instance_id, size))
        self._start_payload(size)
        return pos

    def _start_payload(self, size: int) -> None:
        if size:
            del self._buf[:]
            self._remaining = size
            self._state = _State.PAYLOAD  # _record_offset stays at the packet, for messages
        else:
            self._next_record()

    def _skip_payload(self, view: memoryview, pos: int) -> int:
        take = min(self._remaining, len(view) - pos)
        self._remaining -= take
        self._offset += take
        self.stats.bytes += take
        self.stats.payload_bytes += take
        if not self._remaining:
            self._record_offset = self._offset
            self._state = _State.PACKET_HEADER
        return pos + take
