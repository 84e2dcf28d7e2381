"""Render decoded sections: an ``analyze-migration.py -d state`` compatible dump, and log records.

:func:`state_dump` gives the same JSON shape and values as QEMU's ``scripts/analyze-migration.py
-d state`` for a whole stream: one key per START/FULL section, ``"<idstr> (<section_id>)"``, in
stream order. RAM is ``{"section sizes": {"<block>": "0x%016x"}}``. In a device, integers are
``"0x%0<2*size>x"`` hex strings, with ``" (<signed>)"`` after the unsigned hex when negative;
bools are JSON bools; every other leaf (buffers, bitmaps, timers, floats, unknown and opaque
types, ``tmp``) is its bytes as space-separated hex pairs; arrays are lists; structs and
subsections (keyed by their vmsd name) are objects. Serialise with
``json.dumps(d, indent=4, separators=(",", ": "))`` to get the script's text.

Decoding bugs of ``analyze-migration.py`` that this output does *not* reproduce:

1. ``read8`` is signed, so a counted string of 128+ bytes (idstr, subsection name, capability)
   gets a negative length and breaks the walk. We read the length as ``u8``.
2. ``uint8 equal`` and ``uint16 equal``, and ``int64 equal`` (QEMU's ``vmstate_info_uint64_equal``
   whatever its name), are read signed, so large values print as ``"0xff (-1)"``. We read them
   unsigned: ``"0xff"``.
3. 7.2-9.2 describe a NULL element of an array of pointers as type ``struct`` with an empty
   ``"struct": {}`` and size 1; the script raises "No fields in struct". We read the ``0x30``
   marker and print ``"nullptr"`` as the 10.0+ script does for type ``nullptr``. 11.1's type
   ``ptr-marker`` prints ``"null-ptr"`` or ``"valid-ptr"``, as 11.1's script does (that script
   also prints ``"null-ptr"`` for the older ``nullptr`` type, which no x86 device sends).
4. The subsection name read from the stream is never compared with the vmdesc, and a subsection
   on the wire that the vmdesc doesn't list is misread as whatever comes next. We check both and
   raise :class:`~migtap.annotate.walk.DecodeError`.
5. Struct element sizes are never checked against the vmdesc ``size``, so a wrong description
   desynchronises silently. We check every ``struct``/``tmp`` element.
6. A ``capability`` value has no ``getDict`` and isn't a ``VMSDFieldGeneric``, so it can't be
   JSON-encoded (TypeError). We print its string.
7. ``VMSDFieldStruct`` pops ``array_len`` out of the vmdesc while unfolding arrays, so the same
   description can't be read twice; our model is immutable.
8. In 7.2-8.1, ``read16/32/64`` are signed too: an ``instance_id`` of 2**31 or more turns into a
   ``KeyError`` (QEMU commit caea03279e). Lookups here use the unsigned ids the parser gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from migtap.errors import StreamError

from .walk import INT_TYPES, DecodedSection, DecodeError, Leaf, Node, Struct

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = ["DeviceState", "RamState", "annotated_record", "compact", "state_dump", "state_node"]


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A decoded FULL section and the section id it had on the wire."""

    section_id: int
    decoded: DecodedSection

    @property
    def idstr(self) -> str:
        return self.decoded.desc.name


@dataclass(frozen=True, slots=True)
class RamState:
    """The RAM section's block list (from its MEM_SIZE record): block name -> used length."""

    section_id: int
    block_sizes: Mapping[str, int]
    idstr: str = "ram"


def state_dump(
    sections: Iterable[DeviceState | RamState], *, expand_nested: bool = False
) -> dict[str, Any]:
    """``analyze-migration.py -d state`` output for these sections, in the order given.

    ``expand_nested`` shows ``tmp``/``vstruct`` fields as objects instead of the script's hex.
    A RAM section given again (PART/END) merges its block sizes into the first entry.
    """
    out: dict[str, Any] = {}
    for section in sections:
        key = f"{section.idstr} ({section.section_id})"
        if isinstance(section, RamState):
            sizes = {name: f"0x{length:016x}" for name, length in section.block_sizes.items()}
            entry = out.setdefault(key, {"section sizes": {}})
            entry["section sizes"].update(sizes)
        else:
            out[key] = {
                name: state_node(node, expand_nested=expand_nested)
                for name, node in section.decoded.root.fields.items()
            }
    return out


def _hex_pairs(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


def _hex_int(value: int, size: int) -> str:
    width = 2 * size
    if value < 0:
        return f"0x{value + (1 << (8 * size)):0{width}x} ({value})"
    return f"0x{value:0{width}x}"


def state_node(node: Node, *, expand_nested: bool = False) -> Any:  # noqa: ANN401 (JSON value)
    """One node as ``analyze-migration.py`` prints it."""
    if isinstance(node, list):
        return [state_node(child, expand_nested=expand_nested) for child in node]
    if isinstance(node, Struct):
        if node.raw is not None and not expand_nested:
            return _hex_pairs(node.raw)
        return {
            name: state_node(child, expand_nested=expand_nested)
            for name, child in node.fields.items()
        }
    return _state_leaf(node)


def _state_leaf(leaf: Leaf) -> Any:  # noqa: ANN401 (JSON value)
    value = leaf.value
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if leaf.type in INT_TYPES:
            return _hex_int(value, leaf.size)
        # timer: the script shows its 8 bytes
        return _hex_pairs(value.to_bytes(leaf.size, "big", signed=value < 0))
    if value is None:
        return "nullptr"
    if isinstance(value, str):
        return value
    return _hex_pairs(value)


def compact(node: Node) -> Any:  # noqa: ANN401 (JSON value)
    """A node as compact JSON: ints (signed per type), bools, null, bytes as one hex string."""
    if isinstance(node, list):
        return [compact(child) for child in node]
    if isinstance(node, Struct):
        return {name: compact(child) for name, child in node.fields.items()}
    value = node.value
    if isinstance(value, bytes):
        return value.hex()
    return value


def annotated_record(  # noqa: PLR0917 (mirrors the FULL header fields, in wire order)
    offset: int,
    idstr: str,
    instance_id: int,
    version_id: int,
    size: int | None,
    decoded: DecodedSection | StreamError | None,
) -> dict[str, Any]:
    """One JSON-serialisable line for the annotated log, describing one FULL section.

    ``decoded`` is the decode result, the error the decoder raised, or ``None`` when no vmdesc
    (or no entry in it) describes the section.
    """
    record: dict[str, Any] = {
        "offset": offset,
        "idstr": idstr,
        "instance_id": instance_id,
        "version_id": version_id,
        "size": size,
    }
    if decoded is None:
        record["decoded"] = False
        return record
    if isinstance(decoded, StreamError):
        error: dict[str, Any] = {
            "type": type(decoded).__name__,
            "message": str(decoded),
            "offset": decoded.offset,
        }
        if isinstance(decoded, DecodeError):
            error["field"] = decoded.field_path
        record["decoded"] = False
        record["error"] = error
        return record
    record["decoded"] = True
    record["vmsd_name"] = decoded.desc.vmsd_name
    if decoded.desc.version is not None and decoded.desc.version != version_id:
        record["vmdesc_version"] = decoded.desc.version
    record["payload_bytes"] = decoded.consumed
    record["fields"] = {name: compact(node) for name, node in decoded.root.fields.items()}
    return record
