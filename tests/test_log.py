from __future__ import annotations

import io
import json

import structlog

from migtap.log import compact_progress, configure_logging


def test_json_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    configure_logging("auto", "info", out)
    structlog.get_logger().info("section_started", section_id=3, idstr="ram")
    structlog.get_logger().debug("hidden")
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "section_started"
    assert record["section_id"] == 3
    assert record["level"] == "info"
    assert record["timestamp"].endswith("Z")


def test_console_progress_is_one_compact_line() -> None:
    event = {
        "event": "migration_progress",
        "session": 2,
        "phase": "bulk round",
        "rate_mib_s": 512.5,
        "ram_normal_pages": 10,
        "ram_zero_pages": 20,
        "ram_xbzrle_pages": 0,
        "bulk_covered_pct": 12.5,
        "bulk_eta_s": 3.0,
        "channels": [{"kind": "main", "rate_mib_s": 512.5}],
        "round_pages": {},
        "bytes_src_to_dst": 1,
        "elapsed_s": 0.4,
    }
    out = compact_progress(None, "info", dict(event))
    assert out["event"] == (
        "migration_progress s2 bulk round 12.5% (eta 3.0s) 512.5 MiB/s pages 10/20/0"
    )
    assert out == {"event": out["event"], "elapsed_s": 0.4}


def test_other_events_are_untouched() -> None:
    event = {"event": "migration_summary", "outcome": "completed"}
    assert compact_progress(None, "info", dict(event)) == event
