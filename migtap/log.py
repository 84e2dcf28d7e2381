"""structlog set-up: a console renderer on a TTY, JSON lines otherwise. Logs go to stderr."""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["auto", "console", "json"]
LEVELS = ("debug", "info", "warning", "error")

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


def configure_logging(
    fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog and the stdlib root logger (asyncio, uvloop) with one chain."""
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: structlog.types.Processor
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
        tail: list[structlog.types.Processor] = [compact_progress, renderer]
    else:
        renderer = structlog.processors.JSONRenderer()
        tail = [structlog.processors.dict_tracebacks, renderer]
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*_SHARED, structlog.processors.StackInfoRenderer(), *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))
