"""Configuration: TOML file (configs/*.toml) and command-line options become one frozen Config."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migtap.errors import ConfigError
from migtap.log import LEVELS, PROGRESS_MODES

if TYPE_CHECKING:
    from collections.abc import Callable

#: ``listen HOST:FIRST-LAST`` opens one socket per port: at most this many.
MAX_PORT_RANGE = 1024
#: ``sun_path`` holds 108 bytes with the terminating NUL.
MAX_UNIX_PATH = 107
#: ``--listen-mode`` when not given: owner only (the socket carries guest memory).
DEFAULT_LISTEN_MODE = 0o600


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP host and port as the user typed them; host None means all interfaces.

    ``port`` None (``--forward HOST``): the port the connection came in on. ``last_port``
    (``listen HOST:FIRST-LAST``): one listener on every port from ``port`` to ``last_port``.
    """

    host: str | None
    port: int | None
    last_port: int | None = None

    @property
    def ports(self) -> range:
        """The ports to listen on (one, or a range)."""
        first = self.port or 0
        return range(first, (self.last_port if self.last_port is not None else first) + 1)

    def __str__(self) -> str:
        if self.host is None:
            host = "*"
        elif ":" in self.host:
            host = f"[{self.host}]"
        else:
            host = self.host
        if self.port is None:
            return host
        if self.last_port is not None:
            return f"{host}:{self.port}-{self.last_port}"
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A unix socket path (``unix:PATH``)."""

    path: Path

    def __str__(self) -> str:
        return f"unix:{self.path}"


#: Where migtap listens or forwards to: TCP or a unix socket.
Endpoint = Address | UnixAddress


def _split_host(text: str, *, key: str, file: str | None) -> tuple[str | None, str | None]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT``, ``HOST``, ``[V6]`` -> host, port text (None if
    there is no port)."""
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :] if end >= 0 else ""
        if end < 0 or (rest and not rest.startswith(":")):
            raise ConfigError(f"{text!r} is not [IPV6]:PORT", key=key, file=file)
        host = text[1:end]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigError(f"{host!r} is not an IPv6 address", key=key, file=file) from exc
        return host, (rest[1:] if rest else None)
    host_text, sep, port_text = text.rpartition(":")
    if not sep:
        return text, None
    if ":" in host_text:
        raise ConfigError(f"IPv6 addresses need brackets: [{host_text}]:PORT", key=key, file=file)
    return host_text or None, port_text


def _port(text: str, *, key: str, file: str | None) -> int:
    try:
        port = int(text)
    except ValueError as exc:
        raise ConfigError(f"port {text!r} is not a number", key=key, file=file) from exc
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range 0-65535", key=key, file=file)
    return port


def parse_address(text: str, *, key: str, file: str | None = None) -> Address:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces)."""
    text = text.strip()
    host, port_text = _split_host(text, key=key, file=file)
    if port_text is None:
        raise ConfigError(f"{text!r} has no port: use HOST:PORT or :PORT", key=key, file=file)
    return Address(host, _port(port_text, key=key, file=file))


def parse_unix(text: str, *, key: str, file: str | None = None) -> UnixAddress:
    """``unix:PATH``: a unix socket (a path in the file system; abstract names are not taken)."""
    path = text.strip()[len("unix:") :]
    if not path:
        raise ConfigError(f"{text!r}: no socket path after unix:", key=key, file=file)
    if path.startswith("@") or "\0" in path:
        raise ConfigError(f"{text!r}: abstract sockets are not supported", key=key, file=file)
    expanded = Path(path).expanduser()
    if len(os.fsencode(expanded)) > MAX_UNIX_PATH:
        raise ConfigError(
            f"{text!r}: a unix socket path has at most {MAX_UNIX_PATH} bytes", key=key, file=file
        )
    return UnixAddress(expanded)


def parse_listen(text: str, *, key: str = "listen", file: str | None = None) -> Endpoint:
    """``HOST:PORT``, ``HOST:FIRST-LAST`` (one listener per port), ``[V6]:...``, ``:PORT``
    (all interfaces) or ``unix:PATH``."""
    text = text.strip()
    if text.startswith("unix:"):
        return parse_unix(text, key=key, file=file)
    host, port_text = _split_host(text, key=key, file=file)
    if port_text is None:
        raise ConfigError(
            f"{text!r} has no port: use HOST:PORT, HOST:FIRST-LAST, :PORT or unix:PATH",
            key=key,
            file=file,
        )
    first_text, dash, last_text = port_text.partition("-")
    if not dash:
        return Address(host, _port(port_text, key=key, file=file))
    if not first_text or not last_text:
        raise ConfigError(f"port range {port_text!r} is empty: use FIRST-LAST", key=key, file=file)
    first, last = _port(first_text, key=key, file=file), _port(last_text, key=key, file=file)
    if first == 0:
        raise ConfigError(
            f"port range {port_text!r} starts at 0: name real ports", key=key, file=file
        )
    if last < first:
        raise ConfigError(f"port range {port_text!r} is reversed: FIRST > LAST", key=key, file=file)
    if last - first + 1 > MAX_PORT_RANGE:
        raise ConfigError(
            f"port range {port_text!r} has {last - first + 1} ports; at most {MAX_PORT_RANGE}",
            key=key,
            file=file,
        )
    return Address(host, first, last)


def parse_forward(text: str, *, key: str = "forward", file: str | None = None) -> Endpoint:
    """``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH``, or ``HOST`` / ``[V6]`` without a port:
    the port the connection came in on."""
    text = text.strip()
    if text.startswith("unix:"):
        return parse_unix(text, key=key, file=file)
    host, port_text = _split_host(text, key=key, file=file)
    if port_text is None:
        if not host:
            raise ConfigError("no address: use HOST, HOST:PORT or unix:PATH", key=key, file=file)
        return Address(host, None)
    if "-" in port_text:
        raise ConfigError(
            f"{text!r}: a port range is for listen; use HOST (the port the connection came in"
            " on) or HOST:PORT",
            key=key,
            file=file,
        )
    return Address(host, _port(port_text, key=key, file=file))


@dataclass(frozen=True, slots=True)
class Config:
    """Every option of ``migtap listen``; TOML keys have the same names."""

    listen: Endpoint
    forward: Endpoint
    loop: str = "asyncio"
    log_format: str = "auto"
    log_level: str = "info"
    grace_period_s: float = 30.0
    connect_timeout_s: float = 10.0
    write_buffer_high: int = 4 * 1024 * 1024
    write_buffer_low: int = 1024 * 1024
    socket_buffer: int = 0
    read_size: int = 1024 * 1024
    capture: Path | None = None
    capture_ram: str = "full"
    vmdesc: Path | None = None
    page_size: int = 4096
    progress_interval_s: float = 1.0
    progress: str = "auto"  # auto, bar (the live view), log (migration_progress lines)
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    metrics_listen: Address | None = None  # serve Prometheus /metrics here (off by default)
    listen_mode: int | None = None  # a unix listener's file mode; None: DEFAULT_LISTEN_MODE


CHOICES: dict[str, tuple[str, ...]] = {
    "loop": ("asyncio", "uvloop"),
    "log_format": ("auto", "console", "json"),
    "log_level": LEVELS,
    "capture_ram": ("full", "none"),
    "progress": PROGRESS_MODES,
}
NUMBERS: dict[str, type] = {
    "grace_period_s": float,
    "connect_timeout_s": float,
    "write_buffer_high": int,
    "write_buffer_low": int,
    "socket_buffer": int,
    "read_size": int,
    "page_size": int,
    "progress_interval_s": float,
}
PATHS = ("capture", "vmdesc")
ZERO_OK = ("socket_buffer", "read_size")  # 0 = keep the system's default
KNOWN = {f.name for f in fields(Config)}


def load_toml(path: Path) -> dict[str, Any]:
    """Read a config file; errors name the file."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", file=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(path)) from exc
    unknown = sorted(set(data) - KNOWN)
    if unknown:
        raise ConfigError(
            f"unknown key(s): {', '.join(unknown)}; known: {', '.join(sorted(KNOWN))}",
            file=str(path),
        )
    return data


def build_config(values: dict[str, Any], *, file: str | None = None) -> Config:
    """Validate merged values (file first, then command line) into a Config."""
    for key in ("listen", "forward"):
        if values.get(key) is None:
            raise ConfigError("is required", key=key, file=file)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if value is not None:
            kwargs[key] = _check(key, value, file)
    unknown = sorted(set(kwargs) - KNOWN)
    if unknown:  # a caller's bug: load_toml and the command line know only these keys
        raise ConfigError(f"unknown option(s): {', '.join(unknown)}", file=file)
    config = Config(**kwargs)
    if config.write_buffer_low > config.write_buffer_high:
        raise ConfigError("must not exceed write_buffer_high", key="write_buffer_low", file=file)
    _check_combination(config, file)
    return config


def _check_combination(config: Config, file: str | None) -> None:
    """What a unix listener or a port-less forward cannot be combined with."""
    unix = isinstance(config.listen, UnixAddress)
    fwd = config.forward
    if unix and isinstance(fwd, Address) and fwd.port is None:
        raise ConfigError(
            f"{str(fwd)!r} has no port, and a unix socket listener gives none: use HOST:PORT",
            key="forward",
            file=file,
        )
    if unix and config.allow:
        raise ConfigError(
            "filters TCP sources by address; a unix socket has none: drop it (--listen-mode "
            "and the socket's directory decide who may connect)",
            key="allow",
            file=file,
        )
    if not unix and config.listen_mode is not None:
        raise ConfigError(
            "is the file mode of a unix socket listener (listen = unix:PATH); "
            f"{config.listen} is TCP",
            key="listen_mode",
            file=file,
        )


def _check(key: str, value: object, file: str | None) -> object:
    checker: Callable[[str, object, str | None], object] | None = {
        "listen": _check_address,
        "forward": _check_address,
        "metrics_listen": _check_address,
        "listen_mode": _check_mode,
        "allow": _check_networks,
        **dict.fromkeys(PATHS, _check_path),
    }.get(key)
    if checker is not None:
        return checker(key, value, file)
    if key in CHOICES:
        if value not in CHOICES[key]:
            raise ConfigError(
                f"{value!r} is not one of {', '.join(CHOICES[key])}", key=key, file=file
            )
        return value
    if key in NUMBERS:
        return _check_number(key, value, file)
    return value


def _check_number(key: str, value: object, file: str | None) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"must be a number, not {value!r}", key=key, file=file)
    if value < 0 or (value == 0 and key not in ZERO_OK):
        raise ConfigError(f"must be positive, not {value!r}", key=key, file=file)
    if key == "page_size" and (not isinstance(value, int) or value & (value - 1)):
        raise ConfigError(f"must be a power of two, not {value!r}", key=key, file=file)
    result: int | float = NUMBERS[key](value)
    return result


def _check_address(key: str, value: object, file: str | None) -> Endpoint:
    if not isinstance(value, str):
        raise ConfigError("must be a string HOST:PORT", key=key, file=file)
    if key == "listen":
        return parse_listen(value, key=key, file=file)
    if key == "forward":
        return parse_forward(value, key=key, file=file)
    return parse_address(value, key=key, file=file)


def _check_mode(key: str, value: object, file: str | None) -> int:
    """An octal file mode: ``"0660"`` (command line, TOML string) or ``0o660`` (TOML)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(f"must be an octal mode such as 0660, not {value!r}", key=key, file=file)
    if isinstance(value, str):
        try:
            mode = int(value.removeprefix("0o"), 8)
        except ValueError as exc:
            raise ConfigError(f"{value!r} is not an octal mode such as 0660", key=key,
                              file=file) from exc  # fmt: skip
    else:
        mode = value
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{value!r} is not a file mode (0000-0777)", key=key, file=file)
    if mode & 0o600 != 0o600:
        raise ConfigError(
            f"{mode:04o} leaves out the owner, who must read and write the socket",
            key=key,
            file=file,
        )
    return mode


def _check_path(key: str, value: object, file: str | None) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ConfigError("must be a path", key=key, file=file)
    path = Path(value).expanduser()
    if key == "vmdesc" and not path.is_file():
        raise ConfigError(f"{path} is not a readable file", key=key, file=file)
    return path


def _check_networks(
    key: str, value: object, file: str | None
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError("must be a CIDR or a list of CIDRs", key=key, file=file)
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError as exc:
            raise ConfigError(f"{item!r} is not a network (CIDR)", key=key, file=file) from exc
    return tuple(nets)
