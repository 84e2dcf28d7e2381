"""``migtap check SOURCE --against "QEMU_CMD"``: will this stream's device state load there?

SOURCE is a capture directory, a main-channel stream, or a vmdesc JSON file. The target QEMU
runs once with ``-dump-vmstate`` (its command line as given, plus ``-machine TYPE -nodefaults
-display none -dump-vmstate FILE``: it writes the JSON and exits before starting a guest);
:mod:`migtap.annotate.compat` compares every device section of the stream's vmdesc with it.
What this can and cannot see: docs/check.md.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from migtap.annotate.compat import DumpError, SectionCheck, TargetDump, Verdict, check_vmdesc
from migtap.annotate.vmsd import VmDescription
from migtap.capture_format import read_index, read_session
from migtap.errors import ConfigError, MigtapError, StreamError
from migtap.wire import events as ev
from migtap.wire.constants import SectionType
from migtap.wire.stream import StreamParser

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable, Sequence

MAIN_FILE: Final = "src-to-dst.bin"
VMDESC_FILE: Final = "vmdesc.json"
CHUNK_SIZE: Final = 1 << 20
DUMP_TIMEOUT_S: Final = 120.0
EXIT_FAILS: Final = 1
EXIT_USAGE: Final = 2
_ORDER: Final = {Verdict.FAILS: 0, Verdict.UNKNOWN: 1, Verdict.OK: 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        type=Path,
        help="a capture directory, a main-channel stream (src-to-dst.bin) or a vmdesc.json",
    )
    parser.add_argument(
        "--against",
        required=True,
        metavar="QEMU_CMD",
        help="the target QEMU's command line, one string (split like a shell would); migtap "
        "adds -machine, -nodefaults, -display none and -dump-vmstate",
    )
    parser.add_argument(
        "--machine",
        metavar="TYPE",
        help="machine type for the target (default: the stream's, from its configuration "
        "record or the capture's session.json)",
    )
    parser.add_argument("--json", action="store_true", help="one machine-readable JSON document")


@dataclass(slots=True)
class StreamFacts:
    """What the check needs from the source: its vmdesc, machine type, iterable sections."""

    desc: VmDescription
    machine_type: str | None = None
    iterable: list[tuple[str, int | None, int | None]] = field(default_factory=list)


def _vmdesc(raw: bytes, where: Path) -> VmDescription:
    try:
        return VmDescription.from_json(raw)
    except StreamError as exc:
        raise MigtapError(f"{where}: not a usable vmdesc: {exc}") from exc


def read_source(path: Path) -> StreamFacts:
    """The vmdesc, machine type and iterable sections of a capture dir, stream or vmdesc."""
    if path.is_dir():
        return _read_capture(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    if head.lstrip()[:1] == b"{":
        return StreamFacts(_vmdesc(path.read_bytes(), path))
    return _read_stream(path)


def _read_capture(directory: Path) -> StreamFacts:
    vmdesc = directory / VMDESC_FILE
    if not vmdesc.is_file():
        if (directory / MAIN_FILE).is_file():
            return _read_stream(directory / MAIN_FILE)
        raise ConfigError(f"{directory}: neither {VMDESC_FILE} nor {MAIN_FILE}: not a capture")
    facts = StreamFacts(_vmdesc(vmdesc.read_bytes(), vmdesc))
    if (directory / "session.json").is_file():
        session = read_session(directory)
        summary = session.get("summary")
        machine = summary.get("machine_type") if isinstance(summary, dict) else None
        facts.machine_type = machine if isinstance(machine, str) else None
    if (directory / "events.jsonl").is_file():
        for rec in read_index(directory / "events.jsonl"):
            if rec.get("ch", 0) != 0 or rec.get("dir") != "src-to-dst":
                continue
            if rec.get("kind") == "configuration" and facts.machine_type is None:
                facts.machine_type = rec.get("machine_type")
            if rec.get("kind") == "section_header" and rec.get("section_kind") == (
                SectionType.QEMU_VM_SECTION_START.name
            ):
                facts.iterable.append((rec["idstr"], rec.get("instance_id"), rec.get("version_id")))
    return facts


def _read_stream(path: Path) -> StreamFacts:  # noqa: C901 - one branch per record kind
    parser = StreamParser()
    machine: str | None = None
    iterable: list[tuple[str, int | None, int | None]] = []
    vmdesc: ev.VmDescription | None = None

    def take(events: Iterable[ev.Event]) -> None:
        nonlocal machine, vmdesc
        for e in events:
            if isinstance(e, ev.Configuration):
                machine = e.machine_type
            elif isinstance(e, ev.SectionHeader) and e.kind is SectionType.QEMU_VM_SECTION_START:
                iterable.append((e.idstr or "?", e.instance_id, e.version_id))
            elif isinstance(e, ev.VmDescription):
                vmdesc = e

    try:
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK_SIZE):
                take(parser.feed(chunk))
        take(parser.feed_eof())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except StreamError as exc:
        if vmdesc is None:
            raise MigtapError(f"{path}: not a migration stream migtap can read: {exc}") from exc
    if vmdesc is None:
        raise MigtapError(
            f"{path}: the stream has no VMDESCRIPTION (postcopy, cut short?): check a vmdesc "
            "of the same machine type and QEMU instead"
        )
    return StreamFacts(_vmdesc(vmdesc.json_bytes, path), machine, iterable)


def dump_command(against: str, machine: str | None, out: Path) -> list[str]:
    """The target's command line that writes its -dump-vmstate JSON to ``out`` and exits."""
    try:
        argv = shlex.split(against)
    except ValueError as exc:
        raise ConfigError(f"--against: {exc}") from exc
    if not argv:
        raise ConfigError("--against: an empty command")
    machine_args = ["-machine", machine] if machine else []
    return [*argv, *machine_args, "-nodefaults", "-display", "none", "-dump-vmstate", str(out)]


@dataclass(frozen=True, slots=True)
class DumpResult:
    dump: TargetDump | None
    refused_machine: str | None = None  # QEMU's own line when it does not know the machine


def run_dump(against: str, machine: str | None) -> DumpResult:
    """Run the target QEMU; its parsed dump, or the line saying it lacks the machine type."""
    with tempfile.TemporaryDirectory(prefix="migtap-check-") as tmp:
        out = Path(tmp) / "vmstate.json"
        argv = dump_command(against, machine, out)
        try:
            done = subprocess.run(  # noqa: S603 - the user's own command line
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=DUMP_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"--against: cannot run {argv[0]}: {exc}") from exc
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raw = out.read_bytes() if out.is_file() else b""
    if done.returncode != 0 or not raw:
        for line in lines:
            if "machine type" in line.lower():
                return DumpResult(None, line.strip())
        last = lines[-1].strip() if lines else "no message"
        raise ConfigError(
            f"--against: the target QEMU wrote no -dump-vmstate output (exit code "
            f"{done.returncode}): {last}"
        )
    try:
        return DumpResult(TargetDump.from_json(json.loads(raw)))
    except (ValueError, DumpError) as exc:
        raise ConfigError(
            f"--against: the target's -dump-vmstate output is unusable: {exc}"
        ) from exc


def check(facts: StreamFacts, result: DumpResult, machine: str | None) -> list[SectionCheck]:
    """Every section's verdict, in the stream's order (configuration, iterable, devices)."""
    rows: list[SectionCheck] = []
    target_machine = result.dump.machine if result.dump is not None else machine
    problem = None
    if result.refused_machine is not None:
        problem = f"the target does not run machine type {machine!r}: {result.refused_machine}"
    elif facts.machine_type and target_machine and facts.machine_type != target_machine:
        problem = (
            f"the stream's machine type is {facts.machine_type!r}, the target runs "
            f"{target_machine!r}: QEMU refuses the configuration record"
        )
    if problem is not None:
        config = "configuration"
        rows.append(SectionCheck(config, None, config, None, Verdict.FAILS, (problem,)))
    for idstr, instance_id, version in facts.iterable:
        what = "RAM" if idstr == "ram" else "an iterable section"
        reason = (
            f"{what}: described neither by the vmdesc nor by -dump-vmstate; "
            "migtap replay loads it for real"
        )
        rows.append(SectionCheck(idstr, instance_id, None, version, Verdict.UNKNOWN, (reason,)))
    if result.dump is not None:
        rows += check_vmdesc(facts.desc, result.dump)
    return rows


def report(rows: Sequence[SectionCheck]) -> dict[str, Any]:
    verdict = Verdict.FAILS if any(r.verdict is Verdict.FAILS for r in rows) else Verdict.OK
    return {"verdict": str(verdict), "sections": [r.as_dict() for r in rows]}


def write_table(rows: Sequence[SectionCheck], header: str, out: TextIO) -> None:
    """A table, failing sections first (then unknown, then ok), each reason on its own line."""
    ordered = sorted(rows, key=lambda r: _ORDER[r.verdict])
    cells = [
        (str(r.verdict), r.idstr, "-" if r.instance_id is None else str(r.instance_id),
         r.vmsd_name or "-", "-" if r.version is None else str(r.version))
        for r in ordered
    ]  # fmt: skip
    titles = ("verdict", "section", "instance", "vmsd", "version")
    widths = [max(len(c[i]) for c in [titles, *cells]) for i in range(len(titles))]
    out.write(header + "\n")
    out.write("  ".join(t.ljust(w) for t, w in zip(titles, widths, strict=True)).rstrip() + "\n")
    for row, cell in zip(ordered, cells, strict=True):
        out.write("  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip())
        out.write("\n")
        out.writelines(f"    {reason}\n" for reason in row.reasons)
    counts = {v: sum(1 for r in rows if r.verdict is v) for v in Verdict}
    failing = counts[Verdict.FAILS]
    out.write(f"{'FAILS' if failing else 'OK'}: {counts[Verdict.OK]} ok, {failing} fails, "
              f"{counts[Verdict.UNKNOWN]} unknown\n")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Entry point of ``migtap check``; the exit code (1 when a section fails)."""
    out: TextIO = sys.stdout
    if not args.source.exists():
        raise ConfigError(f"{args.source}: no such file or directory")
    facts = read_source(args.source)
    machine = args.machine or facts.machine_type
    result = run_dump(args.against, machine)
    rows = check(facts, result, machine)
    doc = report(rows)
    if args.json:
        json.dump(doc, out, indent=2)
        out.write("\n")
    else:
        target = result.dump.machine if result.dump is not None else machine
        write_table(rows, f"{args.source} against {args.against} (machine {target})", out)
    return EXIT_FAILS if doc["verdict"] == Verdict.FAILS else 0
