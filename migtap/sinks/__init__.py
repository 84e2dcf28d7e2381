"""Observers of a migration session: capture files, progress logs.

The relay moves bytes; sinks only watch. A sink gets every chunk of every connection of one
session *after* it was forwarded, and the parser's events for it. Sinks run on the event loop:
every call must be cheap and must not block. A sink that raises is logged once and detached by
the tap (``migtap.tap``); the migration carries on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from migtap.relay.pipe import Direction


@dataclass(slots=True)
class ChannelInfo:
    """One connection of a session, as the sinks see it. Mutable: the tap fills it in."""

    index: int  # order of acceptance within the session, from 0
    pipe_id: int
    kind: str  # "main", "multifd", "tls", "http", "unknown", ...
    source: str | None  # "host:port" of the source QEMU's end
    destination: str | None  # "host:port" of the destination QEMU's end
    started_wall: float  # time.time() at accept
    multifd_id: int | None = None  # from the multifd channel header, once parsed
    ended_wall: float | None = None
    bytes_src_to_dst: int = 0
    bytes_dst_to_src: int = 0
    close_reason: str | None = None  # "eof_both", "source_reset", ...
    first_closed: str | None = None  # "source" or "destination": whose EOF/close came first
    reset_by: str | None = None  # "source" or "destination" if that side reset the connection
    parse_error: str | None = None  # set when the parser of this channel was detached


@dataclass(slots=True)
class SessionSummary:
    """What the tap knows when a session ends; sinks may add their own facts to ``extra``."""

    session_id: int
    outcome: str  # "completed", "failed", "cancelled", "unknown"
    started_wall: float
    ended_wall: float
    channels: list[ChannelInfo]
    fields: dict[str, object] = field(default_factory=dict)  # the migration_summary log fields
    # Facts too long for the summary line, kept in session.json (``qemu``: the version evidence).
    details: dict[str, object] = field(default_factory=dict)


class Throttle(Protocol):
    """Lets a sink hold the relay back: reading pauses on every socket of the session while any
    reason is set. A capture writer adds a reason when its queue passes its high mark and removes
    it below its low mark."""

    def pause(self, reason: str) -> None: ...

    def resume(self, reason: str) -> None: ...


class Sink(Protocol):
    def on_channel(self, channel: ChannelInfo) -> None:
        """A connection joined the session (called once, before its first chunk)."""

    def on_chunk(
        self, channel: ChannelInfo, direction: Direction, offset: int, chunk: bytes
    ) -> None:
        """``chunk`` was forwarded; ``offset`` is its position in that direction's byte stream.
        ``chunk`` is immutable and may be kept."""

    def on_event(self, channel: ChannelInfo, direction: Direction, event: object) -> None:
        """The parser of that channel and direction produced ``event`` (a frozen dataclass from
        ``migtap.wire``, with an ``offset``)."""

    def on_channel_closed(self, channel: ChannelInfo) -> None:
        """Both directions of that connection are done."""

    def on_close(self, summary: SessionSummary) -> None:
        """The session ended; flush and close. Called once."""
