"""``migtap report``: the HTML page of a capture made through the in-process relay.

A fake source sends a stream in paced bursts (a real 7.2 RAM START, a bulk round, then rounds
that resend the same working set: a migration that does not converge), through migtap with
``--capture``, to a fake destination. The page must name no URL, fetch nothing, and hold every
section with what the model says.
"""

from __future__ import annotations

import asyncio
import re
from html.parser import HTMLParser
from typing import TYPE_CHECKING

import pytest

from migtap import cli, report
from migtap.analyze import analyze_path
from migtap.config import Address, Config
from migtap.relay.server import Relay
from migtap.tap import TapSettings
from migtap.wire.constants import SectionType
from tests import streams as s
from tests.fixtures import fixture
from tests.relay.netutil import fake_destination, read_all, sink_handler

if TYPE_CHECKING:
    from pathlib import Path

    from tests.relay.netutil import Received

ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])
HEAD = fixture("file-precopy.head.bin").read_bytes()  # real 7.2: header, config, ram START (id 2)
TAIL = fixture("file-precopy.tail.bin").read_bytes()  # real 7.2: device sections, EOF, vmdesc
RAM_ID = 2
PAUSE_S = 0.08


def ram_round(first: int, count: int) -> bytes:
    pages = [s.page(n * s.PAGE, "pc.ram" if n == first else None) for n in range(first, count)]
    return s.ram_section(SectionType.QEMU_VM_SECTION_PART, RAM_ID, pages)


def bursts(*, rounds: int, finish: bool) -> list[bytes]:
    """Header and bulk round (256 pages), then ``rounds`` rounds of the same 64 pages, each a
    burst of its own; with ``finish`` the RAM END and the real device sections, EOF, vmdesc."""
    out = [HEAD + ram_round(0, 256)]
    out += [ram_round(0, 64) for _ in range(rounds)]
    if finish:
        out.append(s.ram_section(SectionType.QEMU_VM_SECTION_END, RAM_ID, []) + TAIL)
    return out


async def capture(
    tmp_path: Path, parts: list[bytes], *, destination: object = sink_handler
) -> Path:
    root = tmp_path / "captures"
    async with fake_destination(destination) as (port, _):  # type: ignore[arg-type]
        config = Config(listen=Address("127.0.0.1", 0), forward=Address("127.0.0.1", port),
                        grace_period_s=2.0)  # fmt: skip
        async with Relay(config, tap=TapSettings(capture_dir=root)) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            try:
                for part in parts:
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(PAUSE_S)
                writer.write_eof()
                await read_all(reader)
            except ConnectionError:
                pass
            finally:
                writer.close()
            async with asyncio.timeout(10):
                while not relay.sessions_ended:
                    await asyncio.sleep(0.01)
    (directory,) = root.iterdir()
    return directory


class Page(HTMLParser):
    """What a browser would load: tags, every attribute, the text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.ids: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]
        self.ids += [v for k, v in attrs if k == "id" and v and tag == "section"]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page_html: str) -> Page:
    p = Page()
    p.feed(page_html)
    return p


def assert_self_contained(page_html: str) -> Page:
    """No URL anywhere; nothing a browser would fetch (src, href other than #anchors, @import,
    url(...) in styles, link/script/img/iframe elements)."""
    assert not re.search(r"(?i)\b(https?|ftp|wss?):", page_html)
    assert not re.search(r"(?i)@import|url\(\s*['\"]?(?!#)", page_html)  # url(#clip) is local
    p = parse(page_html)
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(p.tags)
    for tag, key, value in p.attrs:
        assert key != "src", (tag, key, value)
        if key in ("href", "xlink:href"):
            assert value is not None, (tag, key)
            assert value.startswith("#"), (tag, key, value)
    return p


@ONE_LOOP
async def test_a_migration_that_does_not_converge(tmp_path: Path) -> None:
    directory = await capture(tmp_path, bursts(rounds=7, finish=False))
    out = tmp_path / "report.html"
    assert cli.main(["report", str(directory), "-o", str(out)]) == 0
    page_html = out.read_text()
    p = assert_self_contained(page_html)
    assert p.ids == ["outcome", "timeline", "rounds", "devices", "versions", "capture"]
    assert p.tags.count("svg") == 2  # the timeline and the rounds
    text = " ".join(p.text)
    a = analyze_path(directory)
    m = a.migration
    assert len(m.rounds) == 8
    assert m.converging() is False  # the model's judgment, which the page shows first
    assert "Not converging" in text
    assert 'class="verdict bad"' in page_html
    assert "not falling" in text  # the rounds of the same 64 pages are flagged in the table
    assert "cancelled" in text  # the source closed before EOF
    assert "No device sections decoded" in text
    assert "complete" in text
    assert "conn-" not in text  # one main channel only
    assert "src-to-dst.bin" in text


@ONE_LOOP
async def test_a_completed_migration_shows_its_devices_and_versions(tmp_path: Path) -> None:
    directory = await capture(tmp_path, bursts(rounds=2, finish=True))
    out = tmp_path / "r.html"
    assert report.main([str(directory), "-o", str(out)]) == 0
    page_html = out.read_text()
    p = assert_self_contained(page_html)
    text = " ".join(p.text)
    m = analyze_path(directory).migration
    assert m.outcome().value == "completed"
    assert 'class="badge" style="background:#2e7d32">completed' in page_html
    assert m.devices
    assert all(d.decoded is not None for d in m.devices)
    # One <details> per device section, its summary row naming it, its fields inside.
    assert page_html.count('<details class="device">') == len(m.devices)
    assert "0000:00:01.3/piix4_pm" in text
    fw_cfg = page_html.split("<span>fw_cfg</span>", 1)[1].split("</details>", 1)[0]
    assert "cur_entry" in fw_cfg
    assert '<span class="good">decoded</span>' in fw_cfg
    # The source QEMU's range and its evidence (the machine type).
    assert "Source QEMU: " + m.generation.source.text() in text
    assert "machine type pc-i440fx-7.2" in text
    assert "stop-and-copy" in text  # a phase band's name in the timeline's legend
    assert "Failure" not in text


async def closes_after_bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            rec: Received) -> None:  # fmt: skip
    """A destination that fails while loading the bulk round: reads 200 KiB and closes."""
    while len(rec.data) < 200 * 1024:
        chunk = await reader.read(1 << 16)
        if not chunk:
            break
        rec.data += chunk
    writer.close()


@ONE_LOOP
async def test_a_failed_migration_has_its_failure_section(tmp_path: Path) -> None:
    directory = await capture(
        tmp_path, bursts(rounds=40, finish=True), destination=closes_after_bulk
    )
    out = tmp_path / "r.html"
    assert report.main([str(directory), "-o", str(out)]) == 0
    page_html = out.read_text()
    p = assert_self_contained(page_html)
    summary = analyze_path(directory).summary()
    assert summary["outcome"] == "failed"
    failure = summary["failure"]
    assert isinstance(failure, dict)
    assert p.ids[:2] == ["outcome", "failure"]
    section = page_html.split('<section id="failure">', 1)[1].split("</section>", 1)[0]
    assert f"{failure['offset_min']:,} to {failure['offset_max']:,}" in section
    assert "<td>ram</td>" in section  # the ram sections in the range, from the model
    assert "migtap replay" in section


def test_without_matplotlib_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = report.importlib.util.find_spec
    monkeypatch.setattr(
        report.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    assert cli.main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1
    assert "matplotlib" in err
    assert "migtap[report]" in err
    assert not (tmp_path / "r.html").exists()


def test_not_a_capture_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(tmp_path / "nowhere"), "-o", str(tmp_path / "r.html")]) == 1
    _, err = capsys.readouterr()
    assert "not a capture directory" in err
