"""Which QEMU wrote a stream: the version range from machine type, records and vmdesc."""

from __future__ import annotations

import json
import struct

import pytest

from migtap.wire.constants import MigCmd, SectionType
from migtap.wire.events import Command, MultifdPacket, SectionHeader, VmDescription
from migtap.wire.generation import Estimate, Evidence, GenerationTracker
from migtap.wire.multifd import MultifdParser
from migtap.wire.return_path import ReturnPathParser
from migtap.wire.stream import StreamParser
from migtap.wire.vmdesc import VmdescDocument, parse_vmdesc
from tests import streams as s
from tests.fixtures import fixture
from tests.wire.mfd_streams import mfd_init, mfd_packet, rp_pong, rp_switchover_ack

BLOCKS = [("pc.ram", 4 * s.PAGE)]


def track(data: bytes, tracker: GenerationTracker | None = None) -> GenerationTracker:
    tracker = tracker or GenerationTracker()
    parser = StreamParser(page_size=s.PAGE)
    for e in [*parser.feed(data), *parser.feed_eof()]:
        assert tracker.observe(e) is False or not isinstance(e, VmDescription)
        if isinstance(e, VmDescription):
            tracker.observe_vmdesc(parse_vmdesc(e))
    return tracker


def stream(machine: str, *, body: list[bytes] | None = None, desc: object = None) -> bytes:
    parts = [s.header(), s.configuration(machine), s.ram_start(2, BLOCKS), *(body or [])]
    parts.append(s.eof())
    if desc is not None:
        parts.append(s.vmdesc(desc))
    return b"".join(parts)


def test_a_7_2_stream_is_7_2_to_8_1() -> None:
    """Machine type 7.2 gives the floor; a vmdesc without the configuration caps it at 8.1."""
    t = track(stream("pc-i440fx-7.2", desc={"page_size": s.PAGE, "devices": []}))
    assert (t.source.min, t.source.max) == ((7, 2), (8, 1))
    assert t.source.text() == "7.2 to 8.1"
    assert t.machine_type == "pc-i440fx-7.2"
    assert [e.sign for e in t.source.evidence] == [
        "machine type pc-i440fx-7.2",
        "configuration record sent but not described in the vmdesc",
    ]


def test_a_10_0_stream_with_switchover_start_and_nullptr() -> None:
    desc = {
        "page_size": s.PAGE,
        "configuration": {"vmsd_name": "configuration", "version": 1, "fields": []},
        "devices": [
            {
                "name": "dev",
                "instance_id": 0,
                "vmsd_name": "dev",
                "version": 1,
                "fields": [{"name": "ptrs", "type": "nullptr", "size": 1}],
            }
        ],
    }
    body = [s.command(MigCmd.MIG_CMD_SWITCHOVER_START)]
    t = track(stream("pc-q35-9.2", body=body, desc=desc))
    assert t.source.text() == "10.0 to 11.0"  # 11.1 names the marker "ptr-marker"
    signs = {e.sign: e for e in t.source.evidence}
    assert signs["vmdesc describes the configuration"].min == (8, 2)
    assert signs["SWITCHOVER_START command"].min == (10, 0)
    assert signs['vmdesc field of type "nullptr"'].min == (10, 0)


def test_multifd_flush_and_compressed_pages_bound_both_ends() -> None:
    body = [
        s.ram_section(
            SectionType.QEMU_VM_SECTION_PART, 2, [s.multifd_flush(), s.compressed(0, "pc.ram")]
        )
    ]
    t = track(stream("pc-i440fx-7.2", body=body))
    assert t.source.text() == "8.1 to 9.0"
    assert t.source.consistent


def test_signs_that_contradict_each_other_say_so() -> None:
    """A 10.0 machine type with COMPRESS_PAGE records (removed in 9.1) cannot be."""
    body = [s.ram_section(SectionType.QEMU_VM_SECTION_PART, 2, [s.compressed(0, "pc.ram")])]
    t = track(stream("pc-q35-10.0", body=body))
    assert t.source.text() == "inconsistent"
    assert not t.source.consistent
    assert t.source.as_dict()["min"] == "10.0"
    assert t.source.as_dict()["max"] == "9.0"


@pytest.mark.parametrize(
    ("machine", "floor"),
    [
        ("pc-i440fx-7.2", (7, 2)),
        ("pc-q35-10.0", (10, 0)),
        ("virt-9.2", (9, 2)),
        ("s390-ccw-virtio-8.1", (8, 1)),
        ("pc-i440fx-2.12", (2, 12)),
        ("xenfv", None),  # unversioned: no sign
        ("pc-q35-rhel9.4.0", None),  # a distribution's versions are not QEMU's
        ("pc-i440fx-jammy", None),
        ("microvm", None),
    ],
)
def test_machine_type_gives_a_floor(machine: str, floor: tuple[int, int] | None) -> None:
    t = track(stream(machine))
    assert t.source.min == floor
    assert t.source.max is None
    assert t.source.text() == ("unknown" if floor is None else f"{floor[0]}.{floor[1]} or newer")


def test_multifd_packets_show_zero_pages_and_sync_with_data() -> None:
    t = GenerationTracker()
    p = MultifdParser(page_size=s.PAGE)
    data = mfd_init(0) + mfd_packet(packet_num=1, normal=1, zero=1)
    for e in p.feed(data):
        t.observe(e)
    assert t.source.text() == "9.0 or newer"
    t2 = GenerationTracker()
    sync_with_data = MultifdPacket(0, 1, 5, 128, 3, 0, 3 * s.PAGE, "pc.ram", 3 * s.PAGE, True)
    assert t2.observe(sync_with_data)
    assert t2.source.text() == "8.2 or older"


def test_destination_switchover_ack_is_the_destinations_sign() -> None:
    t = GenerationTracker()
    rp = ReturnPathParser()
    changed = [t.observe(e, from_source=False) for e in rp.feed(rp_pong(1) + rp_switchover_ack())]
    assert changed == [False, True]
    assert t.destination.text() == "8.1 or newer"
    assert t.source.text() == "unknown"


def test_a_sign_counts_once_and_reports_change_only_when_it_narrows() -> None:
    t = GenerationTracker()
    cmd = Command(10, MigCmd.MIG_CMD_SWITCHOVER_START)
    assert t.observe(cmd) is True
    assert t.observe(Command(20, MigCmd.MIG_CMD_SWITCHOVER_START)) is False
    assert len(t.source.evidence) == 1
    # A weaker floor is recorded as evidence but does not change the range.
    assert t.source.add(Evidence(30, "older sign", min=(8, 1))) is False
    assert [e.sign for e in t.source.evidence] == ["SWITCHOVER_START command", "older sign"]
    assert t.source.evidence[0].offset == 10


def test_estimate_texts() -> None:
    assert Estimate().text() == "unknown"
    assert Estimate(max=(8, 1)).text() == "8.1 or older"
    assert Estimate(min=(8, 2), max=(8, 2)).text() == "8.2"


def test_real_7_2_fixtures() -> None:
    """The bookworm 7.2 stream head names its machine type; its real vmdesc has no
    configuration entry (7.2 < 8.2)."""
    t = GenerationTracker()
    for e in StreamParser(page_size=s.PAGE).feed(fixture("file-precopy.head.bin").read_bytes()):
        t.observe(e)
    assert t.machine_type == "pc-i440fx-7.2"
    desc = json.loads(fixture("vmdesc-pc-i440fx-7.2.json").read_bytes())
    t.observe_vmdesc(VmdescDocument(0, desc))
    assert t.source.text() == "7.2 to 8.1"


def _desc_with(ftype: str) -> dict[str, object]:
    return {
        "page_size": s.PAGE,
        "configuration": {"vmsd_name": "configuration", "version": 1, "fields": []},
        "devices": [
            {
                "name": "0000:00:03.0/nvme",
                "instance_id": 0,
                "vmsd_name": "nvme",
                "version": 1,
                "fields": [{"name": "sq", "type": ftype, "size": 1}],
            }
        ],
    }


def test_an_11_1_vmdesc_with_ptr_markers() -> None:
    """11.1 describes the marker before each element of an array of pointers as "ptr-marker"
    (10.0-11.0: "nullptr", for NULL elements only)."""
    t = track(stream("pc-q35-7.2", desc=_desc_with("ptr-marker")))
    assert t.source.text() == "11.1 or newer"
    signs = {e.sign: e for e in t.source.evidence}
    assert signs['vmdesc field of type "ptr-marker"'].min == (11, 1)
    old = track(stream("pc-q35-7.2", desc=_desc_with("nullptr")))
    assert old.source.text() == "10.0 to 11.0"


def test_nvme_section_is_11_1() -> None:
    """NVMe controllers block migration before 11.1 (``unmigratable``)."""
    t = GenerationTracker()
    assert t.observe(
        SectionHeader(7, SectionType.QEMU_VM_SECTION_FULL, 40, "0000:00:03.0/nvme", 0, 1)
    )
    assert t.source.text() == "11.1 or newer"
    assert not GenerationTracker().observe(
        SectionHeader(7, SectionType.QEMU_VM_SECTION_FULL, 40, "0000:00:03.0/nvme-ns", 0, 1)
    )


def test_enable_colo_is_10_2_or_older() -> None:
    """MIG_CMD_ENABLE_COLO (8) is MIG_CMD_DEPRECATED_0 from 11.0: no longer sent."""
    t = track(stream("pc-q35-9.2", body=[s.command(MigCmd.MIG_CMD_ENABLE_COLO)]))
    assert t.source.text() == "9.2 to 10.2"


def test_ping_0x42_ends_a_10_2_postcopy_package() -> None:
    """10.2+ ends the postcopy package with PING 0x42 (QEMU_VM_PING_PACKAGED_LOADED); other
    pings say nothing."""
    package = s.ping(3) + s.ping(0x42) + s.command(MigCmd.MIG_CMD_POSTCOPY_RUN)
    body = [s.command(MigCmd.MIG_CMD_PACKAGED, struct.pack(">I", len(package))) + package]
    t = track(stream("pc-i440fx-7.2", body=body))
    assert t.source.text() == "10.2 or newer"
    assert [e.sign for e in t.source.evidence][-1] == "PING 0x42 in the postcopy package"
    assert (
        track(stream("pc-i440fx-7.2", body=[s.ping(1), s.ping(4)])).source.text() == "7.2 or newer"
    )
