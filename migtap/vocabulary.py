"""The words every part of migtap shares: directions, channel kinds, phases, outcomes, channels.

The relay (sockets), the tap (parsers to model), the session model, the observers and
``migtap analyze`` all import this module; it imports nothing of theirs (only the wire's
``ChannelKind``, which is what a connection's first bytes say). Like mitmproxy's
``connection.py``, which serves both its sans-IO layers and its server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from migtap.wire.channel import ChannelKind

__all__ = [
    "ChannelInfo",
    "ChannelKind",
    "Direction",
    "KernelView",
    "Outcome",
    "Peer",
    "Phase",
    "SessionSummary",
    "Throttle",
]


class Direction(StrEnum):
    """Which way bytes flow on a connection."""

    SRC_TO_DST = "src-to-dst"
    DST_TO_SRC = "dst-to-src"


class Peer(StrEnum):
    """One of the two QEMUs; says who closed or reset a connection first."""

    SOURCE = "source"
    DESTINATION = "destination"


class Phase(StrEnum):
    """Where a migration is. A ``ROUND`` also has a number (the session model keeps it):
    round 1 is the bulk round. ``Phase.text(n)`` gives the words the logs use."""

    CONNECTING = "connecting"
    SETUP = "setup"
    ROUND = "round"
    STOP_AND_COPY = "stop-and-copy"
    POSTCOPY = "postcopy"

    def text(self, round_number: int = 0) -> str:
        """``setup``, ``bulk round``, ``round 3``, ``stop-and-copy``, ..."""
        if self is Phase.ROUND:
            return "bulk round" if round_number <= 1 else f"round {round_number}"
        return self.value


class Outcome(StrEnum):
    """How a session ended, as the wire and the sockets showed it (rules in docs/tap.md)."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"


#: QEMU's ``QEMUFile`` reads ahead into a buffer of this size (``IO_BUF_SIZE``): bytes it took
#: from the socket but may not have processed yet.
QEMU_FILE_BUFFER = 32 * 1024


@dataclass(frozen=True, slots=True)
class KernelView:
    """What this host's kernel said about the connection to the destination at the moment the
    destination ended it (rules in docs/tap.md, "Where a destination failed")."""

    acked: int | None  # stream bytes the destination's kernel acknowledged; None: not known
    reset: bool  # it reset the connection (closed with bytes unread) rather than a clean FIN
    buffer_bound: int  # the most bytes its kernel can hold unread (net.ipv4.tcp_rmem maximum)

    def as_dict(self) -> dict[str, object]:
        return {"acked": self.acked, "reset": self.reset, "buffer_bound": self.buffer_bound}

    @classmethod
    def from_dict(cls, doc: object) -> KernelView | None:
        if not isinstance(doc, dict):
            return None
        acked = doc.get("acked")
        return cls(
            acked if isinstance(acked, int) else None,
            bool(doc.get("reset")),
            int(doc.get("buffer_bound") or 0),
        )

    def consumed(self, forwarded: int) -> tuple[int, int]:
        """The range of stream offsets the destination QEMU can have read up to when it ended
        the connection: ``(at least, at most)``."""
        if self.acked is None:
            return 0, forwarded
        acked = min(self.acked, forwarded)
        if not self.reset:  # a clean close: it had read all its kernel received
            return max(0, acked - QEMU_FILE_BUFFER), acked
        return max(0, acked - self.buffer_bound - QEMU_FILE_BUFFER), forwarded


@dataclass(slots=True)
class ChannelInfo:
    """One connection of a session. The relay's facts (peers, bytes, how it closed) and the
    tap's (its kind once identified, its multifd id, a parser error); observers read it."""

    index: int  # order of acceptance within the session, from 0
    pipe_id: int
    kind: ChannelKind
    source: str | None  # "host:port" of the source QEMU's end
    destination: str | None  # "host:port" of the destination QEMU's end
    started_wall: float  # time.time() at accept
    multifd_id: int | None = None  # from the multifd channel header, once parsed
    ended_wall: float | None = None
    bytes_src_to_dst: int = 0
    bytes_dst_to_src: int = 0
    close_reason: str | None = None  # "eof_both", "source_reset", ...
    first_closed: Peer | None = None  # whose EOF/close came first
    reset_by: Peer | None = None  # the side that reset the connection, if one did
    parse_error: str | None = None  # set when the parser of this channel was detached
    kernel_view: KernelView | None = None  # when the destination ended it (TCP only)

    def __post_init__(self) -> None:
        self.kind = ChannelKind(self.kind)
        if self.first_closed is not None:
            self.first_closed = Peer(self.first_closed)
        if self.reset_by is not None:
            self.reset_by = Peer(self.reset_by)

    def bytes(self, direction: Direction) -> int:
        if direction is Direction.SRC_TO_DST:
            return self.bytes_src_to_dst
        return self.bytes_dst_to_src

    @property
    def label(self) -> str:
        """``main``, ``multifd-2``, ``postcopy-preempt``: how progress lines name it."""
        if self.multifd_id is not None:
            return f"multifd-{self.multifd_id}"
        return self.kind.value


@dataclass(slots=True)
class SessionSummary:
    """What is known when a session ends: the ``migration_summary`` fields (``fields``, an
    interface scripts rely on) and longer facts for ``session.json`` (``details``)."""

    session_id: int
    outcome: Outcome
    started_wall: float
    ended_wall: float
    channels: list[ChannelInfo]
    fields: dict[str, object] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)


class Throttle(Protocol):
    """Lets an observer hold the relay back: reading pauses on every socket of the session while
    any reason is set. A capture writer adds a reason when its queue passes its high mark and
    removes it below its low mark."""

    def pause(self, reason: str) -> None: ...

    def resume(self, reason: str) -> None: ...
