"""``migtap report`` on a real capture, opened in a real browser.

A QEMU 7.2 migration through migtap with ``--capture``: a guest that keeps rewriting 512 KiB,
8 MiB/s and a 1 ms downtime limit, so rounds resend the same pages; once migtap judged it not
converging (or after a few rounds), the downtime limit is raised and it completes. The report
of its capture is opened in headless Chromium (Debian's ``chromium``): the screenshot must show a
page (not blank; the charts' colours drawn), the DOM the two charts and every section. Fails,
never skips, when QEMU or Chromium is missing.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image, ImageStat
from structlog.testing import capture_logs

from migtap.analyze import analyze_path
from migtap.tap import TapSettings
from tests.qemu.harness import MiB, floppy, guest_args, vm_pair, wait_booted
from tests.qemu.test_tap import capture_dir
from tests.test_report import assert_self_contained

if TYPE_CHECKING:
    from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# No network, no updates, no first-run pages: the page alone.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])
BAR_BLUE = (0x1F, 0x77, 0xB4)  # the rounds chart's normal pages (report.rounds_chart)


def chromium(tmp_path: Path, *args: str) -> str:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/setup.sh does)")
    profile = tmp_path / "chromium-profile"
    done = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


async def converging_late(tmp_path: Path, make_relay: Any, root: Path) -> dict[str, Any]:
    guest = guest_args(floppy(tmp_path))
    async with vm_pair(tmp_path, src_extra=guest, dst_extra=guest) as pair:
        await wait_booted(pair.src)
        await pair.configure({}, {"max_bandwidth": 8 * MiB, "downtime_limit": 1})
        with capture_logs() as logs:
            settings = TapSettings(progress_interval_s=0.2, capture_dir=root)
            async with make_relay(pair.dst_port, tap=settings) as relay:
                await pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
                async with asyncio.timeout(60):
                    while True:
                        events = [e["event"] for e in logs]
                        state = await pair.src.query_migrate()
                        if state["status"] == "completed":
                            break  # a starved vCPU let it converge on its own
                        assert state["status"] in ("setup", "active"), state
                        rounds = events.count("ram_round_finished")
                        if "migration_not_converging" in events or rounds >= 8:
                            await pair.src.set_parameters(downtime_limit=2000)
                            break
                        await asyncio.sleep(0.1)
                async with asyncio.timeout(60):
                    while (state := await pair.src.query_migrate())["status"] != "completed":
                        assert state["status"] in ("setup", "active", "device"), state
                        await asyncio.sleep(0.1)
                    while not relay.sessions_ended:
                        await asyncio.sleep(0.02)
    return state


@ONE_LOOP
async def test_the_report_of_a_real_capture_renders_in_chromium(
    tmp_path: Path, make_relay: Any
) -> None:
    root = tmp_path / "captures"
    await converging_late(tmp_path, make_relay, root)
    check_report(tmp_path, capture_dir(root))


def check_report(tmp_path: Path, capture: Path) -> None:
    """``migtap report`` as a user runs it, then the page in Chromium."""
    out = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "migtap", "report", str(capture), "-o", str(out)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    page_html = out.read_text()
    assert_self_contained(page_html)
    m = analyze_path(capture).migration
    assert m.outcome().value == "completed"
    assert len(m.rounds) >= 2  # the bulk round and at least one more (a guest dirtying RAM)
    assert m.devices
    assert all(d.decoded is not None for d in m.devices)

    # What the browser built: both charts, every section, one row per device section.
    dom = chromium(tmp_path, "--dump-dom", out.as_uri())
    assert dom.count("<svg") == 2
    assert dom.count("<path") > 100  # the charts' marks and their text, drawn as paths
    for anchor in ("outcome", "timeline", "rounds", "devices", "versions", "capture"):
        assert f'<section id="{anchor}">' in dom
    assert dom.count('<details class="device">') == len(m.devices)

    # What it showed: a page, not a blank one, with the rounds' bars drawn.
    png = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={png}", "--window-size=1280,2000", out.as_uri())
    with Image.open(png) as img:
        rgb = img.convert("RGB")
        assert rgb.size == (1280, 2000)
        assert ImageStat.Stat(rgb.convert("L")).stddev[0] > 20  # a blank page is ~0
        colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None
    white = sum(n for n, c in colours if min(c) >= 250)
    assert white < 0.95 * 1280 * 2000  # text, tables and charts cover some of it
    blue = sum(
        n for n, c in colours if all(abs(a - b) <= 6 for a, b in zip(c, BAR_BLUE, strict=True))
    )
    assert blue > 2000, "the rounds chart's bars were not drawn"
