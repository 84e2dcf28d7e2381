"""Two libvirt daemons side by side on one machine, for real ``virsh migrate`` through migtap.

Debian bookworm's libvirt 9.0 has one daemon, ``libvirtd``, with fixed paths under
``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt`` and
``/var/cache/libvirt``. Each ``Libvirtd`` here runs in its own mount namespace (``unshare
--mount``), with its own directories bind-mounted over those five, its own ``unix_sock_dir``
and its own ``host_uuid`` (libvirt refuses to migrate to a host with its own UUID). Only the
mounts are private: the file system, the network and the process table are the host's, so the
guest image, loopback addresses and PIDs are the same for both daemons and for the tests.

What this machine kind needs (each found by trying): root; the ``libvirt-qemu`` user must
exist even with ``user = "root"``; qemu.conf needs ``security_driver = "none"``,
``cgroup_controllers = [ ]``, ``namespaces = [ ]`` and ``stdio_handler = "file"`` (no
virtlogd). The daemons talk TCP to each other (``listen_tcp``, ``auth_tcp = "none"``), each on
its own loopback address, so p2p migration (``virsh migrate --p2p``) works between them; each
daemon's QEMU listens for incoming migrations on that address too (``migration_address``).

A daemon is stopped by its PID: its domains are destroyed first, and anything still running in
its mount namespace afterwards (a QEMU it left behind) is killed by PID too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

#: The directories libvirtd 9.0 uses, each bind-mounted from the daemon's own root.
LIBVIRT_DIRS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}
#: What a machine needs, for the error message (CI's .ci/run and scripts/setup.sh install it).
PACKAGES = "libvirt-daemon-system libvirt-clients"


class LibvirtError(RuntimeError):
    """A daemon could not be started or driven. Tests fail on it; they never skip."""


def libvirtd_binary() -> str | None:
    """libvirtd lives in /usr/sbin, which not every PATH has."""
    return shutil.which("libvirtd") or shutil.which("libvirtd", path="/usr/sbin")


def require_libvirt() -> None:
    """Fail (never skip) with what to do when this machine cannot run the daemons."""
    missing = [tool for tool in ("virsh", "unshare") if shutil.which(tool) is None]
    if libvirtd_binary() is None:
        missing.insert(0, "libvirtd")
    if missing:
        raise LibvirtError(
            f"{', '.join(missing)} not found: run scripts/setup.sh (apt-get install -y "
            f"{PACKAGES}); the libvirt tests need Debian's libvirt 9.0 with the QEMU driver"
        )
    if os.geteuid() != 0:
        raise LibvirtError("the libvirt tests run two system libvirtd daemons: run them as root")
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        raise LibvirtError(
            "user libvirt-qemu missing: libvirtd's QEMU driver needs it even with "
            f'user = "root"; installing {PACKAGES} creates it'
        ) from None


def loopback_addresses(n: int) -> list[str]:
    """``n`` distinct random addresses in 127.0.0.0/8, away from 127.0.0.1 and 127.0.0.2."""
    rng = random.SystemRandom()
    picked: set[str] = set()
    while len(picked) < n:
        picked.add(f"127.{rng.randrange(16, 250)}.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}")
    return sorted(picked)


@dataclass
class Libvirtd:
    """One libvirtd in its own mount namespace, listening on ``address`` for TCP."""

    name: str
    root: Path
    address: str
    #: qemu.conf's migration_port_min/max (the ports an incoming QEMU may listen on).
    migration_ports: tuple[int, int] = (49152, 49215)
    #: In a network namespace of its own too, reached over a veth pair from ``host_address``:
    #: its libvirt's port check then sees only its own sockets (a "destination host").
    netns: bool = False
    host_address: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    mount_ns: str | None = None
    _log: list[str] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.root / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """The local URI (its own unix socket), for ``virsh -c``."""
        return f"qemu:///system?socket={self.socket}"

    @property
    def tcp_uri(self) -> str:
        """The URI the other daemon connects to for p2p migration."""
        return f"qemu+tcp://{self.address}/system"

    @property
    def caps_dir(self) -> Path:
        """libvirt's cache of probed QEMU capabilities (/var/cache/libvirt/qemu/capabilities)."""
        return self.root / "cache" / "qemu" / "capabilities"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def configure(self) -> None:
        """Write libvirtd.conf and qemu.conf into the daemon's own /etc/libvirt."""
        for sub in (*LIBVIRT_DIRS, "sock"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        first, last = self.migration_ports
        (self.root / "etc/libvirtd.conf").write_text(
            f"""\
listen_tls = 0
listen_tcp = 1
listen_addr = "{self.address}"
auth_tcp = "none"
auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_dir = "{self.root / "sock"}"
host_uuid = "{uuid.uuid4()}"
log_outputs = "3:file:{self.root / "libvirtd.log"}"
"""
        )
        (self.root / "etc/qemu.conf").write_text(
            f"""\
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
migration_address = "{self.address}"
migration_port_min = {first}
migration_port_max = {last}
"""
        )

    def spawn(self) -> None:
        """Start libvirtd in a new mount namespace (``unshare`` and ``sh`` exec it: same PID)."""
        mounts = " && ".join(
            f'mkdir -p {target} && mount --bind "{self.root / sub}" {target}'
            for sub, target in LIBVIRT_DIRS.items()
        )
        script = (
            f"{mounts} && exec {libvirtd_binary()} --listen -f {self.root / 'etc/libvirtd.conf'}"
            f" -p {self.root / 'libvirtd.pid'}"
        )
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if self.netns:
            # Wait (up to 10 s) until plumb() has given the namespace its address.
            wait = (
                "n=0; until ip -o addr show | grep -qF ' "
                f"{self.address}/'; do n=$((n+1)); [ $n -gt 200 ] && exit 3; sleep 0.05; done"
            )
            script = f"{wait} && {script}"
            unshare.append("--net")
        with (self.root / "libvirtd.out").open("wb") as out:
            self.proc = subprocess.Popen(
                [*unshare, "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self.netns:
            self.plumb()

    def plumb(self) -> None:
        """A veth pair from the host (``host_address``/30) into the daemon's network namespace
        (``address``/30), and its loopback up. Both ends go when the namespace does."""
        assert self.proc is not None
        assert self.host_address is not None
        pid = str(self.proc.pid)
        ours = Path("/proc/self/ns/net").readlink()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/ns/net").readlink() == ours:  # until unshare() has run
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise LibvirtError(f"{self.name}: no network namespace of its own")
            time.sleep(0.01)
        suffix = f"{self.proc.pid % 100000}"
        host_if, ns_if = f"mtvh{suffix}", f"mtvn{suffix}"

        def ip(*args: str, inside: bool = False) -> None:
            cmd = ["nsenter", "-t", pid, "-n", "ip", *args] if inside else ["ip", *args]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
            if done.returncode != 0:
                raise LibvirtError(f"{self.name}: {' '.join(cmd)}: {done.stderr.strip()}")

        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", pid)
        ip("addr", "add", f"{self.host_address}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("link", "set", "lo", "up", inside=True)
        ip("addr", "add", f"{self.address}/30", "dev", ns_if, inside=True)
        ip("link", "set", ns_if, "up", inside=True)

    def wait_ready(self, timeout_s: float = 30) -> None:
        """Wait until the daemon answers on its socket (it probes QEMU's capabilities first)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise LibvirtError(f"{self.name}: libvirtd exited at start:\n{self.diagnostics()}")
            if self.socket.exists():
                done = subprocess.run(
                    ["virsh", "-c", self.uri, "version"],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=30,
                )
                if done.returncode == 0:
                    break
            if time.monotonic() > deadline:
                raise LibvirtError(f"{self.name}: libvirtd not ready in {timeout_s} s")
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            self.mount_ns = str(Path(f"/proc/{self.proc.pid}/ns/mnt").readlink())
        if self.mount_ns == str(Path("/proc/self/ns/mnt").readlink()):
            raise LibvirtError(f"{self.name}: libvirtd shares the host's mount namespace")

    def virsh_sync(self, *args: str, timeout_s: float = 60) -> str:
        """``virsh -c URI ARGS``: its stdout; a failure raises with virsh's stderr."""
        done = subprocess.run(
            ["virsh", "-c", self.uri, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
        )
        if done.returncode != 0:
            raise LibvirtError(f"{self.name}: virsh {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    async def virsh(self, *args: str, timeout_s: float = 120) -> str:
        """``virsh_sync`` without blocking the event loop (an in-process migtap runs on it)."""
        proc = await asyncio.create_subprocess_exec(
            "virsh",
            "-c",
            self.uri,
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(timeout_s):
                out, err = await proc.communicate()
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            msg = f"{self.name}: virsh {' '.join(args)}: no answer in {timeout_s} s"
            raise LibvirtError(msg) from exc
        if proc.returncode != 0:
            raise LibvirtError(f"{self.name}: virsh {' '.join(args)}: {err.decode().strip()}")
        return out.decode()

    def domains(self) -> list[str]:
        return [n for n in self.virsh_sync("list", "--name").split() if n]

    def qemu_log(self, domain: str) -> str:
        path = self.root / "log" / "qemu" / f"{domain}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def diagnostics(self) -> str:
        """The daemon's own output and log (warnings and errors), for failure messages."""
        parts = []
        for name in ("libvirtd.out", "libvirtd.log"):
            path = self.root / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-30:]
                parts.append(f"--- {path}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Destroy its domains, stop the daemon by PID, then kill by PID whatever is left in
        its mount namespace (the namespace goes away with its last process)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(LibvirtError, subprocess.TimeoutExpired):
                for domain in self.domains():
                    self.virsh_sync("destroy", domain, timeout_s=20)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pid in self.namespace_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.namespace_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.proc = None

    def namespace_pids(self) -> list[int]:
        """PIDs of the processes in this daemon's mount namespace (none once it is gone)."""
        if self.mount_ns is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if str((entry / "ns/mnt").readlink()) == self.mount_ns:
                    pids.append(int(entry.name))
        return pids


#: Where libvirtd's probed QEMU capabilities are kept between runs (``MIGTAP_LIBVIRT_CACHE``).
CAPS_CACHE = Path(
    os.environ.get(
        "MIGTAP_LIBVIRT_CACHE", Path(__file__).resolve().parents[2] / ".cache" / "libvirt-caps"
    )
)


def copy_capabilities(source: Path, target: Path) -> None:
    """Copy libvirt's cached QEMU capabilities (``cache/qemu/capabilities/*.xml``)."""
    files = list(source.glob("*.xml")) if source.is_dir() else []
    if files:
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, target / f.name)


def veth_addresses() -> tuple[str, str]:
    """A random /30 in 10.200.0.0/14 that this host has no route into: (host end, far end)."""
    routes = subprocess.run(
        ["ip", "-4", "route", "show"], capture_output=True, text=True, check=False
    ).stdout
    rng = random.SystemRandom()
    while True:
        net = f"10.{rng.randrange(200, 204)}.{rng.randrange(0, 256)}"
        last = rng.randrange(0, 64) * 4
        if f"{net}." not in routes:
            return f"{net}.{last + 1}", f"{net}.{last + 2}"


@contextlib.contextmanager
def libvirt_pair(
    workdir: Path,
    *,
    migration_ports: tuple[int, int] = (49152, 49215),
    dst_netns: bool = False,
) -> Iterator[tuple[Libvirtd, Libvirtd]]:
    """A source and a destination daemon, each on its own random loopback address; both are
    stopped (by PID) when the block ends, also on failure.

    A fresh libvirtd probes every QEMU binary's capabilities before it answers: about 8 s
    here, 16 s for two at once on two cores. libvirt keeps the result in its cache directory
    and reuses it while the binaries, libvirt and the host are unchanged (it checks), so the
    source starts first, the destination starts from the source's cache, and the cache is
    kept in ``CAPS_CACHE`` for the next run: then both answer in well under a second.
    """
    require_libvirt()
    src_addr, dst_addr = loopback_addresses(2)
    host_end = None
    if dst_netns:
        host_end, dst_addr = veth_addresses()
    daemons = (
        Libvirtd("src", workdir / "src", src_addr, migration_ports),
        Libvirtd(
            "dst",
            workdir / "dst",
            dst_addr,
            migration_ports,
            netns=dst_netns,
            host_address=host_end,
        ),
    )
    src, dst = daemons
    try:
        for d in daemons:
            d.configure()
        copy_capabilities(CAPS_CACHE, src.caps_dir)
        src.spawn()
        src.wait_ready()
        copy_capabilities(src.caps_dir, dst.caps_dir)
        dst.spawn()
        with contextlib.suppress(OSError):
            copy_capabilities(src.caps_dir, CAPS_CACHE)
        dst.wait_ready()
        yield daemons
    finally:
        for d in daemons:
            d.stop()


# -- the guest -----------------------------------------------------------------------------


def domain_xml(name: str, image: Path, *, mem_mib: int = 64) -> str:
    """A TCG domain that boots ``tests.qemu.harness.floppy()``'s boot sector: a loop that keeps
    rewriting 512 KiB of RAM. No network, no USB, no balloon: the stream is RAM, a floppy
    controller and the machine's own devices."""
    return f"""\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='fd'/></os>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"}</emulator>
    <disk type='file' device='floppy'>
      <driver name='qemu' type='raw'/>
      <source file='{image}'/>
      <target dev='fda' bus='fdc'/>
      <readonly/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def parse_rawstats(text: str) -> dict[str, int]:
    """``virsh domjobinfo --rawstats``: ``key: value`` lines; the integer ones."""
    stats: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip().lstrip("-").isdigit():
            stats[key.strip()] = int(value.strip())
    return stats


@dataclass(frozen=True)
class Registers:
    cs: int
    eip: int
    eax: int


async def registers(daemon: Libvirtd, domain: str) -> Registers:
    """The guest's CS, EIP and EAX (HMP ``info registers`` through libvirt)."""
    out = await daemon.virsh("qemu-monitor-command", "--hmp", domain, "info registers")
    found = {
        k: re.search(pattern, out)
        for k, pattern in (
            ("cs", r"CS =([0-9a-f]{4})"),
            ("eip", r"EIP=([0-9a-f]{8})"),
            ("eax", r"EAX=([0-9a-f]{8})"),
        )
    }
    values = {k: int(m.group(1), 16) for k, m in found.items() if m is not None}
    if len(values) != len(found):
        raise LibvirtError(f"{daemon.name}: no registers in {out!r}")
    return Registers(**values)
