"""What the report computes from the runs' per-image scores: bootstrap intervals and each selected run's section.

Per run in scope (every selected run and the other seeds of its config; every
ok run with ``bootstrap_all``): bootstrap intervals of ACC and AP per scored
set and of the test mean (``pipeline.report.uncertainty``). Per selected run
(once, whichever rules chose it): its scored test splits (histograms), the
error analysis of each test split (``pipeline.report.errors``) and the
galleries of its worst errors on the unperturbed test sets
(``pipeline.report.gallery``). Sections list the full models first, then
the ablations, each in selection.csv order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..names import UNPERTURBED_VARIANTS
from ..results.bootstrap import BootstrapConfig
from .audits import AuditDocument, audited_image_facts
from .errors import BucketCount, ImageFactsFinder, analyse_errors
from .gallery import FALSE_NEGATIVES, FALSE_POSITIVES, GalleryItem, gallery, worst_errors
from .inputs import GridResults, RunResult, Selection, all_runs, all_selections
from .scores import ScoredSplit, read_run_scores, store_facts
from .table import SkippedOutput
from .uncertainty import RunIntervals, run_intervals

RunKey = tuple[Path, str]  # (grid folder, run id)


def run_key(run: RunResult) -> RunKey:
    return (run.grid_dir, run.run)


@dataclass(frozen=True)
class RunSection:
    """Everything the HTML page shows of one selected run."""

    run: RunResult
    selections: tuple[Selection, ...]  # the rules that chose it (one or two)
    test_splits: tuple[ScoredSplit, ...]  # every scored test split
    errors: tuple[BucketCount, ...]
    false_positives: tuple[GalleryItem, ...]
    false_negatives: tuple[GalleryItem, ...]
    notes: tuple[str, ...]  # what could not be shown, and why

    @property
    def seed_runs(self) -> tuple[RunResult, ...]:
        return self.selections[0].runs

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(selection.rule for selection in self.selections)


@dataclass(frozen=True)
class ReportAnalysis:
    bootstrap: BootstrapConfig
    intervals: Mapping[RunKey, RunIntervals] = field(default_factory=dict)
    sections: tuple[RunSection, ...] = ()

    def intervals_of(self, run: RunResult) -> RunIntervals | None:
        return self.intervals.get(run_key(run))

    def without_intervals(self) -> list[SkippedOutput]:
        """The runs whose intervals are incomplete because a scores file is missing, named with the splits."""
        return [
            SkippedOutput(
                f"intervals of run {intervals.run}",
                f"no scores_<split>.csv for {', '.join(intervals.missing)}: no interval there (nor of the mean)",
            )
            for intervals in self.intervals.values()
            if intervals.missing
        ]


def selected_runs(grids: Sequence[GridResults]) -> dict[RunKey, list[Selection]]:
    """Each selected run once, with the selections that chose it, in selection.csv order."""
    chosen: dict[RunKey, list[Selection]] = {}
    for selection in all_selections(grids):
        chosen.setdefault(run_key(selection.run), []).append(selection)
    return chosen


def bootstrap_scope(grids: Sequence[GridResults], every_run: bool) -> list[RunResult]:
    if every_run:
        return all_runs(grids)
    runs = {run_key(run): run for selection in all_selections(grids) for run in selection.runs}
    return list(runs.values())


def analyse_runs(
    grids: Sequence[GridResults],
    audits: Sequence[AuditDocument],
    bootstrap: BootstrapConfig,
    bootstrap_all: bool = False,
    gallery_size: int = 8,
    progress: bool = True,
) -> ReportAnalysis:
    """Intervals of the runs in scope and the sections of the selected runs."""
    intervals: dict[RunKey, RunIntervals] = {}
    if bootstrap.enabled:
        scope = bootstrap_scope(grids, bootstrap_all)
        for run in tqdm(scope, desc="bootstrap intervals", unit="run", disable=not progress):
            intervals[run_key(run)] = run_intervals(run, bootstrap)
    finder = ImageFactsFinder(audited_image_facts(audits))
    chosen = sorted(selected_runs(grids).values(), key=lambda selections: not selections[0].run.is_full_model)
    sections = tuple(build_section(s[0].run, tuple(s), finder, gallery_size) for s in chosen)
    return ReportAnalysis(bootstrap, intervals, sections)


def build_section(
    run: RunResult, selections: tuple[Selection, ...], finder: ImageFactsFinder, gallery_size: int
) -> RunSection:
    splits, missing = read_run_scores(run)
    notes = [f"no scores_{split}.csv in {run.folder}: {split} is left out of this section" for split in missing]
    errors: list[BucketCount] = []
    roots: dict[str, Path | None] = {}
    root_notes: dict[str, str] = {}
    for scored in splits:
        facts = store_facts(run, scored.split)
        roots[scored.split] = facts.data_root
        if facts.note:
            root_notes[scored.split] = facts.note
            notes.append(f"{scored.split}: {facts.note}; sizes and formats from the audit where it has them")
        errors += analyse_errors(scored, finder.facts(scored, facts.data_root), facts.crop_size)
    unperturbed = [scored for scored in splits if scored.variant in UNPERTURBED_VARIANTS]
    galleries = {
        kind: tuple(gallery(worst_errors(unperturbed, kind, gallery_size), roots, root_notes))
        for kind in (FALSE_POSITIVES, FALSE_NEGATIVES)
    }
    return RunSection(
        run=run,
        selections=selections,
        test_splits=tuple(splits),
        errors=tuple(errors),
        false_positives=galleries[FALSE_POSITIVES],
        false_negatives=galleries[FALSE_NEGATIVES],
        notes=tuple(notes),
    )
