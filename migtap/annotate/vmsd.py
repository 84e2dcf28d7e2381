"""A typed model of the VMDESCRIPTION JSON ("vmdesc") that QEMU sends after ``QEMU_VM_EOF``.

The vmdesc describes *this* stream exactly: one device object per FULL section, in emission order,
listing only the fields and subsections that were written (``docs/stream-format.md`` §4.2). A
device is matched to its FULL section by ``(name == idstr, instance_id)``; the idstr on the wire
already carries the qdev path (``"0000:00:01.3/piix4_pm"``), and so does the vmdesc ``name``.

Parsing is tolerant: unknown keys are kept in ``extra``; a missing ``size`` is allowed (the
walker then derives it from the type or fails for that field only); the 8.2+ top-level
``"configuration"`` object is parsed like any vmsd body. Malformed JSON or a wrong shape raises
:class:`VmDescriptionError`, a :class:`~migtap.errors.StreamError`, since the vmdesc is part of
QEMU's stream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from migtap.errors import StreamError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "NESTED_INLINE_TYPES",
    "DeviceDesc",
    "FieldDesc",
    "VmDescription",
    "VmDescriptionError",
    "VmsdDesc",
]

# Field types whose nested vmsd (vmsd_name/version/fields/subsections) is written straight into
# the field object rather than under "struct" (``docs/stream-format.md`` §4.2).
NESTED_INLINE_TYPES = frozenset({"tmp", "vstruct"})

_FIELD_KEYS = frozenset({"name", "type", "size", "array_len", "index", "struct"})
_VMSD_KEYS = frozenset({"vmsd_name", "version", "fields", "subsections"})
_DEVICE_KEYS = frozenset({"name", "instance_id", "size"}) | _VMSD_KEYS


class VmDescriptionError(StreamError):
    """The VMDESCRIPTION JSON is not JSON or not shaped like a vmdesc."""

    def __init__(self, message: str, *, offset: int = 0, path: str = "") -> None:
        super().__init__(message, offset=offset, state="vmdesc", section=path or None)
        self.path = path


@dataclass(frozen=True, slots=True)
class VmsdDesc:
    """A vmsd body: a device, a struct, a subsection, a ``tmp`` or the configuration."""

    vmsd_name: str | None
    version: int | None
    fields: tuple[FieldDesc, ...]
    subsections: tuple[VmsdDesc, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class FieldDesc:
    """One field object. ``size`` is the bytes written for ONE element (element 0 if compressed).

    ``nested`` holds the vmsd of a ``struct`` (from the ``"struct"`` key) or of a ``tmp``/
    ``vstruct`` (keys inline). ``array_len`` is set for a compressed array, ``index`` for one
    element of an uncompressed one.
    """

    name: str
    type: str
    size: int | None
    array_len: int | None = None
    index: int | None = None
    nested: VmsdDesc | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class DeviceDesc:
    """One device object: the vmsd body of one FULL section, keyed by ``(name, instance_id)``.

    Old-style devices (no vmsd; ``save_state`` callbacks) have ``vmsd_name is None`` and one
    ``buffer`` field called ``data`` of ``size`` bytes.
    """

    name: str
    instance_id: int
    body: VmsdDesc
    size: int | None = None

    @property
    def vmsd_name(self) -> str | None:
        return self.body.vmsd_name

    @property
    def version(self) -> int | None:
        return self.body.version

    @property
    def fields(self) -> tuple[FieldDesc, ...]:
        return self.body.fields

    @property
    def subsections(self) -> tuple[VmsdDesc, ...]:
        return self.body.subsections


@dataclass(frozen=True, slots=True)
class VmDescription:
    """The whole vmdesc: ``page_size``, devices in emission order, the 8.2+ configuration."""

    page_size: int
    devices: tuple[DeviceDesc, ...]
    configuration: VmsdDesc | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    _index: Mapping[tuple[str, int], DeviceDesc] = field(
        default_factory=dict, compare=False, repr=False
    )

    def find(self, idstr: str, instance_id: int) -> DeviceDesc | None:
        """The device described for the FULL section ``(idstr, instance_id)``, if any."""
        return self._index.get((idstr, instance_id))

    @classmethod
    def from_json(cls, data: Buffer | str | Mapping[str, Any], *, offset: int = 0) -> VmDescription:
        """Parse the JSON text (bytes or str) or an already-decoded mapping.

        ``offset`` is the stream offset of the JSON text, used only in error reports.
        """
        obj: object
        if isinstance(data, Mapping):
            obj = data
        else:
            try:
                text = data if isinstance(data, str) else bytes(memoryview(data)).decode("utf-8")
                obj = json.loads(text)
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise VmDescriptionError(f"vmdesc is not JSON: {exc}", offset=offset) from exc
        try:
            return _parse_top(obj)
        except _ShapeError as exc:
            raise VmDescriptionError(str(exc), offset=offset, path=exc.path) from exc
        except RecursionError as exc:
            raise VmDescriptionError("vmdesc nests too deeply", offset=offset) from exc


class _ShapeError(Exception):
    def __init__(self, message: str, path: str) -> None:
        super().__init__(f"{message} at {path or '<top>'}")
        self.path = path


def _obj(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _ShapeError(f"expected an object, got {type(value).__name__}", path)
    return value


def _int(value: object, path: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _ShapeError(f"expected an integer, got {value!r}", path)
    return value


def _req_int(value: object, path: str) -> int:
    result = _int(value, path)
    assert result is not None
    return result


def _str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _ShapeError(f"expected a string, got {value!r}", path)
    return value


def _list(value: object, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _ShapeError(f"expected a list, got {type(value).__name__}", path)
    return value


def _parse_top(obj: object) -> VmDescription:
    top = _obj(obj, "")
    page_size = _req_int(top.get("page_size"), "page_size")
    devices = tuple(
        _parse_device(dev, f"devices[{i}]")
        for i, dev in enumerate(_list(top.get("devices"), "devices"))
    )
    configuration = None
    if "configuration" in top:
        configuration = _parse_vmsd(_obj(top["configuration"], "configuration"), "configuration")
    index: dict[tuple[str, int], DeviceDesc] = {}
    for dev in devices:
        index.setdefault((dev.name, dev.instance_id), dev)
    extra = {k: v for k, v in top.items() if k not in {"page_size", "devices", "configuration"}}
    return VmDescription(page_size, devices, configuration, extra, index)


def _parse_device(value: object, path: str) -> DeviceDesc:
    dev = _obj(value, path)
    name = _str(dev.get("name"), f"{path}.name")
    instance_id = _req_int(dev.get("instance_id"), f"{path}.instance_id")
    body = _parse_vmsd(dev, f"{path}({name})", known=_DEVICE_KEYS)
    size = _int(dev.get("size"), f"{path}.size", optional=True)
    return DeviceDesc(name, instance_id, body, size)


def _parse_vmsd(
    obj: Mapping[str, Any], path: str, *, known: frozenset[str] = _VMSD_KEYS
) -> VmsdDesc:
    vmsd_name = obj.get("vmsd_name")
    if vmsd_name is not None:
        vmsd_name = _str(vmsd_name, f"{path}.vmsd_name")
    version = _int(obj.get("version"), f"{path}.version", optional=True)
    fields = tuple(
        _parse_field(f, f"{path}.fields[{i}]")
        for i, f in enumerate(_list(obj.get("fields"), f"{path}.fields"))
    )
    subsections = tuple(
        _parse_vmsd(_obj(s, f"{path}.subsections[{i}]"), f"{path}.subsections[{i}]")
        for i, s in enumerate(_list(obj.get("subsections"), f"{path}.subsections"))
    )
    extra = {k: v for k, v in obj.items() if k not in known}
    return VmsdDesc(vmsd_name, version, fields, subsections, extra)


def _parse_field(value: object, path: str) -> FieldDesc:
    obj = _obj(value, path)
    name = _str(obj.get("name"), f"{path}.name")
    ftype = _str(obj.get("type", "unknown"), f"{path}.type")
    size = _int(obj.get("size"), f"{path}.size", optional=True)
    array_len = _int(obj.get("array_len"), f"{path}.array_len", optional=True)
    index = _int(obj.get("index"), f"{path}.index", optional=True)
    if size is not None and size < 0:
        raise _ShapeError(f"negative size {size}", path)
    if array_len is not None and array_len < 0:
        raise _ShapeError(f"negative array_len {array_len}", path)
    nested = None
    known = _FIELD_KEYS
    if "struct" in obj:
        nested = _parse_vmsd(_obj(obj["struct"], f"{path}.struct"), f"{path}.struct")
    elif ftype in NESTED_INLINE_TYPES and "fields" in obj:
        nested = _parse_vmsd(obj, f"{path}<{ftype}>", known=_VMSD_KEYS | _FIELD_KEYS)
        known = _FIELD_KEYS | _VMSD_KEYS
    extra = {k: v for k, v in obj.items() if k not in known}
    return FieldDesc(name, ftype, size, array_len, index, nested, extra)
