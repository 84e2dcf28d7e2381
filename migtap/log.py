"""structlog set-up: a console renderer on a TTY, JSON lines otherwise. Logs go to stderr.

With the live view (``--progress bar``, ``migtap.observers.live_view``), log lines print through
its rich ``Console``, so they scroll above the live region, and ``migration_progress`` lines are
dropped: the live view shows them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Literal, TextIO

import structlog

if TYPE_CHECKING:
    from rich.console import Console

LogFormat = Literal["auto", "console", "json"]
ProgressMode = Literal["auto", "bar", "log"]
LEVELS = ("debug", "info", "warning", "error")
PROGRESS_MODES = ("auto", "bar", "log")

_SHARED: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def compact_progress(
    logger: object, method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """On a console, one short live line per progress tick instead of every key.

    ``migration_progress s1 bulk round 42.0% (eta 1.3s) 812.4 MiB/s pages 1200/300/0``
    """
    del logger, method
    if event_dict.get("event") != "migration_progress":
        return event_dict
    parts = [f"s{event_dict.pop('session', '?')}", str(event_dict.pop("phase", ""))]
    if "bulk_covered_pct" in event_dict:
        pct = event_dict.pop("bulk_covered_pct")
        eta = event_dict.pop("bulk_eta_s", None)
        parts.append(f"{pct}%" + (f" (eta {eta}s)" if eta is not None else ""))
    parts.append(f"{event_dict.pop('rate_mib_s', 0)} MiB/s")
    parts.append(
        "pages {}/{}/{}".format(
            event_dict.pop("ram_normal_pages", 0),
            event_dict.pop("ram_zero_pages", 0),
            event_dict.pop("ram_xbzrle_pages", 0),
        )
    )
    channels = event_dict.pop("channels", [])
    if isinstance(channels, list) and len(channels) > 1:
        parts.append("ch " + " ".join(f"{c.get('kind')}:{c.get('rate_mib_s')}" for c in channels))
    for key in ("round_pages", "bytes_src_to_dst"):
        event_dict.pop(key, None)
    event_dict["event"] = "migration_progress " + " ".join(parts)
    return event_dict


def drop_progress(
    logger: object, method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """With the live view on: ``migration_progress`` lines are not printed (the view shows
    them); every other line is."""
    del logger, method
    if event_dict.get("event") == "migration_progress":
        raise structlog.DropEvent
    return event_dict


def progress_mode(
    progress: str, fmt: str, stream: TextIO | None = None
) -> tuple[Literal["bar", "log"], str | None]:
    """Whether ``migtap listen`` shows the live view, and why not when ``bar`` was asked for.

    ``auto``: the live view when ``stream`` (stderr) is a terminal and the log format is not
    JSON; ``bar``: on any terminal; ``log``: never. Not on a pipe, a file or a dumb terminal.
    """
    out = stream if stream is not None else sys.stderr
    if progress == "log":
        return "log", None
    reason = None
    if not out.isatty():
        reason = "stderr is not a terminal"
    elif os.environ.get("TERM", "") in ("dumb", "unknown"):
        reason = "stderr is a dumb terminal (TERM=dumb)"
    if reason is not None:
        return "log", reason if progress == "bar" else None
    if progress == "auto" and fmt == "json":
        return "log", None
    return "bar", None


class _ConsoleLogger:
    """A structlog logger that prints through a rich Console (above its live display)."""

    def __init__(self, console: Console) -> None:
        from rich.text import Text  # noqa: PLC0415 - only with the live view

        self._console = console
        self._text = Text.from_ansi

    def msg(self, message: str) -> None:
        self._console.print(self._text(message), soft_wrap=True)

    log = debug = info = warn = warning = error = err = critical = exception = msg


class _ConsoleHandler(logging.Handler):
    """The stdlib records (asyncio, uvloop), printed through the same Console."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self._logger = _ConsoleLogger(console)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._logger.msg(self.format(record))
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def configure_logging(
    fmt: LogFormat = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    console: Console | None = None,
) -> None:
    """Configure structlog and the stdlib root logger (asyncio, uvloop) with one chain.

    ``console``: the live view's; lines print through it and ``migration_progress`` is dropped.
    """
    out = stream if stream is not None else sys.stderr
    terminal = out.isatty() if console is None else console.is_terminal
    use_console = fmt == "console" or (fmt == "auto" and terminal)
    renderer: structlog.types.Processor
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=terminal)
        tail: list[structlog.types.Processor] = [compact_progress, renderer]
    else:
        renderer = structlog.processors.JSONRenderer()
        tail = [structlog.processors.dict_tracebacks, renderer]
    if console is not None:
        tail.insert(0, drop_progress)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*_SHARED, structlog.processors.StackInfoRenderer(), *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=(
            structlog.PrintLoggerFactory(file=out)
            if console is None
            else (lambda *_args: _ConsoleLogger(console))
        ),
        cache_logger_on_first_use=False,
    )
    handler: logging.Handler = (
        logging.StreamHandler(out) if console is None else _ConsoleHandler(console)
    )
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))
