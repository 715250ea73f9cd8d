"""A run's per-image scores (``scores_<split>.csv``) and where its images are (the data root of each store).

``pipeline fit`` writes ``<run>/scores_<split>.csv`` (``path,label,dataset,score``;
paths relative to the data root the store recorded) for the val split and
every test entry, and ``<run>/config.yaml`` naming each store. The data root
and crop size come from the store's attributes (through ``pipeline.cache``,
the only door to the stores); a store that is gone or moved leaves them
unknown, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..names import VAL_SPLIT
from ..results.run_folder import RunFolderError, ScoreFile
from .inputs import RunResult


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
    return run.run_folder.scores_path(split)


def read_scored_split(path: Path, split: str, variant: str) -> ScoredSplit:
    """Read a scores_<split>.csv; a missing column or a bad value names the file and line."""
    scores = ScoreFile.read(path)
    return ScoredSplit(split, variant, scores.paths, scores.labels, scores.datasets, scores.scores)


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
    folder = run.run_folder
    if not folder.config_path.is_file():
        return StoreFacts(None, None, f"{folder.config_path} is missing: the store of {split!r} is unknown")
    try:
        store = folder.read_document().store_of(split, VAL_SPLIT)
    except RunFolderError as error:
        return StoreFacts(None, None, f"cannot read its stores ({error})")
    if store is None:
        return StoreFacts(None, None, f"{folder.config_path} names no store for {split!r}")
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
