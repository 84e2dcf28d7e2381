"""Benchmark: what ``os.splice`` through a pipe would save a relay, against a copy loop.

A lower bound for any relay's CPU per GiB on this machine: one thread relays a real stream
(``--stream``, sent from user memory) from a sender socket to a discarding receiver on
127.0.0.1, either by copying (``recv_into`` one reused 1 MiB buffer, ``sendall``: socat's
way) or by ``os.splice`` into a pipe and out of it (the bytes never reach user space). CPU is
the relaying thread's own (``time.thread_time``), so neither the sender nor the receiver
counts. Interleaved runs, medians.

    .venv/bin/python scripts/bench_splice.py --runs 5 --stream .cache/bench-parser-1g.bin
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
CHUNK = MiB


def copy_relay(src: socket.socket, dst: socket.socket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := src.recv_into(view):
        dst.sendall(view[:n])


def splice_relay(src: socket.socket, dst: socket.socket) -> None:
    r, w = os.pipe()
    try:
        import fcntl  # noqa: PLC0415 - Linux only, like splice

        fcntl.fcntl(w, 1031, CHUNK)  # F_SETPIPE_SZ: a 1 MiB pipe
        sfd, dfd = src.fileno(), dst.fileno()
        while n := os.splice(sfd, w, CHUNK, flags=os.SPLICE_F_MOVE | os.SPLICE_F_MORE):
            while n:
                n -= os.splice(r, dfd, n, flags=os.SPLICE_F_MOVE | os.SPLICE_F_MORE)
    finally:
        os.close(r)
        os.close(w)


def one_run(stream: memoryview, relay: str) -> tuple[float, float]:
    """GiB/s and the relaying thread's CPU seconds per GiB."""
    sink = socket.create_server(("127.0.0.1", 0))
    front = socket.create_server(("127.0.0.1", 0))
    got = [0]
    cpu = [0.0]

    def receive() -> None:
        conn, _ = sink.accept()
        buf = memoryview(bytearray(4 * MiB))
        with conn:
            while n := conn.recv_into(buf):
                got[0] += n

    def run_relay() -> None:
        src, _ = front.accept()
        with src, socket.create_connection(sink.getsockname()) as dst:
            t0 = time.thread_time()
            (splice_relay if relay == "splice" else copy_relay)(src, dst)
            cpu[0] = time.thread_time() - t0
            dst.shutdown(socket.SHUT_WR)

    threads = [threading.Thread(target=receive), threading.Thread(target=run_relay)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    with socket.create_connection(front.getsockname()) as s:
        for start in range(0, len(stream), 4 * MiB):
            s.sendall(stream[start : start + 4 * MiB])
        s.shutdown(socket.SHUT_WR)
        for t in threads:
            t.join()
    elapsed = time.perf_counter() - t0
    sink.close()
    front.close()
    if got[0] != len(stream):
        raise RuntimeError(f"{relay}: sent {len(stream)}, received {got[0]}")
    gib = len(stream) / GiB
    return gib / elapsed, cpu[0] / gib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stream", type=Path, required=True)
    args = parser.parse_args()
    stream = memoryview(args.stream.read_bytes())
    results: dict[str, list[tuple[float, float]]] = {"copy": [], "splice": []}
    for i in range(args.runs):
        for relay, runs in results.items():
            gibs, cpu = one_run(stream, relay)
            runs.append((gibs, cpu))
            print(f"bench: {i} {relay:6s} {gibs:.2f} GiB/s {cpu:.3f} cpu-s/GiB", file=sys.stderr)
    for relay, runs in results.items():
        g = [r[0] for r in runs]
        c = [r[1] for r in runs]
        print(
            f"{relay:6s} GiB/s {statistics.median(g):.2f} ({min(g):.2f}-{max(g):.2f})  "
            f"cpu-s/GiB {statistics.median(c):.3f} ({min(c):.3f}-{max(c):.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
