"""``migtap analyze``: text and JSON output, dumps, errors (exit code 1, what parsed is shown)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from migtap import analyze
from migtap.wire.constants import SectionType
from tests import streams as s
from tests.fixtures import fixture

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

HEAD = fixture("file-precopy.head.bin").read_bytes()
TAIL = fixture("file-precopy.tail.bin").read_bytes()
VMDESC = fixture("vmdesc-pc-i440fx-7.2.json")
SWITCH = fixture("postcopy.switch.bin")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = analyze.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sections_and_ram_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sample.bin"
    path.write_bytes(s.sample_stream().data)
    code, out, err = run(capsys, str(path))
    assert code == 0, err
    assert "START" in out
    assert "trap" in out
    assert "PING 3" in out
    assert "VMDESC" in out
    assert "3 rounds" in out
    assert err == ""
    # The sample is pc-i440fx-7.2 with COMPRESS_PAGE and MULTIFD_FLUSH records (8.1 to 9.0), and
    # a vmdesc without a configuration entry (at most 8.1).
    assert out.splitlines()[0].startswith("source QEMU: 8.1 (machine type pc-i440fx-7.2; ")


def test_the_origin_line_stays_out_of_json_dumps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sample.bin"
    path.write_bytes(s.sample_stream().data)
    code, out, _ = run(capsys, str(path), "--dump", "desc")
    assert code == 0
    assert "source QEMU" not in out
    json.loads(out)
    code, out, _ = run(capsys, str(path), "--json")
    assert json.loads(out)["qemu"]["qemu"] == "8.1"


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sample = s.sample_stream()
    path = tmp_path / "sample.bin"
    path.write_bytes(sample.data)
    code, out, _ = run(capsys, str(path), "--json", "--dump", "sections", "--dump", "ram")
    assert code == 0
    doc = json.loads(out)
    assert doc["error"] is None
    assert doc["length"] == len(sample.data)
    total = doc["ram"]["total"]
    assert (total["normal_pages"], total["zero_pages"], total["xbzrle_pages"]) == (
        sample.normal,
        sample.zero,
        sample.xbzrle,
    )
    assert len(doc["ram"]["rounds"]) == sample.rounds
    full = [r for r in doc["sections"] if r["type"] == "FULL"]
    assert [(r["name"], r["instance_id"]) for r in full][:5] == sample.devices


def test_real_head_and_tail_state_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "stream.bin"
    path.write_bytes(HEAD + TAIL)
    code, out, err = run(capsys, str(path), "--dump", "state")
    assert code == 0
    assert err == ""  # every footer-scan boundary agrees with the vmdesc
    state = json.loads(out)
    assert next(iter(state)) == "ram (2)"
    assert state["ram (2)"]["section sizes"]["pc.ram"] == "0x0000000002000000"
    assert state["fw_cfg (8)"]["cur_entry"] == "0x000e"
    assert len(state) == 31


def test_dump_desc_and_vmdesc_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tail.bin"
    path.write_bytes(TAIL)
    code, out, _ = run(capsys, str(path), "--start", "records", "--dump", "desc")
    assert code == 0
    assert json.loads(out) == json.loads(VMDESC.read_bytes())
    # the postcopy blob has no vmdesc of its own: decode with the precopy one
    code, out, err = run(
        capsys, str(SWITCH), "--start", "records", "--dump", "state", "--vmdesc", str(VMDESC)
    )
    assert code == 0, err
    state = json.loads(out)
    assert "globalstate (40)" in state


def test_no_vmdesc_for_state(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, str(SWITCH), "--start", "records", "--dump", "state")
    assert code == 1
    assert "no VMDESCRIPTION" in err


def test_stream_error_prints_what_parsed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(HEAD + b"\x42\x00")
    code, out, err = run(capsys, str(path))
    assert code == 1
    assert "START" in out  # the table up to the damage
    assert err.count("\n") == 1
    assert f"at offset {len(HEAD)}" in err
    code, out, err = run(capsys, str(path), "--json")
    assert code == 1
    assert json.loads(out)["error"]["offset"] == len(HEAD)


def test_garbage_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "http.bin"
    path.write_bytes(b"GET / HTTP/1.1\r\n\r\n")
    code, _, err = run(capsys, str(path))
    assert code == 1
    assert "at offset 0" in err
    assert "QEVM" in err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, str(tmp_path / "nope.bin"))
    assert code == 1
    assert "nope.bin" in err


def test_large_file_streams_in_chunks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pages = [s.page(i * 4096, "pc.ram" if i == 0 else None) for i in range(16)]
    part = s.ram_section(SectionType.QEMU_VM_SECTION_PART, 2, pages)
    data = s.header() + s.ram_start(2, s.BLOCKS) + part * 40 + s.eof()
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    code, out, _ = run(capsys, str(path), "--json", "--dump", "ram")
    assert code == 0
    doc = json.loads(out)
    assert doc["ram"]["total"]["normal_pages"] == 640
    assert len(doc["ram"]["rounds"]) == 40


def capture_directory(tmp_path: Path, *, corrupt_multifd: bool = False) -> Path:
    """A capture directory as CaptureSink writes it: main channel, two multifd channels (the
    second sends the last page of the first one again, as 7.2 does), a preempt channel."""
    from tests.wire.mfd_streams import mfd_init, mfd_packet

    d = tmp_path / "capture"
    d.mkdir()
    blocks = [("pc.ram", 64 * 4096)]
    main = s.header() + s.configuration() + s.ram_start(2, blocks)
    main += s.ram_section(SectionType.QEMU_VM_SECTION_PART, 2, [s.zero(0, "pc.ram")])
    main += s.ram_section(SectionType.QEMU_VM_SECTION_END, 2, []) + s.eof()
    (d / "src-to-dst.bin").write_bytes(main)
    # A full packet (128 pages), then one that starts with its last page again (7.2 does that
    # only after a full packet).
    full = [i * 0x1000 for i in range(128)]
    ch0 = mfd_init(0) + mfd_packet(packet_num=1, normal=128, offsets=full)
    ch1 = mfd_init(1) + mfd_packet(
        packet_num=2, normal=2, zero=1, offsets=[full[-1], 0x80000, 0x81000]
    )
    if corrupt_multifd:
        ch1 = ch1[:64] + b"\xff" * 4 + ch1[68:]  # the packet magic
    (d / "conn-1-multifd.src-to-dst.bin").write_bytes(ch0)
    (d / "conn-2-multifd.src-to-dst.bin").write_bytes(ch1)
    preempt = s.page(40 * 4096, "pc.ram") + s.zero(41 * 4096)
    (d / "conn-3-postcopy_preempt.src-to-dst.bin").write_bytes(preempt)
    (d / "conn-4-unknown.src-to-dst.bin").write_bytes(b"not counted")
    return d


def test_a_capture_directory_counts_every_channel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = capture_directory(tmp_path)
    code, out, err = run(capsys, str(d), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [(c["file"], c["kind"], c["channel_id"]) for c in doc["channels"]] == [
        ("conn-1-multifd.src-to-dst.bin", "multifd", 0),
        ("conn-2-multifd.src-to-dst.bin", "multifd", 1),
        ("conn-3-postcopy_preempt.src-to-dst.bin", "postcopy-preempt", None),
    ]
    assert doc["ram"]["all_channels"] == {
        "normal_pages": 130,  # 128 + 2 on multifd, 1 on preempt, less the one sent twice
        "normal_pages_resent": 1,
        "zero_pages": 3,  # main, multifd, preempt: one each
        "xbzrle_pages": 0,
        "compressed_pages": 0,
    }
    code, out, _ = run(capsys, str(d))
    assert "RAM pages, all channels: normal 130 (1 sent twice, counted once), zero 3" in out
    assert "conn-3-postcopy_preempt.src-to-dst.bin" in out


def test_the_main_file_alone_says_what_it_leaves_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = capture_directory(tmp_path)
    code, out, _ = run(capsys, str(d / "src-to-dst.bin"))
    assert code == 0
    assert "(3 more channel files beside this one: pass the capture directory" in out


def test_a_broken_channel_file_is_named_and_the_rest_still_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = capture_directory(tmp_path, corrupt_multifd=True)
    code, out, err = run(capsys, str(d), "--json")
    assert code == 1
    assert err.startswith("migtap analyze: conn-2-multifd.src-to-dst.bin: ")
    doc = json.loads(out)
    broken = doc["channels"][1]
    assert broken["error"]["offset"] >= 64
    assert doc["channels"][2]["normal_pages"] == 1
