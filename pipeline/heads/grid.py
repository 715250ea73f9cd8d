"""Run a grid of head configs from cached features: plan the stores, fit the groups here or on a Dask cluster,
write ``results.csv`` and ``selection.csv``.

Configs that may train together (``train.group_key``) are fitted and scored as fused groups; each keeps its
own run folder, named by a hash of its config, its data and ``RUN_PROTOCOL``, and skipped once finished. The
stores are loaded once per process (or per Dask worker) and shared; a failing config becomes an error row. Checked
before anything is fitted: the stores hold the declared tap and model and the same features, and every
config's training rows hold both labels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from joblib import Parallel, delayed, parallel_config
from tqdm.auto import tqdm

from .. import cache
from ..devices import available_memory, bf16_is_fast, exact_float32, resolve_device
from ..errors import PipelineWarning
from ..files import disk_errors_explained, explain_os_error, write_text_atomic
from ..names import DEFAULT_HEAD, EMBEDDING_FEATURES, MAX_GROUP_SIZE, STANDARD_PROTOCOL
from ..results import (
    ERROR,
    RESULT_COLUMNS,
    SELECTION_COLUMNS,
    ResultRow,
    select_runs,
    selection_record,
    summarize_runs,
    write_csv,
)
from ..results.run_folder import RunFolder
from .cluster import ClusterConfig, dask_client, pin_worker
from .config import GridConfig, RunConfig, StoreRef, run_identity_dict
from .embeddings import write_embeddings
from .evaluate import GroupContext, error_row, fit_and_evaluate_group
from .protocols import ProtocolError, expand_protocols
from .stores import (
    DataError,
    GridData,
    OneLabelError,
    TrainStore,
    check_compatible,
    evaluation_variants,
    load_store,
    open_info,
    open_train_store,
    store_block_indices,
    train_views,
    training_rows,
    variant_bytes,
)
from .train import fusable_groups

# Bumped whenever training or scoring changes what a config computes, so that
# finished runs of an older protocol are not reused. 2: the authors' lr
# schedule, ten-crop by the mean logit, the view of each epoch streamed.
# 3: val thresholds (and the optional temperature) stored with the head,
# operating-point and calibration metrics. 4: the fused (stacked) trainer:
# the dropout masks of a step in one draw, bf16 without autocast. 5: scores in float64 and TIE's softmax
# row by row, so that no number depends on the count of torch threads. 6: scores in float32 whatever the
# training precision (bf16 runs scored in bf16 before), float32 matmuls at "highest" precision.
RUN_PROTOCOL = 6
# Run config fields left out of the run id at their default value, so that runs fitted before they existed keep
# their ids (and are not fitted again).
EPOCH_HEADS = (DEFAULT_HEAD, "linear")  # the heads trained over epochs (knn and logreg: one pass over one view)


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
    added: StoreRef | None = None  # a split trained on besides the train split (add_train)
    added_info: cache.StoreInfo | None = None

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
        identity = {"protocol": RUN_PROTOCOL, "train": train, "val": evaluated[0], "tests": evaluated[1:]}
        if self.added is not None and self.added_info is not None:
            identity["add_train"] = describe(self.added, self.added_info, train_views(self.added_info, self.added))
        return identity

    def run_views(self, run: RunConfig) -> tuple[str, ...]:
        """The distinct views a run reads, in epoch order."""
        return tuple(dict.fromkeys(self.train_views[epoch % len(self.train_views)] for epoch in range(run.epochs)))


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
    text = json.dumps({"run": run_identity_dict(config), "data": data_identity, "views": list(views)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan_grid_stores(spec: GridConfig) -> GridStores:
    """Open every store's attributes; check they hold the grid's declared tap and model and the same kind of features."""
    refs = (spec.train, spec.val, *spec.tests)
    infos = tuple(open_info(ref) for ref in refs)
    for ref, info in zip(refs, infos):
        check_declared(spec, ref, info)
    added_info = None
    if spec.add_train is not None:
        added_info = open_info(spec.add_train)
        check_declared(spec, spec.add_train, added_info)
    check_compatible([*infos, *([added_info] if added_info is not None else [])])
    return GridStores(refs, infos, train_views(infos[0], spec.train), spec.add_train, added_info)


def protocol_spec(spec: GridConfig, stores: GridStores) -> GridConfig:
    """The spec with every run's protocol applied over the datasets of its training store (``protocols.py``)."""
    if all(run.protocol == STANDARD_PROTOCOL for run in spec.runs):
        return spec
    datasets = sorted(set(cache.read_rows(stores.refs[0].path).datasets.tolist()))
    try:
        runs = expand_protocols(spec.runs, datasets)
    except ProtocolError as error:
        raise DataError(f"grid {spec.name}: {stores.refs[0].path}: {error}") from None
    return dataclasses.replace(spec, runs=runs)


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
    """Warn once per grid when runs have more epochs than the store has views (unless the grid says how many views
    it reads, ``data.train.views``: then it cycles them on purpose)."""
    if spec.train.views is not None:
        return
    n_views = len(stores.train_views)
    longer = [run for run in spec.runs if run.epochs > n_views and run.head in EPOCH_HEADS]
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
    train_infos = [stores.infos[0], *([stores.added_info] if stores.added_info is not None else [])]
    needs = [sum(variant_bytes(info) for info in train_infos) * min(longest, 2)]
    needs += [
        variant_bytes(info) * len(evaluation_variants(ref)) for ref, info in zip(stores.refs[1:], stores.infos[1:])
    ]
    placement = []
    for need in needs:
        placement.append(need <= budget)
        budget -= need if need <= budget else 0
    return tuple(placement)


def load_grid_data(
    stores: GridStores, device: torch.device, placement: tuple[bool, ...], embedding: bool = False
) -> GridData:
    """The grid's stores on ``device``; with ``embedding`` (a config reads ``features: embedding``) their pooled
    image embeddings too."""
    train = open_train_store(
        stores.refs[0], device, stores.train_views, placement[0], added=stores.added, embedding=embedding
    )
    val, *tests = (
        load_store(ref, device, in_memory, embedding) for ref, in_memory in zip(stores.refs[1:], placement[1:])
    )
    return GridData(train, val, tuple(tests), stores.identity())


def reads_embedding(runs: tuple[RunConfig, ...] | list[RunConfig]) -> bool:
    return any(run.features == EMBEDDING_FEATURES for run in runs)


def run_label(run: RunConfig) -> str:
    """How the progress lines name a config."""
    if run.head == DEFAULT_HEAD:
        return f"xi {run.contrastive_factor}, q {run.proj_layers}, d' {run.proj_dim}"
    extra = {"knn": f", k {run.k}", "logreg": f", C {run.C:g}"}.get(run.head, "")
    return f"{run.head} on {run.features}{extra}"


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
    spec = protocol_spec(spec, stores)
    runs = list(spec.runs)
    warn_view_reuse(spec, stores)
    identity = stores.identity()
    ids = [run_id(run, identity, stores.run_views(run)) for run in runs]
    todo = [i for i, rid in enumerate(ids) if not RunFolder.of(out, rid).is_finished()]
    memory_budget = options.memory_budget
    if memory_budget is None and client is not None and options.cluster.local_ram_sharers():
        memory_budget = available_memory(device) // options.cluster.local_ram_sharers()  # one copy per worker
    task = GridTask(
        spec, stores, tuple(runs), tuple(ids), options.device, memory_budget, options.fuse, options.fail_fast
    )
    context = data = None
    if todo and client is None:  # a finished grid reads no features
        context = load_group_context(task, device)
        data = context.data
        check_training_labels(spec, data.train, [runs[i] for i in todo])
    elif todo:  # the workers read the features; the labels of the training rows are checked here
        check_training_labels(
            spec,
            open_train_store(stores.refs[0], device, stores.train_views, added=stores.added),
            [runs[i] for i in todo],
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
                label = f"run {ids[index]} ({run_label(run)})"
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
            all_rows.extend(RunFolder.of(out, rid).read_metrics())
    results = out / "results.csv"
    write_csv(results, RESULT_COLUMNS, (row.to_csv() for row in all_rows))
    selections = select_runs(summarize_runs(all_rows).values(), spec.select_across)
    selection = out / "selection.csv"
    write_csv(selection, SELECTION_COLUMNS, (selection_record(s) for s in selections))
    write_embeddings(spec, data, [RunFolder.of(out, s.summary.run) for s in selections], device)
    return GridSummary(
        out=out,
        n_runs=len(ids),
        n_skipped=len(ids) - len(todo),
        n_errors=len(errors),
        results=results,
        selection=selection,
        seconds=time.perf_counter() - start,
    )


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
        key = {
            "stores": self.stores.identity(),
            "paths": paths,
            "views": list(self.stores.train_views),
            "device": str(device),
            "budget": self.memory_budget,
        }
        return json.dumps(key, sort_keys=True)


def load_group_context(task: GridTask, device: torch.device) -> GroupContext:
    """The grid's stores loaded on ``device``: those that fit the memory budget in memory, the others streamed."""
    budget = available_memory(device) if task.memory_budget is None else task.memory_budget
    placement = place_features(task.spec, task.stores, budget)
    data = load_grid_data(task.stores, device, placement, reads_embedding(task.runs))
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
            RunFolder(runs_dir / rid).write_error(traceback.format_exc())
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
