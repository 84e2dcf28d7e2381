"""The one contract every channel parser in ``migtap.wire`` follows (``StreamParser``,
``MultifdParser``, ``ReturnPathParser``, ``PreemptParser``).

* ``feed(data)`` parses the next bytes and returns the events they complete; ``feed_eof()`` says
  the channel ended, returns what that completes, and raises if it ended inside a record.
* A call that meets damage raises exactly one ``StreamError`` (or a subclass); the events that
  call parsed before the damage are in its ``events``, not returned any other way.
* After an error, every later ``feed`` or ``feed_eof`` raises a ``StreamError`` ("stopped by an
  earlier error", chained from the first) with no events. ``feed`` after ``feed_eof`` raises too.
* Anything else escaping a parser is a bug in it, not damage in the stream.
* How the bytes are split into ``feed`` calls never changes the events (up to the splitting of
  ``RamPages`` runs at feed boundaries).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from migtap.wire.events import Event


class Parser(Protocol):
    """A sans-IO parser of one channel in one direction (see the module docstring)."""

    @property
    def offset(self) -> int:
        """Absolute offset (in the channel) of the next byte to consume."""
        ...

    @property
    def state(self) -> str:
        """What the parser expects next, for error messages and logs."""
        ...

    @property
    def page_size(self) -> int:
        """The target page size the parser reads pages with."""
        ...

    def feed(self, data: Buffer) -> list[Event]: ...

    def feed_eof(self) -> list[Event]: ...
