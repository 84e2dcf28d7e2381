"""The exact feeding of ``migtap replay`` (``MainFeeder``) against a fake destination that
reads as QEMU does: from its socket only when the bytes it holds cannot satisfy the next field,
then whatever is available, up to 32 KiB (``qemu_fill_buffer``). Whatever record it stops in,
at its start or after reading all of it, the feeder names that record, never the next one."""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING

import pytest

from migtap.relay.replay import MainFeeder
from migtap.replay_plan import failing_unit, plan_units, scan_stream
from tests.test_replay_plan import precopy

if TYPE_CHECKING:
    from pathlib import Path

    from migtap.replay_plan import Unit

QEMU_FILE_BUFFER = 32 * 1024


class FakeDestination(threading.Thread):
    """Reads records like QEMU's loader and closes in record ``fail_in`` (None: never)."""

    def __init__(self, sock: socket.socket, units: list[Unit], fail_in: int | None, when: str):
        super().__init__(daemon=True)
        self.sock, self.units, self.fail_in, self.when = sock, units, fail_in, when
        self.have = 0  # stream bytes read from the socket so far

    def need(self, upto: int) -> None:
        while self.have < upto:
            data = self.sock.recv(QEMU_FILE_BUFFER)
            if not data:
                raise EOFError
            self.have += len(data)

    def run(self) -> None:
        try:
            for n, unit in enumerate(self.units):
                self.need(unit.offset + 1)  # the record's type byte
                if n == self.fail_in and self.when == "start":
                    return  # e.g. an unknown section: its header is enough to fail
                self.need(unit.end)
                if n == self.fail_in and self.when == "end":
                    return  # e.g. a post_load that fails after every field was read
        except EOFError:
            pass
        finally:
            self.sock.close()


def feed(tmp_path: Path, fail_in: int | None, when: str) -> tuple[list[Unit], object]:
    data = precopy()
    path = tmp_path / "stream.bin"
    path.write_bytes(data)
    events, length, _ = scan_stream(path)
    units = plan_units(events, length)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dest = FakeDestination(theirs, units, fail_in, when)
    dest.start()
    feeder = MainFeeder(ours, path, units, exact=True, stall_s=10, linger_s=5)
    try:
        result = feeder.run()
    finally:
        ours.close()
    dest.join(5)
    return units, result


@pytest.mark.parametrize("when", ["start", "end"])
@pytest.mark.parametrize("fail_in", range(15))
def test_the_record_it_stopped_in_is_named(tmp_path: Path, fail_in: int, when: str) -> None:
    units, result = feed(tmp_path, fail_in, when)
    assert len(units) == 15
    progress = result.progress  # type: ignore[attr-defined]
    assert progress.closed
    assert failing_unit(units, progress) == units[fail_in]
    assert progress.consumed <= units[fail_in].end
    if when == "end":
        assert progress.consumed >= units[fail_in].end or fail_in == len(units) - 1


def test_a_destination_that_reads_everything(tmp_path: Path) -> None:
    units, result = feed(tmp_path, None, "never")
    progress = result.progress  # type: ignore[attr-defined]
    assert progress.all_read
    assert progress.consumed == progress.written == units[-1].end
    assert failing_unit(units, progress) == units[-1]
