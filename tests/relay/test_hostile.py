"""Wrong and hostile input on the listener: forwarded unchanged, recognised, logged once."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest
from structlog.testing import capture_logs

from migtap.config import Address, Config
from migtap.relay.server import Relay
from migtap.tap import TapSettings
from tests.relay.netutil import fake_destination, read_all, sink_handler
from tests.streams import sample_stream

HTTP = b"GET / HTTP/1.1\r\nHost: migtap\r\n\r\n"
TLS_HELLO = bytes.fromhex("160301") + b"\x00\x2f" + b"\x01" + random.Random(1).randbytes(46)


def tap_relay(port: int, **kw: object) -> Relay:
    return Relay(
        Config(
            listen=Address("127.0.0.1", 0),
            forward=Address("127.0.0.1", port),
            grace_period_s=2,
            **kw,
        ),  # type: ignore[arg-type]
        tap=TapSettings(progress_interval_s=0.1),
    )


async def send_through(data: bytes, **kw: object) -> tuple[bytes, list[dict[str, object]]]:
    with capture_logs() as logs:
        async with fake_destination(sink_handler) as (port, conns), tap_relay(port, **kw) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(data)
            writer.write_eof()
            await read_all(reader)
            writer.close()
            async with asyncio.timeout(10):
                while not relay.sessions_ended:
                    await asyncio.sleep(0.01)
    return bytes(conns[0].data), logs


@pytest.mark.parametrize(
    ("data", "kind"),
    [(HTTP, "http"), (TLS_HELLO, "tls"), (random.Random(2).randbytes(100_000), "unknown")],
)
async def test_foreign_bytes_pass_unchanged_and_are_named(data: bytes, kind: str) -> None:
    if data[:4] == b"QEVM":  # pragma: no cover - the seed makes this impossible
        pytest.fail("random bytes happened to start with the QEMU magic")
    got, logs = await send_through(data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    (joined,) = [e for e in logs if e["event"] == "channel_joined"]
    assert joined["kind"] == kind
    (not_parsed,) = [e for e in logs if e["event"] == "channel_not_parsed"]
    assert not_parsed["kind"] == kind
    assert not [e for e in logs if e["event"] in ("parser_crashed", "sink_detached")]
    (summary,) = [e for e in logs if e["event"] == "migration_summary"]
    assert summary["outcome"] == "unknown"


async def test_corrupt_stream_detaches_the_parser_once_and_keeps_forwarding() -> None:
    stream = bytearray(sample_stream().data)
    stream[40] ^= 0xFF  # inside the RAM block list
    stream += random.Random(3).randbytes(500_000)
    got, logs = await send_through(bytes(stream))
    assert got == bytes(stream)
    detached = [e for e in logs if e["event"] == "parser_detached"]
    assert len(detached) == 1
    assert detached[0]["offset"] >= 8
    assert "parser detached" in detached[0]["action"]


async def test_truncated_stream_is_reported_as_cut() -> None:
    stream = sample_stream().data
    got, logs = await send_through(stream[: len(stream) // 2])
    assert got == stream[: len(stream) // 2]
    cut = [e for e in logs if e["event"] == "stream_cut"]
    assert len(cut) == 1
    assert not [e for e in logs if e["event"] == "parser_detached"]


async def test_allow_refuses_other_sources() -> None:
    import ipaddress

    with capture_logs() as logs:
        async with (
            fake_destination(sink_handler) as (port, conns),
            tap_relay(port, allow=(ipaddress.ip_network("10.9.9.0/24"),)) as relay,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"QEVM\x00\x00\x00\x03")
            with pytest.raises(ConnectionError):
                async with asyncio.timeout(5):
                    await read_all(reader)
            writer.close()
            await asyncio.sleep(0.1)
            assert not conns  # nothing reached the destination
    refused = [e for e in logs if e["event"] == "connection_refused"]
    assert len(refused) == 1
    assert not [e for e in logs if e["event"] == "session_started"]


async def test_allow_admits_listed_sources() -> None:
    import ipaddress

    data = sample_stream().data
    got, logs = await send_through(data, allow=(ipaddress.ip_network("127.0.0.0/8"),))
    assert got == data
    assert not [e for e in logs if e["event"] == "connection_refused"]


async def test_multifd_channels_join_the_session_with_their_uuid() -> None:
    """Two migrations from one host at once: multifd channels speak before the main channels,
    in an order that the host-and-time rule would get wrong; their UUIDs put them right."""
    from migtap.wire.constants import MigCmd
    from tests.streams import command, configuration, header
    from tests.wire.mfd_streams import mfd_init

    uuids = [bytes([0xA0 + i]) * 16 for i in range(2)]
    with capture_logs() as logs:
        async with fake_destination(sink_handler) as (port, _), tap_relay(port) as relay:
            conns = {}
            for vm in (0, 1):
                for ch in ("main", 0, 1):
                    _, w = await asyncio.open_connection("127.0.0.1", relay.port)
                    conns[vm, ch] = w
                    await asyncio.sleep(0.02)  # accept order: vm0 main, mfd, mfd, vm1 main, ...
            for vm in (1, 0):  # multifd first, newest migration first
                for ch in (0, 1):
                    conns[vm, ch].write(mfd_init(ch, uuids[vm]))
                    await conns[vm, ch].drain()
            await asyncio.sleep(0.1)
            for vm in (0, 1):
                main = header() + configuration(uuid=uuids[vm])
                main += command(MigCmd.MIG_CMD_OPEN_RETURN_PATH)
                conns[vm, "main"].write(main)
                await conns[vm, "main"].drain()
            await asyncio.sleep(0.2)
            for w in conns.values():
                w.write_eof()
            await asyncio.sleep(0.2)
            for w in conns.values():
                w.close()
            async with asyncio.timeout(10):
                while len(relay.sessions_ended) < 2:
                    await asyncio.sleep(0.01)
    joined = [e for e in logs if e["event"] == "channel_joined"]
    by_session: dict[int, list[int]] = {}
    for e in joined:
        by_session.setdefault(e["session"], []).append(e["pipe"])
    # pipes 1-3 are vm0 (main, mfd, mfd), 4-6 vm1
    assert sorted(sorted(p) for p in by_session.values()) == [[1, 2, 3], [4, 5, 6]]


async def test_postcopy_preempt_channel_is_found_and_parsed() -> None:
    """A header-less second connection that starts with a page record naming a block of the
    main channel's RAM list is the postcopy-preempt channel: parsed, its pages counted."""
    from migtap.wire.constants import SectionType
    from tests import streams as s

    blocks = [("pc.ram", 64 * 4096)]
    main = s.header() + s.configuration() + s.ram_start(2, blocks)
    main += s.ram_section(SectionType.QEMU_VM_SECTION_PART, 2, [s.page(0, "pc.ram")])
    preempt = s.page(40 * 4096, "pc.ram") + s.zero(8 * 4096) + s.page(9 * 4096) + s.eos()
    with capture_logs() as logs:
        async with fake_destination(sink_handler) as (port, got), tap_relay(port) as relay:
            _, w_main = await asyncio.open_connection("127.0.0.1", relay.port)
            w_main.write(main)
            await w_main.drain()
            await asyncio.sleep(0.1)
            _, w_pre = await asyncio.open_connection("127.0.0.1", relay.port)
            for i in range(0, len(preempt), 5):  # a few bytes at a time: the probe waits
                w_pre.write(preempt[i : i + 5])
                await w_pre.drain()
            await asyncio.sleep(0.1)
            for w in (w_pre, w_main):
                w.write_eof()
            await asyncio.sleep(0.1)
            for w in (w_pre, w_main):
                w.close()
            async with asyncio.timeout(10):
                while not relay.sessions_ended:
                    await asyncio.sleep(0.01)
    assert [bytes(c.data) for c in got] == [main, preempt]
    (identified,) = [e for e in logs if e["event"] == "channel_identified"]
    assert identified["kind"] == "postcopy-preempt"
    (summary,) = [e for e in logs if e["event"] == "migration_summary"]
    assert summary["channel_kinds"] == ["main", "postcopy-preempt"]
    assert summary["ram_preempt_pages"] == 3
    assert summary["ram_normal_pages"] == 3  # one on main, two on the preempt channel
    assert summary["ram_zero_pages"] == 1
    assert not [e for e in logs if e["event"] in ("parser_detached", "parser_crashed")]
