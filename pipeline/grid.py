"""Run a grid of head configs from cached features; one row per run x dataset.

The stores are loaded once per process; every run (also with ``--jobs N``,
which uses threads) reads the same tensors. Each run writes a folder named by
a hash of its config and data, with ``metrics.csv`` written last: a folder
with it is finished and skipped on re-run. A failing config becomes an error
row and the grid goes on unless ``fail_fast``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import yaml
from joblib import Parallel, delayed
from tqdm.auto import tqdm

from . import cache
from .devices import resolve_device
from .files import write_text_atomic
from .config import GridSpec, RunConfig, StoreRef, classes_label, run_config_dict
from .head import count_parameters, save_head
from .metrics import METRIC_NAMES, best_threshold, compute_metrics
from .train import (
    LoadedStore,
    check_compatible,
    evaluation_variants,
    open_info,
    class_mask,
    fit_head,
    load_store,
    score_store,
    train_variants,
)

HYPER_COLUMNS = (
    "contrastive_factor",
    "proj_layers",
    "proj_dim",
    "epochs",
    "batch_size",
    "lr",
    "classes",
    "n_classes",
    "train_fraction",
    "blocks",
    "aggregation",
    "seed",
    "amp",
)
RESULT_COLUMNS = (
    ("run", "status", "error", "grid", "model", "tap", "setting")
    + HYPER_COLUMNS
    + ("n_params", "fit_seconds", "split", "variant", "dataset", "n", "n_invalid")
    + METRIC_NAMES
)
SELECTION_COLUMNS = (
    ("selection", "setting", "run", "model", "tap") + HYPER_COLUMNS + ("val_acc", "val_ap", "mean_acc", "mean_ap")
)


@dataclass(frozen=True)
class FitOptions:
    device: str = "auto"
    jobs: int = 1
    fail_fast: bool = False
    progress: bool = True


@dataclass(frozen=True)
class GridStores:
    """The stores a grid reads and the variants it needs of each (nothing loaded yet)."""

    refs: tuple[StoreRef, ...]  # train, val, tests...
    infos: tuple[cache.StoreInfo, ...]
    variants: tuple[tuple[str, ...], ...]

    def identity(self) -> dict[str, Any]:
        """What a run's numbers depend on besides its config (for the run id)."""

        def describe(ref: StoreRef, info: cache.StoreInfo, variants: tuple[str, ...]) -> dict[str, Any]:
            return {
                "name": ref.name,
                "manifest": info.identity.manifest_sha256,
                "model": info.identity.model_id,
                "revision": info.identity.model_revision,
                "tap": info.identity.tap,
                "blocks": list(info.identity.blocks),
                "crop": info.identity.crop_size,
                "dtype": info.identity.dtype,
                "compute_dtype": info.identity.compute_dtype,
                "seed": info.identity.seed,
                "variants": list(variants),
            }

        described = [describe(*item) for item in zip(self.refs, self.infos, self.variants)]
        return {"train": described[0], "val": described[1], "tests": described[2:]}


@dataclass(frozen=True)
class GridData:
    """The stores of a grid, loaded once and shared by every run."""

    train: LoadedStore
    val: LoadedStore
    tests: tuple[LoadedStore, ...]
    identity: dict[str, Any]


@dataclass(frozen=True)
class GridSummary:
    out: Path
    n_runs: int
    n_skipped: int
    n_errors: int
    results: Path
    selection: Path
    seconds: float


def run_id(config: RunConfig, data_identity: dict[str, Any]) -> str:
    text = json.dumps({"run": run_config_dict(config), "data": data_identity}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan_grid_stores(spec: GridSpec) -> GridStores:
    """Open every store's attributes, check they hold the same kind of features."""
    refs = (spec.train, spec.val, *spec.tests)
    infos = tuple(open_info(ref) for ref in refs)
    check_compatible(list(infos))
    max_epochs = max(run.epochs for run in spec.runs)
    variants = (train_variants(infos[0], spec.train, max_epochs),) + tuple(evaluation_variants(ref) for ref in refs[1:])
    return GridStores(refs, infos, variants)


def load_grid_data(stores: GridStores, device: torch.device) -> GridData:
    train, val, *tests = (load_store(ref, v, device) for ref, v in zip(stores.refs, stores.variants))
    return GridData(train, val, tuple(tests), stores.identity())


def run_grid(spec: GridSpec, options: FitOptions) -> GridSummary:
    """Fit and evaluate every config of ``spec``; write results.csv and selection.csv."""
    start = time.perf_counter()
    device = resolve_device(options.device)
    out = spec.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if spec.source is not None:
        write_text_atomic(out / "grid.yaml", spec.source.read_text())
    stores = plan_grid_stores(spec)
    identity = stores.identity()
    ids = [run_id(run, identity) for run in spec.runs]
    todo = [i for i, rid in enumerate(ids) if not (out / "runs" / rid / "metrics.csv").is_file()]
    data = load_grid_data(stores, device) if todo else None  # a finished grid reads no features
    if options.jobs > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // options.jobs))

    def task(index: int) -> tuple[int, list[dict[str, Any]]]:
        run, folder = spec.runs[index], out / "runs" / ids[index]
        step_bar = options.progress and options.jobs == 1  # one config at a time: show its steps too
        try:
            return index, fit_and_evaluate(spec, data, run, ids[index], folder, device, step_bar)
        except Exception as error:  # noqa: BLE001 - one failing config becomes an error row
            if options.fail_fast:
                raise
            message = f"{type(error).__name__}: {error}"
            write_text_atomic(folder / "error.txt", traceback.format_exc())
            return index, [error_row(spec, run, ids[index], message)]

    errors: dict[int, list[dict[str, Any]]] = {}
    bar = tqdm(total=len(todo), unit="run", desc=f"grid {spec.name}", disable=not options.progress)
    parallel = Parallel(n_jobs=options.jobs, backend="threading", return_as="generator_unordered")
    for index, rows in parallel(delayed(task)(i) for i in todo):
        run = spec.runs[index]
        label = f"run {ids[index]} (xi {run.contrastive_factor}, q {run.proj_layers}, d' {run.proj_dim})"
        if rows and rows[0]["status"] == "error":
            errors[index] = rows
            bar.write(f"{label} failed: {rows[0]['error']}")
        elif options.progress:
            bar.write(f"{label}: fit {rows[0]['fit_seconds']:.1f} s")
        bar.update(1)
    bar.close()

    all_rows: list[dict[str, Any]] = []
    for index, rid in enumerate(ids):
        if index in errors:
            all_rows.extend(errors[index])
        else:
            all_rows.extend(read_csv_rows(out / "runs" / rid / "metrics.csv"))
    results = out / "results.csv"
    write_csv(results, RESULT_COLUMNS, all_rows)
    selection = out / "selection.csv"
    write_csv(selection, SELECTION_COLUMNS, select_runs(all_rows))
    return GridSummary(
        out=out,
        n_runs=len(ids),
        n_skipped=len(ids) - len(todo),
        n_errors=len(errors),
        results=results,
        selection=selection,
        seconds=time.perf_counter() - start,
    )


def hyper_values(run: RunConfig, train: LoadedStore | None) -> dict[str, Any]:
    values = run_config_dict(run)
    n_classes: Any = ""
    if train is not None and train.rows.classes is not None:
        n_classes = len(set(train.rows.classes.tolist())) if run.classes is None else len(run.classes)
    values.update(classes=classes_label(run.classes), n_classes=n_classes)
    return {key: values[key] for key in HYPER_COLUMNS}


def base_row(spec: GridSpec, run: RunConfig, rid: str, train: LoadedStore | None) -> dict[str, Any]:
    return {
        "run": rid,
        "status": "ok",
        "error": "",
        "grid": spec.name,
        "model": spec.model,
        "tap": spec.tap,
        "setting": run.setting(),
        **hyper_values(run, train),
    }


def error_row(spec: GridSpec, run: RunConfig, rid: str, message: str) -> dict[str, Any]:
    return {**base_row(spec, run, rid, None), "status": "error", "error": message}


def fit_and_evaluate(
    spec: GridSpec,
    data: GridData,
    run: RunConfig,
    rid: str,
    folder: Path,
    device: torch.device,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Fit one config, score val and every test store, write the run folder."""
    folder.mkdir(parents=True, exist_ok=True)
    fit = fit_head(data.train, run, device=device, progress=progress)
    head = fit.head
    base = {**base_row(spec, run, rid, data.train), "n_params": count_parameters(head), "fit_seconds": round(fit.fit_seconds, 4)}

    val_rows = evaluation_rows(data.val, run)
    val_scores = score_store(head, data.val, val_rows, run)
    threshold, _ = best_threshold(data.val.rows.labels[val_rows], val_scores)
    rows = metric_rows(base, "val", data.val, val_rows, val_scores, None)
    write_scores(folder / "scores_val.csv", data.val, val_rows, val_scores)
    for test in data.tests:
        test_rows = np.flatnonzero(test.rows.valid)
        scores = score_store(head, test, test_rows, run)
        write_scores(folder / f"scores_{test.ref.name}.csv", test, test_rows, scores)
        rows += metric_rows(base, test.ref.name, test, test_rows, scores, threshold)

    save_head(head, folder / "head.safetensors", head_metadata(data.train, run))
    write_text_atomic(folder / "config.yaml", yaml.safe_dump(run_document(spec, run, data), sort_keys=False))
    fit_info = {
        "fit_seconds": fit.fit_seconds,
        "n_train": fit.n_train,
        "n_train_invalid": fit.n_train_invalid,
        "epoch_losses": list(fit.epoch_losses),
        "device": str(device),
        "torch": torch.__version__,
    }
    write_text_atomic(folder / "fit.json", json.dumps(fit_info, indent=2))
    write_csv(folder / "metrics.csv", RESULT_COLUMNS, rows)
    return rows


def evaluation_rows(store: LoadedStore, run: RunConfig) -> np.ndarray:
    """Valid rows; on a store with classes, those of the run's training classes."""
    classes = run.classes if store.rows.classes is not None else None
    return np.flatnonzero(class_mask(store.rows, classes, store.info.path) & store.rows.valid)


def metric_rows(
    base: dict[str, Any],
    split: str,
    store: LoadedStore,
    rows: np.ndarray,
    scores: np.ndarray,
    calibrated_threshold: float | None,
) -> list[dict[str, Any]]:
    labels = store.rows.labels[rows]
    datasets = store.rows.datasets[rows]
    invalid = store.rows.datasets[~store.rows.valid]
    out = []
    for dataset in sorted(set(datasets.tolist())):
        mask = datasets == dataset
        metrics = compute_metrics(labels[mask], scores[mask], calibrated_threshold)
        out.append(
            {
                **base,
                "split": split,
                "variant": store.ref.variant or "center",
                "dataset": dataset,
                "n": int(mask.sum()),
                "n_invalid": int(np.count_nonzero(invalid == dataset)),
                **{name: getattr(metrics, name) for name in METRIC_NAMES},
            }
        )
    return out


def write_scores(path: Path, store: LoadedStore, rows: np.ndarray, scores: np.ndarray) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "dataset", "score"])
    for row, score in zip(rows, scores):
        writer.writerow([store.rows.paths[row], int(store.rows.labels[row]), store.rows.datasets[row], repr(float(score))])
    write_text_atomic(path, buffer.getvalue())


def head_metadata(train: LoadedStore, run: RunConfig) -> dict[str, str]:
    identity = train.info.identity
    return {
        "blocks_used": run.blocks,
        "model": identity.model_id,
        "model_revision": identity.model_revision,
        "tap": identity.tap,
        "store_blocks": json.dumps(list(identity.blocks)),
        "crop_size": str(identity.crop_size),
    }


def run_document(spec: GridSpec, run: RunConfig, data: GridData) -> dict[str, Any]:
    return {
        "grid": spec.name,
        "run": run_config_dict(run),
        "data": data.identity,
        "stores": {
            "train": str(data.train.ref.path),
            "val": str(data.val.ref.path),
            "tests": {t.ref.name: str(t.ref.path) for t in data.tests},
        },
    }


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def select_runs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best run per setting by val (honest) and by mean test ACC+AP (paper protocol)."""
    per_run: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        entry = per_run.setdefault(row["run"], {"row": row, "val": [], "test_acc": [], "test_ap": []})
        if row["split"] == "val":
            entry["val"].append((float(row["acc"]), float(row["ap"])))
        elif row["variant"] == "center":
            entry["test_acc"].append(float(row["acc"]))
            entry["test_ap"].append(float(row["ap"]))
    by_setting: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for rid, entry in per_run.items():
        row = entry["row"]
        summary = {
            "setting": row["setting"],
            "run": rid,
            "model": row["model"],
            "tap": row["tap"],
            **{key: row[key] for key in HYPER_COLUMNS},
            "val_acc": _mean(a for a, _ in entry["val"]),
            "val_ap": _mean(p for _, p in entry["val"]),
            "mean_acc": _mean(entry["test_acc"]),
            "mean_ap": _mean(entry["test_ap"]),
        }
        by_setting.setdefault((row["model"], row["tap"], row["setting"]), []).append(summary)
    selected = []
    for key in sorted(by_setting):
        candidates = by_setting[key]
        rules = (
            ("best_by_val", lambda s: (_nan_low(s["val_acc"]), _nan_low(s["val_ap"]))),
            ("best_by_test_mean_acc_ap", lambda s: _nan_low(s["mean_acc"] + s["mean_ap"])),
        )
        for name, score in rules:
            best = max(candidates, key=lambda s: (score(s), s["run"]))
            selected.append({"selection": name, **best})
    return selected


def _nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def read_csv_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _format(row.get(key, "")) for key in columns})
    write_text_atomic(path, buffer.getvalue())


def _format(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value
