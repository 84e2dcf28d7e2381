"""The live view: one line per active migration at the bottom of the terminal, updated in place.

``migtap listen --progress bar`` (``auto`` on a terminal). Two parts, on two sides:

- ``LiveViewObserver``, one per session (built by ``build_observers``), runs on the event loop.
  At the tap's tick (once per progress interval, never per chunk), at a phase change and at a
  finished round it reads the session model and hands the view a ``SessionSnapshot``: plain,
  frozen numbers. At close it hands over one summary line.
- ``LiveView``, one per process (the command line owns it), draws the snapshots with rich's
  ``Live`` display, which refreshes on its own thread a few times a second. That thread sees
  only snapshots, never the model: the loop side swaps in a new mapping (one reference store),
  the thread reads whichever mapping is current. Log lines print through the same ``Console``
  (``migtap.log``), so they scroll above the live region.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Self

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from migtap.model import PhaseChanged, RoundFinished
from migtap.observers.base import Observer
from migtap.observers.progress import bulk_coverage
from migtap.vocabulary import Direction

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from types import TracebackType

    from rich.console import RenderableType

    from migtap.model import Change, Migration
    from migtap.vocabulary import ChannelInfo, SessionSummary

MiB: Final = 1024 * 1024
BAR_WIDTH: Final = 20


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """What the live view shows of one session, copied from the model on the loop."""

    session_id: int
    phase: str
    round: int  # 0 before the first RAM page
    covered_pct: float | None  # bulk round only
    eta_s: float | None
    rate_bytes_s: float
    bytes_src_to_dst: int
    normal: int
    zero: int
    xbzrle: int
    channels: int
    elapsed_s: float
    taken_at: float  # time.monotonic() when copied; the view advances elapsed_s from it

    @classmethod
    def of(cls, m: Migration) -> SessionSnapshot:
        """Copy the figures out of the model (on the loop: the model's thread)."""
        now = m.now
        covered_pct, eta_s = bulk_coverage(m, now)
        return cls(
            session_id=m.session_id,
            phase=m.phase_text,
            round=m.round_number,
            covered_pct=covered_pct,
            eta_s=eta_s,
            rate_bytes_s=m.rate_bytes_s,
            bytes_src_to_dst=m.bytes_total(Direction.SRC_TO_DST),
            normal=m.normal,
            zero=m.zero,
            xbzrle=m.xbzrle,
            channels=len(m.channels),
            elapsed_s=max(0.0, now - m.started),
            taken_at=time.monotonic(),
        )


def summary_line(session_id: int, fields: Mapping[str, object]) -> str:
    """The line a finished session leaves above the live region."""
    parts = [f"s{session_id} {fields.get('outcome', 'unknown')}"]
    duration = fields.get("duration_s")
    if isinstance(duration, int | float):
        parts.append(f"in {duration:.1f}s:")
    sent = fields.get("bytes_src_to_dst")
    if isinstance(sent, int):
        parts.append(f"{sent / MiB:.1f} MiB,")
    parts.append(f"{fields.get('rounds', 0)} rounds,")
    parts.append(
        "pages {}/{}/{}".format(
            fields.get("ram_normal_pages", 0),
            fields.get("ram_zero_pages", 0),
            fields.get("ram_xbzrle_pages", 0),
        )
    )
    downtime = fields.get("wire_downtime_ms")
    if downtime is not None:
        parts.append(f"wire downtime {downtime} ms")
    return " ".join(parts)


def _bar(pct: float, width: int = BAR_WIDTH) -> Text:
    filled = round(pct / 100 * width)
    return Text.assemble(("━" * filled, "green"), ("━" * (width - filled), "grey30"))


def render_row(s: SessionSnapshot, now: float) -> Text:
    """``s1 bulk round    round 1  ━━━━━━━━━━━━━━━━━━━━━━━━  42.0% eta 1.5s  ...``: fixed
    columns, so the rows of several sessions line up; a narrow terminal crops the end."""
    line = Text(no_wrap=True, overflow="ellipsis")
    line.append(f"s{s.session_id:<3}", style="bold")
    line.append(f"{s.phase:<14}", style="cyan")
    line.append(f"{f'round {s.round}' if s.round else '':<9}")
    if s.covered_pct is not None:
        line.append_text(_bar(s.covered_pct))
        eta = "" if s.eta_s is None else f"eta {s.eta_s:.1f}s"
        line.append(f" {s.covered_pct:5.1f}% {eta:<10}")
    else:
        line.append(" " * (BAR_WIDTH + 18))  # the rate lines up with a bulk round's
    line.append(f"{s.rate_bytes_s / MiB:8.1f} MiB/s  pages {s.normal}/{s.zero}/{s.xbzrle}")
    line.append(f"  {s.elapsed_s + max(0.0, now - s.taken_at):.1f}s", style="dim")
    return line


def render(snapshots: Iterable[SessionSnapshot], now: float) -> RenderableType:
    """One row per session: session, phase, round, bulk coverage, ETA, rate, pages, elapsed.

    Pure: reads only the snapshots (runs on rich's refresh thread)."""
    rows = sorted(snapshots, key=lambda s: s.session_id)
    return Group(*(render_row(s, now) for s in rows))


class LiveView:
    """The process-wide live region (module docstring). ``with LiveView() as view:`` around
    the relay; ``update``/``finish`` are called on the loop, ``_render`` on rich's thread."""

    def __init__(self, console: Console | None = None, *, refresh_per_second: float = 4) -> None:
        self.console = console if console is not None else Console(file=sys.stderr)
        self._rows: Mapping[int, SessionSnapshot] = {}  # replaced, never mutated
        self._live = Live(
            console=self.console,
            auto_refresh=True,
            refresh_per_second=refresh_per_second,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=True,  # a stray write to stderr scrolls above too
            get_renderable=self._render,
        )

    def __enter__(self) -> Self:
        self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._live.stop()

    def update(self, snapshot: SessionSnapshot) -> None:
        """On the loop: show ``snapshot`` for its session (a dict copy; no drawing here)."""
        rows = dict(self._rows)
        rows[snapshot.session_id] = snapshot
        self._rows = rows

    def finish(self, session_id: int, line: str) -> None:
        """On the loop: the session ended; its row goes, ``line`` stays above the region."""
        rows = dict(self._rows)
        rows.pop(session_id, None)
        self._rows = rows
        self._live.refresh()  # the row goes now, not at the next refresh
        self.console.print(Text(line, style="bold"), soft_wrap=True)

    @property
    def sessions(self) -> tuple[int, ...]:
        return tuple(sorted(self._rows))

    def _render(self) -> RenderableType:
        """On rich's refresh thread: draw the current snapshots, nothing else."""
        return render(self._rows.values(), time.monotonic())


class LiveViewObserver(Observer):
    """Feeds one session's snapshots to the process-wide ``LiveView`` (module docstring)."""

    def __init__(self, migration: Migration, view: LiveView) -> None:
        super().__init__(migration)
        self.view = view

    def _publish(self) -> None:
        self.view.update(SessionSnapshot.of(self.migration))

    def on_channel(self, channel: ChannelInfo) -> None:
        if channel.index == 0:
            self._publish()

    def on_change(self, change: Change) -> None:
        if isinstance(change, PhaseChanged | RoundFinished):
            self._publish()

    def on_tick(self) -> None:
        self._publish()

    def close(self, summary: SessionSummary) -> None:
        self.view.finish(
            self.migration.session_id, summary_line(self.migration.session_id, summary.fields)
        )


__all__ = [
    "LiveView",
    "LiveViewObserver",
    "SessionSnapshot",
    "render",
    "render_row",
    "summary_line",
]
