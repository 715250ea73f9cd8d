"""A run's folder as a type: the one contract between the grid that writes it and everything that reads it.

``<grid out>/runs/<run id>/`` holds ``config.yaml`` (:class:`RunDocument`), ``head.safetensors`` (the head,
its metadata keyed by ``HEAD_METADATA_KEYS``: the detector's contract), ``fit.json``, one
``scores_<split>.csv`` per scored split (:class:`ScoreFile`), ``metrics.csv`` (written last: its presence
marks a finished run), and for selected runs ``embeddings.npz``; a failed run leaves ``error.txt``. Every
file is written complete or absent. Torch-free; the format is documented in docs/results-format.md.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import PipelineError
from ..files import write_text_atomic
from .rows import RESULT_COLUMNS, ResultRow, read_result_rows, write_csv

CONFIG_FILE = "config.yaml"
HEAD_FILE = "head.safetensors"
FIT_FILE = "fit.json"
METRICS_FILE = "metrics.csv"
EMBEDDINGS_FILE = "embeddings.npz"
ERROR_FILE = "error.txt"
SCORES_COLUMNS: tuple[str, ...] = ("path", "label", "dataset", "score")

# The head's metadata: what it needs of the backbone and its features (the detector's contract) ...
HEAD_METADATA_KEYS: tuple[str, ...] = (
    "head",  # rine, linear, logreg or knn (absent in heads of older versions: rine)
    "features",  # blocks, block:K or embedding: what the head reads
    "head_blocks",  # "all" or "last": the blocks the head reads of those stored
    "amp",  # the precision it trained in
    "model",  # the backbone: hub id or local path
    "model_revision",  # hub commit, or a content hash of a local folder's weights
    "model_config",  # the backbone's config.json as canonical JSON (the store identity's model_config)
    "tap",
    "store_blocks",  # JSON list of the backbone blocks whose tokens were stored
    "store_dtype",  # the dtype its features were rounded to
    "crop_size",
)
REQUIRED_HEAD_METADATA: tuple[str, ...] = ("model", "model_revision", "tap", "store_blocks")
# ... and what calibration chose on val (heads.calibration.HeadCalibration)
CALIBRATION_METADATA_KEYS: tuple[str, ...] = ("calibration", "temperature", "val_split", "n_val", "thresholds")

# libyaml's dumper when there is one: the same text, ~5x faster per run folder
YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class RunFolderError(PipelineError, ValueError):
    """A run folder file that cannot be read; the message names the file (and line)."""


@dataclass(frozen=True)
class RunDocument:
    """``config.yaml``: the grid, the run's config as plain values, its data identity and its stores' paths."""

    grid: str
    run: Mapping[str, Any]  # heads.config.make_run_config turns it back into a RunConfig
    data: Mapping[str, Any]  # what the numbers depend on besides the config (the run id hashes it)
    train_store: str
    val_store: str
    test_stores: Mapping[str, str]  # test entry name -> store path

    def to_yaml(self) -> str:
        document = {
            "grid": self.grid,
            "run": dict(self.run),
            "data": dict(self.data),
            "stores": {"train": self.train_store, "val": self.val_store, "tests": dict(self.test_stores)},
        }
        return yaml.dump(document, Dumper=YAML_DUMPER, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, where: Path) -> RunDocument:
        try:
            document = yaml.safe_load(text)
            stores = document["stores"]
            return cls(
                grid=str(document["grid"]),
                run=dict(document["run"]),
                data=dict(document["data"]),
                train_store=str(stores["train"]),
                val_store=str(stores["val"]),
                test_stores={str(name): str(path) for name, path in (stores.get("tests") or {}).items()},
            )
        except (yaml.YAMLError, KeyError, TypeError, AttributeError) as error:
            raise RunFolderError(f"{where}: not a run's config.yaml ({type(error).__name__}: {error})") from None

    def store_of(self, split: str, val_split: str) -> str | None:
        """The store path a scored split was read from (``val_split`` names the val split)."""
        return self.val_store if split == val_split else self.test_stores.get(split)


@dataclass(frozen=True)
class ScoreFile:
    """``scores_<split>.csv``: every scored row of one split, in store order (paths relative to the data root)."""

    paths: np.ndarray  # str
    labels: np.ndarray  # int64, 0 real / 1 fake
    datasets: np.ndarray  # str
    scores: np.ndarray  # float64, the probability of fake

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(SCORES_COLUMNS)
        for path, label, dataset, score in zip(self.paths, self.labels, self.datasets, self.scores):
            writer.writerow([path, int(label), dataset, repr(float(score))])
        return buffer.getvalue()

    @classmethod
    def read(cls, path: Path) -> ScoreFile:
        """Read a score file; a missing column or a bad value names the file and line."""
        paths, labels, datasets, scores = [], [], [], []
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in SCORES_COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                raise RunFolderError(f"{path}: missing column(s) {missing} (expected {', '.join(SCORES_COLUMNS)})")
            for record in reader:
                try:
                    label, score = int(record["label"]), float(record["score"])
                except ValueError:
                    raise RunFolderError(f"{path}:{reader.line_num}: label or score is not a number") from None
                if label not in (0, 1) or not 0.0 <= score <= 1.0 or math.isnan(score):
                    raise RunFolderError(f"{path}:{reader.line_num}: label must be 0 or 1 and score in [0, 1]")
                paths.append(record["path"])
                labels.append(label)
                datasets.append(record["dataset"])
                scores.append(score)
        return cls(
            paths=np.asarray(paths, dtype=str),
            labels=np.asarray(labels, dtype=np.int64),
            datasets=np.asarray(datasets, dtype=str),
            scores=np.asarray(scores, dtype=np.float64),
        )


@dataclass(frozen=True)
class RunFolder:
    """One run's folder: where each file is, and reading and writing them (each write complete or absent)."""

    path: Path

    @classmethod
    def of(cls, grid_out: Path, run_id: str) -> RunFolder:
        return cls(Path(grid_out) / "runs" / run_id)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def head_path(self) -> Path:
        return self.path / HEAD_FILE

    @property
    def fit_path(self) -> Path:
        return self.path / FIT_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def embeddings_path(self) -> Path:
        return self.path / EMBEDDINGS_FILE

    @property
    def error_path(self) -> Path:
        return self.path / ERROR_FILE

    def scores_path(self, split: str) -> Path:
        return self.path / f"scores_{split}.csv"

    def is_finished(self) -> bool:
        """``metrics.csv`` is written last: a folder with it holds every file of a finished run."""
        return self.metrics_path.is_file()

    def has_head(self) -> bool:
        return self.head_path.is_file()

    # -------------------------------------------------------------- writing (the grid)

    def write_document(self, document: RunDocument) -> None:
        write_text_atomic(self.config_path, document.to_yaml())

    def write_scores(self, split: str, scores: ScoreFile) -> None:
        write_text_atomic(self.scores_path(split), scores.to_csv())

    def write_fit(self, record: Mapping[str, Any]) -> None:
        write_text_atomic(self.fit_path, json.dumps(record, indent=2))

    def write_metrics(self, rows: Iterable[ResultRow]) -> None:
        """The run's rows of results.csv; written last, it marks the run finished."""
        write_csv(self.metrics_path, RESULT_COLUMNS, (row.to_csv() for row in rows))

    def write_error(self, text: str) -> None:
        write_text_atomic(self.error_path, text)

    # -------------------------------------------------------------- reading (report, export, predict)

    def read_document(self) -> RunDocument:
        if not self.config_path.is_file():
            raise RunFolderError(f"{self.config_path}: no such file; not a finished run folder")
        return RunDocument.from_yaml(self.config_path.read_text(encoding="utf-8"), self.config_path)

    def read_scores(self, split: str) -> ScoreFile:
        return ScoreFile.read(self.scores_path(split))

    def read_fit(self) -> dict[str, Any]:
        """``fit.json`` ({} when absent: folders of older versions)."""
        if not self.fit_path.is_file():
            return {}
        try:
            return json.loads(self.fit_path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise RunFolderError(f"{self.fit_path}: not JSON ({error})") from None

    def read_metrics(self) -> list[ResultRow]:
        return [row for _, row in read_result_rows(self.metrics_path)]

    def missing(self, names: Sequence[str] = (HEAD_FILE, CONFIG_FILE, METRICS_FILE)) -> list[str]:
        """Which of the files ``names`` the folder lacks."""
        return [name for name in names if not (self.path / name).is_file()]
