"""Parsing the vmdesc JSON: real 7.2 description, newer shapes, and malformed input."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migtap.annotate.vmsd import FieldDesc, VmDescription, VmDescriptionError
from migtap.errors import StreamError
from tests.fixtures import fixture


def real() -> bytes:
    return fixture("qemu-7.2/vmdesc-pc-i440fx-7.2.json").read_bytes()


def test_real_vmdesc_from_bytes_str_and_dict() -> None:
    data = real()
    vd = VmDescription.from_json(data)
    assert vd == VmDescription.from_json(data.decode())
    assert vd == VmDescription.from_json(json.loads(data))
    assert vd == VmDescription.from_json(memoryview(data))
    assert vd.page_size == 4096
    assert len(vd.devices) == 30
    assert vd.configuration is None
    pm = vd.find("0000:00:01.3/piix4_pm", 0)
    assert pm is not None
    assert (pm.vmsd_name, pm.version) == ("piix4_pm", 3)
    assert [s.vmsd_name for s in pm.subsections] == ["piix4_pm/memhp"]
    assert vd.find("piix4_pm", 0) is None  # the vmdesc name is the full wire idstr
    assert vd.find("dma", 1) is not None
    assert vd.find("dma", 2) is None


def test_tmp_field_nested_inline() -> None:
    vd = VmDescription.from_json(real())
    found: list[FieldDesc] = []

    def walk(fields: tuple[FieldDesc, ...]) -> None:
        for f in fields:
            if f.type == "tmp":
                found.append(f)
            if f.nested is not None:
                walk(f.nested.fields)

    for dev in vd.devices:
        walk(dev.fields)
    assert len(found) == 1
    nested = found[0].nested
    assert nested is not None
    assert nested.vmsd_name == "fpreg_tmp"
    assert found[0].size == 10


def test_newer_shapes_configuration_and_unknown_keys() -> None:
    vd = VmDescription.from_json(
        {
            "configuration": {
                "vmsd_name": "configuration",
                "version": 1,
                "fields": [
                    {"name": "len", "type": "uint32", "size": 4},
                    {"name": "name", "type": "buffer", "size": 13},
                ],
            },
            "page_size": 4096,
            "future": True,
            "devices": [
                {
                    "name": "d",
                    "instance_id": 4294967295,
                    "vmsd_name": "d",
                    "version": 1,
                    "fields": [{"name": "f", "type": "fd", "size": 4, "shiny": 1}],
                    "priority": 3,
                }
            ],
        }
    )
    assert vd.configuration is not None
    assert [f.name for f in vd.configuration.fields] == ["len", "name"]
    assert vd.extra == {"future": True}
    dev = vd.find("d", 2**32 - 1)
    assert dev is not None
    assert dev.body.extra == {"priority": 3}
    assert dev.fields[0].extra == {"shiny": 1}


@pytest.mark.parametrize(
    "bad",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"devices": []}',
        b'{"page_size": "4096", "devices": []}',
        b'{"page_size": 4096, "devices": [{"name": 1, "instance_id": 0}]}',
        b'{"page_size": 4096, "devices": [{"name": "a", "instance_id": 0, "fields": [3]}]}',
        (
            b'{"page_size": 4096, "devices": [{"name": "a", "instance_id": 0, "fields": '
            b'[{"name": "x", "type": "uint8", "size": -1}]}]}'
        ),
        b"[" * 100000 + b"]" * 100000,
    ],
)
def test_malformed_vmdesc_is_a_stream_error(bad: bytes) -> None:
    with pytest.raises(VmDescriptionError) as info:
        VmDescription.from_json(bad, offset=42)
    assert isinstance(info.value, StreamError)
    assert info.value.offset == 42


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
keys = st.sampled_from(
    [
        "page_size",
        "devices",
        "name",
        "instance_id",
        "fields",
        "type",
        "size",
        "struct",
        "subsections",
        "array_len",
        "index",
        "vmsd_name",
        "version",
        "configuration",
    ]
)
shaped = st.recursive(
    st.none() | st.integers(-2, 5) | st.sampled_from(["uint8", "struct", "tmp", "a"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=6),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(json_values, shaped))
def test_arbitrary_json_parses_or_raises_stream_error(value: object) -> None:
    with contextlib.suppress(StreamError):
        VmDescription.from_json(json.dumps(value))
