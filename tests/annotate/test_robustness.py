"""Truncated and mutated payloads (and odd descriptions) raise only the decoder's StreamError."""

from __future__ import annotations

import contextlib
import json
from functools import cache

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from migtap.annotate.vmsd import DeviceDesc, VmDescription
from migtap.annotate.walk import DecodedSection, DecodeError, TruncatedPayload, decode_section
from migtap.errors import StreamError
from tests.annotate.tail import FullSection, tail_bytes, tail_vmdesc, walk_tail
from tests.annotate.test_vmsd import shaped


@cache
def sections() -> tuple[FullSection, ...]:
    return tuple(walk_tail(tail_vmdesc())[0])


def payload_of(s: FullSection) -> bytes:
    return tail_bytes()[s.payload_start : s.payload_start + s.decoded.consumed]


indices = st.integers(0, 29)


def decode_or_error(desc: DeviceDesc, payload: bytes) -> DecodedSection | DecodeError:
    """Any exception other than the decoder's own fails the test by propagating."""
    try:
        return decode_section(desc, payload)
    except DecodeError as exc:
        return exc


@settings(max_examples=60, deadline=None)
@given(indices, st.floats(0, 1, exclude_max=True))
@example(2, 0.999)  # cpu, cut inside its last subsection
def test_truncated_payload_raises_truncated(which: int, frac: float) -> None:
    s = sections()[which]
    payload = payload_of(s)
    cut = int(len(payload) * frac)
    with pytest.raises(TruncatedPayload) as info:
        decode_section(s.decoded.desc, payload[:cut], base_offset=1000)
    assert 1000 <= info.value.offset <= 1000 + cut
    assert info.value.field_path


@settings(max_examples=80, deadline=None)
@given(
    indices,
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=6),
    st.binary(max_size=8),
)
def test_mutated_payload_decodes_or_raises_stream_error(
    which: int, edits: list[tuple[float, int]], tail: bytes
) -> None:
    s = sections()[which]
    data = bytearray(payload_of(s))
    for frac, byte in edits:
        if data:
            data[int(len(data) * frac)] = byte
    result = decode_or_error(s.decoded.desc, bytes(data) + tail)
    if isinstance(result, DecodeError):
        assert result.device == f"{s.idstr} ({s.instance_id})"
    else:
        assert result.consumed <= len(data) + len(tail)


@settings(max_examples=100, deadline=None)
@given(shaped, st.binary(max_size=64))
def test_odd_descriptions_decode_or_raise_stream_error(value: object, payload: bytes) -> None:
    devices = value if isinstance(value, list) else [value]
    try:
        vd = VmDescription.from_json(json.dumps({"page_size": 4096, "devices": devices}))
    except StreamError:
        return
    for dev in vd.devices:
        with contextlib.suppress(StreamError):
            decode_section(dev, payload)
