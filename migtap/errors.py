"""Error hierarchy. Each class names who must act: QEMU's bytes, our config, or the host."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from migtap.wire.events import Event


class MigtapError(Exception):
    """Base of every error migtap raises on purpose."""


class ConfigError(MigtapError):
    """Bad configs/*.toml or command-line arguments: the user must fix the named option or key."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.file = file

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}: "
        if self.key is not None:
            where += f"{self.key}: "
        return where + super().__str__()


class StreamError(MigtapError):
    """The bytes break the QEMU migration format (QEMU, or whatever spoke to us, must act).

    ``offset`` is the absolute stream offset where the problem was found, ``state`` what the
    parser was reading, ``direction`` which way the bytes flowed (set by the caller if known).
    ``events``: what the parser call that raised it had parsed before the damage (a parser sets
    it; those events are not returned any other way).
    """

    def __init__(
        self,
        message: str,
        *,
        offset: int,
        state: str,
        direction: str | None = None,
        section: str | None = None,
        events: tuple[Event, ...] = (),
    ) -> None:
        super().__init__(message)
        self.offset = offset
        self.state = state
        self.direction = direction
        self.section = section
        self.events: tuple[Event, ...] = events

    def __str__(self) -> str:
        parts = [f"at offset {self.offset}", f"while reading {self.state}"]
        if self.section is not None:
            parts.append(f"in section {self.section}")
        return f"{super().__str__()} ({', '.join(parts)})"


class TruncatedStream(StreamError):
    """EOF arrived inside a record."""


class UnsupportedStream(StreamError):
    """Well-formed but not modelled (a new section type, flag or version)."""


class RelayError(MigtapError):
    """Connect, accept or socket IO failed: the host or network must act."""


class CaptureError(MigtapError):
    """Writing or reading a capture failed (disk full, unreadable index)."""
