"""Tell what a new connection carries from its first bytes (sans-IO).

Every QEMU channel arrives on the destination's one ``-incoming`` port (``docs/stream-format.md``
§1.1), so the tap peeks at most 4 bytes, as 8.0+ destinations do in
``migration_channel_identify``. Anything that is neither the main stream nor a multifd channel
(postcopy preempt, postcopy recovery, TLS, stray clients) is ``UNKNOWN`` to :func:`classify`;
``TLS`` and ``HTTP`` are told apart so the log can say why. A header-less channel can later be
identified as ``POSTCOPY_PREEMPT`` (``migtap.wire.preempt.looks_like_preempt``) by the tap.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from typing_extensions import Buffer

QEMU_VM_FILE_MAGIC: Final = b"QEVM"  # 0x5145564d, savevm.h
MULTIFD_MAGIC: Final = b"\x11\x22\x33\x44"  # 0x11223344, multifd.h
QEMU_CPR_FILE_MAGIC: Final = b"QCPR"  # 0x51435052, cpr.c (cpr-transfer, 10.0+)
TLS_HANDSHAKE: Final = 0x16  # TLS record content type "handshake"

CLASSIFY_BYTES: Final = 4
"""The longest prefix :func:`classify` ever needs."""

_MAGICS: Final = {
    QEMU_VM_FILE_MAGIC: "main",
    MULTIFD_MAGIC: "multifd",
    QEMU_CPR_FILE_MAGIC: "cpr",
}
_HTTP_METHODS: Final = (
    b"GET ",
    b"HEAD",
    b"POST",
    b"PUT ",
    b"DELE",
    b"OPTI",
    b"PATC",
    b"CONN",
    b"TRAC",
    b"PRI ",
)


class ChannelKind(StrEnum):
    MAIN = "main"  # QEVM stream (dst->src return path on the same socket)
    MULTIFD = "multifd"  # MultiFDInit then packets
    CPR = "cpr"  # cpr-transfer state (10.0+, normally a UNIX socket)
    TLS = "tls"  # a TLS handshake record: encrypted, passed through
    HTTP = "http"  # an HTTP request: not QEMU at all
    UNKNOWN = "unknown"  # postcopy preempt, postcopy recovery main, or garbage
    # Never returned by classify(): the tap sets it once looks_like_preempt() says so.
    POSTCOPY_PREEMPT = "postcopy-preempt"  # header-less RAM page records (postcopy-preempt)


def classify(prefix: Buffer) -> ChannelKind | None:
    """Classify a connection from its first bytes; ``None`` means "send more bytes".

    Decides as soon as the bytes rule out every other kind, and never needs more than
    :data:`CLASSIFY_BYTES`. Extra bytes beyond those are ignored.
    """
    head = bytes(memoryview(prefix).cast("B")[:CLASSIFY_BYTES])
    candidates = [*_MAGICS, *_HTTP_METHODS]
    if any(magic.startswith(head) for magic in candidates) and len(head) < CLASSIFY_BYTES:
        return None
    if head in _MAGICS:
        return ChannelKind(_MAGICS[head])
    if head in _HTTP_METHODS:
        return ChannelKind.HTTP
    return _classify_tls(head)


def _classify_tls(head: bytes) -> ChannelKind | None:
    # Record header: content type 0x16, legacy version 0x03 0x00..0x04 (SSL 3.0 to TLS 1.3).
    if not head or head[0] != TLS_HANDSHAKE:
        return ChannelKind.UNKNOWN
    if len(head) < 3:
        return None if head[1:] in (b"", b"\x03") else ChannelKind.UNKNOWN
    return ChannelKind.TLS if head[1] == 0x03 and head[2] <= 0x04 else ChannelKind.UNKNOWN
