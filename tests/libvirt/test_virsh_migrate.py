"""``virsh migrate --live --p2p`` between two real libvirt 9.0 daemons, through migtap.

The source daemon's QEMU sends the migration to ``--migrateuri tcp://127.0.0.1:PORT``, where an
in-process migtap listens; libvirt makes the destination's QEMU listen on the destination
daemon's own loopback address (``--listen-address``) at that same PORT, and migtap forwards
there (``--forward HOST``: the port the connection came in on). A fixed PORT, not libvirt's
migration port range: with a range, libvirt picks the port by binding the wildcard address
(``virPortAllocatorBindToPort``), which fails on every port a tap on the same host listens on
("Unable to find an unused port in range 'migration'"); a ranged migtap must run on another
host (or network namespace) than the destination's libvirtd, as in the last test here.

The guest keeps rewriting its RAM; after the migration it runs on at the destination.
migtap's summary must say ``completed`` with libvirt's own page counts (``virsh domjobinfo
--completed``, read on the source: ``memory_normal`` and ``memory_constant`` are pages;
``memory_normal_bytes`` is bytes, ``memory_page_size`` times the pages).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import pytest
from structlog.testing import capture_logs

from migtap.config import Address, Config
from migtap.relay.server import Relay
from migtap.tap import TapSettings
from tests.libvirt.daemons import Libvirtd, domain_xml, parse_rawstats, registers
from tests.qemu.harness import BOOT_LOOP

if TYPE_CHECKING:
    from pathlib import Path

ONE_LOOP = pytest.mark.asyncio(loop_factories=["asyncio"])
pytestmark = ONE_LOOP


SESSION_EVENTS = ("session_started", "session_ended", "migration_summary", "channel_opened")


@dataclasses.dataclass
class Migrated:
    stats: dict[str, int]  # virsh domjobinfo --completed --rawstats on the source
    summary: dict[str, Any]  # migtap's migration_summary
    logs: list[dict[str, Any]]
    elapsed_s: float  # virsh migrate alone


async def wait_in_loop(daemon: Libvirtd, domain: str, timeout_s: float = 20) -> None:
    """Until the guest runs its loop and has finished a pass (EAX counts the passes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        regs = await registers(daemon, domain)
        if regs.cs == 0 and regs.eip in BOOT_LOOP and regs.eax > 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{daemon.name}: {domain} not in its loop: {regs}")
        await asyncio.sleep(0.05)


async def assert_runs_on(daemon: Libvirtd, domain: str, timeout_s: float = 10) -> None:
    """The domain is running there, in the guest's loop, and the loop makes progress."""
    assert (await daemon.virsh("domstate", domain)).strip() == "running"
    first = await registers(daemon, domain)
    assert first.cs == 0, first
    assert first.eip in BOOT_LOOP, first
    deadline = time.monotonic() + timeout_s
    while (now := await registers(daemon, domain)).eax == first.eax:
        assert time.monotonic() < deadline, f"{daemon.name}: the guest stopped at {now}"
        await asyncio.sleep(0.05)
    assert now.eip in BOOT_LOOP, now


async def migrate_through_migtap(
    daemons: tuple[Libvirtd, Libvirtd],
    guest_image: Path,
    domain: str,
    *flags: str,
    port_range: tuple[int, int] | None = None,
) -> Migrated:
    """``port_range``: migtap listens on the destination's migration port range and the
    --migrateuri names no port (libvirt picks one); else on one port that the URI names."""
    src, dst = daemons
    xml = guest_image.parent / f"{domain}.xml"
    xml.write_text(domain_xml(domain, guest_image))
    # Persistent on the source: after the migration it stays defined (shut off, "migrated"),
    # and its completed job's statistics can still be read there.
    await src.virsh("define", str(xml))
    try:
        await src.virsh("start", domain)
        await wait_in_loop(src, domain)
        # The tap's listening port is also the destination QEMU's: libvirt makes it listen on
        # --listen-address at the --migrateuri's port, and migtap forwards to the port each
        # connection came in on (--forward HOST).
        listen = Address("127.0.0.1", *port_range) if port_range else Address("127.0.0.1", 0)
        config = Config(listen=listen, forward=Address(dst.address, None), grace_period_s=2.0)
        with capture_logs() as logs:
            async with Relay(config, tap=TapSettings(progress_interval_s=0.2)) as relay:
                uri = "tcp://127.0.0.1" if port_range else f"tcp://127.0.0.1:{relay.port}"
                t0 = time.monotonic()
                await src.virsh(
                    "migrate", "--live", "--p2p", *flags, domain, dst.tcp_uri,
                    "--migrateuri", uri, "--listen-address", dst.address,
                )  # fmt: skip
                elapsed = time.monotonic() - t0
                async with asyncio.timeout(15):
                    while not relay.sessions_ended:
                        await asyncio.sleep(0.02)
        reason = (await src.virsh("domstate", "--reason", domain)).strip()
        assert reason == "shut off (migrated)", reason
        raw = await src.virsh("domjobinfo", "--completed", "--keep-completed", "--rawstats", domain)
        await assert_runs_on(dst, domain)
    finally:
        if domain in dst.domains():
            await dst.virsh("destroy", domain)
        if domain in src.domains():
            await src.virsh("destroy", domain)
        await src.virsh("undefine", domain)
    summaries = [e for e in logs if e["event"] == "migration_summary"]
    assert len(summaries) == 1, [e for e in logs if e["event"] in SESSION_EVENTS]
    (summary,) = summaries
    return Migrated(parse_rawstats(raw), summary, logs, elapsed)


def assert_counts_are_libvirts(m: Migrated) -> None:
    """migtap's summary: completed, with libvirt's own page counts; the tap never detached."""
    s, stats = m.summary, m.stats
    assert s["outcome"] == "completed", s
    assert stats["operation"] == 5  # VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT
    assert stats["memory_page_size"] == 4096
    assert stats["memory_normal_bytes"] == stats["memory_normal"] * stats["memory_page_size"]
    assert s["ram_normal_pages"] == stats["memory_normal"], f"migtap {s}, libvirt {stats}"
    assert s["ram_zero_pages"] == stats["memory_constant"], (s, stats)
    # 64 MiB of guest RAM (plus ROMs) went through migtap, each page once at least.
    assert s["ram_normal_pages"] + s["ram_zero_pages"] >= 64 * 256
    assert s["machine_type"] == "pc-i440fx-7.2"
    broken = ("parser_detached", "parser_crashed", "sink_detached", "observer_detached")
    assert not [e for e in m.logs if e["event"] in broken]


async def test_precopy(daemons: tuple[Libvirtd, Libvirtd], guest_image: Path) -> None:
    m = await migrate_through_migtap(daemons, guest_image, "migtap-precopy")
    assert_counts_are_libvirts(m)
    assert m.summary["channel_kinds"] == ["main"]
    assert m.summary["ram_normal_pages_resent"] == 0
    assert m.summary["vmdesc"] is True
    assert m.summary["devices_failed"] == 0
    assert m.summary["last_phase"] == "stop-and-copy"


async def test_multifd(daemons: tuple[Libvirtd, Libvirtd], guest_image: Path) -> None:
    """``--parallel``: libvirt sets multifd on both QEMUs; the source opens the main channel
    and two multifd channels to migtap, which connects them upstream in that order (a 7.2
    destination takes the first connection as the main channel)."""
    m = await migrate_through_migtap(
        daemons, guest_image, "migtap-multifd", "--parallel", "--parallel-connections", "2"
    )
    assert_counts_are_libvirts(m)
    assert m.summary["channel_kinds"] == ["main", "multifd", "multifd"]


async def test_postcopy(daemons: tuple[Libvirtd, Libvirtd], guest_image: Path) -> None:
    """``--postcopy-after-precopy`` switches after the first pass; at 1 MiB/s the first pass
    takes over a second and the guest keeps 512 KiB dirty, so precopy cannot finish first."""
    m = await migrate_through_migtap(
        daemons, guest_image, "migtap-postcopy",
        "--postcopy", "--postcopy-after-precopy", "--bandwidth", "1",
    )  # fmt: skip
    assert_counts_are_libvirts(m)
    assert m.summary["last_phase"] == "postcopy"
    assert any(e["event"] == "migration_phase" and e["phase"] == "postcopy" for e in m.logs)
    assert m.summary["postcopy_requests"] == m.stats["memory_postcopy_requests"]
    assert m.summary["bytes_dst_to_src"] > 0  # the return path, through migtap too


async def test_multifd_through_a_port_range(
    netns_daemons: tuple[Libvirtd, Libvirtd], guest_image: Path
) -> None:
    """libvirt's own way: ``--migrateuri tcp://TAP`` without a port, the destination's libvirt
    picks one from its migration port range, and ``migtap listen TAP:FIRST-LAST --forward
    DEST`` forwards each connection to DEST at the port it came in on. The destination daemon
    runs in a network namespace of its own (a host of its own, over a veth pair): on the tap's
    host, libvirt's port check would find every port of the range taken by migtap."""
    src, dst = netns_daemons
    m = await migrate_through_migtap(
        netns_daemons, guest_image, "migtap-range", "--parallel", "--parallel-connections", "2",
        port_range=dst.migration_ports,
    )  # fmt: skip
    assert_counts_are_libvirts(m)
    assert m.summary["channel_kinds"] == ["main", "multifd", "multifd"]
    (started,) = [e for e in m.logs if e["event"] == "session_started"]
    first, last = dst.migration_ports
    listener_port = int(started["listener"].rsplit(":", 1)[1])
    assert first <= listener_port <= last, started
    assert src.address.startswith("127.")
