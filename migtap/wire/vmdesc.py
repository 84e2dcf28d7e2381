"""The VMDESCRIPTION JSON, parsed outside the parser.

``StreamParser`` only collects the JSON text (``VmDescription.json_bytes``, up to 64 MiB): parsing
it inside ``feed`` would stall the caller (the event loop, live). :func:`parse_vmdesc` is the pure
function that does it, for a caller to run where it likes (a worker thread, live). See
``docs/stream-format.md`` §2.10 and §4, and QEMU's ``migration/savevm.c``
(``qemu_savevm_state_complete_precopy_non_iterable``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from migtap.errors import StreamError

if TYPE_CHECKING:
    from migtap.wire.events import VmDescription


@dataclass(frozen=True, slots=True)
class VmdescDocument:
    """The parsed VMDESCRIPTION: the JSON object and its ``page_size`` (None if absent or not an
    integer)."""

    offset: int  # of the QEMU_VM_VMDESCRIPTION record, like the event's
    desc: dict[str, Any] = field(hash=False, repr=False)
    page_size: int | None = None


def parse_vmdesc(event: VmDescription) -> VmdescDocument:
    """Parse the JSON of a ``VmDescription`` event; a ``StreamError`` (state ``"vmdesc"``, the
    event's offset) if it is not JSON or not a JSON object."""
    try:
        desc = json.loads(event.json_bytes)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, nesting
        raise StreamError(
            f"VMDESCRIPTION is not valid JSON: {exc}", offset=event.offset, state="vmdesc"
        ) from exc
    if not isinstance(desc, dict):
        raise StreamError(
            f"VMDESCRIPTION JSON is not an object but {type(desc).__name__}",
            offset=event.offset,
            state="vmdesc",
        )
    ps = desc.get("page_size")
    page_size = ps if isinstance(ps, int) and not isinstance(ps, bool) else None
    return VmdescDocument(event.offset, desc, page_size)
