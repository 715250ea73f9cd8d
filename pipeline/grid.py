"""Run a grid of head configs from cached features; one results row per run x dataset.

The evaluation stores are loaded once per process and the training views
stream through one shared ``ViewCache``; every run (also with ``--jobs N``,
which uses threads) reads the same tensors. Each run writes a folder named
by a hash of its config, its data and ``RUN_PROTOCOL``, with ``metrics.csv``
written last: a folder with it is finished and skipped on re-run. A failing
config becomes an error row and the grid goes on unless ``fail_fast``.

After every run, ``results.csv`` and ``selection.csv`` are written (format
and selection rules: ``pipeline.results``), and each selected run gets
``embeddings.npz``: the head's z for a seeded sample of at most
``EMBEDDING_ROWS_PER_SET`` rows per test set (center-crop test entries), which
the report draws as a t-SNE.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import time
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from joblib import Parallel, delayed
from tqdm.auto import tqdm

from . import cache
from .calibration import calibrate_head
from .config import GridSpec, RunConfig, StoreRef, classes_label, make_run_config, run_config_dict
from .devices import resolve_device
from .files import atomic_path, write_text_atomic
from .head import count_parameters, load_head, save_head
from .metrics import compute_metrics
from .results import (
    CENTER,
    ERROR,
    OK,
    RESULT_COLUMNS,
    SELECTION_COLUMNS,
    SETTING_FIELDS,
    VAL_SPLIT,
    HeadConfig,
    ResultRow,
    Setting,
    read_result_rows,
    select_runs,
    selection_record,
    summarize_runs,
    write_csv,
)
from .train import (
    LoadedStore,
    TrainStore,
    check_compatible,
    class_mask,
    evaluation_variants,
    fit_head,
    forward_rows,
    load_store,
    open_info,
    open_train_store,
    store_block_indices,
    store_logits,
    train_views,
)

# Bumped whenever training or scoring changes what a config computes, so that
# finished runs of an older protocol are not reused. 2: the authors' lr
# schedule, ten-crop by the mean logit, the view of each epoch streamed.
# 3: val thresholds (and the optional temperature) stored with the head,
# operating-point and calibration metrics.
RUN_PROTOCOL = 3
EMBEDDING_ROWS_PER_SET = 200
EMBEDDINGS_FILE = "embeddings.npz"


class ViewReuseWarning(UserWarning):
    """Runs of a grid have more epochs than the training store has views."""


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
    train_views: tuple[str, ...]  # every training view of the train store

    def identity(self) -> dict[str, Any]:
        """What a run's numbers depend on besides its config and its views (for the run id)."""

        def describe(ref: StoreRef, info: cache.StoreInfo, variants: tuple[str, ...]) -> dict[str, Any]:
            identity = info.identity
            return {
                "name": ref.name,
                "manifest": identity.manifest_sha256,
                "model": identity.model_id,
                "revision": identity.model_revision,
                "tap": identity.tap,
                "blocks": list(store_block_indices(identity)),
                "crop": identity.crop_size,
                "dtype": identity.dtype,
                "compute_dtype": identity.compute_dtype,
                "seed": identity.seed,
                "variants": list(variants),
            }

        train = describe(self.refs[0], self.infos[0], ())
        evaluated = [describe(ref, info, evaluation_variants(ref)) for ref, info in zip(self.refs[1:], self.infos[1:])]
        return {"protocol": RUN_PROTOCOL, "train": train, "val": evaluated[0], "tests": evaluated[1:]}

    def run_views(self, run: RunConfig) -> tuple[str, ...]:
        """The distinct views a run reads, in epoch order."""
        return tuple(dict.fromkeys(self.train_views[epoch % len(self.train_views)] for epoch in range(run.epochs)))


@dataclass(frozen=True)
class GridData:
    """The stores of a grid, opened once and shared by every run."""

    train: TrainStore
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


def run_id(config: RunConfig, data_identity: dict[str, Any], views: tuple[str, ...]) -> str:
    text = json.dumps({"run": run_config_dict(config), "data": data_identity, "views": list(views)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan_grid_stores(spec: GridSpec) -> GridStores:
    """Open every store's attributes, check they hold the same kind of features."""
    refs = (spec.train, spec.val, *spec.tests)
    infos = tuple(open_info(ref) for ref in refs)
    check_compatible(list(infos))
    return GridStores(refs, infos, train_views(infos[0], spec.train))


def warn_view_reuse(spec: GridSpec, stores: GridStores) -> None:
    """Warn once per grid when runs have more epochs than the store has views."""
    n_views = len(stores.train_views)
    longer = [run for run in spec.runs if run.epochs > n_views]
    if longer:
        most = max(run.epochs for run in longer)
        warnings.warn(
            f"grid {spec.name}: {len(longer)} of {len(spec.runs)} runs train for more epochs (up to {most}) than "
            f"{spec.train.path} has training views ({n_views}); epoch e reads view e mod {n_views}, so views are "
            f"reused (views_used / views_reused in results.csv). Extract the split with --views {most} for a fresh "
            "augmentation every epoch, as the authors.",
            ViewReuseWarning,
            stacklevel=2,
        )


def load_grid_data(stores: GridStores, device: torch.device) -> GridData:
    train = open_train_store(stores.refs[0], device, stores.train_views)
    val, *tests = (load_store(ref, device) for ref in stores.refs[1:])
    return GridData(train, val, tuple(tests), stores.identity())


def run_grid(spec: GridSpec, options: FitOptions) -> GridSummary:
    """Fit and evaluate every config of ``spec``; write results.csv, selection.csv and the selected runs' embeddings."""
    start = time.perf_counter()
    device = resolve_device(options.device)
    out = spec.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if spec.source is not None:
        write_text_atomic(out / "grid.yaml", spec.source.read_text())
    stores = plan_grid_stores(spec)
    warn_view_reuse(spec, stores)
    identity = stores.identity()
    ids = [run_id(run, identity, stores.run_views(run)) for run in spec.runs]
    todo = [i for i, rid in enumerate(ids) if not (out / "runs" / rid / "metrics.csv").is_file()]
    data = load_grid_data(stores, device) if todo else None  # a finished grid reads no features
    if options.jobs > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // options.jobs))

    def task(index: int) -> tuple[int, list[ResultRow]]:
        run, folder = spec.runs[index], out / "runs" / ids[index]
        step_bar = options.progress and options.jobs == 1  # one config at a time: show its steps too
        try:
            return index, fit_and_evaluate(spec, data, run, ids[index], folder, device, step_bar)
        except Exception as error:  # noqa: BLE001 - one failing config becomes an error row
            if options.fail_fast:
                raise
            write_text_atomic(folder / "error.txt", traceback.format_exc())
            return index, [error_row(spec, data, run, ids[index], f"{type(error).__name__}: {error}")]

    errors: dict[int, list[ResultRow]] = {}
    bar = tqdm(total=len(todo), unit="run", desc=f"grid {spec.name}", disable=not options.progress)
    parallel = Parallel(n_jobs=options.jobs, backend="threading", return_as="generator_unordered")
    try:
        for index, rows in parallel(delayed(task)(i) for i in todo):
            run = spec.runs[index]
            label = f"run {ids[index]} (xi {run.contrastive_factor}, q {run.proj_layers}, d' {run.proj_dim})"
            if rows[0].status == ERROR:
                errors[index] = rows
                bar.write(f"{label} failed: {rows[0].error}")
            elif options.progress:
                bar.write(f"{label}: fit {rows[0].fit_seconds:.1f} s")
            bar.update(1)
    finally:
        bar.close()
        if data is not None:
            data.train.view_cache.close()

    all_rows: list[ResultRow] = []
    for index, rid in enumerate(ids):
        if index in errors:
            all_rows.extend(errors[index])
        else:
            all_rows.extend(row for _, row in read_result_rows(out / "runs" / rid / "metrics.csv"))
    results = out / "results.csv"
    write_csv(results, RESULT_COLUMNS, (row.to_csv() for row in all_rows))
    selections = select_runs(summarize_runs(all_rows).values())
    selection = out / "selection.csv"
    write_csv(selection, SELECTION_COLUMNS, (selection_record(s) for s in selections))
    write_embeddings(spec, data, [out / "runs" / s.summary.run for s in selections], device)
    return GridSummary(
        out=out,
        n_runs=len(ids),
        n_skipped=len(ids) - len(todo),
        n_errors=len(errors),
        results=results,
        selection=selection,
        seconds=time.perf_counter() - start,
    )


def base_row(spec: GridSpec, data: GridData | None, run: RunConfig, rid: str) -> ResultRow:
    """A run's row before anything is scored: its setting and head config."""
    n_classes = None
    if data is not None and data.train.rows.classes is not None:
        n_classes = len(set(data.train.rows.classes.tolist())) if run.classes is None else len(run.classes)
    values = dataclasses.asdict(run)
    setting = Setting(
        model=spec.model,
        tap=spec.tap,
        train=spec.train.name,
        **{name: values[name] for name in SETTING_FIELDS if name in values and name != "classes"},
        classes=classes_label(run.classes),
        n_classes=n_classes,
    )
    head = HeadConfig(run.contrastive_factor, run.proj_layers, run.proj_dim)
    return ResultRow(run=rid, status=OK, error="", grid=spec.name, head=head, setting=setting)


def error_row(spec: GridSpec, data: GridData | None, run: RunConfig, rid: str, message: str) -> ResultRow:
    return dataclasses.replace(base_row(spec, data, run, rid), status=ERROR, error=message)


def fit_and_evaluate(
    spec: GridSpec,
    data: GridData,
    run: RunConfig,
    rid: str,
    folder: Path,
    device: torch.device,
    progress: bool = False,
) -> list[ResultRow]:
    """Fit one config, score val and every test store, write the run folder."""
    folder.mkdir(parents=True, exist_ok=True)
    fit = fit_head(data.train, run, device=device, progress=progress)
    head = fit.head
    base = dataclasses.replace(
        base_row(spec, data, run, rid),
        n_params=count_parameters(head),
        fit_seconds=round(fit.fit_seconds, 4),
        views_used=fit.views_used,
        views_reused=fit.views_reused,
    )
    val_rows = evaluation_rows(data.val, run)
    val_logits = store_logits(head, data.val, val_rows, run)
    calibration = calibrate_head(run.calibration, val_logits, data.val.rows.labels[val_rows], data.val.ref.name)
    val_scores = calibration.scores(val_logits)
    rows = metric_rows(base, VAL_SPLIT, data.val, val_rows, val_scores, None)
    write_scores(folder / "scores_val.csv", data.val, val_rows, val_scores)
    for test in data.tests:
        test_rows = np.flatnonzero(test.rows.valid)
        scores = calibration.scores(store_logits(head, test, test_rows, run))
        write_scores(folder / f"scores_{test.ref.name}.csv", test, test_rows, scores)
        rows += metric_rows(base, test.ref.name, test, test_rows, scores, calibration.threshold_values())

    save_head(head, folder / "head.safetensors", {**head_metadata(data.train, run), **calibration.to_metadata()})
    write_text_atomic(folder / "config.yaml", yaml.safe_dump(run_document(spec, run, data), sort_keys=False))
    fit_info = {
        "fit_seconds": fit.fit_seconds,
        "n_train": fit.n_train,
        "n_train_invalid": fit.n_train_invalid,
        "epoch_losses": list(fit.epoch_losses),
        "epoch_lrs": list(fit.epoch_lrs),
        "epoch_views": list(fit.epoch_views),
        "views_used": fit.views_used,
        "views_reused": fit.views_reused,
        "device": str(device),
        "torch": torch.__version__,
    }
    write_text_atomic(folder / "fit.json", json.dumps(fit_info, indent=2))
    write_csv(folder / "metrics.csv", RESULT_COLUMNS, (row.to_csv() for row in rows))
    return rows


def evaluation_rows(store: LoadedStore, run: RunConfig) -> np.ndarray:
    """Valid rows; on a store with classes, those of the run's training classes."""
    classes = run.classes if store.rows.classes is not None else None
    return np.flatnonzero(class_mask(store.rows, classes, store.info.path) & store.rows.valid)


def metric_rows(
    base: ResultRow,
    split: str,
    store: LoadedStore,
    rows: np.ndarray,
    scores: np.ndarray,
    val_thresholds: Mapping[str, float] | None,
) -> list[ResultRow]:
    labels = store.rows.labels[rows]
    datasets = store.rows.datasets[rows]
    invalid = store.rows.datasets[~store.rows.valid]
    out = []
    for dataset in sorted(set(datasets.tolist())):
        mask = datasets == dataset
        metrics = compute_metrics(labels[mask], scores[mask], val_thresholds)
        out.append(
            dataclasses.replace(
                base,
                split=split,
                variant=store.ref.variant or CENTER,
                dataset=dataset,
                n=int(mask.sum()),
                n_invalid=int(np.count_nonzero(invalid == dataset)),
                metrics=metrics.columns(),
            )
        )
    return out


def write_scores(path: Path, store: LoadedStore, rows: np.ndarray, scores: np.ndarray) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "dataset", "score"])
    for row, score in zip(rows, scores):
        writer.writerow(
            [store.rows.paths[row], int(store.rows.labels[row]), store.rows.datasets[row], repr(float(score))]
        )
    write_text_atomic(path, buffer.getvalue())


def head_metadata(train: TrainStore, run: RunConfig) -> dict[str, str]:
    identity = train.info.identity
    return {
        "head_blocks": run.head_blocks,
        "amp": run.amp,
        "model": identity.model_id,
        "model_revision": identity.model_revision,
        "tap": identity.tap,
        "store_blocks": json.dumps(list(store_block_indices(identity))),
        "store_dtype": identity.dtype,
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


def embedding_sample(store: LoadedStore, per_set: int = EMBEDDING_ROWS_PER_SET, seed: int = 0) -> np.ndarray:
    """Sorted valid rows: at most ``per_set`` per dataset, drawn with a fixed seed (the same for every run)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for dataset in sorted(set(store.rows.datasets.tolist())):
        candidates = np.flatnonzero((store.rows.datasets == dataset) & store.rows.valid)
        if len(candidates) > per_set:
            candidates = rng.choice(candidates, size=per_set, replace=False)
        chosen.append(candidates)
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def write_embeddings(spec: GridSpec, data: GridData | None, folders: list[Path], device: torch.device) -> None:
    """embeddings.npz for each selected run folder that has a head and no embeddings yet."""
    missing = [folder for folder in dict.fromkeys(folders) if not (folder / EMBEDDINGS_FILE).is_file()]
    missing = [folder for folder in missing if (folder / "head.safetensors").is_file()]
    refs = [ref for ref in spec.tests if (ref.variant or CENTER) == CENTER]
    if not missing or not refs:
        return
    tests = [t for t in data.tests if t.ref in refs] if data is not None else [load_store(ref, device) for ref in refs]
    samples = [(test, embedding_sample(test)) for test in tests]
    for folder in missing:
        head = load_head(folder / "head.safetensors")[0].to(device)
        run = make_run_config(yaml.safe_load((folder / "config.yaml").read_text())["run"], str(folder / "config.yaml"))
        parts: dict[str, list[np.ndarray]] = {"z": [], "label": [], "dataset": [], "split": [], "path": []}
        for test, rows in samples:
            _, z = forward_rows(head, test.features[CENTER], rows, run)
            parts["z"].append(z.numpy())
            parts["label"].append(test.rows.labels[rows].astype(np.int8))
            parts["dataset"].append(test.rows.datasets[rows].astype(str))
            parts["split"].append(np.full(len(rows), test.ref.name))
            parts["path"].append(test.rows.paths[rows].astype(str))
        arrays = {key: np.concatenate(values) for key, values in parts.items()}
        with atomic_path(folder / EMBEDDINGS_FILE) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
