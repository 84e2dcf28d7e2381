"""The VMDESCRIPTION JSON: collected by the parser as bytes, parsed by ``parse_vmdesc``."""

from __future__ import annotations

import pytest

from migtap.errors import StreamError
from migtap.wire.events import VmDescription
from migtap.wire.vmdesc import VmdescDocument, parse_vmdesc
from tests import streams as s
from tests.wire.stream_helpers import chunked, parse_chunks

RAM = s.header() + s.ram_start(2, s.BLOCKS)


@pytest.mark.parametrize("text", [b"[1]", b"{nope", b"\xff\xfe", b"[" * 100_000])
def test_the_parser_does_not_look_into_the_json(text: bytes) -> None:
    data = RAM + s.eof() + s.vmdesc(text)
    for chunks in ([data], chunked(data, 3)):
        events, err = parse_chunks(chunks)
        assert err is None
        assert events[-1] == VmDescription(len(RAM) + 1, text)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (b"[1]", "not an object but list"),
        (b"{nope", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),  # nesting beyond the recursion limit
    ],
)
def test_bad_json_is_a_stream_error_at_the_record(text: bytes, words: str) -> None:
    with pytest.raises(StreamError, match=words) as info:
        parse_vmdesc(VmDescription(1234, text))
    assert (info.value.offset, info.value.state) == (1234, "vmdesc")


def test_page_size() -> None:
    assert parse_vmdesc(VmDescription(7, b'{"page_size": 4096, "devices": []}')) == VmdescDocument(
        7, {"page_size": 4096, "devices": []}, 4096
    )
    for odd in (b'{"page_size": true}', b'{"page_size": "4096"}', b"{}"):
        assert parse_vmdesc(VmDescription(0, odd)).page_size is None
