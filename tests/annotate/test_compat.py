"""The vmdesc against -dump-vmstate comparison, on small JSON literals shaped like QEMU's."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from migtap.annotate.compat import DumpError, TargetDump, Verdict, check_device, check_vmdesc
from migtap.annotate.vmsd import VmDescription


def tfield(name: str, size: int, *, version: int = 0, tested: bool = False, **kw: Any) -> dict:
    return {"field": name, "version_id": version, "field_exists": tested, "size": size, **kw}


PCI = {
    "name": "PCIDevice",
    "version_id": 2,
    "minimum_version_id": 1,
    "Fields": [
        tfield("version_id", 4),
        tfield("config", 256, tested=True),
        tfield("config", 4096, tested=True),
        tfield("irq_state", 16, version=2),
    ],
}
NIC = {
    "name": "nic",
    "version_id": 3,
    "minimum_version_id": 2,
    "Fields": [
        tfield("parent_obj", 2736, Description=PCI),
        tfield("unused", 4, tested=True),
        tfield("unused", 4),
        tfield("mac", 1, num=6),
        tfield("counter", 4),
        tfield("extra", 8, version=3),
        tfield(
            "queues",
            24,
            Description={
                "name": "q",
                "version_id": 1,
                "minimum_version_id": 1,
                "Fields": [tfield("head", 2)],
            },
        ),
    ],
    "Subsections": [
        {"name": "nic/link", "version_id": 1, "minimum_version_id": 1, "Fields": [tfield("up", 1)]},
    ],
}
DUMP = {
    "vmschkmachine": {"Name": "pc-q35-7.2"},
    "nic-pci": {"Name": "nic-pci", "version_id": 3, "minimum_version_id": 2, "Description": NIC},
    "no-vmsd": {"Name": "no-vmsd"},
}

PCI_DESC = {
    "vmsd_name": "PCIDevice",
    "version": 2,
    "fields": [
        {"name": "version_id", "type": "int32 le", "size": 4},
        {"name": "config[0]", "type": "pci config", "size": 256},
        {"name": "irq_state", "type": "pci irq state", "size": 16},
    ],
}
DEVICE = {
    "name": "0000:00:02.0/nic",
    "instance_id": 0,
    "vmsd_name": "nic",
    "version": 3,
    "fields": [
        {"name": "parent_obj", "type": "struct", "struct": PCI_DESC, "size": 276},
        {"name": "unused[1]", "type": "unused_buffer", "size": 4},
        {"name": "mac", "array_len": 6, "type": "uint8", "size": 1},
        {"name": "counter", "type": "uint32", "size": 4},
        {"name": "extra", "type": "uint64", "size": 8},
        # 10.0 style: an array the source did not compress, index 0 on the first element only
        {
            "name": "queues",
            "index": 0,
            "type": "struct",
            "size": 2,
            "struct": {
                "vmsd_name": "q",
                "version": 1,
                "fields": [{"name": "head", "type": "uint16", "size": 2}],
            },
        },
        {
            "name": "queues",
            "type": "struct",
            "size": 2,
            "struct": {
                "vmsd_name": "q",
                "version": 1,
                "fields": [{"name": "head", "type": "uint16", "size": 2}],
            },
        },
    ],
    "subsections": [
        {
            "vmsd_name": "nic/link",
            "version": 1,
            "fields": [{"name": "up", "type": "bool", "size": 1}],
        },
    ],
}


def check(device: dict[str, Any], dump: dict[str, Any] | None = None) -> tuple[Verdict, list[str]]:
    desc = VmDescription.from_json({"page_size": 4096, "devices": [device]})
    result = check_device(desc.devices[0], TargetDump.from_json(dump or DUMP))
    return result.verdict, list(result.reasons)


def edited(path: list[Any], value: Any) -> dict[str, Any]:
    dev = copy.deepcopy(DEVICE)
    here: Any = dev
    for key in path[:-1]:
        here = here[key]
    here[path[-1]] = value
    return dev


def test_a_matching_section_is_ok() -> None:
    assert check(DEVICE) == (Verdict.OK, [])


def test_the_dump_is_indexed_by_vmsd_name() -> None:
    dump = TargetDump.from_json(DUMP)
    assert dump.machine == "pc-q35-7.2"
    assert set(dump.vmsds) == {"nic"}


def test_unknown_device_type_fails() -> None:
    verdict, reasons = check(edited(["vmsd_name"], "virtio-rng"))
    assert verdict is Verdict.FAILS
    assert reasons == ["the target has no device type with vmsd 'virtio-rng'"]


def test_vmsds_the_dump_never_lists_are_unknown() -> None:
    verdict, reasons = check(edited(["vmsd_name"], "globalstate"))
    assert verdict is Verdict.UNKNOWN
    assert "-dump-vmstate does not list it" in reasons[0]


def test_old_style_section_is_unknown() -> None:
    dev = {
        "name": "slirp",
        "instance_id": 0,
        "fields": [{"name": "data", "type": "buffer", "size": 100}],
    }
    verdict, reasons = check(dev)
    assert verdict is Verdict.UNKNOWN
    assert "old-style" in reasons[0]


def test_version_too_new_fails() -> None:
    verdict, reasons = check(edited(["version"], 4))
    assert verdict is Verdict.FAILS
    assert reasons == ["nic: section version 4 is newer than the target's 3"]


def test_version_too_old_fails() -> None:
    verdict, reasons = check(edited(["version"], 1))
    assert verdict is Verdict.FAILS
    assert reasons == ["nic: section version 1 is older than the target's minimum 2"]


def test_fields_of_a_later_version_are_not_expected() -> None:
    dev = edited(["version"], 2)
    del dev["fields"][4]  # "extra" is from version 3
    assert check(dev) == (Verdict.OK, [])
    # ... and a stream of version 2 that has it is read wrong
    verdict, reasons = check(edited(["version"], 2))
    assert verdict is Verdict.FAILS
    assert "field 'queues' (struct 'q') expected where the stream has 'extra'" in reasons[0]


def test_field_size_differs_fails() -> None:
    verdict, reasons = check(edited(["fields", 3, "size"], 8))
    assert verdict is Verdict.FAILS
    assert reasons == ["nic.counter: size differs: 8 bytes (uint32) in the stream, 4 on the target"]


def test_array_length_differs_fails_when_the_dump_has_it() -> None:
    verdict, reasons = check(edited(["fields", 2, "array_len"], 8))
    assert verdict is Verdict.FAILS
    assert reasons == ["nic.mac: 8 elements in the stream, 6 on the target"]


def test_field_type_differs_fails() -> None:
    plain = {"name": "parent_obj", "type": "buffer", "size": 276}
    verdict, reasons = check(edited(["fields", 0], plain))
    assert verdict is Verdict.FAILS
    expected = (
        "nic.parent_obj: type differs: buffer, 276 bytes in the stream, "
        "struct 'PCIDevice' on the target"
    )
    assert reasons == [expected]


def test_field_name_differs_fails_when_the_size_differs_too() -> None:
    renamed = {"name": "packets", "type": "uint64", "size": 8}
    verdict, reasons = check(edited(["fields", 3], renamed))
    assert verdict is Verdict.FAILS
    assert reasons == [
        "nic: field 'counter' (4 bytes) expected where the stream has 'packets' (uint64, 8 bytes)"
    ]


def test_a_renamed_field_of_the_same_size_is_tolerated_with_a_note() -> None:
    """QEMU 7.2's hpet 'num_timers' is 10.0's 'num_timers_save': the wire is the same."""
    verdict, reasons = check(edited(["fields", 3, "name"], "packets"))
    assert verdict is Verdict.OK
    assert reasons == [
        "nic: field 'packets' of the stream is 'counter' on the target (same size and kind)"
    ]


def test_fields_inside_a_struct_are_compared() -> None:
    verdict, reasons = check(edited(["fields", 0, "struct", "fields", 0, "size"], 2))
    assert verdict is Verdict.FAILS
    assert reasons == [
        "nic.parent_obj.version_id: size differs: 2 bytes (int32 le) in the stream, 4 on the target"
    ]


def test_tested_fields_may_be_absent_or_present() -> None:
    # PCIe config (4096 bytes, the second tested "config") instead of the first
    pcie = {"name": "config[1]", "type": "pci config", "size": 4096}
    assert check(edited(["fields", 0, "struct", "fields", 1], pcie)) == (Verdict.OK, [])
    # both "unused" fields on the wire: the tested one's test said yes
    dev = copy.deepcopy(DEVICE)
    dev["fields"][1:2] = [
        {"name": "unused[0]", "type": "unused_buffer", "size": 4},
        {"name": "unused[1]", "type": "unused_buffer", "size": 4},
    ]
    assert check(dev) == (Verdict.OK, [])


def test_a_missing_field_fails() -> None:
    dev = copy.deepcopy(DEVICE)
    del dev["fields"][3]  # counter
    verdict, reasons = check(dev)
    assert verdict is Verdict.FAILS
    assert reasons == [
        "nic: field 'counter' (4 bytes) expected where the stream has 'extra' (uint64, 8 bytes)"
    ]


def test_an_extra_field_fails() -> None:
    dev = copy.deepcopy(DEVICE)
    dev["fields"].append({"name": "more", "type": "uint32", "size": 4})
    verdict, reasons = check(dev)
    assert verdict is Verdict.FAILS
    assert reasons == [
        "nic: the stream has fields the target does not read at version 3, from 'more'"
    ]


def test_an_empty_variable_array_is_absent_from_the_vmdesc() -> None:
    dev = copy.deepcopy(DEVICE)
    del dev["fields"][5:7]  # no "queues" element: nothing in the vmdesc, nothing on the wire
    verdict, reasons = check(dev)
    assert verdict is Verdict.OK
    assert reasons == [
        "nic: field 'queues' is not in the stream: taken for a variable array with no element"
    ]


def test_unknown_subsection_fails() -> None:
    sub = {"vmsd_name": "nic/offload", "version": 1, "fields": []}
    verdict, reasons = check(edited(["subsections", 0], sub))
    assert verdict is Verdict.FAILS
    assert reasons == ["nic: subsection 'nic/offload' is unknown to the target"]


def test_subsection_version_and_fields_are_checked() -> None:
    verdict, reasons = check(edited(["subsections", 0, "version"], 2))
    assert verdict is Verdict.FAILS
    assert reasons == ["nic/link: subsection version 2 is newer than the target's 1"]
    verdict, reasons = check(edited(["subsections", 0, "fields", 0, "size"], 4))
    assert verdict is Verdict.FAILS
    assert reasons == ["nic/link.up: size differs: 4 bytes (bool) in the stream, 1 on the target"]


def test_any_of_several_types_sharing_a_vmsd_name_may_accept() -> None:
    other = copy.deepcopy(NIC)
    other["version_id"] = 2
    dump = {**DUMP, "nic-isa": {"Name": "nic-isa", "Description": other}}
    assert check(DEVICE, dump) == (Verdict.OK, [])


def test_check_vmdesc_keeps_the_stream_order() -> None:
    second = {**DEVICE, "name": "0000:00:03.0/nic"}
    desc = VmDescription.from_json({"page_size": 4096, "devices": [DEVICE, second]})
    rows = check_vmdesc(desc, TargetDump.from_json(DUMP))
    assert [r.idstr for r in rows] == ["0000:00:02.0/nic", "0000:00:03.0/nic"]
    assert rows[0].as_dict() == {
        "idstr": "0000:00:02.0/nic",
        "instance_id": 0,
        "vmsd_name": "nic",
        "version": 3,
        "verdict": "ok",
        "reasons": [],
    }


@pytest.mark.parametrize("bad", [[], {"x": {"Description": {"name": "x"}}}])
def test_a_malformed_dump_is_a_dump_error(bad: object) -> None:
    with pytest.raises(DumpError):
        TargetDump.from_json(bad)
