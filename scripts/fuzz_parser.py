"""Fuzz every sans-IO parser for a bounded time: only events or the parser's own StreamError.

Mutates real QEMU 7.2 stream slices (tests/data/qemu-7.2) and synthetic streams
from tests/streams.py (byte flips, inserts, deletes, splices, truncations), feeds each result in
random chunk sizes to the main-stream, multifd, return-path and postcopy-preempt parsers and
to the device-state decoder, and fails on any other exception or on a parser buffer above its
cap. Uses atheris (coverage-guided) when it is installed and ``--atheris`` is given; otherwise a
seeded random mutator, so a run can be replayed with ``--seed``.

    .venv/bin/python scripts/fuzz_parser.py --seconds 600
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from migtap.annotate.vmsd import VmDescription  # noqa: E402
from migtap.annotate.walk import decode_section  # noqa: E402
from migtap.errors import StreamError  # noqa: E402
from migtap.wire.events import RamBlock  # noqa: E402
from migtap.wire.multifd import MultifdParser  # noqa: E402
from migtap.wire.preempt import PreemptParser, looks_like_preempt  # noqa: E402
from migtap.wire.return_path import ReturnPathParser  # noqa: E402
from migtap.wire.stream import StreamParser  # noqa: E402
from tests.fixtures import fixture  # noqa: E402
from tests.streams import eos, page, sample_stream, zero  # noqa: E402

if TYPE_CHECKING:
    from migtap.wire.parser import Parser

MAX_BUFFERED = 32 * 1024 * 1024  # far above every cap; a parser keeping more is a bug


def corpus() -> list[tuple[str, bytes]]:
    names = (
        "file-precopy.head.bin",
        "postcopy.head.bin",
        "multifd-ch0.first-packets.bin",
        "postcopy.returnpath.bin",
        "precopy-rp.returnpath.bin",
    )
    preempt = page(0x3F000, "pc.ram") + zero(0x40000) + page(0x1000, "pc.bios") + eos()
    return [
        ("sample", sample_stream().data),
        ("preempt", preempt),
        *((n, fixture(n).read_bytes()) for n in names),
    ]


def mutate(rng: random.Random, data: bytes, donors: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(6)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 2:
            del out[pos : pos + rng.randint(1, 64)]
        elif op == 3:
            donor = rng.choice(donors)
            start = rng.randrange(len(donor) + 1)
            out[pos:pos] = donor[start : start + rng.randint(1, 512)]
        elif op == 4:
            del out[pos:]
        elif op == 5 and out:
            out[min(pos, len(out) - 1)] = rng.choice((0x00, 0x01, 0x04, 0x05, 0x06, 0x7E, 0xFF))
    return bytes(out)


def held_bytes(parser: object) -> int:
    """Bytes a parser keeps between feeds (its private buffers; a fuzzer may look inside)."""
    names = ("_buf", "_dev", "_vmdesc")
    held = sum(len(getattr(parser, n, b"") or b"") for n in names)
    inner = getattr(parser, "_b", None)
    return held + len(getattr(inner, "_pending", b"") or b"")


BLOCKS = (RamBlock("pc.ram", 128 << 20), RamBlock("pc.bios", 256 << 10))


def feed(parser: Parser, data: bytes, rng: random.Random) -> None:
    pos = 0
    try:
        while pos < len(data):
            n = rng.choice((1, 2, 7, 64, 4096, 65536, len(data)))
            parser.feed(data[pos : pos + n])
            pos += n
            held = held_bytes(parser)
            if held > MAX_BUFFERED:
                raise AssertionError(f"{type(parser).__name__} holds {held} bytes")
        parser.feed_eof()
    except StreamError:
        pass


def one(data: bytes, rng: random.Random, desc: VmDescription) -> None:
    for make in (StreamParser, MultifdParser, ReturnPathParser):
        feed(make(), data, rng)
    feed(PreemptParser(4096, BLOCKS), data, rng)
    looks_like_preempt(data, [b.idstr for b in BLOCKS])
    device = rng.choice(desc.devices)
    with contextlib.suppress(StreamError):
        decode_section(device, data[rng.randrange(len(data) + 1) :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--atheris", action="store_true", help="coverage-guided, if installed")
    args = parser.parse_args()
    desc = VmDescription.from_json(fixture("vmdesc-pc-i440fx-7.2.json").read_bytes())
    items = corpus()
    donors = [d for _, d in items]
    if args.atheris:
        import atheris  # type: ignore[import-untyped]  # noqa: PLC0415 - optional

        def target(data: bytes) -> None:
            one(data, random.Random(len(data)), desc)

        atheris.Setup([sys.argv[0], f"-max_total_time={int(args.seconds)}"], target)
        atheris.Fuzz()
        return 0
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    deadline = time.monotonic() + args.seconds
    runs = 0
    while time.monotonic() < deadline:
        name, base = rng.choice(items)
        data = mutate(rng, base, donors)
        try:
            one(data, rng, desc)
        except Exception:
            print(f"fuzz: seed {seed}, run {runs}, from {name}: {len(data)} bytes", file=sys.stderr)
            Path("fuzz-crash.bin").write_bytes(data)
            raise
        runs += 1
    print(f"fuzz: {runs} inputs in {args.seconds:.0f} s (seed {seed}): no exception escaped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
