from __future__ import annotations

from pathlib import Path

import pytest

from migtap.config import (
    Address,
    UnixAddress,
    build_config,
    load_toml,
    parse_address,
    parse_forward,
    parse_listen,
)
from migtap.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("0.0.0.0:4444", Address("0.0.0.0", 4444)),
        ("127.0.0.1:0", Address("127.0.0.1", 0)),
        ("[::1]:4444", Address("::1", 4444)),
        (":4444", Address(None, 4444)),
        ("dest-host:4444", Address("dest-host", 4444)),
    ],
)
def test_parse_address(text: str, want: Address) -> None:
    assert parse_address(text, key="listen") == want


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("4444", "no port"),
        ("host:http", "not a number"),
        ("host:70000", "out of range"),
        ("::1:4444", "need brackets"),
        ("[::1]4444", "[IPV6]:PORT"),
        ("[nothost]:1", "not an IPv6"),
    ],
)
def test_bad_address_names_the_option(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(text, key="forward")
    assert fragment in str(info.value)
    assert str(info.value).startswith("forward: ")


def test_example_config_has_every_option_and_loads() -> None:
    path = ROOT / "configs" / "migtap.example.toml"
    values = load_toml(path)
    config = build_config(values, file=str(path))
    assert config.forward == Address("127.0.0.1", 4445)
    from migtap.config import KNOWN

    text = path.read_text()
    commented = {k for k in KNOWN if f"# {k} = " in text}
    assert set(values) | commented == KNOWN  # every option is shown in the example


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('listen = ":1"\nforward = "h:2"\nforwrd = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    assert str(path) in str(info.value)
    assert "forwrd" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("loop", "trio", "not one of asyncio, uvloop"),
        ("grace_period_s", "soon", "must be a number"),
        ("write_buffer_high", -1, "must be positive"),
        ("log_level", "loud", "not one of"),
    ],
)
def test_bad_values(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"listen": ":1", "forward": "h:2", key: value}, file="x.toml")
    assert f"x.toml: {key}: " in str(info.value)
    assert fragment in str(info.value)


def test_low_mark_above_high_mark() -> None:
    with pytest.raises(ConfigError, match="write_buffer_low"):
        build_config(
            {"listen": ":1", "forward": "h:2", "write_buffer_high": 10, "write_buffer_low": 20}
        )


def test_metrics_listen_is_off_by_default_and_parsed_from_toml(tmp_path: Path) -> None:
    base = {"listen": ":1", "forward": "h:2"}
    assert build_config(base).metrics_listen is None
    path = tmp_path / "m.toml"
    path.write_text('listen = ":1"\nforward = "h:2"\nmetrics_listen = "127.0.0.1:9464"\n')
    config = build_config(load_toml(path), file=str(path))
    assert config.metrics_listen == Address("127.0.0.1", 9464)
    assert build_config({**base, "metrics_listen": ":0"}).metrics_listen == Address(None, 0)


@pytest.mark.parametrize(
    ("value", "fragment"), [("9464", "no port"), (9464, "must be a string"), ("h:x", "number")]
)
def test_bad_metrics_listen_names_the_key(tmp_path: Path, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"listen": ":1", "forward": "h:2", "metrics_listen": value}, file="m.toml")
    assert str(info.value).startswith("m.toml: metrics_listen: ")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:4444", Address("127.0.0.1", 4444)),
        ("127.0.0.1:49152-49215", Address("127.0.0.1", 49152, 49215)),
        (":49152-49152", Address(None, 49152, 49152)),
        ("[::1]:5000-5001", Address("::1", 5000, 5001)),
        ("unix:/run/migtap/migtap.sock", UnixAddress(Path("/run/migtap/migtap.sock"))),
        ("unix:rel.sock", UnixAddress(Path("rel.sock"))),
    ],
)
def test_parse_listen(text: str, want: object) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("h:5-", "is empty"),
        ("h:-5", "is empty"),
        ("h:-", "is empty"),
        ("h:6-5", "is reversed"),
        ("h:0-5", "starts at 0"),
        ("h:1000-2024", "has 1025 ports; at most 1024"),
        ("h:5-x", "not a number"),
        ("h:5-70000", "out of range"),
        ("unix:", "no socket path"),
        ("unix:@abstract", "abstract"),
        ("unix:/" + "x" * 120, "at most 107 bytes"),
        ("h", "has no port"),
    ],
)
def test_bad_listen_names_the_key(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen(text)
    assert str(info.value).startswith("listen: ")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("dest:4445", Address("dest", 4445)),
        ("dest", Address("dest", None)),
        ("127.0.0.2", Address("127.0.0.2", None)),
        ("[::1]", Address("::1", None)),
        (":4445", Address(None, 4445)),
        ("unix:/run/dst.sock", UnixAddress(Path("/run/dst.sock"))),
    ],
)
def test_parse_forward(text: str, want: object) -> None:
    assert parse_forward(text) == want


@pytest.mark.parametrize(
    ("text", "fragment"), [("dest:1-2", "a port range is for listen"), ("", "no address")]
)
def test_bad_forward(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_forward(text)


def test_address_strings() -> None:
    assert str(Address("127.0.0.2", None)) == "127.0.0.2"
    assert str(Address(None, 1, 3)) == "*:1-3"
    assert str(Address("::1", 1, 3)) == "[::1]:1-3"
    assert list(Address("h", 7, 9).ports) == [7, 8, 9]
    assert list(Address("h", 7).ports) == [7]
    assert str(UnixAddress(Path("/a.sock"))) == "unix:/a.sock"


@pytest.mark.parametrize(
    ("values", "key", "fragment"),
    [
        (
            {"listen": "unix:/a.sock", "forward": "dest"},
            "forward",
            "unix socket listener gives none",
        ),
        ({"listen": "unix:/a.sock", "forward": "d:1", "allow": "10.0.0.0/8"}, "allow", "TCP"),
        ({"listen": ":1", "forward": "d:1", "listen_mode": "0660"}, "listen_mode", "is TCP"),
        ({"listen": "unix:/a", "forward": "d:1", "listen_mode": "0999"}, "listen_mode", "octal"),
        (
            {"listen": "unix:/a", "forward": "d:1", "listen_mode": "01777"},
            "listen_mode",
            "0000-0777",
        ),
        ({"listen": "unix:/a", "forward": "d:1", "listen_mode": "0060"}, "listen_mode", "owner"),
        ({"listen": "unix:/a", "forward": "d:1", "listen_mode": 1.5}, "listen_mode", "octal"),
    ],
)
def test_bad_combinations(values: dict[str, object], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(values, file="x.toml")
    assert str(info.value).startswith(f"x.toml: {key}: ")
    assert fragment in str(info.value)


def test_listen_mode_from_toml_string_or_octal_integer(tmp_path: Path) -> None:
    base = {"listen": "unix:/a.sock", "forward": "d:1"}
    assert build_config(base).listen_mode is None
    assert build_config({**base, "listen_mode": "0660"}).listen_mode == 0o660
    path = tmp_path / "m.toml"
    path.write_text('listen = "unix:/a.sock"\nforward = "d:1"\nlisten_mode = 0o640\n')
    assert build_config(load_toml(path), file=str(path)).listen_mode == 0o640
    # a port-less forward with a TCP listener (range or not) is fine
    assert build_config({"listen": ":5-6", "forward": "d"}).forward == Address("d", None)
