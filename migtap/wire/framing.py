"""What the small channel parsers (multifd, return path) share: the feed loop, one sticky error,
a header buffer filled to a known size, and absolute offsets. Each subclass is a state machine
(an ``Enum`` with ``EOF`` and ``ERROR`` members) with one method per state behind ``_step``.
They follow the contract of :class:`migtap.wire.parser.Parser`."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from migtap.errors import StreamError, TruncatedStream

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from migtap.wire.events import Event

StateT = TypeVar("StateT", bound=Enum)


class FramedParser(Generic[StateT]):
    """``feed(data) -> events``, ``feed_eof() -> events``; a ``StreamError`` carries the events
    of its call from before the damage (``exc.events``); after it (or EOF) every later call
    raises."""

    NAME: ClassVar[str]  # "multifd", "return-path": names the parser in its errors

    def __init__(self, initial: StateT, eof: StateT, error: StateT) -> None:
        self._state = initial
        self._eof_state = eof
        self._error_state = error
        self._buf = bytearray()
        self._offset = 0  # absolute offset of the next byte to consume
        self._record_offset = 0  # where the record being read started
        self._error: StreamError | None = None

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def state(self) -> str:
        return str(self._state.value)

    def feed(self, data: Buffer) -> list[Event]:
        self._check_usable()
        view = memoryview(data).cast("B")
        events: list[Event] = []
        pos, end = 0, len(view)
        try:
            while pos < end:
                pos = self._step(view, pos, events)
        except StreamError as exc:
            self._fail(exc, events)
            raise
        finally:
            view.release()
        return events

    def feed_eof(self) -> list[Event]:
        self._check_usable()
        state = self._state
        self._state = self._eof_state
        message = self._unfinished(state)
        if message is None:
            return []
        exc = TruncatedStream(message, offset=self._offset, state=str(state.value))
        self._fail(exc, [])
        raise exc

    # -- for subclasses ----------------------------------------------------------------------------

    def _step(self, view: memoryview, pos: int, events: list[Event]) -> int:
        """Consume bytes from ``view[pos:]`` in the current state; return the new ``pos``."""
        raise NotImplementedError

    def _unfinished(self, state: StateT) -> str | None:
        """At EOF in ``state``: None when that is a clean end, else what was still expected."""
        raise NotImplementedError

    def _consumed(self, n: int) -> None:
        """``n`` header bytes were taken into the buffer (a hook for running statistics)."""

    def _fail(self, exc: StreamError, events: list[Event]) -> None:
        exc.events = tuple(events)
        self._state, self._error = self._error_state, exc

    def _check_usable(self) -> None:
        if self._state is self._error_state:
            assert self._error is not None
            raise StreamError(
                f"{self.NAME} parser stopped by an earlier error: {self._error}",
                offset=self._offset,
                state=str(self._error_state.value),
            ) from self._error
        if self._state is self._eof_state:
            raise StreamError(
                f"{self.NAME} parser fed after EOF",
                offset=self._offset,
                state=str(self._eof_state.value),
            )

    def _fill(self, view: memoryview, pos: int, size: int) -> int:
        """Copy up to ``size - len(buf)`` bytes into the header buffer; return the new pos."""
        take = min(size - len(self._buf), len(view) - pos)
        self._buf += view[pos : pos + take]
        self._offset += take
        self._consumed(take)
        return pos + take
