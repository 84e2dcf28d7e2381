"""Will a stream's device sections load on a target QEMU? Its vmdesc against the target's
``-dump-vmstate`` JSON, sans-IO (``migtap check`` runs QEMU and reads the files; docs/check.md).

The two documents describe different things:

- the stream's vmdesc (:mod:`migtap.annotate.vmsd`) lists, per FULL section, the fields the
  *source* wrote: names, a type name, the bytes of one element on the wire, array lengths,
  nested structs and the subsections it sent;
- the target's dump lists, per device *class* of the binary, the vmsd it loads: every field it
  may read with the version it appeared in (``version_id``), whether a runtime test decides
  (``field_exists``), its size in the C struct (``size``; the wire size for scalars and fixed
  buffers, not for structs, pointers or variable buffers), 10.0's ``num`` for fixed arrays,
  nested structs (``Description``) and every subsection it knows. It names no scalar type.

The target loads a section (QEMU's ``vmstate_load_state``) by walking its own fields: a field
without a test is read when its ``version_id`` is at most the stream's version; a field with a
test is read when the test says so, which only runtime state tells. So the comparison aligns the
stream's fields with the target's: untested fields must come next on the wire, tested ones may
or may not (both are tried; a match wins). Structs are loaded with the target's own struct
version, subsections with the version the stream gives them.

A vmsd that the dump does not list is either a device type the target lacks (``fails``) or one
that QEMU registers outside any device class, which ``-dump-vmstate`` never lists
(:data:`UNLISTED_VMSDS`, ``unknown``). Old-style sections (no vmsd) are ``unknown`` too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from typing import Any, Final

from migtap.errors import MigtapError

from .vmsd import NESTED_INLINE_TYPES, DeviceDesc, FieldDesc, VmDescription, VmsdDesc
from .walk import NATURAL_SIZE

__all__ = [
    "UNLISTED_VMSDS",
    "DumpError",
    "Finding",
    "SectionCheck",
    "TargetDump",
    "TargetField",
    "TargetVmsd",
    "Verdict",
    "check_device",
    "check_vmdesc",
]

#: vmsds that QEMU registers with ``vmstate_register`` (core, machine or per-CPU state, or a
#: device registering another vmsd than its class's): ``-dump-vmstate`` walks device classes
#: only, so it never lists them and cannot say whether the target loads them. Found by checking
#: real captures against QEMU 7.2 and 10.0 dumps (tests/qemu/test_check.py).
UNLISTED_VMSDS: Final = frozenset(
    {
        "timer",  # the clock offsets (cpu-timers.c)
        "cpu_common",  # per CPU (cpu-target.c)
        "cpu",  # the x86 CPU's legacy vmsd
        "apic",  # registered by apic_common_realize
        "PCIBUS",  # per PCI bus
        "i2c_bus",
        "acpi_build",
        "globalstate",  # the run state (migration/global_state.c)
        "ide",  # QEMU 7.2's piix IDE registers vmstate_ide_pci itself
        "configuration",
    }
)

#: Types whose wire size per element is the field's size in the target's C struct, so that a
#: size difference in the dump is a wire difference.
_SIZED_TYPES: Final = frozenset(NATURAL_SIZE) - {"nullptr", "ptr-marker"} | {
    "unused_buffer",
    "buffer",
}
_STRUCT_TYPES: Final = NESTED_INLINE_TYPES | {"struct"}


_DUP_SUFFIX: Final = re.compile(r"(.+)\[(\d+)\]")


@dataclass(frozen=True, slots=True)
class Finding:
    """One difference: ``fails`` when the target would not load the stream because of it,
    else a note on a difference QEMU tolerates (a renamed field, an empty variable array)."""

    fails: bool
    text: str


def _fail(text: str) -> Finding:
    return Finding(fails=True, text=text)


def _note(text: str) -> Finding:
    return Finding(fails=False, text=text)


class Verdict(StrEnum):
    OK = "ok"
    FAILS = "fails"
    UNKNOWN = "unknown"


class DumpError(MigtapError):
    """The target's ``-dump-vmstate`` output is not JSON of the expected shape."""


@dataclass(frozen=True, slots=True)
class TargetField:
    """One field of a target vmsd, as ``-dump-vmstate`` lists it."""

    name: str
    version_id: int
    tested: bool  # field_exists: a runtime test decides whether it is on the wire
    size: int
    num: int | None = None  # fixed array length (QEMU 9.1+ dumps only)
    struct: TargetVmsd | None = None


@dataclass(frozen=True, slots=True)
class TargetVmsd:
    """A vmsd the target loads: a device's, a struct's or a subsection's."""

    name: str
    version_id: int
    minimum_version_id: int
    fields: tuple[TargetField, ...] = ()
    subsections: tuple[TargetVmsd, ...] = ()


@dataclass(frozen=True, slots=True)
class TargetDump:
    """The parsed ``-dump-vmstate`` JSON: device vmsds by vmsd name (several device types may
    share one vmsd name, with the same or different bodies) and the machine type."""

    machine: str | None
    vmsds: Mapping[str, tuple[TargetVmsd, ...]]

    @classmethod
    def from_json(cls, obj: object) -> TargetDump:
        """From the decoded JSON object; raises :class:`DumpError` when it is not one."""
        if not isinstance(obj, Mapping):
            raise DumpError("the -dump-vmstate output is not a JSON object")
        machine = None
        vmsds: dict[str, list[TargetVmsd]] = {}
        try:
            for type_name, entry in obj.items():
                if type_name == "vmschkmachine":
                    name = entry.get("Name") if isinstance(entry, Mapping) else None
                    machine = name if isinstance(name, str) else None
                    continue
                if not isinstance(entry, Mapping) or "Description" not in entry:
                    continue  # a device type without a vmsd
                vmsd = _target_vmsd(entry["Description"])
                same = vmsds.setdefault(vmsd.name, [])
                if vmsd not in same:
                    same.append(vmsd)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise DumpError(f"the -dump-vmstate output is not shaped as expected: {exc!r}") from exc
        return cls(machine, {k: tuple(v) for k, v in vmsds.items()})


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _target_vmsd(desc: Mapping[str, Any]) -> TargetVmsd:
    return TargetVmsd(
        name=str(desc["name"]),
        version_id=_int(desc["version_id"]),
        minimum_version_id=_int(desc.get("minimum_version_id", 0)),
        fields=tuple(_target_field(f) for f in desc.get("Fields", ())),
        subsections=tuple(_target_vmsd(s) for s in desc.get("Subsections", ())),
    )


def _target_field(f: Mapping[str, Any]) -> TargetField:
    num = f.get("num")
    return TargetField(
        name=str(f["field"]),
        version_id=_int(f.get("version_id", 0)),
        tested=bool(f.get("field_exists", False)),
        size=_int(f.get("size", 0)),
        num=_int(num) if num is not None else None,
        struct=_target_vmsd(f["Description"]) if "Description" in f else None,
    )


@dataclass(frozen=True, slots=True)
class SectionCheck:
    """The verdict on one section, with the reasons (empty for a plain ``ok``)."""

    idstr: str
    instance_id: int | None
    vmsd_name: str | None
    version: int | None
    verdict: Verdict
    reasons: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "idstr": self.idstr,
            "instance_id": self.instance_id,
            "vmsd_name": self.vmsd_name,
            "version": self.version,
            "verdict": str(self.verdict),
            "reasons": list(self.reasons),
        }


def check_vmdesc(desc: VmDescription, dump: TargetDump) -> list[SectionCheck]:
    """One :class:`SectionCheck` per device of the vmdesc, in the stream's order."""
    return [check_device(dev, dump) for dev in desc.devices]


def check_device(dev: DeviceDesc, dump: TargetDump) -> SectionCheck:
    """Would the target load this FULL section (as far as the two descriptions tell)?"""

    def result(verdict: Verdict, *reasons: str) -> SectionCheck:
        return SectionCheck(dev.name, dev.instance_id, dev.vmsd_name, dev.version, verdict, reasons)

    if dev.vmsd_name is None:
        return result(
            Verdict.UNKNOWN, "old-style section (save_state callbacks, no vmsd): not comparable"
        )
    if dev.version is None:
        return result(Verdict.UNKNOWN, "the vmdesc gives no version for this section")
    candidates = dump.vmsds.get(dev.vmsd_name, ())
    if not candidates:
        if dev.vmsd_name in UNLISTED_VMSDS:
            return result(
                Verdict.UNKNOWN,
                f"vmsd {dev.vmsd_name!r} is registered outside device classes: "
                "-dump-vmstate does not list it",
            )
        return result(Verdict.FAILS, f"the target has no device type with vmsd {dev.vmsd_name!r}")
    best: list[Finding] | None = None
    for target in candidates:
        found = _compare(dev.body, target, dev.version, dev.vmsd_name, top=True)
        if best is None or (_failures(found), len(found)) < (_failures(best), len(best)):
            best = found
        if not found:
            break
    assert best is not None
    failed = [f.text for f in best if f.fails]
    notes = [f.text for f in best if not f.fails]
    return result(Verdict.FAILS if failed else Verdict.OK, *failed, *notes)


def _compare(
    stream: VmsdDesc, target: TargetVmsd, version: int, path: str, *, top: bool = False
) -> list[Finding]:
    """What keeps the target from loading ``stream`` (read with ``version``), and notes."""
    what = "section" if top else "subsection"
    if version > target.version_id:
        return [
            _fail(
                f"{path}: {what} version {version} is newer than the target's {target.version_id}"
            )
        ]
    if version < target.minimum_version_id:
        return [
            _fail(
                f"{path}: {what} version {version} is older than the target's "
                f"minimum {target.minimum_version_id}"
            )
        ]
    found = _compare_fields(stream.fields, target, version, path)
    found += _compare_subsections(stream.subsections, target, path)
    return found


def _compare_subsections(subs: Sequence[VmsdDesc], target: TargetVmsd, path: str) -> list[Finding]:
    known = {s.name: s for s in target.subsections}
    found: list[Finding] = []
    for sub in subs:
        name = sub.vmsd_name or "?"
        tsub = known.get(name)
        if tsub is None:
            found.append(_fail(f"{path}: subsection {name!r} is unknown to the target"))
            continue
        if sub.version is None:
            continue
        found += _compare(sub, tsub, sub.version, f"{path}/{name.rsplit('/', 1)[-1]}")
    return found


def _group_len(fields: Sequence[FieldDesc], at: int) -> int:
    """How many vmdesc entries from ``at`` are one field: the elements of an array that the
    source did not compress into one entry follow each other under one name (7.2 numbers them
    with ``index``; 10.0 gives ``index`` 0 to the first only, and may split an array of
    pointers into runs of NULL and non-NULL elements). Same-named fields of one vmsd are told
    apart by a ``[k]`` suffix, so consecutive entries of one name are one field."""
    n = 1
    while at + n < len(fields) and fields[at + n].name == fields[at].name:
        n += 1
    return n


def _base_name(name: str) -> str:
    """The field name without the ``[k]`` QEMU adds to the k-th of same-named fields."""
    m = _DUP_SUFFIX.fullmatch(name)
    return m.group(1) if m else name


def _failures(found: Sequence[Finding]) -> int:
    return sum(1 for f in found if f.fails)


def _compare_fields(
    stream: Sequence[FieldDesc], target: TargetVmsd, version: int, path: str
) -> list[Finding]:
    tfields = target.fields

    @cache
    def align(ti: int, si: int) -> tuple[Finding, ...]:
        """Findings for the fields from target index ``ti`` and stream index ``si`` on: the
        fewest failures (then notes) over the choices that tested fields, renamed fields and
        empty variable arrays leave open."""
        if ti == len(tfields):
            if si == len(stream):
                return ()
            rest = ", ".join(repr(f.name) for f in stream[si : si + 3])
            return (
                _fail(
                    f"{path}: the stream has fields the target does not read "
                    f"at version {version}, from {rest}"
                ),
            )
        tf = tfields[ti]
        if not tf.tested and tf.version_id > version:
            return align(ti + 1, si)  # from a later version: not read
        options: list[tuple[Finding, ...]] = []
        if tf.tested:
            options.append(align(ti + 1, si))  # its test says no
        if si < len(stream):
            n = _group_len(stream, si)
            taken = _take(stream[si : si + n], tf, path)
            if taken is not None:
                options.append(
                    (*taken, *(() if taken and taken[0].fails else align(ti + 1, si + n)))
                )
        elif not tf.tested:
            options.append(
                (
                    _fail(
                        f"{path}: the target reads field {tf.name!r} "
                        f"({_target_kind(tf)}) after the stream's last field"
                    ),
                )
            )
        if not tf.tested and tf.num is None and tf.struct is not None:
            # A variable array with no element leaves no trace in the vmdesc (nor on the wire).
            # Only arrays of structs are given the benefit of the doubt: for a scalar the dump
            # cannot tell an array from a single field, and a missing field is a real break.
            note = _note(
                f"{path}: field {tf.name!r} is not in the stream: taken for "
                "a variable array with no element"
            )
            options.append((note, *align(ti + 1, si)))
        return min(options, key=lambda found: (_failures(found), len(found)))

    return list(align(0, 0))


def _take(group: Sequence[FieldDesc], tf: TargetField, path: str) -> tuple[Finding, ...] | None:
    """Findings when the target reads ``tf`` from the stream's next field (``group``: all its
    entries), or None when a tested target field does not match it (its test said no)."""
    got = group[0]
    here = _compare_field(group, tf, f"{path}.{tf.name}")
    if tf.name in {got.name, _base_name(got.name)}:
        return tuple(here)
    if tf.tested:
        return None
    if here:  # not a rename: a different field
        return (
            _fail(
                f"{path}: field {tf.name!r} ({_target_kind(tf)}) expected where the "
                f"stream has {got.name!r} ({_stream_kind(got)})"
            ),
        )
    return (
        _note(
            f"{path}: field {got.name!r} of the stream is {tf.name!r} on the target "
            "(same size and kind)"
        ),
    )


def _is_struct(f: FieldDesc) -> bool:
    return f.nested is not None or f.type in _STRUCT_TYPES


def _stream_kind(f: FieldDesc) -> str:
    if _is_struct(f):
        name = f.nested.vmsd_name if f.nested is not None else None
        return f"struct {name!r}" if name else "a struct"
    return f"{f.type}, {f.size} bytes" if f.size is not None else f.type


def _target_kind(f: TargetField) -> str:
    return f"struct {f.struct.name!r}" if f.struct is not None else f"{f.size} bytes"


def _compare_field(group: Sequence[FieldDesc], tf: TargetField, path: str) -> list[Finding]:
    """The failures of one field (all the vmdesc entries of it) against the target's."""
    first = group[0]
    found: list[Finding] = []
    count = sum(e.array_len if e.array_len is not None else 1 for e in group)
    if tf.num is not None and tf.num > 0 and count != tf.num:
        found.append(_fail(f"{path}: {count} elements in the stream, {tf.num} on the target"))
    if _is_struct(first) != (tf.struct is not None):
        found.append(
            _fail(
                f"{path}: type differs: {_stream_kind(first)} in the "
                f"stream, {_target_kind(tf)} on the target"
            )
        )
        return found
    if tf.struct is not None:
        seen: list[VmsdDesc] = []
        for element in group:
            if element.nested is None or element.nested in seen:
                continue
            seen.append(element.nested)
            where = f"{path}[{element.index}]" if element.index is not None else path
            found += _compare_struct(element.nested, tf.struct, where)
        return found
    if (
        first.type in _SIZED_TYPES
        and first.size is not None
        and tf.size > 0
        and first.size != tf.size
    ):
        found.append(
            _fail(
                f"{path}: size differs: {first.size} bytes ({first.type}) "
                f"in the stream, {tf.size} on the target"
            )
        )
    return found


def _compare_struct(stream: VmsdDesc, target: TargetVmsd, path: str) -> list[Finding]:
    """A struct is loaded with the target's own struct version, not the stream's."""
    found = _compare_fields(stream.fields, target, target.version_id, path)
    found += _compare_subsections(stream.subsections, target, path)
    return found
