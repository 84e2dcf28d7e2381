"""Sans-IO incremental parser of the QEMU migration main channel (source -> destination).

    parser = StreamParser(page_size=4096)
    for chunk in chunks:
        events = parser.feed(chunk)
    events = parser.feed_eof()

Errors follow :class:`migtap.wire.parser.Parser`: a call that meets bytes breaking the format
raises one ``StreamError`` (offset, state, what was expected) whose ``events`` are the events
that same call produced before the damage. After that the parser stays failed: every later
``feed`` or ``feed_eof`` raises. Anything but a ``StreamError`` escaping is a parser bug.

See ``docs/stream-format.md`` §2 (records), §3 (RAM), §7 (commands), §9 (inference), and QEMU's
``migration/savevm.c``. This module dispatches records; RAM records are read by
``migtap.wire.ram``, commands and PACKAGED blobs by ``migtap.wire.commands``, the end of a
section without length is found by ``migtap.wire.footer``, the VMDESCRIPTION is collected by
``migtap.wire.vmdesc``.
"""

from __future__ import annotations

import struct
from enum import StrEnum, auto
from typing import TYPE_CHECKING, Final, Literal, NoReturn

from typing_extensions import Buffer as BufferLike

from migtap.errors import StreamError, TruncatedStream, UnsupportedStream
from migtap.wire.buffer import Buffer, LimitCrossed, NeedData
from migtap.wire.commands import Blobs, ascii_field, decode_command, read_command
from migtap.wire.constants import (
    CONFIG_CAPABILITIES,
    CONFIG_TARGET_PAGE_BITS,
    CONFIG_UUID,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    RAM_IDSTR,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MASK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_VERSION,
    SECTION_FOOTER_SIZE,
    MigCmd,
    SectionType,
)
from migtap.wire.events import (
    Configuration,
    DeviceState,
    EndOfState,
    Event,
    PackagedEnd,
    PostcopyAdvise,
    RamBlock,
    RamBlockList,
    RamEndOfSection,
    SectionFooter,
    SectionHeader,
    StreamHeader,
    Unparsed,
)
from migtap.wire.footer import find_footer, printable
from migtap.wire.ram import RamFormatError, RamReader, RamStats
from migtap.wire.vmdesc import VmdescCollector

if TYPE_CHECKING:
    from collections.abc import Callable

#: Largest FULL (device) section payload kept while looking for its footer.
MAX_DEVICE_SECTION: Final = 16 << 20
#: Largest machine-type name in the configuration record.
MAX_MACHINE_TYPE: Final = 1024
#: Most capabilities in the configuration's capabilities subsection.
MAX_CAPABILITIES: Final = 256
#: Most RAM blocks in a MEM_SIZE list.
MAX_RAM_BLOCKS: Final = 65536
#: Largest unconsumed tail kept between feeds (a COMMAND payload is at most 65535 bytes).
MAX_PENDING: Final = 1 << 17

_SECTION_WITH_HEADER: Final = (SectionType.QEMU_VM_SECTION_START, SectionType.QEMU_VM_SECTION_FULL)

_KNOWN_MAGICS: Final = {
    b"GET ": "an HTTP request",
    b"POST": "an HTTP request",
    b"PUT ": "an HTTP request",
    b"HEAD": "an HTTP request",
    b"HTTP": "an HTTP response",
    b"SSH-": "an SSH banner",
    b"\x11\x22\x33\x44": "a multifd channel (MULTIFD_MAGIC)",
    b"QCPR": "a CPR channel (QEMU_CPR_FILE_MAGIC)",
}


_MISPLACED: Final[dict[int, str]] = {
    SectionType.QEMU_VM_CONFIGURATION: "QEMU_VM_CONFIGURATION is only valid after the file header",
    SectionType.QEMU_VM_VMDESCRIPTION: "QEMU_VM_VMDESCRIPTION is only valid after QEMU_VM_EOF",
    SectionType.QEMU_VM_SECTION_FOOTER: "QEMU_VM_SECTION_FOOTER outside a section",
    SectionType.QEMU_VM_SUBSECTION: "QEMU_VM_SUBSECTION outside a device section",
}


class State(StrEnum):
    """What the parser expects next (the value is the lower-case name)."""

    HEADER = auto()  # file header: magic, version
    CONFIGURATION = auto()  # optional CONFIGURATION record right after the header
    CONFIG_SUBSECTIONS = auto()  # configuration subsections, if any
    RECORDS = auto()  # a top-level record type byte
    RAM_BLOCKS = auto()  # one entry of a MEM_SIZE block list
    RAM = auto()  # RAM records of a START/PART/END section of "ram"
    FOOTER = auto()  # footer after a section whose end is known (detects footers)
    DEVICE = auto()  # payload of a section without length: scan for its footer
    AFTER_EOF = auto()  # after QEMU_VM_EOF: VMDESCRIPTION or the end
    VMDESC = auto()  # the vmdesc JSON
    DONE = auto()  # nothing more may come
    OPAQUE = auto()  # framing lost without proof of damage: the rest is Unparsed
    ERROR = auto()


class _Section:
    __slots__ = ("idstr", "instance_id", "version_id")

    def __init__(self, idstr: str, instance_id: int, version_id: int) -> None:
        self.idstr = idstr
        self.instance_id = instance_id
        self.version_id = version_id


class StreamParser:
    """Incremental parser of one main-channel stream (see the module docstring).

    ``page_size`` is the target page size used for PAGE payloads until the stream says
    otherwise in band (configuration ``target-page-bits``, ``POSTCOPY_ADVISE``).
    ``start="records"`` starts between two top-level records (a slice of a stream, a
    postcopy-recovery channel); ``offset`` is then the stream offset of the first byte fed.
    ``footers`` forces section footers on/off; None detects them after the first RAM EOS
    (and assumes them on for sections met before that).
    """

    def __init__(
        self,
        page_size: int = 4096,
        *,
        start: Literal["header", "records"] = "header",
        offset: int = 0,
        footers: bool | None = None,
    ) -> None:
        if page_size < 1024 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1024, not {page_size}")
        self._b = Buffer(offset)
        self._ram = RamReader(page_size)
        self._fragment = start == "records"
        self._state = State.RECORDS if self._fragment else State.HEADER
        self._footers = footers
        self._sections: dict[int, _Section] = {}
        self._ram_section_id: int | None = None
        self._blobs = Blobs()  # the open PACKAGED blobs
        self._eof = False
        self._ended_inside = False  # the stream ended inside a section without length
        self._error: StreamError | None = None
        # the record being read
        self._rec_offset = offset
        self._cur_id = 0
        self._cur_kind = SectionType.QEMU_VM_SECTION_FULL
        self._cur: _Section | None = None
        self._dev = bytearray()
        self._dev_offset = 0
        self._mem_total = 0
        self._mem_sum = 0
        self._mem_blocks: list[RamBlock] = []
        #: The last complete MEM_SIZE block list (the postcopy-preempt channel refers to it).
        self.ram_blocks: tuple[RamBlock, ...] = ()
        self._config: dict[str, object] = {}
        self._vmdesc = VmdescCollector()
        self._postcopy_hugepages = False
        self._ignore_shared = False
        self._handlers: dict[State, Callable[[list[Event]], bool]] = {
            State.HEADER: self._st_header,
            State.CONFIGURATION: self._st_configuration,
            State.CONFIG_SUBSECTIONS: self._st_config_subsections,
            State.RECORDS: self._st_records,
            State.RAM_BLOCKS: self._st_ram_blocks,
            State.RAM: self._st_ram,
            State.FOOTER: self._st_footer,
            State.DEVICE: self._st_device,
            State.AFTER_EOF: self._st_after_eof,
            State.VMDESC: self._st_vmdesc,
            State.DONE: self._st_done,
            State.OPAQUE: self._st_opaque,
        }

    # -- public API ---------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def offset(self) -> int:
        """Stream offset of the first byte not yet consumed."""
        return self._b.offset

    @property
    def page_size(self) -> int:
        return self._ram.page_size

    @property
    def ram_stats(self) -> RamStats:
        return self._ram.stats

    @property
    def footers(self) -> bool | None:
        return self._footers

    @property
    def error(self) -> StreamError | None:
        """The ``StreamError`` that stopped the parser, if one did."""
        return self._error

    def feed(self, data: BufferLike) -> list[Event]:
        """Parse the next bytes of the stream; return the events they complete."""
        self._check_usable()
        out: list[Event] = []
        if isinstance(data, bytes):
            self._parse(data, out)
            return out
        with memoryview(data) as view:
            flat = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
            with flat:
                self._parse(flat, out)
        return out

    def feed_eof(self) -> list[Event]:
        """The stream has ended: finish what can be finished, raise if it ended too early."""
        self._check_usable()
        out: list[Event] = []
        self._eof = True
        self._parse(b"", out)
        self._check_end(out)
        return out

    def _check_usable(self) -> None:
        if self._error is not None:
            raise StreamError(
                f"stream parser stopped by an earlier error: {self._error}",
                offset=self.offset,
                state=State.ERROR,
            ) from self._error
        if self._eof:
            raise StreamError("stream parser fed after feed_eof()", offset=self.offset, state="end")

    # -- driving ------------------------------------------------------------------------------
    def _parse(self, data: bytes | memoryview, out: list[Event]) -> None:
        b = self._b
        b.load(data)
        try:
            self._run(out)
        except StreamError as exc:
            self._fail(exc, out)
        except LimitCrossed as exc:
            err = StreamError(
                "record runs past the end of the PACKAGED blob",
                offset=self._b.offset,
                state=self._state.name.lower(),
            )
            self._fail(err, out, exc)
        except RamFormatError as exc:
            cls = UnsupportedStream if exc.unsupported else StreamError
            err = cls(str(exc), offset=exc.offset, state="ram record", section=RAM_IDSTR)
            self._fail(err, out, exc)
        finally:
            pending = b.unload()
        if pending > MAX_PENDING:
            err = StreamError(
                f"{pending} bytes pending in one record header",
                offset=self._b.offset,
                state=self._state.name.lower(),
            )
            self._fail(err, out)

    def _run(self, out: list[Event]) -> None:
        b = self._b
        ram = self._ram
        handlers = self._handlers
        while True:
            if ram.skip:
                ram.skip -= b.skip(ram.skip)
                if ram.skip:
                    return
            b.commit()
            try:
                if not handlers[self._state](out):
                    return
            except NeedData:
                b.rollback()
                return

    def _fail(
        self, err: StreamError, out: list[Event], cause: BaseException | None = None
    ) -> NoReturn:
        self._state = State.ERROR
        self._error = err
        err.events = tuple(out)
        if cause is None:
            raise err
        raise err from cause

    def _err(self, message: str, *, offset: int | None = None, state: str | None = None) -> None:
        raise StreamError(
            message,
            offset=self._rec_offset if offset is None else offset,
            state=state or self._state.name.lower(),
            section=self._section_name(),
        )

    def _section_name(self) -> str | None:
        if self._state not in (State.RAM, State.RAM_BLOCKS, State.FOOTER, State.DEVICE):
            return None
        name = self._cur.idstr if self._cur is not None else "?"
        return f"{self._cur_id} ({name})"

    def _check_end(self, out: list[Event]) -> None:
        state = self._state
        b = self._b
        if state in (State.DONE, State.AFTER_EOF) or (
            state is State.OPAQUE and not self._ended_inside
        ):
            return
        clean = b.available == 0 and not self._ram.skip
        if state is State.RECORDS and clean and not self._blobs and self._fragment:
            return
        if state is State.RECORDS and clean and not self._blobs:
            what = "between records, before QEMU_VM_EOF"
        elif self._ended_inside:
            what = f"inside section {self._cur_id}, before its footer"
        elif self._ram.skip:
            kind = "RAM page payload" if state is State.RAM else "skipped payload"
            what = f"inside a {kind} ({self._ram.skip} bytes missing)"
        elif state is State.RECORDS and clean:
            what = "between records"
        else:
            what = f"inside a record ({b.available} bytes of it received)"
        if self._blobs:
            what += f", inside a PACKAGED blob ({self._blobs.ends[-1] - b.offset} bytes missing)"
        err = TruncatedStream(
            f"stream ended {what}",
            offset=b.offset,
            state=state.name.lower(),
            section=self._section_name(),
        )
        self._fail(err, out)

    # -- states ---------------------------------------------------------------------------------
    def _st_header(self, out: list[Event]) -> bool:
        b = self._b
        self._rec_offset = b.offset
        magic = b.be32()
        version = b.be32()
        if magic != QEMU_VM_FILE_MAGIC:
            raw = magic.to_bytes(4, "big")
            hint = _KNOWN_MAGICS.get(raw)
            if hint is None and raw[0] in (0x16, 0x17, 0x15) and raw[1] == 0x03:
                hint = "a TLS record (ClientHello?)"
            like = f", looks like {hint}" if hint else ""
            self._err(
                f"expected QEMU_VM_FILE_MAGIC 0x5145564d ('QEVM'), got {raw!r}{like}",
                state="file header",
            )
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise UnsupportedStream(
                "QEMU_VM_FILE_VERSION_COMPAT (2) is obsolete",
                offset=self._rec_offset + 4,
                state="file header",
            )
        if version != QEMU_VM_FILE_VERSION:
            self._err(
                f"expected QEMU_VM_FILE_VERSION 3, got {version}",
                offset=self._rec_offset + 4,
                state="file header",
            )
        out.append(StreamHeader(self._rec_offset, magic, version))
        self._state = State.CONFIGURATION
        return True

    def _st_configuration(self, out: list[Event]) -> bool:
        del out
        b = self._b
        self._rec_offset = b.offset
        if b.peek_u8() != SectionType.QEMU_VM_CONFIGURATION:
            self._state = State.RECORDS
            return True
        b.u8()
        n = b.be32()
        if n > MAX_MACHINE_TYPE:
            self._err(f"machine type name of {n} bytes (at most {MAX_MACHINE_TYPE})")
        raw = b.take(n)
        name = ascii_field(raw, "machine type", self._rec_offset + 5, "configuration")
        if not printable(raw):
            self._err(f"machine type {raw[:40]!r} is not printable")
        self._config = {"offset": self._rec_offset, "machine_type": name}
        self._state = State.CONFIG_SUBSECTIONS
        return True

    def _st_config_subsections(self, out: list[Event]) -> bool:
        b = self._b
        cfg = self._config
        if b.peek_u8() != SectionType.QEMU_VM_SUBSECTION:
            out.append(
                Configuration(
                    int(cfg["offset"]),  # type: ignore[call-overload]
                    str(cfg["machine_type"]),
                    cfg.get("target_page_bits"),  # type: ignore[arg-type]
                    cfg.get("capabilities"),  # type: ignore[arg-type]
                    cfg.get("uuid"),  # type: ignore[arg-type]
                )
            )
            self._state = State.RECORDS
            return True
        sub_offset = b.offset
        b.u8()
        raw = b.cstr()
        b.be32()  # subsection version_id (1 for all three)
        name = ascii_field(raw, "configuration subsection", sub_offset, "configuration")
        if name == CONFIG_TARGET_PAGE_BITS:
            bits = b.be32()
            if not 10 <= bits <= 30:
                self._err(f"target page bits {bits} out of range", offset=sub_offset)
            cfg["target_page_bits"] = bits
            self._ram.page_size = 1 << bits
        elif name == CONFIG_CAPABILITIES:
            count = b.be32()
            if count > MAX_CAPABILITIES:
                self._err(f"{count} capabilities (at most {MAX_CAPABILITIES})", offset=sub_offset)
            caps = tuple(
                ascii_field(b.cstr(), "capability", sub_offset, "configuration")
                for _ in range(count)
            )
            cfg["capabilities"] = caps
            self._ignore_shared = "x-ignore-shared" in caps
            if "mapped-ram" in caps:
                raise UnsupportedStream(
                    "mapped-ram (file migration with fixed page offsets) is not modelled",
                    offset=sub_offset,
                    state="configuration",
                )
        elif name == CONFIG_UUID:
            cfg["uuid"] = b.take(16)
        else:
            raise UnsupportedStream(
                f"unknown configuration subsection {name!r}",
                offset=sub_offset,
                state="configuration",
            )
        return True

    def _st_records(self, out: list[Event]) -> bool:
        b = self._b
        if self._blobs.close_ended(b):
            out.append(PackagedEnd(b.offset))
            return True
        self._rec_offset = off = b.offset
        t = b.u8()
        if t in _SECTION_WITH_HEADER:
            return self._section_full_header(SectionType(t), out)
        if t in (SectionType.QEMU_VM_SECTION_PART, SectionType.QEMU_VM_SECTION_END):
            return self._section_short_header(SectionType(t), out)
        if t == SectionType.QEMU_VM_COMMAND:
            return self._command(out)
        if t == SectionType.QEMU_VM_EOF:
            out.append(EndOfState(off))
            if not self._blobs:
                self._state = State.AFTER_EOF
            return True
        why = _MISPLACED.get(t, f"unknown record type {t:#04x}")
        self._err(f"{why}; expected a section, command or EOF")
        return False  # unreachable: _err raises

    def _section_full_header(self, kind: SectionType, out: list[Event]) -> bool:
        b = self._b
        sid = b.be32()
        raw = b.cstr()
        inst = b.be32()
        ver = b.be32()
        if not raw or not printable(raw):
            self._err(
                f"section idstr {raw[:40]!r} is empty or not printable", state="section header"
            )
        idstr = raw.decode("ascii")
        out.append(SectionHeader(self._rec_offset, kind, sid, idstr, inst, ver))
        sec = _Section(idstr, inst, ver)
        self._sections[sid] = sec
        self._enter_section(kind, sid, sec, out)
        return True

    def _section_short_header(self, kind: SectionType, out: list[Event]) -> bool:
        sid = self._b.be32()
        sec = self._sections.get(sid)
        if sec is None and not self._fragment:
            self._err(
                f"{kind.name} for section id {sid}, which no SECTION_START opened",
                state="section header",
            )
        out.append(
            SectionHeader(
                self._rec_offset,
                kind,
                sid,
                sec.idstr if sec else None,
                sec.instance_id if sec else None,
                sec.version_id if sec else None,
            )
        )
        self._enter_section(kind, sid, sec, out)
        return True

    def _enter_section(
        self, kind: SectionType, sid: int, sec: _Section | None, out: list[Event]
    ) -> None:
        self._cur_id = sid
        self._cur_kind = kind
        self._cur = sec
        is_ram = (
            sec is not None and sec.idstr == RAM_IDSTR and kind != SectionType.QEMU_VM_SECTION_FULL
        )
        if is_ram and kind == SectionType.QEMU_VM_SECTION_START:
            assert sec is not None
            if sec.version_id != RAM_VERSION:
                raise UnsupportedStream(
                    f"RAM section version {sec.version_id}, only {RAM_VERSION} exists",
                    offset=self._rec_offset,
                    state="section header",
                    section=f"{sid} (ram)",
                )
            self._ram_section_id = sid
        if is_ram and sid == self._ram_section_id:
            self._ram.section_id = sid
            self._ram.stats.sections += 1
            self._state = State.RAM
            return
        if self._footers is False:
            reason = f"section {sid} has no length and the stream has no footers"
            self._unparsed(reason, self._b.offset, out)
            return
        self._dev.clear()
        self._dev_offset = self._b.offset
        self._state = State.DEVICE

    # -- commands (migtap.wire.commands) ------------------------------------------------------
    def _command(self, out: list[Event]) -> bool:
        b = self._b
        off = self._rec_offset
        cmd, payload = read_command(b, off)
        event = decode_command(cmd, payload, off, b.offset)
        out.append(event)
        if isinstance(event, PostcopyAdvise) and event.target_page_size is not None:
            self._ram.page_size = event.target_page_size
            self._postcopy_hugepages = True
        elif cmd == MigCmd.MIG_CMD_PACKAGED:
            self._blobs.open(b, int.from_bytes(payload, "big"), off)
        return True

    # -- RAM --------------------------------------------------------------------------------------
    def _st_ram(self, out: list[Event]) -> bool:
        b = self._b
        stop = self._ram.read_records(b, out)
        b.commit()
        if stop == RAM_SAVE_FLAG_EOS:
            out.append(RamEndOfSection(b.offset, self._cur_id))
            b.pos += 8
            self._ram.stats.eos += 1
            self._state = State.FOOTER
            return True
        if stop == RAM_SAVE_FLAG_MEM_SIZE:
            self._rec_offset = b.offset
            self._mem_total = b.be64() & ~RAM_SAVE_FLAG_MASK
            self._mem_sum = 0
            self._mem_blocks = []
            self._state = State.RAM_BLOCKS
            if self._mem_total == 0:
                self._end_block_list(out)
            return True
        return False

    def _st_ram_blocks(self, out: list[Event]) -> bool:
        b = self._b
        at = b.offset
        raw = b.cstr()
        length = b.be64()
        page_size = addr = None
        if self._postcopy_hugepages:
            page_size = self._peek_block_page_size(self._mem_sum + length < self._mem_total)
        if self._ignore_shared:
            addr = b.be64()
        if not raw or not printable(raw):
            self._err(f"RAM block name {raw[:40]!r} is empty or not printable", offset=at)
        if raw in self._ram.blocks:
            self._err(f"RAM block {raw!r} listed twice", offset=at)
        self._mem_sum += length
        if self._mem_sum > self._mem_total:
            self._err(
                f"RAM block lengths add up to {self._mem_sum:#x}, more than MEM_SIZE total "
                f"{self._mem_total:#x}",
                offset=at,
            )
        if len(self._mem_blocks) >= MAX_RAM_BLOCKS:
            self._err("too many RAM blocks", offset=at)
        self._ram.add_block(raw, length)
        self._mem_blocks.append(RamBlock(raw.decode("ascii"), length, page_size, addr))
        if self._mem_sum == self._mem_total:
            self._end_block_list(out)
        return True

    def _peek_block_page_size(self, more_blocks: bool) -> int | None:
        """The optional be64 block page size (postcopy-ram with huge pages),
        ``docs/stream-format.md`` §9.3."""
        b = self._b
        if more_blocks:
            if b.peek_u8() != 0:  # a block name length is >= 1: no page size here
                return None
            return b.be64()
        b.need(8)
        (v,) = struct.unpack_from(">Q", b.src, b.pos)
        if v and not v & (v - 1) and not v & RAM_SAVE_FLAG_MASK:
            b.pos += 8
            return int(v)
        return None

    def _end_block_list(self, out: list[Event]) -> None:
        blocks = tuple(self._mem_blocks)
        self.ram_blocks = blocks
        out.append(RamBlockList(self._rec_offset, self._cur_id, self._mem_total, blocks))
        self._state = State.RAM

    def _st_footer(self, out: list[Event]) -> bool:
        b = self._b
        self._rec_offset = at = b.offset
        if self._footers is None:
            self._footers = b.peek_u8() == SectionType.QEMU_VM_SECTION_FOOTER
        if self._footers:
            t = b.u8()
            sid = b.be32()
            if t != SectionType.QEMU_VM_SECTION_FOOTER:
                self._err(f"expected QEMU_VM_SECTION_FOOTER (0x7e), got {t:#04x}", offset=at)
            if sid != self._cur_id:
                self._err(f"section footer names section {sid}, expected {self._cur_id}", offset=at)
            out.append(SectionFooter(at, sid))
        self._state = State.RECORDS
        return True

    # -- sections without length ----------------------------------------------------------------
    def _st_device(self, out: list[Event]) -> bool:
        b = self._b
        buf = b.searchable()
        start, end = b.pos, b.end
        final = (self._eof and end == len(b.src)) or b.at_limit()
        k, verdict = find_footer(buf, start, end, self._cur_id, self._sections, final=final)
        if verdict:
            self._device_done(buf, start, k, out)
            return True
        if verdict is None:
            self._device_keep(buf, start, k, out)
            return self._state is not State.DEVICE  # cap hit: carry on in the new state
        if final:
            self._device_keep(buf, start, end, out)
            if self._state is State.DEVICE:
                self._ended_inside = not b.at_limit()
                reason = f"no footer of section {self._cur_id} found before the end"
                self._unparsed(reason, self._dev_offset, out)
            return True
        self._device_keep(buf, start, max(start, end - (SECTION_FOOTER_SIZE - 1)), out)
        return self._state is not State.DEVICE

    def _device_keep(self, buf: bytes | bytearray, start: int, stop: int, out: list[Event]) -> None:
        self._dev += buf[start:stop]
        self._b.pos = stop
        if len(self._dev) > MAX_DEVICE_SECTION:
            self._unparsed(
                f"no footer of section {self._cur_id} in {MAX_DEVICE_SECTION} bytes",
                self._dev_offset,
                out,
            )

    def _device_done(self, buf: bytes | bytearray, start: int, k: int, out: list[Event]) -> None:
        b = self._b
        self._dev += buf[start:k]
        sec = self._cur
        out.append(
            DeviceState(
                self._rec_offset,
                self._cur_kind,
                self._cur_id,
                sec.idstr if sec else None,
                sec.instance_id if sec else None,
                sec.version_id if sec else None,
                bytes(self._dev),
                self._dev_offset,
            )
        )
        self._dev.clear()
        b.pos = k + SECTION_FOOTER_SIZE
        out.append(SectionFooter(b.base + k, self._cur_id))
        if self._footers is None:
            self._footers = True
        self._state = State.RECORDS

    def _unparsed(self, reason: str, offset: int, out: list[Event]) -> None:
        """Give up framing: the rest of the stream (or of the blob) is opaque."""
        b = self._b
        self._dev.clear()
        out.append(Unparsed(offset, reason))
        if self._blobs:  # the blob's end is known: resume after it
            rest = self._blobs.ends[-1] - b.offset
            self._ram.skip = rest - b.skip(rest)  # the generic "skip n bytes" of _run
            self._state = State.RECORDS
        else:
            b.pos = b.end
            self._state = State.OPAQUE

    # -- after EOF (migtap.wire.vmdesc) ----------------------------------------------------------
    def _st_after_eof(self, out: list[Event]) -> bool:
        del out
        self._rec_offset = self._b.offset
        self._vmdesc.start(self._b)
        self._state = State.VMDESC
        return True

    def _st_vmdesc(self, out: list[Event]) -> bool:
        event = self._vmdesc.take(self._b)
        if event is None:
            return False
        out.append(event)
        self._state = State.DONE
        return True

    def _st_done(self, out: list[Event]) -> bool:
        del out
        if self._b.available:
            self._err("data after the VMDESCRIPTION", offset=self._b.offset)
        return False

    def _st_opaque(self, out: list[Event]) -> bool:
        del out
        b = self._b
        b.pos = b.end
        return False
