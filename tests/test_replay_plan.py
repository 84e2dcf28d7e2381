"""The pure half of ``migtap replay`` (``migtap/replay_plan.py``): records, needs, refusals,
the failing record and QEMU's messages; and ``migtap replay``'s usage errors (exit 2)."""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING

import pytest

from migtap.cli import main
from migtap.replay_plan import (
    NotReplayable,
    Progress,
    explain,
    failing_unit,
    plan_units,
    read_plan,
    scan_stream,
)
from migtap.wire.constants import MigCmd, SectionType
from tests import streams as s

if TYPE_CHECKING:
    from pathlib import Path

BLOCKS = [("pc.ram", 16 * s.PAGE), ("pc.bios", 4 * s.PAGE)]


def precopy() -> bytes:
    """Header, config, OPEN_RETURN_PATH, RAM START + PART, two devices, EOF, vmdesc."""
    return b"".join([
        s.header(),
        s.configuration(),
        s.command(MigCmd.MIG_CMD_OPEN_RETURN_PATH),
        s.ram_start(2, BLOCKS),
        s.ram_section(SectionType.QEMU_VM_SECTION_PART, 2,
                      [s.page(0, "pc.ram"), s.zero(s.PAGE), s.page(2 * s.PAGE)]),
        s.device(3, "timer", b"\x00" * 8),
        s.device(4, "0000:00:03.0/virtio-rng", b"\x01" * 5, instance_id=0, version_id=1),
        s.eof(),
        s.vmdesc({"page_size": s.PAGE, "devices": []}),
    ])  # fmt: skip


def make_capture(tmp_path: Path, data: bytes, **session: object) -> Path:
    d = tmp_path / "capture"
    d.mkdir()
    (d / "src-to-dst.bin").write_bytes(data)
    doc = {
        "v": 1,
        "capture_ram": "full",
        "page_size": s.PAGE,
        "channels": [
            {"index": 0, "kind": "main", "multifd_id": None,
             "files": {"src-to-dst": {"file": "src-to-dst.bin", "content": "exact"}}},
        ],
        **session,
    }  # fmt: skip
    (d / "session.json").write_text(json.dumps(doc))
    return d


def units_of(data: bytes, tmp_path: Path) -> list:
    path = tmp_path / "stream.bin"
    path.write_bytes(data)
    events, length, error = scan_stream(path)
    assert error is None
    return plan_units(events, length)


def test_units_tile_the_stream_and_keep_device_footers(tmp_path: Path) -> None:
    data = precopy()
    units = units_of(data, tmp_path)
    assert units[0].offset == 0
    assert units[-1].end == len(data)
    assert all(a.end == b.offset for a, b in itertools.pairwise(units))
    kinds = [u.kind for u in units]
    assert kinds == [
        "stream_header", "configuration", "command",
        "section_start", "ram_block_list", "ram_eos", "section_footer",
        "section_part", "ram_pages", "ram_eos", "section_footer",
        "section_full", "section_full", "eof", "vm_description",
    ]  # fmt: skip
    rng = units[12]
    assert (rng.idstr, rng.instance_id, rng.version_id, rng.section_id) == (
        "0000:00:03.0/virtio-rng", 0, 1, 4)  # fmt: skip
    # The whole device section, footer included: QEMU peeks past a device's fields.
    assert data[rng.end - 5] == SectionType.QEMU_VM_SECTION_FOOTER
    assert rng.end == units[13].offset
    blocks = units[4]
    assert blocks.section_kind == "START"
    assert blocks.idstr == "ram"
    assert blocks.detail["blocks"][0] == {"idstr": "pc.ram", "used_length": 16 * s.PAGE}
    pages = units[8]
    assert (pages.section_kind, pages.idstr, pages.detail["block"]) == ("PART", "ram", "pc.ram")
    assert pages.detail["pages"] == 3


def test_runs_of_pages_split_by_feeding_are_one_unit(tmp_path: Path) -> None:
    """The parser splits runs at feed boundaries; the plan merges them back."""
    pages = [s.page(n * s.PAGE, "pc.ram" if n == 0 else None) for n in range(16)]
    data = s.header() + s.ram_start(2, BLOCKS) + s.ram_section(
        SectionType.QEMU_VM_SECTION_PART, 2, pages) + s.eof()  # fmt: skip
    from migtap.wire.stream import StreamParser

    parser = StreamParser()
    events = []
    for n in range(0, len(data), 1000):
        events += parser.feed(data[n : n + 1000])
    events += parser.feed_eof()
    units = plan_units(events, len(data))
    runs = [u for u in units if u.kind == "ram_pages"]
    assert len(runs) == 1
    assert runs[0].detail["pages"] == 16


def test_read_plan_needs(tmp_path: Path) -> None:
    plan = read_plan(make_capture(tmp_path, precopy()))
    assert plan.complete
    assert plan.needs.capabilities == {"return-path": True}
    assert plan.needs.return_path
    assert plan.ram_blocks[0]["idstr"] == "pc.ram"
    assert [c.kind for c in plan.channels] == ["main"]


def test_a_cut_capture_is_planned_to_its_end(tmp_path: Path) -> None:
    data = precopy()
    cut = data[: len(data) // 2]
    plan = read_plan(make_capture(tmp_path, cut))
    assert not plan.complete
    assert plan.cut
    assert plan.units[-1].end == len(cut)
    assert plan.units[-1].truncated


def test_postcopy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotReplayable, match="postcopy"):
        read_plan(make_capture(tmp_path, s.sample_stream().data))


def test_ram_left_out_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotReplayable, match="capture-ram none"):
        read_plan(make_capture(tmp_path, precopy(), capture_ram="none"))


def test_other_channel_kinds_are_refused(tmp_path: Path) -> None:
    d = make_capture(tmp_path, precopy())
    doc = json.loads((d / "session.json").read_text())
    doc["channels"].append({"index": 1, "kind": "postcopy-preempt", "files": {}})
    (d / "session.json").write_text(json.dumps(doc))
    with pytest.raises(NotReplayable, match="postcopy"):
        read_plan(d)


def test_failing_unit_is_the_last_one_begun(tmp_path: Path) -> None:
    units = units_of(precopy(), tmp_path)
    assert failing_unit(units, Progress(12, units[12].offset + 1, units[12].offset + 1,
                                        all_read=False, closed=True)) == units[12]  # fmt: skip
    assert failing_unit(units, Progress(-1, 0, 0, all_read=False, closed=True)) is None


def test_explain_a_ram_size_mismatch(tmp_path: Path) -> None:
    unit = units_of(precopy(), tmp_path)[4]
    lines = [
        "qemu-system-x86_64: Size mismatch: pc.ram: 0x10000 != 0x8000: Invalid argument",
        "qemu-system-x86_64: error while loading state for instance 0x0 of device 'ram'",
        "qemu-system-x86_64: load of migration failed: Invalid argument",
    ]
    got = explain(unit, lines)
    assert got["sub_record"] == {
        "block": "pc.ram",
        "stream_size": 0x10000,
        "destination_size": 0x8000,
        "in_block_list": 16 * s.PAGE,
    }
    assert got["confirmed"] is True
    assert got["qemu_says"] == lines[:2]


def test_explain_an_unknown_section(tmp_path: Path) -> None:
    unit = units_of(precopy(), tmp_path)[12]
    line = (
        "qemu-system-x86_64: Unknown savevm section or instance "
        "'0000:00:03.0/virtio-rng' 0. Make sure that your current VM setup matches"
    )
    assert explain(unit, [line])["confirmed"] is True
    other = units_of(precopy(), tmp_path)[11]
    assert explain(other, [line])["confirmed"] is False
    assert explain(unit, ["something else"]) == {
        "sub_record": None, "confirmed": None, "qemu_says": []}  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["replay", "{d}"], "say where to replay"),
        (["replay", "{d}", "--qemu"], "--qemu needs the destination's command line"),
        (["replay", "{d}", "--qemu", "--", "qemu", "-incoming", "defer"], "adds -incoming"),
        (["replay", "{d}", "--to", "nohost"], "use HOST:PORT or unix:PATH"),
        (["replay", "{d}", "--to", "h:1", "--keep"], "--keep goes with --qemu"),
        (["replay", "{d}", "--to", "h:1", "--", "qemu"], "needs --qemu"),
        (["replay", "{d}/nonexistent", "--to", "h:1"], "not a capture directory"),
        (["replay", "{d}", "--qemu", "--", "/nonexistent/qemu"], "cannot start the destination"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    d = make_capture(tmp_path, precopy())
    assert main([a.format(d=d) for a in argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.count("\n") == 1


def test_postcopy_capture_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_capture(tmp_path, s.sample_stream().data)
    assert main(["replay", str(d), "--qemu", "--", "qemu-system-x86_64"]) == 2
    err = capsys.readouterr().err
    assert "postcopy cannot be replayed faithfully" in err
    assert "MIG_CMD_PACKAGED" in err


def test_nothing_listening_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = make_capture(tmp_path, precopy())
    assert main(["replay", str(d), "--to", f"unix:{tmp_path / 'nobody.sock'}"]) == 1
    err = capsys.readouterr().err
    assert "cannot connect" in err
    assert err.count("\n") == 1
