"""Dataset-bias audit of a split: can file metadata alone tell reals from fakes?

For every dataset, :func:`run_audit` reads the image headers only (``image_headers.py``; no decoding, no
backbone), describes each label (formats, JPEG quality, sizes, modes, EXIF, file size), and measures how well
each header feature alone, and all together, predict the label (cross-validated ROC AUC of a shallow tree); a
dataset reaching the threshold is flagged with the feature responsible. With ``format-align`` it audits the
files as the format-aligned variant makes them. Outputs (``audit_<split>*.csv``, ``.json``): docs/reports.md.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.tree import DecisionTreeClassifier
from tqdm.auto import tqdm

from ..errors import PipelineError
from ..files import atomic_path
from ..names import DEFAULT_ALIGN_QUALITY, FORMAT_ALIGN
from ..variants import VariantSpec
from .image_headers import ImageHeader, read_bytes_header, read_format_aligned_header, read_image_header
from .images import ImageDecodeError
from .manifest import Manifest, check_split_name, read_manifest
from .sources import RowImages

DEFAULT_THRESHOLD = 0.8
DEFAULT_FOLDS = 5
TREE_MAX_DEPTH = 3
ALL_FEATURES = "all"
# Once every file is re-encoded the same way (format-align), its size depends on its pixels alone (how well they
# compress, which is what generator traces change), so it is described but no longer scored as metadata.
PIXEL_DETERMINED_FEATURE = "file_size"
REAL, FAKE = 0, 1

AUC_COLUMNS = ("dataset", "feature", "auc", "auc_std", "n_real", "n_fake", "folds", "flagged", "responsible", "note")
SUMMARY_COLUMNS = (
    "dataset",
    "label",
    "n",
    "n_errors",
    "formats",
    "modes",
    "exif_fraction",
    "jpeg_quality_min",
    "jpeg_quality_median",
    "jpeg_quality_max",
    "width_min",
    "width_median",
    "width_max",
    "height_min",
    "height_median",
    "height_max",
    "file_size_min",
    "file_size_median",
    "file_size_max",
)
IMAGE_COLUMNS = (
    "path",
    "label",
    "dataset",
    "format",
    "width",
    "height",
    "mode",
    "has_exif",
    "file_size",
    "jpeg_quality",
    "error",
)


class AuditError(PipelineError, ValueError):
    """An audit that cannot run (bad option, unusable manifest); the message says why."""


@dataclass(frozen=True)
class AuditConfig:
    split: str
    manifest: Path
    data_root: Path | None = None  # overrides the root the manifest remembers
    out: Path = Path("reports")
    threshold: float = DEFAULT_THRESHOLD  # flag a dataset whose best AUC reaches this
    folds: int = DEFAULT_FOLDS  # cross-validation folds (fewer when a label has fewer readable images)
    seed: int = 0
    workers: int = 8  # header-reading threads (I/O bound)
    progress: bool = True
    perturbation: str | None = None  # FORMAT_ALIGN: audit the format-aligned files instead of the originals
    align_quality: int = DEFAULT_ALIGN_QUALITY

    @property
    def variant(self) -> str | None:
        """The variant audited (e.g. ``format-align-q95``), None for the files as they are."""
        return None if self.perturbation is None else VariantSpec.format_aligned(self.align_quality).name

    @property
    def stem(self) -> str:
        """``audit_<split>``, or ``audit_<split>_<variant>``: the outputs' common name."""
        return f"audit_{self.split}" + (f"_{self.variant}" if self.variant else "")

    def features(self) -> tuple[Feature, ...]:
        """The features scored: all, but not the file size of re-encoded files (a function of their pixels alone)."""
        if self.perturbation is None:
            return FEATURES
        return tuple(feature for feature in FEATURES if feature.name != PIXEL_DETERMINED_FEATURE)

    def header_reader(self) -> Callable[[Path], ImageHeader]:
        if self.perturbation is None:
            return read_image_header
        return lambda path: read_format_aligned_header(path, self.align_quality)

    def validate(self) -> None:
        check_split_name(self.split)
        if self.perturbation not in (None, FORMAT_ALIGN):
            raise AuditError(
                f"the audit reads the files as they are or --perturb {FORMAT_ALIGN}, not {self.perturbation!r}"
            )
        if not 1 <= self.align_quality <= 100:
            raise AuditError(f"align quality must be in 1..100, got {self.align_quality}")
        if not 0.5 < self.threshold <= 1.0:
            raise AuditError(f"threshold must be in (0.5, 1], got {self.threshold}")
        if self.folds < 2:
            raise AuditError(f"folds must be at least 2, got {self.folds}")
        if self.workers < 1:
            raise AuditError(f"workers must be at least 1, got {self.workers}")


# ---------------------------------------------------------------- features


def _one_hot(values: Sequence[str | None]) -> np.ndarray:
    categories = sorted({str(value) for value in values})
    return np.array([[str(value) == category for category in categories] for value in values], dtype=np.float64)


def _numbers(*columns: Sequence[float | int | None]) -> np.ndarray:
    return np.array([[0 if value is None else value for value in row] for row in zip(*columns)], dtype=np.float64)


@dataclass(frozen=True)
class Feature:
    name: str
    description: str
    encode: Callable[[Sequence[ImageHeader]], np.ndarray]  # headers -> (n, k) model input


FEATURES: tuple[Feature, ...] = (
    Feature(
        "format", "file format from the content (JPEG, PNG, ...), one-hot", lambda hs: _one_hot([h.format for h in hs])
    ),
    Feature(
        "jpeg_quality", "estimated JPEG quality, 0 for other formats", lambda hs: _numbers([h.jpeg_quality for h in hs])
    ),
    Feature("size", "width and height in pixels", lambda hs: _numbers([h.width for h in hs], [h.height for h in hs])),
    Feature("mode", "Pillow colour mode (RGB, L, RGBA, P, ...), one-hot", lambda hs: _one_hot([h.mode for h in hs])),
    Feature("exif", "EXIF block present", lambda hs: _numbers([h.has_exif for h in hs])),
    Feature("file_size", "file size in bytes", lambda hs: _numbers([h.file_size for h in hs])),
)
FEATURE_NAMES: tuple[str, ...] = tuple(feature.name for feature in FEATURES)


@dataclass(frozen=True)
class FeatureAuc:
    """How well one feature predicts the label within one dataset."""

    dataset: str
    feature: str  # a FEATURES name or ALL_FEATURES
    auc: float  # mean over folds; NaN when it cannot be measured (see note)
    auc_std: float
    n_real: int
    n_fake: int
    folds: int
    note: str = ""


def cross_validated_auc(inputs: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> tuple[float, float]:
    """(mean, std) over ``StratifiedKFold(folds, shuffle, seed)`` of the test-fold ROC AUC of a shallow tree."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    aucs = []
    for train, test in splitter.split(inputs, labels):
        tree = DecisionTreeClassifier(max_depth=TREE_MAX_DEPTH, random_state=seed).fit(inputs[train], labels[train])
        aucs.append(roc_auc_score(labels[test], tree.predict_proba(inputs[test])[:, 1]))
    return float(np.mean(aucs)), float(np.std(aucs))


def score_features(
    dataset: str,
    headers: Sequence[ImageHeader],
    labels: Sequence[int],
    folds: int,
    seed: int,
    features: Sequence[Feature] = FEATURES,
) -> list[FeatureAuc]:
    """The AUC of each of ``features`` and of all together, from the readable ``headers`` of one dataset."""
    label_array = np.asarray(labels, dtype=np.int64)
    n_fake = int(label_array.sum())
    n_real = len(label_array) - n_fake
    usable_folds = min(folds, n_real, n_fake)
    names = (*(feature.name for feature in features), ALL_FEATURES)
    if usable_folds < 2:
        note = f"needs at least 2 readable images of each label (has {n_real} real, {n_fake} fake)"
        return [FeatureAuc(dataset, name, math.nan, math.nan, n_real, n_fake, 0, note) for name in names]
    inputs = {feature.name: feature.encode(headers) for feature in features}
    inputs[ALL_FEATURES] = np.concatenate(list(inputs.values()), axis=1)
    return [
        FeatureAuc(
            dataset,
            name,
            *cross_validated_auc(inputs[name], label_array, usable_folds, seed),
            n_real,
            n_fake,
            usable_folds,
        )
        for name in names
    ]


@dataclass(frozen=True)
class DatasetFlag:
    """A dataset whose metadata predicts the label: the feature responsible and every feature over the threshold."""

    dataset: str
    feature: str
    auc: float
    over_threshold: tuple[tuple[str, float], ...]

    def describe(self) -> str:
        others = ", ".join(f"{name} {auc:.3f}" for name, auc in self.over_threshold if name != self.feature)
        cause = "all features together predict" if self.feature == ALL_FEATURES else f"{self.feature} alone predicts"
        return f"FLAGGED {self.dataset}: {cause} real vs fake (AUC {self.auc:.3f})" + (
            f"; also {others}" if others else ""
        )


def flag_dataset(aucs: Sequence[FeatureAuc], threshold: float) -> DatasetFlag | None:
    """The flag of one dataset's AUCs, or None when none reaches ``threshold``."""
    over = [row for row in aucs if row.auc >= threshold]  # NaN compares False
    if not over:
        return None
    order = {name: index for index, name in enumerate((*FEATURE_NAMES, ALL_FEATURES))}
    single = [row for row in over if row.feature != ALL_FEATURES] or over
    top = min(single, key=lambda row: (-row.auc, order[row.feature]))
    ranked = sorted(over, key=lambda row: (-row.auc, order[row.feature]))
    return DatasetFlag(top.dataset, top.feature, top.auc, tuple((row.feature, row.auc) for row in ranked))


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Spread:
    min: float
    median: float
    max: float

    @staticmethod
    def of(values: Sequence[float]) -> Spread | None:
        return Spread(float(min(values)), float(np.median(values)), float(max(values))) if values else None


@dataclass(frozen=True)
class LabelSummary:
    """Header statistics of one label of one dataset (readable files; errors counted)."""

    dataset: str
    label: int
    n: int  # every row, readable or not
    n_errors: int
    formats: Mapping[str, int]  # most frequent first
    modes: Mapping[str, int]
    exif_fraction: float | None
    jpeg_quality: Spread | None  # over the JPEG files
    width: Spread | None
    height: Spread | None
    file_size: Spread | None


def _counts(values: Sequence[str | None]) -> dict[str, int]:
    return dict(sorted(Counter(str(value) for value in values).items(), key=lambda item: (-item[1], item[0])))


def summarise_label(dataset: str, label: int, headers: Sequence[ImageHeader]) -> LabelSummary:
    readable = [header for header in headers if not header.error]
    return LabelSummary(
        dataset=dataset,
        label=label,
        n=len(headers),
        n_errors=len(headers) - len(readable),
        formats=_counts([header.format for header in readable]),
        modes=_counts([header.mode for header in readable]),
        exif_fraction=float(np.mean([bool(header.has_exif) for header in readable])) if readable else None,
        jpeg_quality=Spread.of([header.jpeg_quality for header in readable if header.jpeg_quality is not None]),
        width=Spread.of([header.width for header in readable]),
        height=Spread.of([header.height for header in readable]),
        file_size=Spread.of([header.file_size for header in readable]),
    )


# ---------------------------------------------------------------- the audit


@dataclass(frozen=True)
class AuditResult:
    """Everything the audit found, in manifest and dataset order."""

    threshold: float
    headers: tuple[ImageHeader, ...]  # row-aligned with the manifest
    aucs: tuple[FeatureAuc, ...]
    summaries: tuple[LabelSummary, ...]
    flags: tuple[DatasetFlag, ...]

    @property
    def n_errors(self) -> int:
        return sum(1 for header in self.headers if header.error)


def audit_headers(
    manifest: Manifest,
    headers: Sequence[ImageHeader],
    threshold: float,
    folds: int,
    seed: int,
    features: Sequence[Feature] = FEATURES,
) -> AuditResult:
    """Statistics, AUCs (of ``features``) and flags of every dataset of ``manifest`` from its row-aligned ``headers``."""
    if len(headers) != len(manifest):
        raise ValueError(f"{len(headers)} headers for {len(manifest)} manifest rows")
    rows_of: dict[str, list[int]] = {}
    for index, row in enumerate(manifest.rows):
        rows_of.setdefault(row.dataset, []).append(index)
    aucs: list[FeatureAuc] = []
    summaries: list[LabelSummary] = []
    flags: list[DatasetFlag] = []
    for dataset, indices in rows_of.items():
        for label in (REAL, FAKE):
            label_headers = [headers[i] for i in indices if manifest.rows[i].label == label]
            if label_headers:
                summaries.append(summarise_label(dataset, label, label_headers))
        readable = [i for i in indices if not headers[i].error]
        dataset_aucs = score_features(
            dataset, [headers[i] for i in readable], [manifest.rows[i].label for i in readable], folds, seed, features
        )
        aucs += dataset_aucs
        flag = flag_dataset(dataset_aucs, threshold)
        if flag is not None:
            flags.append(flag)
    return AuditResult(threshold, tuple(headers), tuple(aucs), tuple(summaries), tuple(flags))


def read_row_header(row_images: RowImages, index: int, config: AuditConfig) -> ImageHeader:
    """The header of a manifest row's image: its file's, or read from its bytes (a Parquet row, a hashed row)."""
    if not row_images.is_in_memory(index):
        return config.header_reader()(row_images.location(index))
    try:
        data = row_images.read_bytes(index)
    except ImageDecodeError as error:
        return ImageHeader(error=error.reason)
    return read_bytes_header(data, None if config.perturbation is None else config.align_quality)


def read_headers(
    paths: Sequence[Hashable],
    workers: int,
    progress: bool,
    description: str,
    reader: Callable[[Any], ImageHeader] = read_image_header,
) -> list[ImageHeader]:
    """Headers of ``paths`` in order, read by ``workers`` threads; a file listed twice is read once.

    (Layouts share reals between datasets: the UFD diffusion sets, Synthbuster.)
    """
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(workers, thread_name_prefix="header") as pool:
        results = pool.map(reader, unique)
        header_of = dict(
            zip(unique, tqdm(results, total=len(unique), unit="img", desc=description, disable=not progress))
        )
    return [header_of[path] for path in paths]


@dataclass(frozen=True)
class AuditSummary:
    split: str
    result: AuditResult
    written: tuple[Path, ...]
    variant: str | None = None

    def report(self) -> str:
        result = self.result
        n_datasets = len({row.dataset for row in result.aucs})
        audited = self.split + (f" ({self.variant}: the files re-encoded as that variant)" if self.variant else "")
        lines = [
            f"audit of {audited}: {len(result.headers)} images in {n_datasets} dataset(s), {result.n_errors} unreadable"
        ]
        lines += [flag.describe() for flag in result.flags]
        if not result.flags:
            lines.append(f"no dataset flagged: no header feature reaches AUC {result.threshold:g}")
        unmeasured = sorted({row.dataset for row in result.aucs if row.note})
        if unmeasured:
            lines.append(f"not measured (too few readable images of a label): {', '.join(unmeasured)}")
        return "\n".join(lines)


def run_audit(config: AuditConfig) -> AuditSummary:
    """Read a split's manifest and image headers, write the audit tables and JSON into ``config.out``."""
    config.validate()
    manifest = read_manifest(config.manifest)
    row_images = RowImages(manifest, config.data_root)
    index_of = {row.path: index for index, row in enumerate(manifest.rows)}  # a path listed twice is read once
    headers = read_headers(
        [row.path for row in manifest.rows],
        config.workers,
        config.progress,
        f"audit {config.split}",
        lambda path: read_row_header(row_images, index_of[path], config),
    )
    result = audit_headers(manifest, headers, config.threshold, config.folds, config.seed, config.features())
    try:
        written = write_audit(result, manifest, config)
    except OSError as error:
        raise AuditError(f"{config.out}: cannot write the audit ({error})") from error
    return AuditSummary(config.split, result, written, config.variant)


# ---------------------------------------------------------------- writing


def _number(value: float | None) -> float | int | None:
    """JSON/CSV-friendly: None for NaN, ints for integral values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value) if float(value).is_integer() else float(value)


def auc_records(result: AuditResult) -> list[dict[str, object]]:
    flagged = {flag.dataset: flag for flag in result.flags}
    return [
        {
            **asdict(row),
            "auc": _number(row.auc),
            "auc_std": _number(row.auc_std),
            "flagged": row.auc >= result.threshold,
            "responsible": row.dataset in flagged and flagged[row.dataset].feature == row.feature,
        }
        for row in result.aucs
    ]


def summary_records(result: AuditResult) -> list[dict[str, object]]:
    records = []
    for summary in result.summaries:
        record: dict[str, object] = {
            "dataset": summary.dataset,
            "label": summary.label,
            "n": summary.n,
            "n_errors": summary.n_errors,
            "formats": dict(summary.formats),
            "modes": dict(summary.modes),
            "exif_fraction": summary.exif_fraction,
        }
        for name in ("jpeg_quality", "width", "height", "file_size"):
            spread = getattr(summary, name)
            for statistic in ("min", "median", "max"):
                record[f"{name}_{statistic}"] = None if spread is None else _number(getattr(spread, statistic))
        records.append(record)
    return records


def image_records(result: AuditResult, manifest: Manifest) -> list[dict[str, object]]:
    return [
        {"path": row.path, "label": row.label, "dataset": row.dataset, **asdict(header)}
        for row, header in zip(manifest.rows, result.headers)
    ]


def _csv_cell(value: object) -> object:
    """CSV text: reals with 4 significant digits (from 1000 on, whole numbers); the JSON keeps full precision."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return ";".join(f"{key}={count}" for key, count in value.items())
    if isinstance(value, float):
        return str(round(value)) if abs(value) >= 1000 else f"{value:.4g}"
    return value


def write_csv(path: Path, columns: Sequence[str], records: Sequence[Mapping[str, object]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for record in records:
            writer.writerow([_csv_cell(record[column]) for column in columns])


def write_audit(result: AuditResult, manifest: Manifest, config: AuditConfig) -> tuple[Path, ...]:
    """Write the CSVs and the JSON; returns their paths."""
    aucs, summaries, images = auc_records(result), summary_records(result), image_records(result, manifest)
    stem = config.out / config.stem
    paths = (
        stem.with_suffix(".csv"),
        Path(f"{stem}_summary.csv"),
        Path(f"{stem}_images.csv"),
        stem.with_suffix(".json"),
    )
    write_csv(paths[0], AUC_COLUMNS, aucs)
    write_csv(paths[1], SUMMARY_COLUMNS, summaries)
    write_csv(paths[2], IMAGE_COLUMNS, images)
    document = {
        "split": config.split,
        "variant": config.variant,  # None: the files as they are
        "manifest": str(config.manifest),
        "manifest_sha256": manifest.sha256(),
        "threshold": result.threshold,
        "folds": config.folds,
        "seed": config.seed,
        "model": f"DecisionTreeClassifier(max_depth={TREE_MAX_DEPTH}), mean test-fold ROC AUC over StratifiedKFold",
        "features": {feature.name: feature.description for feature in config.features()}
        | {ALL_FEATURES: "every feature together"},
        "n_images": len(result.headers),
        "n_errors": result.n_errors,
        "flags": [asdict(flag) | {"over_threshold": dict(flag.over_threshold)} for flag in result.flags],
        "feature_aucs": aucs,
        "summary": summaries,
        "errors": [record for record in images if record["error"]],
    }
    with atomic_path(paths[3]) as tmp:
        tmp.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return paths
