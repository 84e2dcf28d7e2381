"""The capture format: what a capture directory holds and how to read it.

The capture observer (``migtap.observers.capture``) writes it; ``migtap analyze DIR`` and any
other reader import this module, which imports nothing from ``migtap.observers``.

One directory per session, ``<root>/<UTC yyyymmddThhmmssZ>-s<session_id>`` (``-1``, ``-2``, ...
appended if it exists), mode 0700; every file in it is 0600 whatever the umask:

``src-to-dst.bin`` / ``dst-to-src.bin`` (:data:`MAIN_FILES`)
    The first ``main`` channel, byte-exact. With ``capture_ram="full"`` the src-to-dst file is a
    complete migration stream (``-incoming "exec:cat src-to-dst.bin"``, ``analyze-migration.py``).
``conn-<index>-<kind>.<direction>.bin`` (:func:`channel_file_name`)
    Every other connection (multifd, postcopy-preempt, tls, unknown, a second main), ``index``
    being the order of acceptance in the session and ``kind`` made safe for a file name
    (``postcopy_preempt``); ``session.json`` gives each channel's ``multifd_id``. A direction that
    carried no bytes has no file (``"file": null`` in ``session.json``). A channel whose kind was
    learned after its first bytes (postcopy-preempt) is renamed to its kind's name; ``session.json``
    names the file as it is. :func:`capture_file_name` gives any channel's file name.
``events.jsonl`` (:data:`EVENTS_FILE`)
    The index: a ``capture_started`` line, then one line per parser event (:func:`event_record`),
    ``{"v": 1, "t": ..., "ch": 0, "dir": "src-to-dst", "offset": N, "kind": "ram_pages", ...}``.
    ``t`` is the session model's time for that event (wall-clock seconds, ``time.time()``), so a
    replay of the capture sees the live timings. Read it with :func:`read_index`, which upgrades
    older versions (:data:`UPGRADERS`).
``vmdesc.json`` (``vmdesc-2.json``, ... for later ones: :func:`vmdesc_file_name`)
    The JSON device description from the end of the main stream (also inside the raw file).
``session.json`` (:data:`SESSION_FILE`)
    Peers, timings, per-channel byte counts and files, outcome, config, and whether the capture
    is ``complete``; rewritten atomically (tmp + ``os.replace``) on channel changes and written
    one last time when the capture is closed. Read it with :func:`read_session`. Keys:

    - ``v``, ``session_id``, ``directory``; ``started``/``ended`` (the capture's own, ISO 8601 UTC);
      ``session_started``/``session_ended`` (the session's, ISO) and ``started_t``/``ended_t``
      (the same, exact, as float seconds); ``outcome`` (``completed``, ``failed``, ``cancelled``,
      ``unknown``; null until closed); ``summary`` (the ``migration_summary`` fields); ``qemu``
      (the version ranges and their evidence); ``capture_ram``; ``page_size`` (the stream's, as
      known at close); ``complete`` (every byte meant for a file reached it; false until
      closed); ``error``; ``closed``; ``vmdesc_files``; ``extra_files`` (say
      ``annotated.jsonl``); ``config``.
    - ``channels``: per connection ``index``, ``pipe_id``, ``kind``, ``multifd_id``, ``source``,
      ``destination``, ``started``, ``ended``, ``bytes_src_to_dst``, ``bytes_dst_to_src``,
      ``close_reason``, ``first_closed`` and ``reset_by`` (``source``/``destination`` or null),
      ``kernel_view`` (when the destination ended a TCP connection: ``acked``, ``reset``,
      ``buffer_bound``; see docs/tap.md), ``parse_error``, and ``files``: per direction
      ``file`` (or null), ``content`` (``exact``, ``ram_removed``, ``omitted``, ``empty``),
      ``bytes_seen``, ``bytes_written``, and with ``ram_removed`` also ``bytes_removed``,
      ``bytes_held``, ``left_out_from``, ``left_out_reason``, ``late_cut_bytes``.
Any other file (``annotated.jsonl``) is listed in ``extra_files``.

``capture_ram="none"`` removes guest RAM contents, and nothing else, from the files: the main
channel's src-to-dst file loses the bytes of every ``ram_pages`` event, ``[offset, offset +
length)`` (page record headers with their payloads, since the events give runs, not pages); a
multifd channel's src-to-dst file loses the payload of every RAM packet (``multifd_packet``
events: ``payload_bytes`` after the ``320 + 8 * (512 KiB / page_size)``-byte header, the page
size being the stream's; each record must start where the last one ended, or the rest of the
file is left out as ``multifd_framing_mismatch``); the index keeps every event, so page counts
stay. Bytes the parser could not frame (``unparsed`` events, a detached parser) might be RAM,
so they are left out too, as is the src-to-dst direction of any channel that is neither main nor
multifd (postcopy-preempt included). The return path is kept. The resulting files are not
loadable streams; ``session.json`` says per file what was removed (``content``,
``bytes_removed``). Bytes are held back until the parser's events have framed them (at most
64 MiB per channel direction; past that, the rest of that file is left out and ``session.json``
says from which offset: ``left_out_from``, ``left_out_reason``).

``"v"`` (:data:`FORMAT_VERSION`) versions both ``events.jsonl`` lines and ``session.json``;
``UPGRADERS``/``SESSION_UPGRADERS`` migrate older ones, as mitmproxy chains ``convert_X_Y``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from migtap.errors import CaptureError
from migtap.vocabulary import Direction
from migtap.wire.events import DeviceState, VmDescription

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Iterator

__all__ = [
    "DIRECTIONS",
    "DST_TO_SRC",
    "EVENTS_FILE",
    "FORMAT_VERSION",
    "MAIN_FILES",
    "SESSION_FILE",
    "SESSION_UPGRADERS",
    "SMALL_BYTES_MAX",
    "SRC_TO_DST",
    "UPGRADERS",
    "Upgrader",
    "capture_file_name",
    "channel_file_name",
    "event_kind",
    "event_record",
    "jsonable",
    "read_index",
    "read_session",
    "upgrade_record",
    "vmdesc_file_name",
]

FORMAT_VERSION: Final = 1
"""Version of ``events.jsonl`` lines and ``session.json`` (``"v"``)."""

SMALL_BYTES_MAX: Final = 64
"""``bytes`` fields up to this size go into the index as hex; longer ones as ``<name>_len``."""

SRC_TO_DST: Final = Direction.SRC_TO_DST.value
DST_TO_SRC: Final = Direction.DST_TO_SRC.value
DIRECTIONS: Final = (SRC_TO_DST, DST_TO_SRC)

EVENTS_FILE: Final = "events.jsonl"
SESSION_FILE: Final = "session.json"
MAIN_FILES: Final = {SRC_TO_DST: f"{SRC_TO_DST}.bin", DST_TO_SRC: f"{DST_TO_SRC}.bin"}
"""The first main channel's files, by direction."""

_ENVELOPE: Final = frozenset({"v", "t", "ch", "dir", "kind"})
_KIND_RE: Final = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SAFE_KIND_RE: Final = re.compile(r"[^a-z0-9_]")


# -- file names ------------------------------------------------------------------------------------


def channel_file_name(index: int, kind: str, direction: str) -> str:
    """The capture file of a connection other than the main channel:
    ``conn-<index>-<kind>.<direction>.bin``, the kind made safe (``postcopy_preempt``).

    ``kind`` is a ``ChannelKind`` (or its value), ``direction`` a ``Direction`` (or its value)."""
    safe_kind = _SAFE_KIND_RE.sub("_", str(kind).lower())[:32] or "unknown"
    return f"conn-{int(index):d}-{safe_kind}.{Direction(direction).value}.bin"


def capture_file_name(index: int, kind: str, direction: str, *, main: bool) -> str:
    """Any channel's capture file: :data:`MAIN_FILES` for the session's (first) main channel
    (``main``), :func:`channel_file_name` for every other one."""
    if main:
        return MAIN_FILES[Direction(direction).value]
    return channel_file_name(index, kind, direction)


def vmdesc_file_name(n: int) -> str:
    """The ``n``-th (from 1) vmdesc seen: ``vmdesc.json``, then ``vmdesc-2.json``, ..."""
    return "vmdesc.json" if n == 1 else f"vmdesc-{int(n):d}.json"


# -- the index -------------------------------------------------------------------------------------


def event_kind(event: object) -> str:
    """``RamPages`` -> ``ram_pages``, ``RpReqPagesId`` -> ``rp_req_pages_id``."""
    return _KIND_RE.sub("_", type(event).__name__).lower()


def jsonable(value: object) -> object:  # noqa: PLR0911 - one return per JSON type
    """A JSON-ready form of an event field or summary value: string enums by value, other
    enums by name, UUIDs as text, bytes as hex, dataclasses as dicts, tuples as lists."""
    if isinstance(value, enum.StrEnum):
        return value.value
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, int | float):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return repr(value)


def event_record(event: object, *, channel: int, direction: str, t: float) -> dict[str, Any]:
    """One ``events.jsonl`` line for a parser event (any frozen dataclass with ``offset``).

    Fields become keys, converted by type (:func:`jsonable`). Big payloads are left out:
    ``DeviceState.payload`` becomes ``payload_len``, ``VmDescription.json_bytes`` ``json_len``,
    any other ``bytes`` field over :data:`SMALL_BYTES_MAX` ``<name>_len``. A field whose name is
    an envelope key (``kind`` of a section) is stored as ``section_<name>``. ``t`` is the
    session model's time for the event.
    """
    if not dataclasses.is_dataclass(event) or isinstance(event, type):
        raise TypeError(f"not an event dataclass: {type(event).__name__}")
    record: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "t": t,
        "ch": channel,
        "dir": str(direction),
        "offset": getattr(event, "offset", None),
        "kind": event_kind(event),
    }
    for f in dataclasses.fields(event):
        name = f.name
        if name == "offset":
            continue
        value = getattr(event, name)
        if isinstance(event, VmDescription) and name == "json_bytes":
            record["json_len"] = len(value)
            continue
        if isinstance(event, DeviceState) and name == "payload":
            record["payload_len"] = len(value)
            continue
        if isinstance(value, bytes | bytearray | memoryview) and len(value) > SMALL_BYTES_MAX:
            record[f"{name}_len"] = len(value)
            continue
        key = f"section_{name}" if name in _ENVELOPE else name
        record[key] = jsonable(value)
    return record


# -- versions --------------------------------------------------------------------------------------

Upgrader: TypeAlias = "Callable[[dict[str, Any]], dict[str, Any]]"
"""Turns a version-``n`` record into a version ``n + 1`` one."""

UPGRADERS: dict[int, Upgrader] = {}
"""``UPGRADERS[n]`` turns a version-``n`` index line into a version ``n + 1`` one (as mitmproxy
chains ``convert_X_Y``). Empty while only version 1 exists."""

SESSION_UPGRADERS: dict[int, Upgrader] = {}
"""The same for ``session.json`` documents."""


def upgrade_record(
    record: dict[str, Any],
    *,
    where: str = "index",
    upgraders: dict[int, Upgrader] | None = None,
) -> dict[str, Any]:
    """Bring one index line (or, with ``upgraders=SESSION_UPGRADERS``, a ``session.json``) up to
    :data:`FORMAT_VERSION`; ``CaptureError`` naming ``where`` if it cannot."""
    chain = UPGRADERS if upgraders is None else upgraders
    version = record.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CaptureError(f'{where}: no valid format version ("v": {version!r})')
    if version > FORMAT_VERSION:
        raise CaptureError(
            f"{where}: format version {version} is newer than this migtap reads "
            f"({FORMAT_VERSION}); upgrade migtap"
        )
    while version < FORMAT_VERSION:
        upgrader = chain.get(version)
        if upgrader is None:
            raise CaptureError(f"{where}: no upgrade from format version {version}")
        record = upgrader(record)
        version = record["v"]
    return record


# -- readers ---------------------------------------------------------------------------------------


def read_index(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield the lines of an ``events.jsonl``, upgraded to the current version.

    Raises ``CaptureError`` naming the file and line for an unreadable file or line, or a
    version newer than known."""
    try:
        fh = Path(path).open("rb")  # noqa: SIM115 - closed below, in a generator
    except OSError as exc:
        raise CaptureError(f"{path}: cannot read the capture index: {exc}") from exc
    with fh:
        lineno = 0
        while True:
            where = f"{path}:{lineno + 1}"
            try:
                raw = fh.readline()
            except OSError as exc:
                raise CaptureError(f"{where}: unreadable line: {exc}") from exc
            if not raw:
                return
            lineno += 1
            if not raw.strip():
                continue
            yield upgrade_record(_json_object(raw, where), where=where)


def _json_object(raw: bytes, where: str) -> dict[str, Any]:
    """One JSON object from UTF-8 bytes; ``CaptureError`` naming ``where`` otherwise."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CaptureError(f"{where}: not UTF-8: {exc}") from exc
    except ValueError as exc:
        raise CaptureError(f"{where}: not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CaptureError(f"{where}: not a JSON object")
    return doc


def read_session(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``session.json`` (the file, or a capture directory holding one), upgraded to the
    current version and checked for the shape readers rely on: an object whose ``channels`` is
    a list of objects, each with an ``index`` and a ``files`` object.

    Raises ``CaptureError`` naming the file for an unreadable or malformed file, or a version
    newer than known."""
    where = Path(path)
    if where.is_dir():
        where /= SESSION_FILE
    try:
        raw = where.read_bytes()
    except OSError as exc:
        raise CaptureError(f"{where}: cannot read the session record: {exc}") from exc
    doc = upgrade_record(
        _json_object(raw, str(where)), where=str(where), upgraders=SESSION_UPGRADERS
    )
    channels = doc.get("channels")
    if not isinstance(channels, list):
        raise CaptureError(f"{where}: no channel list")
    for n, ch in enumerate(channels):
        ok = (
            isinstance(ch, dict)
            and isinstance(ch.get("index"), int)
            and isinstance(ch.get("files"), dict)
        )
        if not ok:
            raise CaptureError(f"{where}: channel {n} is not an object with index and files")
    return doc
