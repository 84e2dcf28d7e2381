"""Prometheus metrics of the migrations migtap relays (``migtap listen --metrics-listen``).

:class:`MigtapMetrics` holds the process-wide instruments on one ``CollectorRegistry`` (the
relay owns it and serves it over HTTP: ``migtap.relay.metrics_server``). One
:class:`MetricsObserver` per session reads the session model on the tap's tick (about once a
second) and on model changes, never per chunk, so the relay's hot path is untouched.

Counters: one scheme, live deltas reconciled at the end. On each tick the observer adds to the
process-wide counters what the model gained since the last tick (bytes, pages), so the counters
move during a long migration; at close it adds the rest up to the ``migration_summary``'s own
figures. Each session therefore adds exactly its summary's ``bytes_*`` and ``ram_*_pages`` once.
(A counter cannot go down: normal pages less the 7.2 multifd repeats, the one figure that could
in theory shrink between ticks, is held at its highest; it shrinks only if a repeat is found
after a tick without a page counted with it, which QEMU's packets do not produce.)

Per-session gauges carry the labels ``session`` (migtap's session id) and ``source`` (the
source QEMU's host) and are removed when the session ends, so the series stay bounded by the
sessions in flight. docs/metrics.md lists every metric.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from prometheus_client import Counter, Gauge, Histogram, Info

from migtap import __version__
from migtap.model import ConvergenceChanged, PhaseChanged, RoundFinished
from migtap.observers.base import Observer
from migtap.vocabulary import Direction, Outcome

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from migtap.model import Change, Migration
    from migtap.vocabulary import ChannelInfo, SessionSummary

#: Page kinds as the summary counts them (``ram_<kind>_pages``).
PAGE_KINDS: Final = ("normal", "zero", "xbzrle", "compressed")
SESSION_LABELS: Final = ("session", "source")
DURATION_BUCKETS: Final = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
DOWNTIME_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"),
)  # fmt: skip


class MigtapMetrics:
    """Every migtap metric, registered on ``registry`` (one per process when serving; tests
    pass a private one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.info = Info("migtap", "migtap's version", registry=r)
        self.info.info({"version": __version__})
        self.migrations = Counter(
            "migtap_migrations_total", "Sessions ended, by outcome", ["outcome"], registry=r
        )
        self.active = Gauge("migtap_migrations_active", "Sessions in progress", registry=r)
        self.bytes = Counter(
            "migtap_bytes_total",
            "Bytes relayed, all sessions and channels, by direction",
            ["direction"],
            registry=r,
        )
        self.pages = Counter(
            "migtap_ram_pages_total",
            "RAM pages seen on the wire, as the migration_summary counts them",
            ["kind"],
            registry=r,
        )
        self.postcopy_requests = Counter(
            "migtap_postcopy_requests_total",
            "Postcopy page requests of destinations (QMP's postcopy-requests)",
            registry=r,
        )
        self.duration = Histogram(
            "migtap_migration_duration_seconds",
            "Session duration, by outcome",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.downtime = Histogram(
            "migtap_migration_wire_downtime_seconds",
            "Wire downtime: the first section sent with the VM stopped to the end (docs/tap.md)",
            buckets=DOWNTIME_BUCKETS,
            registry=r,
        )
        self.not_converging = Counter(
            "migtap_migrations_not_converging_total",
            "Sessions judged not converging that never reached stop-and-copy (converging false)",
            registry=r,
        )
        self.destination_failures = Counter(
            "migtap_destination_failures_total",
            "Sessions whose destination failed to load (a failure range in the summary)",
            registry=r,
        )
        self.parser_detached = Counter(
            "migtap_parser_detached_total",
            "Parsers detached (damage or a parser bug); the bytes kept flowing",
            registry=r,
        )
        self.capture_failed = Counter(
            "migtap_capture_failed_total",
            "Captures stopped by a write error; the migration went on",
            registry=r,
        )
        s = SESSION_LABELS
        self.round = Gauge(
            "migtap_migration_round", "Current RAM round (1: the bulk round)", s, registry=r
        )
        self.transfer_rate = Gauge(
            "migtap_migration_transfer_rate_bytes",
            "Bytes per second, source to destination, all channels, now",
            s,
            registry=r,
        )
        self.dirty_rate = Gauge(
            "migtap_migration_dirty_rate_bytes",
            "The last finished round's dirty rate (its pages as bytes over the round before)",
            s,
            registry=r,
        )
        self.remaining = Gauge(
            "migtap_migration_remaining_bytes",
            "Bytes of guest RAM not yet sent in the bulk round (0 after it)",
            s,
            registry=r,
        )
        self.converging = Gauge(
            "migtap_migration_converging",
            "The convergence judgment over the last rounds: 1 converging, 0 not",
            s,
            registry=r,
        )
        self.expected_downtime = Gauge(
            "migtap_migration_expected_downtime_seconds",
            "The working set at the transfer rate: how long stopping the VM now would take",
            s,
            registry=r,
        )
        self.started = Gauge(
            "migtap_migration_start_time_seconds",
            "When the session started (Unix time)",
            s,
            registry=r,
        )
        self.session_gauges: tuple[Gauge, ...] = (
            self.round,
            self.transfer_rate,
            self.dirty_rate,
            self.remaining,
            self.converging,
            self.expected_downtime,
            self.started,
        )
        for outcome in Outcome:  # every series exists from the start (rate() needs a zero)
            self.migrations.labels(outcome.value)
            self.duration.labels(outcome.value)
        for direction in Direction:
            self.bytes.labels(direction.value)
        for kind in PAGE_KINDS:
            self.pages.labels(kind)


@dataclass(slots=True)
class _Added:
    """What one session has added to the process-wide counters so far."""

    bytes: dict[str, int] = field(default_factory=dict)
    pages: dict[str, int] = field(default_factory=dict)
    postcopy_requests: int = 0


class MetricsObserver(Observer):
    """Keeps one session's share of the metrics (module docstring). Runs on the loop, per
    tick or model change; the HTTP server reads the registry in its own thread."""

    def __init__(self, migration: Migration, metrics: MigtapMetrics) -> None:
        super().__init__(migration)
        self.metrics = metrics
        self._labels: tuple[str, str] | None = None
        self._added = _Added()
        self._closed = False
        metrics.active.inc()

    # -- labels and series --------------------------------------------------------------------
    def _session_labels(self) -> tuple[str, str] | None:
        """``(session, source)``, fixed once the first connection is known."""
        if self._labels is None:
            channels = self.migration.channels
            if not channels:
                return None
            main = self.migration.main or channels[0]
            self._labels = (str(self.migration.session_id), _host(main.source))
            self.metrics.started.labels(*self._labels).set(self.migration.started)
        return self._labels

    def _remove_series(self) -> None:
        if self._labels is None:
            return
        for gauge in self.metrics.session_gauges:
            with contextlib.suppress(KeyError):  # never set for this session
                gauge.remove(*self._labels)

    # -- live -----------------------------------------------------------------------------------
    def on_tick(self) -> None:
        """Counters move by what the model gained since the last tick; gauges follow it."""
        if self._closed:
            return
        m = self.migration
        self._add_counts(
            bytes_by_direction={d.value: m.bytes_total(d) for d in Direction},
            pages={
                "normal": m.normal - m.resent.count,
                "zero": m.zero,
                "xbzrle": m.xbzrle,
                "compressed": m.compressed,
            },
            postcopy_requests=m.page_requests,
        )
        labels = self._session_labels()
        if labels is None:
            return
        metrics = self.metrics
        metrics.transfer_rate.labels(*labels).set(m.rate_bytes_s)
        self._set_round(labels)
        remaining = m.remaining_bulk_bytes()
        if remaining is not None:
            metrics.remaining.labels(*labels).set(remaining)
        elif m.round_number > 1 or (m.round_number == 1 and m.ram_total):
            metrics.remaining.labels(*labels).set(0)  # the bulk round is over: all sent once

    def _set_round(self, labels: tuple[str, str]) -> None:
        if self.migration.round_number:
            self.metrics.round.labels(*labels).set(self.migration.round_number)

    def on_change(self, change: Change) -> None:
        if self._closed:
            return
        labels = self._session_labels()
        if labels is None:
            return
        match change:
            case PhaseChanged():
                self._set_round(labels)
            case RoundFinished(dirty_rate_bytes_s=rate):
                if rate is not None:
                    self.metrics.dirty_rate.labels(*labels).set(rate)
            case ConvergenceChanged():
                pass  # the judgment itself is read below, after every round
            case _:
                return
        judgment = self.migration.convergence
        if judgment is not None:
            self.metrics.converging.labels(*labels).set(1 if judgment.converging else 0)
            self.metrics.expected_downtime.labels(*labels).set(judgment.expected_downtime_ms / 1000)

    def on_channel_changed(self, channel: ChannelInfo) -> None:
        """A parser was detached (``parse_error`` set; the tap calls this once per detach)."""
        if channel.parse_error is not None:
            self.metrics.parser_detached.inc()

    def capture_failed(self) -> None:
        """The capture's writer stopped on an error (its ``capture_failed`` line was logged)."""
        self.metrics.capture_failed.inc()

    # -- end ------------------------------------------------------------------------------------
    def close(self, summary: SessionSummary) -> None:
        """Counters reach the summary's figures; the histograms and the outcome get this
        session; its per-session series go."""
        if self._closed:
            return
        self._closed = True
        f = summary.fields
        self._add_counts(
            bytes_by_direction={
                Direction.SRC_TO_DST.value: _int(f.get("bytes_src_to_dst")),
                Direction.DST_TO_SRC.value: _int(f.get("bytes_dst_to_src")),
            },
            pages={kind: _int(f.get(f"ram_{kind}_pages")) for kind in PAGE_KINDS},
            postcopy_requests=_int(f.get("postcopy_requests")),
        )
        metrics = self.metrics
        outcome = summary.outcome.value
        metrics.migrations.labels(outcome).inc()
        duration = f.get("duration_s")
        if isinstance(duration, int | float):
            metrics.duration.labels(outcome).observe(duration)
        downtime = f.get("wire_downtime_ms")
        if isinstance(downtime, int | float):
            metrics.downtime.observe(downtime / 1000)
        if f.get("converging") is False:
            metrics.not_converging.inc()
        if f.get("failure") is not None:
            metrics.destination_failures.inc()
        self._remove_series()
        metrics.active.dec()

    def _add_counts(
        self, *, bytes_by_direction: dict[str, int], pages: dict[str, int], postcopy_requests: int
    ) -> None:
        added = self._added
        metrics = self.metrics
        for direction, value in bytes_by_direction.items():
            delta = value - added.bytes.get(direction, 0)
            if delta > 0:
                metrics.bytes.labels(direction).inc(delta)
                added.bytes[direction] = value
        for kind, value in pages.items():
            delta = value - added.pages.get(kind, 0)
            if delta > 0:
                metrics.pages.labels(kind).inc(delta)
                added.pages[kind] = value
        delta = postcopy_requests - added.postcopy_requests
        if delta > 0:
            metrics.postcopy_requests.inc(delta)
            added.postcopy_requests = postcopy_requests


def _host(address: str | None) -> str:
    """The host of ``host:port`` / ``[v6]:port`` (the port changes with every connection)."""
    if not address:
        return "unknown"
    host = address.rpartition(":")[0] or address
    return host.removeprefix("[").removesuffix("]")


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


__all__ = ["MetricsObserver", "MigtapMetrics"]
