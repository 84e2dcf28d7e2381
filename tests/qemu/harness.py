"""Real QEMU VMs for tests: start source and destination, migrate, verify guest RAM.

Source and destination are TCG guests with ``-nodefaults`` and QMP on unix sockets in a temp
dir. A migration is judged as a person would: the source's ``query-migrate`` says
``completed``, the destination has loaded (``completed``, paused by ``-S``), and every byte of
guest RAM is the same on both sides (HMP ``pmemsave`` of all RAM, compared by sha256).

A VM runs the host's QEMU unless given another ``Qemu``: ``Qemu.trixie(tree)`` is Debian trixie's
10.0 from the tree that scripts/qemu10.sh builds, ``Qemu.sid(tree)`` Debian sid's 11.1 from
scripts/qemu11.sh (``vm_pair(..., src_qemu=..., dst_qemu=...)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qemu.qmp import QMPClient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

if TYPE_CHECKING:
    from pathlib import Path

QEMU_BIN = os.environ.get("MIGTAP_QEMU", "qemu-system-x86_64")
MiB = 1024 * 1024


class HarnessError(RuntimeError):
    """A VM could not be started or driven. Tests fail on it; they never skip."""


def qemu_binary() -> str:
    """The QEMU binary; a missing one FAILS the test (never skips): CI must install it."""
    path = shutil.which(QEMU_BIN)
    if path is None:
        raise HarnessError(
            f"{QEMU_BIN} not found: run scripts/setup.sh (apt-get install -y qemu-system-x86 "
            "qemu-utils); the real-migration tests need it"
        )
    return path


@dataclass(frozen=True)
class Qemu:
    """Which QEMU a Vm runs: the host's (the default) or one from a foreign root tree.

    ``prefix`` is the command up to the first QEMU option; empty means the host's binary,
    resolved by ``qemu_binary()`` when the VM starts (``MIGTAP_QEMU`` still applies).
    """

    name: str = "host"
    prefix: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def trixie(cls, tree: Path) -> Qemu:
        """Debian trixie's QEMU 10.0 in ``tree`` (scripts/qemu10.sh)."""
        return cls.debian_tree(tree, "trixie")

    @classmethod
    def sid(cls, tree: Path) -> Qemu:
        """Debian sid's QEMU 11.1 in ``tree`` (scripts/qemu11.sh)."""
        return cls.debian_tree(tree, "sid")

    @classmethod
    def debian_tree(cls, tree: Path, name: str) -> Qemu:
        """The QEMU of a Debian tree that scripts/qemu-tree.sh built, run with the tree's loader.

        No chroot: the tree's own dynamic loader and libraries, and ``-L`` for its firmware
        (without them QEMU silently uses the host's 7.2-era firmware). Host paths (QMP sockets,
        pmemsave, loader files) work unchanged.
        """
        tree = tree.resolve()
        lib = tree / "usr/lib/x86_64-linux-gnu"
        return cls(
            name=name,
            prefix=(
                str(lib / "ld-linux-x86-64.so.2"),
                "--library-path",
                f"{lib}:{tree / 'usr/lib'}",
                str(tree / "usr/bin/qemu-system-x86_64"),
                "-L",
                str(tree / "usr/share/qemu"),
                "-L",
                str(tree / "usr/share/seabios"),
            ),
            env=(("QEMU_MODULE_DIR", str(lib / "qemu")),),
        )

    def command(self) -> list[str]:
        return list(self.prefix) if self.prefix else [qemu_binary()]

    def environ(self) -> dict[str, str] | None:
        """The process environment, or None (inherit) for the host's QEMU."""
        return {**os.environ, **dict(self.env)} if self.env else None


HOST_QEMU = Qemu()


@dataclass
class Vm:
    """One QEMU process with a QMP connection."""

    name: str
    workdir: Path
    mem_mib: int = 64
    machine: str = "pc"
    incoming: bool = False
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    qmp: QMPClient | None = None
    qemu: Qemu = HOST_QEMU

    @property
    def qmp_path(self) -> Path:
        return self.workdir / f"{self.name}.qmp"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    async def start(self) -> None:
        args = [
            *self.qemu.command(),
            "-nodefaults",
            "-machine",
            f"{self.machine},accel=tcg",
            "-m",
            f"{self.mem_mib}M",
            "-display",
            "none",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            *self.extra,
        ]
        if self.incoming:
            args += ["-incoming", "defer", "-S"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - short-lived spawn
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.qemu.environ(),
            )
        self.qmp = QMPClient(self.name)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.name} QEMU exited at start: {self.log_path.read_text()}")
            if not self.qmp_path.exists():
                if time.monotonic() > deadline:
                    raise HarnessError(f"{self.name} QEMU made no QMP socket in 20 s")
                await asyncio.sleep(0.02)
                continue
            try:
                await self.qmp.connect(str(self.qmp_path))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def cmd(self, command: str, **arguments: Any) -> Any:
        """A QMP command; a QEMU that does not answer within 120 s fails the test."""
        assert self.qmp is not None
        async with asyncio.timeout(120):
            return await self.qmp.execute(command, arguments or None)

    async def hmp(self, line: str) -> str:
        out = await self.cmd("human-monitor-command", **{"command-line": line})
        return str(out)

    async def set_capabilities(self, **caps: bool) -> None:
        if caps:
            await self.cmd(
                "migrate-set-capabilities",
                capabilities=[
                    {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()
                ],
            )

    async def set_parameters(self, **params: Any) -> None:
        if params:
            await self.cmd(
                "migrate-set-parameters", **{k.replace("_", "-"): v for k, v in params.items()}
            )

    async def query_migrate(self) -> dict[str, Any]:
        result = await self.cmd("query-migrate")
        assert isinstance(result, dict)
        return result

    async def ram_sha256(self) -> str:
        """sha256 of all guest RAM (guest-physical 0 .. mem size) via HMP pmemsave."""
        dump = self.workdir / f"{self.name}.ram"
        await self.cmd("pmemsave", val=0, size=self.mem_mib * MiB, filename=str(dump))
        digest = hashlib.sha256()
        with dump.open("rb") as fh:
            while block := fh.read(4 * MiB):
                digest.update(block)
        size = dump.stat().st_size
        dump.unlink()
        assert size == self.mem_mib * MiB
        return digest.hexdigest()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    async def stop(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 5)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class MigrationResult:
    source: dict[str, Any]
    destination: dict[str, Any]
    elapsed_s: float


TERMINAL = {"completed", "failed", "cancelled"}


async def wait_migration(
    vm: Vm, *, timeout_s: float = 120, statuses: set[str] = TERMINAL
) -> dict[str, Any]:
    """Poll query-migrate until a terminal status, with totals filled in once completed."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = await vm.query_migrate()
        status = info.get("status")
        # 7.2 briefly reports completed with total-time 0; wait until it is filled in.
        filled = status != "completed" or info.get("total-time", 0) > 0 or vm.incoming
        if status in statuses and filled:
            return info
        if time.monotonic() > deadline:
            raise HarnessError(f"{vm.name}: migration still {status!r} after {timeout_s}s: {info}")
        await asyncio.sleep(0.05)


def random_ram_file(workdir: Path, size: int, seed: int = 1) -> Path:
    """A file of pseudo-random bytes (reproducible, fast) for -device loader."""
    path = workdir / f"random-{size}-{seed}.bin"
    if not path.exists():
        import random

        rng = random.Random(seed)
        tmp = path.with_suffix(".part")
        with tmp.open("wb") as fh:
            for start in range(0, size, 16 * MiB):
                fh.write(rng.randbytes(min(16 * MiB, size - start)))
        tmp.rename(path)
    return path


@dataclass
class Pair:
    """A source and destination VM, ready to migrate."""

    src: Vm
    dst: Vm
    dst_port: int = 0

    async def configure(
        self, caps: dict[str, bool], params: dict[str, Any], *, incoming: str = "tcp:127.0.0.1:0"
    ) -> None:
        """Capabilities, parameters, then ``migrate-incoming`` on ``incoming`` (``unix:PATH``,
        or TCP: port 0 gets a port from QEMU, read back into ``dst_port``)."""
        for vm in (self.src, self.dst):
            await vm.set_capabilities(**caps)
        src_params = {"max_bandwidth": 8 * 1024 * MiB, "downtime_limit": 300, **params}
        dst_only = {
            k: v for k, v in params.items() if k in ("multifd_channels", "multifd_compression")
        }
        await self.src.set_parameters(**src_params)
        await self.dst.set_parameters(**dst_only)
        # Port 0: QEMU binds and tells us the port, so no "find a free port, then bind" race.
        await self.dst.cmd("migrate-incoming", uri=incoming)
        if incoming.startswith("tcp:"):
            info = await self.dst.query_migrate()
            self.dst_port = int(info["socket-address"][0]["port"])

    async def migrate(
        self, uri: str, *, postcopy: bool = False, timeout_s: float = 120
    ) -> MigrationResult:
        t0 = time.monotonic()
        await self.src.cmd("migrate", uri=uri)
        if postcopy:
            await self.src.cmd("migrate-start-postcopy")
        src = await wait_migration(self.src, timeout_s=timeout_s)
        dst: dict[str, Any] = {}
        if src["status"] == "completed":
            dst = await wait_migration(self.dst, timeout_s=30, statuses={"completed", "failed"})
        return MigrationResult(src, dst, time.monotonic() - t0)

    async def assert_ram_identical(self) -> None:
        src, dst = await self.src.ram_sha256(), await self.dst.ram_sha256()
        assert src == dst, "guest RAM differs between source and destination"


@contextlib.asynccontextmanager
async def vm_pair(
    workdir: Path,
    *,
    mem_mib: int = 64,
    machine: str = "pc",
    random_mib: int = 0,
    src_extra: list[str] | None = None,
    dst_extra: list[str] | None = None,
    src_qemu: Qemu = HOST_QEMU,
    dst_qemu: Qemu = HOST_QEMU,
) -> AsyncIterator[Pair]:
    extra = list(src_extra or [])
    if random_mib:
        blob = random_ram_file(workdir, random_mib * MiB)
        extra += ["-device", f"loader,file={blob},addr=0x1000000,force-raw=on"]
    src = Vm("src", workdir, mem_mib=mem_mib, machine=machine, extra=extra, qemu=src_qemu)
    dst = Vm(
        "dst",
        workdir,
        mem_mib=mem_mib,
        machine=machine,
        incoming=True,
        extra=list(dst_extra or []),
        qemu=dst_qemu,
    )
    try:
        await src.start()
        await dst.start()
        yield Pair(src, dst)
    finally:
        await src.stop()
        await dst.stop()


def rich_devices(disk: Path, *, slirps: int = 2) -> list[str]:
    """A network card of each common kind, a virtio disk on ``disk`` (qcow2) and a USB tablet.

    Each card gets a user-mode (slirp) backend while ``slirps`` lasts; the others have none.
    Across 7.2 and 10.0 only one slirp backend migrates: 7.2 gives every ``slirp`` section
    instance 0, 10.0 numbers them 0, 1, ..., and a 7.2 destination rejects ``slirp`` 1.
    """
    nics = []
    for n, model in enumerate(("virtio-net-pci", "e1000")):
        if n < slirps:
            nics += ["-netdev", f"user,id=n{n}", "-device", f"{model},netdev=n{n}"]
        else:
            nics += ["-device", model]
    return [
        *nics,
        "-drive", f"file={disk},if=none,id=d0,format=qcow2",
        "-device", "virtio-blk-pci,drive=d0",
        "-device", "qemu-xhci,id=xhci",
        "-device", "usb-tablet,bus=xhci.0",
    ]  # fmt: skip


def make_qcow2(path: Path, size: str = "16M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


# -- a guest that keeps dirtying its RAM ----------------------------------------------------
# The boot sector (16-bit real mode, loaded at 0:7C00):
#     cli; cld; xor ax,ax
#  a: mov bx,0x1000
#  b: mov es,bx; xor di,di
#  c: mov cx,0x800; rep stosw                             ; one 4 KiB page of ax at bx:di
#     mov edx,cr4; xor dl,0x10; mov cr4,edx               ; toggle CR4.PSE: TLB flush (below)
#     test di,di; jnz c                                   ; the 16 pages of the segment
#     add bx,0x1000; cmp bx,0x9000; jb b                  ; segments 0x1000..0x8000
#     inc ax; jmp a                                       ; forever, a new value each pass
# The TLB flush matters: QEMU 7.2 TCG does not flush the TLB when a migration bitmap sync
# clears dirty bits, so a guest that keeps writing through the same TLB entries dirties pages
# that migration never sees (the sync after it finds them clean, and guest RAM differs after
# the migration). A flush after every page makes the next write go through the dirty check.
BOOT_CODE = bytes.fromhex(
    "fa fc 31c0 bb0010 8ec3 31ff b90008 f3ab 0f20e2 80f210 0f22e2 85ff 75ee"
    " 81c30010 81fb0090 72e0 40 ebda".replace(" ", "")
)
# The same loop, rewriting only the first 64 bytes of each page (``mov cx,0x20`` and then
# ``add di,0x0fc0`` to the next page): xbzrle then encodes each page as a small delta instead
# of overflowing, as it does for pages rewritten whole.
PARTIAL_BOOT_CODE = bytes.fromhex(
    "fa fc 31c0 bb0010 8ec3 31ff b92000 f3ab 81c7c00f 0f20e2 80f210 0f22e2 85ff 75ea"
    " 81c30010 81fb0090 72dc 40 ebd6".replace(" ", "")
)
BOOT_LOOP = range(0x7C00, 0x7C00 + max(len(BOOT_CODE), len(PARTIAL_BOOT_CODE)))
FLOPPY_BYTES = 1474560  # a 1.44 MB image, so that the drive's geometry is a standard one


def floppy(workdir: Path, *, partial: bool = False) -> Path:
    """A 1.44 MB floppy image whose boot sector runs the loop above (``partial``: the one that
    rewrites 64 bytes of each page)."""
    path = workdir / "boot.img"
    code = PARTIAL_BOOT_CODE if partial else BOOT_CODE
    sector = code.ljust(510, b"\x00") + b"\x55\xaa"
    path.write_bytes(sector.ljust(FLOPPY_BYTES, b"\x00"))
    return path


def guest_args(image: Path) -> list[str]:
    """QEMU arguments that boot the guest from ``floppy()``'s image."""
    return ["-drive", f"if=floppy,format=raw,readonly=on,file={image}", "-boot", "a"]


async def wait_booted(vm: Vm, timeout_s: float = 30) -> None:
    """Wait until the guest runs the boot sector's loop (HMP ``info registers``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        regs = await vm.hmp("info registers")
        eip = re.search(r"EIP=([0-9a-f]{8})", regs)
        cs = re.search(r"CS =([0-9a-f]{4})", regs)
        if eip and cs and int(cs.group(1), 16) == 0 and int(eip.group(1), 16) in BOOT_LOOP:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{vm.name}: the guest did not reach the boot sector: {regs}")
        await asyncio.sleep(0.1)
