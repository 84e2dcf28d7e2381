"""Test-only encoders: multifd channels (7.2, 9.0+, 10.0 device state) and return-path messages."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from migtap.wire.multifd import (
    MULTIFD_FLAG_DEVICE_STATE,
    MULTIFD_FLAG_SYNC,
    MULTIFD_MAGIC,
    MULTIFD_PACKET_SIZE,
    MULTIFD_VERSION,
)
from migtap.wire.return_path import RAMBLOCK_RECV_BITMAP_ENDING, MigRpMessageType

if TYPE_CHECKING:
    from collections.abc import Iterable


def mfd_init(channel_id: int = 0, uuid: bytes = bytes(16), version: int = MULTIFD_VERSION) -> bytes:
    head = struct.pack(">II16sB", MULTIFD_MAGIC, version, uuid, channel_id)
    return head + bytes(64 - len(head))


def mfd_packet(
    *,
    flags: int = 0,
    normal: int = 0,
    zero: int = 0,
    packet_num: int = 0,
    ramblock: str = "pc.ram",
    page_size: int = 4096,
    pages_alloc: int | None = None,
    next_packet_size: int | None = None,
    payload: bytes | None = None,
    offsets: Iterable[int] | None = None,
) -> bytes:
    """A RAM packet: header (fixed length for ``page_size``) plus payload.

    Defaults follow NOCOMP: payload = ``normal * page_size`` bytes of a page-number pattern.
    """
    page_count = MULTIFD_PACKET_SIZE // page_size
    alloc = page_count if pages_alloc is None else pages_alloc
    if payload is None:
        payload = b"".join(bytes([i & 0xFF]) * page_size for i in range(normal))
    size = len(payload) if next_packet_size is None else next_packet_size
    head = struct.pack(
        ">IIIIIIQI", MULTIFD_MAGIC, MULTIFD_VERSION, flags, alloc, normal, size, packet_num, zero
    )
    head += bytes(32 - 4) + ramblock.encode().ljust(256, b"\0")
    offs = list(offsets) if offsets is not None else [i * page_size for i in range(normal + zero)]
    table = b"".join(struct.pack(">Q", o) for o in offs).ljust(8 * page_count, b"\0")
    return head + table + payload


def mfd_sync(packet_num: int = 0, page_size: int = 4096, **kw: Any) -> bytes:
    return mfd_packet(flags=MULTIFD_FLAG_SYNC, packet_num=packet_num, page_size=page_size, **kw)


def mfd_device_state(
    idstr: str = "0000:00:02.0/vfio", instance_id: int = 0, data: bytes = b"", flags: int = 0
) -> bytes:
    head = struct.pack(">III", MULTIFD_MAGIC, MULTIFD_VERSION, flags | MULTIFD_FLAG_DEVICE_STATE)
    head += idstr.encode().ljust(256, b"\0") + struct.pack(">II", instance_id, len(data))
    return head + data


def rp(msg_type: int, payload: bytes = b"") -> bytes:
    return struct.pack(">HH", msg_type, len(payload)) + payload


def rp_shut(value: int = 0) -> bytes:
    return rp(MigRpMessageType.MIG_RP_MSG_SHUT, struct.pack(">I", value))


def rp_pong(value: int) -> bytes:
    return rp(MigRpMessageType.MIG_RP_MSG_PONG, struct.pack(">I", value))


def rp_req_pages(start: int, length: int = 4096) -> bytes:
    return rp(MigRpMessageType.MIG_RP_MSG_REQ_PAGES, struct.pack(">QI", start, length))


def rp_req_pages_id(start: int, length: int, block: str) -> bytes:
    name = block.encode()
    payload = struct.pack(">QIB", start, length, len(name)) + name
    return rp(MigRpMessageType.MIG_RP_MSG_REQ_PAGES_ID, payload)


def rp_recv_bitmap(block: str, bitmap: bytes, end: int = RAMBLOCK_RECV_BITMAP_ENDING) -> bytes:
    name = block.encode()
    msg = rp(MigRpMessageType.MIG_RP_MSG_RECV_BITMAP, bytes([len(name)]) + name)
    return msg + struct.pack(">Q", len(bitmap)) + bitmap + struct.pack(">Q", end)


def rp_resume_ack(value: int = 1) -> bytes:
    return rp(MigRpMessageType.MIG_RP_MSG_RESUME_ACK, struct.pack(">I", value))


def rp_switchover_ack() -> bytes:
    return rp(MigRpMessageType.MIG_RP_MSG_SWITCHOVER_ACK)
