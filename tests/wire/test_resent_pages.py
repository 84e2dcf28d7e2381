"""QEMU 7.2 multifd's repeated page (``ResentPages``): the shapes seen on real streams."""

from __future__ import annotations

import itertools

import pytest

from migtap.wire.events import MultifdPacket
from migtap.wire.multifd import ResentPages

PAGE = 4096


def packet(num: int, first: int | None, last: int | None, pages: int, *, block: str = "pc.ram"):
    return MultifdPacket(
        offset=0, flags=0, packet_num=num, pages_alloc=128, normal_pages=pages, zero_pages=0,
        next_packet_size=pages * PAGE, ramblock=block, payload_bytes=pages * PAGE,
        sync=False, first_page=first, last_page=last,
    )  # fmt: skip


def count(packets: list[MultifdPacket]) -> int:
    resent = ResentPages()
    for p in packets:
        resent.note(p)
    return resent.count


#: A real ``virsh migrate --parallel --parallel-connections 2`` (QEMU 7.2, two channels) that
#: QEMU counted as 357 normal pages: 359 on the wire. Packet 3 repeats packet 2's last page;
#: packet 9 repeats packet 7's, and 8 never appears (the sync gave that packet its own number).
LIBVIRT_RUN = [
    packet(0, None, None, 0),
    packet(1, None, None, 0),
    packet(2, 0, 573440, 128),
    packet(3, 573440, 50327552, 56),
    packet(5, 73728, 258048, 46, block="pc.bios"),
    packet(6, None, None, 0),
    packet(7, 65536, 585728, 128),
    packet(10, None, None, 0),
    packet(9, 585728, 585728, 1),
]


#: Another such run, also 357 for QEMU: packet 2's last page is repeated in the pc.ram packet
#: that a sync numbered 6, after the pc.bios packet (5) that was filled after it.
LIBVIRT_RUN_RENUMBERED = [
    packet(0, None, None, 0),
    packet(1, None, None, 0),
    packet(2, 0, 573440, 128),
    packet(5, 73728, 258048, 46, block="pc.bios"),
    packet(6, 573440, 50327552, 56),
    packet(8, None, None, 0),
    packet(9, 65536, 585728, 128),
]


@pytest.mark.parametrize("run", [LIBVIRT_RUN, LIBVIRT_RUN_RENUMBERED], ids=["gap", "renumbered"])
def test_real_runs(run: list[MultifdPacket]) -> None:
    assert sum(p.normal_pages for p in run) - count(run) == 357


@pytest.mark.parametrize("run", [LIBVIRT_RUN, LIBVIRT_RUN_RENUMBERED], ids=["gap", "renumbered"])
def test_any_arrival_order_counts_each_repeat_once(run: list[MultifdPacket]) -> None:
    repeats = count(run)
    for order in itertools.permutations(p for p in run if p.first_page is not None):
        assert count(list(order)) == repeats, order


def test_a_full_packets_last_page_is_repeated_once_at_most() -> None:
    full = packet(2, 0, 127 * PAGE, 128)
    assert (
        count([full, packet(3, 127 * PAGE, 130 * PAGE, 4), packet(4, 127 * PAGE, 127 * PAGE, 1)])
        == 1
    )


def test_only_a_full_packet_has_its_last_page_repeated() -> None:
    """QEMU's race is in handing over a full packet; a shorter one ends a block or a pass."""
    assert count([packet(2, 0, 8 * PAGE, 9), packet(3, 8 * PAGE, 20 * PAGE, 13)]) == 0
    assert count([packet(2, 0, 127 * PAGE, 128), packet(3, 127 * PAGE, 140 * PAGE, 14)]) == 1


def test_another_block_or_page_is_no_repeat() -> None:
    full = packet(2, 0, 127 * PAGE, 128)
    assert count([full, packet(3, 127 * PAGE, 140 * PAGE, 14, block="pc.bios")]) == 0
    assert count([full, packet(3, 128 * PAGE, 140 * PAGE, 13)]) == 0
    assert count([full, packet(2 + ResentPages.GAP + 1, 127 * PAGE, 127 * PAGE, 1)]) == 0
