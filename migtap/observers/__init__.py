"""Observers of a migration session: the progress log, the annotated log, the capture.

They read the session model (``migtap.model``) and never write it, and never touch a socket
(the base class, ``migtap.observers.base``, states the contract). :func:`build_observers` is
the one place they are made, from the settings, and the one place their order is written:

1. ``AnnotateObserver``: device state decoded (``device_state`` lines); at close it writes
   ``annotated.jsonl`` through the capture, so it closes before the capture.
2. ``ProgressObserver``: phases, rounds, progress lines; at close the ``migration_summary`` line
   (after every observer contributed to the summary).
3. ``LiveViewObserver`` (``--progress bar``): the session's line in the live view; at close
   the session's one-line summary above it.
4. ``MetricsObserver`` (``--metrics-listen``): at close the counters reach the summary's
   figures and the session's series go.
5. ``CaptureObserver`` last: at close it writes ``session.json`` with everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import structlog

from migtap.observers.annotate import AnnotateObserver
from migtap.observers.base import Observer
from migtap.observers.progress import ProgressObserver

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from migtap.model import Migration
    from migtap.observers.live_view import LiveView
    from migtap.observers.metrics import MigtapMetrics
    from migtap.vocabulary import Throttle

log = structlog.get_logger("migtap.tap")

__all__ = ["AnnotateObserver", "Observer", "ProgressObserver", "build_observers"]


def build_observers(
    migration: Migration,
    *,
    capture_dir: Path | None,
    capture_ram: Literal["full", "none"] = "full",
    config: dict[str, Any] | None = None,
    throttle: Throttle,
    call_soon_threadsafe: Callable[[Callable[[], None]], object],
    live_view: LiveView | None = None,
    metrics: MigtapMetrics | None = None,
) -> list[Observer]:
    """The observers of one session, in close order (module docstring)."""
    capture: Observer | None = None
    write_file: Callable[[str, Callable[[], bytes]], None] | None = None
    failure_hooks: list[Callable[[], None]] | None = None
    if capture_dir is not None:
        from migtap.observers.capture import CaptureObserver  # noqa: PLC0415 - only when capturing

        try:
            made = CaptureObserver(
                migration,
                capture_dir,
                capture_ram=capture_ram,
                throttle=throttle,
                call_soon_threadsafe=call_soon_threadsafe,
                config=config,
            )
        except Exception as exc:  # noqa: BLE001 - the tap never breaks a migration
            log.warning(
                "capture_unavailable",
                session=migration.session_id,
                error=repr(exc),
                action="migration continues without a capture",
            )
        else:
            capture, write_file = made, made.write_file
            failure_hooks = made.failure_hooks
    observers: list[Observer] = [
        AnnotateObserver(migration, write_file=write_file),
        ProgressObserver(migration),
    ]
    if live_view is not None:
        from migtap.observers.live_view import LiveViewObserver  # noqa: PLC0415 - rich, on a tty

        observers.append(LiveViewObserver(migration, live_view))
    if metrics is not None:
        from migtap.observers.metrics import MetricsObserver  # noqa: PLC0415 - only when serving

        counting = MetricsObserver(migration, metrics)
        observers.append(counting)
        if failure_hooks is not None:
            failure_hooks.append(counting.capture_failed)
    if capture is not None:
        observers.append(capture)
    return observers
