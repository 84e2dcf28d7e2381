"""Configuration: TOML file (configs/*.toml) and command-line options become one frozen Config."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from migtap.errors import ConfigError
from migtap.log import LEVELS, PROGRESS_MODES


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port as the user typed them; host None means all interfaces."""

    host: str | None
    port: int

    def __str__(self) -> str:
        if self.host is None:
            return f"*:{self.port}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str, *, key: str, file: str | None = None) -> Address:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces)."""
    text = text.strip()
    host: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ConfigError(f"{text!r} is not [IPV6]:PORT", key=key, file=file)
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigError(f"{host!r} is not an IPv6 address", key=key, file=file) from exc
    else:
        host_text, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{text!r} has no port: use HOST:PORT or :PORT", key=key, file=file)
        if ":" in host_text:
            raise ConfigError(
                f"IPv6 addresses need brackets: [{host_text}]:PORT", key=key, file=file
            )
        host = host_text or None
    try:
        port = int(port_text)
    except ValueError as exc:
        raise ConfigError(f"port {port_text!r} is not a number", key=key, file=file) from exc
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range 0-65535", key=key, file=file)
    return Address(host, port)


@dataclass(frozen=True, slots=True)
class Config:
    """Every option of ``migtap listen``; TOML keys have the same names."""

    listen: Address
    forward: Address
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
    return config


def _check(key: str, value: object, file: str | None) -> object:
    if key in ("listen", "forward", "metrics_listen"):
        if not isinstance(value, str):
            raise ConfigError("must be a string HOST:PORT", key=key, file=file)
        return parse_address(value, key=key, file=file)
    if key in PATHS:
        return _check_path(key, value, file)
    if key == "allow":
        return _check_networks(key, value, file)
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
