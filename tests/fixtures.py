"""Locate the shared, read-only reference fixtures (real QEMU streams and vmdescs)."""

from __future__ import annotations

import os
from pathlib import Path

# The read-only reference material lives beside the checkout (../shared); MIGTAP_SHARED overrides,
# and a clone elsewhere (CI's clean clone) falls back to the workspace's /work/shared.
_CANDIDATES = [
    *([Path(os.environ["MIGTAP_SHARED"])] if os.environ.get("MIGTAP_SHARED") else []),
    Path(__file__).resolve().parents[1].parent / "shared",
    Path("/work/shared"),
]
SHARED = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
_ROOTS = (SHARED, SHARED / "reference", SHARED / "reference" / "fixtures-qemu-7.2")


def fixture(name: str) -> Path:
    """Path of ``name`` relative to shared/, shared/reference/ or its fixtures-qemu-7.2/.

    Fails with a clear message, rather than letting a test skip, when the file is missing.
    """
    for root in _ROOTS:
        path = root / name
        if path.is_file():
            return path
    tried = ", ".join(str(root / name) for root in _ROOTS)
    msg = f"shared fixture {name!r} not found (tried {tried}); is {SHARED} present?"
    raise FileNotFoundError(msg)
