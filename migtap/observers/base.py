"""The observer base: what an observer of a migration session may be told.

Observers watch; they never change a byte, and never write the session model (they read
``self.migration``). Every method has a no-op default: override what you need. The tap calls
each method through one guard: an observer that raises is logged once (``observer_detached``,
with its traceback) and detached, and every other observer still gets every call.

All methods run on the event loop and must be cheap: no file IO, no unbounded JSON, no joins.
Hand such work to a thread of your own (the capture's writer) and say so in the method's
docstring. The one exception is :meth:`Observer.wait_closed`, which the relay runs in a worker
thread after :meth:`Observer.close`.

Closing has two phases, in the order the factory lists the observers (``migtap.observers``):
first every observer's :meth:`contribute` adds its facts to the summary (the capture adds
``capture_dir``), then every observer's :meth:`close` runs, with the summary complete.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from migtap.model import Change, Migration
    from migtap.vocabulary import ChannelInfo, Direction, SessionSummary
    from migtap.wire.events import Event


class Observer:
    """A no-op observer; subclasses override what they need."""

    #: Whether :meth:`on_chunk` should be called (the hot path: only the capture wants bytes).
    wants_chunks: ClassVar[bool] = False

    def __init__(self, migration: Migration) -> None:
        self.migration = migration

    def on_channel(self, channel: ChannelInfo) -> None:
        """A connection joined the session (once, before its first chunk)."""

    def on_channel_changed(self, channel: ChannelInfo) -> None:
        """The tap learned more about a connection: its kind (a header-less channel identified
        as postcopy-preempt) or that its parser was detached (``parse_error``)."""

    def on_chunk(
        self, channel: ChannelInfo, direction: Direction, offset: int, chunk: bytes
    ) -> None:
        """``chunk`` was forwarded; ``offset`` is its position in that direction's byte stream.
        ``chunk`` is immutable and may be kept. Only called when ``wants_chunks``."""

    def on_event(self, channel: ChannelInfo, direction: Direction, event: Event) -> None:
        """A parser produced ``event``, after the model applied it (``migration.now`` is its
        time)."""

    def on_change(self, change: Change) -> None:
        """The model changed beyond the raw event: a phase, a finished round, a QEMU version
        range narrowed, the destination's SHUT, device state decoded."""

    def on_channel_closed(self, channel: ChannelInfo) -> None:
        """Both directions of that connection are done."""

    def on_tick(self) -> None:
        """Once per progress interval, after the model sampled its transfer rates."""

    def contribute(self, summary: SessionSummary) -> None:
        """Close, phase 1: add this observer's facts to ``summary.fields``/``details``."""

    def close(self, summary: SessionSummary) -> None:
        """Close, phase 2: the summary is complete; finish without blocking. Called once."""

    def wait_closed(self, timeout_s: float) -> bool:
        """Block until work handed to threads at :meth:`close` is done (runs in a worker
        thread, never on the loop). False if it did not finish in time."""
        del timeout_s
        return True


__all__ = ["Observer"]
