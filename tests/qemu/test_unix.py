"""Real QEMU 7.2 migrations through migtap over unix sockets (in every combination with TCP) and
through one ranged TCP listener (``HOST:FIRST-LAST`` with ``--forward HOST``)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from structlog.testing import capture_logs

from migtap.config import Address, Config, UnixAddress
from migtap.errors import ConfigError
from migtap.relay.server import Relay
from migtap.tap import TapSettings
from tests.qemu.harness import Pair, vm_pair
from tests.qemu.test_relay_migrations import assert_pages_match, summary

if TYPE_CHECKING:
    from collections.abc import Iterator

ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for sockets (a unix socket path has at most 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="mt-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def tapped_relay(listen: Address | UnixAddress, forward: Address | UnixAddress) -> Relay:
    return Relay(
        Config(listen=listen, forward=forward, grace_period_s=2.0),
        tap=TapSettings(progress_interval_s=0.2),
    )


def uri(addr: Address | UnixAddress) -> str:
    """A QEMU migration URI for an address."""
    return str(addr) if isinstance(addr, UnixAddress) else f"tcp:{addr}"


async def migrate_via(
    pair: Pair,
    *,
    listen_unix: bool,
    forward_unix: bool,
    sockdir: Path,
    caps: dict[str, bool] | None = None,
    params: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Source → migtap → destination, each hop a unix socket or TCP on 127.0.0.1."""
    dst_path = sockdir / "dst.sock"
    await pair.configure(
        caps or {}, params or {}, incoming=f"unix:{dst_path}" if forward_unix else "tcp:127.0.0.1:0"
    )
    forward: Address | UnixAddress = (
        UnixAddress(dst_path) if forward_unix else Address("127.0.0.1", pair.dst_port)
    )
    listen: Address | UnixAddress = (
        UnixAddress(sockdir / "migtap.sock") if listen_unix else Address("127.0.0.1", 0)
    )
    with capture_logs() as logs:
        async with tapped_relay(listen, forward) as relay:
            source_uri = uri(listen) if listen_unix else f"tcp:127.0.0.1:{relay.port}"
            result = await pair.migrate(source_uri)
            assert result.source["status"] == "completed", result.source
            assert result.destination.get("status") == "completed", result.destination
            async with asyncio.timeout(10):
                while not relay.sessions_ended:
                    await asyncio.sleep(0.02)
    await pair.assert_ram_identical()
    if listen_unix:
        assert not (sockdir / "migtap.sock").exists()  # removed on exit
    return result.source, logs


async def test_precopy_unix_to_unix(tmp_path: Path, sockdir: Path) -> None:
    async with vm_pair(tmp_path, random_mib=8) as pair:
        info, logs = await migrate_via(pair, listen_unix=True, forward_unix=True, sockdir=sockdir)
    s = summary(logs)
    assert s["channels"] == ["main"]
    assert s["source"] == "local"
    assert s["bytes_src_to_dst"] >= info["ram"]["transferred"]
    m = assert_pages_match(info, logs)
    assert m["vmdesc"] is True
    assert m["devices_failed"] == 0


async def test_multifd_4_channels_unix_to_unix(tmp_path: Path, sockdir: Path) -> None:
    """A unix source has no host: its five connections still make one session, and reach the
    destination in the order they came in (7.2 takes the first as the main channel)."""
    async with vm_pair(tmp_path, random_mib=16) as pair:
        info, logs = await migrate_via(
            pair,
            listen_unix=True,
            forward_unix=True,
            sockdir=sockdir,
            caps={"multifd": True},
            params={"multifd_channels": 4},
        )
    s = summary(logs)
    assert sorted(s["channels"]) == ["main", "multifd", "multifd", "multifd", "multifd"]
    assert info["ram"]["normal"] >= 16 * 256
    assert_pages_match(info, logs, multifd=True)


@ONE_LOOP
async def test_precopy_unix_to_tcp(tmp_path: Path, sockdir: Path) -> None:
    async with vm_pair(tmp_path, random_mib=8) as pair:
        info, logs = await migrate_via(pair, listen_unix=True, forward_unix=False, sockdir=sockdir)
    assert summary(logs)["channels"] == ["main"]
    assert_pages_match(info, logs)


@ONE_LOOP
async def test_precopy_tcp_to_unix(tmp_path: Path, sockdir: Path) -> None:
    async with vm_pair(tmp_path, random_mib=8) as pair:
        info, logs = await migrate_via(pair, listen_unix=False, forward_unix=True, sockdir=sockdir)
    s = summary(logs)
    assert s["channels"] == ["main"]
    assert s["source"] == "127.0.0.1"
    assert_pages_match(info, logs)


@ONE_LOOP
async def test_multifd_tcp_to_unix(tmp_path: Path, sockdir: Path) -> None:
    async with vm_pair(tmp_path, random_mib=8) as pair:
        info, logs = await migrate_via(
            pair,
            listen_unix=False,
            forward_unix=True,
            sockdir=sockdir,
            caps={"multifd": True},
            params={"multifd_channels": 4},
        )
    assert sorted(summary(logs)["channels"]) == ["main", *["multifd"] * 4]
    assert_pages_match(info, logs, multifd=True)


# -- one ranged listener, two migrations to 127.0.0.2 at the ports they came in on -----------
RANGE = 16


async def ranged_relay(stack: contextlib.AsyncExitStack) -> tuple[Relay, int]:
    """migtap on 127.0.0.1:FIRST-LAST (a random high range; another one if a port is taken),
    forwarding to 127.0.0.2 at the port each connection came in on."""
    for _ in range(20):
        first = random.randrange(20000, 60000 - RANGE)
        relay = tapped_relay(
            Address("127.0.0.1", first, first + RANGE - 1), Address("127.0.0.2", None)
        )
        try:
            await stack.enter_async_context(relay)
        except ConfigError as exc:
            if "in use" in str(exc):
                continue
            raise
        return relay, first
    raise AssertionError("no free port range in 20 tries")


@ONE_LOOP
async def test_two_migrations_through_one_port_range(tmp_path: Path) -> None:
    """As libvirt does with ``--migrateuri tcp://TAP:PORT --listen-address DEST``: each
    destination listens on DEST at a port of the range, the source connects to migtap at that
    same port, and migtap forwards to DEST at the port the connection came in on."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with capture_logs() as logs:
        async with (
            contextlib.AsyncExitStack() as stack,
            vm_pair(tmp_path / "a", random_mib=8) as one,
            vm_pair(tmp_path / "b", random_mib=8) as two,
        ):
            relay, first = await ranged_relay(stack)
            ports = (first + 3, first + RANGE - 2)
            for pair, port in zip((one, two), ports, strict=True):
                # 127.0.0.2 is another address of the loopback: nothing else listens there.
                await pair.configure({}, {}, incoming=f"tcp:127.0.0.2:{port}")
            results = await asyncio.gather(
                *(
                    pair.migrate(f"tcp:127.0.0.1:{port}")
                    for pair, port in zip((one, two), ports, strict=True)
                )
            )
            for r in results:
                assert r.source["status"] == "completed", r.source
                assert r.destination.get("status") == "completed", r.destination
            async with asyncio.timeout(10):
                while len(relay.sessions_ended) < 2:
                    await asyncio.sleep(0.02)
            await one.assert_ram_identical()
            await two.assert_ram_identical()
    ended = [e for e in logs if e["event"] == "session_ended"]
    assert len(ended) == 2
    assert all(e["channels"] == ["main"] for e in ended)
    started = sorted(e["listener"] for e in logs if e["event"] == "session_started")
    assert started == [f"127.0.0.1:{p}" for p in ports]
    summaries = [e for e in logs if e["event"] == "migration_summary"]
    assert len(summaries) == 2
    assert sorted(m["ram_normal_pages"] for m in summaries) == sorted(
        r.source["ram"]["normal"] for r in results
    )
    assert all(m["outcome"] == "completed" for m in summaries)
