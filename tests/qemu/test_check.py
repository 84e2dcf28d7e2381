"""``migtap check`` on real captures against real QEMU 7.2 and 10.0: no false alarm for a
stream that really migrates there, and a real refusal named.

The captures are made once for the module (each migration is real and checked: RAM equal,
every device decoded), then checked against each QEMU they migrate to, as a user runs it.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from migtap.relay.server import Relay
from migtap.tap import TapSettings
from tests.qemu.conftest import relay_config
from tests.qemu.harness import HOST_QEMU, Qemu, qemu_binary, vm_pair
from tests.qemu.test_qemu10 import qemu10  # noqa: F401 - the fixture
from tests.qemu.test_tap import capture_dir, rich_q35_migration, tap_migration

pytestmark = pytest.mark.qemu10

#: The host's QEMU module directory: the trixie QEMU falls back to it for modules its tree
#: lacks, and -dump-vmstate loads every QOM module, so a 7.2 module there aborts 10.0
#: ("Only modules from the same build can be loaded").
HOST_MODULES = Path("/usr/lib/x86_64-linux-gnu/qemu")
#: vmsds -dump-vmstate does not list (compat.UNLISTED_VMSDS), RAM, old-style slirp.
MAY_BE_UNKNOWN = {"timer", "cpu_common", "cpu", "apic", "PCIBUS", "i2c_bus", "acpi_build",
                  "globalstate", "ide", "ram", "slirp"}  # fmt: skip


def _make_relay(port: int, *, tap: TapSettings | None = None, **kw: object) -> Relay:
    return Relay(relay_config(port, **kw), tap=tap or TapSettings(progress_interval_s=0.2))


async def _plain(work: Path, machine: str, src: Qemu, dst: Qemu) -> Path:
    async with vm_pair(work, machine=machine, src_qemu=src, dst_qemu=dst) as pair:
        await tap_migration(pair, _make_relay, TapSettings(capture_dir=work / "captures"))
    return capture_dir(work / "captures")


async def _rich(work: Path, src: Qemu, dst: Qemu) -> Path:
    _, _, d = await rich_q35_migration(
        work, _make_relay, machine="pc-q35-7.2", src=src, dst=dst,
        caps={"return-path": True}, slirps=1,
    )  # fmt: skip
    return d


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory, qemu10: Qemu) -> dict[str, Path]:  # noqa: F811
    """Real migrations, each made once: 7.2 pc-i440fx-7.2 (to 10.0), device-rich pc-q35-7.2
    from 7.2 (to 10.0) and from 10.0 (to 7.2), 10.0 pc (to 10.0)."""
    root = tmp_path_factory.mktemp("check")
    for name in "abcd":
        (root / name).mkdir()

    async def make() -> dict[str, Path]:
        return {
            "i440fx-7.2-from-7.2": await _plain(root / "a", "pc-i440fx-7.2", HOST_QEMU, qemu10),
            "q35-7.2-from-7.2": await _rich(root / "b", HOST_QEMU, qemu10),
            "q35-7.2-from-10.0": await _rich(root / "c", qemu10, HOST_QEMU),
            "pc-from-10.0": await _plain(root / "d", "pc", qemu10, qemu10),
        }

    return asyncio.run(make())


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory, qemu10: Qemu) -> dict[str, str]:  # noqa: F811
    """``--against`` command lines: the host's 7.2, and 10.0 from the trixie tree with a
    module directory of its own modules and an empty file for each module it lacks (QEMU
    then reports those as unloadable and goes on)."""
    mods = tmp_path_factory.mktemp("qemu10-modules")
    tree_modules = Path(dict(qemu10.env)["QEMU_MODULE_DIR"])
    for module in tree_modules.glob("*.so"):
        (mods / module.name).symlink_to(module)
    for module in HOST_MODULES.glob("*.so"):
        if not (mods / module.name).exists():
            (mods / module.name).touch()
    q10 = ["env", f"QEMU_MODULE_DIR={mods}", *qemu10.prefix]
    return {"7.2": shlex.quote(qemu_binary()), "10.0": shlex.join(q10)}


def migtap_check(source: Path, against: str, *args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "migtap", "check", str(source), "--against", against,
         "--json", *args],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode in {0, 1}, done.stderr
    return done.returncode, json.loads(done.stdout)


def by_verdict(doc: dict[str, Any], verdict: str) -> list[dict[str, Any]]:
    return [s for s in doc["sections"] if s["verdict"] == verdict]


# Every pair here migrates for real (the captures' own migrations, and test_qemu10.py).
MIGRATES = [
    ("i440fx-7.2-from-7.2", "7.2"),
    ("i440fx-7.2-from-7.2", "10.0"),
    ("q35-7.2-from-7.2", "7.2"),
    ("q35-7.2-from-7.2", "10.0"),
    ("q35-7.2-from-10.0", "7.2"),
    ("q35-7.2-from-10.0", "10.0"),
    ("pc-from-10.0", "10.0"),
]


@pytest.mark.parametrize(("capture", "target"), MIGRATES)
def test_no_false_alarm_where_the_stream_migrates(
    captures: dict[str, Path], targets: dict[str, str], capture: str, target: str
) -> None:
    code, doc = migtap_check(captures[capture], targets[target])
    assert by_verdict(doc, "fails") == []
    assert (code, doc["verdict"]) == (0, "ok")
    unknown = {s["idstr"].rsplit("/", 1)[-1] for s in by_verdict(doc, "unknown")}
    assert unknown <= MAY_BE_UNKNOWN
    ok = {s["vmsd_name"] for s in by_verdict(doc, "ok")}
    assert {"fw_cfg", "mc146818rtc", "hpet", "i8254", "port92"} <= ok
    if capture.startswith("q35"):
        assert {"virtio-net", "e1000", "virtio-blk", "xhci", "usb-ptr", "ICH9LPC"} <= ok


def test_stream_capture_and_vmdesc_agree(
    captures: dict[str, Path], targets: dict[str, str]
) -> None:
    d = captures["q35-7.2-from-10.0"]
    _, from_dir = migtap_check(d, targets["7.2"])
    _, from_stream = migtap_check(d / "src-to-dst.bin", targets["7.2"])
    _, from_vmdesc = migtap_check(d / "vmdesc.json", targets["7.2"], "--machine", "pc-q35-7.2")
    assert from_dir == from_stream
    devices = [s for s in from_dir["sections"] if s["vmsd_name"] is not None or s["idstr"] != "ram"]
    assert devices == from_vmdesc["sections"]


def test_a_machine_type_the_target_lacks_fails(
    captures: dict[str, Path], targets: dict[str, str]
) -> None:
    code, doc = migtap_check(captures["pc-from-10.0"], targets["7.2"])
    assert (code, doc["verdict"]) == (1, "fails")
    (row,) = by_verdict(doc, "fails")
    assert row["idstr"] == "configuration"
    assert "pc-i440fx-10.0" in row["reasons"][0]


def test_an_edited_vmdesc_fails_against_real_qemu(
    captures: dict[str, Path], targets: dict[str, str], tmp_path: Path
) -> None:
    desc = json.loads((captures["i440fx-7.2-from-7.2"] / "vmdesc.json").read_text())
    for dev in desc["devices"]:
        if dev["vmsd_name"] == "hpet":
            dev["version"] = 9
        if dev["vmsd_name"] == "port92":
            dev["fields"][0]["size"] = 2
    desc["devices"].append({**desc["devices"][-1], "name": "x/virtio-rng", "vmsd_name": "nope"})
    path = tmp_path / "vmdesc.json"
    path.write_text(json.dumps(desc))
    for target in ("7.2", "10.0"):
        code, doc = migtap_check(path, targets[target], "--machine", "pc-i440fx-7.2")
        assert code == 1
        fails = {s["vmsd_name"]: s["reasons"] for s in by_verdict(doc, "fails")}
        assert set(fails) == {"hpet", "port92", "nope"}
        assert fails["hpet"][0].startswith("hpet: section version 9 is newer than the target's")
        assert "size differs: 2 bytes (uint8) in the stream, 1 on the target" in fails["port92"][0]
