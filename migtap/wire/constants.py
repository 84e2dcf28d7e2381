"""Wire constants of the QEMU migration main channel, named as QEMU names them.

Sources: ``migration/savevm.h`` and ``savevm.c`` (record types, commands), ``migration/ram.c``
(``ram.h`` from 10.0: RAM record flags). See ``docs/stream-format.md`` §2, §3, §7.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

QEMU_VM_FILE_MAGIC: Final = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION: Final = 0x00000003
QEMU_VM_FILE_VERSION_COMPAT: Final = 0x00000002  # rejected by QEMU as obsolete

#: ``7E`` + be32 section id.
SECTION_FOOTER_SIZE: Final = 5

#: Every RAM flag is below 0x400 and QEMU supports no target page below 1 KiB (``ram.h``).
RAM_SAVE_FLAG_MASK: Final = 0x3FF

#: XBZRLE encoding byte that precedes the be16 encoded length (``ENCODING_FLAG_XBZRLE``).
ENCODING_FLAG_XBZRLE: Final = 0x01


class SectionType(IntEnum):
    """Top-level record type byte (``QEMU_VM_*`` in ``savevm.h``)."""

    QEMU_VM_EOF = 0x00
    QEMU_VM_SECTION_START = 0x01
    QEMU_VM_SECTION_PART = 0x02
    QEMU_VM_SECTION_END = 0x03
    QEMU_VM_SECTION_FULL = 0x04
    QEMU_VM_SUBSECTION = 0x05
    QEMU_VM_VMDESCRIPTION = 0x06
    QEMU_VM_CONFIGURATION = 0x07
    QEMU_VM_COMMAND = 0x08
    QEMU_VM_SECTION_FOOTER = 0x7E


# Low bits of a RAM record header (``RAM_SAVE_FLAG_*``; ``FULL``, 0x001, unused since 2009).
RAM_SAVE_FLAG_ZERO: Final = 0x002
RAM_SAVE_FLAG_MEM_SIZE: Final = 0x004
RAM_SAVE_FLAG_PAGE: Final = 0x008
RAM_SAVE_FLAG_EOS: Final = 0x010
RAM_SAVE_FLAG_CONTINUE: Final = 0x020
RAM_SAVE_FLAG_XBZRLE: Final = 0x040
RAM_SAVE_FLAG_HOOK: Final = 0x080  # RDMA only
RAM_SAVE_FLAG_COMPRESS_PAGE: Final = 0x100  # 7.2 .. 9.0
RAM_SAVE_FLAG_MULTIFD_FLUSH: Final = 0x200  # 8.1+

#: The RAM handler's registration (``ram_mig_init``): idstr "ram", version 4.
RAM_IDSTR: Final = "ram"
RAM_VERSION: Final = 4


class MigCmd(IntEnum):
    """``enum qemu_vm_cmd`` (``savevm.c``)."""

    MIG_CMD_INVALID = 0
    MIG_CMD_OPEN_RETURN_PATH = 1
    MIG_CMD_PING = 2
    MIG_CMD_POSTCOPY_ADVISE = 3
    MIG_CMD_POSTCOPY_LISTEN = 4
    MIG_CMD_POSTCOPY_RUN = 5
    MIG_CMD_POSTCOPY_RAM_DISCARD = 6
    MIG_CMD_PACKAGED = 7
    MIG_CMD_ENABLE_COLO = 8
    MIG_CMD_POSTCOPY_RESUME = 9
    MIG_CMD_RECV_BITMAP = 10
    MIG_CMD_SWITCHOVER_START = 11  # 10.0+


#: ``MIG_CMD_MAX``: the loader refuses this command number and anything above.
MIG_CMD_MAX: Final = 12

#: Payload length the loader insists on (``mig_cmd_args``); None = variable.
MIG_CMD_LEN: Final[dict[MigCmd, int | None]] = {
    MigCmd.MIG_CMD_OPEN_RETURN_PATH: 0,
    MigCmd.MIG_CMD_PING: 4,
    MigCmd.MIG_CMD_POSTCOPY_ADVISE: None,  # 0 or 16
    MigCmd.MIG_CMD_POSTCOPY_LISTEN: 0,
    MigCmd.MIG_CMD_POSTCOPY_RUN: 0,
    MigCmd.MIG_CMD_POSTCOPY_RAM_DISCARD: None,
    MigCmd.MIG_CMD_PACKAGED: 4,
    MigCmd.MIG_CMD_ENABLE_COLO: 0,
    MigCmd.MIG_CMD_POSTCOPY_RESUME: 0,
    MigCmd.MIG_CMD_RECV_BITMAP: None,
    MigCmd.MIG_CMD_SWITCHOVER_START: 0,
}

#: ``MAX_DISCARDS_PER_COMMAND`` (``postcopy-ram.c``).
MAX_DISCARDS_PER_COMMAND: Final = 12

#: Configuration subsections (``vmstate_configuration`` in ``savevm.c``).
CONFIG_TARGET_PAGE_BITS: Final = "configuration/target-page-bits"
CONFIG_CAPABILITIES: Final = "configuration/capabilities"
CONFIG_UUID: Final = "configuration/uuid"

# multifd packet flags (``multifd.h``)
MULTIFD_FLAG_SYNC: Final = 1 << 0
MULTIFD_FLAG_COMPRESSION_MASK: Final = 0x3E  # 9.2+ width; 7.2-9.0 used 0x0E, 9.1 0x1E
MULTIFD_FLAG_NOCOMP: Final = 0 << 1
MULTIFD_FLAG_ZLIB: Final = 1 << 1
MULTIFD_FLAG_ZSTD: Final = 2 << 1
MULTIFD_FLAG_QPL: Final = 4 << 1  # 9.1+
MULTIFD_FLAG_UADK: Final = 8 << 1  # 9.1+
MULTIFD_FLAG_QATZIP: Final = 16 << 1  # 9.2+
MULTIFD_FLAG_DEVICE_STATE: Final = 1 << 6  # 10.0+
