"""A pipe: the two sockets of one relayed connection, with flow control and half-close.

Each socket gets an ``asyncio.Protocol`` (``Side``). ``data_received`` hands us an immutable
``bytes`` that the loop allocated for this read; we pass that same object to the peer's
``transport.write()`` and to the observer, so user space makes no copy of its own (see
docs/performance.md for why this beat a BufferedProtocol with a reused buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import structlog

from migtap.vocabulary import Direction, KernelView, Peer

if TYPE_CHECKING:
    from collections.abc import Callable

log = structlog.get_logger("migtap.relay")


#: ``struct tcp_info``: ``tcpi_bytes_acked`` (u64) at this offset (Linux 4.1+).
_TCPI_BYTES_ACKED = 120


@functools.cache
def receive_buffer_bound() -> int:
    """The most bytes a Linux kernel holds unread for one TCP socket (``net.ipv4.tcp_rmem``'s
    maximum; this host's, the right one for a destination on the same host)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 6 * 1024 * 1024  # Linux's default


def kernel_view(transport: asyncio.BaseTransport | None, *, reset: bool) -> KernelView:
    """Ask the kernel how many bytes the destination acknowledged (``TCP_INFO``); the socket
    must still be open (connection_lost and eof_received run before it is closed)."""
    acked = None
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError, struct.error):
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            # counts the SYN too: one more than the data bytes
            acked = max(0, struct.unpack_from("=Q", info, _TCPI_BYTES_ACKED)[0] - 1)
    return KernelView(acked, reset, receive_buffer_bound())


def reset(transport: asyncio.Transport) -> None:
    """Close with a TCP RST (SO_LINGER 0), so the peer sees a reset and not a clean EOF.

    ``abort()`` alone drops our buffers but still ends the connection with a FIN.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class PipeObserver(Protocol):
    """Watches the bytes of a pipe. Called on the loop: must be cheap and must not raise."""

    def on_chunk(self, pipe: Pipe, direction: Direction, offset: int, chunk: bytes) -> None: ...

    def on_pipe_closed(self, pipe: Pipe) -> None: ...


class Side(asyncio.Protocol):
    """One socket of a pipe: the source-facing (downstream) or destination-facing (upstream) one."""

    def __init__(self, pipe: Pipe, *, upstream: bool) -> None:
        self.pipe = pipe
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.peer: Side  # set by Pipe
        self.pause_reasons: set[str] = set()
        self.eof = False  # this socket has sent us EOF
        self.lost = False
        self.direction = Direction.DST_TO_SRC if upstream else Direction.SRC_TO_DST
        self.bytes = 0  # bytes read from this socket
        self.peer_name: tuple[object, ...] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport but has the same API.
        self.transport = cast("asyncio.Transport", transport)
        self.peer_name = transport.get_extra_info("peername")
        high, low = self.pipe.tuning.write_limits
        self.transport.set_write_buffer_limits(high=high, low=low)
        tuning = self.pipe.tuning
        if tuning.socket_buffer:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, tuning.socket_buffer)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, tuning.socket_buffer)
        if tuning.read_size and hasattr(transport, "max_size"):
            # asyncio's selector transport reads at most ``max_size`` bytes per recv (256 KiB);
            # uvloop has no such knob.
            transport.max_size = tuning.read_size
        self.pipe.side_connected(self)

    def data_received(self, data: bytes) -> None:
        if self.pipe.refused:
            return
        peer = self.peer.transport
        offset = self.bytes
        self.bytes = offset + len(data)
        if peer is not None:
            if not self.peer.lost:
                peer.write(data)
        else:
            # Not connected upstream yet (uvloop may deliver a read before our pause takes
            # effect): hold the chunk until the destination is connected; reading stays paused.
            self.pipe.pending.append(data)
            self.pause("connecting")
        observer = self.pipe.observer
        if observer is not None:
            observer.on_chunk(self.pipe, self.direction, offset, data)

    def eof_received(self) -> bool:
        if self.upstream and self.pipe.kernel_view is None:
            self.pipe.kernel_view = kernel_view(self.transport, reset=False)
        self.eof = True
        self.pipe.side_eof(self)
        return True  # keep our write side open: the other direction may still flow

    def pause_writing(self) -> None:
        # Our outgoing buffer is full: stop reading from the socket that feeds it.
        self.peer.pause("peer")

    def resume_writing(self) -> None:
        self.peer.resume("peer")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream and self.pipe.kernel_view is None and self.transport is not None:
            self.pipe.kernel_view = kernel_view(self.transport, reset=exc is not None)
        self.lost = True
        self.pipe.side_lost(self, exc)

    # -- flow control ---------------------------------------------------------------------
    def pause(self, reason: str) -> None:
        was_reading = not self.pause_reasons
        self.pause_reasons.add(reason)
        t = self.transport
        if was_reading and t is not None and not t.is_closing():
            t.pause_reading()

    def resume(self, reason: str) -> None:
        if reason not in self.pause_reasons:
            return
        self.pause_reasons.discard(reason)
        t = self.transport
        if not self.pause_reasons and t is not None and not t.is_closing():
            t.resume_reading()


@dataclass(frozen=True, slots=True)
class Tuning:
    """Socket settings, measured by scripts/bench_relay.py (docs/performance.md)."""

    write_limits: tuple[int, int] = (4 * 1024 * 1024, 1024 * 1024)
    socket_buffer: int = 0  # SO_SNDBUF/SO_RCVBUF; 0 keeps the kernel's autotuning
    read_size: int = 1024 * 1024  # asyncio only: bytes per read; 0 keeps asyncio's 256 KiB


class Pipe:
    """The source connection and its upstream connection to the destination."""

    def __init__(
        self,
        pipe_id: int,
        *,
        tuning: Tuning,
        observer: PipeObserver | None = None,
        on_closed: Callable[[Pipe], None] | None = None,
        admit: Callable[[tuple[object, ...] | None], bool] | None = None,
    ) -> None:
        self.pipe_id = pipe_id
        self.tuning = tuning
        self.observer = observer
        self._on_closed = on_closed
        self._admit = admit
        self.refused = False  # the source's address is not allowed (--allow)
        self.pending: list[bytes] = []  # source bytes read before the destination connected
        self.downstream = Side(self, upstream=False)
        self.upstream = Side(self, upstream=True)
        self.downstream.peer = self.upstream
        self.upstream.peer = self.downstream
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.ended: float | None = None
        self.close_reason: str | None = None
        self.first_closed: Peer | None = None  # who ended first
        self.reset_by: Peer | None = None  # who reset the connection
        #: The kernel's view of the destination's side when it first ended the connection.
        self.kernel_view: KernelView | None = None
        self.error: str | None = None
        self.log = log.bind(pipe=pipe_id)
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def bytes_src_to_dst(self) -> int:
        return self.downstream.bytes

    @property
    def bytes_dst_to_src(self) -> int:
        return self.upstream.bytes

    @property
    def source(self) -> tuple[object, ...] | None:
        return self.downstream.peer_name

    @property
    def destination(self) -> tuple[object, ...] | None:
        return self.upstream.peer_name

    def side_connected(self, side: Side) -> None:
        if side is self.downstream:
            if self._admit is not None and not self._admit(side.peer_name):
                self.refused = True
                self.close_reason = "refused"
                self.upstream.lost = True
                if side.transport is not None:
                    reset(side.transport)
                return
            # Hold the source until the destination is connected; the kernel buffers meanwhile.
            side.pause("connecting")
        elif self.downstream.lost:
            # The source left while we were connecting: nothing to relay.
            self.upstream.lost = True
            if side.transport is not None:
                side.transport.close()
        else:
            assert side.transport is not None
            for chunk in self.pending:
                side.transport.write(chunk)
            self.pending.clear()
            if self.downstream.eof:
                self.side_eof(self.downstream)
            self.downstream.resume("connecting")

    def upstream_failed(self, reason: str) -> None:
        """The destination could not be reached: the source must see the failure at once."""
        self.error = reason
        self.close_reason = "upstream_failed"
        self.upstream.lost = True
        t = self.downstream.transport
        if t is not None:
            reset(t)  # RST: the source's migration fails now instead of waiting
        self._maybe_finish()

    def _note_first(self, side: Side) -> None:
        if self.first_closed is None:
            self.first_closed = Peer.DESTINATION if side.upstream else Peer.SOURCE

    def side_eof(self, side: Side) -> None:
        self._note_first(side)
        peer = side.peer.transport
        if peer is not None and not side.peer.lost and peer.can_write_eof():
            try:
                peer.write_eof()
            except OSError as exc:  # the peer socket is already broken
                side.peer.lost = True
                self.error = f"write_eof: {exc}"
        if self.downstream.eof and self.upstream.eof:
            self.close_reason = self.close_reason or "eof_both"
            self._close_both(abort=False)

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        self._note_first(side)
        if exc is not None and self.reset_by is None:
            self.reset_by = Peer.DESTINATION if side.upstream else Peer.SOURCE
        other = side.peer
        if exc is not None and self.error is None:
            self.error = f"{'destination' if side.upstream else 'source'}: {exc!r}"
        if self.close_reason is None:
            who = "destination" if side.upstream else "source"
            self.close_reason = f"{who}_reset" if exc is not None else f"{who}_closed"
        t = other.transport
        if t is not None and not other.lost and not t.is_closing():
            if exc is not None:
                reset(t)  # pass a reset on as a reset
            else:
                t.close()  # flush what is queued, then FIN
        self._maybe_finish()

    def abort(self, reason: str) -> None:
        """Tear the pipe down now (shutdown after the grace period)."""
        self.close_reason = self.close_reason or reason
        self._close_both(abort=True)

    def _close_both(self, *, abort: bool) -> None:
        for s in (self.downstream, self.upstream):
            t = s.transport
            if t is not None and not t.is_closing():
                if abort:
                    reset(t)
                else:
                    t.close()
            elif t is None:
                s.lost = True
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.ended is not None:
            return
        if not (self.downstream.lost and (self.upstream.lost or self.upstream.transport is None)):
            return
        if self.upstream.transport is None:
            self.upstream.lost = True
        self.ended = time.monotonic()
        if not self.closed.done():
            self.closed.set_result(None)
        if self.observer is not None:
            self.observer.on_pipe_closed(self)
        if self._on_closed is not None:
            self._on_closed(self)
