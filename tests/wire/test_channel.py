from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migtap.wire.channel import CLASSIFY_BYTES, ChannelKind, classify
from tests.fixtures import fixture


@pytest.mark.parametrize(
    ("prefix", "kind"),
    [
        (b"QEVM", ChannelKind.MAIN),
        (b"QEVM\x00\x00\x00\x03", ChannelKind.MAIN),
        (b"\x11\x22\x33\x44", ChannelKind.MULTIFD),
        (b"QCPR", ChannelKind.CPR),
        (b"\x16\x03\x01", ChannelKind.TLS),  # TLS 1.0-1.3 ClientHello record
        (b"\x16\x03\x03\x00\x7a", ChannelKind.TLS),
        (b"\x16\x03\x07", ChannelKind.UNKNOWN),
        (b"\x16\x04", ChannelKind.UNKNOWN),
        (b"GET / HTTP/1.1\r\n", ChannelKind.HTTP),
        (b"POST", ChannelKind.HTTP),
        (b"PRI * HTTP/2.0", ChannelKind.HTTP),
        # postcopy preempt: a RAM page record header (be64 offset|flags) straight away
        (b"\x00\x00\x00\x00\x00\x04\x30\x08", ChannelKind.UNKNOWN),
        (b"QEVX", ChannelKind.UNKNOWN),
        (b"\x11\x22\x33\x45", ChannelKind.UNKNOWN),
        (b"X", ChannelKind.UNKNOWN),  # decided from one byte: no kind starts with it
    ],
)
def test_classify(prefix: bytes, kind: ChannelKind) -> None:
    assert classify(prefix) is kind
    assert classify(bytearray(prefix)) is kind
    assert classify(memoryview(prefix)) is kind


@pytest.mark.parametrize(
    "prefix",
    [b"", b"Q", b"QE", b"QEV", b"QC", b"\x11", b"\x11\x22\x33", b"\x16", b"\x16\x03", b"GE"],
)
def test_needs_more(prefix: bytes) -> None:
    assert classify(prefix) is None


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("multifd-ch0.first-packets.bin", ChannelKind.MULTIFD),
        ("postcopy.head.bin", ChannelKind.MAIN),
        ("file-precopy.head.bin", ChannelKind.MAIN),
    ],
)
def test_real_streams(name: str, kind: ChannelKind) -> None:
    assert classify(fixture(name).read_bytes()[:CLASSIFY_BYTES]) is kind


@given(st.binary(max_size=8))
def test_any_prefix(data: bytes) -> None:
    """Never raises; once decided, more bytes never change the answer; 4 bytes always decide."""
    kind = classify(data)
    if len(data) >= CLASSIFY_BYTES:
        assert kind is not None
    if kind is not None:
        for n in range(len(data), CLASSIFY_BYTES + 2):
            assert classify(data + bytes(n - len(data))) is kind
    for n in range(len(data)):
        earlier = classify(data[:n])
        assert earlier is None or earlier is kind
