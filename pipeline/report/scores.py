"""A run's per-image scores (``scores_<split>.csv``) and where its images are (the data root of each store).

``pipeline fit`` writes ``<run>/scores_<split>.csv`` (``path,label,dataset,score``;
paths relative to the data root the store recorded) for the val split and
every test entry, and ``<run>/config.yaml`` naming each store. The data root
and crop size come from the store's attributes (through ``pipeline.cache``,
the only door to the stores); a store that is gone or moved leaves them
unknown, with the reason.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..names import VAL_SPLIT
from .inputs import ReportError, RunResult

SCORES_COLUMNS = ("path", "label", "dataset", "score")


@dataclass(frozen=True)
class ScoredSplit:
    """Every scored row of one split of one run, in file order."""

    split: str
    variant: str
    paths: np.ndarray  # str, relative to the data root
    labels: np.ndarray  # int64, 0 real / 1 fake
    datasets: np.ndarray  # str
    scores: np.ndarray  # float64, probability of fake

    def dataset_names(self) -> list[str]:
        return list(dict.fromkeys(self.datasets.tolist()))

    def of_dataset(self, dataset: str) -> tuple[np.ndarray, np.ndarray]:
        """(labels, scores) of one dataset's rows."""
        mask = self.datasets == dataset
        return self.labels[mask], self.scores[mask]


def scores_path(run: RunResult, split: str) -> Path:
    return run.folder / f"scores_{split}.csv"


def read_scored_split(path: Path, split: str, variant: str) -> ScoredSplit:
    """Read a scores_<split>.csv; a missing column or a bad value names the file and line."""
    paths, labels, datasets, scores = [], [], [], []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in SCORES_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ReportError(f"{path}: missing column(s) {missing} (expected {', '.join(SCORES_COLUMNS)})")
        for record in reader:
            try:
                label, score = int(record["label"]), float(record["score"])
            except ValueError:
                raise ReportError(f"{path}:{reader.line_num}: label or score is not a number") from None
            if label not in (0, 1) or not 0.0 <= score <= 1.0 or math.isnan(score):
                raise ReportError(f"{path}:{reader.line_num}: label must be 0 or 1 and score in [0, 1]")
            paths.append(record["path"])
            labels.append(label)
            datasets.append(record["dataset"])
            scores.append(score)
    return ScoredSplit(
        split=split,
        variant=variant,
        paths=np.asarray(paths, dtype=str),
        labels=np.asarray(labels, dtype=np.int64),
        datasets=np.asarray(datasets, dtype=str),
        scores=np.asarray(scores, dtype=np.float64),
    )


def read_run_scores(run: RunResult, include_val: bool = False) -> tuple[list[ScoredSplit], list[str]]:
    """(the run's scored test splits, or every split with ``include_val``; the splits whose file is missing)."""
    found, missing = [], []
    for split, variant in run.splits.items():
        if split == VAL_SPLIT and not include_val:
            continue
        path = scores_path(run, split)
        if path.is_file():
            found.append(read_scored_split(path, split, variant))
        else:
            missing.append(split)
    return found, missing


@dataclass(frozen=True)
class StoreFacts:
    """What the report needs of a scored split's store: where its images are and the crop size."""

    data_root: Path | None
    crop_size: int | None
    note: str = ""  # why a fact is unknown


def store_facts(run: RunResult, split: str) -> StoreFacts:
    """The data root and crop size recorded in the store ``split`` was scored from (``config.yaml`` names it)."""
    config_file = run.folder / "config.yaml"
    if not config_file.is_file():
        return StoreFacts(None, None, f"{config_file} is missing: the store of {split!r} is unknown")
    try:
        stores = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("stores", {})
        store = stores.get("val") if split == VAL_SPLIT else stores.get("tests", {}).get(split)
    except (yaml.YAMLError, AttributeError) as error:
        return StoreFacts(None, None, f"{config_file}: cannot read its stores ({error})")
    if store is None:
        return StoreFacts(None, None, f"{config_file} names no store for {split!r}")
    from .. import cache  # the door to the stores; imports zarr only when the report needs it

    try:
        info = cache.open_store_info(Path(store))
    except Exception as error:  # noqa: BLE001 - a store gone or unreadable only leaves the facts unknown
        return StoreFacts(None, None, f"store {store} cannot be opened ({type(error).__name__}: {error})")
    root = info.attrs.get("data_root")
    data_root = Path(root) if root else None
    if data_root is None:
        return StoreFacts(None, info.identity.crop_size, f"store {store} records no data root")
    if not data_root.is_dir():
        return StoreFacts(None, info.identity.crop_size, f"the data root {data_root} recorded in {store} is not here")
    return StoreFacts(data_root, info.identity.crop_size)
