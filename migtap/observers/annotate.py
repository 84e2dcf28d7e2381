"""The annotated log: every device section, decoded field by field once a vmdesc is known.

The decoding itself happens off the event loop (``migtap.decode``) and its results land in the
session model; ``AnnotateObserver`` reports them: one ``device_state`` line per decoded section
(a warning for one that does not decode or is not in the vmdesc), and at close
``annotated.jsonl`` in the capture directory (one JSON line per section), handed to the capture
to write. Without any vmdesc it still lists every section and says that field decoding was not
possible.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import structlog

from migtap.annotate.render import annotated_record
from migtap.model import DevicesDecoded
from migtap.observers.base import Observer

if TYPE_CHECKING:
    from collections.abc import Callable

    from migtap.model import Change, DeviceBatch, DeviceResult, Migration
    from migtap.vocabulary import SessionSummary

log = structlog.get_logger("migtap.annotate")

NO_VMDESC_NOTE = "no vmdesc in the stream and none given with --vmdesc: fields not decoded"


class AnnotateObserver(Observer):
    def __init__(
        self,
        migration: Migration,
        *,
        write_file: Callable[[str, Callable[[], bytes]], None] | None = None,
    ) -> None:
        super().__init__(migration)
        self.log = log.bind(session=migration.session_id)
        self.write_file = write_file
        self.records: list[dict[str, object]] = []

    def on_change(self, change: Change) -> None:
        if isinstance(change, DevicesDecoded):
            self._report(change.batch)

    def close(self, summary: SessionSummary) -> None:
        if self.write_file is not None and self.records:
            records = list(self.records)

            def render() -> bytes:  # on the capture's writer thread, not on the loop
                text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
                return text.encode()

            self.write_file("annotated.jsonl", render)

    def _report(self, batch: DeviceBatch) -> None:
        if batch.vmdesc_error is not None:
            self.log.warning(
                "vmdesc_unusable",
                error=str(batch.vmdesc_error),
                offset=batch.vmdesc_error.offset,
            )
        for result in batch.results:
            self._one(result)
        if batch.vmdesc is None:
            if batch.results:
                self.log.info(
                    "annotation_without_vmdesc",
                    sections=len(batch.results),
                    action="pass --vmdesc FILE (a vmdesc of the same machine type) to decode",
                )
            return
        m = self.migration
        self.log.info(
            "device_state_annotated",
            vmdesc=batch.vmdesc,
            sections=m.devices_decoded + m.devices_failed,
            decoded=m.devices_decoded,
            failed=m.devices_failed,
            dropped_over_cap=m.devices_dropped,
        )

    def _one(self, r: DeviceResult) -> None:
        if r.vmdesc is None:
            record = annotated_record(r.offset, r.idstr, r.instance_id, r.version_id, r.size, None)
            record["note"] = NO_VMDESC_NOTE
            self.records.append(record)
            return
        outcome = r.error if r.error is not None else r.decoded
        self.records.append(
            annotated_record(r.offset, r.idstr, r.instance_id, r.version_id, r.size, outcome)
        )
        fields: dict[str, object] = {
            "idstr": r.idstr,
            "instance_id": r.instance_id,
            "version_id": r.version_id,
            "offset": r.offset,
            "bytes": r.size,
        }
        if r.error is not None:
            self.log.warning(
                "device_state_undecodable",
                **fields,
                error=str(r.error),
                error_offset=r.error.offset,
                field=getattr(r.error, "field_path", None),
            )
        elif not r.in_vmdesc:
            self.log.warning("device_state_not_in_vmdesc", **fields)
        elif r.decoded is not None:
            self.log.info("device_state", **fields, fields_decoded=len(r.decoded.root.fields))
            if r.decoded.consumed != r.size:
                # The parser's end of this section was a footer-scan guess, and a wrong one: the
                # vmdesc settles it. The section table (migtap analyze) shows the guessed size.
                self.log.warning(
                    "device_section_boundary_guessed",
                    **fields,
                    decoded_bytes=r.decoded.consumed,
                    action="the footer scan's size was wrong; the decoded size is the right one",
                )
