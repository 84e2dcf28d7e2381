"""Unix sockets (listen and forward, with TCP in every combination) and port ranges, with real
sockets on both loops."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from structlog.testing import capture_logs

from migtap.config import Address, Config, UnixAddress
from migtap.errors import ConfigError
from migtap.relay.server import Relay
from tests.relay.netutil import Received, fake_destination, read_all, sink_handler

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

QEVM = b"QEVM\x00\x00\x00\x03"
MULTIFD = b"\x11\x22\x33\x44" + bytes(60)


def payload(size: int, seed: int = 0) -> bytes:
    return QEVM + random.Random(seed).randbytes(size)


@pytest.fixture
def sockdir() -> Path:
    """A short private directory: a unix socket path has at most 107 bytes (tmp_path may not)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="mt-"))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@contextlib.asynccontextmanager
async def fake_unix_destination(
    path: Path,
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter, Received], Awaitable[None]],
) -> AsyncIterator[list[Received]]:
    async with fake_destination(handler, unix_path=path) as (_, conns):
        yield conns


async def wait_sessions(relay: Relay, n: int = 1) -> None:
    async with asyncio.timeout(10):
        while len(relay.sessions_ended) < n:
            await asyncio.sleep(0.01)


def relay(listen: Address | UnixAddress, forward: Address | UnixAddress, **kw: object) -> Relay:
    return Relay(Config(listen=listen, forward=forward, grace_period_s=2.0, **kw))  # type: ignore[arg-type]


async def connect(
    target: Relay | Path | tuple[str, int],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if isinstance(target, Path):
        return await asyncio.open_unix_connection(str(target))
    if isinstance(target, Relay):
        if target.unix_path is not None:
            return await asyncio.open_unix_connection(str(target.unix_path))
        return await asyncio.open_connection("127.0.0.1", target.port)
    return await asyncio.open_connection(*target)


async def one_migration(r: Relay, data: bytes) -> bytes:
    """A source that sends ``data``, half-closes and reads the return path to EOF."""
    reader, writer = await connect(r)
    writer.write(data)
    writer.write_eof()
    back = await read_all(reader)
    writer.close()
    return back


async def shut_after_eof(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rec: Received
) -> None:
    while chunk := await reader.read(1 << 16):
        rec.data += chunk
    writer.write(b"SHUT")  # the return path, after the source's EOF
    await writer.drain()


# -- unix sockets in every combination with TCP -----------------------------------------------
@pytest.mark.parametrize(
    ("listen_unix", "forward_unix"), [(True, False), (False, True), (True, True)]
)
async def test_unix_and_tcp_combinations_pass_bytes_both_ways(
    sockdir: Path, listen_unix: bool, forward_unix: bool
) -> None:
    data = payload(4 * 1024 * 1024)
    dest_path = sockdir / "dst.sock"
    async with contextlib.AsyncExitStack() as stack:
        if forward_unix:
            conns = await stack.enter_async_context(
                fake_unix_destination(dest_path, shut_after_eof)
            )
            forward: Address | UnixAddress = UnixAddress(dest_path)
        else:
            port, conns = await stack.enter_async_context(fake_destination(shut_after_eof))
            forward = Address("127.0.0.1", port)
        listen = UnixAddress(sockdir / "migtap.sock") if listen_unix else Address("127.0.0.1", 0)
        with capture_logs() as logs:
            async with relay(listen, forward) as r:
                back = await one_migration(r, data)
                await wait_sessions(r)
    assert conns[0].sha256 == hashlib.sha256(data).hexdigest()
    assert back == b"SHUT"
    (ended,) = [e for e in logs if e["event"] == "session_ended"]
    assert ended["bytes_src_to_dst"] == len(data)
    assert ended["source"] == ("local" if listen_unix else "127.0.0.1")
    (listening,) = [e for e in logs if e["event"] == "listening"]
    assert listening["forward"] == str(forward)
    if listen_unix:
        assert listening["listen"] == [f"unix:{sockdir / 'migtap.sock'}"]
        assert listening["mode"] == "0600"
        assert not (sockdir / "migtap.sock").exists()  # removed on exit


async def test_unix_socket_is_owner_only_by_default_and_listen_mode_widens_it(
    sockdir: Path,
) -> None:
    async with fake_destination(sink_handler) as (port, _):
        path = sockdir / "a.sock"
        async with relay(UnixAddress(path), Address("127.0.0.1", port)):
            st = path.lstat()
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
        assert not path.exists()
        async with relay(UnixAddress(path), Address("127.0.0.1", port), listen_mode=0o660):
            assert stat.S_IMODE(path.lstat().st_mode) == 0o660
        assert not path.exists()


def test_the_umask_is_restored_after_bind(sockdir: Path) -> None:
    from migtap.relay.server import bind_unix

    old = os.umask(0o022)
    try:
        sock = bind_unix(sockdir / "u.sock", 0o600)
        sock.close()
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(old)


async def test_stale_socket_file_is_replaced(sockdir: Path) -> None:
    path = sockdir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays; nothing listens: a crashed earlier run
    assert path.exists()
    async with fake_destination(sink_handler) as (port, conns):
        with capture_logs() as logs:
            async with relay(UnixAddress(path), Address("127.0.0.1", port)) as r:
                await one_migration(r, QEVM)
                await wait_sessions(r)
    assert conns[0].data == QEVM
    assert [e["path"] for e in logs if e["event"] == "stale_socket_removed"] == [str(path)]
    assert not path.exists()


async def test_socket_in_use_is_a_usage_error_and_left_alone(sockdir: Path) -> None:
    path = sockdir / "busy.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(ConfigError, match="is in use: something listens on it"):
            async with relay(UnixAddress(path), Address("127.0.0.1", 9)):
                pass
        assert path.exists()  # still the other listener's
    finally:
        live.close()


async def test_a_file_that_is_not_a_socket_is_never_replaced(sockdir: Path) -> None:
    path = sockdir / "file"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        async with relay(UnixAddress(path), Address("127.0.0.1", 9)):
            pass
    assert path.read_text() == "keep me"


async def test_exit_leaves_a_socket_file_that_another_process_put_there(sockdir: Path) -> None:
    path = sockdir / "m.sock"
    async with relay(UnixAddress(path), Address("127.0.0.1", 9)):
        path.unlink()  # replaced meanwhile (an operator, or a second migtap after a stale check)
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(path))
    try:
        assert path.exists()
    finally:
        other.close()


async def test_unix_multifd_channels_group_and_keep_accept_order(sockdir: Path) -> None:
    """A unix source has no host: its channels still form one session, connected upstream in
    the order they came in (a 7.2 destination takes the first as the main channel)."""
    path = sockdir / "mf.sock"

    async def dest(reader, writer, rec: Received) -> None:
        rec.data += await read_all(reader)

    with capture_logs() as logs:
        async with (
            fake_unix_destination(sockdir / "d.sock", dest) as conns,
            relay(UnixAddress(path), UnixAddress(sockdir / "d.sock")) as r,
        ):
            writers = []
            for prefix in (QEVM, MULTIFD, MULTIFD, MULTIFD, MULTIFD):
                _, w = await asyncio.open_unix_connection(str(path))
                writers.append((w, prefix))
            for w, prefix in reversed(writers):  # bytes arrive multifd first, main last
                w.write(prefix)
                await w.drain()
                await asyncio.sleep(0.01)
            for w, _ in writers:
                w.write_eof()
            await asyncio.sleep(0.2)
            for w, _ in writers:
                w.close()
            await wait_sessions(r)
    assert [c.data[:4] for c in conns] == [b"QEVM"] + [MULTIFD[:4]] * 4
    (ended,) = [e for e in logs if e["event"] == "session_ended"]
    assert sorted(ended["channels"]) == ["main", "multifd", "multifd", "multifd", "multifd"]


# -- port ranges ------------------------------------------------------------------------------
async def ranged_relay(size: int, **kw: object) -> tuple[Relay, int]:
    """A relay on 127.0.0.1:FIRST-LAST in a random high range, retried when a port is taken."""
    for _ in range(20):
        first = random.randrange(20000, 60000)
        r = relay(Address("127.0.0.1", first, first + size - 1), Address("127.0.0.2", None), **kw)
        try:
            await r.__aenter__()
        except ConfigError as exc:
            if "in use" in str(exc):
                continue
            raise
        return r, first
    raise AssertionError("no free port range found")


async def test_range_listens_on_every_port_and_forwards_to_the_same_port() -> None:
    """Two migrations on two ports of one range reach two destinations on 127.0.0.2 at the
    ports they came in on."""
    with capture_logs() as logs:
        r, first = await ranged_relay(4)
        try:
            assert sorted({p for _, p in r.addresses}) == list(range(first, first + 4))
            servers = []
            conns: dict[int, list[Received]] = {first: [], first + 2: []}
            for port, got_here in conns.items():

                async def on_conn(reader, writer, got=got_here) -> None:
                    rec = Received()
                    got.append(rec)
                    await shut_after_eof(reader, writer, rec)
                    writer.close()

                servers.append(await asyncio.start_server(on_conn, "127.0.0.2", port))
            try:
                a = asyncio.ensure_future(
                    one_migration_to(("127.0.0.1", first), payload(100_000, 1))
                )
                b = asyncio.ensure_future(
                    one_migration_to(("127.0.0.1", first + 2), payload(100_000, 2))
                )
                async with asyncio.timeout(10):
                    assert await a == b"SHUT"
                    assert await b == b"SHUT"
                await wait_sessions(r, 2)
            finally:
                for s in servers:
                    s.close()
                    await s.wait_closed()
        finally:
            await r.__aexit__(None, None, None)
    assert conns[first][0].data == payload(100_000, 1)
    assert conns[first + 2][0].data == payload(100_000, 2)
    (listening,) = [e for e in logs if e["event"] == "listening"]
    assert listening["listen"] == [f"127.0.0.1:{first}-{first + 3}"]
    assert listening["ports"] == 4
    assert listening["forward"] == "127.0.0.2"
    sources = sorted(e["listener"] for e in logs if e["event"] == "session_started")
    assert sources == [f"127.0.0.1:{first}", f"127.0.0.1:{first + 2}"]


async def one_migration_to(addr: tuple[str, int], data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(data)
    writer.write_eof()
    back = await read_all(reader)
    writer.close()
    return back


async def test_a_taken_port_in_the_range_fails_them_all() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    first = max(1024, port - 2)
    try:
        with pytest.raises(ConfigError) as info:
            async with relay(Address("127.0.0.1", first, port + 2), Address("127.0.0.2", None)):
                pass
        assert f"cannot listen on 127.0.0.1:{port} (of 127.0.0.1:{first}-{port + 2})" in str(
            info.value
        )
        # nothing stays bound: every port of the range but the taken one is free again
        for p in range(first, port + 3):
            if p != port:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    with contextlib.suppress(OSError):  # someone else's port: not ours to judge
                        s.bind(("127.0.0.1", p))
    finally:
        taken.close()


async def test_channels_on_different_ports_of_a_range_are_different_sessions() -> None:
    """A multifd channel joins the session of the main channel on its own port only."""
    r, first = await ranged_relay(2)
    try:

        async def drain(reader, writer) -> None:
            await read_all(reader)
            writer.close()

        servers = [await asyncio.start_server(drain, "127.0.0.2", p) for p in (first, first + 1)]
        try:
            _, w1 = await asyncio.open_connection("127.0.0.1", first)
            w1.write(QEVM)
            await w1.drain()
            await asyncio.sleep(0.1)
            _, w2 = await asyncio.open_connection("127.0.0.1", first + 1)
            w2.write(MULTIFD)
            await w2.drain()
            await asyncio.sleep(0.2)
            sessions = list(r.registry.sessions.values())
            assert len(sessions) == 2
            assert {s.listener for s in sessions} == {
                f"127.0.0.1:{first}",
                f"127.0.0.1:{first + 1}",
            }
            for w in (w1, w2):
                w.write_eof()
            await wait_sessions(r, 2)
            w1.close()
            w2.close()
        finally:
            for s in servers:
                s.close()
                await s.wait_closed()
    finally:
        await r.__aexit__(None, None, None)
