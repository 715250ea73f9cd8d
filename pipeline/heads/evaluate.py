"""A fitted group, evaluated and written: val and every test store scored by all its heads at once, each
head calibrated on val, and each run's folder written (scores, head, config, fit.json, then metrics.csv).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..devices import peak_memory
from ..names import CENTER, DEFAULT_HEAD, VAL_SPLIT
from ..results import ERROR, NO_VALID_ROWS, OK, SETTING_FIELDS, HeadConfig, ResultRow, Setting
from ..results.metrics import compute_metrics
from ..results.run_folder import RunDocument, RunFolder, ScoreFile
from .calibration import calibrate_head
from .config import GridConfig, RunConfig, classes_label, datasets_label, run_config_dict
from .head import count_parameters, save_head
from .probe_fit import fit_probe_group, probe_input, probe_logits
from .scoring import group_logits
from .stores import (
    DataError,
    GridData,
    LoadedStore,
    TrainStore,
    class_mask,
    dataset_mask,
    store_block_indices,
    training_rows,
)
from .train import FitResult, fit_group


def base_row(spec: GridConfig, data: GridData | None, run: RunConfig, rid: str) -> ResultRow:
    """A run's row before anything is scored: its setting and head config."""
    n_classes = None
    if data is not None and data.train.rows.classes is not None:
        n_classes = len(set(data.train.rows.classes.tolist())) if run.classes is None else len(run.classes)
    values = dataclasses.asdict(run)
    setting = Setting(
        model=spec.model,
        tap=spec.tap,
        train=spec.train.name,
        **{
            name: values[name]
            for name in SETTING_FIELDS
            if name in values and name not in ("classes", "train_datasets")
        },
        classes=classes_label(run.classes),
        train_datasets=datasets_label(run.train_datasets),
        n_classes=n_classes,
    )
    head = HeadConfig(run.contrastive_factor, run.proj_layers, run.proj_dim)
    return ResultRow(run=rid, status=OK, error="", grid=spec.name, head=head, setting=setting)


def error_row(spec: GridConfig, data: GridData | None, run: RunConfig, rid: str, message: str) -> ResultRow:
    return dataclasses.replace(base_row(spec, data, run, rid), status=ERROR, error=message)


@dataclass(frozen=True)
class GroupContext:
    """What every group of a grid shares: the spec, the stores, the device and where features live."""

    spec: GridConfig
    data: GridData  # (None only for a grid with nothing left to fit, which has no group)
    device: torch.device
    memory_budget: int
    placement: tuple[bool, ...]  # in memory (True) or streamed, per store: train, val, tests
    fuse: bool


@dataclass(frozen=True)
class Evaluated:
    """One split evaluated by one head: the rows scored, their logits (N, n_crops), and the rows in scope."""

    store: LoadedStore
    rows: np.ndarray
    logits: torch.Tensor
    scope: np.ndarray  # bool per store row: rows the split reports on (valid or not)


def fit_and_evaluate_group(
    context: GroupContext, members: list[tuple[int, RunConfig, str]], runs_dir: Path, progress: bool = False
) -> list[tuple[int, list[ResultRow]]]:
    """Fit a group of configs together, run val and every test store through all its heads at once, write each run."""
    data = context.data
    configs = [run for _, run, _ in members]
    first = configs[0]  # the group shares classes, so it shares the val rows
    val_scope = evaluation_scope(data.val, first)
    val_rows = np.flatnonzero(val_scope & data.val.rows.valid)
    if not len(val_rows):
        raise DataError(f"{data.val.ref.name}: no valid row of the run's classes to choose its thresholds on")
    if first.head != DEFAULT_HEAD:
        return fit_and_evaluate_probes(context, members, runs_dir, val_scope, val_rows)
    group = fit_group(data.train, configs, device=context.device, progress=progress)
    scoring_start = time.perf_counter()
    val_logits = group_logits(group.stack, data.val, val_rows, first)
    tests = []
    for test in data.tests:
        test_rows = np.flatnonzero(test.rows.valid)
        tests.append((test, test_rows, group_logits(group.stack, test, test_rows, first)))
    group_record = {
        "runs": [rid for _, _, rid in members],
        "fused": context.fuse,
        "fit_seconds": group.fit_seconds,
        "score_seconds": time.perf_counter() - scoring_start,  # val and every test entry, all heads at once
        "cuda_graph": group.cuda_graph,
    }
    finished = []
    for position, ((index, run, rid), fit) in enumerate(zip(members, group.results(), strict=True)):
        val = Evaluated(data.val, val_rows, val_logits[position], val_scope)
        evaluated = [
            Evaluated(test, rows, logits[position], np.ones(len(test.rows), dtype=bool)) for test, rows, logits in tests
        ]
        record = {"group": {**group_record, "index": position}}
        finished.append((index, write_run(context, run, RunFolder(runs_dir / rid), fit, val, evaluated, record)))
    return finished


def fit_and_evaluate_probes(
    context: GroupContext,
    members: list[tuple[int, RunConfig, str]],
    runs_dir: Path,
    val_scope: np.ndarray,
    val_rows: np.ndarray,
) -> list[tuple[int, list[ResultRow]]]:
    """A group of ``linear``/``logreg``/``knn`` configs: fitted on one read of the training view, val and every
    test store scored by all of them from one read each, each run written like a RINE run."""
    data = context.data
    failed, inputs, kept = [], [], []
    for index, run, rid in members:  # a block the store lacks fails its config alone
        try:
            inputs.append(probe_input(data.train, run))
            kept.append((index, run, rid))
        except DataError as error:
            message = f"{type(error).__name__}: {error}"
            (runs_dir / rid).mkdir(parents=True, exist_ok=True)
            RunFolder(runs_dir / rid).write_error(message + "\n")
            failed.append((index, [error_row(context.spec, data, run, rid, message)]))
    members = kept
    if not members:
        return failed
    configs = [run for _, run, _ in members]
    train_rows, n_invalid = training_rows(data.train, configs[0])
    start = time.perf_counter()
    fits = fit_probe_group(data.train, configs, inputs, train_rows, n_invalid)
    fit_seconds = time.perf_counter() - start
    heads = [fit.head for fit in fits]
    scoring_start = time.perf_counter()
    val_logits = probe_logits(heads, inputs, data.val, val_rows)
    tests = []
    for test in data.tests:
        test_rows = np.flatnonzero(test.rows.valid)
        tests.append((test, test_rows, probe_logits(heads, inputs, test, test_rows)))
    group_record = {
        "runs": [rid for _, _, rid in members],
        "fused": False,
        "fit_seconds": fit_seconds,
        "score_seconds": time.perf_counter() - scoring_start,
        "cuda_graph": False,
    }
    finished = []
    for position, ((index, run, rid), fit) in enumerate(zip(members, fits, strict=True)):
        val = Evaluated(data.val, val_rows, val_logits[position], val_scope)
        evaluated = [
            Evaluated(test, rows, logits[position], np.ones(len(test.rows), dtype=bool)) for test, rows, logits in tests
        ]
        record = {"group": {**group_record, "index": position}}
        finished.append((index, write_run(context, run, RunFolder(runs_dir / rid), fit, val, evaluated, record)))
    return failed + finished


def write_run(
    context: GroupContext,
    run: RunConfig,
    folder: RunFolder,
    fit: FitResult,
    val: Evaluated,
    tests: list[Evaluated],
    record: dict[str, Any],
) -> list[ResultRow]:
    """Calibrate one fitted run on val, write its folder (scores, head, config, fit.json, then metrics.csv)."""
    spec, data = context.spec, context.data
    folder.path.mkdir(parents=True, exist_ok=True)
    head = fit.head
    base = dataclasses.replace(
        base_row(spec, data, run, folder.run_id),
        n_params=count_parameters(head),
        fit_seconds=round(fit.fit_seconds, 4),
        views_used=fit.views_used,
        views_reused=fit.views_reused,
    )
    calibration = calibrate_head(run.calibration, val.logits, data.val.rows.labels[val.rows], data.val.ref.name)
    rows: list[ResultRow] = []
    splits = [(VAL_SPLIT, val, None)] + [(t.store.ref.name, t, calibration.threshold_values()) for t in tests]
    for split, evaluated, thresholds in splits:
        scores = calibration.scores(evaluated.logits)
        folder.write_scores(split, score_file(evaluated.store, evaluated.rows, scores))
        rows += metric_rows(base, split, evaluated.store, evaluated.rows, scores, thresholds, evaluated.scope)

    save_head(head, folder.head_path, {**head_metadata(data.train, run), **calibration.to_metadata()})
    folder.write_document(run_document(spec, run, data))
    refs = (data.train.ref, data.val.ref, *(t.ref for t in data.tests))
    folder.write_fit(
        {
            "fit_seconds": fit.fit_seconds,
            "n_train": fit.n_train,
            "n_train_invalid": fit.n_train_invalid,
            "epoch_losses": list(fit.epoch_losses),
            "epoch_lrs": list(fit.epoch_lrs),
            "epoch_views": list(fit.epoch_views),
            "views_used": fit.views_used,
            "views_reused": fit.views_reused,
            "amp": run.amp,
            "protocol": run.protocol,
            "train_datasets": None if run.train_datasets is None else list(run.train_datasets),
            "train_rows": row_ranges(training_rows(data.train, run)[0]),
            **record,
            "features": {ref.name: "memory" if here else "streamed" for ref, here in zip(refs, context.placement)},
            "memory_budget_bytes": context.memory_budget,
            "peak_memory_bytes": peak_memory(context.device),
            "device": str(context.device),
            "torch": torch.__version__,
        }
    )
    folder.write_metrics(rows)
    return rows


def row_ranges(rows: np.ndarray) -> list[list[int]]:
    """Sorted store rows as ``[start, stop)`` ranges: the rows a run trained on, compactly."""
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [[int(rows[a]), int(rows[b - 1]) + 1] for a, b in zip(starts, stops)]


def evaluation_scope(store: LoadedStore, run: RunConfig) -> np.ndarray:
    """Rows val reports on (valid or not): on a store with classes, those of the run's training classes; on a store
    holding every dataset the run trains on (a protocol cell), those datasets' rows."""
    classes = run.classes if store.rows.classes is not None else None
    scope = class_mask(store.rows, classes, store.info.path)
    datasets = run.train_datasets
    if datasets is not None and set(datasets) <= set(store.rows.datasets.tolist()):
        scope &= dataset_mask(store.rows, datasets, store.info.path)
    return scope


def metric_rows(
    base: ResultRow,
    split: str,
    store: LoadedStore,
    rows: np.ndarray,
    scores: np.ndarray,
    val_thresholds: Mapping[str, float] | None,
    scope: np.ndarray | None = None,
) -> list[ResultRow]:
    """One row per dataset in ``scope`` (all rows by default); a dataset without a valid row gets ``n = 0`` and
    status ``no_valid_rows``, saying why."""
    table = store.rows
    scope = np.ones(len(table), dtype=bool) if scope is None else scope
    labels = table.labels[rows]
    datasets = table.datasets[rows]
    out = []
    for dataset in sorted(set(table.datasets[scope].tolist())):
        invalid = np.flatnonzero(scope & ~table.valid & (table.datasets == dataset))
        mask = datasets == dataset
        row = dataclasses.replace(
            base,
            split=split,
            variant=store.ref.variant or CENTER,
            dataset=dataset,
            n=int(mask.sum()),
            n_invalid=len(invalid),
        )
        if not mask.any():
            example = f"{table.paths[invalid[0]]}: {table.errors[invalid[0]]}"
            reason = f"all {len(invalid)} rows of {dataset} are invalid, e.g. {example}"
            out.append(dataclasses.replace(row, status=NO_VALID_ROWS, error=reason))
            continue
        metrics = compute_metrics(labels[mask], scores[mask], val_thresholds)
        out.append(dataclasses.replace(row, metrics=metrics.columns()))
    return out


def score_file(store: LoadedStore, rows: np.ndarray, scores: np.ndarray) -> ScoreFile:
    table = store.rows
    return ScoreFile(table.paths[rows], table.labels[rows].astype(np.int64), table.datasets[rows], scores)


def head_metadata(train: TrainStore, run: RunConfig) -> dict[str, str]:
    """The head's metadata (``run_folder.HEAD_METADATA_KEYS``): what it needs of the backbone and its features."""
    identity = train.info.identity
    return {
        "head": run.head,
        "features": run.features,
        "head_blocks": run.head_blocks,
        "amp": run.amp,
        "model": identity.model_id,
        "model_revision": identity.model_revision,
        "model_config": identity.model_config,
        "tap": identity.tap,
        "store_blocks": json.dumps(list(store_block_indices(identity))),
        "store_dtype": identity.dtype,
        "crop_size": str(identity.crop_size),
    }


def run_document(spec: GridConfig, run: RunConfig, data: GridData) -> RunDocument:
    return RunDocument(
        grid=spec.name,
        run=run_config_dict(run),
        data=data.identity,
        train_store=str(data.train.ref.path),
        val_store=str(data.val.ref.path),
        test_stores={t.ref.name: str(t.ref.path) for t in data.tests},
    )
