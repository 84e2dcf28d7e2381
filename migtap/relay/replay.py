"""``migtap replay CAPTURE_DIR``: feed a capture to a destination and say where it stopped.

Two ways (``docs/replay.md``):

* ``--to HOST:PORT`` (or ``unix:PATH``): a destination that already listens. Over TCP the main
  channel and every multifd channel are written at full speed; the return path is read and
  parsed (its SHUT says whether the destination loaded). Over a unix socket the main channel is
  fed record by record as with ``--qemu``, so the failing record is known exactly.
* ``--qemu -- QEMU_ARGV...``: migtap starts the destination itself (``-incoming defer``, a QMP
  socket in a private temporary directory for the capabilities the capture needs, then
  ``migrate-incoming`` on a unix socket), feeds it record by record, collects its stderr.

The exact feeding (:class:`MainFeeder`): for each record after the stream header, write its
first byte alone and wait until the destination has read it (``SIOCOUTQ`` on our end of a unix
stream socket counts what the peer has not read yet), then write the rest and wait until all
of it is read. QEMU reads its socket only when the bytes it already holds cannot satisfy the
field it is parsing, so reading the first byte of record k proves it finished record k-1. When
the destination closes, the kernel says whether it left bytes unread (``ECONNRESET`` on our
end): the record it was reading is the last one whose first byte it read. The pure half
(records, the failing record, QEMU's messages) is ``migtap.replay_plan``.

Blocking socket work runs in worker threads (``asyncio.to_thread``); the loop drives QMP and
the destination process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import structlog

from migtap.capture_format import jsonable
from migtap.errors import ConfigError, MigtapError, RelayError, StreamError
from migtap.log import configure_logging
from migtap.replay_plan import (
    NotReplayable,
    Plan,
    Progress,
    Unit,
    explain,
    failing_unit,
    read_plan,
)
from migtap.wire import events as ev
from migtap.wire.return_path import ReturnPathParser

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Coroutine, Sequence

__all__ = [
    "MainFeeder",
    "Target",
    "add_arguments",
    "parse_target",
    "replay_qemu",
    "replay_to",
    "run",
]

SIOCOUTQ: Final = termios.TIOCOUTQ  # the same ioctl number on Linux
SIOCINQ: Final = termios.FIONREAD
EXIT_LOADED: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
CHUNK: Final = 1 << 20
_POLL_IN: Final = select.POLLIN
_POLL_OUT: Final = select.POLLOUT
_POLL_GONE: Final = select.POLLHUP | select.POLLERR | select.POLLNVAL

log = structlog.get_logger("migtap.replay")


class Stalled(RelayError):
    """The destination read nothing for the stall timeout."""


# -- targets ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where the destination listens: ``unix:PATH`` or ``HOST:PORT``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def exact(self) -> bool:
        """Record-by-record feeding needs a unix socket (SIOCOUTQ = bytes the peer has not
        read); over TCP it counts bytes not acknowledged, which a destination's kernel does
        for bytes its application never read."""
        return self.path is not None

    def connect(self, timeout_s: float) -> socket.socket:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.path is not None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        sock.connect(self.path)
                    except OSError:
                        sock.close()
                        raise
                else:
                    sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RelayError(f"cannot connect to {self}: {exc}") from exc
                time.sleep(0.02)
                continue
            return sock

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"{self.host}:{self.port}"


def parse_target(text: str) -> Target:
    """``unix:PATH``, ``HOST:PORT``, ``[IPV6]:PORT`` (``tcp:`` may prefix the last two)."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ConfigError(f"--to {text!r}: no socket path after unix:", key="to")
        return Target(path=path)
    text = text.removeprefix("tcp:")
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--to {text!r}: use HOST:PORT or unix:PATH", key="to")
    return Target(host=host, port=int(port))


# -- feeding the main channel (a worker thread) ----------------------------------------------------


def _ioctl_int(sock: socket.socket, request: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0])


@dataclass(slots=True)
class FeedResult:
    """What :meth:`MainFeeder.run` saw."""

    progress: Progress
    return_path: bytes = b""
    error: str | None = None  # a stall, an OS error


class _Closed(Exception):
    """The destination closed the connection (``unread``: with bytes it never read)."""

    def __init__(self, unread: bool) -> None:
        super().__init__("closed")
        self.unread = unread


class MainFeeder:
    """Writes the main channel to a connected socket and reads the return path.

    ``exact`` (a unix socket): record by record, waiting after each first byte and after each
    record for the destination to have read everything (see the module docstring); the
    ``Progress`` then names the record it was reading. Otherwise: the whole file at full
    speed, and ``Progress.started`` is -1. Runs in a worker thread (``run``); ``stop()`` may be
    called from any thread.
    """

    def __init__(
        self,
        sock: socket.socket,
        path: Path,
        units: Sequence[Unit],
        *,
        exact: bool,
        stall_s: float = 60.0,
        linger_s: float = 60.0,
    ) -> None:
        self.sock = sock
        self.path = path
        self.units = units
        self.exact = exact
        self.stall_s = stall_s
        self.linger_s = linger_s  # after the last byte: how long to wait for the close
        self._stop = threading.Event()
        self._poll = select.poll()
        self._poll.register(sock.fileno(), _POLL_IN)
        self._rp = bytearray()
        self._total = units[-1].end if units else 0
        self.started = -1
        self._first_pending: int | None = None  # first byte written, its reading unconfirmed
        self.consumed = 0
        self.written = 0
        self.all_read = False
        self.closed = False
        self._progress_at = time.monotonic()
        sock.settimeout(0.0)  # non-blocking

    def stop(self) -> None:
        self._stop.set()

    # -- IO helpers
    def _read_return_path(self) -> None:
        """Read what is waiting (exactly that much: a read on an empty queue would take the
        ECONNRESET that tells whether the destination left bytes unread)."""
        try:
            n = _ioctl_int(self.sock, SIOCINQ)
            if n > 0:
                self._rp += self.sock.recv(n)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _Closed(unread=exc.errno == errno.ECONNRESET) from exc

    def _service(self, mask: int) -> None:
        """Act on what poll said: read the return path; raise ``_Closed`` if the destination
        is gone (hung up, or readable with nothing to read: it shut its side)."""
        if mask & _POLL_GONE:
            raise self._closed_now()
        if mask & _POLL_IN:
            if _ioctl_int(self.sock, SIOCINQ) == 0:
                raise self._closed_now()
            self._read_return_path()

    def _closed_now(self) -> _Closed:
        """The destination is gone: did it leave bytes we wrote unread?"""
        self._read_return_path_quietly()
        outq = _ioctl_int(self.sock, SIOCOUTQ) if self.exact else 0
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.closed = True
        return _Closed(unread=outq > 0 or err == errno.ECONNRESET)

    def _read_return_path_quietly(self) -> None:
        with contextlib.suppress(_Closed, OSError):
            self._read_return_path()

    def _tick(self, timeout_ms: float) -> int:
        if self._stop.is_set():
            raise _Closed(unread=False)
        if time.monotonic() - self._progress_at > self.stall_s:
            raise Stalled(f"the destination read nothing for {self.stall_s:.0f} s")
        events = self._poll.poll(timeout_ms)
        return events[0][1] if events else 0

    def _send(self, data: memoryview) -> None:
        """Write all of ``data``, reading the return path meanwhile."""
        self._poll.modify(self.sock.fileno(), _POLL_IN | _POLL_OUT)
        try:
            while data:
                mask = self._tick(50)
                self._service(mask)
                if mask & _POLL_OUT:
                    try:
                        n = self.sock.send(data)
                    except BlockingIOError:
                        continue
                    except (BrokenPipeError, ConnectionResetError) as exc:
                        raise self._closed_now() from exc
                    data = data[n:]
                    self.written += n
                    self._progress_at = time.monotonic()
        finally:
            self._poll.modify(self.sock.fileno(), _POLL_IN)

    def _wait_read(self) -> None:
        """Until the destination has read every byte written (exact mode only)."""
        delay = 0.00002
        while True:
            outq = _ioctl_int(self.sock, SIOCOUTQ)
            mask = self._tick(0)
            self._service(mask)
            if outq == 0:  # measured before the poll said the destination was still there
                self.consumed = self.written
                self._progress_at = time.monotonic()
                return
            if delay < 0.001:
                time.sleep(delay)
                delay *= 2
            else:
                mask = self._tick(1)
                if mask:
                    delay = 0.00002

    def _linger(self) -> None:
        """After the last byte: read the return path until the destination closes."""
        deadline = time.monotonic() + self.linger_s
        while time.monotonic() < deadline:
            mask = self._tick(20)
            self._service(mask)
            self._progress_at = time.monotonic()

    # -- the two ways
    def send_header(self) -> None:
        """The stream header (the first unit), before the other channels connect: QEMU 8.0+
        peeks at a channel's first bytes to tell main from multifd."""
        if not self.exact or not self.units:
            return
        with self.path.open("rb") as fh:
            head = fh.read(self.units[0].length)
        self._send(memoryview(head))
        self.started = 0

    def run(self) -> FeedResult:
        error = None
        try:
            if self.exact:
                self._run_exact()
            else:
                self._run_full_speed()
            self._linger()
        except _Closed as closed:
            if not closed.unread and self.closed:
                # It read every byte written before it closed.
                self.consumed = self.written
                if self._first_pending is not None:  # the first byte of a record: in that one
                    self.started = self._first_pending
                if self.exact and self.written == self._total:
                    self.all_read = True
        except Stalled as exc:
            error = str(exc)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._read_return_path_quietly()
        progress = Progress(
            started=self.started,
            consumed=self.consumed,
            written=self.written,
            all_read=self.all_read,
            closed=self.closed,
        )
        return FeedResult(progress, bytes(self._rp), error)

    def _run_exact(self) -> None:
        with self.path.open("rb") as fh:
            if self.started < 0:
                self.send_header()
            self._wait_read()
            for n in range(1, len(self.units)):
                unit = self.units[n]
                fh.seek(unit.offset)
                first = fh.read(1)
                self._send(memoryview(first))
                # Closing now, with this byte unread, means it never began this record.
                self._first_pending = n
                self._wait_read()
                self.started, self._first_pending = n, None
                remaining = unit.length - 1
                while remaining > 0:
                    block = fh.read(min(CHUNK, remaining))
                    if not block:
                        break
                    self._send(memoryview(block))
                    remaining -= len(block)
                self._wait_read()
        self.all_read = True

    def _run_full_speed(self) -> None:
        with self.path.open("rb") as fh:
            while block := fh.read(CHUNK):
                self._send(memoryview(block))
        self.consumed = -1  # unknown without exact feeding


def pump_channel(sock: socket.socket, path: Path, stop: threading.Event) -> str | None:
    """Write a whole multifd channel file (worker thread); its error, or None."""
    sock.settimeout(1.0)
    try:
        with path.open("rb") as fh:
            while block := fh.read(CHUNK):
                view = memoryview(block)
                while view:
                    if stop.is_set():
                        return "stopped"
                    try:
                        n = sock.send(view)
                    except TimeoutError:
                        continue
                    view = view[n:]
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# -- QMP -------------------------------------------------------------------------------------------


class QmpError(MigtapError):
    """QEMU answered a QMP command with an error."""


class Qmp:
    """A minimal QMP client on a unix socket: enough for capabilities and migrate-incoming."""

    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = 0

    async def connect(self, path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise QmpError(f"exited with status {proc.returncode} before QMP was up")
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(str(path))
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise QmpError(f"no QMP socket after {timeout_s:.0f} s: {exc}") from exc
                await asyncio.sleep(0.02)
        await self._message(None)  # the greeting
        await self.execute("qmp_capabilities")

    async def _message(self, ident: int | None) -> dict[str, Any]:
        """The next message that is not an event (with ``ident``: the answer with that id; an
        answer to a command whose caller was cancelled is skipped)."""
        assert self._reader is not None
        while True:
            line = await self._reader.readline()
            if not line:
                raise QmpError("QMP connection closed")
            doc = json.loads(line)
            if not isinstance(doc, dict) or "event" in doc:
                continue
            if ident is None or doc.get("id") == ident:
                return doc

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:  # noqa: ANN401 - QMP returns any JSON
        assert self._writer is not None
        self._ids += 1
        msg: dict[str, Any] = {"execute": command, "id": self._ids}
        if arguments:
            msg["arguments"] = arguments
        self._writer.write(json.dumps(msg).encode() + b"\n")
        await self._writer.drain()
        async with asyncio.timeout(30):
            doc = await self._message(self._ids)
        if "error" in doc:
            raise QmpError(f"{command}: {doc['error'].get('desc', doc['error'])}")
        return doc.get("return")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
            self._writer = None


# -- the report ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    """What ``migtap replay`` prints (``--json``: :meth:`as_dict`)."""

    outcome: str  # loaded, failed, incomplete (the capture ended first), unknown (--to, no SHUT)
    plan: Plan
    mode: str
    progress: Progress | None = None
    failed_at: Unit | None = None
    explanation: dict[str, Any] = field(default_factory=dict)
    destination_error: list[str] = field(default_factory=list)
    return_path: list[dict[str, Any]] = field(default_factory=list)
    shut: int | None = None
    destination: dict[str, Any] = field(default_factory=dict)
    channels: list[dict[str, Any]] = field(default_factory=list)
    feed_error: str | None = None
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        failed_at = None
        if self.failed_at is not None:
            failed_at = self.failed_at.as_dict()
            failed_at["sub_record"] = self.explanation.get("sub_record")
            failed_at["confirmed_by_destination"] = self.explanation.get("confirmed")
        p = self.progress
        return {
            "outcome": self.outcome,
            "failed_at": failed_at,
            "destination_error": self.destination_error,
            "destination_says": self.explanation.get("qemu_says", []),
            "bytes_consumed": p.consumed if p is not None and p.consumed >= 0 else None,
            "bytes_written": p.written if p is not None else 0,
            "bytes_total": self.plan.length,
            "records_total": len(self.plan.units),
            "records_started": p.started + 1 if p is not None else 0,
            "capture": str(self.plan.directory),
            "capture_complete": self.plan.complete,
            "capture_cut": self.plan.cut,
            "mode": self.mode,
            "needs": self.plan.needs.as_dict(),
            "channels": self.channels,
            "shut": self.shut,
            "return_path": self.return_path,
            "destination": self.destination,
            "feed_error": self.feed_error,
            "elapsed_s": round(self.elapsed_s, 3),
        }

    def write_text(self, out: TextIO) -> None:  # noqa: C901, PLR0912 - one branch per line
        d = self.as_dict()
        w = out.write
        others = len(self.plan.channels) - 1
        w(f"capture     {self.plan.directory} ({self.plan.length} bytes on the main channel, "
          f"{len(self.plan.units)} records, {others} other channels)\n")  # fmt: skip
        w(f"replayed    {self.mode} in {self.elapsed_s:.2f} s\n")
        if self.outcome == "loaded":
            state = self.destination.get("status")
            paused = self.destination.get("paused_by_S")
            tail = ""
            if paused:
                tail = "; the VM stays paused (-S)"
            elif state:
                tail = f"; VM status {state}"
            w(f"outcome     loaded: the destination read all {self.plan.length} bytes and "
              f"loaded everything{tail}\n")  # fmt: skip
        elif self.outcome == "incomplete":
            last = self.plan.units[-1]
            w(f"outcome     incomplete: the capture ends at offset {self.plan.length}, inside "
              f"{last.describe()}; the destination read all of it without failing\n")  # fmt: skip
        elif self.outcome == "unknown":
            w(
                "outcome     unknown: every byte was written, and no return path says whether "
                "the destination loaded it\n"
            )
        else:
            w("outcome     failed\n")
        if self.failed_at is not None:
            w(f"failed at   {self.failed_at.describe()}\n")
            sub = d["failed_at"]["sub_record"]
            if sub and "block" in sub:
                stream = sub.get("stream_size")
                dest = sub.get("destination_size")
                w(f"  block     {sub['block']!r}: {_size(stream)} in the stream, "
                  f"{_size(dest)} on the destination\n")  # fmt: skip
            elif sub:
                w(f"  detail    {json.dumps(sub)}\n")
            for line in self.explanation.get("qemu_says", []):
                w(f"  QEMU says {line}\n")
        if self.shut is not None:
            w(f"return path SHUT {self.shut}{' (ok)' if self.shut == 0 else ' (failed)'}\n")
        if self.feed_error:
            w(f"note        {self.feed_error}\n")
        if self.destination_error:
            w("destination stderr:\n")
            for line in self.destination_error:
                w(f"  {line}\n")


def _size(value: int | None) -> str:
    if value is None:
        return "unknown"
    return f"0x{value:x} ({value / (1 << 20):g} MiB)"


def _return_path(data: bytes) -> tuple[list[dict[str, Any]], int | None, str | None]:
    parser = ReturnPathParser()
    events: list[ev.Event] = []
    problem = None
    try:
        events = parser.feed(data) + parser.feed_eof()
    except StreamError as exc:
        events = list(exc.events)
        problem = f"return path: {exc}"
    shut = None
    out = []
    for e in events:
        record = {k: jsonable(v) for k, v in _fields(e).items()}
        record["kind"] = type(e).__name__
        out.append(record)
        if isinstance(e, ev.RpShut):
            shut = e.value
    return out, shut, problem


def _fields(e: object) -> dict[str, Any]:
    return {name: getattr(e, name) for name in getattr(e, "__slots__", ())}


# -- replay into a listening destination -----------------------------------------------------------


def _linger_s(plan: Plan, timeout_s: float) -> float:
    """How long to wait for the destination to finish after the last byte: a cut capture
    leaves it waiting for bytes that will never come, so not long."""
    return timeout_s if plan.complete else min(timeout_s, 2.0)


async def _connect_all(
    plan: Plan, target: Target, feeder_args: dict[str, Any], timeout_s: float
) -> tuple[MainFeeder, list[tuple[socket.socket, Path]]]:
    """Connect the main channel (and send its stream header), then every other channel, in
    the capture's order."""
    main = await asyncio.to_thread(target.connect, timeout_s)
    feeder = MainFeeder(main, plan.main.path, plan.units, exact=target.exact, **feeder_args)
    await asyncio.to_thread(feeder.send_header)
    others = []
    for ch in plan.channels[1:]:
        sock = await asyncio.to_thread(target.connect, timeout_s)
        others.append((sock, ch.path))
    return feeder, others


async def _feed(
    plan: Plan,
    target: Target,
    feeder_args: dict[str, Any],
    timeout_s: float,
    watch: Callable[[MainFeeder], Coroutine[Any, Any, dict[str, Any]]] | None = None,
) -> tuple[FeedResult, list[dict[str, Any]], dict[str, Any]]:
    """Connect, then feed every channel. ``watch`` (the destination's QMP) runs beside the
    feeder and may stop it (the destination said completed or failed) and returns what it
    learned. Returns the main channel's result, the channels, and what ``watch`` returned."""
    stop = threading.Event()
    feeder, others = await _connect_all(plan, target, feeder_args, timeout_s)
    channels: list[dict[str, Any]] = [
        {"kind": "main", "file": plan.main.path.name, "bytes": plan.main.size}
    ]
    watched: dict[str, Any] = {}
    try:
        async with asyncio.TaskGroup() as tg:
            pumps = [
                tg.create_task(asyncio.to_thread(pump_channel, sock, path, stop))
                for sock, path in others
            ]
            watcher: asyncio.Task[dict[str, Any]] | None = None
            if watch is not None:
                watcher = tg.create_task(watch(feeder))
            result = await asyncio.to_thread(feeder.run)
            stop.set()
            if watcher is not None:
                watcher.cancel()
        if watcher is not None and not watcher.cancelled():
            watched = watcher.result()
        for ch, pump in zip(plan.channels[1:], pumps, strict=True):
            channels.append(
                {"kind": ch.kind, "file": ch.path.name, "bytes": ch.size, "error": pump.result()}
            )
    finally:
        stop.set()
        feeder.stop()
        for sock, _ in others:
            sock.close()
        feeder.sock.close()
    return result, channels, watched


async def replay_to(plan: Plan, target: Target, *, stall_s: float, linger_s: float) -> Report:
    """Replay into a destination that listens at ``target``."""
    t0 = time.monotonic()
    result, channels, _ = await _feed(
        plan, target, {"stall_s": stall_s, "linger_s": _linger_s(plan, linger_s)}, timeout_s=3
    )
    report = Report("unknown", plan, f"--to {target}", progress=result.progress)
    report.channels = channels
    report.return_path, report.shut, rp_problem = _return_path(result.return_path)
    report.feed_error = result.error or rp_problem
    p = result.progress
    if report.shut is not None:
        report.outcome = "loaded" if report.shut == 0 else "failed"
    elif p.closed and (p.written < plan.length or (target.exact and not p.all_read)):
        report.outcome = "failed"
    elif target.exact and p.all_read and not plan.complete:
        report.outcome = "incomplete"
    if report.outcome == "failed" and target.exact:
        report.failed_at = failing_unit(plan.units, p)
        report.explanation = explain(report.failed_at, [])
    report.elapsed_s = time.monotonic() - t0
    return report


# -- replay into a QEMU started here ---------------------------------------------------------------


class DestinationDidNotStart(MigtapError):
    """The destination QEMU exited or refused a setting before the migration began."""


async def replay_qemu(  # noqa: C901, PLR0912, PLR0915
    plan: Plan,
    argv: Sequence[str],
    *,
    keep: bool,
    stall_s: float,
    timeout_s: float,
) -> Report:
    """Start the destination QEMU from ``argv`` and replay ``plan`` into it, exactly."""
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="migtap-replay-"))
    qmp_path, mig_path, log_path = tmp / "qmp.sock", tmp / "migrate.sock", tmp / "qemu.log"
    command = [*argv, "-incoming", "defer", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    paused = "-S" in argv
    try:
        with log_path.open("wb") as errlog:
            proc = subprocess.Popen(  # noqa: ASYNC220, S603 - a short spawn; the user's command
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errlog,
                start_new_session=keep,
            )
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DestinationDidNotStart(f"cannot start the destination QEMU: {exc}") from exc
    log.info("replay_destination_started", pid=proc.pid, argv=command)
    qmp = Qmp()
    report = Report("failed", plan, "--qemu")
    try:
        try:
            await qmp.connect(qmp_path, proc, timeout_s=30)
            caps = plan.needs.capabilities
            if caps:
                await qmp.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
                )
            if plan.needs.parameters:
                await qmp.execute("migrate-set-parameters", plan.needs.parameters)
            await qmp.execute("migrate-incoming", {"uri": f"unix:{mig_path}"})
        except (QmpError, OSError, TimeoutError) as exc:
            lines = _lines(log_path)
            first = next((line for line in lines if line.strip()), "")
            raise DestinationDidNotStart(
                f"the destination QEMU did not get ready for the migration: {exc}"
                + (f": {first}" if first else "")
            ) from exc

        async def watch(feeder: MainFeeder) -> dict[str, Any]:
            """Until the destination says completed or failed; then, after a moment for its
            SHUT and close, stop the feeder."""
            info = await _wait_migration(qmp, proc, timeout_s=None)
            await asyncio.sleep(1.0)
            feeder.stop()
            return info

        result, channels, status = await _feed(
            plan,
            Target(path=str(mig_path)),
            {"stall_s": stall_s, "linger_s": _linger_s(plan, timeout_s)},
            timeout_s=10,
            watch=watch,
        )
        report.progress = p = result.progress
        report.channels = channels
        report.feed_error = result.error
        if p.all_read and plan.complete:
            if not status and proc.poll() is None:
                status = await _wait_migration(qmp, proc, timeout_s=5)
            if status.get("status") == "completed":
                report.outcome = "loaded"
        elif p.all_read and not p.closed:
            report.outcome = "incomplete"
        if report.outcome == "failed":
            report.failed_at = failing_unit(plan.units, p)
            await _wait_exit(proc, 10)
            if proc.poll() is None and not status:
                status = await _query(qmp, "query-migrate")
        report.return_path, report.shut, rp_problem = _return_path(result.return_path)
        report.feed_error = report.feed_error or rp_problem
        report.destination_error = _lines(log_path)
        if status.get("error-desc"):
            report.destination_error.append(f"query-migrate: {status['error-desc']}")
        report.explanation = explain(report.failed_at, report.destination_error)
        report.destination = {
            "pid": proc.pid,
            "exit_code": proc.poll(),
            "paused_by_S": paused and report.outcome == "loaded",
            "kept": keep and proc.poll() is None,
        }
        if proc.poll() is None:
            vm = await _query(qmp, "query-status")
            report.destination["status"] = vm.get("status")
            report.destination["running"] = vm.get("running")
        if keep and proc.poll() is None:
            report.destination["workdir"] = str(tmp)
    finally:
        if not (keep and proc.poll() is None):
            await _quit(qmp, proc)
        await qmp.close()
        if not report.destination.get("kept"):
            shutil.rmtree(tmp, ignore_errors=True)
    report.elapsed_s = time.monotonic() - t0
    return report


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()]


async def _query(qmp: Qmp, command: str) -> dict[str, Any]:
    try:
        result = await qmp.execute(command)
    except (QmpError, OSError, TimeoutError, ValueError):
        return {}
    return result if isinstance(result, dict) else {}


async def _wait_migration(
    qmp: Qmp, proc: subprocess.Popen[bytes], timeout_s: float | None
) -> dict[str, Any]:
    """The destination's query-migrate once it says completed or failed (or it exited)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (deadline is None or time.monotonic() < deadline) and proc.poll() is None:
        info = await _query(qmp, "query-migrate")
        if info.get("status") in ("completed", "failed"):
            return info
        await asyncio.sleep(0.05)
    return {}


async def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 - a process
        await asyncio.sleep(0.02)


async def _quit(qmp: Qmp, proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(QmpError, OSError, TimeoutError, AssertionError, ValueError):
            await qmp.execute("quit")
        await _wait_exit(proc, 5)
    if proc.poll() is None:
        proc.terminate()
        await _wait_exit(proc, 5)
    if proc.poll() is None:
        proc.kill()
        await asyncio.to_thread(proc.wait)


# -- the command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("capture", type=Path, help="a capture directory (migtap listen --capture)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--to",
        metavar="HOST:PORT",
        help="a listening destination (-incoming tcp:... or unix:PATH); "
        "unix:PATH is fed record by record, so the failing record is exact",
    )
    where.add_argument(
        "--qemu",
        action="store_true",
        help="start the destination from the QEMU command line after `--` and name "
        "the exact record it failed on",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--log-level", choices=("debug", "info", "warning"), default="warning")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="--qemu: leave the destination running after the report (its pid is printed)",
    )
    parser.add_argument(
        "--stall-timeout-s",
        type=float,
        default=60.0,
        help="give up when the destination reads nothing for this long (default 60)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=120.0,
        help="after the last byte, how long to wait for the destination to finish (default 120)",
    )
    parser.set_defaults(qemu_argv=[])
    _split_at_dashes(parser)


def _split_at_dashes(parser: argparse.ArgumentParser) -> None:
    """Everything after the first ``--`` is the QEMU command line, untouched (argparse would
    match its words against ``replay``'s own options and positionals)."""
    parse = parser.parse_known_args

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        tail: list[str] = []
        if "--" in words:
            cut = words.index("--")
            words, tail = words[:cut], words[cut + 1 :]
        ns, extra = parse(words, namespace)
        ns.qemu_argv = tail
        return ns, extra

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign,assignment]


def _check_args(args: argparse.Namespace) -> tuple[Target | None, list[str]]:
    argv = list(args.qemu_argv)
    if args.qemu:
        if not argv:
            raise ConfigError("--qemu needs the destination's command line after --")
        if "-incoming" in argv:
            raise ConfigError("--qemu adds -incoming itself: leave it out of the QEMU command line")
        return None, argv
    if argv:
        raise ConfigError(f"unexpected arguments {argv!r} (a QEMU command line needs --qemu)")
    if args.to is None:
        raise ConfigError("say where to replay: --to HOST:PORT|unix:PATH or --qemu -- QEMU_ARGV")
    if args.keep:
        raise ConfigError("--keep goes with --qemu")
    return parse_target(args.to), argv


def run(args: argparse.Namespace) -> int:
    """``migtap replay``: returns 0 when the destination loaded, 1 when it failed, 2 for bad
    usage (a capture that cannot be replayed faithfully included)."""
    target, argv = _check_args(args)
    configure_logging("auto", args.log_level)
    try:
        plan = read_plan(args.capture)
    except NotReplayable as exc:
        raise ConfigError(str(exc)) from exc
    log.info(
        "replay_started",
        capture=str(plan.directory),
        records=len(plan.units),
        bytes=plan.length,
        channels=len(plan.channels),
        needs=plan.needs.as_dict(),
    )
    stall_s = args.stall_timeout_s
    try:
        if target is None:
            report = asyncio.run(
                replay_qemu(plan, argv, keep=args.keep, stall_s=stall_s, timeout_s=args.timeout_s)
            )
        else:
            report = asyncio.run(replay_to(plan, target, stall_s=stall_s, linger_s=args.timeout_s))
    except DestinationDidNotStart as exc:
        raise ConfigError(str(exc)) from exc
    log.info(
        "replay_ended",
        outcome=report.outcome,
        failed_at=report.failed_at.offset if report.failed_at else None,
        elapsed_s=round(report.elapsed_s, 3),
    )
    if args.json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        report.write_text(sys.stdout)
    sys.stdout.flush()
    return EXIT_LOADED if report.outcome == "loaded" else EXIT_FAILED
