"""Which QEMU wrote a stream: a version range worked out from what the stream shows.

A stream names no QEMU version. But the configuration record names the machine type, and a
QEMU runs no machine type newer than itself (``pc-q35-10.0`` means 10.0 or newer); and some
records exist only from, or only until, a known release (``docs/stream-format.md`` §8). Each
such sign narrows a ``[min, max]`` range and is kept as evidence, so a user can see why migtap
says "7.2 to 8.1".

``GenerationTracker`` is sans-IO: feed it the parser's events with the side that sent them
(the source writes the main and multifd channels, the destination the return path). It only
reads events; a sign it does not know changes nothing. The bounds are lower and upper bounds on
the *release* (major.minor); distribution backports are not modelled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from migtap.wire.constants import MigCmd
from migtap.wire.events import (
    Command,
    Configuration,
    MultifdDeviceState,
    MultifdPacket,
    Ping,
    RamMultifdFlush,
    RamPages,
    RpSwitchoverAck,
    SectionHeader,
)

if TYPE_CHECKING:
    from migtap.wire.vmdesc import VmdescDocument

Version = tuple[int, int]

# A versioned machine type ends in "-MAJOR.MINOR": pc-i440fx-7.2, pc-q35-10.0, virt-9.2,
# pseries-8.0, s390-ccw-virtio-10.0. Aliases ("pc", "q35") are resolved before they are sent.
_MACHINE_VERSION: Final = re.compile(r"-(\d{1,3})\.(\d{1,3})$")


def fmt_version(v: Version) -> str:
    return f"{v[0]}.{v[1]}"


@dataclass(frozen=True, slots=True)
class Evidence:
    """One sign in the stream and the bound it sets (``why`` cites ``docs/stream-format.md``)."""

    offset: int  # stream offset of the record that showed it (on its channel and direction)
    sign: str  # what was seen, e.g. "machine type pc-q35-10.0"
    min: Version | None = None
    max: Version | None = None
    why: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sign": self.sign, "offset": self.offset}
        if self.min is not None:
            out["min"] = fmt_version(self.min)
        if self.max is not None:
            out["max"] = fmt_version(self.max)
        if self.why:
            out["why"] = self.why
        return out


@dataclass(slots=True)
class Estimate:
    """The version range of one side's QEMU, and what it rests on."""

    min: Version | None = None
    max: Version | None = None
    evidence: list[Evidence] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return self.min is None or self.max is None or self.min <= self.max

    def text(self) -> str:
        """ "10.0 or newer", "7.2 to 8.1", "9.0 or older", "8.2", "unknown" or "inconsistent"."""
        lo, hi = self.min, self.max
        if not self.consistent:
            return "inconsistent"
        if lo is None and hi is None:
            return "unknown"
        if hi is None:
            assert lo is not None
            return f"{fmt_version(lo)} or newer"
        if lo is None:
            return f"{fmt_version(hi)} or older"
        if lo == hi:
            return fmt_version(lo)
        return f"{fmt_version(lo)} to {fmt_version(hi)}"

    def add(self, evidence: Evidence) -> bool:
        """Record a sign; True if it narrowed the range (first sign of its kind only)."""
        if any(e.sign == evidence.sign for e in self.evidence):
            return False
        self.evidence.append(evidence)
        before = (self.min, self.max)
        if evidence.min is not None and (self.min is None or evidence.min > self.min):
            self.min = evidence.min
        if evidence.max is not None and (self.max is None or evidence.max < self.max):
            self.max = evidence.max
        return (self.min, self.max) != before

    def as_dict(self) -> dict[str, Any]:
        return {
            "qemu": self.text(),
            "min": None if self.min is None else fmt_version(self.min),
            "max": None if self.max is None else fmt_version(self.max),
            "evidence": [e.as_dict() for e in self.evidence],
        }


@dataclass(frozen=True, slots=True)
class _Sign:
    """A kind of record that only some releases write."""

    sign: str
    min: Version | None = None
    max: Version | None = None
    why: str = ""

    def at(self, offset: int) -> Evidence:
        return Evidence(offset, self.sign, self.min, self.max, self.why)


_SWITCHOVER_ACK: Final = _Sign(
    "return path SWITCHOVER_ACK",
    min=(8, 1),
    why="switchover-ack capability (docs/stream-format.md §6.2)",
)
_COMPRESSED: Final = _Sign(
    "COMPRESS_PAGE records",
    max=(9, 0),
    why="the compress capability was removed in 9.1 (docs/stream-format.md §8)",
)
_MULTIFD_ZERO: Final = _Sign(
    "zero pages inside multifd packets",
    min=(9, 0),
    why="multifd zero-page detection (docs/stream-format.md §5.2)",
)
_SYNC_WITH_PAGES: Final = _Sign(
    "multifd SYNC packet carrying pages",
    max=(8, 2),
    why="SYNC packets are header-only from 9.0 (docs/stream-format.md §5.5)",
)
_DEVICE_STATE: Final = _Sign(
    "multifd device-state packet",
    min=(10, 0),
    why="VFIO state over multifd (docs/stream-format.md §5.3)",
)
_FLUSH: Final = _Sign(
    "RAM MULTIFD_FLUSH record",
    min=(8, 1),
    why="per-round multifd sync marker (docs/stream-format.md §3.2, §8)",
)
_SWITCHOVER_START: Final = _Sign(
    "SWITCHOVER_START command",
    min=(10, 0),
    why="send-switchover-start (docs/stream-format.md §1.2, §8)",
)
_BLOCK: Final = _Sign(
    "block migration section",
    max=(9, 0),
    why="block migration was removed in 9.1 (docs/stream-format.md §8)",
)

_MAPPED_RAM: Final = _Sign(
    "mapped-ram capability",
    min=(9, 0),
    why="a validated capability from 9.0 (docs/stream-format.md §2.3)",
)
_VMDESC_CONFIGURATION: Final = _Sign(
    "vmdesc describes the configuration",
    min=(8, 2),
    why="the vmdesc writer starts at the header from 8.2 (docs/stream-format.md §4.1)",
)
_VMDESC_NO_CONFIGURATION: Final = _Sign(
    "configuration record sent but not described in the vmdesc",
    max=(8, 1),
    why="8.2+ describes the configuration in the vmdesc (docs/stream-format.md §4.1)",
)
_NULLPTR: Final = _Sign(
    'vmdesc field of type "nullptr"',
    min=(10, 0),
    max=(11, 0),
    why="null-pointer markers are described as such from 10.0; 11.1 calls them ptr-marker"
    " (docs/stream-format.md §4.2)",
)
_PTR_MARKER: Final = _Sign(
    'vmdesc field of type "ptr-marker"',
    min=(11, 1),
    why="pointer markers ('0' null, '1' valid) replace nullptr in 11.1 (docs/compatibility.md)",
)
_ENABLE_COLO: Final = _Sign(
    "ENABLE_COLO command",
    max=(10, 2),
    why="command 8 is no longer sent from 11.0 (docs/compatibility.md)",
)
_PACKAGED_LOADED: Final = _Sign(
    "PING 0x42 in the postcopy package",
    min=(10, 2),
    why="QEMU_VM_PING_PACKAGED_LOADED, the postcopy-device state (docs/compatibility.md)",
)
_NVME: Final = _Sign(
    "NVMe controller state",
    min=(11, 1),
    why="NVMe controllers migrate from 11.1; earlier ones block migration (docs/compatibility.md)",
)


_COMMAND_SIGNS: Final = {
    MigCmd.MIG_CMD_SWITCHOVER_START: _SWITCHOVER_START,
    MigCmd.MIG_CMD_ENABLE_COLO: _ENABLE_COLO,
}
# The PING that ends a postcopy package (savevm.h, 10.2+); its PONG tells the source that the
# destination loaded the device state.
QEMU_VM_PING_PACKAGED_LOADED: Final = 0x42


def _record_sign(event: object) -> _Sign | None:  # noqa: PLR0911 - one return per sign
    """The version sign a source-side record is, if any."""
    if isinstance(event, RamPages):
        return _COMPRESSED if event.compressed else None
    if isinstance(event, MultifdPacket):
        if event.zero_pages:
            return _MULTIFD_ZERO
        return _SYNC_WITH_PAGES if event.sync and event.normal_pages else None
    if isinstance(event, MultifdDeviceState):
        return _DEVICE_STATE
    if isinstance(event, RamMultifdFlush):
        return _FLUSH
    if isinstance(event, Command):
        return _COMMAND_SIGNS.get(event.cmd)
    if isinstance(event, Ping):
        return _PACKAGED_LOADED if event.value == QEMU_VM_PING_PACKAGED_LOADED else None
    if isinstance(event, SectionHeader) and event.idstr is not None:
        if event.idstr == "block":
            return _BLOCK
        return _NVME if event.idstr.endswith("/nvme") else None
    return None


class GenerationTracker:
    """Narrows the source's and the destination's QEMU version from events (module docstring).

    ``observe(event, from_source=...)`` returns True when an estimate changed, so a caller can
    log the new range once per change rather than per event. The vmdesc's signs need its
    parsed JSON: pass that (:func:`migtap.wire.vmdesc.parse_vmdesc`) to ``observe_vmdesc``.
    """

    def __init__(self) -> None:
        self.source = Estimate()
        self.destination = Estimate()
        self.machine_type: str | None = None
        self._has_configuration = False

    def observe(self, event: object, *, from_source: bool = True) -> bool:
        if not from_source:
            if isinstance(event, RpSwitchoverAck):
                return self.destination.add(_SWITCHOVER_ACK.at(event.offset))
            return False
        if isinstance(event, Configuration):
            return self._on_configuration(event)
        sign = _record_sign(event)
        return sign is not None and self.source.add(sign.at(getattr(event, "offset", 0)))

    def _on_configuration(self, event: Configuration) -> bool:
        self._has_configuration = True
        self.machine_type = event.machine_type
        changed = False
        m = _MACHINE_VERSION.search(event.machine_type)
        if m is not None:
            changed |= self.source.add(
                Evidence(
                    event.offset,
                    f"machine type {event.machine_type}",
                    min=(int(m[1]), int(m[2])),
                    why="a QEMU runs no machine type newer than itself",
                )
            )
        if event.capabilities and "mapped-ram" in event.capabilities:
            changed |= self.source.add(_MAPPED_RAM.at(event.offset))
        return changed

    def observe_vmdesc(self, doc: VmdescDocument) -> bool:
        """The source's vmdesc, parsed; True if an estimate changed. Call it after the events
        before the vmdesc (the configuration record) were observed."""
        desc = doc.desc
        changed = False
        if "configuration" in desc:
            changed |= self.source.add(_VMDESC_CONFIGURATION.at(doc.offset))
        elif self._has_configuration:
            changed |= self.source.add(_VMDESC_NO_CONFIGURATION.at(doc.offset))
        for ftype, sign in (("nullptr", _NULLPTR), ("ptr-marker", _PTR_MARKER)):
            if _has_field_type(desc.get("devices"), ftype):
                changed |= self.source.add(sign.at(doc.offset))
        return changed


def _has_field_type(node: object, wanted: str) -> bool:
    """Whether any field anywhere in a vmdesc (sub)tree has ``"type": wanted``."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("type") == wanted and "name" in item:
                return True
            stack.extend(v for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend(item)
    return False
