"""Locate the shared, read-only reference fixtures (real QEMU streams and vmdescs)."""

from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def fixture(name: str) -> Path:
    """Path of ``name`` under the shared reference directory; fails clearly if it is missing."""
    path = SHARED / "reference" / name
    if not path.is_file():
        msg = f"shared fixture {name!r} not found at {path} (is {SHARED} mounted?)"
        raise FileNotFoundError(msg)
    return path
