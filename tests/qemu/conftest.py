from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from migtap.config import Address, Config
from migtap.relay.server import Relay
from migtap.tap import TapSettings

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractAsyncContextManager

collect_ignore: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/qemu/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.qemu)


ROOT = Path(__file__).resolve().parents[2]


def qemu_tree(script: str) -> Path:
    """Build (once per machine) the Debian tree of another QEMU with ``scripts/<script>`` and
    return it. Fails the test, never skips it, when it cannot be built."""
    t0 = time.monotonic()
    try:
        # Under pytest-timeout's 300 s for the first test, so that a slow mirror gets this message.
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / script)],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"scripts/{script} still running after {e.timeout} s", pytrace=False)
    if done.returncode != 0:
        pytest.fail(
            f"scripts/{script} failed ({done.returncode}) after {time.monotonic() - t0:.0f} s:\n"
            f"{done.stderr[-4000:]}",
            pytrace=False,
        )
    return Path(done.stdout.strip().splitlines()[-1])


def relay_config(forward_port: int, **kw: object) -> Config:
    return Config(
        listen=Address("127.0.0.1", 0),
        forward=Address("127.0.0.1", forward_port),
        grace_period_s=2.0,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def make_relay() -> Callable[..., AbstractAsyncContextManager[Relay]]:
    """An in-process migtap between source and destination, with the tap on by default."""

    def make(
        forward_port: int, *, tap: TapSettings | None = None, relay_only: bool = False, **kw: object
    ) -> AbstractAsyncContextManager[Relay]:
        settings = None if relay_only else (tap or TapSettings(progress_interval_s=0.2))
        return Relay(relay_config(forward_port, **kw), tap=settings)

    return make
