"""Field decoding against small hand-built descriptions and payloads."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from migtap.annotate.vmsd import DeviceDesc, VmDescription
from migtap.annotate.walk import (
    DecodeError,
    Leaf,
    Struct,
    TruncatedPayload,
    decode_section,
    footer_at,
)
from migtap.errors import StreamError, TruncatedStream


def device(
    fields: list[dict[str, Any]], subsections: list[dict[str, Any]] | None = None, **kw: Any
) -> DeviceDesc:
    dev: dict[str, Any] = {"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1}
    dev["fields"] = fields
    if subsections is not None:
        dev["subsections"] = subsections
    dev.update(kw)
    desc = VmDescription.from_json({"page_size": 4096, "devices": [dev]}).find("dev", 0)
    assert desc is not None
    return desc


def sub(name: bytes, version: int = 1) -> bytes:
    return b"\x05" + bytes([len(name)]) + name + struct.pack(">I", version)


def test_integers_of_every_width_and_sign() -> None:
    types = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]
    sizes = [1, 1, 2, 2, 4, 4, 8, 8]
    desc = device([{"name": t, "type": t, "size": s} for t, s in zip(types, sizes, strict=True)])
    payload = b"".join(b"\xff" * s for s in sizes)
    decoded = decode_section(desc, payload + b"\x7e\x00\x00\x00\x03")
    assert decoded.fields == {
        "int8": -1,
        "uint8": 0xFF,
        "int16": -1,
        "uint16": 0xFFFF,
        "int32": -1,
        "uint32": 0xFFFFFFFF,
        "int64": -1,
        "uint64": 2**64 - 1,
    }
    assert decoded.consumed == len(payload)
    assert footer_at(payload + b"\x7e\x00\x00\x00\x03", decoded.consumed, 3)


def test_equal_and_le_variants_and_odd_sizes() -> None:
    desc = device(
        [
            {"name": "a", "type": "int32 equal", "size": 4},
            {"name": "b", "type": "int32 le", "size": 4},  # "le" = less-or-equal, still BE
            {"name": "c", "type": "uint16 equal", "size": 2},
            {"name": "d", "type": "uint32", "size": 3},  # the vmdesc size wins
        ]
    )
    decoded = decode_section(desc, b"\xff\xff\xff\xfe\x00\x00\x01\x00\xff\xff\x01\x02\x03")
    assert decoded.fields == {"a": -2, "b": 256, "c": 0xFFFF, "d": 0x010203}


def test_buffers_bitmaps_timers_bools_and_unknown_types() -> None:
    desc = device(
        [
            {"name": "flag", "type": "bool", "size": 1},
            {"name": "buf", "type": "buffer", "size": 3},
            {"name": "pad", "type": "unused_buffer", "size": 2},
            {"name": "bits", "type": "bitmap", "size": 8},
            {"name": "t", "type": "timer", "size": 8},
            {"name": "cfg", "type": "pci config", "size": 4},
            {"name": "mystery", "type": "brand new type", "size": 2, "new_key": [1]},
        ]
    )
    payload = b"\x02abc\x00\x00" + bytes(range(8)) + b"\xff" * 8 + b"WXYZ" + b"\x01\x02"
    decoded = decode_section(desc, payload, base_offset=1000)
    assert decoded.fields == {
        "flag": True,
        "buf": b"abc",
        "pad": b"\x00\x00",
        "bits": bytes(range(8)),
        "t": -1,
        "cfg": b"WXYZ",
        "mystery": b"\x01\x02",
    }
    leaf = decoded.root.fields["mystery"]
    assert isinstance(leaf, Leaf)
    assert (leaf.offset, leaf.size, leaf.type) == (1000 + len(payload) - 2, 2, "brand new type")
    assert decoded.desc.fields[-1].extra == {"new_key": [1]}


def test_compressed_and_indexed_arrays_and_repeated_names() -> None:
    inner = {"vmsd_name": "el", "version": 1, "fields": [{"name": "v", "type": "uint8", "size": 1}]}
    desc = device(
        [
            {"name": "arr", "array_len": 3, "type": "uint16", "size": 2},
            {"name": "s", "index": 0, "type": "struct", "struct": inner, "size": 1},
            {"name": "s", "index": 1, "type": "struct", "struct": inner, "size": 1},
            # 10.0+: NULL runs split an array of pointers; the last element may lack "index"
            {"name": "p", "type": "nullptr", "size": 1},
            {"name": "p", "array_len": 2, "type": "struct", "struct": inner, "size": 1},
            {"name": "p", "type": "nullptr", "size": 1},
        ]
    )
    payload = b"\x00\x01\x00\x02\x00\x03" + b"\x0a\x0b" + b"0" + b"\x01\x02" + b"0"
    decoded = decode_section(desc, payload)
    assert decoded.fields == {
        "arr": [1, 2, 3],
        "s": [{"v": 10}, {"v": 11}],
        "p": [None, {"v": 1}, {"v": 2}, None],
    }
    assert decoded.consumed == len(payload)


def test_subsections_nested_and_checked() -> None:
    desc = device(
        [{"name": "x", "type": "uint8", "size": 1}],
        subsections=[
            {
                "vmsd_name": "dev/a",
                "version": 2,
                "fields": [{"name": "y", "type": "uint8", "size": 1}],
                "subsections": [{"vmsd_name": "dev/a/b", "version": 1, "fields": []}],
            }
        ],
    )
    payload = b"\x01" + sub(b"dev/a", 2) + b"\x02" + sub(b"dev/a/b")
    decoded = decode_section(desc, payload)
    assert decoded.fields == {"x": 1, "dev/a": {"y": 2, "dev/a/b": {}}}
    node = decoded.root.fields["dev/a"]
    assert isinstance(node, Struct)
    assert (node.kind, node.version, node.offset) == ("subsection", 2, 1)

    with pytest.raises(DecodeError, match="'dev/z' where vmdesc has 'dev/a'") as info:
        decode_section(desc, b"\x01" + sub(b"dev/z", 2) + b"\x02")
    assert info.value.field_path == "dev/a"
    assert info.value.offset == 1
    with pytest.raises(DecodeError, match="expected subsection"):
        decode_section(desc, b"\x01\x7e\x00\x00\x00\x00")


def test_undescribed_subsection_on_the_wire_is_an_error() -> None:
    desc = device([{"name": "x", "type": "uint8", "size": 1}])
    with pytest.raises(DecodeError, match="not in the vmdesc"):
        decode_section(desc, b"\x01" + sub(b"dev/extra") + b"\x00")
    # a 0x05 that doesn't name one of our subsections is left alone, like QEMU's loader does
    assert decode_section(desc, b"\x01" + sub(b"other/x")).consumed == 1


def test_error_names_device_field_path_and_offset() -> None:
    xmm = {
        "vmsd_name": "xmm_reg",
        "version": 1,
        "fields": [{"name": "xmm_q", "type": "uint64", "size": 8}],
    }
    env = {
        "vmsd_name": "env",
        "version": 1,
        "fields": [
            {"name": "xmm_regs", "array_len": 4, "type": "struct", "struct": xmm, "size": 8}
        ],
    }
    desc = VmDescription.from_json(
        {
            "page_size": 4096,
            "devices": [
                {
                    "name": "cpu",
                    "instance_id": 1,
                    "vmsd_name": "cpu",
                    "version": 12,
                    "fields": [{"name": "env", "type": "struct", "struct": env, "size": 32}],
                }
            ],
        }
    ).find("cpu", 1)
    assert desc is not None
    with pytest.raises(TruncatedPayload) as info:
        decode_section(desc, bytes(28), base_offset=500)
    err = info.value
    assert isinstance(err, TruncatedStream)
    assert err.field_path == "cpu.env.xmm_regs[3].xmm_q"
    assert err.device == "cpu (1)"
    assert err.offset == 524
    assert "cpu.env.xmm_regs[3].xmm_q" in str(err)


def test_struct_size_mismatch_and_null_marker() -> None:
    inner = {"vmsd_name": "el", "version": 1, "fields": [{"name": "v", "type": "uint8", "size": 1}]}
    desc = device([{"name": "s", "type": "struct", "struct": inner, "size": 2}])
    with pytest.raises(DecodeError, match="used 1 bytes, vmdesc says 2"):
        decode_section(desc, b"\x01\x02")
    null = device([{"name": "n", "type": "nullptr", "size": 1}])
    with pytest.raises(DecodeError, match="NULL marker"):
        decode_section(null, b"\x00")


def test_old_style_device_is_one_buffer() -> None:
    desc = VmDescription.from_json(
        {
            "page_size": 4096,
            "devices": [
                {
                    "name": "slirp",
                    "instance_id": 0,
                    "size": 3,
                    "fields": [{"name": "data", "size": 3, "type": "buffer"}],
                }
            ],
        }
    ).find("slirp", 0)
    assert desc is not None
    assert desc.body.vmsd_name is None  # no vmsd: an old-style save_state handler
    assert desc.size == 3
    assert decode_section(desc, b"abcdef").fields == {"data": b"abc"}


def test_capability_has_its_own_length() -> None:
    desc = device([{"name": "caps", "array_len": 2, "type": "capability", "size": 16}])
    payload = b"\x0fx-ignore-shared\x0amapped-ram"
    assert decode_section(desc, payload).fields == {"caps": ["x-ignore-shared", "mapped-ram"]}


def test_hostile_array_len_fails_fast() -> None:
    big = device([{"name": "a", "array_len": 2**40, "type": "uint8", "size": 1}])
    with pytest.raises(TruncatedPayload):
        decode_section(big, bytes(10))
    empty = device([{"name": "a", "array_len": 2**40, "type": "buffer", "size": 0}])
    with pytest.raises(DecodeError):
        decode_section(empty, bytes(10))


def test_all_errors_are_stream_errors() -> None:
    assert issubclass(DecodeError, StreamError)
    assert issubclass(TruncatedPayload, DecodeError)


def test_ptr_markers_of_11_1_arrays_of_pointers() -> None:
    """11.1 (e.g. an NVMe controller's queues): every element of an auto-allocated array of
    pointers is a ``ptr-marker`` byte, '1' followed by the element as the next vmdesc entry of
    the same name, or '0'; no ``index``, so the same name repeats into one list."""
    inner = {"vmsd_name": "q", "version": 1, "fields": [{"name": "v", "type": "uint16", "size": 2}]}
    desc = device(
        [
            {"name": "sq", "type": "ptr-marker", "size": 1},
            {"name": "sq", "type": "struct", "struct": inner, "size": 2},
            {"name": "sq", "type": "ptr-marker", "size": 1},
            {"name": "sq", "type": "ptr-marker", "size": 1},
            {"name": "after", "type": "uint8", "size": 1},
        ]
    )
    payload = b"1" + b"\x00\x07" + b"0" + b"0" + b"\x2a"
    decoded = decode_section(desc, payload)
    assert decoded.fields == {"sq": ["valid-ptr", {"v": 7}, "null-ptr", "null-ptr"], "after": 42}
    assert decoded.consumed == len(payload)
    one = device([{"name": "m", "type": "ptr-marker", "size": 1}])
    marker = decode_section(one, b"1").root.fields["m"]
    assert isinstance(marker, Leaf)
    assert (marker.type, marker.size, marker.value) == ("ptr-marker", 1, "valid-ptr")
    with pytest.raises(DecodeError, match="pointer marker 0x30 or 0x31, found 0x02"):
        decode_section(desc, b"\x02" + payload[1:])
