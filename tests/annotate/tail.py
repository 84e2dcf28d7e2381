"""Test-only walker over the real QEMU 7.2 tail fixture, driven by the decoder itself."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache

from migtap.annotate.vmsd import VmDescription
from migtap.annotate.walk import DecodedSection, decode_section, footer_at
from tests.fixtures import fixture

TAIL_BASE = 1583333  # stream offset of the tail file's first byte (tests/data/qemu-7.2/README.md)
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_VMDESCRIPTION = 0x06


@dataclass(frozen=True)
class FullSection:
    offset: int  # absolute offset of the 0x04 byte
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    payload_start: int  # index into the tail file
    decoded: DecodedSection


@cache
def tail_bytes() -> bytes:
    return fixture("qemu-7.2/file-precopy.tail.bin").read_bytes()


@cache
def tail_vmdesc() -> VmDescription:
    return VmDescription.from_json(fixture("qemu-7.2/vmdesc-pc-i440fx-7.2.json").read_bytes())


def first_full(data: bytes) -> int:
    """The `timer` FULL section (section id 0, instance 0, version 2) starts the device state."""
    pos = data.find(b"\x04\x00\x00\x00\x00\x05timer\x00\x00\x00\x00")
    assert pos >= 0
    return pos


def walk_tail(vmdesc: VmDescription) -> tuple[list[FullSection], int]:
    """Every FULL section up to EOF; returns them and the index of the EOF byte."""
    data = tail_bytes()
    pos = first_full(data)
    sections: list[FullSection] = []
    while data[pos] == QEMU_VM_SECTION_FULL:
        (section_id,) = struct.unpack_from(">I", data, pos + 1)
        n = data[pos + 5]
        idstr = data[pos + 6 : pos + 6 + n].decode()
        instance_id, version_id = struct.unpack_from(">II", data, pos + 6 + n)
        start = pos + 14 + n
        desc = vmdesc.find(idstr, instance_id)
        assert desc is not None, idstr
        decoded = decode_section(desc, memoryview(data)[start:], base_offset=TAIL_BASE + start)
        end = start + decoded.consumed
        assert footer_at(data, end, section_id), (idstr, end)
        sections.append(
            FullSection(TAIL_BASE + pos, section_id, idstr, instance_id, version_id, start, decoded)
        )
        pos = end + 5
    assert data[pos] == QEMU_VM_EOF
    return sections, pos
