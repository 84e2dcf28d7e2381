"""Real sockets on 127.0.0.1 for relay tests: a fake destination and a fake source."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from migtap.config import Address, Config
from migtap.relay.server import Relay

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path


@dataclass
class Received:
    data: bytearray = field(default_factory=bytearray)
    eof: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


Handler = "Callable[[asyncio.StreamReader, asyncio.StreamWriter, Received], Awaitable[None]]"


async def sink_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rec: Received
) -> None:
    """Read to EOF, then close: a plain precopy destination."""
    while chunk := await reader.read(1 << 16):
        rec.data += chunk
    rec.eof.set()
    writer.close()


@contextlib.asynccontextmanager
async def fake_destination(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter, Received], Awaitable[None]],
    *,
    unix_path: Path | None = None,
) -> AsyncIterator[tuple[int, list[Received]]]:
    """A destination on 127.0.0.1 (its port), or on the unix socket ``unix_path`` (port 0),
    and what each of its connections received."""
    conns: list[Received] = []
    writers: list[asyncio.StreamWriter] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rec = Received()
        conns.append(rec)
        writers.append(writer)
        try:
            await handler(reader, writer, rec)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    if unix_path is None:
        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    else:
        server = await asyncio.start_unix_server(on_conn, str(unix_path))
        port = 0
    try:
        yield port, conns
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()
        if unix_path is not None:
            unix_path.unlink(missing_ok=True)  # noqa: ASYNC240 - a test's clean-up


def relay_for(port: int, **kw: object) -> Relay:
    return Relay(
        Config(
            listen=Address("127.0.0.1", 0),
            forward=Address("127.0.0.1", port),
            grace_period_s=kw.pop("grace_period_s", 2.0),  # type: ignore[arg-type]
            **kw,  # type: ignore[arg-type]
        )
    )


async def read_all(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while chunk := await reader.read(1 << 16):
        out += chunk
    return bytes(out)
