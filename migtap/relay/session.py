"""Sessions: the connections of one migration (main channel, multifd channels, preempt channel)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from migtap.relay.pipe import Direction, Pipe
from migtap.sinks import ChannelInfo
from migtap.wire.channel import ChannelKind, classify

if TYPE_CHECKING:
    from collections.abc import Callable

    from migtap.tap import ChannelTap, SessionTap

log = structlog.get_logger("migtap.relay")

#: Bytes held per connection before its kind is known (classification needs at most 4).
MAX_PENDING = 64 * 1024


@dataclass(slots=True)
class Channel:
    """One connection of a session, as the relay sees it."""

    pipe: Pipe
    kind: ChannelKind | None = None
    prefix: bytes = b""
    pending: list[tuple[Direction, int, bytes]] = field(default_factory=list)
    tap: ChannelTap | None = None


@dataclass(slots=True, eq=False)
class Session:
    session_id: int
    source_host: str
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    channels: list[Channel] = field(default_factory=list)
    ended: float | None = None
    tap: SessionTap | None = None
    pause_reasons: set[str] = field(default_factory=set)

    @property
    def open(self) -> bool:
        return self.ended is None

    def totals(self) -> tuple[int, int]:
        s2d = sum(c.pipe.bytes_src_to_dst for c in self.channels)
        d2s = sum(c.pipe.bytes_dst_to_src for c in self.channels)
        return s2d, d2s

    # Throttle: a sink (the capture writer) holds every socket of the session back.
    def pause(self, reason: str) -> None:
        self.pause_reasons.add(reason)
        for c in self.channels:
            c.pipe.downstream.pause(reason)
            c.pipe.upstream.pause(reason)

    def resume(self, reason: str) -> None:
        self.pause_reasons.discard(reason)
        for c in self.channels:
            c.pipe.downstream.resume(reason)
            c.pipe.upstream.resume(reason)


def host_of(peer: tuple[object, ...] | None) -> str:
    return str(peer[0]) if peer else "?"


def _fmt(addr: tuple[object, ...] | None) -> str | None:
    if not addr or len(addr) < 2:
        return None
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class SessionRegistry:
    """Groups pipes into sessions as their first bytes arrive, and feeds each session's tap.

    A main channel (``QEVM``) opens a new session. A multifd or unrecognised channel joins the
    newest open session from the same source host that has a main channel, or else opens its own.
    With several concurrent migrations from one host that carry no distinguishing UUID, the
    grouping of their multifd channels is a best guess; every byte is still relayed exactly.
    """

    def __init__(
        self,
        on_session_end: Callable[[Session], None] | None = None,
        tap_factory: Callable[[Session], SessionTap | None] | None = None,
    ) -> None:
        self._next_id = 1
        self.sessions: dict[int, Session] = {}
        self._by_pipe: dict[int, Channel] = {}
        self._session_of: dict[int, Session] = {}
        self._on_session_end = on_session_end
        self._tap_factory = tap_factory

    def _new_session(self, host: str, first: Channel) -> Session:
        session = Session(self._next_id, host)
        self._next_id += 1
        self.sessions[session.session_id] = session
        log.info(
            "session_started",
            session=session.session_id,
            source=host,
            first_channel=first.kind.value if first.kind else "pending",
        )
        if self._tap_factory is not None:
            session.tap = self._tap_factory(session)
        return session

    def add_pipe(self, pipe: Pipe) -> None:
        self._by_pipe[pipe.pipe_id] = Channel(pipe)

    def on_chunk(self, pipe: Pipe, direction: Direction, offset: int, chunk: bytes) -> None:
        channel = self._by_pipe.get(pipe.pipe_id)
        if channel is None:
            return
        tap = channel.tap
        if tap is not None:
            session = self._session_of[pipe.pipe_id]
            assert session.tap is not None
            session.tap.on_chunk(tap, direction, offset, chunk)
            return
        if channel.kind is not None:
            return  # classified, but its session has no tap
        if sum(len(c) for _, _, c in channel.pending) < MAX_PENDING:
            channel.pending.append((direction, offset, chunk))
        if direction is Direction.SRC_TO_DST and len(channel.prefix) < 4:
            channel.prefix += chunk[: 4 - len(channel.prefix)]
            kind = classify(channel.prefix)
            if kind is not None:
                self._assign(channel, kind)

    def on_pipe_closed(self, pipe: Pipe) -> None:
        channel = self._by_pipe.pop(pipe.pipe_id, None)
        if channel is None or pipe.refused:
            return
        if channel.kind is None:
            # Closed before we could tell what it was (refused upstream, no bytes, short prefix).
            self._assign(channel, classify(channel.prefix) or ChannelKind.UNKNOWN)
        session = self._session_of.pop(pipe.pipe_id)
        if session.tap is not None and channel.tap is not None:
            session.tap.channel_closed(
                channel.tap, pipe.close_reason, pipe.first_closed, pipe.reset_by
            )
        if all(c.pipe.ended is not None for c in session.channels) and session.ended is None:
            session.ended = time.monotonic()
            del self.sessions[session.session_id]
            if self._on_session_end is not None:
                self._on_session_end(session)

    def _assign(self, channel: Channel, kind: ChannelKind) -> None:
        channel.kind = kind
        pipe = channel.pipe
        session = self._session_of.get(pipe.pipe_id)
        if session is None:
            session = self._find_session(channel, kind)
            if session is None:
                session = self._new_session(host_of(pipe.source), channel)
            session.channels.append(channel)
            self._session_of[pipe.pipe_id] = session
            for reason in session.pause_reasons:
                pipe.downstream.pause(reason)
                pipe.upstream.pause(reason)
        index = session.channels.index(channel)
        log.info(
            "channel_joined",
            session=session.session_id,
            pipe=pipe.pipe_id,
            kind=kind.value,
            index=index,
        )
        if session.tap is not None:
            info = ChannelInfo(
                index=index,
                pipe_id=pipe.pipe_id,
                kind=kind.value,
                source=_fmt(pipe.source),
                destination=_fmt(pipe.destination),
                started_wall=pipe.started_wall,
            )
            channel.tap = session.tap.add_channel(info, kind)
            pending, channel.pending = channel.pending, []
            for direction, offset, chunk in pending:
                session.tap.on_chunk(channel.tap, direction, offset, chunk)
        else:
            channel.pending = []

    def _find_session(self, channel: Channel, kind: ChannelKind) -> Session | None:
        if kind is ChannelKind.MAIN:
            return None
        host = host_of(channel.pipe.source)

        def live_main(s: Session) -> bool:
            return any(
                c.kind in (ChannelKind.MAIN, None) and c.pipe.ended is None for c in s.channels
            )

        candidates = [
            s for s in self.sessions.values() if s.open and s.source_host == host and live_main(s)
        ]
        if candidates:
            return max(candidates, key=lambda s: s.started)
        # QEMU connects the main channel first, but its first bytes may arrive after a multifd
        # channel's: anchor a session on the oldest earlier connection not yet classified.
        earlier = [
            c
            for c in self._by_pipe.values()
            if c.kind is None
            and c.pipe.pipe_id < channel.pipe.pipe_id
            and c.pipe.ended is None
            and host_of(c.pipe.source) == host
            and c.pipe.pipe_id not in self._session_of
        ]
        if not earlier:
            return None
        anchor = min(earlier, key=lambda c: c.pipe.pipe_id)
        session = self._new_session(host, anchor)
        session.channels.append(anchor)
        self._session_of[anchor.pipe.pipe_id] = session
        return session
