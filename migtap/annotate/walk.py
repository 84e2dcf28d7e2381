"""Decode one FULL section's vmstate payload field by field, driven by its vmdesc device entry.

The payload carries no lengths: only the vmdesc says how many bytes each field takes, so the
decoder is also what settles where a device section ends (``DecodedSection.consumed``). Pass it
the bytes from just after the FULL header; anything after the section (footer, later records) is
left alone.

Anything that doesn't fit the description raises :class:`DecodeError` (a
:class:`~migtap.errors.StreamError`) naming the device, the field path
(``"cpu.env.xmm_regs[3].xmm_q"``) and the absolute offset; running out of bytes raises
:class:`TruncatedPayload`, which is also a :class:`~migtap.errors.TruncatedStream`. No other
exception escapes :func:`decode_section`.

Wire encodings follow QEMU's ``vmstate-types.c`` (``docs/stream-format.md`` §4.3): integers are
big-endian, unsigned unless the type name is signed (``int8``/``int16``/``int32``/``int64``,
``int32 equal``, ``int32 le``, where "le" means less-or-equal, not little-endian). ``int64 equal``
is QEMU's ``vmstate_info_uint64_equal`` despite its name and is read unsigned.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias, Union

from migtap.errors import StreamError, TruncatedStream

from .vmsd import NESTED_INLINE_TYPES, DeviceDesc, FieldDesc, VmsdDesc

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "QEMU_VM_SUBSECTION",
    "VMS_NULLPTR_MARKER",
    "VMS_VALIDPTR_MARKER",
    "DecodeError",
    "DecodedSection",
    "Leaf",
    "Node",
    "Struct",
    "TruncatedPayload",
    "Value",
    "decode_section",
    "footer_at",
    "plain",
]

QEMU_VM_SUBSECTION = 0x05
QEMU_VM_SECTION_FOOTER = 0x7E
VMS_NULLPTR_MARKER = 0x30  # '0', a NULL element of an array of pointers
VMS_VALIDPTR_MARKER = 0x31  # '1' (11.1+ "ptr-marker"), the element follows
# What a "ptr-marker" leaf holds, as 11.1's analyze-migration.py -d state prints it.
_PTR_MARKERS = {VMS_NULLPTR_MARKER: "null-ptr", VMS_VALIDPTR_MARKER: "valid-ptr"}

SIGNED_INT_TYPES = frozenset({"int8", "int16", "int32", "int64", "int32 equal", "int32 le"})
UNSIGNED_INT_TYPES = frozenset(
    {
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "uint8 equal",
        "uint16 equal",
        "uint32 equal",
        "int64 equal",  # vmstate_info_uint64_equal: unsigned, whatever the name says
    }
)
INT_TYPES = SIGNED_INT_TYPES | UNSIGNED_INT_TYPES

NATURAL_SIZE: dict[str, int] = {
    "bool": 1,
    "int8": 1,
    "uint8": 1,
    "uint8 equal": 1,
    "int16": 2,
    "uint16": 2,
    "uint16 equal": 2,
    "int32": 4,
    "uint32": 4,
    "int32 equal": 4,
    "int32 le": 4,
    "uint32 equal": 4,
    "int64": 8,
    "uint64": 8,
    "int64 equal": 8,
    "timer": 8,
    "float64": 8,
    "CPU_Double_U": 8,
    "nullptr": 1,
    "ptr-marker": 1,
}

# Elements of size 0 could make a hostile array_len spin; beyond this many, refuse.
MAX_EMPTY_ELEMENTS = 1 << 16

_U8 = struct.Struct(">B")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_S8 = struct.Struct(">b")
_SBE16 = struct.Struct(">h")
_SBE32 = struct.Struct(">i")
_SBE64 = struct.Struct(">q")
_INT_CODECS: dict[tuple[int, bool], struct.Struct] = {
    (1, False): _U8,
    (2, False): _BE16,
    (4, False): _BE32,
    (8, False): _BE64,
    (1, True): _S8,
    (2, True): _SBE16,
    (4, True): _SBE32,
    (8, True): _SBE64,
}


class DecodeError(StreamError):
    """A device payload doesn't match its vmdesc entry."""

    def __init__(self, message: str, *, offset: int, device: str, field_path: str) -> None:
        super().__init__(
            f"{device}: {field_path}: {message}",
            offset=offset,
            state=f"field {field_path}",
            section=device,
        )
        self.device = device
        self.field_path = field_path


class TruncatedPayload(DecodeError, TruncatedStream):
    """The payload ended inside a described field."""


@dataclass(frozen=True, slots=True)
class Leaf:
    """One decoded scalar. ``offset`` is absolute (``base_offset`` + position in the payload).

    ``value`` is an ``int`` for integer types and ``timer`` (signed ns, -1 = not armed), a
    ``bool`` for ``bool``, ``None`` for a NULL pointer marker (``nullptr``), a ``str`` for
    ``capability`` and for an 11.1+ ``ptr-marker`` (``"null-ptr"`` or ``"valid-ptr"``), and
    ``bytes`` for everything else (buffers, bitmaps, floats, unknown types).
    """

    type: str
    size: int
    offset: int
    value: int | bool | bytes | str | None


@dataclass(frozen=True, slots=True)
class Struct:
    """A decoded vmsd body: the device itself, a ``struct`` element, a subsection, or a ``tmp``.

    ``kind`` is ``"device"``, ``"subsection"``, or the field type (``"struct"``, ``"tmp"``...).
    ``version`` is the wire version for subsections, the vmdesc one otherwise. ``raw`` keeps the
    element's bytes for ``tmp``/``vstruct`` (which ``analyze-migration.py`` shows as hex).
    """

    kind: str
    vmsd_name: str | None
    version: int | None
    offset: int
    size: int
    fields: dict[str, Node]
    raw: bytes | None = field(default=None, repr=False)


Node: TypeAlias = Union[Leaf, Struct, list["Node"]]  # noqa: UP007 (a recursive alias needs Union)
Value: TypeAlias = Union[int, bool, bytes, str, list["Value"], dict[str, "Value"], None]  # noqa: UP007


def plain(node: Node) -> Value:
    """A node as plain Python values: ints, bools, bytes, str, None, lists and dicts."""
    if isinstance(node, Leaf):
        return node.value
    if isinstance(node, Struct):
        return {name: plain(child) for name, child in node.fields.items()}
    return [plain(child) for child in node]


@dataclass(frozen=True, slots=True)
class DecodedSection:
    """The result of :func:`decode_section`.

    ``root`` is the device as a :class:`Struct` (field nodes carry types and absolute offsets);
    ``fields`` the same as plain values, subsections keyed by their vmsd name as
    ``analyze-migration.py`` does. ``consumed`` is the payload length: the footer (if any)
    starts at ``base_offset + consumed``.
    """

    desc: DeviceDesc
    root: Struct
    consumed: int
    base_offset: int

    @property
    def fields(self) -> dict[str, Value]:
        return {name: plain(child) for name, child in self.root.fields.items()}


def decode_section(desc: DeviceDesc, payload: Buffer, *, base_offset: int = 0) -> DecodedSection:
    """Decode the vmstate payload of one FULL section (bytes right after its header).

    ``payload`` may run past the section (the footer, later records); decoding stops where the
    description ends and reports it as ``consumed``. ``base_offset`` is the absolute stream
    offset of ``payload[0]``, used for node offsets and errors.
    """
    view = memoryview(payload).cast("B")
    walker = _Walker(view, base_offset, f"{desc.name} ({desc.instance_id})")
    try:
        fields = walker.vmsd(desc.body, desc.vmsd_name or desc.name)
    except RecursionError as exc:
        raise DecodeError(
            "description nests too deeply",
            offset=base_offset + walker.pos,
            device=walker.device,
            field_path=desc.name,
        ) from exc
    finally:
        view.release()
    root = Struct("device", desc.vmsd_name, desc.version, base_offset, walker.pos, fields)
    return DecodedSection(desc, root, walker.pos, base_offset)


def footer_at(payload: Buffer, pos: int, section_id: int) -> bool:
    """Whether ``payload[pos:]`` starts with the section footer ``0x7E`` + be32 ``section_id``."""
    view = memoryview(payload).cast("B")
    try:
        return (
            len(view) >= pos + 5
            and view[pos] == QEMU_VM_SECTION_FOOTER
            and _BE32.unpack_from(view, pos + 1)[0] == section_id
        )
    finally:
        view.release()


class _Walker:
    __slots__ = ("base", "device", "end", "pos", "view")

    def __init__(self, view: memoryview, base: int, device: str) -> None:
        self.view = view
        self.base = base
        self.device = device
        self.pos = 0
        self.end = len(view)

    def error(self, message: str, path: str, pos: int | None = None) -> DecodeError:
        where = self.pos if pos is None else pos
        return DecodeError(message, offset=self.base + where, device=self.device, field_path=path)

    def take(self, n: int, path: str) -> memoryview:
        if self.pos + n > self.end:
            raise TruncatedPayload(
                f"needs {n} bytes, {self.end - self.pos} left",
                offset=self.base + self.pos,
                device=self.device,
                field_path=path,
            )
        start = self.pos
        self.pos += n
        return self.view[start : self.pos]

    def unpack(self, codec: struct.Struct, path: str) -> int:
        start = self.pos
        self.take(codec.size, path)
        value: int = codec.unpack_from(self.view, start)[0]
        return value

    # -- vmsd bodies ------------------------------------------------------------------------

    def vmsd(self, body: VmsdDesc, path: str) -> dict[str, Node]:
        out: dict[str, Node] = {}
        for fdesc in body.fields:
            self.field(fdesc, path, out)
        for sub in body.subsections:
            name, node = self.subsection(sub, path)
            out[name] = node
        if body.vmsd_name is not None:
            self.no_undescribed_subsection(body.vmsd_name, path)
        return out

    def subsection(self, sub: VmsdDesc, path: str) -> tuple[str, Struct]:
        want = sub.vmsd_name or ""
        sub_path = f"{path}.{want}" if "." in path else want
        start = self.pos
        marker = self.unpack(_U8, sub_path)
        if marker != QEMU_VM_SUBSECTION:
            raise self.error(
                f"expected subsection {want!r} (0x05), found 0x{marker:02x}", sub_path, start
            )
        name_len = self.unpack(_U8, sub_path)
        name = bytes(self.take(name_len, sub_path)).decode("utf-8", "replace")
        if name != want:
            raise self.error(f"subsection {name!r} where vmdesc has {want!r}", sub_path, start)
        version = self.unpack(_BE32, sub_path)
        fields = self.vmsd(sub, sub_path)
        return name, Struct(
            "subsection", name, version, self.base + start, self.pos - start, fields
        )

    def no_undescribed_subsection(self, vmsd_name: str, path: str) -> None:
        """QEMU's loader would take a following 0x05 + "<vmsd_name>..." as a subsection."""
        pos, view = self.pos, self.view
        if pos + 2 > self.end or view[pos] != QEMU_VM_SUBSECTION:
            return
        name_len = view[pos + 1]
        prefix = vmsd_name.encode("utf-8", "replace")
        if name_len <= len(prefix) or pos + 2 + name_len > self.end:
            return
        name = bytes(view[pos + 2 : pos + 2 + name_len])
        if name.startswith(prefix):
            shown = name.decode("utf-8", "replace")
            raise self.error(f"subsection {shown!r} is on the wire but not in the vmdesc", path)

    # -- fields -----------------------------------------------------------------------------

    def field(self, fdesc: FieldDesc, path: str, out: dict[str, Node]) -> None:
        base_path = f"{path}.{fdesc.name}"
        if fdesc.array_len is not None:
            count = fdesc.array_len
            self.check_count(fdesc, count, base_path)
            elements: list[Node] = [self.element(fdesc, f"{base_path}[{i}]") for i in range(count)]
            self.store(out, fdesc.name, elements, is_array=True)
            return
        elem_path = base_path if fdesc.index is None else f"{base_path}[{fdesc.index}]"
        node = self.element(fdesc, elem_path)
        self.store(out, fdesc.name, node, is_array=fdesc.index is not None)

    def check_count(self, fdesc: FieldDesc, count: int, path: str) -> None:
        left = self.end - self.pos
        if fdesc.size == 0:
            if count > MAX_EMPTY_ELEMENTS:
                raise self.error(f"array_len {count} of empty elements is implausible", path)
        elif count > left:
            raise TruncatedPayload(
                f"array of {count} elements cannot fit in {left} bytes",
                offset=self.base + self.pos,
                device=self.device,
                field_path=path,
            )

    @staticmethod
    def store(out: dict[str, Node], name: str, node: Node, *, is_array: bool) -> None:
        """Same name again = the next element or segment of one array (10.0+ splits arrays)."""
        items = node if isinstance(node, list) else [node]
        if name not in out:
            out[name] = list(items) if is_array else node
            return
        previous = out[name]
        if not isinstance(previous, list):
            previous = out[name] = [previous]
        previous.extend(items)

    def element(self, fdesc: FieldDesc, path: str) -> Node:
        ftype = fdesc.type
        size = fdesc.size if fdesc.size is not None else NATURAL_SIZE.get(ftype)
        start = self.pos
        if ftype == "struct" or ftype in NESTED_INLINE_TYPES:
            return self.nested(fdesc, size, path)
        if size is None and ftype != "capability":
            raise self.error(f"type {ftype!r} has no size in the vmdesc", path)
        if ftype in INT_TYPES:
            assert size is not None
            value: int | bool | bytes | str | None = self.integer(
                size, signed=ftype in SIGNED_INT_TYPES, path=path
            )
        elif ftype == "bool":
            value = self.take(1, path)[0] != 0
            size = 1
        elif ftype == "timer":
            value = self.unpack(_SBE64, path)
            size = 8
        elif ftype == "nullptr":
            self.null_marker(path)
            value, size = None, 1
        elif ftype == "ptr-marker":
            # 11.1+: '0' (NULL) or '1' (the element follows as the next vmdesc entry).
            marker = self.unpack(_U8, path)
            if marker not in _PTR_MARKERS:
                raise self.error(
                    f"expected pointer marker 0x30 or 0x31, found 0x{marker:02x}", path
                )
            value, size = _PTR_MARKERS[marker], 1
        elif ftype == "capability":
            length = self.unpack(_U8, path)
            value = bytes(self.take(length, path)).decode("utf-8", "replace")
            size = 1 + length
        else:  # buffer, bitmap, float64 (its 8 BE bytes, not reinterpreted) and every type we
            # don't model: raw bytes of the described size
            assert size is not None
            value = bytes(self.take(size, path))
        return Leaf(ftype, size, self.base + start, value)

    def integer(self, size: int, *, signed: bool, path: str) -> int:
        codec = _INT_CODECS.get((size, signed))
        if codec is not None:
            return self.unpack(codec, path)
        return int.from_bytes(self.take(size, path), "big", signed=signed)

    def null_marker(self, path: str) -> None:
        start = self.pos
        marker = self.unpack(_U8, path)
        if marker != VMS_NULLPTR_MARKER:
            raise self.error(f"expected NULL marker 0x30, found 0x{marker:02x}", path, start)

    def nested(self, fdesc: FieldDesc, size: int | None, path: str) -> Node:
        start = self.pos
        body = fdesc.nested
        if body is None or (not body.fields and not body.subsections and size == 1):
            if body is not None:
                # 7.2-9.2: a NULL pointer element keeps type "struct" with an empty struct.
                self.null_marker(path)
                return Leaf("nullptr", 1, self.base + start, None)
            if size is None:
                raise self.error(f"{fdesc.type} has neither a description nor a size", path)
            return Leaf(fdesc.type, size, self.base + start, bytes(self.take(size, path)))
        fields = self.vmsd(body, path)
        used = self.pos - start
        if size is not None and used != size:
            raise self.error(
                f"{fdesc.type} {body.vmsd_name!r} used {used} bytes, vmdesc says {size}",
                path,
                start,
            )
        raw = None if fdesc.type == "struct" else bytes(self.view[start : self.pos])
        return Struct(
            fdesc.type, body.vmsd_name, body.version, self.base + start, used, fields, raw
        )
