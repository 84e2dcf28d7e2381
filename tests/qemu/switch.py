"""Test scaffolding: one address standing in for many destination hosts.

migtap forwards everything to one ``--forward`` address, and a QEMU destination takes one
migration. To send many concurrent migrations through one migtap listener, the tests put this
switch at the forward address: it reads the source VM's UUID from each connection (the main
channel's configuration with the ``validate-uuid`` capability, a multifd channel's header) and
connects it to that VM's destination QEMU, in the order the connections arrived.
"""

from __future__ import annotations

import asyncio
from typing import Self

from migtap.wire.events import Configuration
from migtap.wire.stream import StreamParser


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(1 << 20):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


class UuidSwitch:
    def __init__(self, routes: dict[bytes, int]) -> None:
        self.routes = routes  # VM UUID -> destination QEMU port on 127.0.0.1
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0
        self.unrouted: list[str] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _uuid(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        head = await reader.readexactly(4)
        if head == b"\x11\x22\x33\x44":
            rest = await reader.readexactly(21)
            return (head + rest)[8:24], head + rest
        seen = bytearray(head)
        parser = StreamParser()
        parser.feed(head)
        while True:
            chunk = await reader.read(4096)
            if not chunk:
                raise ConnectionError("no configuration with a UUID")
            seen += chunk
            for event in parser.feed(chunk):
                if isinstance(event, Configuration) and event.uuid is not None:
                    return event.uuid, bytes(seen)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        up_w: asyncio.StreamWriter | None = None
        try:
            try:
                uuid, seen = await self._uuid(reader)
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.routes[uuid])
            except (ConnectionError, OSError, KeyError, asyncio.IncompleteReadError) as exc:
                self.unrouted.append(repr(exc))
                writer.transport.abort()
                return
            up_w.write(seen)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pump(reader, up_w))
                tg.create_task(_pump(up_r, writer))
        finally:
            for w in (up_w, writer):
                if w is not None:
                    w.close()
            self._handlers.discard(task)
