"""The capture's writer thread: every disk write of one capture, in order, off the event loop.

The capture observer hands work over as ops on one queue (:class:`CaptureWriter`): append bytes
or an index line, replace a whole file atomically (tmp + ``os.replace``), rename a channel's
file, rewrite ``session.json``, and finish. The queue is bounded by the relay: its size is
tracked in bytes, above ``queue_high`` the writer calls ``throttle.pause("capture")``, below
``queue_low`` it resumes, both on the loop (via ``call_soon_threadsafe``). It never grows without
bound and never drops bytes, except after a failure: a write error stops the capture (queued
and later data is dropped, ``session.json`` is still written, best effort), never the migration.

Which side runs what: methods without a leading underscore, and ``_on_*`` callbacks, run on the
event loop, except :meth:`CaptureWriter.join` (a worker thread: it blocks); ``_run`` and what it
calls run on the writer thread. State shared by both is guarded by ``_cond``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import structlog

from migtap.capture_format import SESSION_FILE

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path
    from typing import Any

    from migtap.vocabulary import Throttle

__all__ = [
    "EVENT_RECORD_OVERHEAD",
    "PAUSE_REASON",
    "CaptureWriter",
    "WriterState",
    "write_all",
]

log = structlog.get_logger("migtap.capture")

PAUSE_REASON: Final = "capture"
EVENT_RECORD_OVERHEAD: Final = 256
"""Queue accounting: what an index line is assumed to cost before it is serialised."""

FILE_MODE: Final = 0o600


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (it may write fewer)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


@dataclass(frozen=True, slots=True)
class WriterState:
    """What the writer knows when it renders ``session.json`` (on the writer thread)."""

    written: Mapping[str, int]  # bytes appended per file name (data files only)
    error: str | None
    complete: bool  # only ever True for the final session.json


# -- ops: one unit of work each --------------------------------------------------------------------


@dataclass(slots=True)
class _Append:
    name: str
    data: bytes | None = None  # raw bytes (counted in ``written``)
    record: dict[str, Any] | None = None  # an index line, serialised on the writer thread
    cost: int = 0


@dataclass(slots=True)
class _Replace:
    name: str
    data: bytes | Callable[[], bytes]  # a callable is run on the writer thread
    cost: int = 0


@dataclass(slots=True)
class _Rename:
    old: str
    new: str
    cost: int = 0


@dataclass(slots=True)
class _Session:
    render: Callable[[WriterState], bytes]
    cost: int = 0


@dataclass(slots=True)
class _Finish:
    render: Callable[[WriterState], bytes]
    expected: dict[str, int]  # bytes each data file must hold for the capture to be complete
    on_closed: Callable[[WriterState, OSError | None], None]
    cost: int = 0


_Op = _Append | _Replace | _Rename | _Session | _Finish
_DATA_OPS: Final = (_Append, _Replace, _Rename)  # dropped after a failure


@dataclass(slots=True)
class _Shared:
    """State shared by the loop and the writer thread (under ``CaptureWriter._cond``)."""

    ops: collections.deque[_Op] = field(default_factory=collections.deque)
    queued: int = 0
    written: dict[str, int] = field(default_factory=dict)
    failed: bool = False
    resume_scheduled: bool = False
    paused: bool = False


class CaptureWriter:
    """One capture directory's writer thread and its queue (module docstring)."""

    _write: Callable[[int, bytes], None] = staticmethod(write_all)
    """The one place bytes go to disk; tests replace it to slow or fail writes."""

    def __init__(
        self,
        directory: Path,
        *,
        throttle: Throttle,
        call_soon_threadsafe: Callable[[Callable[[], None]], object],
        queue_high: int,
        queue_low: int,
        on_failure: Callable[[], None] | None = None,
        name: str = "migtap-capture",
    ) -> None:
        if not 0 <= queue_low <= queue_high:
            raise ValueError(f"need 0 <= queue_low <= queue_high, got {queue_low}, {queue_high}")
        self.directory = directory
        self._throttle = throttle
        self._call_soon_threadsafe = call_soon_threadsafe
        self._high = queue_high
        self._low = queue_low
        self._on_failure = on_failure
        self._cond = threading.Condition()
        self._shared = _Shared()
        self._finishing = False  # loop side: finish() was called
        # written by the writer thread, read after join() or on the loop after capture_closed
        self.error: str | None = None
        self.complete = False
        self.finished = False
        # loop side only
        self.paused_count = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- handing work over (on the loop) -----------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self._shared.failed

    def append(self, name: str, data: bytes) -> None:
        """Append ``data`` to file ``name`` (created 0600 on first use)."""
        if data:
            self._enqueue(_Append(name, data=data, cost=len(data)))

    def append_record(self, name: str, record: dict[str, Any]) -> None:
        """Append one JSON line (serialised on the writer thread)."""
        self._enqueue(_Append(name, record=record, cost=EVENT_RECORD_OVERHEAD))

    def replace(self, name: str, data: bytes | Callable[[], bytes], *, cost: int = 0) -> None:
        """Write a whole file atomically; a callable ``data`` is run on the writer thread."""
        if isinstance(data, bytes):
            cost = len(data)
        self._enqueue(_Replace(name, data, cost=cost))

    def rename(self, old: str, new: str) -> None:
        """Rename a data file after what was queued for ``old`` is written; later appends must
        name ``new``. Nothing happens on disk if ``old`` was never written."""
        self._enqueue(_Rename(old, new))

    def write_session(self, render: Callable[[WriterState], bytes]) -> None:
        """Rewrite ``session.json`` with what ``render`` makes of the writer's state (called on
        the writer thread, in queue order). Written even after a failure, best effort."""
        self._enqueue(_Session(render))

    def finish(
        self,
        render: Callable[[WriterState], bytes],
        *,
        expected: dict[str, int],
        on_closed: Callable[[WriterState, OSError | None], None],
    ) -> None:
        """The last op: after everything queued before it, write ``session.json`` with
        ``complete`` (every file in ``expected`` holds exactly that many bytes, and nothing
        failed), then end the thread and call ``on_closed(state, session_error)`` on the loop.
        Never blocks."""
        if self._finishing:
            return
        self._finishing = True
        self._enqueue(_Finish(render, dict(expected), on_closed))

    def release_pause(self) -> None:
        """Drop the capture's pause reason, if set (the writer will not hold the relay back)."""
        with self._cond:
            paused, self._shared.paused = self._shared.paused, False
        if paused:
            self._throttle.resume(PAUSE_REASON)

    def written(self) -> dict[str, int]:
        """Bytes appended per data file so far (a copy)."""
        with self._cond:
            return dict(self._shared.written)

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end (in a worker thread, never on the loop); False if it is
        still running after ``timeout_s``."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _enqueue(self, op: _Op) -> None:
        s = self._shared
        with self._cond:
            if s.failed and isinstance(op, _DATA_OPS):
                return
            s.ops.append(op)
            s.queued += op.cost
            pause = s.queued > self._high and not s.paused
            if pause:
                s.paused = True
            self._cond.notify()
        if pause:
            self.paused_count += 1
            self._throttle.pause(PAUSE_REASON)

    def _on_loop_resume(self) -> None:
        """Scheduled by the writer when the queue drained below the low mark (or it failed)."""
        s = self._shared
        with self._cond:
            s.resume_scheduled = False
            resume = s.paused and (s.queued <= self._low or s.failed)
            if resume:
                s.paused = False
        if resume:
            self._throttle.resume(PAUSE_REASON)

    def _on_failed(self, name: str, exc: OSError) -> None:
        log.error(
            "capture_failed",
            directory=str(self.directory),
            file=name,
            error=str(exc),
            errno=exc.errno,
            action="capture stopped; the migration continues",
        )
        self.release_pause()
        if self._on_failure is not None:
            self._on_failure()

    # -- the writer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        fds: dict[str, int] = {}
        s = self._shared
        try:
            while True:
                with self._cond:
                    while not s.ops:
                        self._cond.wait()
                    op = s.ops.popleft()
                if isinstance(op, _Finish):
                    self._finish(op, fds)
                    self._done(op)
                    return
                try:
                    self._perform(op, fds)
                except OSError as exc:
                    self._fail(op, exc)
                self._done(op)
        finally:
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _perform(self, op: _Op, fds: dict[str, int]) -> None:
        if isinstance(op, _Session):
            if self._shared.failed:
                with contextlib.suppress(OSError):  # best effort after a failure
                    self._replace(SESSION_FILE, op.render(self._state(complete=False)))
            else:
                self._replace(SESSION_FILE, op.render(self._state(complete=False)))
            return
        if self._shared.failed:
            return
        match op:
            case _Append():
                self._append(op, fds)
            case _Replace():
                self._replace(op.name, op.data if isinstance(op.data, bytes) else op.data())
            case _Rename():
                self._rename(op, fds)
            case _Finish():  # handled by _run
                raise AssertionError

    def _append(self, op: _Append, fds: dict[str, int]) -> None:
        data = op.data
        if op.record is not None:
            data = (json.dumps(op.record, separators=(",", ":")) + "\n").encode()
        if data is None:
            return
        fd = fds.get(op.name)
        if fd is None:
            fd = self._open(op.name, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            fds[op.name] = fd
        self._write(fd, data)
        if op.data is not None:
            with self._cond:
                written = self._shared.written
                written[op.name] = written.get(op.name, 0) + len(data)

    def _rename(self, op: _Rename, fds: dict[str, int]) -> None:
        fd = fds.pop(op.old, None)
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # no byte was written under the old name
            (self.directory / op.old).replace(self.directory / op.new)
        with self._cond:
            written = self._shared.written
            if op.old in written:
                written[op.new] = written.get(op.new, 0) + written.pop(op.old)

    def _finish(self, op: _Finish, fds: dict[str, int]) -> None:
        for name in list(fds):  # every data byte on disk before complete is decided
            with contextlib.suppress(OSError):
                os.close(fds.pop(name))
        with self._cond:
            written = dict(self._shared.written)
            failed = self._shared.failed
        complete = not failed and self.error is None
        complete = complete and all(written.get(f, 0) == n for f, n in op.expected.items())
        session_error: OSError | None = None
        try:
            self._replace(SESSION_FILE, op.render(self._state(complete=complete)))
        except OSError as exc:
            complete = False
            session_error = exc
        self.complete = complete
        self.finished = True
        state = self._state(complete=complete)
        self._to_loop(lambda: op.on_closed(state, session_error))

    def _state(self, *, complete: bool) -> WriterState:
        with self._cond:
            written = dict(self._shared.written)
        return WriterState(written, self.error, complete)

    def _open(self, name: str, flags: int) -> int:
        path = self.directory / name
        flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _replace(self, name: str, data: bytes) -> None:
        tmp = f".{name}.{threading.get_ident()}.tmp"
        fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            self._write(fd, data)
        finally:
            os.close(fd)
        (self.directory / tmp).replace(self.directory / name)

    def _done(self, op: _Op) -> None:
        s = self._shared
        with self._cond:
            s.queued -= op.cost
            schedule = s.paused and not s.resume_scheduled and (s.queued <= self._low or s.failed)
            if schedule:
                s.resume_scheduled = True
        if schedule:
            self._to_loop(self._on_loop_resume)

    def _to_loop(self, callback: Callable[[], None]) -> None:
        """Hand ``callback`` to the loop; if the loop is gone (closed after a ``join`` that timed
        out), there is no one left to tell."""
        with contextlib.suppress(RuntimeError):
            self._call_soon_threadsafe(callback)

    def _fail(self, op: _Op, exc: OSError) -> None:
        match op:
            case _Append() | _Replace():
                name = op.name
            case _Rename():
                name = op.new
            case _:
                name = SESSION_FILE
        s = self._shared
        with self._cond:
            if s.failed:
                return
            s.failed = True
            self.error = f"{name}: {exc}"
            dropped = sum(o.cost for o in s.ops if isinstance(o, _DATA_OPS))
            s.ops = collections.deque(o for o in s.ops if not isinstance(o, _DATA_OPS))
            s.queued -= dropped
        self._to_loop(lambda: self._on_failed(name, exc))
