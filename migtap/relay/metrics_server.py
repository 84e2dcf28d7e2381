"""The Prometheus endpoint: ``migtap listen --metrics-listen HOST:PORT`` serves ``/metrics``.

One process-wide ``CollectorRegistry`` holds migtap's instruments
(``migtap.observers.metrics.MigtapMetrics``, kept by one observer per session) and the process's
own (CPU, memory, file descriptors: ``process_*``; ``python_info``). ``prometheus_client``'s
WSGI server answers scrapes in its own daemon thread and renders the exposition format itself;
the event loop never serves a scrape, and the observers update the instruments only per tick
or per model change, so the relay's hot path is untouched (docs/metrics.md has the figures).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from migtap.errors import ConfigError
from migtap.observers.metrics import MigtapMetrics
from migtap.relay.session import fmt_addr

if TYPE_CHECKING:
    import threading
    from wsgiref.simple_server import WSGIServer

    from migtap.config import Address

log = structlog.get_logger("migtap.relay")

#: Longest wait for the server thread at shutdown (a scrape in flight finishes first).
STOP_TIMEOUT_S = 5.0


class MetricsServer:
    """``await start()`` binds and serves; ``await stop()`` closes. Both run the blocking
    socket calls (bind, name lookup, thread join) in a worker thread."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.metrics = MigtapMetrics(self.registry)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Bind and serve; a bind failure is the user's option to fix (``ConfigError``)."""
        host = self.address.host if self.address.host is not None else "0.0.0.0"  # noqa: S104 - ":PORT" asks for every interface
        try:
            self._httpd, self._thread = await asyncio.to_thread(
                start_http_server, self.address.port or 0, host, self.registry
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {self.address}: {exc.strerror or exc}",
                key="metrics_listen",
            ) from exc
        log.info("metrics_listening", url=f"http://{fmt_addr(self.bound)}/metrics")

    @property
    def bound(self) -> tuple[str, int]:
        """The address actually bound (port 0 gets one from the kernel)."""
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        return self.bound[1]

    async def stop(self) -> None:
        if self._httpd is None:
            return
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None

        def close() -> None:
            httpd.shutdown()  # ends serve_forever; returns once its loop stopped
            httpd.server_close()
            if thread is not None:
                thread.join(STOP_TIMEOUT_S)

        await asyncio.to_thread(close)


__all__ = ["MetricsServer"]
