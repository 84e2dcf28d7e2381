"""How sessions end: never blocking the loop, never leaving a pipe behind."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from structlog.testing import capture_logs

from migtap.config import Address, Config
from migtap.observers.capture_writer import CaptureWriter, write_all
from migtap.relay.server import Relay
from migtap.tap import SessionTap, TapSettings
from tests.relay.netutil import fake_destination, read_all, sink_handler
from tests.streams import sample_stream

if TYPE_CHECKING:
    import pytest


def tap_relay(port: int, capture_dir: Path | None = None) -> Relay:
    return Relay(
        Config(listen=Address("127.0.0.1", 0), forward=Address("127.0.0.1", port)),
        tap=TapSettings(progress_interval_s=0.1, capture_dir=capture_dir),
    )


async def migrate(relay: Relay, data: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(data)
    writer.write_eof()
    await read_all(reader)
    writer.close()
    await writer.wait_closed()


def ended_ids(relay: Relay) -> list[int]:
    return [s.session_id for s in relay.sessions_ended]


async def test_a_slow_capture_never_stalls_another_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 1's capture writer is stuck; session 2 still relays all of its bytes and ends
    while session 1 is still closing (closing joined the writer on the loop before)."""
    gate = threading.Event()

    def gated_write(fd: int, data: bytes) -> None:
        if "-s1" in str(Path(f"/proc/self/fd/{fd}").readlink()):
            gate.wait(20)
        write_all(fd, data)

    monkeypatch.setattr(CaptureWriter, "_write", staticmethod(gated_write))
    first = sample_stream().data
    second = b"QEVM\x00\x00\x00\x03" + random.Random(5).randbytes(16 * 1024 * 1024)
    try:
        async with (
            fake_destination(sink_handler) as (port, conns),
            tap_relay(port, tmp_path) as relay,
        ):
            await migrate(relay, first)
            async with asyncio.timeout(10):
                while relay.pipes:  # session 1's connection is gone: it is closing
                    await asyncio.sleep(0.01)
            await migrate(relay, second)
            async with asyncio.timeout(10):
                while 2 not in ended_ids(relay):
                    await asyncio.sleep(0.01)
            assert 1 not in ended_ids(relay)  # still waiting for its writer, off the loop
            assert bytes(conns[1].data) == second
            gate.set()
            async with asyncio.timeout(10):
                while 1 not in ended_ids(relay):
                    await asyncio.sleep(0.01)
    finally:
        gate.set()
    doc, main = read_capture(tmp_path, "*-s1")
    assert doc["complete"] is True
    assert doc["closed"] is True
    assert main == first


def read_capture(root: Path, pattern: str) -> tuple[dict[str, object], bytes]:
    (directory,) = root.glob(pattern)
    doc = json.loads((directory / "session.json").read_text())
    return doc, (directory / "src-to-dst.bin").read_bytes()


async def test_a_tap_that_fails_to_close_still_ends_the_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_close(self: SessionTap) -> None:
        raise RuntimeError("tap bug")

    monkeypatch.setattr(SessionTap, "close", broken_close)
    with capture_logs() as logs:
        async with fake_destination(sink_handler) as (port, _), tap_relay(port) as relay:
            await migrate(relay, sample_stream().data)
            async with asyncio.timeout(10):
                while not relay.sessions_ended:
                    await asyncio.sleep(0.01)
            assert relay.pipes == {}
    events = [e["event"] for e in logs]
    assert "tap_crashed" in events
    assert "session_ended" in events
