"""``migtap report CAPTURE_DIR [-o report.html]``: one self-contained HTML page of a migration.

The capture goes through ``migtap.analyze.analyze_path`` (the same tap and session model as the
live run), and the page shows what the model holds: the outcome and its key figures, the QEMU
versions inferred with their evidence, a timeline (bytes per second per channel and direction,
from the index's times and offsets, with the phases as bands and the round boundaries marked),
the rounds (chart and table, with the model's convergence judgment), every device section with
its decoded fields (``<details>``, no JavaScript), the capture's completeness and, when the
destination failed, the range of the stream it can have been reading.

The page fetches nothing: styles are inline, the charts are SVG drawn by matplotlib with text
as paths (no font is needed), and no URL appears in the HTML. matplotlib is an optional
dependency (``pip install 'migtap[report]'``); without it the command says so in one line and
exits 2. docs/report.md describes the page.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import io
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from migtap import __version__
from migtap.analyze import analyze_path
from migtap.capture_format import EVENTS_FILE, SESSION_FILE, read_index, read_session
from migtap.errors import MigtapError
from migtap.model import NOT_FALLING, RATE_SLACK
from migtap.vocabulary import ChannelKind, Direction

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from migtap.analyze import Analysis
    from migtap.model import Convergence, DeviceResult, Migration, Round
    from migtap.wire.generation import Estimate

EXIT_MISSING_LIBRARY: Final = 2
MiB: Final = 1024 * 1024
#: Time buckets of the timeline (about; at least 1 ms each).
TIMELINE_BUCKETS: Final = 160
#: Field values shown per list and bytes shown per field, before "... N more".
LIST_ITEMS_SHOWN: Final = 64
BYTES_SHOWN: Final = 64
#: Round boundaries labelled on the timeline (more are drawn, unlabelled).
ROUND_LABELS_MAX: Final = 24

_PHASE_COLOURS: Final = {
    "setup": "#d9d9d9",
    "round": "#dbe9f6",
    "round-alt": "#c6dbef",
    "stop-and-copy": "#fdd0a2",
    "postcopy": "#dadaeb",
}
_OUTCOME_COLOURS: Final = {
    "completed": "#2e7d32",
    "failed": "#c62828",
    "cancelled": "#ef6c00",
    "unknown": "#616161",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("capture", type=Path, help="a capture directory (migtap listen --capture)")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("report.html"),
        help="the HTML file to write (default: report.html)",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``migtap report``; returns the exit code."""
    if importlib.util.find_spec("matplotlib") is None:
        sys.stderr.write(
            "migtap report: needs matplotlib, which is not installed: "
            "pip install 'migtap[report]'\n"
        )
        return EXIT_MISSING_LIBRARY
    try:
        page = build_report(args.capture)
        args.output.write_text(page, encoding="utf-8")
    except (OSError, ValueError, MigtapError) as exc:
        sys.stderr.write(f"migtap report: {args.capture}: {exc}\n")
        return 1
    sys.stdout.write(f"{args.output}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="migtap report", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


# -- what the page is made of ---------------------------------------------------------------------


@dataclass(slots=True)
class Series:
    """Bytes per second of one channel in one direction, per time bucket."""

    label: str
    rates: list[float]


@dataclass(slots=True)
class Timeline:
    start: float  # wall-clock seconds of t = 0 (the session's start)
    width_s: float  # one bucket
    series: list[Series] = field(default_factory=list)


def build_report(directory: Path) -> str:
    """The HTML page of one capture directory (module docstring)."""
    if not directory.is_dir():
        raise MigtapError("not a capture directory")
    if not (directory / "src-to-dst.bin").is_file():
        raise MigtapError("no src-to-dst.bin: not a capture directory")
    session = read_session(directory) if (directory / SESSION_FILE).is_file() else None
    a = analyze_path(directory)
    m = a.migration
    summary = a.summary()
    timeline = None
    if (directory / EVENTS_FILE).is_file():
        timeline = read_timeline(directory / EVENTS_FILE, m)
    parts = [
        _head(directory, m, summary),
        _outcome(a, summary),
        _failure(summary, directory),
        _timeline(timeline, m),
        _rounds(m),
        _devices(m),
        _versions(m),
        _completeness(session),
    ]
    return _page(directory, "\n".join(p for p in parts if p))


def read_timeline(index: Path, m: Migration) -> Timeline:
    """Bytes per second per channel and direction, from the index: each event's time ``t`` and
    where it ends in its channel's stream (its ``offset``, plus ``length`` for RAM runs and
    ``payload_bytes`` for multifd packets). Streams the file; memory is per bucket."""
    end = m.ended if m.ended is not None else m.now
    duration = max(end - m.started, 0.0)
    width = max(duration / TIMELINE_BUCKETS, 0.001)
    buckets = int(duration / width) + 1
    reach: dict[tuple[int, str], list[int]] = {}
    for record in read_index(index):
        ch, dir_, offset, t = (record.get(k) for k in ("ch", "dir", "offset", "t"))
        if (
            not isinstance(ch, int)
            or not isinstance(offset, int)
            or dir_ not in ("src-to-dst", "dst-to-src")
        ):
            continue
        if not isinstance(t, int | float):
            continue
        size = record.get("length") if record.get("kind") == "ram_pages" else None
        if record.get("kind") == "multifd_packet":
            size = record.get("payload_bytes")
        stop = offset + (size if isinstance(size, int) else 0)
        n = min(max(int((t - m.started) / width), 0), buckets - 1)
        row = reach.setdefault((ch, str(dir_)), [0] * buckets)
        row[n] = max(row[n], stop)
    names = {c.index: c for c in m.channels}
    timeline = Timeline(m.started, width)
    for (ch, dir_), row in sorted(reach.items()):
        rates, seen = [], 0
        for value in row:
            now = max(seen, value)
            rates.append((now - seen) / width)
            seen = now
        info = names.get(ch)
        name = info.label if info is not None else f"channel {ch}"
        if info is not None and info.kind is ChannelKind.MAIN and dir_ == "dst-to-src":
            label = f"{name}: return path"
        else:
            label = f"{name}: {'source to destination' if dir_ == 'src-to-dst' else dir_}"
        timeline.series.append(Series(label, rates))
    return timeline


# -- charts (matplotlib, SVG inline) -------------------------------------------------------------


def _figure(width_in: float, height_in: float) -> Figure:
    from matplotlib.figure import Figure  # noqa: PLC0415 - optional dependency, loaded on use

    return Figure(figsize=(width_in, height_in), layout="constrained")


def _svg(fig: Figure, title: str) -> str:
    """The figure as an ``<svg>`` element for inline HTML: text drawn as paths (no font to
    fetch), and no XML prolog, doctype, namespace URIs or RDF metadata (no URL in the page)."""
    import matplotlib as mpl  # noqa: PLC0415 - optional dependency, loaded on use

    buf = io.StringIO()
    with mpl.rc_context({"svg.fonttype": "path", "svg.hashsalt": "migtap-report"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.DOTALL)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    svg = re.sub(r"<svg ", f'<svg role="img" aria-label="{_esc(title)}" ', svg, count=1)
    return svg.strip()


def _style_axes(ax: Axes) -> None:
    ax.grid(axis="y", color="#e0e0e0", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def timeline_chart(timeline: Timeline, m: Migration) -> str:
    fig = _figure(11, 3.8)
    ax = fig.add_subplot()
    _style_axes(ax)
    xs = [n * timeline.width_s for n in range(len(timeline.series[0].rates) + 1)]
    top = max((max(s.rates, default=0.0) for s in timeline.series), default=0.0) / MiB
    for s in timeline.series:
        ys = [r / MiB for r in s.rates]
        ax.stairs(ys, xs, label=s.label, linewidth=1.4, baseline=None)
    for start, stop, name, colour in phase_bands(m):
        ax.axvspan(
            start - m.started, stop - m.started, color=colour, alpha=0.55, linewidth=0, zorder=0
        )
        ax.text(
            (start + stop) / 2 - m.started,
            1.01,
            name,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=7,
            color="#424242",
            clip_on=False,
        )
    for rnd in m.rounds:
        x = rnd.started - m.started
        ax.axvline(x, color="#1565c0", linewidth=0.7, linestyle="--", alpha=0.8)
        if len(m.rounds) <= ROUND_LABELS_MAX:
            ax.text(
                x,
                0.98,
                f" R{rnd.number}",
                transform=ax.get_xaxis_transform(),
                va="top",
                fontsize=7,
                color="#1565c0",
            )
    ax.set_xlim(0, xs[-1])
    ax.set_ylim(0, max(top * 1.1, 0.001))
    ax.set_xlabel("seconds since the session started")
    ax.set_ylabel("MiB/s")
    ax.legend(loc="upper left", fontsize=8, frameon=False, bbox_to_anchor=(1.01, 1.0))
    return _svg(fig, "Bytes per second per channel over time, phases as bands, rounds marked")


def phase_bands(m: Migration) -> list[tuple[float, float, str, str]]:
    """``(start, end, name, colour)`` of the phases, from the model's times."""
    end = m.ended if m.ended is not None else m.now
    bands: list[tuple[float, float, str, str]] = []
    first = m.rounds[0].started if m.rounds else (m.stopped_at or end)
    if first > m.started:
        bands.append((m.started, first, "setup", _PHASE_COLOURS["setup"]))
    stop = m.stopped_at if m.stopped_at is not None and not m.postcopy else None
    for n, rnd in enumerate(m.rounds):
        r_end = rnd.ended if rnd.ended is not None else end
        if stop is not None:
            r_end = min(r_end, stop)
        if r_end <= rnd.started:
            continue
        name = "bulk round" if rnd.number == 1 else ""
        colour = _PHASE_COLOURS["round" if n % 2 == 0 else "round-alt"]
        bands.append((rnd.started, r_end, name, colour))
    if m.postcopy and m.stopped_at is not None:
        bands.append((m.stopped_at, end, "postcopy", _PHASE_COLOURS["postcopy"]))
    elif stop is not None:
        s_end = m.eof_at if m.eof_at is not None else end
        bands.append((stop, max(s_end, stop), "stop-and-copy", _PHASE_COLOURS["stop-and-copy"]))
    return bands


def stalled_rounds(m: Migration) -> set[int]:
    """Rounds after the bulk round that did not fall: at least ``NOT_FALLING`` of the pages of
    the round before (the model's convergence rule, round by round)."""
    out = set()
    for before, rnd in zip(m.rounds, m.rounds[1:], strict=False):
        if rnd.number > 2 and before.pages and rnd.pages >= NOT_FALLING * before.pages:
            out.add(rnd.number)
    return out


def dirty_rate(rnd: Round, m: Migration) -> float | None:
    """As ``ram_round_finished`` gives it: the round's pages over its duration (not the bulk)."""
    if rnd.ended is None or rnd.number == 1:
        return None
    d = rnd.duration_s(m.now)
    return rnd.pages * m.page_size / d if d > 0 else None


def rounds_chart(m: Migration) -> str:
    from matplotlib.patches import Patch  # noqa: PLC0415 - optional dependency, loaded on use

    fig = _figure(11, 3.4)
    ax = fig.add_subplot()
    _style_axes(ax)
    numbers = [r.number for r in m.rounds]
    stalled = stalled_rounds(m)
    judged = set(m.convergence.rounds) if m.convergence is not None else set()
    bottom = [0.0] * len(m.rounds)
    for kind, colour in (("normal", "#1f77b4"), ("zero", "#aec7e8"), ("xbzrle", "#9467bd")):
        values = [float(getattr(r, kind)) for r in m.rounds]
        ax.bar(numbers, values, bottom=bottom, color=colour, width=0.7, label=f"{kind} pages")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for r, height in zip(m.rounds, bottom, strict=True):
        if r.number in stalled:
            ax.bar(
                [r.number],
                [height],
                width=0.7,
                fill=False,
                edgecolor="#c62828",
                linewidth=1.6,
                hatch="///",
            )
    positive = [b for b in bottom if b > 0]
    if positive and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(positive) / 2, top=max(positive) * 1.5)
    ax.set_xlabel("round")
    ax.set_ylabel("pages")
    if len(numbers) <= 40:
        ax.set_xticks(numbers)
    ax.set_xlim(0.3, max(len(numbers), 4) + 0.7)
    rate_ax = ax.twinx()
    rates = [(r.number, dirty_rate(r, m)) for r in m.rounds]
    shown = [(n, v / MiB) for n, v in rates if v is not None]
    if shown:
        rate_ax.plot(
            [n for n, _ in shown],
            [v for _, v in shown],
            color="#d62728",
            marker="o",
            markersize=3,
            linewidth=1.2,
            label="dirty rate",
        )
        rate_ax.set_ylim(0, max(v for _, v in shown) * 1.2 or 1)
    rate_ax.set_ylabel("dirty rate, MiB/s", color="#d62728")
    rate_ax.spines["top"].set_visible(False)
    handles, labels = ax.get_legend_handles_labels()
    stall_label = f"not falling (≥ {NOT_FALLING:.0%})"
    extra = Patch(fill=False, edgecolor="#c62828", hatch="///", label=stall_label)
    if judged:
        title = f"rounds {', '.join(map(str, sorted(judged)))} judged"
        ax.set_title(title, fontsize=8, loc="left", color="#424242")
    lines, line_labels = rate_ax.get_legend_handles_labels()
    ax.legend(
        [*handles, extra, *lines],
        [*map(str, labels), stall_label, *map(str, line_labels)],
        fontsize=8,
        frameon=False,
        loc="upper left",
        bbox_to_anchor=(1.08, 1.0),
    )
    return _svg(fig, "Pages per round and dirty rate")


# -- HTML ----------------------------------------------------------------------------------------


def _esc(value: object) -> str:
    """Escaped text; ``://`` is written as ``:&#47;&#47;`` so that no URL appears in the page
    source, whatever a capture's strings hold."""
    return html.escape(str(value)).replace("://", ":&#47;&#47;")


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if abs(value) >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} B"


def _time(wall: float | None) -> str:
    if not wall:
        return "-"
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table of already-escaped cells."""
    h = "".join(f"<th>{c}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _facts(pairs: list[tuple[str, str]]) -> str:
    items = "".join(f"<div><dt>{_esc(k)}</dt><dd>{v}</dd></div>" for k, v in pairs)
    return f'<dl class="facts">{items}</dl>'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_esc(title)}</h2>\n{body}\n</section>'


def _head(directory: Path, m: Migration, summary: dict[str, Any]) -> str:
    outcome = str(summary.get("outcome") or "unknown")
    colour = _OUTCOME_COLOURS.get(outcome, _OUTCOME_COLOURS["unknown"])
    verdict, verdict_cls = convergence_verdict(m)
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in (
            ("outcome", "outcome"),
            ("failure", "failure"),
            ("timeline", "timeline"),
            ("rounds", "rounds"),
            ("devices", "device state"),
            ("versions", "QEMU"),
            ("capture", "capture"),
        )
        if a != "failure" or summary.get("failure") is not None
    )
    return (
        f"<header><h1>Migration session {m.session_id}"
        f' <span class="badge" style="background:{colour}">{_esc(outcome)}</span></h1>'
        f'<p class="sub">{_esc(directory.resolve().name)} · started {_esc(_time(m.started))}'
        f" · {_esc(summary.get('machine_type') or 'machine type unknown')}</p>"
        f'<p class="verdict {verdict_cls}">{verdict}</p><nav>{nav}</nav></header>'
    )


def convergence_verdict(m: Migration) -> tuple[str, str]:
    """One sentence on convergence (escaped HTML) and its CSS class: ``bad``, ``warn``,
    ``good`` or ``none``, after the model's judgment (docs/tap.md, "Convergence")."""
    c = m.convergence
    rounds = len(m.rounds)
    if m.converging() is False:
        assert c is not None
        return (
            f"Not converging: {_judgment_text(c)}. Stop-and-copy never came ({rounds} rounds).",
            "bad",
        )
    if m.converging() is True:
        if c is not None and _stalled(c):
            text = "Converged only at stop-and-copy, after it was judged not converging: "
            return text + f"{_judgment_text(c)}.", "warn"
        return (f"Converged: stop-and-copy after {rounds} round{'s' * (rounds != 1)}.", "good")
    if m.postcopy:
        return f"Switched to postcopy after {rounds} rounds.", "none"
    return f"No convergence judgment ({rounds} round{'s' * (rounds != 1)}).", "none"


def _stalled(c: Convergence) -> bool:
    pages = c.round_pages
    not_falling = bool(pages) and pages[-1] >= NOT_FALLING * pages[0]
    return not_falling and c.dirty_rate_bytes_s >= RATE_SLACK * c.transfer_rate_bytes_s


def _judgment_text(c: Convergence) -> str:
    pages = ", ".join(f"{p:,}" for p in c.round_pages)
    rounds = ", ".join(map(str, c.rounds))
    return _esc(
        f"rounds {rounds} sent {pages} pages; the guest dirtied "
        f"{c.dirty_rate_bytes_s / MiB:.1f} MiB/s while the wire carried "
        f"{c.transfer_rate_bytes_s / MiB:.1f} MiB/s; working set {_bytes(c.working_set_bytes)}, "
        f"expected downtime {c.expected_downtime_ms:,.0f} ms"
    )


def _outcome(a: Analysis, summary: dict[str, Any]) -> str:
    m = a.migration
    kinds = summary.get("channel_kinds") or []
    channels = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)) or "-"
    downtime = summary.get("wire_downtime_ms")
    ram = ", ".join(f"{b.idstr} {_bytes(b.used_length)}" for b in m.ram_blocks)
    pairs = [
        ("outcome", _esc(summary.get("outcome"))),
        (
            "duration",
            _esc(f"{summary['duration_s']:.3f} s")
            if summary.get("duration_s") is not None
            else "-",
        ),
        ("last phase", _esc(summary.get("last_phase"))),
        ("wire downtime", _esc(f"{downtime} ms") if downtime is not None else "-"),
        ("source → destination", _esc(_bytes(summary.get("bytes_src_to_dst")))),
        ("destination → source", _esc(_bytes(summary.get("bytes_dst_to_src")))),
        ("channels", _esc(channels)),
        ("rounds", _esc(summary.get("rounds"))),
        ("normal pages", _esc(_num(summary.get("ram_normal_pages")))),
        ("zero pages", _esc(_num(summary.get("ram_zero_pages")))),
        ("xbzrle pages", _esc(_num(summary.get("ram_xbzrle_pages")))),
        ("guest RAM", _esc(ram or "-")),
        ("source QEMU", _esc(summary.get("source_qemu"))),
        ("destination QEMU", _esc(summary.get("destination_qemu"))),
        (
            "device sections",
            _esc(f"{summary.get('device_sections')} ({summary.get('devices_decoded')} decoded)"),
        ),
        (
            "converging",
            _esc(
                {True: "yes", False: "no"}.get(
                    summary.get("converging"),  # type: ignore[arg-type]
                    "no telling",
                )
            ),
        ),
    ]
    if m.shut_value is not None:
        pairs.append(("destination SHUT", _esc(m.shut_value)))
    peers = [c for c in m.channels if c.kind is ChannelKind.MAIN]
    if peers and peers[0].source:
        pairs.append(("source", _esc(peers[0].source)))
        pairs.append(("destination", _esc(peers[0].destination)))
    last = summary.get("last_section")
    note = ""
    if isinstance(last, dict):
        note = (
            f"<p>Last section header on the main channel: <code>{_esc(last.get('idstr'))}"
            f"</code> ({_esc(last.get('kind'))}) at offset {_esc(last.get('offset'))}.</p>"
        )
    errors = []
    if a.error is not None:
        errors.append(f"main channel: {_esc(a.error)}")
    errors += [f"{_esc(c.file)}: {_esc(c.error)}" for c in a.channels if c.error is not None]
    if errors:
        note += '<p class="warn">Parsing stopped: ' + "; ".join(errors) + "</p>"
    return _section("outcome", "Outcome", _facts(pairs) + note)


def _failure(summary: dict[str, Any], directory: Path) -> str:
    failure = summary.get("failure")
    if not isinstance(failure, dict):
        return ""
    lo, hi = failure.get("offset_min"), failure.get("offset_max")
    how = "reset the connection (bytes unread)" if failure.get("reset") else "closed"
    shut = failure.get("shut")
    text = (
        f'<p class="bad">The destination failed. It can have been reading stream offsets '
        f"<b>{_esc(_num(lo))} to {_esc(_num(hi))}</b> of the main channel "
        f"({_esc(_bytes((hi or 0) - (lo or 0)))}); its kernel acknowledged "
        f"{_esc(_num(failure.get('acked')))} bytes and it {_esc(how)}"
        f"{_esc(f'; SHUT {shut}') if shut is not None else ''}. The destination QEMU's own log "
        f"names the field; for the exact record: <code>migtap replay {_esc(directory)} --qemu -- "
        f"&lt;the destination's QEMU command line&gt;</code></p>"
    )
    sections = failure.get("sections") or []
    rows = [
        [
            _esc(s.get("idstr")),
            _esc(s.get("instance_id")),
            _esc(s.get("kind")),
            _esc(_num(s.get("offset"))),
        ]
        for s in sections
        if isinstance(s, dict)
    ]
    before = failure.get("sections_before")
    if before is not None:
        text += f"<p>The range starts before the sections kept (first kept at {_esc(before)}).</p>"
    table = _table(["section", "instance", "kind", "offset"], rows) if rows else ""
    body = text + f"<p>{len(rows)} section header(s) in the range:</p>" + table
    return _section("failure", "Failure", body)


def _timeline(timeline: Timeline | None, m: Migration) -> str:
    if timeline is None or not timeline.series:
        body = "<p>No index (events.jsonl) in the capture: no timeline.</p>"
    else:
        legend = "".join(
            f'<span class="band" style="background:{c}"></span>{_esc(n)}'
            for n, c in (
                ("setup", _PHASE_COLOURS["setup"]),
                ("rounds (alternating)", _PHASE_COLOURS["round-alt"]),
                ("stop-and-copy", _PHASE_COLOURS["stop-and-copy"]),
                ("postcopy", _PHASE_COLOURS["postcopy"]),
            )
        )
        body = (
            f"<figure>{timeline_chart(timeline, m)}<figcaption>Bytes per second per channel and "
            f"direction ({timeline.width_s * 1000:,.0f} ms buckets, from the index's times and "
            f"offsets). Phases as bands: {legend}; dashed lines: round starts.</figcaption>"
            "</figure>"
        )
    return _section("timeline", "Timeline", body)


def _rounds(m: Migration) -> str:
    if not m.rounds:
        return _section("rounds", "Rounds", "<p>No RAM rounds in the capture.</p>")
    verdict, cls = convergence_verdict(m)
    stalled = stalled_rounds(m)
    rows = []
    before: Round | None = None
    for r in m.rounds:
        rate = dirty_rate(r, m)
        change = "-"
        if before is not None and before.pages:
            change = f"{(r.pages - before.pages) / before.pages * 100:+.0f} %"
        flag = "not falling" if r.number in stalled else ""
        rows.append(
            [
                _esc(r.number),
                _esc(f"{r.started - m.started:.3f}"),
                _esc(f"{r.duration_s(m.now):.3f}") + ("" if r.finished else " (open)"),
                _esc(_num(r.normal)),
                _esc(_num(r.zero)),
                _esc(_num(r.xbzrle)),
                _esc(_num(r.pages)),
                _esc("-" if rate is None else f"{rate / MiB:.1f}"),
                _esc(change),
                f'<span class="bad">{flag}</span>' if flag else "",
            ]
        )
        before = r
    table = _table(
        [
            "round",
            "start (s)",
            "duration (s)",
            "normal",
            "zero",
            "xbzrle",
            "pages",
            "dirty rate (MiB/s)",
            "vs. round before",
            "",
        ],
        rows,
        "num",
    )
    body = (
        f'<p class="verdict {cls}">{verdict}</p>'
        f"<figure>{rounds_chart(m)}<figcaption>Pages per round (bars, by kind; hatched red: a "
        f"round with at least {NOT_FALLING:.0%} of the pages of the round before) and the dirty "
        f"rate (pages of a round over its duration).</figcaption></figure>{table}"
    )
    return _section("rounds", "Rounds", body)


def _value_html(value: object, depth: int = 0) -> str:  # noqa: PLR0911 - one return per type
    if isinstance(value, dict):
        if not value:
            return "{}"
        rows = "".join(
            f"<tr><th>{_esc(k)}</th><td>{_value_html(v, depth + 1)}</td></tr>"
            for k, v in value.items()
        )
        return f'<table class="fields">{rows}</table>'
    if isinstance(value, list):
        if not value:
            return "[]"
        if all(isinstance(v, int | bool) or v is None for v in value):
            shown = ", ".join(_scalar(v) for v in value[:LIST_ITEMS_SHOWN])
            more = (
                f", … {len(value) - LIST_ITEMS_SHOWN} more" if len(value) > LIST_ITEMS_SHOWN else ""
            )
            return f"<code>[{shown}{_esc(more)}]</code>"
        items = "".join(
            f"<tr><th>[{n}]</th><td>{_value_html(v, depth + 1)}</td></tr>"
            for n, v in enumerate(value[:LIST_ITEMS_SHOWN])
        )
        if len(value) > LIST_ITEMS_SHOWN:
            items += f"<tr><th>…</th><td>{len(value) - LIST_ITEMS_SHOWN} more</td></tr>"
        return f'<table class="fields">{items}</table>'
    if isinstance(value, bytes):
        shown = value[:BYTES_SHOWN].hex(" ")
        more = f" … ({len(value):,} bytes)" if len(value) > BYTES_SHOWN else ""
        return f"<code>{_esc(shown)}{_esc(more)}</code>"
    if isinstance(value, str):
        return f"<code>{_esc(value)}</code>"
    return f"<code>{_scalar(value)}</code>"


def _scalar(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return _esc(value)
    if isinstance(value, int):
        return _esc(f"{value:#x}" if value > 9 else str(value))
    return _esc(value)


def _device_status(d: DeviceResult) -> tuple[str, str]:
    if d.decoded is not None:
        return "decoded", "good"
    if d.error is not None:
        return f"not decoded: {d.error}", "bad"
    if d.vmdesc is None:
        return "not decoded: no vmdesc", "none"
    if not d.in_vmdesc:
        return "not in the vmdesc", "warn"
    return "not decoded", "warn"


def _devices(m: Migration) -> str:
    if not m.devices:
        return _section(
            "devices",
            "Device state",
            f"<p>No device sections decoded ({m.device_sections} seen).</p>",
        )
    rows = []
    for d in sorted(m.devices, key=lambda d: d.offset):
        status, cls = _device_status(d)
        head = (
            f"<summary><span>{_esc(d.idstr)}</span><span>{_esc(d.instance_id)}</span>"
            f"<span>{_esc(d.version_id)}</span><span>{_esc(_num(d.size))}</span>"
            f"<span>{_esc(f'{d.offset:#x}')}</span>"
            f'<span class="{cls}">{_esc(status)}</span></summary>'
        )
        section = d.decoded
        inner = f"<p>{_esc(status)}</p>" if section is None else _value_html(section.fields)
        rows.append(f'<details class="device">{head}<div class="inner">{inner}</div></details>')
    decoded = sum(1 for d in m.devices if d.decoded is not None)
    head = (
        '<div class="device-head"><span>section (idstr)</span><span>instance</span>'
        "<span>version</span><span>size (bytes)</span><span>offset</span><span>decoded</span>"
        "</div>"
    )
    dropped = f" {m.devices_dropped} were not kept (over the cap)." if m.devices_dropped else ""
    body = (
        f"<p>{len(m.devices)} device sections, {decoded} decoded with the "
        f"{'stream' if any(d.vmdesc == 'stream' for d in m.devices) else 'given'} vmdesc.{dropped}"
        " Click a row for its fields.</p>" + head + "".join(rows)
    )
    return _section("devices", "Device state", body)


def _estimate_html(side: str, est: Estimate) -> str:
    rows = [
        [
            _esc(e.sign),
            _esc(_num(e.offset)),
            _esc(f"{e.min[0]}.{e.min[1]}" if e.min else "-"),
            _esc(f"{e.max[0]}.{e.max[1]}" if e.max else "-"),
            _esc(e.why or ""),
        ]
        for e in est.evidence
    ]
    table = (
        _table(["sign", "offset", "at least", "at most", "why"], rows)
        if rows
        else ("<p>No version signs.</p>")
    )
    return f"<h3>{_esc(side)}: {_esc(est.text())}</h3>{table}"


def _versions(m: Migration) -> str:
    g = m.generation
    body = (
        f"<p>Machine type: <code>{_esc(g.machine_type or 'unknown')}</code>. The ranges come "
        "from what the stream shows (docs/compatibility.md).</p>"
        + _estimate_html("Source QEMU", g.source)
        + _estimate_html("Destination QEMU", g.destination)
    )
    return _section("versions", "QEMU versions", body)


def _completeness(session: dict[str, Any] | None) -> str:
    if session is None:
        return _section(
            "capture",
            "Capture",
            '<p class="warn">No session.json: timings, outcome and completeness are unknown.</p>',
        )
    complete = session.get("complete")
    cls = "good" if complete is True else "bad"
    word = "complete" if complete is True else "incomplete"
    pairs = [
        ("capture", f'<span class="{cls}">{_esc(word)}</span>'),
        ("capture RAM", _esc(session.get("capture_ram"))),
        ("closed", _esc(session.get("closed"))),
        ("started", _esc(session.get("started"))),
        ("ended", _esc(session.get("ended"))),
        ("directory", _esc(session.get("directory"))),
    ]
    if session.get("error"):
        pairs.append(("error", f'<span class="bad">{_esc(session.get("error"))}</span>'))
    rows = []
    for ch in session.get("channels", []):
        for dir_ in (Direction.SRC_TO_DST.value, Direction.DST_TO_SRC.value):
            f = (ch.get("files") or {}).get(dir_)
            if not isinstance(f, dict):
                continue
            notes = [
                f"{k.replace('_', ' ')} {f[k]}"
                for k in ("bytes_removed", "left_out_from", "left_out_reason", "late_cut_bytes")
                if f.get(k) is not None
            ]
            rows.append(
                [
                    _esc(ch.get("index")),
                    _esc(ch.get("kind")),
                    _esc(dir_),
                    f"<code>{_esc(f.get('file') or '-')}</code>",
                    _esc(f.get("content")),
                    _esc(_num(f.get("bytes_seen"))),
                    _esc(_num(f.get("bytes_written"))),
                    _esc("; ".join(notes)),
                ]
            )
    table = _table(
        ["channel", "kind", "direction", "file", "content", "bytes seen", "bytes written", "notes"],
        rows,
        "num",
    )
    extra = session.get("extra_files") or []
    extra_p = f"<p>Also: {_esc(', '.join(map(str, extra)))}.</p>" if extra else ""
    return _section("capture", "Capture", _facts(pairs) + table + extra_p)


_CSS: Final = """
:root{--fg:#212121;--muted:#616161;--line:#e0e0e0;--bg:#fff;--head:#f5f5f5}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 color:var(--fg);background:var(--bg);margin:0 auto;max-width:1200px;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:0 0 8px;border-bottom:1px solid
 var(--line);padding-bottom:4px}h3{font-size:15px;margin:14px 0 6px}
.sub{color:var(--muted);margin:0 0 6px}
.badge{color:#fff;border-radius:4px;padding:2px 8px;font-size:15px;vertical-align:middle}
nav a{margin-right:14px;color:#1565c0;text-decoration:none}
section{margin:22px 0}
.verdict{padding:8px 12px;border-radius:4px;margin:8px 0;border-left:5px solid}
.verdict.bad{background:#ffebee;border-color:#c62828}.verdict.warn{background:#fff8e1;
 border-color:#ef6c00}.verdict.good{background:#e8f5e9;border-color:#2e7d32}
.verdict.none{background:#f5f5f5;border-color:#9e9e9e}
span.bad,p.bad{color:#c62828}span.warn,p.warn{color:#ef6c00}span.good{color:#2e7d32}
span.none{color:var(--muted)}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:6px 18px;
 margin:0}
.facts div{border-bottom:1px solid var(--line);padding:2px 0}.facts dt{color:var(--muted);
 font-size:12px}.facts dd{margin:0;font-weight:600}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
thead th{background:var(--head)}
table.num td{text-align:right}table.num td:nth-child(4){text-align:left}
figure{margin:8px 0}figcaption{color:var(--muted);font-size:12px}
svg{max-width:100%;height:auto;display:block}
.band{display:inline-block;width:12px;height:10px;border:1px solid #bdbdbd;margin:0 3px 0 6px}
.device-head,details.device>summary{display:grid;
 grid-template-columns:minmax(220px,2.6fr) 0.7fr 0.7fr 1fr 1fr 2fr;gap:8px;padding:3px 8px}
.device-head{background:var(--head);font-weight:600;font-size:13px}
details.device{border-bottom:1px solid var(--line);font-size:13px}
details.device>summary{cursor:pointer}
details.device[open]>summary{background:#e3f2fd}
details.device .inner{padding:4px 8px 10px 24px;overflow-x:auto}
table.fields{margin:2px 0}table.fields th{font-weight:normal;color:var(--muted);
 background:none;white-space:nowrap}
code{font:12px ui-monospace,"DejaVu Sans Mono",monospace;word-break:break-all}
footer{color:var(--muted);font-size:12px;margin-top:32px}
"""


def _page(directory: Path, body: str) -> str:
    title = f"migtap report: {directory.resolve().name}"
    made = datetime.now(UTC).isoformat(timespec="seconds")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n"
        f"<body>\n{body}\n"
        f"<footer>Written by migtap {_esc(__version__)} report at {_esc(made)} from "
        f"<code>{_esc(directory.resolve())}</code>. Self-contained: it fetches nothing."
        "</footer>\n</body></html>\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
