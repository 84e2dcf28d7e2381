"""Every FULL section of the real QEMU 7.2 tail decodes and ends exactly at its footer."""

from __future__ import annotations

import json
import struct

from migtap.annotate.vmsd import VmDescription
from migtap.annotate.walk import Leaf, Struct, Value
from tests.annotate.tail import (
    QEMU_VM_VMDESCRIPTION,
    TAIL_BASE,
    first_full,
    tail_bytes,
    tail_vmdesc,
    walk_tail,
)
from tests.fixtures import fixture


def test_tail_starts_with_timer_section() -> None:
    # Checked by hand: the tail slice begins exactly at the `timer` FULL header.
    assert first_full(tail_bytes()) == 0


def test_embedded_vmdesc_equals_the_json_fixture() -> None:
    data = tail_bytes()
    _, eof = walk_tail(tail_vmdesc())
    assert data[eof + 1] == QEMU_VM_VMDESCRIPTION
    (length,) = struct.unpack_from(">I", data, eof + 2)
    text = data[eof + 6 : eof + 6 + length]
    assert eof + 6 + length == len(data)
    assert json.loads(text) == json.loads(
        fixture("qemu-7.2/vmdesc-pc-i440fx-7.2.json").read_bytes()
    )
    assert VmDescription.from_json(text) == tail_vmdesc()
    # tests/data/qemu-7.2/README.md: EOF at 0x185B3D, VMDESCRIPTION at 0x185B3E, 98 771 bytes.
    assert TAIL_BASE + eof == 0x185B3D
    assert length == 98771


def test_every_section_ends_at_its_footer_and_every_device_is_decoded() -> None:
    vmdesc = tail_vmdesc()
    sections, _ = walk_tail(vmdesc)
    # 30 FULL sections, one per vmdesc device.
    assert len(sections) == 30
    assert [(s.idstr, s.instance_id) for s in sections] == [
        (d.name, d.instance_id) for d in vmdesc.devices
    ]
    for s in sections:
        assert s.version_id == s.decoded.desc.version
    ids = {s.idstr: s.section_id for s in sections}
    assert ids["timer"] == 0
    assert ids["cpu_common"] == 4
    assert ids["globalstate"] == 40
    assert ids["0000:00:01.3/piix4_pm"] == 30


def by_name() -> dict[tuple[str, int], dict[str, Value]]:
    sections, _ = walk_tail(tail_vmdesc())
    return {(s.idstr, s.instance_id): s.decoded.fields for s in sections}


def test_globalstate_runstate_running() -> None:
    sections, _ = walk_tail(tail_vmdesc())
    glob = sections[-1]
    assert glob.idstr == "globalstate"
    assert glob.offset == 0x185AB7  # tests/data/qemu-7.2/README.md
    assert glob.decoded.fields == {"size": 8, "runstate": b"running\0" + bytes(92)}
    size = glob.decoded.root.fields["size"]
    assert isinstance(size, Leaf)
    assert size.offset == 0x185AB7 + 1 + 4 + 1 + 11 + 4 + 4


def test_fw_cfg_and_pcibus_match_reference_worked_example() -> None:
    fields = by_name()
    assert fields[("fw_cfg", 0)] == {
        "cur_entry": 14,
        "cur_offset[1]": 2,
        "fw_cfg/dma": {"dma_addr": 0},
        "fw_cfg/acpi_mr": {"table_mr_size": 131072, "linker_mr_size": 4096, "rsdp_mr_size": 20},
    }
    assert fields[("PCIBUS", 0)] == {"nirq": 4, "irq_count": [0, 0, 0, 0]}


def test_nested_structs_arrays_and_subsections_in_cpu() -> None:
    sections, _ = walk_tail(tail_vmdesc())
    cpu = next(s for s in sections if s.idstr == "cpu")
    root = cpu.decoded.root
    assert set(root.fields) >= {"cpu/poll_control_msr", "cpu/msr_smi_count"}
    sub = root.fields["cpu/msr_smi_count"]
    assert isinstance(sub, Struct)
    assert sub.kind == "subsection"
    # Offsets are absolute and nested nodes lie inside the section.
    start = TAIL_BASE + cpu.payload_start
    assert start <= sub.offset < start + cpu.decoded.consumed


def test_old_ide_bmdma_uses_per_index_struct_elements() -> None:
    ide = by_name()[("0000:00:01.1/ide", 0)]
    bmdma = ide["bmdma"]
    assert isinstance(bmdma, list)
    assert len(bmdma) == 2
    assert all(isinstance(e, dict) for e in bmdma)
