"""The listener: accepts source connections, connects each upstream in accept order, shuts down."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import socket
import time
from typing import TYPE_CHECKING, Self

import structlog

from migtap.errors import RelayError
from migtap.model import Migration
from migtap.observers import build_observers
from migtap.observers.capture import CaptureObserver
from migtap.relay.metrics_server import MetricsServer
from migtap.relay.pipe import Pipe, Tuning
from migtap.relay.session import Session, SessionRegistry, fmt_addr, host_of
from migtap.tap import SessionTap, TapSettings

if TYPE_CHECKING:
    from collections.abc import Callable
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
        self._server: asyncio.Server | None = None
        self._tg = asyncio.TaskGroup()
        self._connect_locks: dict[str, asyncio.Lock] = {}
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
        host = self.config.listen.host
        if self.metrics_server is not None:
            await self.metrics_server.start()
        try:
            self._server = await loop.create_server(
                self._accept,
                host=host,
                port=self.config.listen.port,
                reuse_address=True,
                backlog=128,
            )
        except OSError as exc:
            if self.metrics_server is not None:
                await self.metrics_server.stop()
            raise RelayError(f"cannot listen on {self.config.listen}: {exc.strerror}") from exc
        if self.tap_settings is not None:
            self._tg.create_task(self._tick())
        log.info(
            "listening",
            listen=[fmt_addr(s.getsockname()) for s in self._server.sockets],
            forward=str(self.config.forward),
            loop=type(loop).__module__.split(".")[0],
        )

    @property
    def addresses(self) -> list[tuple[str, int]]:
        assert self._server is not None
        return [s.getsockname()[:2] for s in self._server.sockets]

    @property
    def port(self) -> int:
        return self.addresses[0][1]

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
        if self._server is not None:
            self._server.close()
        pending = [p.closed for p in self.pipes.values() if not p.closed.done()]
        if pending:
            log.info("draining", pipes=len(pending), grace_period_s=grace_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await asyncio.gather(*pending)
        for pipe in list(self.pipes.values()):
            pipe.abort("shutdown")
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        log.info("stopped")

    # -- connections ------------------------------------------------------------------------
    def _accept(self) -> asyncio.Protocol:
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
        self.registry.add_pipe(pipe)
        self._tg.create_task(self._connect_upstream(pipe))
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

    async def _connect_upstream(self, pipe: Pipe) -> None:
        try:
            await self._connect_upstream_in_order(pipe)
        except Exception as exc:  # a bug of ours must not take the listener down with it
            log.exception("upstream_connect_crashed", pipe=pipe.pipe_id)
            pipe.upstream_failed(f"internal error: {exc!r}")

    async def _connect_upstream_in_order(self, pipe: Pipe) -> None:
        await asyncio.sleep(0)  # let connection_made run so we know the source's address
        host = host_of(pipe.source)
        # Destinations take the first connection as the main channel (QEMU 7.2): connect in
        # the order the source's connections were accepted.
        lock = self._connect_locks.setdefault(host, asyncio.Lock())
        fwd = self.config.forward
        if pipe.refused:
            return
        async with lock:
            if pipe.downstream.lost:
                pipe.upstream_failed("source left before the destination was connected")
                return
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.config.connect_timeout_s):
                    await loop.create_connection(
                        lambda: pipe.upstream, host=fwd.host or "localhost", port=fwd.port
                    )
            except (OSError, TimeoutError) as exc:
                reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                log.warning(
                    "upstream_connect_failed",
                    pipe=pipe.pipe_id,
                    source=fmt_addr(pipe.source),
                    forward=str(fwd),
                    error=reason,
                    action="source connection reset so its migration fails now",
                )
                pipe.upstream_failed(reason)
                return
        t = pipe.upstream.transport
        sock = t.get_extra_info("socket") if t is not None else None
        if sock is not None:
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


__all__ = ["Relay"]
