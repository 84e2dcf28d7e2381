from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest

from tests.libvirt.daemons import Libvirtd, libvirt_pair
from tests.qemu.harness import floppy

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/libvirt/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.libvirt)


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Libvirtd, Libvirtd]]:
    """A source and a destination libvirtd, started once for the module, stopped by PID."""
    with libvirt_pair(tmp_path_factory.mktemp("libvirt")) as pair:
        yield pair


@pytest.fixture(scope="module")
def netns_daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Libvirtd, Libvirtd]]:
    """The same, with the destination in a network namespace of its own (over a veth pair) and
    a random migration port range of four ports (migtap listens on the same range here)."""
    first = random.SystemRandom().randrange(20000, 29000)
    workdir = tmp_path_factory.mktemp("libvirt-netns")
    with libvirt_pair(workdir, migration_ports=(first, first + 3), dst_netns=True) as pair:
        yield pair


@pytest.fixture(scope="module")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The boot floppy of a guest that keeps rewriting 512 KiB of its RAM."""
    return floppy(tmp_path_factory.mktemp("guest"))
