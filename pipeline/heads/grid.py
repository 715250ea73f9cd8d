"""Run a grid of head configs from cached features; one results row per run x dataset.

Configs that may train together (``train.group_key``: all but xi and the
calibration equal) are fitted and scored as fused groups of at most ``MAX_GROUP_SIZE``
(``train.fit_group``; ``FitConfig.fuse=False`` fits each alone); each
config still gets its own run folder, metrics and head. The evaluation
stores are loaded once per process and the training views stream through
one shared ``ViewCache``; every group (also with ``--jobs N``, which uses
threads) reads the same tensors. With ``FitConfig.cluster`` the groups run
on a Dask cluster's workers instead (``pipeline.heads.cluster``; joblib's Dask
backend): each worker process loads the stores for its first group and keeps
them (``run_group_on_worker``), writes its runs' folders, and this process
assembles the results. Stores that do not fit the memory budget
(``FitConfig.memory_budget``, default ``devices.available_memory``) are not
loaded: their batches are gathered from the shard files, with the same
results. Each run writes a folder named by a hash of its config, its data
and ``RUN_PROTOCOL``, with ``metrics.csv`` written last:
a folder with it is finished and skipped on re-run. A failing config becomes
an error row and the grid goes on unless ``fail_fast``; a disk error a user
can fix (full, read-only, denied) stops the grid with one ``WriteError``
naming the file (``files.disk_errors_explained``).

Checked before anything is fitted: the stores hold the tap and model the
grid declares (undeclared, they are taken from the stores, so results are
labelled with what the features are) and the same kind of features, and
every config's training rows hold both labels. A test dataset whose rows
are all invalid gets a row with ``n = 0`` and status ``no_valid_rows``.

After every run, ``results.csv`` and ``selection.csv`` are written (format
and selection rules: ``pipeline.results``), and each selected run gets
``embeddings.npz``: the head's z for a seeded sample of at most
``EMBEDDING_ROWS_PER_SET`` rows per test set (center-crop test entries), which
the report draws as a t-SNE.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import threading
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
from joblib import Parallel, delayed, parallel_config
from tqdm.auto import tqdm

from .. import cache
from ..devices import available_memory, bf16_is_fast, exact_float32, peak_memory, resolve_device
from ..errors import PipelineWarning
from ..files import atomic_path, disk_errors_explained, explain_os_error, write_text_atomic
from ..names import CENTER, MAX_GROUP_SIZE, VAL_SPLIT
from ..results import (
    ERROR,
    NO_VALID_ROWS,
    OK,
    RESULT_COLUMNS,
    SELECTION_COLUMNS,
    SETTING_FIELDS,
    HeadConfig,
    ResultRow,
    Setting,
    read_result_rows,
    select_runs,
    selection_record,
    summarize_runs,
    write_csv,
)
from ..results.metrics import compute_metrics
from .calibration import calibrate_head
from .cluster import ClusterConfig, dask_client, pin_worker
from .config import GridConfig, RunConfig, StoreRef, classes_label, make_run_config, run_config_dict
from .head import count_parameters, load_head, save_head
from .train import (
    DataError,
    FitResult,
    LoadedStore,
    OneLabelError,
    TrainStore,
    check_compatible,
    class_mask,
    evaluation_variants,
    fit_group,
    forward_rows,
    fusable_groups,
    group_logits,
    load_store,
    open_info,
    open_train_store,
    store_block_indices,
    train_views,
    training_rows,
    variant_bytes,
)

# Bumped whenever training or scoring changes what a config computes, so that
# finished runs of an older protocol are not reused. 2: the authors' lr
# schedule, ten-crop by the mean logit, the view of each epoch streamed.
# 3: val thresholds (and the optional temperature) stored with the head,
# operating-point and calibration metrics. 4: the fused (stacked) trainer:
# the dropout masks of a step in one draw, bf16 without autocast. 5: scores in float64 and TIE's softmax
# row by row, so that no number depends on the count of torch threads. 6: scores in float32 whatever the
# training precision (bf16 runs scored in bf16 before), float32 matmuls at "highest" precision.
RUN_PROTOCOL = 6
EMBEDDING_ROWS_PER_SET = 200
EMBEDDINGS_FILE = "embeddings.npz"

YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's: the same text, ~5x faster per run folder


class ViewReuseWarning(PipelineWarning):
    """Runs of a grid have more epochs than the training store has views."""


class SlowPrecisionWarning(PipelineWarning):
    """Runs of a grid ask for bf16 on hardware that only emulates it."""


@dataclass(frozen=True)
class FitConfig:
    device: str = "auto"
    jobs: int = 1
    fail_fast: bool = False
    progress: bool = True
    fuse: bool = True  # False: every config fitted alone (the unfused trainer)
    memory_budget: int | None = None  # bytes of features held in memory; None: devices.available_memory
    cluster: ClusterConfig | None = None  # run the groups on a Dask cluster's workers instead of ``jobs`` threads


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


def plan_grid_stores(spec: GridConfig) -> GridStores:
    """Open every store's attributes; check they hold the grid's declared tap and model and the same kind of features."""
    refs = (spec.train, spec.val, *spec.tests)
    infos = tuple(open_info(ref) for ref in refs)
    for ref, info in zip(refs, infos):
        check_declared(spec, ref, info)
    check_compatible(list(infos))
    return GridStores(refs, infos, train_views(infos[0], spec.train))


def labelled_spec(spec: GridConfig, stores: GridStores) -> GridConfig:
    """The spec with the model and tap it does not declare taken from its stores: what results are labelled with."""
    identity = stores.infos[0].identity
    model = spec.model if "model" in spec.declared else identity.model_id
    tap = spec.tap if "tap" in spec.declared else identity.tap
    return dataclasses.replace(spec, model=model, tap=tap)


def check_declared(spec: GridConfig, ref: StoreRef, info: cache.StoreInfo) -> None:
    """A store must hold the tap and the model the grid declares (``data.tap``, ``data.model``)."""
    identity = info.identity
    if "tap" in spec.declared and identity.tap != spec.tap:
        raise DataError(
            f"{ref.name} ({info.path}) holds features of tap {identity.tap!r}, but the grid's data.tap is "
            f"{spec.tap!r}; declare the tap the stores hold, or give stores of tap {spec.tap!r}"
        )
    if "model" not in spec.declared:
        return
    if identity.model_id != spec.model and cache.model_slug(identity.model_id) != cache.model_slug(spec.model):
        raise DataError(
            f"{ref.name} ({info.path}) holds features of model {identity.model_id!r}, but the grid's data.model is "
            f"{spec.model!r}; declare the model the stores hold, or give stores of model {spec.model!r}"
        )


def warn_view_reuse(spec: GridConfig, stores: GridStores) -> None:
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


def place_features(spec: GridConfig, stores: GridStores, budget: int) -> tuple[bool, ...]:
    """In memory or streamed, per store (train, val, tests): each fits in what the earlier ones left of ``budget``.

    The training store counts its views resident at once (two when a run
    reads more than one view: the one trained on and the one prefetched);
    an evaluation store counts every variant it scores.
    """
    longest = max(len(stores.run_views(run)) for run in spec.runs)
    needs = [variant_bytes(stores.infos[0]) * min(longest, 2)]
    needs += [
        variant_bytes(info) * len(evaluation_variants(ref)) for ref, info in zip(stores.refs[1:], stores.infos[1:])
    ]
    placement = []
    for need in needs:
        placement.append(need <= budget)
        budget -= need if need <= budget else 0
    return tuple(placement)


def load_grid_data(stores: GridStores, device: torch.device, placement: tuple[bool, ...]) -> GridData:
    train = open_train_store(stores.refs[0], device, stores.train_views, in_memory=placement[0])
    val, *tests = (load_store(ref, device, in_memory) for ref, in_memory in zip(stores.refs[1:], placement[1:]))
    return GridData(train, val, tuple(tests), stores.identity())


def check_training_labels(spec: GridConfig, train: TrainStore, runs: list[RunConfig]) -> None:
    """Refuse the grid before any fit when a config's training rows hold one label only."""
    problems = {}
    for run in runs:
        try:
            training_rows(train, run)
        except OneLabelError as error:
            problems.setdefault(str(error), None)
        except DataError:  # other problems become that config's error row
            pass
    if problems:
        raise DataError(f"grid {spec.name}: " + "\n".join(problems))


def run_grid(spec: GridConfig, options: FitConfig) -> GridSummary:
    """Fit and evaluate every config of ``spec``; write results.csv, selection.csv and the selected runs' embeddings.

    The groups run in this process (``options.jobs`` threads) or on a Dask
    cluster's workers (``options.cluster``); the numbers are the same either
    way (nor do they depend on torch's thread count), and torch's thread
    count is as it was when this returns.
    """
    threads = torch.get_num_threads()
    try:
        cluster = contextlib.nullcontext() if options.cluster is None else dask_client(options.cluster)
        with disk_errors_explained(spec.out), cluster as client, exact_float32():
            return _run_grid(spec, options, client)
    finally:
        torch.set_num_threads(threads)


def _run_grid(spec: GridConfig, options: FitConfig, client: Any | None) -> GridSummary:
    start = time.perf_counter()
    # the workers of a cluster fit on their devices; this process only draws the embeddings
    device = resolve_device(options.device) if client is None else torch.device("cpu")
    runs = list(spec.runs)
    if client is None and any(run.amp == "bf16" for run in runs) and not bf16_is_fast(device):
        warnings.warn(
            f"grid {spec.name}: amp bf16 on {device}, which has no bfloat16 units (AMX or AVX-512 BF16 on a CPU): "
            "bfloat16 is emulated there, ~100x slower than float32; use amp none",
            SlowPrecisionWarning,
            stacklevel=3,
        )
    out = spec.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if spec.source is not None:
        write_text_atomic(out / "grid.yaml", spec.source.read_text())
    stores = plan_grid_stores(spec)
    spec = labelled_spec(spec, stores)
    warn_view_reuse(spec, stores)
    identity = stores.identity()
    ids = [run_id(run, identity, stores.run_views(run)) for run in runs]
    todo = [i for i, rid in enumerate(ids) if not (out / "runs" / rid / "metrics.csv").is_file()]
    memory_budget = options.memory_budget
    if memory_budget is None and client is not None and options.cluster.local_ram_sharers():
        memory_budget = available_memory(device) // options.cluster.local_ram_sharers()  # one copy per worker
    task = GridTask(spec, stores, tuple(runs), tuple(ids), options.device, memory_budget, options.fuse,
                    options.fail_fast)  # fmt: skip
    context = data = None
    if todo and client is None:  # a finished grid reads no features
        context = load_group_context(task, device)
        data = context.data
        check_training_labels(spec, data.train, [runs[i] for i in todo])
    elif todo:  # the workers read the features; the labels of the training rows are checked here
        check_training_labels(
            spec, open_train_store(stores.refs[0], device, stores.train_views), [runs[i] for i in todo]
        )
    groups = fusable_groups([runs[i] for i in todo], MAX_GROUP_SIZE if options.fuse else 1)
    groups = [[todo[i] for i in group] for group in groups]
    if client is None:
        if options.jobs > 1 and device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // options.jobs))  # (restored by run_grid)
        step_bar = options.progress and options.jobs == 1  # one group at a time: show its steps too
        parallel = Parallel(n_jobs=options.jobs, backend="threading", return_as="generator_unordered")
        calls = (delayed(run_group)(task, context, group, step_bar) for group in groups)
    else:  # joblib's Dask backend: as many groups at once as the cluster's workers have threads
        # (the task, the same for every group, is sent to every worker once, up front)
        with parallel_config(backend="dask", n_jobs=-1, client=client, scatter=[task]):
            parallel = Parallel(batch_size=1, return_as="generator_unordered")
        calls = (delayed(run_group_on_worker)(task, group) for group in groups)

    errors: dict[int, list[ResultRow]] = {}
    bar = tqdm(total=len(todo), unit="run", desc=f"grid {spec.name}", disable=not options.progress)
    try:
        for finished in parallel(calls):
            for index, rows in finished:
                run = runs[index]
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
    selections = select_runs(summarize_runs(all_rows).values(), spec.select_across)
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


# ----------------------------------------------------------------------------- a group of configs: one joblib task


@dataclass(frozen=True)
class GridTask:
    """What every group of a grid needs besides its context: plain data, pickled to the Dask workers."""

    spec: GridConfig  # labelled with its stores' model and tap
    stores: GridStores
    runs: tuple[RunConfig, ...]
    ids: tuple[str, ...]
    device: str  # --device; a worker pinned to a device (--devices) runs on its own
    memory_budget: int | None
    fuse: bool
    fail_fast: bool

    def data_key(self, device: torch.device) -> str:
        """What the features a process loads for this grid depend on: the stores as named, the device, the budget."""
        paths = [str(ref.path) for ref in self.stores.refs]
        key = {"stores": self.stores.identity(), "paths": paths, "views": list(self.stores.train_views),
               "device": str(device), "budget": self.memory_budget}  # fmt: skip
        return json.dumps(key, sort_keys=True)


def load_group_context(task: GridTask, device: torch.device) -> GroupContext:
    """The grid's stores loaded on ``device``: those that fit the memory budget in memory, the others streamed."""
    budget = available_memory(device) if task.memory_budget is None else task.memory_budget
    placement = place_features(task.spec, task.stores, budget)
    data = load_grid_data(task.stores, device, placement)
    return GroupContext(task.spec, data, device, budget, placement, task.fuse)


def run_group(
    task: GridTask, context: GroupContext, group: list[int], progress: bool = False
) -> list[tuple[int, list[ResultRow]]]:
    """Fit and evaluate one group of configs (indices into ``task.runs``); a failing group becomes error rows (and
    an ``error.txt`` per run) unless ``fail_fast`` or a disk error a user can fix, which are raised."""
    runs_dir = task.spec.out / "runs"
    members = [(index, task.runs[index], task.ids[index]) for index in group]
    try:
        return fit_and_evaluate_group(context, members, runs_dir, progress)
    except Exception as error:  # noqa: BLE001 - one failing group becomes error rows
        if task.fail_fast or (isinstance(error, OSError) and explain_os_error(error) is not None):
            raise
        message = f"{type(error).__name__}: {error}"
        failed = []
        for index, run, rid in members:
            write_text_atomic(runs_dir / rid / "error.txt", traceback.format_exc())
            failed.append((index, [error_row(task.spec, context.data, run, rid, message)]))
        return failed


# The grid stores a Dask worker process has loaded (at most one set), by ``GridTask.data_key``: loaded for its first
# group and kept for every later one, of this grid or of the next on the same stores.
_WORKER_CONTEXT: dict[str, GroupContext] = {}
_WORKER_CONTEXT_LOCK = threading.Lock()


def run_group_on_worker(task: GridTask, group: list[int]) -> list[tuple[int, list[ResultRow]]]:
    """``run_group`` on a Dask worker, on the device it is pinned to (else ``--device``), with the stores this
    process loaded for an earlier group when it did (a store that cannot be loaded stops the grid)."""
    device = pin_worker(task.device)
    key = task.data_key(device)
    with _WORKER_CONTEXT_LOCK:
        if key not in _WORKER_CONTEXT:
            for stale in _WORKER_CONTEXT.values():
                stale.data.train.view_cache.close()
            _WORKER_CONTEXT.clear()
            _WORKER_CONTEXT[key] = load_group_context(task, device)
        context = dataclasses.replace(_WORKER_CONTEXT[key], spec=task.spec, fuse=task.fuse)
    with exact_float32():
        return run_group(task, context, group)


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
        **{name: values[name] for name in SETTING_FIELDS if name in values and name != "classes"},
        classes=classes_label(run.classes),
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
        finished.append((index, write_run(context, run, rid, runs_dir / rid, fit, val, evaluated, record)))
    return finished


def write_run(
    context: GroupContext,
    run: RunConfig,
    rid: str,
    folder: Path,
    fit: FitResult,
    val: Evaluated,
    tests: list[Evaluated],
    record: dict[str, Any],
) -> list[ResultRow]:
    """Calibrate one fitted run on val, write its folder (scores, head, config, fit.json, then metrics.csv)."""
    spec, data = context.spec, context.data
    folder.mkdir(parents=True, exist_ok=True)
    head = fit.head
    base = dataclasses.replace(
        base_row(spec, data, run, rid),
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
        write_scores(folder / f"scores_{split}.csv", evaluated.store, evaluated.rows, scores)
        rows += metric_rows(base, split, evaluated.store, evaluated.rows, scores, thresholds, evaluated.scope)

    save_head(head, folder / "head.safetensors", {**head_metadata(data.train, run), **calibration.to_metadata()})
    write_text_atomic(
        folder / "config.yaml", yaml.dump(run_document(spec, run, data), Dumper=YAML_DUMPER, sort_keys=False)
    )
    refs = (data.train.ref, data.val.ref, *(t.ref for t in data.tests))
    fit_info = {
        "fit_seconds": fit.fit_seconds,
        "n_train": fit.n_train,
        "n_train_invalid": fit.n_train_invalid,
        "epoch_losses": list(fit.epoch_losses),
        "epoch_lrs": list(fit.epoch_lrs),
        "epoch_views": list(fit.epoch_views),
        "views_used": fit.views_used,
        "views_reused": fit.views_reused,
        "amp": run.amp,
        **record,
        "features": {ref.name: "memory" if here else "streamed" for ref, here in zip(refs, context.placement)},
        "memory_budget_bytes": context.memory_budget,
        "peak_memory_bytes": peak_memory(context.device),
        "device": str(context.device),
        "torch": torch.__version__,
    }
    write_text_atomic(folder / "fit.json", json.dumps(fit_info, indent=2))
    write_csv(folder / "metrics.csv", RESULT_COLUMNS, (row.to_csv() for row in rows))
    return rows


def evaluation_scope(store: LoadedStore, run: RunConfig) -> np.ndarray:
    """Rows a split reports on (valid or not): on a store with classes, those of the run's training classes."""
    classes = run.classes if store.rows.classes is not None else None
    return class_mask(store.rows, classes, store.info.path)


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


def write_scores(path: Path, store: LoadedStore, rows: np.ndarray, scores: np.ndarray) -> None:
    table = store.rows
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "dataset", "score"])
    for row, score in zip(rows, scores):
        writer.writerow([table.paths[row], int(table.labels[row]), table.datasets[row], repr(float(score))])
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


def run_document(spec: GridConfig, run: RunConfig, data: GridData) -> dict[str, Any]:
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


def write_embeddings(spec: GridConfig, data: GridData | None, folders: list[Path], device: torch.device) -> None:
    """embeddings.npz for each selected run folder that has a head and no embeddings yet."""
    missing = [folder for folder in dict.fromkeys(folders) if not (folder / EMBEDDINGS_FILE).is_file()]
    missing = [folder for folder in missing if (folder / "head.safetensors").is_file()]
    refs = [ref for ref in spec.tests if (ref.variant or CENTER) == CENTER]
    if not missing or not refs:
        return
    if data is not None:
        tests = [t for t in data.tests if t.ref in refs]
    else:  # a finished grid: a few hundred rows per set, gathered from the shard files
        tests = [load_store(ref, device, in_memory=False) for ref in refs]
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
