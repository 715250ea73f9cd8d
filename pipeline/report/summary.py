"""The report's answer first: per selected config, what it is, its val metric, its test mean with intervals, the
ablations' and the other configs' deltas, the authors' numbers (or why there are none), the audit flags, and how the
report was made.

One typed :class:`ReportSummaryCard` feeds the card at the top of ``index.html``, ``summary.md`` and the lines
``pipeline report`` and the demo print last. Numbers follow ``pipeline.report.numbers``.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .. import __version__
from ..files import write_text_atomic
from ..names import BEST_BY_TEST, BEST_BY_VAL, RANDOM_WEIGHTS_MARKER
from ..results import HeadConfig
from ..results import reference as ref
from ..variants import VariantKind, VariantSpec
from .analysis import ReportAnalysis, RunSection
from .audits import AuditDocument
from .inputs import GridResults, RunResult, Scores
from .numbers import interval_text, percent, points
from .studies import AblationRow, ours_ablation_rows
from .table import FULL, averaged

SUMMARY_NAME = "summary.md"
RULE_WORDS = {BEST_BY_VAL: "best by val", BEST_BY_TEST: "best by mean test ACC+AP (the paper's protocol)"}
MOVED = 0.02  # a change of ACC under format-align of 2 points or more "moved"
NEAR_CHANCE = 0.03  # ACC within 3 points of 50 % on both sides: the detector is at chance there anyway
VERSIONED = ("numpy", "scikit-learn", "matplotlib", "torch", "transformers")


@dataclass(frozen=True)
class Delta:
    """One comparison line: what, its ACC and AP (percent), and the change against the selected config."""

    label: str
    acc: float | None
    ap: float | None
    acc_change: float | None
    ap_change: float | None
    note: str = ""

    def text(self) -> str:
        values = (
            f"ACC {percent(self.acc)} % ({points(self.acc_change)}), AP {percent(self.ap)} % ({points(self.ap_change)})"
        )
        return f"{self.label}: {values}" + (f"; {self.note}" if self.note else "")


@dataclass(frozen=True)
class SelectedConfig:
    rules: tuple[str, ...]
    run: str
    config: str  # the config in words
    val: str  # "val ACC 80.5 %, AP 86.2 %"
    test: str  # "test mean over 4 sets ACC 66.6 % [63.2, 70.1], AP ..."
    test_acc: str  # "66.6 %"
    test_acc_interval: str  # "[63.2, 70.1]" or ''
    test_ap: str
    test_ap_interval: str
    n_sets: int
    seeds: str
    ablations: tuple[Delta, ...]
    ablation_note: str
    others: tuple[Delta, ...]  # the other full-architecture selections (heads / backbones)
    authors: str  # the comparison with the authors' numbers, or why there is none

    @property
    def rules_text(self) -> str:
        words = " and ".join(RULE_WORDS.get(rule, rule) for rule in self.rules)
        return words + (" (both rules pick this run: shown once)" if len(self.rules) > 1 else "")


@dataclass(frozen=True)
class ReportSummaryCard:
    selected: tuple[SelectedConfig, ...]
    audit_lines: tuple[str, ...]
    command: str
    generated: str
    versions: str
    precision: str

    def lines(self) -> list[str]:
        """The terminal's lines (and the demo's last ones)."""
        out = ["== result =="]
        if not self.selected:
            out.append("no selected full-architecture config (selection.csv is empty)")
        for item in self.selected:
            out.append(f"{item.rules_text}: {item.config} (run {item.run}{item.seeds})")
            out.append(f"  {item.val}; {item.test}")
            out += [f"  {delta.text()}" for delta in item.ablations]
            out += [f"  {delta.text()}" for delta in item.others]
            out.append(f"  {item.authors}")
        out += self.audit_lines
        out.append(f"precision: {self.precision}")
        return out

    def markdown(self) -> str:
        parts = ["# Report summary", ""]
        for item in self.selected:
            parts += [f"## {item.config}", "", f"- selected: {item.rules_text}, run `{item.run}`{item.seeds}"]
            parts += [f"- {item.val}", f"- {item.test}"]
            if item.ablations:
                parts.append(f"- ablations ({item.ablation_note}):")
                parts += [f"  - {delta.text()}" for delta in item.ablations]
            parts += [f"- {delta.text()}" for delta in item.others]
            parts += [f"- {item.authors}", ""]
        if not self.selected:
            parts += ["No selected full-architecture config (selection.csv is empty).", ""]
        parts += ["## Audit", ""] + [f"- {line}" for line in self.audit_lines] + [""]
        parts += [
            "## How this was made",
            "",
            f"- command: `{self.command}`",
            f"- generated: {self.generated}",
            f"- versions: {self.versions}",
            f"- precision: {self.precision}",
            "",
            "Percent with one decimal; intervals are 95 % bootstrap intervals in brackets; changes in points (pts).",
            "",
        ]
        return "\n".join(parts)


# ----------------------------------------------------------------------------- building


def head_words(run: RunResult) -> str:
    """The selected config in words: head, backbone, key hyper-parameters."""
    setting = run.setting
    if not run.is_rine:
        probe = {"knn": f"k-NN (k={setting.k})", "logreg": f"logistic regression (C={setting.C:g})"}
        name = probe.get(setting.head, "linear probe")
        return f"{name} on {setting.features} of {run.backbone} ({setting.tap})" + (
            f"; {setting.epochs} epoch{'s' * (setting.epochs != 1)}, lr {setting.lr:g}"
            if setting.head == "linear"
            else ""
        )
    blocks = "the last block" if setting.head_blocks == "last" else "all blocks"
    aggregation = "TIE" if setting.aggregation == "tie" else setting.aggregation
    classes = f", {run.n_classes}-class" if run.n_classes is not None else ""
    config = run.head_config
    return (
        f"{aggregation} head on {blocks} of {run.backbone} ({setting.tap}){classes}, "
        f"xi={config.contrastive_factor:g} q={config.proj_layers} d'={config.proj_dim}; "
        f"{setting.epochs} epoch{'s' * (setting.epochs != 1)}, batch {setting.batch_size}, lr {setting.lr:g}"
    )


def mean_scores(scores: dict[str, Scores]) -> tuple[float | None, float | None]:
    return averaged(scores, "acc")[0], averaged(scores, "ap")[0]


def change(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def ablation_deltas(run: RunResult, rows: Sequence[AblationRow]) -> tuple[tuple[Delta, ...], str]:
    """Each ablation of ``run``'s setting against the full model the ablations table compares them with."""
    groups: list[list[AblationRow]] = []
    for row in rows:
        if row.variant == FULL or not groups:
            groups.append([])
        groups[-1].append(row)
    group = next((g for g in groups if g[0].variant == FULL and g[0].run == run.run), None)
    if group is None:
        group = next((g for g in groups if g[0].variant == FULL and g[0].setting == run.setting.label()), None)
    if group is None:
        return (), ""
    full = group[0]
    base = mean_scores(dict(full.scores))
    deltas = []
    for row in group[1:]:
        acc, ap = mean_scores(dict(row.scores))
        same = row.hyper == full.hyper or (row.variant == "without_contrastive" and row.hyper[1:] == full.hyper[1:])
        note = "" if same else f"other hyper-parameters: xi/q/d' {'/'.join(row.hyper)}"
        deltas.append(Delta(row.variant.replace("_", " "), acc, ap, change(acc, base[0]), change(ap, base[1]), note))
    note = f"changes against the full model, run {full.run}, xi/q/d' {'/'.join(full.hyper)}"
    return tuple(deltas), note


def authors_line(run: RunResult) -> str:
    """Ours against the authors' published config of the same backbone and class count, or why not."""
    key = (run.backbone, run.n_classes)
    if run.n_classes is not None and key in ref.PUBLISHED_BEST:
        config: HeadConfig = ref.PUBLISHED_BEST[key]
        theirs = ref.reference_scores(run.backbone, run.n_classes, config)
        if theirs:
            acc, ap = mean_scores({d: Scores(a, p) for d, (a, p) in theirs.items()})
            return (
                f"authors' published {run.backbone} {run.n_classes}-class (xi/q/d' {config.label()}): "
                f"ACC {percent(acc)} %, AP {percent(ap)} % (ours {points(change(run.mean_acc, acc))}, "
                f"{points(change(run.mean_ap, ap))})"
            )
    if ref.backbone_name(run.setting.model) is None:
        random = (Path(run.setting.model) / RANDOM_WEIGHTS_MARKER).is_file()
        why = "a random-weight backbone (the demo's)" if random else "a backbone the authors published no numbers for"
        return f"no comparison with the authors' numbers: {run.setting.model} is {why}"
    if run.n_classes is None:
        return f"no comparison with the authors' numbers: training classes '{run.setting.classes}' are not 1, 2 or 4"
    return f"no comparison with the authors' numbers: none published for {run.backbone} {run.n_classes}-class"


def is_format_aligned(variant: str) -> bool:
    try:
        return VariantSpec.from_name(variant).kind is VariantKind.FORMAT_ALIGN
    except ValueError:
        return False


def audit_lines(audits: Sequence[AuditDocument], run: RunResult | None) -> tuple[str, ...]:
    """One line per flag of the as-is audits, with the selected run's ACC there as is and format-aligned."""
    documents = [document for document in audits if document.variant is None]
    if not documents:
        return ("no audit in this folder (pipeline audit --split NAME --out <this folder>)",)
    aligned = next((v for v in (run.test if run else {}) if is_format_aligned(v)), None)
    lines = []
    for document in documents:
        for flag in document.flags:
            dataset = str(flag["dataset"])
            line = f"audit flag {dataset} ({document.split}): {flag['feature']} alone predicts the label (AUC {flag['auc']:.3f})"
            center = run.center.get(dataset) if run else None
            if center is not None and aligned and dataset in run.test[aligned]:
                after = run.test[aligned][dataset].acc
                moved = abs(after - center.acc) >= MOVED
                chance = max(abs(center.acc - 0.5), abs(after - 0.5)) < NEAR_CHANCE
                verdict = "at chance either way" if chance else ("moved" if moved else "did not move")
                line += (
                    f"; detector ACC {percent(center.acc)} % as the files are, {percent(after)} % {aligned} "
                    f"({points(after - center.acc)}: {verdict})"
                )
            elif center is not None:
                line += f"; detector ACC {percent(center.acc)} % (no format-aligned test entry to compare)"
            lines.append(line)
        if not document.flags:
            lines.append(f"audit {document.split}: no dataset flagged")
    return tuple(lines)


def precision_line(grids: Sequence[GridResults]) -> str:
    """What precision the heads trained in: the authors' float32, or how many runs used the bf16 opt-in."""
    runs = [run for grid in grids for run in grid.runs.values()]
    bf16 = sum(run.row.setting.amp == "bf16" for run in runs)
    if not bf16:
        return "heads trained in float32, as the authors"
    return (
        f"{bf16} of {len(runs)} runs trained in bf16 (amp: bf16): screening numbers, which differ slightly from "
        "float32 training; retrain in float32 (amp: none) for numbers to publish"
    )


def versions_text() -> str:
    found = [f"rine-pipeline {__version__}", f"Python {platform.python_version()}"]
    for package in VERSIONED:
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def selected_config(section: RunSection, analysis: ReportAnalysis, ablations: Sequence[AblationRow]) -> SelectedConfig:
    run = section.run
    intervals = analysis.intervals_of(run)
    acc_interval, ap_interval = (intervals.mean if intervals and intervals.mean else None) or (None, None)
    summary = run.summary
    test = (
        f"test mean over {len(summary.mean_sets)} sets ACC {percent(run.mean_acc)} % {interval_text(acc_interval)}, "
        f"AP {percent(run.mean_ap)} % {interval_text(ap_interval)}"
    ).replace("  ", " ")
    seeds = section.seed_runs
    deltas, note = ablation_deltas(run, ablations)
    return SelectedConfig(
        rules=section.rules,
        run=run.run,
        config=head_words(run),
        val=f"val ACC {percent(summary.val_acc)} %, AP {percent(summary.val_ap)} %",
        test=test.rstrip(),
        test_acc=f"{percent(run.mean_acc)} %",
        test_acc_interval=interval_text(acc_interval),
        test_ap=f"{percent(run.mean_ap)} %",
        test_ap_interval=interval_text(ap_interval),
        n_sets=len(summary.mean_sets),
        seeds=f", seed {run.setting.seed} of {'+'.join(str(r.setting.seed) for r in seeds)}" if len(seeds) > 1 else "",
        ablations=deltas,
        ablation_note=note,
        others=(),
        authors=authors_line(run),
    )


def build_summary(
    grids: Sequence[GridResults],
    analysis: ReportAnalysis,
    audits: Sequence[AuditDocument],
    command: str,
    precision: str,
) -> ReportSummaryCard:
    """The card: every full-architecture selection (each run once), the others' deltas against the first."""
    ablations = ours_ablation_rows(grids)
    sections = [section for section in analysis.sections if section.run.is_full_architecture]
    chosen = [selected_config(section, analysis, ablations) for section in sections]
    # the other heads (probes, issue 19) are compared with the first RINE selection, not shown as cards of their own
    probes = list({s.run.run: s for s in analysis.sections if not s.run.is_rine}.values())  # each run once
    if sections and (len(sections) > 1 or probes):
        first = sections[0].run
        others = tuple(
            Delta(
                f"{'other selection' if s.run.is_rine else 'other head'}, {head_words(s.run)}",
                s.run.mean_acc,
                s.run.mean_ap,
                change(s.run.mean_acc, first.mean_acc),
                change(s.run.mean_ap, first.mean_ap),
            )
            for s in [*sections[1:], *probes]
        )
        chosen[0] = SelectedConfig(**{**chosen[0].__dict__, "others": others})
    return ReportSummaryCard(
        selected=tuple(chosen),
        audit_lines=audit_lines(audits, sections[0].run if sections else None),
        command=command,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        versions=versions_text(),
        precision=precision,
    )


def write_summary(out: Path, card: ReportSummaryCard) -> Path:
    path = out / SUMMARY_NAME
    write_text_atomic(path, card.markdown())
    return path
