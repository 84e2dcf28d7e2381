"""Connections of one migration as libvirt's QEMU opens them: upstream order and grouping."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from migtap.config import Address, Config
from migtap.relay.server import Relay
from migtap.tap import TapSettings
from migtap.wire.constants import MigCmd
from tests.relay.netutil import Received, fake_destination, read_all, sink_handler
from tests.streams import command, configuration, header
from tests.wire.mfd_streams import mfd_init

ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])
#: libvirt always starts QEMU with ``-uuid``; multifd channels carry it in their first packet.
LIBVIRT_UUID = bytes.fromhex("65f9e9e5676749a49ae3fcf0027c2058")


def tap_relay(port: int) -> Relay:
    config = Config(
        listen=Address("127.0.0.1", 0), forward=Address("127.0.0.1", port), grace_period_s=2
    )
    return Relay(config, tap=TapSettings(progress_interval_s=0.1))


@ONE_LOOP
async def test_upstream_order_is_kept_when_the_first_connect_is_slow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 7.2 destination takes its first accepted connection as the main channel. The main
    channel's upstream connect takes 300 ms here; the multifd channels, accepted after it and
    speaking first, still reach the destination after it (a relay connecting each as soon as
    it can, as a forking socat does, would put a multifd channel first)."""

    async def dest(reader: Any, writer: Any, rec: Received) -> None:
        rec.data += await read_all(reader)

    async with fake_destination(dest) as (port, conns):
        loop = asyncio.get_running_loop()
        real_connect = loop.create_connection
        delayed: list[int] = []

        async def slow_first_connect(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("port") == port and not delayed:
                delayed.append(port)
                await asyncio.sleep(0.3)
            return await real_connect(*args, **kwargs)

        monkeypatch.setattr(loop, "create_connection", slow_first_connect)
        async with tap_relay(port) as relay:
            writers = []
            for prefix in (header() + configuration(), mfd_init(0), mfd_init(1)):
                _, w = await asyncio.open_connection("127.0.0.1", relay.port)
                writers.append((w, prefix))
            for w, prefix in reversed(writers):  # multifd channels speak first
                w.write(prefix)
                await w.drain()
            await asyncio.sleep(0.5)
            for w, _ in writers:
                w.write_eof()
            await asyncio.sleep(0.1)
            for w, _ in writers:
                w.close()
            async with asyncio.timeout(10):
                while not relay.sessions_ended:
                    await asyncio.sleep(0.01)
    assert delayed == [port]
    assert [bytes(c.data[:4]) for c in conns] == [b"QEVM", mfd_init(0)[:4], mfd_init(1)[:4]]


@pytest.mark.parametrize("multifd_first", [True, False], ids=["multifd-first", "main-first"])
async def test_multifd_with_a_uuid_joins_a_main_channel_without_one(multifd_first: bool) -> None:
    """libvirt gives QEMU ``-uuid`` but does not set ``validate-uuid``: the multifd channels
    carry the UUID, the main channel's configuration does not. They still make one session,
    whichever speaks first, and even when the main channel closes before them (as it did in
    one real ``virsh migrate --parallel`` in three: the channels became sessions of their own)."""
    with capture_logs() as logs:
        async with fake_destination(sink_handler) as (port, _), tap_relay(port) as relay:
            main, *mfds = [
                (await asyncio.open_connection("127.0.0.1", relay.port))[1] for _ in range(3)
            ]
            stream = header() + configuration() + command(MigCmd.MIG_CMD_OPEN_RETURN_PATH)
            if not multifd_first:
                main.write(stream)
                await main.drain()
                await asyncio.sleep(0.1)
            for ch, w in enumerate(mfds):
                w.write(mfd_init(ch, LIBVIRT_UUID))
                await w.drain()
            await asyncio.sleep(0.1)
            if multifd_first:
                main.write(stream)
                await main.drain()
                await asyncio.sleep(0.1)
            main.write_eof()  # the main channel ends first
            await asyncio.sleep(0.2)
            main.close()
            for w in mfds:
                w.write_eof()
                w.close()
            async with asyncio.timeout(10):
                while not relay.sessions_ended:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
    summaries = [e for e in logs if e["event"] == "migration_summary"]
    assert len(summaries) == 1, summaries
    assert summaries[0]["channel_kinds"] == ["main", "multifd", "multifd"]
