"""``index.html``: the report as one self-contained page (figures as data URIs, CSS and JS inline, no network).

Rendered with the Jinja2 template ``templates/index.html.j2``, autoescaped (every value from the data is
escaped): what was skipped, the audits, every table (sortable; ours beside the authors' with each difference
coloured), every figure, and a section per selected run. Tables longer than ``MAX_HTML_ROWS`` show their first
rows and say so.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from .. import __version__
from ..files import write_text_atomic
from ..names import BEST_BY_TEST, BEST_BY_VAL, LIST_SEPARATOR
from ..results import nan_mean, nan_std
from .analysis import ReportAnalysis, RunSection
from .audits import AuditDocument
from .captions import TABLE_NOTES, figure_caption
from .gallery import GalleryItem
from .inputs import GridResults
from .numbers import interval_text, real
from .reading import SETTING_ID, SETTINGS_NAME
from .studies import RobustnessKey
from .summary import ReportSummaryCard, precision_line
from .table import ScoreKey, SkippedOutput, StudyKey, Table, format_percent, order_datasets

PAGE_NAME = "index.html"
MAX_HTML_ROWS = 5000
# Columns never compared with the authors' (keys, labels, hyper-parameters); every other column of a comparable
# table holds a percentage per test set or mean.
NOT_COMPARED = frozenset(
    (
        *ScoreKey.header(),
        *StudyKey.header(),
        *RobustnessKey.header(),
        "setting",
        "variant",
        "perturbation",
        "preset",
        "metric",
        "excluded_from_avg",
        "note",
    )
)
RULE_NAMES = {BEST_BY_VAL: "best by val", BEST_BY_TEST: "best by mean test ACC+AP (the paper's protocol)"}


@dataclass(frozen=True)
class Comparison:
    """How our rows of a table find the authors' row they are compared with."""

    key: tuple[str, ...]  # columns that must agree
    reference: Mapping[str, str]  # column -> value that marks the authors' row


SCORE_COMPARISON = Comparison(("backbone", "n_classes"), {"source": "authors", "selection": "published"})
STUDY_COMPARISON = Comparison(
    ("backbone", "n_classes", "contrastive_factor", "proj_layers", "proj_dim", "epochs", "train_fraction", "metric"),
    {"source": "authors"},
)
COMPARISONS: dict[str, Comparison] = {
    "acc.csv": SCORE_COMPARISON,
    "ap.csv": SCORE_COMPARISON,
    "ablations.csv": Comparison(("backbone", "n_classes", "variant"), {"source": "authors"}),
    "robustness.csv": Comparison(("backbone", "n_classes", "perturbation", "metric"), {"source": "authors"}),
    "epochs.csv": STUDY_COMPARISON,
    "fractions.csv": STUDY_COMPARISON,
    "ldm.csv": STUDY_COMPARISON,
}


ERRORS_NOTE = (
    "by format: the format the detector saw. On a format-aligned split that is the JPEG every image was "
    "re-encoded as (with the original file's format in brackets); on other perturbed splits, the original file format."
)
LONG_TEXT = 40  # characters: longer text cells wrap


@dataclass(frozen=True)
class Cell:
    text: str
    css: str = ""
    style: str = ""
    title: str = ""

    def __post_init__(self) -> None:
        kind = "num" if is_number(self.text) else ("long" if len(self.text) > LONG_TEXT else "")
        object.__setattr__(self, "css", " ".join(filter(None, (self.css, kind))))


@dataclass(frozen=True)
class HtmlTable:
    name: str  # the CSV file name, or a title
    header: tuple[Cell, ...]
    rows: tuple[tuple[Cell, ...], ...]
    note: str = ""


@dataclass(frozen=True)
class Figure:
    name: str
    uri: str

    @property
    def caption(self) -> str:
        return figure_caption(self.name)


@dataclass(frozen=True)
class SectionView:
    anchor: str
    title: str
    subtitle: str
    scores: HtmlTable
    errors: HtmlTable | None
    figures: tuple[Figure, ...]
    false_positives: tuple[GalleryItem, ...]
    false_negatives: tuple[GalleryItem, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class AuditView:
    title: str
    path: str
    summary_line: str
    flags: tuple[str, ...]
    aucs: HtmlTable
    statistics: HtmlTable


# The page's sections, in order: (anchor, link text). A new section gets its entry here and its block in
# templates/index.html.j2 (a `{% if section == ... %}` branch of the loop over page.sections).
PAGE_SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"),
    ("tables", "Tables"),
    ("figures", "Figures"),
    ("audits", "Audit"),
    ("runs", "Selected runs"),
    ("skipped", "Not made"),
)


@dataclass(frozen=True)
class Page:
    card: ReportSummaryCard
    grid_dirs: tuple[str, ...]
    version: str
    skipped: tuple[SkippedOutput, ...]
    audits: tuple[AuditView, ...]
    tables: tuple[HtmlTable, ...]
    figures: tuple[Figure, ...]
    sections: tuple[SectionView, ...]
    bootstrap: str
    precision: str
    flagged: Mapping[str, str] = field(default_factory=dict)
    settings: HtmlTable | None = None  # the legend of the setting ids

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(anchor for anchor, _ in PAGE_SECTIONS)

    @property
    def nav(self) -> tuple[tuple[str, str], ...]:
        """(anchor, link text with a count) of every section, in page order."""
        counts = {
            "audits": f"{len(self.flagged)} flagged" if self.flagged else "",
            "tables": str(len(self.tables)),
            "figures": str(len(self.figures)),
            "runs": str(len(self.sections)),
            "skipped": str(len(self.skipped)),
        }
        return tuple((a, f"{text} ({counts[a]})" if counts.get(a) else text) for a, text in PAGE_SECTIONS)


# ----------------------------------------------------------------------------- tables


def is_number(text: str) -> bool:
    try:
        return not math.isnan(float(text))
    except ValueError:
        return False


def delta_style(delta: float) -> str:
    """Green when ours is higher, red when lower; stronger with the size of the difference (10 points: full)."""
    if abs(delta) < 0.05:
        return ""
    alpha = 0.1 + 0.5 * min(abs(delta) / 10, 1.0)
    rgb = "46, 160, 67" if delta > 0 else "218, 54, 51"
    return f"background-color: rgba({rgb}, {alpha:.2f})"


def comparison_cells(table: Table, comparison: Comparison) -> dict[tuple[int, int], Cell]:
    """(row, column) -> the coloured cell of each of our values that has an authors' counterpart."""
    records = [dict(zip(table.header, row)) for row in table.rows]
    is_reference = [all(r.get(c) == v for c, v in comparison.reference.items()) for r in records]
    references = {tuple(r.get(c, "") for c in comparison.key): r for r, ref in zip(records, is_reference) if ref}
    columns = [i for i, name in enumerate(table.header) if name not in NOT_COMPARED]
    cells = {}
    for index, (record, reference_row) in enumerate(zip(records, is_reference)):
        if reference_row or record.get("source") == "authors":
            continue
        reference = references.get(tuple(record.get(c, "") for c in comparison.key))
        if reference is None:
            continue
        for column in columns:
            name = table.header[column]
            ours, theirs = table.rows[index][column], reference.get(name, "")
            if is_number(ours) and is_number(theirs):
                delta = float(ours) - float(theirs)
                cells[(index, column)] = Cell(
                    ours, "compared", delta_style(delta), f"ours {ours} - authors {theirs} = {delta:+.1f} points"
                )
    return cells


def header_cells(names: Sequence[str], flagged: Mapping[str, str]) -> tuple[Cell, ...]:
    """Header cells; a column named after a dataset the audit flagged is marked, with the flag as its title."""
    return tuple(Cell(name, "flagged", title=flagged[name]) if name in flagged else Cell(name) for name in names)


def without_empty_columns(table: Table) -> Table:
    """The table without the columns that are empty in every row (the CSV keeps them: its columns are fixed)."""
    keep = [i for i in range(len(table.header)) if any(row[i] for row in table.rows)]
    return Table(
        table.name, tuple(table.header[i] for i in keep), tuple(tuple(row[i] for i in keep) for row in table.rows)
    )


def html_table(table: Table, flagged: Mapping[str, str], settings: Mapping[str, str] | None = None) -> HtmlTable:
    """A report table for the page: empty columns dropped, the authors' rows marked, our values coloured by their
    difference, each setting id with its setting on hover."""
    table = without_empty_columns(table)
    comparison = COMPARISONS.get(table.name)
    coloured = comparison_cells(table, comparison) if comparison else {}
    source = table.header.index("source") if "source" in table.header else None
    setting = table.header.index(SETTING_ID) if SETTING_ID in table.header and settings else None
    shown = table.rows[:MAX_HTML_ROWS]
    rows = []
    for index, row in enumerate(shown):
        authors = source is not None and row[source] == "authors"
        cells = []
        for column, text in enumerate(row):
            cell = coloured.get((index, column), Cell(text, "authors" if authors else ""))
            if column == setting and settings:
                cell = Cell(text, cell.css, cell.style, settings.get(text, ""))
            cells.append(cell)
        rows.append(tuple(cells))
    notes = [TABLE_NOTES.get(table.name, "")]
    if len(table.rows) > len(shown):
        notes.append(f"first {len(shown)} of {len(table.rows)} rows shown; {table.name} holds them all")
    return HtmlTable(table.name, header_cells(table.header, flagged), tuple(rows), " ".join(filter(None, notes)))


def plain_table(name: str, header: Sequence[str], rows: Sequence[Sequence[str | Cell]]) -> HtmlTable:
    return HtmlTable(
        name,
        tuple(Cell(h) for h in header),
        tuple(tuple(c if isinstance(c, Cell) else Cell(c) for c in row) for row in rows),
    )


# ----------------------------------------------------------------------------- audits


def audit_view(document: AuditDocument) -> AuditView:
    flagged = document.flagged_datasets
    responsible = {(str(f["dataset"]), str(f["feature"])) for f in document.flags}
    features = tuple(dict.fromkeys(str(record["feature"]) for record in document.feature_aucs))
    by_dataset: dict[str, dict[str, Mapping]] = {}
    for record in document.feature_aucs:
        by_dataset.setdefault(str(record["dataset"]), {})[str(record["feature"])] = record
    auc_rows = []
    for dataset, records in by_dataset.items():
        row: list[Cell] = [Cell(dataset, "flagged" if dataset in flagged else "")]
        for feature in features:
            record = records.get(feature, {})
            auc = record.get("auc")
            text = "" if auc is None else f"{auc:.3f}"
            css = ("flagged" if auc is not None and auc >= document.threshold else "") + (
                " responsible" if (dataset, feature) in responsible else ""
            )
            row.append(Cell(text, css.strip(), title=str(record.get("note", ""))))
        any_record = next(iter(records.values()))
        row += [Cell(str(any_record.get("n_real", ""))), Cell(str(any_record.get("n_fake", "")))]
        auc_rows.append(tuple(row))
    statistics = []
    columns = (
        "dataset",
        "label",
        "n",
        "n_errors",
        "formats",
        "modes",
        "exif_fraction",
        "jpeg_quality",
        "width",
        "height",
        "file_size",
    )
    for record in document.summary:
        dataset = str(record["dataset"])
        spread = {
            name: ""
            if record.get(f"{name}_min") is None
            else " / ".join(real(record[f"{name}_{statistic}"]) for statistic in ("min", "median", "max"))
            for name in ("jpeg_quality", "width", "height", "file_size")
        }
        exif = record.get("exif_fraction")
        statistics.append(
            (
                Cell(dataset, "flagged" if dataset in flagged else ""),
                Cell("real" if record["label"] == 0 else "fake"),
                Cell(str(record["n"])),
                Cell(str(record["n_errors"])),
                Cell("; ".join(f"{k}={v}" for k, v in dict(record["formats"]).items())),
                Cell("; ".join(f"{k}={v}" for k, v in dict(record["modes"]).items())),
                Cell("" if exif is None else f"{exif:.2f}"),
                *(Cell(spread[name]) for name in ("jpeg_quality", "width", "height", "file_size")),
            )
        )
    flags = tuple(
        f"{flag['dataset']}: {flag['feature']} predicts real vs fake (AUC {flag['auc']:.3f})" for flag in document.flags
    )
    audited = "the files re-encoded as " + document.variant if document.variant else "the files as they are"
    return AuditView(
        title=document.title,
        path=document.path.name,
        summary_line=f"{document.n_images} images, {document.n_errors} unreadable; {audited}; "
        f"flag threshold AUC {document.threshold:g}",
        flags=flags,
        aucs=plain_table(
            f"{document.path.name}: AUC per feature", ("dataset", *features, "n_real", "n_fake"), auc_rows
        ),
        statistics=plain_table(f"{document.path.name}: header statistics (min / median / max)", columns, statistics),
    )


def flagged_datasets(documents: Sequence[AuditDocument]) -> dict[str, str]:
    """Dataset -> what flagged it, over every audit (shown in table headers)."""
    flagged: dict[str, str] = {}
    for document in documents:
        for flag in document.flags:
            text = f"audit {document.title}: {flag['feature']} predicts the label (AUC {flag['auc']:.3f})"
            flagged[str(flag["dataset"])] = "; ".join(filter(None, (flagged.get(str(flag["dataset"])), text)))
    return flagged


# ----------------------------------------------------------------------------- run sections


def spread_text(values: Sequence[float]) -> str:
    """Mean ± sample standard deviation, in percent."""
    return f"{format_percent(nan_mean(values))} ± {format_percent(nan_std(values))}" if values else ""


def section_scores(section: RunSection, analysis: ReportAnalysis) -> HtmlTable:
    """ACC and AP per scored set with their intervals, then the test mean; with several seeds, mean ± std over them."""
    run, seed_runs = section.run, section.seed_runs
    intervals = analysis.intervals_of(run)
    several = len(seed_runs) > 1
    header = ["split", "variant", "dataset", "ACC %", "ACC 95% CI", "AP %", "AP 95% CI"]
    if several:
        header += [f"ACC over {len(seed_runs)} seeds", f"AP over {len(seed_runs)} seeds"]
    rows = []
    for split, variant in run.splits.items():
        for dataset in order_datasets(run.split_sets[split]):
            scores = run.scores_of(split, dataset)
            acc_interval, ap_interval = (intervals.of(split, dataset) if intervals else None) or (None, None)
            row = [split, variant, dataset, format_percent(scores.acc), interval_text(acc_interval)]
            row += [format_percent(scores.ap), interval_text(ap_interval)]
            if several:
                same = [r.scores_of(split, dataset) for r in seed_runs if dataset in r.split_sets.get(split, ())]
                row += [spread_text([getattr(s, metric) for s in same]) for metric in ("acc", "ap")]
            rows.append(row)
    acc_interval, ap_interval = (intervals.mean if intervals else None) or (None, None)
    average = ["test mean", "", f"{len(run.summary.mean_sets)} sets", format_percent(run.mean_acc)]
    average += [interval_text(acc_interval), format_percent(run.mean_ap), interval_text(ap_interval)]
    if several:
        average += [spread_text([r.mean_acc for r in seed_runs]), spread_text([r.mean_ap for r in seed_runs])]
    rows.append([Cell(text, "average") for text in average])
    return plain_table("ACC / AP", header, rows)


def section_errors(section: RunSection) -> HtmlTable | None:
    """Per test split and set: accuracy on reals and on fakes, and the share of errors (and of images) per bucket."""
    groups: dict[tuple[str, str], dict[str, list]] = {}
    for count in section.errors:
        groups.setdefault((count.split, count.dataset), {}).setdefault(count.facet, []).append(count)
    if not groups:
        return None
    rows = []
    for (split, dataset), facets in groups.items():
        labels = {count.bucket: count for count in facets.get("label", [])}
        accuracy = [format_percent(1 - labels[b].error_rate) if b in labels else "" for b in ("real", "fake")]
        errors = sum(count.n_errors for count in labels.values())
        shares = [
            "; ".join(
                f"{c.bucket}: {format_percent(c.share_of_errors)} % of errors ({format_percent(c.share_of_images)} % of images)"
                if errors
                else f"{c.bucket}: {format_percent(c.share_of_images)} % of images"
                for c in facets.get(facet, [])
            )
            for facet in ("size", "format")
        ]
        rows.append([split, dataset, *accuracy, str(errors), *shares])
    header = ("split", "dataset", "real ACC %", "fake ACC %", "errors", "by size (shorter side vs crop)", "by format")
    table = plain_table("error analysis", header, rows)
    return HtmlTable(table.name, table.header, table.rows, ERRORS_NOTE)


def section_view(section: RunSection, analysis: ReportAnalysis, figures: Sequence[Figure], index: int) -> SectionView:
    run = section.run
    classes = f"{run.n_classes}-class" if run.n_classes is not None else f"train={run.setting.train}"
    seeds = section.seed_runs
    seeds_text = f"; seeds {LIST_SEPARATOR.join(str(r.setting.seed) for r in seeds)}" if len(seeds) > 1 else ""
    return SectionView(
        anchor=f"run-{index}",
        title=f"{run.backbone} ({run.setting.tap}), {classes}, xi/q/d' = {run.head_config.label()}: run {run.run}",
        subtitle=f"{'; '.join(RULE_NAMES.get(rule, rule) for rule in section.rules)} — grid {run.grid_dir}"
        f" — {run.setting.label()}{seeds_text}",
        scores=section_scores(section, analysis),
        errors=section_errors(section),
        figures=tuple(figures),
        false_positives=section.false_positives,
        false_negatives=section.false_negatives,
        notes=section.notes,
    )


# ----------------------------------------------------------------------------- the page


def png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def write_html(
    out: Path,
    grids: Sequence[GridResults],
    tables: Sequence[Table],
    figures: Sequence[Path],
    run_figures: Mapping[tuple[Path, str], Sequence[Path]],
    skipped: Sequence[SkippedOutput],
    audits: Sequence[AuditDocument],
    analysis: ReportAnalysis,
    card: ReportSummaryCard,
) -> Path:
    """Render the page into ``out/index.html`` (complete or absent) and return its path."""
    flagged = flagged_datasets([document for document in audits if document.variant is None])
    bootstrap = analysis.bootstrap
    settings = {row[0]: row[1] for table in tables if table.name == SETTINGS_NAME for row in table.rows}
    page = Page(
        card=card,
        grid_dirs=tuple(str(grid.path) for grid in grids),
        version=__version__,
        skipped=tuple(skipped),
        audits=tuple(audit_view(document) for document in audits),
        tables=tuple(html_table(table, flagged, settings) for table in tables),
        figures=tuple(Figure(path.name, png_uri(path)) for path in figures),
        sections=tuple(
            section_view(
                section,
                analysis,
                [Figure(p.name, png_uri(p)) for p in run_figures.get((section.run.grid_dir, section.run.run), ())],
                index,
            )
            for index, section in enumerate(analysis.sections)
        ),
        bootstrap=(
            f"{bootstrap.resamples} label-stratified resamples, seed {bootstrap.seed}, "
            f"{100 * bootstrap.confidence:g} % percentile intervals"
            if bootstrap.enabled
            else "no bootstrap intervals (--bootstrap 0)"
        ),
        precision=precision_line(grids),
        flagged=flagged,
    )
    path = out / PAGE_NAME
    write_text_atomic(path, environment().get_template("index.html.j2").render(page=page))
    return path
