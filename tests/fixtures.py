"""Locate the project's own real-QEMU fixtures under tests/data/ (made by scripts/make_fixtures.py).

``tests/data/qemu-7.2/`` holds small slices of streams captured from QEMU 7.2; its README.md says
what each file is and how it was made.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_SET = "qemu-7.2"  # a bare file name means a file of this set


def fixture(name: str) -> Path:
    """Path of ``name`` under tests/data/ (``qemu-7.2/postcopy.head.bin``); a bare file name
    (``postcopy.head.bin``) is looked up in tests/data/qemu-7.2/.

    Fails with a clear message, rather than letting a test skip, when the file is missing.
    """
    tried = [DATA / name]
    if "/" not in name:
        tried.append(DATA / DEFAULT_SET / name)
    for path in tried:
        if path.is_file():
            return path
    msg = f"fixture {name!r} not found (tried {', '.join(map(str, tried))})"
    raise FileNotFoundError(msg)
