"""The listener: accepts source connections, connects each upstream in accept order, shuts down."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import os
import socket
import stat
import time
from typing import TYPE_CHECKING, Self

import structlog

from migtap.config import DEFAULT_LISTEN_MODE, Address, UnixAddress
from migtap.errors import ConfigError
from migtap.model import Migration
from migtap.observers import build_observers
from migtap.observers.capture import CaptureObserver
from migtap.relay.metrics_server import MetricsServer
from migtap.relay.pipe import Pipe, Tuning
from migtap.relay.session import Session, SessionRegistry, fmt_addr, host_of
from migtap.tap import SessionTap, TapSettings

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import TracebackType

    from migtap.config import Config
    from migtap.decode import Job
    from migtap.model import DeviceBatch
    from migtap.vocabulary import SessionSummary

log = structlog.get_logger("migtap.relay")

#: Longest wait for a session's decoding jobs, then for its capture writer, at its end.
CLOSE_TIMEOUT_S = 30.0


class Relay:
    """``async with Relay(config) as relay:`` listens until the block ends or ``stop()``."""

    def __init__(self, config: Config, *, tap: TapSettings | None = None) -> None:
        self.config = config
        self.tap_settings = tap
        self.tuning = Tuning(
            write_limits=(config.write_buffer_high, config.write_buffer_low),
            socket_buffer=config.socket_buffer,
            read_size=config.read_size,
        )
        self.registry = SessionRegistry(
            on_session_end=self._session_ended,
            tap_factory=self._make_tap if tap is not None else None,
        )
        self.pipes: dict[int, Pipe] = {}
        self._next_pipe = 1
        self._servers: list[asyncio.Server] = []
        #: A unix listener's socket file, with its (st_dev, st_ino): removed on exit if unchanged.
        self._unix_socket: tuple[Path, tuple[int, int]] | None = None
        self._tg = asyncio.TaskGroup()
        #: Per (source host, listener): connections go upstream in the order they came in.
        self._connect_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._stopping = asyncio.Event()
        self._closing = False
        self.sessions_ended: collections.deque[Session] = collections.deque(maxlen=256)
        #: Device-state decoding jobs in flight, per session (closing waits for them).
        self._jobs: dict[int, set[asyncio.Future[DeviceBatch]]] = {}
        #: ``--metrics-listen``: the Prometheus endpoint, from ``start()`` to ``shutdown()``.
        self.metrics_server = (
            MetricsServer(config.metrics_listen) if config.metrics_listen is not None else None
        )

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self._tg.__aenter__()
        try:
            await self.start()
        except BaseException:
            await self._tg.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown(grace_s=0 if exc is not None else self.config.grace_period_s)
        await self._tg.__aexit__(exc_type, exc, tb)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        if self.metrics_server is not None:
            await self.metrics_server.start()
        try:
            if isinstance(listen, UnixAddress):
                await self._listen_unix(loop, listen)
            else:
                await self._listen_tcp(loop, listen)
        except BaseException:
            await self._close_listeners()
            if self.metrics_server is not None:
                await self.metrics_server.stop()
            raise
        if self.tap_settings is not None:
            self._tg.create_task(self._tick())
        extra: dict[str, object] = {}
        if isinstance(listen, UnixAddress):
            shown = [str(listen)]
            extra["mode"] = f"{self.config.listen_mode or DEFAULT_LISTEN_MODE:04o}"
        elif listen.last_port is not None:
            shown = [str(listen)]
            extra["ports"] = len(listen.ports)
        else:
            shown = [fmt_addr(s.getsockname()) or "?" for srv in self._servers for s in srv.sockets]
        log.info(
            "listening",
            listen=shown,
            forward=str(self.config.forward),
            loop=type(loop).__module__.split(".")[0],
            **extra,
        )

    async def _listen_tcp(self, loop: asyncio.AbstractEventLoop, listen: Address) -> None:
        """One listener per port (``HOST:FIRST-LAST``); any port that fails fails them all."""
        for port in listen.ports:
            label = str(Address(listen.host, port))
            try:
                server = await loop.create_server(
                    functools.partial(self._accept, label),
                    host=listen.host,
                    port=port,
                    reuse_address=True,
                    backlog=128,
                )
            except OSError as exc:
                where = label if listen.last_port is None else f"{label} (of {listen})"
                raise ConfigError(f"cannot listen on {where}: {why(exc)}", key="listen") from exc
            self._servers.append(server)

    async def _listen_unix(self, loop: asyncio.AbstractEventLoop, listen: UnixAddress) -> None:
        mode = self.config.listen_mode or DEFAULT_LISTEN_MODE
        sock = bind_unix(listen.path, mode)
        st = listen.path.stat()
        self._unix_socket = (listen.path, (st.st_dev, st.st_ino))
        try:
            server = await loop.create_unix_server(
                functools.partial(self._accept, str(listen)), sock=sock, backlog=128
            )
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {listen}: {why(exc)}", key="listen") from exc
        self._servers.append(server)

    async def _close_listeners(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await server.wait_closed()
        if self._unix_socket is not None:
            path, ident = self._unix_socket
            self._unix_socket = None
            remove_unix_socket(path, ident)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The TCP addresses listened on (none for a unix socket)."""
        return [
            s.getsockname()[:2]
            for srv in self._servers
            for s in srv.sockets
            if s.family in (socket.AF_INET, socket.AF_INET6)
        ]

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def unix_path(self) -> Path | None:
        """A unix listener's socket file."""
        listen = self.config.listen
        return listen.path if isinstance(listen, UnixAddress) else None

    def stop(self) -> None:
        self._stopping.set()

    def _make_tap(self, session: Session) -> SessionTap:
        settings = self.tap_settings
        assert settings is not None
        loop = asyncio.get_running_loop()
        migration = Migration(
            session.session_id, started=session.started_wall, page_size=settings.page_size
        )
        observers = build_observers(
            migration,
            capture_dir=settings.capture_dir,
            capture_ram=settings.capture_ram,
            config=settings.config,
            throttle=session,
            call_soon_threadsafe=loop.call_soon_threadsafe,
            live_view=settings.live_view,
            metrics=None if self.metrics_server is None else self.metrics_server.metrics,
        )
        jobs = self._jobs.setdefault(session.session_id, set())

        def offload(job: Job, done: Callable[[DeviceBatch], None]) -> None:
            """Decode device state in a worker thread; hand the result back on the loop."""
            future = loop.run_in_executor(None, job)
            jobs.add(future)

            def finished(f: asyncio.Future[DeviceBatch]) -> None:
                jobs.discard(f)
                if f.cancelled():
                    return
                exc = f.exception()
                if exc is not None:
                    log.error("device_decoding_crashed", session=session.session_id,
                              error=repr(exc), exc_info=exc)  # fmt: skip
                    return
                done(f.result())

            future.add_done_callback(finished)

        capture = next((o for o in observers if isinstance(o, CaptureObserver)), None)
        return SessionTap(
            migration,
            observers,
            vmdesc=settings.vmdesc,
            progress_interval_s=settings.progress_interval_s,
            offload=offload,
            capture_dir=None if capture is None else str(capture.directory),
        )

    async def _tick(self) -> None:
        """Drive the progress logs: they are throttled to one line per interval each."""
        assert self.tap_settings is not None
        interval = min(self.tap_settings.progress_interval_s, 1.0) / 4
        while not self._closing:
            await asyncio.sleep(interval)
            for session in list(self.registry.sessions.values()):
                if session.tap is not None:
                    try:
                        session.tap.tick()
                    except Exception:  # a tap bug must not stop the ticks of other sessions
                        log.exception("tap_crashed", session=session.session_id)

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, let sessions finish within ``grace_s``, then abort the rest."""
        self._closing = True
        for server in self._servers:
            server.close()
        pending = [p.closed for p in self.pipes.values() if not p.closed.done()]
        if pending:
            log.info("draining", pipes=len(pending), grace_period_s=grace_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await asyncio.gather(*pending)
        for pipe in list(self.pipes.values()):
            pipe.abort("shutdown")
        await self._close_listeners()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        log.info("stopped")

    # -- connections ------------------------------------------------------------------------
    def _accept(self, listener: str) -> asyncio.Protocol:
        """A connection came in on ``listener`` (its address as the user would type it)."""
        pipe_id = self._next_pipe
        self._next_pipe += 1
        pipe = Pipe(
            pipe_id,
            tuning=self.tuning,
            observer=self.registry,
            on_closed=self._pipe_closed,
            admit=self._admit if self.config.allow else None,
        )
        self.pipes[pipe_id] = pipe
        self.registry.add_pipe(pipe, listener)
        self._tg.create_task(self._connect_upstream(pipe, listener))
        return pipe.downstream

    def _admit(self, peer: tuple[object, ...] | None) -> bool:
        """--allow: is the source's address in one of the allowed networks?"""
        try:
            addr = ipaddress.ip_address(str(peer[0])) if peer else None
        except ValueError:
            addr = None
        if addr is not None and isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        if addr is not None and any(addr in net for net in self.config.allow):
            return True
        log.warning(
            "connection_refused",
            source=fmt_addr(peer),
            allow=[str(n) for n in self.config.allow],
            action="reset; add --allow for this source if it should migrate through migtap",
        )
        return False

    async def _connect_upstream(self, pipe: Pipe, listener: str) -> None:
        try:
            await self._connect_upstream_in_order(pipe, listener)
        except Exception as exc:  # a bug of ours must not take the listener down with it
            log.exception("upstream_connect_crashed", pipe=pipe.pipe_id)
            pipe.upstream_failed(f"internal error: {exc!r}")

    async def _connect_upstream_in_order(self, pipe: Pipe, listener: str) -> None:
        await asyncio.sleep(0)  # let connection_made run so we know the source's address
        host = host_of(pipe.source)
        # Destinations take the first connection as the main channel (QEMU 7.2): connect in
        # the order the source's connections were accepted (on one listener; a unix socket's
        # sources have no host, so its connections keep one order).
        lock = self._connect_locks.setdefault((host, listener), asyncio.Lock())
        if pipe.refused:
            return
        async with lock:
            if pipe.downstream.lost:
                pipe.upstream_failed("source left before the destination was connected")
                return
            loop = asyncio.get_running_loop()
            fwd = self.config.forward
            target = str(fwd)
            try:
                async with asyncio.timeout(self.config.connect_timeout_s):
                    if isinstance(fwd, UnixAddress):
                        await loop.create_unix_connection(lambda: pipe.upstream, str(fwd.path))
                    else:
                        port = fwd.port if fwd.port is not None else local_port(pipe)
                        target = str(Address(fwd.host, port))
                        await loop.create_connection(
                            lambda: pipe.upstream, host=fwd.host or "localhost", port=port
                        )
            except (OSError, TimeoutError) as exc:
                reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                log.warning(
                    "upstream_connect_failed",
                    pipe=pipe.pipe_id,
                    source=fmt_addr(pipe.source),
                    forward=target,
                    error=reason,
                    action="source connection reset so its migration fails now",
                )
                pipe.upstream_failed(reason)
                return
        t = pipe.upstream.transport
        sock = t.get_extra_info("socket") if t is not None else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.debug(
            "pipe_opened",
            pipe=pipe.pipe_id,
            source=fmt_addr(pipe.source),
            destination=fmt_addr(pipe.destination),
        )

    def _pipe_closed(self, pipe: Pipe) -> None:
        self.pipes.pop(pipe.pipe_id, None)
        log.debug(
            "pipe_closed",
            pipe=pipe.pipe_id,
            reason=pipe.close_reason,
            error=pipe.error,
            bytes_src_to_dst=pipe.bytes_src_to_dst,
            bytes_dst_to_src=pipe.bytes_dst_to_src,
        )

    def _session_ended(self, session: Session) -> None:
        """The last connection of a session closed: finish its tap without blocking the loop
        (device decoding and the capture writer finish in threads; see ``_close_session``)."""
        closing = self._close_session(session)
        try:
            self._tg.create_task(closing)
        except RuntimeError:  # the task group already finished (a pipe closed after shutdown)
            closing.close()
            summary = None
            if session.tap is not None:
                try:
                    summary = session.tap.close()
                except Exception:  # a tap bug must not take the relay down
                    log.exception("tap_crashed", session=session.session_id)
            self._log_session_ended(session, summary)

    async def _close_session(self, session: Session) -> None:
        tap = session.tap
        summary = None
        if tap is not None:
            try:
                tap.finish()
                jobs = self._jobs.get(session.session_id, set())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        while jobs:
                            await asyncio.gather(*list(jobs), return_exceptions=True)
                summary = tap.close()
                if not await asyncio.to_thread(tap.wait_closed, CLOSE_TIMEOUT_S):
                    log.warning(
                        "session_close_slow",
                        session=session.session_id,
                        timeout_s=CLOSE_TIMEOUT_S,
                        action="the capture is still being written; it finishes on its own",
                    )
            except Exception:  # a tap bug must not take the relay down
                log.exception("tap_crashed", session=session.session_id)
            finally:
                self._jobs.pop(session.session_id, None)
        self._log_session_ended(session, summary)

    def _log_session_ended(self, session: Session, summary: SessionSummary | None) -> None:
        s2d, d2s = session.totals()
        duration = (session.ended or time.monotonic()) - session.started
        errors = [c.pipe.error for c in session.channels if c.pipe.error]
        reasons = sorted({c.pipe.close_reason or "?" for c in session.channels})
        log.info(
            "session_ended",
            session=session.session_id,
            source=session.source_host,
            channels=[c.kind.value if c.kind else "unknown" for c in session.channels],
            bytes_src_to_dst=s2d,
            bytes_dst_to_src=d2s,
            duration_s=round(duration, 3),
            rate_mib_s=round(s2d / duration / 2**20, 1) if duration > 0 else None,
            close_reasons=reasons,
            errors=errors or None,
            outcome=summary.outcome.value if summary is not None else None,
        )
        self.sessions_ended.append(session)


def why(exc: OSError) -> str:
    """The system's own words for an error (asyncio rewrites ``strerror`` of a failed bind)."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def local_port(pipe: Pipe) -> int:
    """The port a source's connection came in on (``--forward HOST`` connects to the same)."""
    t = pipe.downstream.transport
    name = t.get_extra_info("sockname") if t is not None else None
    if not isinstance(name, tuple) or len(name) < 2:
        raise OSError("no local port known for this connection")  # reported as connect failure
    return int(name[1])


def bind_unix(path: Path, mode: int) -> socket.socket:
    """A unix socket bound at ``path`` with file mode ``mode`` from the start: the umask is
    narrowed around ``bind()`` (it is process-wide, so other threads' files are created no
    wider meanwhile), then the mode is set exactly. A socket file left by an earlier run is
    replaced only if nothing listens on it."""
    clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old)
        path.chmod(mode)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on unix:{path}: {exc.strerror or exc}",
                          key="listen") from exc  # fmt: skip
    sock.setblocking(False)  # noqa: FBT003 - the socket API's own flag
    return sock


def clear_stale_socket(path: Path) -> None:
    """Remove a socket file that nothing listens on (connecting is refused); anything else
    at ``path`` is a usage error."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot use unix:{path}: {exc.strerror}", key="listen") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(
            f"unix:{path} exists and is not a socket; migtap replaces only a stale socket file",
            key="listen",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)
        log.info("stale_socket_removed", path=str(path))
        return
    except FileNotFoundError:
        return
    except TimeoutError:
        pass  # a listener with a full backlog: in use
    except OSError as exc:
        raise ConfigError(f"cannot check unix:{path}: {exc.strerror}", key="listen") from exc
    finally:
        probe.close()
    raise ConfigError(
        f"unix:{path} is in use: something listens on it (another migtap?); "
        "stop it or choose another path",
        key="listen",
    )


def remove_unix_socket(path: Path, ident: tuple[int, int]) -> None:
    """Remove our socket file, unless another process has replaced it meanwhile."""
    try:
        st = path.lstat()
        if (st.st_dev, st.st_ino) == ident:
            path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("socket_not_removed", path=str(path), error=exc.strerror)


__all__ = ["Relay"]
