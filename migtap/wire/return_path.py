"""Sans-IO parser for the return path (dst->src bytes on the main socket), see
``docs/stream-format.md`` §6 and QEMU's ``migration/migration.c``.

Each message is a be16 type, a be16 payload length and the payload (at most 512 bytes, the source's
limit in ``source_return_path_thread``). One message breaks that framing: ``RECV_BITMAP`` (postcopy
recovery) is followed, outside its length, by a be64 bitmap size, that many bitmap bytes and a be64
end mark (``ramblock_recv_bitmap_send``). The bitmap is counted and skipped, never buffered.

Lengths are checked as the source checks them (``rp_cmd_args``): a fixed-length type with another
length, type 0 (INVALID), or a payload over 512 bytes is a :class:`StreamError`; a type above the
known ones (8+, none in 7.2..master) is an :class:`UnsupportedStream`.
"""

from __future__ import annotations

from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Final, assert_never

from typing_extensions import Buffer

from migtap.errors import StreamError, UnsupportedStream
from migtap.wire.events import (
    RpPong,
    RpRecvBitmap,
    RpReqPages,
    RpReqPagesId,
    RpResumeAck,
    RpShut,
    RpSwitchoverAck,
)
from migtap.wire.framing import FramedParser

if TYPE_CHECKING:
    from migtap.wire.events import Event

__all__ = [
    "MIGRATION_RESUME_ACK_VALUE",
    "MIG_RP_HEADER_SIZE",
    "MIG_RP_MAX_PAYLOAD",
    "RAMBLOCK_RECV_BITMAP_ENDING",
    "RECV_BITMAP_SIZE_FIELD",
    "RP_MSG_LENGTHS",
    "MigRpMessageType",
    "ReturnPathParser",
]

MIG_RP_HEADER_SIZE: Final = 4
MIG_RP_MAX_PAYLOAD: Final = 512  # max_len in source_return_path_thread
MIGRATION_RESUME_ACK_VALUE: Final = 1
RAMBLOCK_RECV_BITMAP_ENDING: Final = 0x0123456789ABCDEF
RECV_BITMAP_SIZE_FIELD: Final = 8  # be64 size before the bitmap, be64 end mark after it


class MigRpMessageType(IntEnum):
    MIG_RP_MSG_INVALID = 0
    MIG_RP_MSG_SHUT = 1
    MIG_RP_MSG_PONG = 2
    MIG_RP_MSG_REQ_PAGES_ID = 3
    MIG_RP_MSG_REQ_PAGES = 4
    MIG_RP_MSG_RECV_BITMAP = 5
    MIG_RP_MSG_RESUME_ACK = 6
    MIG_RP_MSG_SWITCHOVER_ACK = 7  # 8.1+


# rp_cmd_args: fixed payload lengths; None = variable (checked by the decoder).
RP_MSG_LENGTHS: Final[dict[MigRpMessageType, int | None]] = {
    MigRpMessageType.MIG_RP_MSG_SHUT: 4,
    MigRpMessageType.MIG_RP_MSG_PONG: 4,
    MigRpMessageType.MIG_RP_MSG_REQ_PAGES_ID: None,
    MigRpMessageType.MIG_RP_MSG_REQ_PAGES: 12,
    MigRpMessageType.MIG_RP_MSG_RECV_BITMAP: None,
    MigRpMessageType.MIG_RP_MSG_RESUME_ACK: 4,
    MigRpMessageType.MIG_RP_MSG_SWITCHOVER_ACK: 0,
}

_REQ_SIZE: Final = 12  # be64 start, be32 length


class _State(Enum):
    HEADER = "return-path message header"
    PAYLOAD = "return-path message payload"
    BITMAP_SIZE = "RECV_BITMAP bitmap size"
    BITMAP = "RECV_BITMAP bitmap"
    BITMAP_END = "RECV_BITMAP end mark"
    EOF = "end of return path"
    ERROR = "error"


def be16(buf: Buffer, at: int = 0) -> int:
    return int.from_bytes(memoryview(buf)[at : at + 2], "big")


def be32(buf: Buffer, at: int = 0) -> int:
    return int.from_bytes(memoryview(buf)[at : at + 4], "big")


def be64(buf: Buffer, at: int = 0) -> int:
    return int.from_bytes(memoryview(buf)[at : at + 8], "big")


def _cstr(payload: bytes, at: int) -> tuple[str, int] | None:
    """A counted string at ``at``: (text, end) or None when the payload is too short."""
    if at >= len(payload):
        return None
    end = at + 1 + payload[at]
    if end > len(payload):
        return None
    return payload[at + 1 : end].decode("utf-8", "backslashreplace"), end


class ReturnPathParser(FramedParser[_State]):
    """Parse dst->src return-path bytes: ``feed(data) -> events``, ``feed_eof() -> events``."""

    NAME = "return-path"

    def __init__(self, page_size: int = 4096) -> None:
        super().__init__(_State.HEADER, _State.EOF, _State.ERROR)
        self.page_size = page_size  # the contract's; page requests are in bytes
        self._msg_type = 0
        self._msg_len = 0
        self._remaining = 0  # bitmap bytes still to skip
        self._bitmap_block = ""
        self._last_block: str | None = None
        self.messages = 0
        self.bitmap_bytes = 0

    def _unfinished(self, state: _State) -> str | None:
        if state is _State.HEADER and not self._buf:
            return None
        if state is _State.BITMAP:
            what = f"{self._remaining} more bitmap bytes"
        else:
            what = f"the rest of the {state.value}"
        return f"return path ended inside the message at {self._record_offset}: expected {what}"

    def _error_at(
        self, message: str, cls: type[StreamError] = StreamError, at: int | None = None
    ) -> StreamError:
        where = self._record_offset if at is None else at
        return cls(message, offset=where, state=self._state.value)

    def _step(self, view: memoryview, pos: int, events: list[Event]) -> int:
        match self._state:
            case _State.HEADER:
                return self._read_header(view, pos, events)
            case _State.PAYLOAD:
                return self._read_payload(view, pos, events)
            case _State.BITMAP_SIZE:
                return self._read_bitmap_size(view, pos, events)
            case _State.BITMAP:
                return self._skip_bitmap(view, pos)
            case _State.BITMAP_END:
                return self._read_bitmap_end(view, pos)
            case _State.EOF | _State.ERROR:  # pragma: no cover - feed() checks first
                raise self._error_at("return-path parser is closed")
            case _:  # pragma: no cover
                assert_never(self._state)

    def _done(self) -> None:
        del self._buf[:]
        self._record_offset = self._offset
        self._state = _State.HEADER
        self.messages += 1

    # -- one method per state --------------------------------------------------------------------

    def _read_header(self, view: memoryview, pos: int, events: list[Event]) -> int:
        pos = self._fill(view, pos, MIG_RP_HEADER_SIZE)
        if len(self._buf) < MIG_RP_HEADER_SIZE:
            return pos
        msg_type, length = be16(self._buf), be16(self._buf, 2)
        if msg_type == MigRpMessageType.MIG_RP_MSG_INVALID:
            raise self._error_at("return-path message of type 0 (INVALID), expected 1..7")
        if msg_type > max(MigRpMessageType):
            raise self._error_at(
                f"return-path message of unknown type {msg_type} (length {length}), "
                f"expected 1..{max(MigRpMessageType):d}",
                UnsupportedStream,
            )
        kind = MigRpMessageType(msg_type)
        if length > MIG_RP_MAX_PAYLOAD:
            raise self._error_at(
                f"return-path {kind.name} has length {length}, at most {MIG_RP_MAX_PAYLOAD} allowed"
            )
        expected = RP_MSG_LENGTHS[kind]
        if expected is not None and length != expected:
            raise self._error_at(
                f"return-path {kind.name} has length {length}, expected {expected}"
            )
        del self._buf[:]
        self._msg_type, self._msg_len = msg_type, length
        self._state = _State.PAYLOAD
        if length == 0:
            self._decode(b"", events)
        return pos

    def _read_payload(self, view: memoryview, pos: int, events: list[Event]) -> int:
        pos = self._fill(view, pos, self._msg_len)
        if len(self._buf) == self._msg_len:
            self._decode(bytes(self._buf), events)
        return pos

    def _decode(self, payload: bytes, events: list[Event]) -> None:
        at = self._record_offset
        kind = MigRpMessageType(self._msg_type)
        match kind:
            case MigRpMessageType.MIG_RP_MSG_SHUT:
                events.append(RpShut(at, be32(payload)))
            case MigRpMessageType.MIG_RP_MSG_PONG:
                events.append(RpPong(at, be32(payload)))
            case MigRpMessageType.MIG_RP_MSG_REQ_PAGES:
                events.append(RpReqPages(at, be64(payload), be32(payload, 8), self._last_block))
            case MigRpMessageType.MIG_RP_MSG_REQ_PAGES_ID:
                events.append(self._req_pages_id(payload))
            case MigRpMessageType.MIG_RP_MSG_RECV_BITMAP:
                self._start_bitmap(payload)
                return
            case MigRpMessageType.MIG_RP_MSG_RESUME_ACK:
                value = be32(payload)
                if value != MIGRATION_RESUME_ACK_VALUE:
                    raise self._error_at(
                        f"return-path RESUME_ACK carries {value}, "
                        f"expected {MIGRATION_RESUME_ACK_VALUE}"
                    )
                events.append(RpResumeAck(at, value))
            case MigRpMessageType.MIG_RP_MSG_SWITCHOVER_ACK:
                events.append(RpSwitchoverAck(at))
            case MigRpMessageType.MIG_RP_MSG_INVALID:  # pragma: no cover - header rejects it
                raise self._error_at("return-path message of type 0 (INVALID)")
            case _:  # pragma: no cover
                assert_never(kind)
        self._done()

    def _req_pages_id(self, payload: bytes) -> RpReqPagesId:
        name = _cstr(payload, _REQ_SIZE)
        if name is None or name[1] != len(payload):
            raise self._error_at(
                f"return-path REQ_PAGES_ID has length {len(payload)}, expected 12 bytes "
                "then a counted block name filling the rest"
            )
        self._last_block = name[0]
        return RpReqPagesId(self._record_offset, be64(payload), be32(payload, 8), name[0])

    def _start_bitmap(self, payload: bytes) -> None:
        name = _cstr(payload, 0)
        if name is None or name[1] != len(payload):
            raise self._error_at(
                f"return-path RECV_BITMAP has length {len(payload)}, expected "
                "a counted block name filling it"
            )
        self._bitmap_block = name[0]
        del self._buf[:]
        self._state = _State.BITMAP_SIZE

    def _read_bitmap_size(self, view: memoryview, pos: int, events: list[Event]) -> int:
        pos = self._fill(view, pos, RECV_BITMAP_SIZE_FIELD)
        if len(self._buf) < RECV_BITMAP_SIZE_FIELD:
            return pos
        size = be64(self._buf)
        if size % 8:
            raise self._error_at(
                f"RECV_BITMAP for {self._bitmap_block!r} announces {size} bitmap bytes, "
                "expected a multiple of 8"
            )
        events.append(RpRecvBitmap(self._record_offset, self._bitmap_block, size))
        del self._buf[:]
        self._remaining = size
        self._state = _State.BITMAP if size else _State.BITMAP_END
        return pos

    def _skip_bitmap(self, view: memoryview, pos: int) -> int:
        take = min(self._remaining, len(view) - pos)
        self._remaining -= take
        self._offset += take
        self.bitmap_bytes += take
        if not self._remaining:
            self._state = _State.BITMAP_END
        return pos + take

    def _read_bitmap_end(self, view: memoryview, pos: int) -> int:
        pos = self._fill(view, pos, RECV_BITMAP_SIZE_FIELD)
        if len(self._buf) < RECV_BITMAP_SIZE_FIELD:
            return pos
        mark = be64(self._buf)
        if mark != RAMBLOCK_RECV_BITMAP_ENDING:
            raise self._error_at(
                f"RECV_BITMAP for {self._bitmap_block!r} (message at {self._record_offset}) "
                f"ends with {mark:#018x}, expected end mark {RAMBLOCK_RECV_BITMAP_ENDING:#018x}",
                at=self._offset - RECV_BITMAP_SIZE_FIELD,
            )
        self._done()
        return pos
