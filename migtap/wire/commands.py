"""``QEMU_VM_COMMAND`` records of the main channel, and the PACKAGED blobs they open.

A command is ``0x08``, a be16 command number, a be16 payload length and the payload
(``qemu_savevm_command_send``); the loader checks the length against ``mig_cmd_args``
(``migration/savevm.c``). ``MIG_CMD_PACKAGED`` wraps the next be32-length bytes: a nested stream
fragment that the main parser reads like the top level, within the blob's bounds (``Blobs``).
See ``docs/stream-format.md`` §2.8 and §7.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

from migtap.errors import StreamError, UnsupportedStream
from migtap.wire.constants import MAX_DISCARDS_PER_COMMAND, MIG_CMD_LEN, MIG_CMD_MAX, MigCmd
from migtap.wire.events import (
    Command,
    Packaged,
    Ping,
    PostcopyAdvise,
    PostcopyRamDiscard,
    RecvBitmapRequest,
)

if TYPE_CHECKING:
    from migtap.wire.buffer import Buffer
    from migtap.wire.events import Event

#: Most nested PACKAGED blobs.
MAX_PACKAGED_DEPTH: Final = 4

_STATE: Final = "command"


def _error(message: str, offset: int) -> StreamError:
    return StreamError(message, offset=offset, state=_STATE)


def ascii_field(raw: bytes, what: str, offset: int, state: str) -> str:
    """``raw`` as ASCII text, or a ``StreamError`` naming ``what``."""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise StreamError(f"{what} {raw[:40]!r} is not ASCII", offset=offset, state=state) from exc


def read_command(b: Buffer, offset: int) -> tuple[MigCmd, bytes]:
    """Read a command record after its type byte (``offset`` is the type byte's): the command
    and its payload. Raises ``NeedData`` when short (the caller rolls back)."""
    num = b.be16()
    length = b.be16()
    if num == 0:
        raise _error("MIG_CMD_INVALID (0)", offset)
    if num >= MIG_CMD_MAX:
        raise UnsupportedStream(
            f"unknown command {num} (length {length})", offset=offset, state=_STATE
        )
    cmd = MigCmd(num)
    want = MIG_CMD_LEN[cmd]
    if want is not None and length != want:
        raise _error(f"{cmd.name} with payload length {length}, expected {want}", offset)
    return cmd, b.take(length)


def decode_command(cmd: MigCmd, payload: bytes, offset: int, end: int) -> Event:
    """The event of a command whose record starts at ``offset`` and ends at ``end``."""
    if cmd == MigCmd.MIG_CMD_PING:
        return Ping(offset, int.from_bytes(payload, "big"))
    if cmd == MigCmd.MIG_CMD_POSTCOPY_ADVISE:
        return _decode_advise(payload, offset)
    if cmd == MigCmd.MIG_CMD_POSTCOPY_RAM_DISCARD:
        return _decode_discard(payload, offset)
    if cmd == MigCmd.MIG_CMD_RECV_BITMAP:
        if not payload or payload[0] != len(payload) - 1:
            raise _error("RECV_BITMAP payload is not one counted string", offset)
        return RecvBitmapRequest(offset, ascii_field(payload[1:], "block", offset + 5, _STATE))
    if cmd == MigCmd.MIG_CMD_PACKAGED:
        return Packaged(offset, int.from_bytes(payload, "big"), end)
    return Command(offset, cmd)


def _decode_advise(payload: bytes, offset: int) -> PostcopyAdvise:
    if len(payload) == 0:
        return PostcopyAdvise(offset, None, None)
    if len(payload) != 16:
        raise _error(f"POSTCOPY_ADVISE payload of {len(payload)} bytes, expected 0 or 16", offset)
    summary, tps = struct.unpack(">QQ", payload)
    if tps < 1024 or tps & (tps - 1):
        raise _error(f"POSTCOPY_ADVISE target page size {tps} is invalid", offset)
    return PostcopyAdvise(offset, summary, tps)


def _decode_discard(payload: bytes, offset: int) -> PostcopyRamDiscard:
    if len(payload) < 3 or payload[0] != 0:
        raise _error("POSTCOPY_RAM_DISCARD: short payload or version != 0", offset)
    n = payload[1]
    rest = payload[2 + n :]
    if len(payload) < 3 + n or rest[0] != 0 or (len(rest) - 1) % 16:
        raise _error("POSTCOPY_RAM_DISCARD: malformed block name or range list", offset)
    count = (len(rest) - 1) // 16
    if count > MAX_DISCARDS_PER_COMMAND:
        raise _error(f"POSTCOPY_RAM_DISCARD with {count} ranges (at most 12)", offset)
    ranges = tuple(struct.unpack_from(">QQ", rest, 1 + 16 * i) for i in range(count))
    block = ascii_field(payload[2 : 2 + n], "block", offset + 7, _STATE)
    return PostcopyRamDiscard(offset, block, ranges)


class Blobs:
    """The open PACKAGED blobs, innermost last, as absolute end offsets; they bound the reads
    of the ``Buffer`` (``set_limit``) so that no record runs past its blob."""

    __slots__ = ("ends",)

    def __init__(self) -> None:
        self.ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.ends)

    def open(self, b: Buffer, length: int, offset: int) -> None:
        """A blob of ``length`` bytes starts at ``b.offset`` (its command is at ``offset``)."""
        end = b.offset + length
        if len(self.ends) >= MAX_PACKAGED_DEPTH:
            raise _error("PACKAGED blobs nested too deep", offset)
        if self.ends and end > self.ends[-1]:
            raise _error("nested PACKAGED blob runs past its parent", offset)
        self.ends.append(end)
        b.set_limit(end)

    def close_ended(self, b: Buffer) -> bool:
        """Close the innermost blob if ``b`` has reached its end; True if it did."""
        if self.ends and b.offset >= self.ends[-1]:
            self.ends.pop()
            b.set_limit(self.ends[-1] if self.ends else None)
            return True
        return False
