"""The live view (``--progress``): rendering from snapshots, and ``migtap listen`` as a user sees
it, in a real terminal (tmux: the screen read back with ``capture-pane``) and on a pipe (the JSON
lines exactly as before)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import structlog
from rich.console import Console

from migtap.log import configure_logging, progress_mode
from migtap.model import Migration
from migtap.observers.live_view import LiveView, LiveViewObserver, SessionSnapshot, render
from migtap.tap import SessionTap
from migtap.vocabulary import ChannelInfo, ChannelKind, Direction
from migtap.wire.constants import SectionType
from migtap.wire.events import RamBlock, RamBlockList, RamPages, StreamHeader
from tests.streams import PAGE, configuration, eof, header, page, ram_section, ram_start, zero

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
PART, END = SectionType.QEMU_VM_SECTION_PART, SectionType.QEMU_VM_SECTION_END
RAM_ID = 2


# -- the view, from snapshots ------------------------------------------------------------------
def snapshot(**kw: object) -> SessionSnapshot:
    base: dict[str, object] = {
        "session_id": 1,
        "phase": "bulk round",
        "round": 1,
        "covered_pct": 42.0,
        "eta_s": 1.5,
        "rate_bytes_s": 8 * 1024 * 1024,
        "bytes_src_to_dst": 1 << 20,
        "normal": 100,
        "zero": 20,
        "xbzrle": 0,
        "channels": 1,
        "elapsed_s": 2.0,
        "taken_at": 50.0,
    }
    base.update(kw)
    return SessionSnapshot(**base)  # type: ignore[arg-type]


def text_of(renderable: object, width: int = 120) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


def test_a_row_per_session_with_phase_round_coverage_rate_eta_pages() -> None:
    rows = [
        snapshot(session_id=2, phase="round 3", round=3, covered_pct=None, eta_s=None),
        snapshot(),
    ]
    lines = text_of(render(rows, now=51.0)).splitlines()
    assert len(lines) == 2
    first, second = lines
    assert re.match(
        r"s1 +bulk round +round 1 .*42\.0% +eta 1\.5s +8\.0 MiB/s +pages 100/20/0", first
    )
    assert first.rstrip().endswith("3.0s")  # elapsed moves on between snapshots
    assert re.match(r"s2 +round 3 +round 3 +8\.0 MiB/s +pages 100/20/0", second)
    assert "%" not in second
    assert first.index("MiB/s") == second.index("MiB/s")  # columns line up
    (narrow,) = text_of(render(rows[1:], now=51.0), width=50).splitlines()  # cropped, not wrapped
    assert narrow.startswith("s1  bulk round")


def test_no_session_no_lines() -> None:
    assert text_of(render([], now=0.0)) == ""


def test_observer_hands_the_view_snapshots_and_a_summary_line() -> None:
    out = io.StringIO()
    view = LiveView(Console(file=out, width=120, color_system=None))
    m = Migration(7, started=100.0)
    tap = SessionTap(m, [LiveViewObserver(m, view)], clock=lambda: 104.0)
    main = tap.add_channel(ChannelInfo(0, 1, ChannelKind.MAIN, "a:1", "b:2", 100.0))
    assert view.sessions == (7,)
    header_, ram = StreamHeader(0, 0x5145564D, 3), RamBlock("pc.ram", 64 * PAGE)
    pages = RamPages(0, 0, RAM_ID, "pc.ram", 1, normal=16)
    tap.deliver(
        main,
        Direction.SRC_TO_DST,
        [header_, RamBlockList(10, RAM_ID, 64 * PAGE, (ram,)), pages],
        101.0,
    )
    tap.tick(102.0)
    snap = view._rows[7]
    assert (snap.phase, snap.round, snap.covered_pct, snap.normal) == ("bulk round", 1, 25.0, 16)
    assert snap.eta_s is not None
    assert "s7" in text_of(view._render())
    tap.close()
    assert view.sessions == ()
    assert re.search(r"s7 \w+ in [\d.]+s: [\d.]+ MiB, 1 rounds, pages 16/0/0", out.getvalue())


def test_progress_mode() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    pipe, tty = io.StringIO(), Tty()
    assert progress_mode("auto", "auto", pipe) == ("log", None)
    assert progress_mode("bar", "auto", pipe) == ("log", "stderr is not a terminal")
    assert progress_mode("log", "auto", tty) == ("log", None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TERM", "xterm-256color")
        assert progress_mode("auto", "auto", tty) == ("bar", None)
        assert progress_mode("auto", "json", tty) == ("log", None)  # asked for JSON
        assert progress_mode("bar", "json", tty) == ("bar", None)
        mp.setenv("TERM", "dumb")
        assert progress_mode("bar", "auto", tty)[0] == "log"


def test_with_a_console_progress_lines_are_dropped_and_the_rest_printed() -> None:
    out = io.StringIO()
    configure_logging("console", "info", console=Console(file=out, width=300, color_system=None))
    log = structlog.get_logger()
    log.info("migration_progress", phase="bulk round")
    log.info("migration_phase", phase="bulk round")
    text = out.getvalue()
    assert "migration_phase" in text
    assert "migration_progress" not in text


# -- the real thing: migtap listen, a fake destination, a slow fake source -----------------------
def slow_stream(pages: int = 512, sections: int = 32) -> list[bytes]:
    """A precopy stream in pieces: the bulk round over ``sections`` sections (every fourth page
    a zero page), a short second round, stop-and-copy, EOF."""
    per = pages // sections
    pieces = [header() + configuration() + ram_start(RAM_ID, [("pc.ram", pages * PAGE)])]
    for i in range(sections):
        recs = [
            zero(n * PAGE, "pc.ram") if n % 4 == 0 else page(n * PAGE, "pc.ram")
            for n in range(i * per, (i + 1) * per)
        ]
        pieces.append(ram_section(PART, RAM_ID, recs))
    pieces.append(ram_section(PART, RAM_ID, [page(n * PAGE, "pc.ram") for n in range(8)]))
    pieces.append(ram_section(END, RAM_ID, [page(8 * PAGE, "pc.ram")]) + eof())
    return pieces


@contextlib.contextmanager
def destination() -> Iterator[tuple[int, bytearray]]:
    """A plain precopy destination on 127.0.0.1: reads to EOF, then closes."""
    received = bytearray()
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(30)

        def serve() -> None:
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                with conn:
                    while data := conn.recv(1 << 16):
                        received.extend(data)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield server.getsockname()[1], received
    thread.join(timeout=5)


def send_slowly(port: int, pieces: list[bytes], pause_s: float) -> threading.Thread:
    def run() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as src:
            for piece in pieces:
                src.sendall(piece)
                time.sleep(pause_s)
            src.shutdown(socket.SHUT_WR)
            while src.recv(1 << 16):  # until migtap closes after the destination did
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def listen_argv(forward_port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "migtap",
        "listen",
        "127.0.0.1:0",
        "--forward",
        f"127.0.0.1:{forward_port}",
        "--progress-interval-s",
        "0.25",
        "--grace-period-s",
        "2",
        *extra,
    ]


class Tmux:
    """A private tmux server (its own socket): one window of a fixed size, read back with
    ``capture-pane``, the screen as a person sees it (text, no colour codes)."""

    def __init__(self, directory: Path, width: int = 140, height: int = 30) -> None:
        self.socket = directory / "tmux.sock"
        self.width, self.height = width, height

    def __call__(self, *args: str) -> str:
        # The server's environment is the panes': no COLUMNS/LINES (pytest's or a CI's) to
        # override the terminal's own size, which rich would take.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}
        done = subprocess.run(
            ["tmux", "-S", str(self.socket), *args],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout

    def start(self, argv: list[str]) -> None:
        # The shell keeps the pane after migtap exits, with its exit code on screen.
        command = f"{shlex.join(argv)}; echo MIGTAP_EXIT=$?; sleep 60"
        self("-f", "/dev/null", "new-session", "-d", "-c", str(ROOT),
             "-x", str(self.width), "-y", str(self.height), command)  # fmt: skip

    def screen(self) -> list[str]:
        """The visible screen, wrapped lines joined."""
        return self("capture-pane", "-p", "-J").splitlines()

    def history(self) -> str:
        """Everything printed so far, the scrolled-off part included."""
        return self("capture-pane", "-p", "-J", "-S", "-")

    def wait_for(self, pattern: str, timeout_s: float = 20) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(pattern, self.history())
            if found:
                return found
            time.sleep(0.05)
        pytest.fail(f"{pattern!r} not on screen after {timeout_s}s:\n{self.history()}")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self("kill-server")


LIVE_ROW = re.compile(
    r"^s1 +(?P<phase>setup|bulk round|round \d+|stop-and-copy)\b.*pages \d+/\d+/\d+"
)


def test_listen_in_a_terminal_shows_a_live_line_under_the_scrolling_log(tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed (apt-get install tmux; .ci/run installs it)")
    tmux = Tmux(tmp_path)
    with destination() as (dst_port, received):
        tmux.start(listen_argv(dst_port))
        try:
            port = int(tmux.wait_for(r"listen=\['127\.0\.0\.1:(\d+)'\]")[1])
            pieces = slow_stream()
            source = send_slowly(port, pieces, pause_s=0.12)
            seen: list[tuple[str, list[str]]] = []  # (live row, the lines above it)
            while source.is_alive():
                lines = [line.rstrip() for line in tmux.screen()]
                while lines and not lines[-1]:
                    lines.pop()
                if lines and LIVE_ROW.match(lines[-1]):
                    seen.append((lines[-1], lines[:-1]))
                time.sleep(0.1)
            source.join(timeout=10)
            tmux.wait_for(r"s1 completed in [\d.]+s: [\d.]+ MiB, 2 rounds")
            deadline = time.monotonic() + 5
            final_screen = tmux.screen()
            while any(LIVE_ROW.match(line) for line in final_screen):
                assert time.monotonic() < deadline, "\n".join(final_screen)
                time.sleep(0.05)
                final_screen = tmux.screen()
            tmux("send-keys", "C-c")
            tmux.wait_for(r"MIGTAP_EXIT=0")
            history = tmux.history()
        finally:
            tmux.stop()
    assert bytes(received) == b"".join(pieces)

    # The live line sat at the bottom with the phase, and updated in place.
    bulk = [row for row, _ in seen if "bulk round" in row]
    assert len({row for row, _ in seen}) >= 3, seen
    percents = [float(m[1]) for row in bulk if (m := re.search(r"([\d.]+)%", row))]
    assert len(set(percents)) >= 2, bulk
    assert percents == sorted(percents)
    assert all(history.count(row) <= 1 for row, _ in seen)  # redrawn, never scrolled
    # Log lines scroll above it.
    assert any(any("migration_phase" in line for line in above) for _, above in seen)
    # In bar mode the bar replaces the migration_progress lines; every other line is printed.
    assert "migration_progress" not in history
    for event in ("listening", "session_started", "migration_phase", "ram_round_finished",
                  "migration_summary", "session_ended", "stopped"):  # fmt: skip
        assert event in history, event
    assert "Traceback" not in history
    # The session's line went once it ended; its summary line stays.
    assert any(line.startswith("s1 completed") for line in final_screen)


@pytest.mark.parametrize("progress", [None, "auto", "log", "bar"])
def test_on_a_pipe_the_log_is_the_json_lines_as_before(progress: str | None) -> None:
    extra = ["--progress", progress] if progress else []
    with destination() as (dst_port, received):
        proc = subprocess.Popen(
            listen_argv(dst_port, *extra),
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "xterm-256color"},
            cwd=ROOT,
        )
        try:
            assert proc.stderr is not None
            lines: list[bytes] = []
            while True:
                line = proc.stderr.readline()
                assert line, b"".join(lines)
                lines.append(line)
                if b'"listening"' in line:
                    break
            port = int(json.loads(line)["listen"][0].rsplit(":", 1)[1])
            pieces = slow_stream(pages=256, sections=16)
            send_slowly(port, pieces, pause_s=0.08).join(timeout=20)
            while b'"session_ended"' not in line:
                line = proc.stderr.readline()
                assert line, b"".join(lines)
                lines.append(line)
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=15)[1], None
            lines += rest.splitlines(keepends=True)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0
    assert bytes(received) == b"".join(pieces)
    raw = b"".join(lines)
    assert b"\x1b" not in raw  # no ANSI codes
    text = raw.decode()
    records = [json.loads(line) for line in text.splitlines()]
    # Exactly structlog's JSONRenderer output, one object a line, as before.
    assert [json.dumps(r) for r in records] == text.splitlines()
    events = [r["event"] for r in records]
    if progress == "bar":
        assert events[0] == "live_view_unavailable"
        assert records[0]["reason"] == "stderr is not a terminal"
        assert records[0]["progress"] == "log"
        events = events[1:]
    else:
        assert "live_view_unavailable" not in events
    assert events[0] == "listening"
    assert events[-1] == "stopped"
    progress_lines = [r for r in records if r["event"] == "migration_progress"]
    assert progress_lines
    assert any("bulk_covered_pct" in r for r in progress_lines)
    assert {"phase", "elapsed_s", "rate_mib_s", "ram_normal_pages", "channels"} <= set(
        progress_lines[0]
    )
    (summary,) = [r for r in records if r["event"] == "migration_summary"]
    assert summary["outcome"] == "completed"
    assert summary["rounds"] == 2
