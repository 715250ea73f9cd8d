"""Turn stage two's grid folders into the paper's tables (CSV) beside the authors' numbers, figures and one page.

Reads each grid folder's ``results.csv``, ``selection.csv`` and the runs' folders (``results.run_folder``);
writes the tables (``tables.py``, ``studies.py``, ``analysis_tables.py``, ``cross_dataset.py``), then the figures (``figures.py``,
``run_figures.py``; matplotlib, imported lazily, never stops the tables or the page) and ``index.html``
(``html.py``). A table without inputs is skipped with its reason. What each file holds: docs/reports.md.
"""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..files import disk_errors_explained
from ..results.bootstrap import BootstrapConfig
from .analysis import ReportAnalysis, RunKey, analyse_runs
from .audits import read_audits
from .cross_dataset import HEATMAP_NAME, cross_dataset_tables, heatmap_job
from .gallery import DEFAULT_GALLERY_SIZE
from .inputs import GridResults, ReportError, find_grid_dirs, read_grid_dir
from .summary import SUMMARY_NAME, ReportSummaryCard, build_summary, precision_line, write_summary
from .table import SkippedOutput, Table, write_table
from .tables import build_tables

__all__ = ["ReportConfig", "ReportError", "ReportSummary", "ReportSummaryCard", "SkippedOutput", "run_report"]

KIND_WORDS = {".csv": "tables (CSV)", ".png": "figures (PNG)", ".md": "summary (Markdown)", ".html": "page (HTML)"}


@dataclass(frozen=True)
class ReportConfig:
    grid_dirs: tuple[Path, ...] = ()  # none: every grid folder under runs_dir
    out: Path = Path("reports")
    plots: bool = True
    html: bool = True
    runs_dir: Path = Path("runs")
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    bootstrap_all: bool = False  # intervals for every run, not only the selected configs' runs
    gallery_size: int = DEFAULT_GALLERY_SIZE
    progress: bool = True

    def command_line(self) -> str:
        """The command that makes this report (shown in its summary)."""
        folders = " ".join(shlex.quote(str(path)) for path in self.grid_dirs) or f"--runs-dir {self.runs_dir}"
        options = f" --bootstrap {self.bootstrap.resamples} --bootstrap-seed {self.bootstrap.seed}"
        options += " --bootstrap-all" * self.bootstrap_all + " --no-plots" * (not self.plots)
        return f"pipeline report --out {shlex.quote(str(self.out))} {folders}{options}"


@dataclass(frozen=True)
class ReportSummary:
    out: Path
    written: tuple[Path, ...]
    skipped: tuple[SkippedOutput, ...]
    card: ReportSummaryCard | None = None

    def report(self) -> str:
        """Human-readable lines: what was written and skipped (and why), then the result (the summary card)."""
        kinds = Counter(path.suffix for path in self.written)
        counts = ", ".join(f"{n} {KIND_WORDS.get(suffix, suffix)}" for suffix, n in kinds.items())
        lines = [f"wrote {len(self.written)} file(s) to {self.out}: {counts}"]
        lines += [f"skipped {item.name}: {item.reason}" for item in self.skipped]
        if self.card is not None:
            lines += ["", *self.card.lines()]
            page = self.out / "index.html"
            lines.append(f"details: {self.out / SUMMARY_NAME}" + (f", {page}" if page in self.written else ""))
        return "\n".join(lines)


def write_figures(
    grids: Sequence[GridResults], analysis: ReportAnalysis, out: Path
) -> tuple[list[Path], dict[RunKey, list[Path]], list[SkippedOutput]]:
    """Prepare and draw every figure in its own try: a failure is reported, never raised.

    Returns (the report's figures, each selected run's own figures, what was skipped).
    """
    try:
        from . import block_figures, figures, ranking, run_figures
    except ImportError as error:
        return [], {}, [SkippedOutput("plots", f"matplotlib is not available ({error}); tables only")]
    except Exception as error:  # noqa: BLE001 - a broken matplotlib must not take the tables down
        reason = f"matplotlib failed to load ({type(error).__name__}: {error}); tables only"
        return [], {}, [SkippedOutput("plots", reason)]
    written: list[Path] = []
    per_run: dict[RunKey, list[Path]] = {}
    skipped: list[SkippedOutput] = []
    preparers = [(ranking.RANKED_NAME, lambda: [ranking.ranked_job(grids, analysis, out)], None)]
    preparers += [(label, prepare, None) for label, prepare in figures.plot_preparers(grids, out)]
    preparers.append((HEATMAP_NAME, lambda: heatmap_job(grids, out), None))
    preparers += [(label, prepare, None) for label, prepare in block_figures.plot_preparers(grids, out)]
    preparers += [
        (label, prepare, key) for label, prepare, key in run_figures.run_plot_preparers(analysis.sections, out)
    ]
    for label, prepare, key in preparers:
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
                path = draw()
            except Exception as error:  # noqa: BLE001 - a plot must never take the tables down
                skipped.append(SkippedOutput(name, f"plot failed: {type(error).__name__}: {error}"))
                continue
            written.append(path)
            if key is not None:
                per_run.setdefault(key, []).append(path)
    return written, per_run, skipped


def resolve_grid_dirs(config: ReportConfig) -> tuple[list[Path], list[SkippedOutput]]:
    """The grid folders named, else every finished one under ``config.runs_dir`` (unfinished ones reported)."""
    if config.grid_dirs:
        return [Path(path) for path in config.grid_dirs], []
    found, unfinished = find_grid_dirs(Path(config.runs_dir))
    return found, [SkippedOutput(str(folder), reason) for folder, reason in unfinished]


def run_report(config: ReportConfig) -> ReportSummary:
    """Read the grid folders, write every table whose inputs exist, then the figures and the page.

    A full, read-only or forbidden output folder is a ``WriteError`` naming the file.
    """
    with disk_errors_explained(config.out):
        return _run_report(config)


def _run_report(config: ReportConfig) -> ReportSummary:
    grid_dirs, skipped = resolve_grid_dirs(config)
    grids = [read_grid_dir(path) for path in grid_dirs]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    audits, audit_problems = read_audits(out)
    skipped += audit_problems
    analysis = analyse_runs(grids, audits, config.bootstrap, config.bootstrap_all, config.gallery_size, config.progress)
    skipped += analysis.without_intervals()
    written: list[Path] = []
    tables: list[Table] = []
    for outcome in [*build_tables(grids, analysis), *cross_dataset_tables(grids, config.bootstrap, out)]:
        if isinstance(outcome, SkippedOutput):
            (out / outcome.name).unlink(missing_ok=True)  # no stale copy of a table this report did not make
            skipped.append(outcome)
        else:
            written.append(write_table(out, outcome))
            tables.append(outcome)
    figures: list[Path] = []
    run_figures: dict[RunKey, list[Path]] = {}
    if config.plots:
        figures, run_figures, figure_skipped = write_figures(grids, analysis, out)
        written += figures
        skipped += figure_skipped
    card = build_summary(grids, analysis, audits, config.command_line(), precision_line(grids))
    written.append(write_summary(out, card))
    if config.html:
        from .html import write_html

        shown = set(path for paths in run_figures.values() for path in paths)
        report_figures = [path for path in figures if path not in shown]
        written.append(write_html(out, grids, tables, report_figures, run_figures, skipped, audits, analysis, card))
    return ReportSummary(out=out, written=tuple(written), skipped=tuple(skipped), card=card)
