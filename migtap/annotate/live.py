"""The annotated log: decode every device section once the vmdesc is known.

``AnnotateSink`` keeps the device sections (FULL, and unknown iterables) of one session as they
pass, bounded in total size. When the stream's own VMDESCRIPTION arrives (or at the end, with a
vmdesc given by ``--vmdesc``), it decodes each one field by field, logs one ``device_state``
line per section, and hands ``annotated.jsonl`` to the capture (one JSON line per section).
Without any vmdesc it still lists every section and says that field decoding was not possible.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import structlog

from migtap.annotate.render import annotated_record
from migtap.annotate.vmsd import VmDescription
from migtap.annotate.walk import DecodedSection, decode_section
from migtap.errors import StreamError
from migtap.wire.events import DeviceState
from migtap.wire.events import VmDescription as VmDescriptionEvent

if TYPE_CHECKING:
    from collections.abc import Callable

    from migtap.relay.pipe import Direction
    from migtap.sinks import ChannelInfo, SessionSummary

log = structlog.get_logger("migtap.annotate")

#: Device-state bytes kept per session while waiting for the vmdesc.
MAX_KEPT_BYTES = 64 * 1024 * 1024


class AnnotateSink:
    def __init__(
        self,
        session_id: int,
        *,
        fallback: VmDescription | None = None,
        write_file: Callable[[str, bytes], None] | None = None,
        max_kept_bytes: int = MAX_KEPT_BYTES,
    ) -> None:
        self.log = log.bind(session=session_id)
        self.fallback = fallback
        self.write_file = write_file
        self.max_kept_bytes = max_kept_bytes
        self.kept: list[DeviceState] = []
        self.kept_bytes = 0
        self.dropped = 0
        self.desc: VmDescription | None = None
        self.records: list[dict[str, object]] = []
        self.decoded = 0
        self.failed = 0

    # -- Sink protocol ------------------------------------------------------------------------
    def on_channel(self, channel: ChannelInfo) -> None:
        pass

    def on_chunk(
        self, channel: ChannelInfo, direction: Direction, offset: int, chunk: bytes
    ) -> None:
        pass

    def on_event(self, channel: ChannelInfo, direction: Direction, event: object) -> None:
        if isinstance(event, DeviceState):
            if self.desc is not None:
                self._annotate(event, self.desc)
            elif self.kept_bytes + len(event.payload) <= self.max_kept_bytes:
                self.kept.append(event)
                self.kept_bytes += len(event.payload)
            else:
                self.dropped += 1
        elif isinstance(event, VmDescriptionEvent):
            try:
                self.desc = VmDescription.from_json(
                    event.desc or event.json_bytes, offset=event.offset
                )
            except StreamError as exc:
                self.log.warning("vmdesc_unusable", error=str(exc), offset=event.offset)
                return
            self._annotate_kept(self.desc, source="stream")

    def on_channel_closed(self, channel: ChannelInfo) -> None:
        pass

    def on_close(self, summary: SessionSummary) -> None:
        if self.desc is None:
            if self.fallback is not None:
                self._annotate_kept(self.fallback, source="--vmdesc")
            else:
                for event in self.kept:
                    record = annotated_record(
                        event.offset,
                        event.idstr or "",
                        event.instance_id or 0,
                        event.version_id or 0,
                        len(event.payload),
                        None,
                    )
                    record["note"] = (
                        "no vmdesc in the stream and none given with --vmdesc: fields not decoded"
                    )
                    self.records.append(record)
                if self.kept:
                    self.log.info(
                        "annotation_without_vmdesc",
                        sections=len(self.kept),
                        action="pass --vmdesc FILE (a vmdesc of the same machine type) to decode",
                    )
        summary.fields["devices_decoded"] = self.decoded
        summary.fields["devices_failed"] = self.failed
        if self.write_file is not None and self.records:
            text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self.records)
            self.write_file("annotated.jsonl", text.encode())

    # -- decoding ------------------------------------------------------------------------------
    def _annotate_kept(self, desc: VmDescription, *, source: str) -> None:
        kept, self.kept, self.kept_bytes = self.kept, [], 0
        for event in kept:
            self._annotate(event, desc)
        self.log.info(
            "device_state_annotated",
            vmdesc=source,
            sections=self.decoded + self.failed,
            decoded=self.decoded,
            failed=self.failed,
            dropped_over_cap=self.dropped,
        )

    def _annotate(self, event: DeviceState, desc: VmDescription) -> None:
        idstr = event.idstr or ""
        instance = event.instance_id or 0
        device = desc.find(idstr, instance)
        decoded: DecodedSection | None = None
        error: StreamError | None = None
        if device is not None:
            try:
                decoded = decode_section(device, event.payload, base_offset=event.payload_offset)
            except StreamError as exc:
                error = exc
        record = annotated_record(
            event.offset,
            idstr,
            instance,
            event.version_id or 0,
            len(event.payload),
            error if error is not None else decoded,
        )
        self.records.append(record)
        fields: dict[str, object] = {
            "idstr": idstr,
            "instance_id": instance,
            "version_id": event.version_id,
            "offset": event.offset,
            "bytes": len(event.payload),
        }
        if error is not None:
            self.failed += 1
            self.log.warning(
                "device_state_undecodable",
                **fields,
                error=str(error),
                error_offset=error.offset,
                field=getattr(error, "field_path", None),
            )
        elif device is None:
            self.failed += 1
            self.log.warning("device_state_not_in_vmdesc", **fields)
        elif decoded is not None:
            self.decoded += 1
            if decoded.consumed != len(event.payload):
                # The parser's boundary was a footer-scan guess; the vmdesc settles it.
                fields["boundary"] = (
                    f"decoder used {decoded.consumed} of {len(event.payload)} bytes"
                )
            self.log.info("device_state", **fields, fields_decoded=len(decoded.root.fields))
