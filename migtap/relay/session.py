"""Sessions: the connections of one migration (main channel, multifd channels, preempt channel)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from migtap.errors import StreamError
from migtap.vocabulary import ChannelInfo, ChannelKind, Direction
from migtap.wire.channel import classify
from migtap.wire.events import MultifdInit
from migtap.wire.multifd import MULTIFD_INIT_SIZE, MultifdParser

if TYPE_CHECKING:
    from collections.abc import Callable

    from migtap.relay.pipe import Pipe
    from migtap.tap import ChannelTap, SessionTap

log = structlog.get_logger("migtap.relay")

#: Bytes held per connection before its kind is known (classification needs at most 4).
MAX_PENDING = 64 * 1024
#: Bytes held per multifd connection waiting for its session's main channel to show the UUID.
MAX_WAITING = 16 * 1024 * 1024
NO_UUID = bytes(16)


def multifd_uuid(prefix: bytes) -> bytes | None:
    """The source VM's UUID from a multifd channel's MultiFDInit, as the wire parser reads it;
    None if the init does not parse (the tap's own parser will say why)."""
    try:
        events = MultifdParser().feed(prefix[:MULTIFD_INIT_SIZE])
    except StreamError:
        return None
    init = next((e for e in events if isinstance(e, MultifdInit)), None)
    return None if init is None else init.uuid.bytes


@dataclass(slots=True)
class Channel:
    """One connection of a session, as the relay sees it."""

    pipe: Pipe
    kind: ChannelKind | None = None
    prefix: bytes = b""
    pending: list[tuple[Direction, int, bytes]] = field(default_factory=list)
    pending_bytes: int = 0
    tap: ChannelTap | None = None
    session_tap: SessionTap | None = None  # the tap of the session this channel joined
    uuid: bytes | None = None  # a multifd channel's source VM UUID
    waiting: bool = False  # a multifd channel waiting for the main channel with its UUID
    listener: str = ""  # the listening address that accepted it (a port of a range, unix:PATH)


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
    uuid: bytes | None = None  # the source VM's UUID, from the main channel's configuration
    listener: str = ""  # the listening address its connections came in on
    #: Its configuration carried no UUID: multifd channels from its host with an unclaimed
    #: UUID need not wait for one (libvirt gives QEMU ``-uuid`` but not ``validate-uuid``).
    no_uuid: bool = False

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


#: The source "host" of a connection on a unix socket: it came from this machine.
LOCAL = "local"


def host_of(peer: object) -> str:
    """The source host of a connection; a unix socket's peer (a path, usually empty) has none."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    if isinstance(peer, str | bytes):
        return LOCAL
    return "?"


def fmt_addr(addr: object) -> str | None:
    """A socket address as a person types it: ``host:port``, ``[v6]:port`` or ``unix:PATH``."""
    if isinstance(addr, bytes):
        addr = addr.decode(errors="replace")
    if isinstance(addr, str):
        return f"unix:{addr}" if addr else None  # an unnamed unix peer (a client) has no path
    if not isinstance(addr, tuple) or len(addr) < 2:
        return None
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class SessionRegistry:
    """Groups pipes into sessions as their first bytes arrive, and feeds each session's tap.

    A main channel (``QEVM``) opens a new session. A multifd channel carries its VM's UUID:
    it joins the session whose main channel showed the same UUID in its configuration (QEMU
    sends it with ``validate-uuid``), waiting for that if needed, but only until a main channel
    from its host shows a configuration without one (libvirt gives ``-uuid``, not
    ``validate-uuid``): then it joins by the host rule. Without a UUID (QEMU's default
    is all zeros), a multifd or unrecognised channel joins the newest open session from the same
    source host (``local`` for a unix socket) on the same listener that has a main channel, or
    else opens its own; with several concurrent
    migrations from one host that is a best guess. Every byte is relayed exactly either way.
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
        self._by_uuid: dict[bytes, Session] = {}
        self._waiting: dict[bytes, list[Channel]] = {}

    def _new_session(self, host: str, first: Channel) -> Session:
        session = Session(self._next_id, host, listener=first.listener)
        self._next_id += 1
        self.sessions[session.session_id] = session
        log.info(
            "session_started",
            session=session.session_id,
            source=host,
            listener=first.listener or None,
            first_channel=first.kind.value if first.kind else "pending",
        )
        if self._tap_factory is not None:
            session.tap = self._tap_factory(session)
            if session.tap is not None:
                session.tap.on_uuid = lambda uuid: self._session_uuid(session, uuid)
        return session

    def _session_uuid(self, session: Session, uuid: bytes | None) -> None:
        """The main channel named its VM: multifd channels with that UUID belong here. Or it
        showed its configuration without a UUID: channels from its host and listener waiting
        for theirs to be named join by the host rule now, as channels without a UUID do."""
        if not session.open:
            return
        if uuid is None or uuid == NO_UUID:
            session.no_uuid = True
            for channels in list(self._waiting.values()):
                for channel in list(channels):
                    if self._same_origin(channel, session):
                        self._stop_waiting(channel)
            return
        session.uuid = uuid
        self._by_uuid[uuid] = session
        for channel in self._waiting.pop(uuid, []):
            channel.waiting = False
            if channel.pipe.pipe_id in self._by_pipe:
                self._assign(channel, ChannelKind.MULTIFD, session)

    def add_pipe(self, pipe: Pipe, listener: str = "") -> None:
        """A new connection, accepted on ``listener`` (channels group only with channels that
        came in on the same one: each port of a range is its own destination)."""
        self._by_pipe[pipe.pipe_id] = Channel(pipe, listener=listener)

    def on_chunk(self, pipe: Pipe, direction: Direction, offset: int, chunk: bytes) -> None:
        channel = self._by_pipe.get(pipe.pipe_id)
        if channel is None:
            return
        tap = channel.tap
        if tap is not None:
            assert channel.session_tap is not None
            try:
                channel.session_tap.on_chunk(tap, direction, offset, chunk)
            except Exception:  # a tap bug: stop tapping this connection, keep relaying it
                log.exception(
                    "tap_crashed", pipe=pipe.pipe_id, action="connection no longer tapped"
                )
                channel.tap = None
            return
        if channel.kind is not None and not channel.waiting:
            return  # classified, but its session has no tap
        self._before_session(channel, direction, offset, chunk)

    def _before_session(
        self, channel: Channel, direction: Direction, offset: int, chunk: bytes
    ) -> None:
        """Hold a chunk for the tap until the connection's kind (and session) is known."""
        if channel.pending_bytes < (MAX_WAITING if channel.waiting else MAX_PENDING):
            channel.pending.append((direction, offset, chunk))
            channel.pending_bytes += len(chunk)
        elif channel.waiting:
            self._stop_waiting(channel)  # no main channel named this UUID in time
            return
        if direction is not Direction.SRC_TO_DST or channel.waiting:
            return
        if len(channel.prefix) < MULTIFD_INIT_SIZE:
            channel.prefix += chunk[: MULTIFD_INIT_SIZE - len(channel.prefix)]
        kind = classify(channel.prefix)
        if kind is ChannelKind.MULTIFD:
            if len(channel.prefix) < MULTIFD_INIT_SIZE:
                return  # wait for the whole MultiFDInit, with the UUID
            self._multifd_arrived(channel)
        elif kind is not None:
            self._assign(channel, kind)

    def _multifd_arrived(self, channel: Channel) -> None:
        uuid = multifd_uuid(channel.prefix) or NO_UUID
        channel.uuid = uuid
        session = self._by_uuid.get(uuid)
        if session is not None and session.open:
            self._assign(channel, ChannelKind.MULTIFD, session)
        elif (
            uuid != NO_UUID
            and self._tap_factory is not None
            and not any(s.no_uuid and self._same_origin(channel, s) for s in self.sessions.values())
        ):
            # Its main channel has not shown its configuration yet (multifd channels may
            # speak first): wait for it, holding the bytes for the tap (not for the relay).
            channel.kind = ChannelKind.MULTIFD
            channel.waiting = True
            self._waiting.setdefault(uuid, []).append(channel)
        else:
            self._assign(channel, ChannelKind.MULTIFD)

    @staticmethod
    def _same_origin(channel: Channel, session: Session) -> bool:
        """Same source host and listener, and the session is still open."""
        return (
            session.open
            and host_of(channel.pipe.source) == session.source_host
            and channel.listener == session.listener
        )

    def _stop_waiting(self, channel: Channel) -> None:
        channel.waiting = False
        if channel.uuid is not None:
            waiting = self._waiting.get(channel.uuid, [])
            if channel in waiting:
                waiting.remove(channel)
            if not waiting:
                self._waiting.pop(channel.uuid, None)
        self._assign(channel, ChannelKind.MULTIFD)

    def on_pipe_closed(self, pipe: Pipe) -> None:
        channel = self._by_pipe.pop(pipe.pipe_id, None)
        if channel is None or pipe.refused:
            return
        if channel.waiting:
            self._stop_waiting(channel)
        elif pipe.pipe_id not in self._session_of:
            # Closed before we could tell what it was (refused upstream, no bytes, short prefix).
            self._assign(channel, classify(channel.prefix[:4]) or ChannelKind.UNKNOWN)
        session = self._session_of.pop(pipe.pipe_id)
        if session.tap is not None and channel.tap is not None:
            try:
                channel.tap.info.kernel_view = pipe.kernel_view
                session.tap.channel_closed(
                    channel.tap, pipe.close_reason, pipe.first_closed, pipe.reset_by
                )
            except Exception:  # a tap bug must not leave the pipe registered
                log.exception("tap_crashed", session=session.session_id, pipe=pipe.pipe_id)
        if all(c.pipe.ended is not None for c in session.channels) and session.ended is None:
            session.ended = time.monotonic()
            del self.sessions[session.session_id]
            if session.uuid is not None and self._by_uuid.get(session.uuid) is session:
                del self._by_uuid[session.uuid]
            if self._on_session_end is not None:
                self._on_session_end(session)

    def _assign(self, channel: Channel, kind: ChannelKind, session: Session | None = None) -> None:
        channel.kind = kind
        pipe = channel.pipe
        existing = self._session_of.get(pipe.pipe_id)
        if existing is not None:
            session = existing
        else:
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
                kind=kind,
                source=fmt_addr(pipe.source),
                destination=fmt_addr(pipe.destination),
                started_wall=pipe.started_wall,
            )
            channel.tap = session.tap.add_channel(info)
            channel.session_tap = session.tap
            pending, channel.pending, channel.pending_bytes = channel.pending, [], 0
            for direction, offset, chunk in pending:
                session.tap.on_chunk(channel.tap, direction, offset, chunk)
        else:
            channel.pending, channel.pending_bytes = [], 0

    def _find_session(self, channel: Channel, kind: ChannelKind) -> Session | None:
        if kind is ChannelKind.MAIN:
            return None
        host = host_of(channel.pipe.source)
        listener = channel.listener

        def live_main(s: Session) -> bool:
            return any(
                c.kind in (ChannelKind.MAIN, None) and c.pipe.ended is None for c in s.channels
            )

        candidates = [
            s
            for s in self.sessions.values()
            if s.open and s.source_host == host and s.listener == listener and live_main(s)
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
            and c.listener == listener
            and c.pipe.pipe_id not in self._session_of
        ]
        if not earlier:
            return None
        anchor = min(earlier, key=lambda c: c.pipe.pipe_id)
        session = self._new_session(host, anchor)
        session.channels.append(anchor)
        self._session_of[anchor.pipe.pipe_id] = session
        return session
