"""The live picture of a migration, as log lines: phases, rounds, progress, the summary.

``ProgressObserver`` reads the session model (``migtap.model``) and logs ``migration_phase`` at
every phase change, ``ram_round_finished`` per finished round, ``qemu_generation_inferred`` when
a version range narrows, ``destination_shut``, ``migration_progress`` once per progress interval
(the tap's tick), and one ``migration_summary`` line at the end: an interface that users script
against, so its keys only grow. The rules behind the numbers are the model's (docs/tap.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, assert_never

import structlog

from migtap.model import (
    ConvergenceChanged,
    DestinationShut,
    DevicesDecoded,
    GenerationNarrowed,
    PhaseChanged,
    RoundFinished,
)
from migtap.observers.base import Observer
from migtap.vocabulary import Direction

if TYPE_CHECKING:
    from migtap.model import Change, Convergence, Migration
    from migtap.vocabulary import SessionSummary

log = structlog.get_logger("migtap.progress")
MiB: Final = 1024 * 1024


def bulk_coverage(m: Migration, now: float) -> tuple[float | None, float | None]:
    """In the bulk round: the share of guest RAM sent (%) and the time left at the round's pace
    so far (s, None at 0 % or 100 %); ``(None, None)`` outside it."""
    remaining = m.remaining_bulk_bytes()
    rnd = m.round
    if remaining is None or rnd is None:
        return None, None
    covered = 1 - remaining / m.ram_total
    eta = None
    if 0 < covered < 1:
        eta = round((now - rnd.started) / covered * (1 - covered), 1)
    return round(covered * 100, 1), eta


class ProgressObserver(Observer):
    """Logs one session's progress and summary (module docstring)."""

    def __init__(self, migration: Migration) -> None:
        super().__init__(migration)
        self.log = log.bind(session=migration.session_id)

    def on_change(self, change: Change) -> None:
        m = self.migration
        match change:
            case PhaseChanged():
                fields: dict[str, object] = {}
                if change.first_section is not None:
                    fields["first_section"] = change.first_section
                self.log.info(
                    "migration_phase",
                    phase=change.text,
                    elapsed_s=round(change.at - m.started, 3),
                    **fields,
                )
            case RoundFinished(round=rnd, dirty_rate_bytes_s=rate):
                self.log.info(
                    "ram_round_finished",
                    round=rnd.number,
                    duration_s=round(rnd.duration_s(m.now), 3),
                    pages_normal=rnd.normal,
                    pages_zero=rnd.zero,
                    pages_xbzrle=rnd.xbzrle,
                    dirty_rate_mib_s=None if rate is None else round(rate / MiB, 1),
                )
            case GenerationNarrowed():
                self.log.info(
                    "qemu_generation_inferred",
                    side=change.side.value,
                    qemu=change.qemu,
                    sign=change.sign,
                    machine_type=m.generation.machine_type,
                )
            case DestinationShut(value=value):
                self.log.info("destination_shut", value=value, ok=value == 0)
            case ConvergenceChanged(judgment=judgment):
                self._convergence(judgment)
            case DevicesDecoded():
                pass  # the annotate observer reports device state
            case _:
                assert_never(change)

    def _convergence(self, judgment: Convergence) -> None:
        figures = judgment.as_dict()
        del figures["converging"]
        if judgment.converging:
            self.log.info(
                "migration_converged",
                **figures,
                after="a warning that it was not converging",
            )
            return
        self.log.warning(
            "migration_not_converging",
            **figures,
            action=(
                "the guest dirties memory as fast as the wire carries it: raise max-bandwidth "
                "(if the link has room), raise downtime-limit (accepts a longer pause), enable "
                "auto-converge or dirty-limit (slows the guest), or switch to postcopy "
                "(migrate-start-postcopy, with postcopy-ram set on both sides)"
            ),
        )

    def on_tick(self) -> None:
        """One ``migration_progress`` line (the tap calls this once per interval)."""
        m = self.migration
        now = m.now
        channels = [
            {
                "ch": ch.index,
                "kind": ch.label,
                "bytes": ch.bytes_src_to_dst + ch.bytes_dst_to_src,
                "rate_mib_s": round(m.channel_rates.get(ch.index, 0.0) / MiB, 1),
            }
            for ch in m.channels
        ]
        fields: dict[str, object] = {
            "phase": m.phase_text,
            "elapsed_s": round(now - m.started, 1),
            "bytes_src_to_dst": m.bytes_total(Direction.SRC_TO_DST),
            "rate_mib_s": round(m.rate_bytes_s / MiB, 1),
            "ram_normal_pages": m.normal,
            "ram_zero_pages": m.zero,
            "ram_xbzrle_pages": m.xbzrle,
            "channels": channels,
        }
        rnd = m.round
        if rnd is not None:
            fields["round"] = rnd.number
            fields["round_pages"] = {"normal": rnd.normal, "zero": rnd.zero, "xbzrle": rnd.xbzrle}
            covered_pct, eta_s = bulk_coverage(m, now)
            if covered_pct is not None:
                fields["bulk_covered_pct"] = covered_pct
                if eta_s is not None:
                    fields["bulk_eta_s"] = eta_s
        self.log.info("migration_progress", **fields)

    def close(self, summary: SessionSummary) -> None:
        self.log.info("migration_summary", **summary.fields)
