"""``migtap check`` end to end with a stand-in for QEMU that writes a -dump-vmstate file."""

from __future__ import annotations

import json
import shlex
import sys
from typing import TYPE_CHECKING

import pytest

from migtap.cli import main
from tests.annotate.test_compat import DEVICE, DUMP

if TYPE_CHECKING:
    from pathlib import Path

FAKE_QEMU = """
import json, sys
argv = sys.argv[1:]
if "-machine" in argv and argv[argv.index("-machine") + 1] == "nosuch":
    sys.exit("qemu-system-x86_64: unsupported machine type")
out = argv[argv.index("-dump-vmstate") + 1]
dump = json.load(open(sys.argv[0] + ".json"))
json.dump(dump, open(out, "w"))
"""


@pytest.fixture
def qemu(tmp_path: Path) -> str:
    script = tmp_path / "fake-qemu.py"
    script.write_text(FAKE_QEMU)
    (tmp_path / "fake-qemu.py.json").write_text(json.dumps(DUMP))
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


def vmdesc(tmp_path: Path, *devices: dict[str, object]) -> Path:
    path = tmp_path / "vmdesc.json"
    path.write_text(json.dumps({"page_size": 4096, "devices": list(devices)}))
    return path


def test_ok_exits_0_with_a_table(
    tmp_path: Path, qemu: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(vmdesc(tmp_path, DEVICE)), "--against", qemu]) == 0
    out = capsys.readouterr().out
    assert "(machine pc-q35-7.2)" in out
    assert out.splitlines()[1].split() == ["verdict", "section", "instance", "vmsd", "version"]
    assert out.splitlines()[-1] == "OK: 1 ok, 0 fails, 0 unknown"


def test_a_failing_section_exits_1_and_comes_first(
    tmp_path: Path, qemu: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {**DEVICE, "name": "0000:00:09.0/nic", "version": 9}
    timer = {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": []}
    path = vmdesc(tmp_path, DEVICE, timer, bad)
    assert main(["check", str(path), "--against", qemu, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "fails"
    assert [(s["idstr"], s["verdict"]) for s in doc["sections"]] == [
        ("0000:00:02.0/nic", "ok"),
        ("timer", "unknown"),
        ("0000:00:09.0/nic", "fails"),
    ]
    assert doc["sections"][2]["reasons"] == ["nic: section version 9 is newer than the target's 3"]
    assert main(["check", str(path), "--against", qemu]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:2] == ["fails", "0000:00:09.0/nic"]
    assert lines[3].strip() == "nic: section version 9 is newer than the target's 3"
    assert lines[-1] == "FAILS: 1 ok, 1 fails, 1 unknown"


def test_a_machine_type_the_target_lacks_fails(
    tmp_path: Path, qemu: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = vmdesc(tmp_path, DEVICE)
    assert main(["check", str(path), "--against", qemu, "--machine", "nosuch", "--json"]) == 1
    (row,) = json.loads(capsys.readouterr().out)["sections"]
    assert row["idstr"] == "configuration"
    assert "unsupported machine type" in row["reasons"][0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--against", "/nonexistent/qemu"], "cannot run /nonexistent/qemu"),
        (["--against", ""], "--against: an empty command"),
        (["--against", "true"], "wrote no -dump-vmstate output"),
        ([], "required: --against"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["check", str(vmdesc(tmp_path, DEVICE)), *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.splitlines()) == 1


def test_a_missing_source_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope"), "--against", "true"]) == 2
    assert "no such file" in capsys.readouterr().err
