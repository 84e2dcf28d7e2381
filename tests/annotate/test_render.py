"""state_dump matches analyze-migration.py's shape; annotated records are compact JSON lines."""

from __future__ import annotations

import json
from typing import Any

import pytest

from migtap.annotate.render import DeviceState, RamState, annotated_record, state_dump
from migtap.annotate.vmsd import VmDescription
from migtap.annotate.walk import DecodeError, decode_section
from tests.annotate.tail import tail_vmdesc, walk_tail


def dump_of_tail() -> dict[str, Any]:
    sections, _ = walk_tail(tail_vmdesc())
    ram = RamState(2, {"pc.ram": 0x2000000, "/rom@etc/acpi/rsdp": 0x1000})
    return state_dump([ram, *(DeviceState(s.section_id, s.decoded) for s in sections)])


def test_keys_are_idstr_and_section_id_in_stream_order() -> None:
    keys = list(dump_of_tail())
    assert keys[:4] == ["ram (2)", "timer (0)", "cpu_common (4)", "cpu (5)"]
    assert keys[-1] == "globalstate (40)"
    assert "0000:00:01.3/piix4_pm (30)" in keys
    assert "dma (13)" in keys


def test_values_formatted_like_the_script() -> None:
    dump = dump_of_tail()
    assert dump["ram (2)"] == {
        "section sizes": {
            "pc.ram": "0x0000000002000000",
            "/rom@etc/acpi/rsdp": "0x0000000000001000",
        }
    }
    glob = dump["globalstate (40)"]
    assert glob["size"] == "0x00000008"
    assert glob["runstate"] == " ".join(["72", "75", "6e", "6e", "69", "6e", "67"] + ["00"] * 93)
    fw = dump["fw_cfg (8)"]
    assert fw == {
        "cur_entry": "0x000e",
        "cur_offset[1]": "0x00000002",
        "fw_cfg/dma": {"dma_addr": "0x0000000000000000"},
        "fw_cfg/acpi_mr": {
            "table_mr_size": "0x0000000000020000",
            "linker_mr_size": "0x0000000000001000",
            "rsdp_mr_size": "0x0000000000000014",
        },
    }
    assert dump["PCIBUS (10)"] == {"nirq": "0x00000004", "irq_count": ["0x00000000"] * 4}
    # the whole thing is JSON and serialises the script's way
    text = json.dumps(dump, indent=4, separators=(",", ": "))
    assert json.loads(text) == dump


def _one_field_device(ftype: str, size: int, **extra: object) -> VmDescription:
    field = {"name": "f", "type": ftype, "size": size, **extra}
    return VmDescription.from_json(
        {
            "page_size": 4096,
            "devices": [
                {"name": "d", "instance_id": 0, "vmsd_name": "d", "version": 1, "fields": [field]}
            ],
        }
    )


@pytest.mark.parametrize(
    ("ftype", "size", "payload", "shown"),
    [
        ("int32", 4, b"\xff\xff\xff\xfe", "0xfffffffe (-2)"),
        ("int8", 1, b"\x80", "0x80 (-128)"),
        ("uint32", 4, b"\xff\xff\xff\xfe", "0xfffffffe"),
        ("uint8 equal", 1, b"\xff", "0xff"),  # the script says "0xff (-1)"
        ("int64 equal", 8, b"\xff" * 8, "0xffffffffffffffff"),  # uint64_equal in QEMU
        ("bool", 1, b"\x01", True),
        ("timer", 8, b"\xff" * 8, " ".join(["ff"] * 8)),
        ("buffer", 0, b"", ""),
        ("virtio", 3, b"\x01\x02\x03", "01 02 03"),
    ],
)
def test_leaf_formats(ftype: str, size: int, payload: bytes, shown: object) -> None:
    dev = _one_field_device(ftype, size).devices[0]
    dump = state_dump([DeviceState(7, decode_section(dev, payload))])
    assert dump == {"d (7)": {"f": shown}}


def test_null_struct_quirk_renders_nullptr() -> None:
    dev = _one_field_device("struct", 1, struct={}).devices[0]
    decoded = decode_section(dev, b"0")
    assert decoded.fields == {"f": None}
    assert state_dump([DeviceState(1, decoded)]) == {"d (1)": {"f": "nullptr"}}


def test_tmp_shown_as_hex_unless_expanded() -> None:
    dev = _one_field_device(
        "tmp",
        2,
        vmsd_name="x_tmp",
        version=0,
        fields=[{"name": "a", "type": "uint16", "size": 2}],
    ).devices[0]
    decoded = decode_section(dev, b"\x12\x34")
    assert decoded.fields == {"f": {"a": 0x1234}}
    assert state_dump([DeviceState(1, decoded)]) == {"d (1)": {"f": "12 34"}}
    assert state_dump([DeviceState(1, decoded)], expand_nested=True) == {
        "d (1)": {"f": {"a": "0x1234"}}
    }


def test_annotated_record_is_one_json_line() -> None:
    sections, _ = walk_tail(tail_vmdesc())
    glob = sections[-1]
    rec = annotated_record(glob.offset, glob.idstr, 0, glob.version_id, 126, glob.decoded)
    line = json.dumps(rec)
    assert "\n" not in line
    assert rec["fields"] == {"size": 8, "runstate": (b"running\0" + bytes(92)).hex()}
    assert rec["vmsd_name"] == "globalstate"
    assert rec["payload_bytes"] == 104
    for s in sections:
        json.dumps(
            annotated_record(s.offset, s.idstr, s.instance_id, s.version_id, None, s.decoded)
        )


def test_annotated_record_with_error_or_without_vmdesc() -> None:
    dev = _one_field_device("uint32", 4).devices[0]
    with pytest.raises(DecodeError) as info:
        decode_section(dev, b"\x00", base_offset=100)
    rec = annotated_record(90, "d", 0, 1, None, info.value)
    assert rec["error"]["field"] == "d.f"
    assert rec["error"]["offset"] == 100
    assert rec["error"]["type"] == "TruncatedPayload"
    json.dumps(rec)
    assert annotated_record(0, "x", 0, 1, None, None)["decoded"] is False


def test_ptr_markers_render_as_11_1s_script() -> None:
    """analyze-migration.py of 11.1 prints a ptr-marker as "null-ptr" or "valid-ptr"."""
    dev = _one_field_device("ptr-marker", 1).devices[0]
    for payload, shown in ((b"0", "null-ptr"), (b"1", "valid-ptr")):
        decoded = decode_section(dev, payload)
        assert state_dump([DeviceState(1, decoded)]) == {"d (1)": {"f": shown}}
