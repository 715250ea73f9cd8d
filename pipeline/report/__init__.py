"""Turn stage two's grid folders into the paper's tables (CSV) beside the authors' published numbers, then figures.

Reads ``<grid>/results.csv``, ``<grid>/selection.csv`` (format:
``pipeline.results``; README "Results and selection") and, for the figures
and tie.csv, the selected runs' ``head.safetensors`` and ``embeddings.npz``;
writes into ``out`` (README "Reports"):

* ``acc.csv``, ``ap.csv`` (paper Tables 2/3), ``best.csv`` (Table 1),
  ``ablations.csv`` (Table 4), ``robustness.csv`` (Table 5), ``epochs.csv``,
  ``fractions.csv``, ``ldm.csv`` (the studies), ``tie.csv`` (TIE block
  importance), ``grid.csv`` (every run with its means), ``metrics.csv``
  (every ok row): see ``pipeline.report.tables``;
* PNG figures: see ``pipeline.report.figures``.

Means follow ``pipeline.results``: over the paper's 20 test sets when any is
present (other sets keep their columns and are named in
``excluded_from_avg``), NaN values skipped. A table without inputs is
skipped with its reason (and any stale copy removed). All tables are written
before any figure; figures (matplotlib, imported only here and lazily) never
stop the tables, and each failure is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .inputs import GridResults, ReportError, read_grid_dir
from .tables import SkippedOutput, build_tables, write_table

__all__ = ["ReportConfig", "ReportError", "ReportSummary", "SkippedOutput", "run_report"]


@dataclass(frozen=True)
class ReportConfig:
    grid_dirs: tuple[Path, ...]
    out: Path = Path("reports")
    plots: bool = True


@dataclass(frozen=True)
class ReportSummary:
    out: Path
    written: tuple[Path, ...]
    skipped: tuple[SkippedOutput, ...]

    def report(self) -> str:
        """Human-readable lines: where the files went and what was skipped, and why."""
        lines = [f"wrote {len(self.written)} file(s) to {self.out}"]
        lines += [f"  {path.name}" for path in self.written]
        lines += [f"skipped {item.name}: {item.reason}" for item in self.skipped]
        return "\n".join(lines)


def write_figures(grids: Sequence[GridResults], out: Path) -> tuple[list[Path], list[SkippedOutput]]:
    """Prepare and draw every figure in its own try: a failure is reported, never raised."""
    try:
        from . import figures
    except ImportError as error:
        return [], [SkippedOutput("plots", f"matplotlib is not available ({error}); tables only")]
    except Exception as error:  # noqa: BLE001 - a broken matplotlib must not take the tables down
        return [], [SkippedOutput("plots", f"matplotlib failed to load ({type(error).__name__}: {error}); tables only")]
    written: list[Path] = []
    skipped: list[SkippedOutput] = []
    for label, prepare in figures.plot_preparers(grids, out):
        try:
            jobs = prepare()
        except Exception as error:  # noqa: BLE001
            skipped.append(SkippedOutput(label, f"plot failed: {type(error).__name__}: {error}"))
            continue
        for job in jobs:
            if isinstance(job, SkippedOutput):
                skipped.append(job)
                continue
            name, draw = job
            try:
                written.append(draw())
            except Exception as error:  # noqa: BLE001 - a plot must never take the tables down
                skipped.append(SkippedOutput(name, f"plot failed: {type(error).__name__}: {error}"))
    return written, skipped


def run_report(config: ReportConfig) -> ReportSummary:
    """Read the grid folders, write every table whose inputs exist, then the figures."""
    if not config.grid_dirs:
        raise ReportError("no grid folders given")
    grids = [read_grid_dir(Path(path)) for path in config.grid_dirs]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    skipped: list[SkippedOutput] = []
    for outcome in build_tables(grids):
        if isinstance(outcome, SkippedOutput):
            (out / outcome.name).unlink(missing_ok=True)  # no stale copy of a table this report did not make
            skipped.append(outcome)
        else:
            written.append(write_table(out, outcome))
    if config.plots:
        figure_paths, figure_skipped = write_figures(grids, out)
        written += figure_paths
        skipped += figure_skipped
    return ReportSummary(out=out, written=tuple(written), skipped=tuple(skipped))
