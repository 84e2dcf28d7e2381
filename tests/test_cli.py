"""The command line, as a user runs it: exit codes, messages, signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from migtap.cli import main

if TYPE_CHECKING:
    from pathlib import Path


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "listen" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["listen", "127.0.0.1:0"], "forward: is required"),
        (["listen", "127.0.0.1", "--forward", "h:1"], "listen: '127.0.0.1' has no port"),
        (["listen", ":1", "--forward", "h:1", "--loop", "trio"], "--loop"),
        (
            ["listen", ":1", "--forward", "h:1", "--config", "/nonexistent.toml"],
            "/nonexistent.toml",
        ),
        (["nosuch"], "invalid choice"),
        (["listen", ":1", "--forward", "h:1", "--allow", "10.0.0.0/33"], "allow: '10.0.0.0/33'"),
        (["listen", ":1", "--forward", "h:1", "--capture-ram", "some"], "--capture-ram"),
        (["listen", ":1", "--forward", "h:1", "--vmdesc", "/nonexistent.json"], "vmdesc: "),
    ],
)
def test_usage_errors_exit_2_with_one_clear_line(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("migtap: error: ")
    assert fragment in err
    assert err.count("\n") == 1


def test_listen_on_busy_port_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(
            ["listen", f"127.0.0.1:{port}", "--forward", "127.0.0.1:1", "--log-format", "json"]
        )
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("{")]  # the JSON logs aside
    assert lines == [
        f"migtap: error: listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sigterm_stops_cleanly_and_logs_json(tmp_path: Path, loop: str) -> None:
    config = tmp_path / "migtap.toml"
    config.write_text(f'listen = "127.0.0.1:0"\nforward = "127.0.0.1:9"\nloop = "{loop}"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "migtap", "listen", "--config", str(config), "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        first = json.loads(proc.stderr.readline())
        assert first["event"] == "listening"
        assert first["loop"] == loop
        host, port = first["listen"][0].rsplit(":", 1)
        with contextlib.suppress(ConnectionError):  # migtap resets it: nothing at port 9
            socket.create_connection((host, int(port)), timeout=5).close()
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    events = [json.loads(line)["event"] for line in rest.splitlines()]
    assert "upstream_connect_failed" in events  # port 9 (discard) is closed here
    assert events[-1] == "stopped"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--metrics-listen", "9464"], "metrics_listen: '9464' has no port"),
        (["--metrics-listen", "127.0.0.1:0", "--no-tap"], "metrics_listen: "),
    ],
)
def test_bad_metrics_listen_exits_2_with_one_clear_line(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["listen", "127.0.0.1:0", "--forward", "127.0.0.1:1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("migtap: error: ")
    assert fragment in err
    assert err.count("\n") == 1


def test_metrics_on_a_busy_port_exits_2_with_one_clear_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(
            [
                "listen",
                "127.0.0.1:0",
                "--forward",
                "127.0.0.1:1",
                "--log-format",
                "json",
                "--metrics-listen",
                f"127.0.0.1:{port}",
            ]
        )
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("{")]  # the JSON logs aside
    want = f"migtap: error: metrics_listen: cannot serve metrics on 127.0.0.1:{port}: "
    assert lines == [want + "Address already in use"]


def test_metrics_are_served_until_sigterm(tmp_path: Path) -> None:
    import urllib.request

    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "migtap", "listen", "127.0.0.1:0", "--forward", "127.0.0.1:9"),
            *("--log-format", "json", "--metrics-listen", "127.0.0.1:0"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        first = json.loads(proc.stderr.readline())
        assert first["event"] == "metrics_listening"
        with urllib.request.urlopen(first["url"], timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        assert "migtap_migrations_active 0.0" in text
        assert 'migtap_migrations_total{outcome="completed"} 0.0' in text
        assert "process_cpu_seconds_total" in text
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert json.loads(rest.splitlines()[-1])["event"] == "stopped"


@pytest.mark.parametrize(
    ("listen", "forward", "extra", "fragment"),
    [
        ("127.0.0.1:6-5", "127.0.0.2", [], "listen: port range '6-5' is reversed: FIRST > LAST"),
        ("127.0.0.1:5-", "127.0.0.2", [], "listen: port range '5-' is empty"),
        ("127.0.0.1:1000-3000", "127.0.0.2", [], "has 2001 ports; at most 1024"),
        ("unix:/tmp/x.sock", "127.0.0.2", [], "forward: '127.0.0.2' has no port"),
        ("unix:/tmp/x.sock", "h:1", ["--allow", "10.0.0.0/8"], "allow: filters TCP sources"),
        ("127.0.0.1:0", "h:1", ["--listen-mode", "0660"], "listen_mode: is the file mode"),
        ("unix:/tmp/x.sock", "h:1", ["--listen-mode", "rw"], "listen_mode: 'rw' is not an octal"),
    ],
)
def test_bad_listen_forms_exit_2_with_one_clear_line(
    listen: str, forward: str, extra: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["listen", listen, "--forward", forward, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("migtap: error: ")
    assert fragment in err
    assert err.count("\n") == 1


def test_a_busy_port_in_a_range_exits_2_with_one_clear_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        listen = f"127.0.0.1:{port - 1}-{port + 1}"
        code = main(["listen", listen, "--forward", "127.0.0.2", "--log-format", "json"])
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("{")]
    want = f"migtap: error: listen: cannot listen on 127.0.0.1:{port} (of {listen}): "
    assert lines == [want + "Address already in use"]


def test_a_unix_socket_in_use_exits_2_with_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mt-") as d, socket.socket(socket.AF_UNIX) as live:
        path = f"{d}/busy.sock"
        live.bind(path)
        live.listen()
        code = main(["listen", f"unix:{path}", "--forward", "127.0.0.1:1", "--log-format", "json"])
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("{")]
    assert len(lines) == 1
    assert lines[0].startswith(f"migtap: error: listen: unix:{path} is in use: something listens")


def test_unix_listener_is_0600_and_removed_after_sigterm() -> None:
    import stat
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mt-") as d:
        path = f"{d}/migtap.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "migtap", "listen", f"unix:{path}", "--forward",
             "127.0.0.1:9", "--log-format", "json"],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            first = json.loads(proc.stderr.readline())
            assert first["event"] == "listening"
            assert first["listen"] == [f"unix:{path}"]
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0
        assert not os.access(path, os.F_OK)
