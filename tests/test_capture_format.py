"""The capture format as readers see it: file names, session.json, no dependency on the writer."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from migtap import capture_format as fmt
from migtap.capture_format import (
    MAIN_FILES,
    SESSION_UPGRADERS,
    capture_file_name,
    channel_file_name,
    read_session,
    vmdesc_file_name,
)
from migtap.errors import CaptureError
from migtap.vocabulary import ChannelKind, Direction, Outcome, Peer

if TYPE_CHECKING:
    from pathlib import Path


def test_readers_import_nothing_of_the_observers() -> None:
    code = (
        "import sys, migtap.capture_format\n"
        "bad = [m for m in sys.modules if m.startswith(('migtap.observers', 'migtap.relay'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_file_names() -> None:
    assert MAIN_FILES == {"src-to-dst": "src-to-dst.bin", "dst-to-src": "dst-to-src.bin"}
    s2d, d2s = Direction.SRC_TO_DST, Direction.DST_TO_SRC
    assert capture_file_name(0, ChannelKind.MAIN, s2d, main=True) == "src-to-dst.bin"
    assert capture_file_name(3, ChannelKind.MAIN, d2s, main=True) == "dst-to-src.bin"
    assert capture_file_name(3, ChannelKind.MAIN, d2s, main=False) == "conn-3-main.dst-to-src.bin"
    assert (
        channel_file_name(2, ChannelKind.POSTCOPY_PREEMPT, s2d)
        == "conn-2-postcopy_preempt.src-to-dst.bin"
    )
    assert channel_file_name(1, "multifd", "src-to-dst") == "conn-1-multifd.src-to-dst.bin"
    assert channel_file_name(4, "../x", d2s) == "conn-4-___x.dst-to-src.bin"
    with pytest.raises(ValueError):
        channel_file_name(1, "multifd", "sideways")
    assert [vmdesc_file_name(n) for n in (1, 2, 3)] == [
        "vmdesc.json",
        "vmdesc-2.json",
        "vmdesc-3.json",
    ]


def session_doc(**kw: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "v": 1,
        "session_id": 7,
        "outcome": Outcome.COMPLETED.value,
        "channels": [
            {
                "index": 0,
                "kind": ChannelKind.MAIN.value,
                "first_closed": Peer.SOURCE.value,
                "files": {"src-to-dst": {"file": "src-to-dst.bin"}},
            }
        ],
    }
    doc.update(kw)
    return doc


def test_read_session(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    path.write_text(json.dumps(session_doc()))
    assert read_session(path) == session_doc()
    assert read_session(tmp_path) == session_doc()  # the capture directory will do


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (json.dumps(session_doc(v=2)), "newer"),
        (json.dumps(session_doc(v=None)), "no valid format version"),
        ("{", "not JSON"),
        ("[]", "not a JSON object"),
        (json.dumps(session_doc(channels=None)), "no channel list"),
        (json.dumps(session_doc(channels=[{"index": 0}])), "channel 0"),
    ],
)
def test_read_session_rejects(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "session.json"
    path.write_text(content)
    with pytest.raises(CaptureError, match=message):
        read_session(path)


def test_read_session_missing_and_upgraded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CaptureError, match="cannot read"):
        read_session(tmp_path / "session.json")
    monkeypatch.setattr(fmt, "FORMAT_VERSION", 2)
    monkeypatch.setitem(SESSION_UPGRADERS, 1, lambda d: {**d, "v": 2, "upgraded": True})
    path = tmp_path / "session.json"
    path.write_text(json.dumps(session_doc()))
    assert read_session(path) == session_doc(v=2, upgraded=True)
