"""The relay with real sockets on 127.0.0.1 (fake source and destination), on both loops."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time

import pytest
from structlog.testing import capture_logs

from migtap.relay.pipe import reset
from tests.relay.netutil import Received, fake_destination, read_all, relay_for, sink_handler

QEVM = b"QEVM\x00\x00\x00\x03"
MULTIFD = b"\x11\x22\x33\x44" + bytes(60)


def payload(size: int, seed: int = 0) -> bytes:
    return QEVM + random.Random(seed).randbytes(size)


async def wait_sessions(relay, n: int = 1) -> None:
    async with asyncio.timeout(10):
        while len(relay.sessions_ended) < n:
            await asyncio.sleep(0.01)


async def test_bytes_pass_unchanged_both_ways() -> None:
    data = payload(8 * 1024 * 1024)

    async def dest(reader, writer, rec: Received) -> None:
        writer.write(b"\x00\x03\x00\x04\x00\x00\x00\x01")  # a PONG, before reading anything
        while chunk := await reader.read(1 << 16):
            rec.data += chunk
        writer.write(b"\x00\x01\x00\x04\x00\x00\x00\x00")  # SHUT, after the source's EOF
        await writer.drain()

    with capture_logs() as logs:
        async with fake_destination(dest) as (port, conns), relay_for(port) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(data)
            writer.write_eof()
            back = await read_all(reader)
            writer.close()
            await wait_sessions(relay)
    assert conns[0].sha256 == hashlib.sha256(data).hexdigest()
    assert back == b"\x00\x03\x00\x04\x00\x00\x00\x01\x00\x01\x00\x04\x00\x00\x00\x00"
    (ended,) = [e for e in logs if e["event"] == "session_ended"]
    assert ended["bytes_src_to_dst"] == len(data)
    assert ended["bytes_dst_to_src"] == 16
    assert ended["channels"] == ["main"]


async def test_half_close_destination_talks_after_source_eof() -> None:
    async def dest(reader, writer, rec: Received) -> None:
        rec.data += await read_all(reader)  # source is done
        for i in range(50):  # keep talking on the return path
            writer.write(bytes([i]) * 1000)
            await writer.drain()
            await asyncio.sleep(0.001)

    async with fake_destination(dest) as (port, conns), relay_for(port) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(QEVM)
        writer.write_eof()
        back = await read_all(reader)
        writer.close()
        await wait_sessions(relay)
    assert conns[0].data == QEVM
    assert back == b"".join(bytes([i]) * 1000 for i in range(50))


async def test_destination_that_stops_reading_bounds_memory() -> None:
    high = 256 * 1024
    release = asyncio.Event()

    async def dest(reader, writer, rec: Received) -> None:
        await release.wait()
        while chunk := await reader.read(1 << 16):
            rec.data += chunk

    async with (
        fake_destination(dest) as (port, conns),
        relay_for(port, write_buffer_high=high, write_buffer_low=high // 4) as relay,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        block = payload(1024 * 1024)
        sent = 0
        peak = 0

        async def source() -> None:
            nonlocal sent
            for _ in range(64):  # 64 MiB, far more than every buffer on the way
                writer.write(block)
                await writer.drain()
                sent += len(block)
            writer.write_eof()

        task = asyncio.ensure_future(source())
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            for pipe in relay.pipes.values():
                t = pipe.upstream.transport
                if t is not None:
                    peak = max(peak, t.get_write_buffer_size())
            await asyncio.sleep(0.01)
        stalled_at = sent
        (pipe,) = relay.pipes.values()
        assert "peer" in pipe.downstream.pause_reasons  # the relay stopped reading the source
        assert stalled_at < 32 * 1024 * 1024  # the source is held back: kernel buffers only
        assert peak <= high + 1024 * 1024  # at most one read beyond the high-water mark
        release.set()
        async with asyncio.timeout(30):
            await task
            await read_all(reader)
        writer.close()
        await wait_sessions(relay)
    assert len(conns[0].data) == 64 * len(block)


async def test_refused_destination_resets_source_at_once() -> None:
    async with fake_destination(sink_handler) as (port, _):
        pass  # closed: nothing listens on port any more
    with capture_logs() as logs:
        async with relay_for(port) as relay:
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(QEVM)
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(5):
                    await read_all(reader)
            assert time.monotonic() - t0 < 2
            writer.close()
            # The listener keeps serving after the failed session.
            _r2, w2 = await asyncio.open_connection("127.0.0.1", relay.port)
            w2.close()
            await wait_sessions(relay, 2)
    failed = [e for e in logs if e["event"] == "upstream_connect_failed"]
    assert failed
    assert "source connection reset" in failed[0]["action"]


async def test_destination_closing_looks_closed_to_source() -> None:
    async def dest(reader, writer, rec: Received) -> None:
        rec.data += await reader.read(4)
        writer.close()  # a destination that failed to load and went away

    async with fake_destination(dest) as (port, _), relay_for(port) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(QEVM)
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # EOF reaches the source

        async def keep_writing() -> None:
            for _ in range(200):
                writer.write(bytes(1 << 16))
                await writer.drain()
                await asyncio.sleep(0.005)

        with pytest.raises(ConnectionError):  # and later writes fail, as without migtap
            await asyncio.wait_for(keep_writing(), 5)
        writer.close()
        await wait_sessions(relay)


async def test_destination_reset_reaches_source() -> None:
    async def dest(reader, writer, rec: Received) -> None:
        await reader.read(4)
        reset(writer.transport)  # RST

    async with fake_destination(dest) as (port, _), relay_for(port) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(QEVM)
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(5):
                await read_all(reader)
        writer.close()
        await wait_sessions(relay)


async def test_source_vanishing_closes_destination() -> None:
    async with fake_destination(sink_handler) as (port, conns), relay_for(port) as relay:
        _, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(QEVM)
        await writer.drain()
        writer.transport.abort()
        async with asyncio.timeout(5):
            while not conns or not conns[0].eof.is_set():
                await asyncio.sleep(0.01)
        await wait_sessions(relay)


async def test_connections_reach_destination_in_accept_order_and_group() -> None:
    """A 7.2 destination takes the first connection as main: order must be kept."""

    async def dest(reader, writer, rec: Received) -> None:
        rec.data += await read_all(reader)

    with capture_logs() as logs:
        async with fake_destination(dest) as (port, conns), relay_for(port) as relay:
            writers = []
            for prefix in (QEVM, MULTIFD, MULTIFD, MULTIFD, MULTIFD):
                _, w = await asyncio.open_connection("127.0.0.1", relay.port)
                writers.append((w, prefix))
            # Bytes arrive in reverse order: multifd first, main last (as QEMU may do).
            for w, prefix in reversed(writers):
                w.write(prefix)
                await w.drain()
                await asyncio.sleep(0.01)
            for w, _ in writers:
                w.write_eof()
            await asyncio.sleep(0.2)
            for w, _ in writers:
                w.close()
            await wait_sessions(relay)
    assert [c.data[:4] for c in conns] == [b"QEVM"] + [
        MULTIFD[:4]
    ] * 4  # destination's accept order
    (ended,) = [e for e in logs if e["event"] == "session_ended"]
    assert sorted(ended["channels"]) == ["main", "multifd", "multifd", "multifd", "multifd"]


async def test_many_sessions_at_once() -> None:
    n = 24
    async with fake_destination(sink_handler) as (port, conns), relay_for(port) as relay:

        async def one(i: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(payload(200_000, seed=i))
            writer.write_eof()
            await read_all(reader)
            writer.close()

        async with asyncio.timeout(30):
            await asyncio.gather(*(one(i) for i in range(n)))
        await wait_sessions(relay, n)
    got = sorted(c.sha256 for c in conns)
    want = sorted(hashlib.sha256(payload(200_000, seed=i)).hexdigest() for i in range(n))
    assert got == want


async def test_shutdown_waits_for_sessions_then_aborts() -> None:
    async def dest(reader, writer, rec: Received) -> None:
        await asyncio.sleep(30)  # never finishes by itself

    async with fake_destination(dest) as (port, _):
        relay = relay_for(port, grace_period_s=0.3)
        async with relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(QEVM)
            await writer.drain()
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
        assert 0.25 < time.monotonic() - t0 < 3  # waited for the grace period, then aborted
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionError):
                await read_all(reader)
        writer.close()
