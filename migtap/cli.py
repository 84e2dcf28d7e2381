"""Command line: ``migtap listen`` (the relay) and ``migtap analyze`` (offline captures)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from migtap import __version__, analyze, check, report
from migtap.config import CHOICES, Config, build_config, load_toml
from migtap.errors import ConfigError, MigtapError
from migtap.log import configure_logging, progress_mode
from migtap.relay import replay as replay_cmd

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from migtap.observers.live_view import LiveView
    from migtap.tap import TapSettings

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting, so every usage error looks alike."""

    def error(self, message: str) -> Any:  # noqa: ANN401 - argparse's signature is NoReturn-like
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="migtap",
        description="A live-migration proxy and tap for QEMU.",
    )
    parser.add_argument("--version", action="version", version=f"migtap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    listen = sub.add_parser(
        "listen",
        help="relay migrations from a source QEMU to a destination QEMU",
        description=(
            "Accept migration connections on LISTEN and relay each to --forward, both ways. "
            "Options may also come from a TOML file (--config); the command line wins."
        ),
    )
    listen.add_argument(
        "listen",
        nargs="?",
        help="HOST:PORT, [IPV6]:PORT, :PORT (all interfaces), HOST:FIRST-LAST (one listener "
        "per port) or unix:PATH",
    )
    listen.add_argument(
        "--forward",
        "-f",
        help="the destination QEMU's -incoming address: HOST:PORT, unix:PATH, or HOST alone "
        "(the port the connection came in on)",
    )
    listen.add_argument(
        "--listen-mode",
        metavar="OCTAL",
        default=None,
        help="file mode of a unix:PATH listener (default 0600: owner only)",
    )
    listen.add_argument("--config", "-c", type=Path, help="TOML file with the same option names")
    listen.add_argument(
        "--loop", choices=CHOICES["loop"], default=None, help="event loop (default: asyncio)"
    )
    listen.add_argument("--log-format", choices=CHOICES["log_format"], default=None)
    listen.add_argument("--log-level", choices=CHOICES["log_level"], default=None)
    listen.add_argument(
        "--grace-period-s", type=float, default=None, help="on SIGINT/SIGTERM (default 30)"
    )
    listen.add_argument(
        "--connect-timeout-s", type=float, default=None, help="upstream connect (default 10)"
    )
    listen.add_argument(
        "--write-buffer-high",
        type=int,
        default=None,
        help="bytes queued per socket before pausing the other side (default 4 MiB)",
    )
    listen.add_argument(
        "--write-buffer-low",
        type=int,
        default=None,
        help="bytes at which reading resumes (default 1 MiB)",
    )
    listen.add_argument(
        "--allow",
        action="append",
        metavar="CIDR",
        default=None,
        help="accept sources only from this network (repeatable; default: any)",
    )
    listen.add_argument(
        "--socket-buffer",
        type=int,
        default=None,
        help="SO_SNDBUF/SO_RCVBUF bytes per socket (default 0: kernel autotuning)",
    )
    listen.add_argument(
        "--read-size",
        type=int,
        default=None,
        help="asyncio loop: bytes per read (default 1 MiB; 0: asyncio's 256 KiB)",
    )
    tap = listen.add_argument_group("tap (parsing, capture, progress)")
    tap.add_argument(
        "--capture",
        metavar="DIR",
        default=None,
        help="write one capture directory per migration under DIR",
    )
    tap.add_argument(
        "--capture-ram",
        choices=CHOICES["capture_ram"],
        default=None,
        help="full (default): every byte; none: page contents left out, files tiny",
    )
    tap.add_argument(
        "--vmdesc",
        metavar="FILE",
        default=None,
        help="decode device state with this vmdesc JSON when the stream has none (postcopy)",
    )
    tap.add_argument(
        "--page-size",
        type=int,
        default=None,
        help="target page size until the stream says (default 4096)",
    )
    tap.add_argument(
        "--progress-interval-s",
        type=float,
        default=None,
        help="seconds between progress lines (default 1)",
    )
    tap.add_argument(
        "--progress",
        choices=CHOICES["progress"],
        default=None,
        help="bar: a live line per migration at the bottom of the terminal; log: "
        "migration_progress lines; auto (default): bar when stderr is a terminal",
    )
    tap.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    tap.add_argument(
        "--no-tap", action="store_true", help="relay only: no parsing, no capture, no progress"
    )
    listen.set_defaults(run=_run_listen)

    a = sub.add_parser(
        "analyze",
        help="parse a captured migration stream",
        description="Parse a capture (raw main-channel stream) and print what it holds.",
    )
    analyze.add_arguments(a)
    a.set_defaults(run=analyze.run)

    r = sub.add_parser(
        "replay",
        help="replay a capture into a destination and name the record it failed on",
        description="Feed a capture to a listening destination (--to) or to a QEMU started "
        "here (--qemu -- QEMU_ARGV...), record by record, and report where it stopped.",
    )
    replay_cmd.add_arguments(r)
    r.set_defaults(run=replay_cmd.run)

    c = sub.add_parser(
        "check",
        help="will a captured stream's device state load on a target QEMU?",
        description="Compare the stream's device sections (its vmdesc) with what the target "
        "QEMU accepts (its -dump-vmstate). Exit 1 if a section fails.",
    )
    check.add_arguments(c)
    c.set_defaults(run=check.run)

    p = sub.add_parser(
        "report",
        help="write one self-contained HTML page that shows a captured migration",
        description="Write an HTML report of a capture directory: timeline, rounds, device "
        "state, outcome, QEMU versions, completeness, failure. Needs matplotlib (migtap[report]).",
    )
    report.add_arguments(p)
    p.set_defaults(run=report.run)
    return parser


def listen_config(args: argparse.Namespace) -> Config:
    values: dict[str, Any] = {}
    file: str | None = None
    if args.config is not None:
        file = str(args.config)
        values.update(load_toml(args.config))
    for key in (
        "listen",
        "forward",
        "loop",
        "log_format",
        "log_level",
        "grace_period_s",
        "connect_timeout_s",
        "write_buffer_high",
        "write_buffer_low",
        "socket_buffer",
        "read_size",
        "allow",
        "capture",
        "capture_ram",
        "vmdesc",
        "page_size",
        "progress_interval_s",
        "progress",
        "metrics_listen",
        "listen_mode",
    ):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    config = build_config(values, file=file if args.config is not None else None)
    if config.metrics_listen is not None and args.no_tap:
        raise ConfigError("the metrics come from the tap: drop --no-tap", key="metrics_listen")
    return config


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop  # noqa: PLC0415 - only when asked for

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def _run_listen(args: argparse.Namespace) -> int:
    config = listen_config(args)
    mode, why_not = progress_mode(config.progress, config.log_format)
    if mode == "log" or args.no_tap:
        configure_logging(config.log_format, config.log_level)  # type: ignore[arg-type]
        if why_not is not None:
            structlog.get_logger("migtap").info(
                "live_view_unavailable", reason=why_not, progress="log"
            )
        with asyncio.Runner(loop_factory=_loop_factory(config.loop)) as runner:
            return runner.run(serve(config, tap=not args.no_tap))
    from migtap.observers.live_view import LiveView  # noqa: PLC0415 - rich, only on a terminal

    with LiveView() as view:
        fmt: Any = config.log_format  # checked against CHOICES: a LogFormat
        configure_logging(fmt, config.log_level, console=view.console)
        with asyncio.Runner(loop_factory=_loop_factory(config.loop)) as runner:
            return runner.run(serve(config, live_view=view))


def tap_settings(config: Config, live_view: LiveView | None = None) -> TapSettings:
    """The tap's settings from the config; reads --vmdesc now so a bad file fails at start."""
    from migtap.annotate.vmsd import VmDescription  # noqa: PLC0415
    from migtap.errors import StreamError  # noqa: PLC0415
    from migtap.tap import TapSettings  # noqa: PLC0415

    vmdesc = None
    if config.vmdesc is not None:
        try:
            vmdesc = VmDescription.from_json(config.vmdesc.read_bytes())
        except (OSError, StreamError) as exc:
            raise ConfigError(f"{config.vmdesc}: not a usable vmdesc: {exc}", key="vmdesc") from exc
    return TapSettings(
        page_size=config.page_size,
        capture_dir=config.capture,
        capture_ram="none" if config.capture_ram == "none" else "full",
        vmdesc=vmdesc,
        progress_interval_s=config.progress_interval_s,
        config={k: str(v) for k, v in asdict(config).items()},
        live_view=live_view,
    )


async def serve(config: Config, *, tap: bool = True, live_view: LiveView | None = None) -> int:
    from migtap.relay.server import Relay  # noqa: PLC0415 - keep `migtap --help` light

    log = structlog.get_logger("migtap")
    loop = asyncio.get_running_loop()
    settings = tap_settings(config, live_view) if tap else None
    relay = Relay(config, tap=settings)
    # Before listening: a SIGTERM right after the `listening` line must stop it cleanly too
    # (and remove a unix socket file).
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, relay.stop)
    try:
        async with relay:
            await relay.wait_stopped()
            log.info(
                "signal_received",
                action="stop accepting, drain sessions",
                grace_period_s=config.grace_period_s,
            )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        result: int = args.run(args)
    except ConfigError as exc:
        print(f"migtap: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MigtapError as exc:
        print(f"migtap: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    raise SystemExit(main())
