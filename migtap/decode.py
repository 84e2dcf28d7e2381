"""Device state: kept as it passes, decoded field by field once a vmdesc is known.

``DeviceKeeper`` (on the event loop, cheap) keeps the device sections (FULL, and unknown
iterables) of one session, at most ``max_kept_bytes`` in all, and hands them out as *jobs*:
:func:`decode_devices` is a pure function that parses the vmdesc JSON and walks every section.
The tap runs jobs through an ``Offload`` (live: a worker thread, so that up to 64 MiB of device
state is never decoded inside a socket callback; offline: inline) and applies the resulting
``DeviceBatch`` to the session model.

The vmdesc JSON is parsed by C code that holds the GIL, so no thread can keep its cost off the
loop: a stream's vmdesc longer than :data:`MAX_LIVE_VMDESC` is not decoded live (real ones are a
few hundred KiB; ``migtap analyze`` decodes any size offline).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from migtap.annotate.vmsd import VmDescription as Desc
from migtap.annotate.walk import decode_section
from migtap.errors import StreamError
from migtap.model import DeviceBatch, DeviceResult
from migtap.wire.vmdesc import parse_vmdesc

if TYPE_CHECKING:
    from migtap.wire.events import DeviceState, VmDescription

#: Device-state bytes kept per session while waiting for the vmdesc.
MAX_KEPT_BYTES: Final = 64 * 1024 * 1024
#: Largest stream vmdesc decoded live (its JSON parse holds the GIL).
MAX_LIVE_VMDESC: Final = 16 * 1024 * 1024

Job = Callable[[], DeviceBatch]
#: Runs a job somewhere and calls ``done`` with its result *on the event loop*.
Offload = Callable[[Job, Callable[[DeviceBatch], None]], None]


def run_inline(job: Job, done: Callable[[DeviceBatch], None]) -> None:
    """The offline ``Offload``: run the job now."""
    done(job())


def decode_devices(
    sections: tuple[DeviceState, ...],
    *,
    stream_vmdesc: VmDescription | None,
    fallback: Desc | None,
    dropped: int = 0,
    max_vmdesc: int | None = None,
) -> DeviceBatch:
    """Parse the stream's vmdesc (or use ``fallback``, from ``--vmdesc``) and decode each
    section. Pure: safe to run on any thread."""
    document = None
    vmdesc_error: StreamError | None = None
    desc: Desc | None = None
    source: str | None = None
    if stream_vmdesc is not None:
        size = len(stream_vmdesc.json_bytes)
        try:
            if max_vmdesc is not None and size > max_vmdesc:
                vmdesc_error = StreamError(
                    f"vmdesc of {size} bytes: over {max_vmdesc} it is not decoded live "
                    "(migtap analyze decodes it from the capture)",
                    offset=stream_vmdesc.offset,
                    state="vmdesc",
                )
            else:
                document = parse_vmdesc(stream_vmdesc)
                desc = Desc.from_json(document.desc, offset=stream_vmdesc.offset)
                source = "stream"
        except StreamError as exc:
            vmdesc_error = exc
    if desc is None and fallback is not None:
        desc, source = fallback, "--vmdesc"
    results = tuple(_decode_one(s, desc, source) for s in sections)
    return DeviceBatch(source, results, document, vmdesc_error, dropped)


def _decode_one(event: DeviceState, desc: Desc | None, source: str | None) -> DeviceResult:
    idstr = event.idstr or ""
    instance = event.instance_id or 0
    base = DeviceResult(
        event.offset, idstr, instance, event.version_id or 0, len(event.payload), source
    )
    if desc is None:
        return base
    device = desc.find(idstr, instance)
    if device is None:
        return dataclasses.replace(base, in_vmdesc=False)
    try:
        decoded = decode_section(device, event.payload, base_offset=event.payload_offset)
    except StreamError as exc:
        return dataclasses.replace(base, error=exc)
    return dataclasses.replace(base, decoded=decoded)


class DeviceKeeper:
    """Keeps device sections until a vmdesc decodes them; makes the decoding jobs."""

    def __init__(self, *, fallback: Desc | None, max_kept_bytes: int = MAX_KEPT_BYTES) -> None:
        self.fallback = fallback
        self.max_kept_bytes = max_kept_bytes
        self.kept: list[DeviceState] = []
        self.kept_bytes = 0
        self.dropped = 0
        self.stream_vmdesc: VmDescription | None = None

    def keep(self, event: DeviceState) -> None:
        if self.kept_bytes + len(event.payload) <= self.max_kept_bytes:
            self.kept.append(event)
            self.kept_bytes += len(event.payload)
        else:
            self.dropped += 1

    def job(
        self, stream_vmdesc: VmDescription | None = None, *, final: bool = False, live: bool = True
    ) -> Job | None:
        """A job for what is kept: when the stream's vmdesc arrives, or at the end (``final``,
        with ``--vmdesc`` or none). None when there is nothing to do."""
        if stream_vmdesc is not None:
            self.stream_vmdesc = stream_vmdesc
        elif not final:
            return None
        if not self.kept and not self.dropped and stream_vmdesc is None:
            return None
        sections, self.kept, self.kept_bytes = tuple(self.kept), [], 0
        dropped, self.dropped = self.dropped, 0
        vmdesc, fallback = self.stream_vmdesc, self.fallback
        document_only = stream_vmdesc is None  # at the end, the stream's vmdesc was parsed already

        def job() -> DeviceBatch:
            batch = decode_devices(
                sections,
                stream_vmdesc=vmdesc,
                fallback=fallback,
                dropped=dropped,
                max_vmdesc=MAX_LIVE_VMDESC if live else None,
            )
            if document_only:  # report the vmdesc once, with the job that first parsed it
                return DeviceBatch(batch.vmdesc, batch.results, None, None, batch.dropped)
            return batch

        return job
