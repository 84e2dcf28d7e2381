"""Test-only encoder of QEMU migration main-channel streams (the parser's mirror image).

Each function returns the bytes of one record or record part, laid out as in
``docs/stream-format.md`` §2, §3 and §7. ``sample_stream()`` puts them together.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from migtap.wire.constants import (
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    MigCmd,
    SectionType,
)

PAGE = 4096


def u8(v: int) -> bytes:
    return struct.pack(">B", v)


def be16(v: int) -> bytes:
    return struct.pack(">H", v)


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def cstr(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return u8(len(raw)) + raw


def header() -> bytes:
    return be32(QEMU_VM_FILE_MAGIC) + be32(QEMU_VM_FILE_VERSION)


def configuration(
    machine: str = "pc-i440fx-7.2",
    *,
    page_bits: int | None = None,
    caps: list[str] | None = None,
    uuid: bytes | None = None,
) -> bytes:
    out = u8(SectionType.QEMU_VM_CONFIGURATION) + be32(len(machine)) + machine.encode()
    if page_bits is not None:
        out += u8(5) + cstr("configuration/target-page-bits") + be32(1) + be32(page_bits)
    if caps is not None:
        out += u8(5) + cstr("configuration/capabilities") + be32(1) + be32(len(caps))
        out += b"".join(cstr(c) for c in caps)
    if uuid is not None:
        out += u8(5) + cstr("configuration/uuid") + be32(1) + uuid
    return out


def full_header(
    kind: SectionType, sid: int, idstr: str | bytes, instance_id: int = 0, version_id: int = 1
) -> bytes:
    return u8(kind) + be32(sid) + cstr(idstr) + be32(instance_id) + be32(version_id)


def short_header(kind: SectionType, sid: int) -> bytes:
    return u8(kind) + be32(sid)


def footer(sid: int) -> bytes:
    return u8(SectionType.QEMU_VM_SECTION_FOOTER) + be32(sid)


# -- RAM records ------------------------------------------------------------------------------
def _page_header(flag: int, offset: int, block: str | None) -> bytes:
    if block is None:
        return be64(offset | flag | RAM_SAVE_FLAG_CONTINUE)
    return be64(offset | flag) + cstr(block)


def mem_size(blocks: list[tuple[str, int]], *, page_sizes: dict[str, int] | None = None) -> bytes:
    total = sum(length for _, length in blocks)
    out = be64(total | RAM_SAVE_FLAG_MEM_SIZE)
    for name, length in blocks:
        out += cstr(name) + be64(length)
        if page_sizes and name in page_sizes:
            out += be64(page_sizes[name])
    return out


def page(
    offset: int, block: str | None = None, data: bytes | None = None, size: int = PAGE
) -> bytes:
    body = data if data is not None else bytes((offset // size + i) % 251 for i in range(size))
    assert len(body) == size
    return _page_header(RAM_SAVE_FLAG_PAGE, offset, block) + body


def zero(offset: int, block: str | None = None) -> bytes:
    return _page_header(RAM_SAVE_FLAG_ZERO, offset, block) + b"\x00"


def xbzrle(offset: int, block: str | None = None, delta: bytes = b"\x01\x02ab") -> bytes:
    return _page_header(RAM_SAVE_FLAG_XBZRLE, offset, block) + b"\x01" + be16(len(delta)) + delta


def compressed(
    offset: int, block: str | None = None, blob: bytes = b"\x78\x01" + b"z" * 30
) -> bytes:
    return _page_header(RAM_SAVE_FLAG_COMPRESS_PAGE, offset, block) + be32(len(blob)) + blob


def eos() -> bytes:
    return be64(RAM_SAVE_FLAG_EOS)


def multifd_flush() -> bytes:
    return be64(RAM_SAVE_FLAG_MULTIFD_FLUSH)


def ram_start(
    sid: int, blocks: list[tuple[str, int]], *, footers: bool = True, extra: bytes = b""
) -> bytes:
    out = full_header(SectionType.QEMU_VM_SECTION_START, sid, "ram", 0, 4) + mem_size(blocks)
    out += extra + eos()
    return out + (footer(sid) if footers else b"")


def ram_section(
    kind: SectionType, sid: int, records: list[bytes], *, footers: bool = True
) -> bytes:
    out = short_header(kind, sid) + b"".join(records) + eos()
    return out + (footer(sid) if footers else b"")


def device(
    sid: int, idstr: str | bytes, payload: bytes, instance_id: int = 0, version_id: int = 1
) -> bytes:
    hdr = full_header(SectionType.QEMU_VM_SECTION_FULL, sid, idstr, instance_id, version_id)
    return hdr + payload + footer(sid)


# -- commands, end ------------------------------------------------------------------------------
def command(cmd: MigCmd, payload: bytes = b"") -> bytes:
    return u8(SectionType.QEMU_VM_COMMAND) + be16(cmd) + be16(len(payload)) + payload


def ping(value: int) -> bytes:
    return command(MigCmd.MIG_CMD_PING, be32(value))


def advise(summary: int = PAGE, target: int = PAGE) -> bytes:
    return command(MigCmd.MIG_CMD_POSTCOPY_ADVISE, be64(summary) + be64(target))


def discard(block: str, ranges: list[tuple[int, int]]) -> bytes:
    payload = u8(0) + cstr(block) + u8(0) + b"".join(be64(a) + be64(n) for a, n in ranges)
    return command(MigCmd.MIG_CMD_POSTCOPY_RAM_DISCARD, payload)


def packaged(blob: bytes) -> bytes:
    return command(MigCmd.MIG_CMD_PACKAGED, be32(len(blob))) + blob


def eof() -> bytes:
    return u8(SectionType.QEMU_VM_EOF)


def vmdesc(desc: object) -> bytes:
    text = desc if isinstance(desc, bytes) else json.dumps(desc).encode()
    return u8(SectionType.QEMU_VM_VMDESCRIPTION) + be32(len(text)) + text


# -- a canonical sample --------------------------------------------------------------------------
@dataclass
class Sample:
    data: bytes
    normal: int
    zero: int
    xbzrle: int
    compressed: int
    rounds: int
    devices: list[tuple[str, int]] = field(default_factory=list)  # (idstr, instance_id)


LONG_IDSTR = "0000:00:02.0/" + "x" * 130  # counted-string length >= 128 (signed-read trap)
BIG_INSTANCE = 2**31 + 5  # instance_id >= 2**31 (signed-read trap)
RAM_ID = 2
BLOCKS = [("pc.ram", 16 * PAGE), ("pc.bios", 4 * PAGE)]


def sample_stream() -> Sample:
    """Header, config, commands, RAM START/PART/END over two rounds with every page kind,
    FULL device sections (with a fake footer inside one payload), a PACKAGED blob, EOF, vmdesc."""
    parts = [header(), configuration(), command(MigCmd.MIG_CMD_OPEN_RETURN_PATH), ping(1)]
    parts.append(ram_start(RAM_ID, BLOCKS))
    # round 1: pc.ram pages 0..7, then pc.bios 0..1 (CONTINUE across the section boundary)
    part1 = [page(0, "pc.ram"), zero(PAGE), zero(2 * PAGE), page(3 * PAGE)]
    part2 = [zero(4 * PAGE), page(5 * PAGE), zero(6 * PAGE), compressed(7 * PAGE)]
    part2 += [zero(0, "pc.bios"), page(PAGE)]
    # round 2: a multifd flush marks the wrap, then xbzrle and a position decrease
    part3 = [multifd_flush(), xbzrle(0, "pc.ram"), xbzrle(3 * PAGE), page(5 * PAGE)]
    # round 3: position goes backwards without a flush
    end = [zero(PAGE), xbzrle(2 * PAGE)]
    parts += [
        ram_section(SectionType.QEMU_VM_SECTION_PART, RAM_ID, part1),
        ram_section(SectionType.QEMU_VM_SECTION_PART, RAM_ID, part2),
        ram_section(SectionType.QEMU_VM_SECTION_PART, RAM_ID, part3),
        ram_section(SectionType.QEMU_VM_SECTION_END, RAM_ID, end),
    ]
    trap = b"\x00\x01" + footer(5) + b"\xff\xff junk" + footer(5)[:3] + b"\x7e"
    devices = [
        ("timer", 0, 4, b"\x7e\x7c\xd9\x03" + bytes(16)),
        ("cpu", BIG_INSTANCE, 5, b"\x00" * 9),
        (LONG_IDSTR, 0, 6, b"\x11" * 7),
        ("trap", 0, 5, trap),
        ("empty", 1, 7, b""),
    ]
    for idstr, inst, sid, payload in devices:
        parts.append(device(sid, idstr, payload, inst, 1))
    blob = command(MigCmd.MIG_CMD_POSTCOPY_LISTEN) + device(9, "blobdev", b"\x7e\x00\x00\x00\x09")
    blob += ping(3) + command(MigCmd.MIG_CMD_POSTCOPY_RUN)
    parts += [ping(2), packaged(blob), ping(4), eof()]
    desc = {"page_size": PAGE, "devices": [{"name": d[0], "instance_id": d[1]} for d in devices]}
    parts.append(vmdesc(desc))
    return Sample(
        data=b"".join(parts),
        normal=5,
        zero=6,
        xbzrle=3,
        compressed=1,
        rounds=3,
        devices=[(d[0], d[1]) for d in devices],
    )
