"""The stores stage two reads, in memory or streamed, and the rows a run trains and is scored on.

A store's variants are either read whole into one tensor (on the GPU when there is one) that every group of a
process shares (``InMemoryFeatures``), or, beyond the memory budget, streamed (``StreamedFeatures``): each
batch gathered row by row from the shard files (``cache.open_feature_rows``), with the same values, so results
do not depend on where the features live (tested bit for bit). Training views are loaded on demand by a
``ViewCache`` shared by the runs of a process: the view of epoch e when it starts and the next one in the
background, at most ``capacity`` (2) idle views kept.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import cache
from ..errors import PipelineError
from ..names import CENTER
from .config import RunConfig, StoreRef

VIEW_CACHE_CAPACITY = 2


class DataError(PipelineError, RuntimeError):
    """Stores that cannot be trained or evaluated on as asked."""


class OneLabelError(DataError):
    """Training rows that are all real or all fake."""


def store_block_indices(identity: cache.StoreIdentity) -> tuple[int, ...]:
    """The backbone blocks a store holds (the one place that names the identity field)."""
    return identity.block_indices


@dataclass(frozen=True)
class InMemoryFeatures:
    """A variant read whole into one tensor (store dtype, on the training device)."""

    tensor: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (a CPU int64 tensor, any order) as (len, n_blocks, dim), store dtype, on the device."""
        return self.tensor.index_select(0, rows.to(self.tensor.device, non_blocking=True))


@dataclass(frozen=True)
class StreamedFeatures:
    """A variant left on disk: each batch is gathered from the shard files (training beyond memory)."""

    rows: cache.FeatureRows
    device: torch.device

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        try:
            array = self.rows.gather(rows.numpy())
        except cache.StoreError as error:
            raise DataError(str(error)) from None
        return torch.from_numpy(array).to(self.device)


@dataclass(frozen=True)
class ConcatenatedFeatures:
    """Two feature sources read as one: rows ``[0, split)`` from the first, the others from the second (``--add-train``)."""

    first: InMemoryFeatures | StreamedFeatures
    second: InMemoryFeatures | StreamedFeatures
    split: int

    @property
    def nbytes(self) -> int:
        return self.first.nbytes + self.second.nbytes

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        in_first = rows < self.split
        if bool(in_first.all()):
            return self.first.gather(rows)
        if not bool(in_first.any()):
            return self.second.gather(rows - self.split)
        head = self.first.gather(rows[in_first])
        tail = self.second.gather(rows[~in_first] - self.split)
        out = torch.empty((len(rows), *head.shape[1:]), dtype=head.dtype, device=head.device)
        out[in_first.to(head.device)] = head
        out[(~in_first).to(head.device)] = tail
        return out


FeatureSource = InMemoryFeatures | StreamedFeatures | ConcatenatedFeatures


def variant_bytes(info: cache.StoreInfo) -> int:
    """Bytes of one variant of a store's features."""
    identity = info.identity
    return info.n_rows * len(store_block_indices(identity)) * identity.dim * np.dtype(identity.dtype).itemsize


def open_variant(
    ref: StoreRef, variant: str, device: torch.device, in_memory: bool, array_name: str = "features"
) -> FeatureSource:
    """One variant of a store as a feature source: read whole, or opened for streaming.

    ``array_name="embedding"``: the variant's pooled image embeddings, (N, 1, embedding_dim).
    """
    try:
        if in_memory:
            array = cache.read_features(ref.path, variant, array_name=array_name)
            return InMemoryFeatures(torch.from_numpy(array).to(device))
        return StreamedFeatures(cache.open_feature_rows(ref.path, variant, array_name), device)
    except cache.StoreError as error:
        raise DataError(f"{ref.name}: {error}") from None


@dataclass(frozen=True)
class LoadedStore:
    """An evaluation store's rows and the features of the variants a grid scores."""

    ref: StoreRef
    info: cache.StoreInfo
    rows: cache.RowTable
    features: dict[str, FeatureSource]  # variant -> its features
    embeddings: dict[str, FeatureSource] = field(default_factory=dict)  # variant -> its embeddings, when asked

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.features)


class ViewCache:
    """Training views (variant name -> feature source) loaded on demand, shared by the runs of a process.

    ``acquire(name)`` returns a future of the view and holds it until
    ``release(name)``; a view no run holds stays cached, least recently used
    first out, while more than ``capacity`` views are resident. Loads run on
    one background thread, so acquiring the next epoch's view prefetches it.
    ``loads`` counts the loads per view (a view evicted and needed again is
    loaded again); ``peak_resident`` is the most views held at once.
    """

    def __init__(self, load: Callable[[str], FeatureSource], capacity: int = VIEW_CACHE_CAPACITY) -> None:
        self._load = load
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _CachedView] = OrderedDict()
        self._executor: ThreadPoolExecutor | None = None
        self.loads: Counter[str] = Counter()
        self.peak_resident = 0

    def acquire(self, name: str) -> Future[FeatureSource]:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or (entry.future.done() and entry.future.exception() is not None):
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="view-loader")
                entry = _CachedView(self._executor.submit(self._load_counted, name))
                self._entries[name] = entry
            entry.holders += 1
            self._entries.move_to_end(name)
            self._evict()
            self.peak_resident = max(self.peak_resident, len(self._entries))
            return entry.future

    def release(self, name: str) -> None:
        with self._lock:
            entry = self._entries[name]
            entry.holders -= 1
            if entry.holders == 0 and entry.future.done() and entry.future.exception() is not None:
                del self._entries[name]
            self._evict()

    def close(self) -> None:
        """Drop every cached view and stop the loader thread."""
        with self._lock:
            self._entries.clear()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _load_counted(self, name: str) -> FeatureSource:
        source = self._load(name)
        with self._lock:
            self.loads[name] += 1
        return source

    def _evict(self) -> None:
        idle = [name for name, entry in self._entries.items() if entry.holders == 0]
        while len(self._entries) > self.capacity and idle:
            del self._entries[idle.pop(0)]


@dataclass
class _CachedView:
    future: Future[FeatureSource]
    holders: int = 0


@dataclass(frozen=True)
class TrainStore:
    """The training store: its rows, its training views (names) and the cache that loads them."""

    ref: StoreRef
    info: cache.StoreInfo
    rows: cache.RowTable
    views: tuple[str, ...]
    view_cache: ViewCache = field(compare=False)
    in_memory: bool = True  # False: batches are gathered from the shard files
    added_rows: np.ndarray | None = None  # rows of an added split (--add-train): trained on by every run
    embedding_cache: ViewCache | None = field(default=None, compare=False)  # the views' embeddings, when asked

    def epoch_views(self, epochs: int) -> tuple[str, ...]:
        """The view each epoch reads: view e mod K."""
        return tuple(self.views[epoch % len(self.views)] for epoch in range(epochs))


def train_views(info: cache.StoreInfo, ref: StoreRef) -> tuple[str, ...]:
    """The complete training views of a store (its first ``ref.views`` when the grid says how many, the variant the
    grid names, or ``center`` without views)."""
    if ref.variant is not None:
        return (ref.variant,)
    views = info.train_views()
    if ref.views is not None:
        if len(views) < ref.views:
            raise DataError(
                f"{info.path}: has {len(views)} complete training view(s), the grid reads {ref.views} "
                f"(data.train.views); extract the split with --views {ref.views}"
            )
        return views[: ref.views]
    if views:
        return views
    if CENTER in info.complete_variants:
        return (CENTER,)
    raise DataError(f"{info.path}: no complete training views; extract it with --augment")


def evaluation_variants(ref: StoreRef) -> tuple[str, ...]:
    """Variants scored for an evaluation store: its group's members (one, or the ten crops)."""
    return tuple(spec.name for spec in ref.group.members)


def load_store(ref: StoreRef, device: torch.device, in_memory: bool = True, embedding: bool = False) -> LoadedStore:
    """An evaluation store's rows, and its evaluation variants read into memory once (or opened for streaming);
    with ``embedding``, their pooled image embeddings too (a store without them is a :class:`DataError` saying
    how to add them)."""
    variants = evaluation_variants(ref)
    features = {variant: open_variant(ref, variant, device, in_memory) for variant in variants}
    embeddings = {v: open_variant(ref, v, device, in_memory, cache.EMBEDDING_ARRAY) for v in variants if embedding}
    return LoadedStore(ref, open_info(ref), cache.read_rows(ref.path), features, embeddings)


def open_train_store(
    ref: StoreRef,
    device: torch.device,
    views: tuple[str, ...] | None = None,
    in_memory: bool = True,
    added: StoreRef | None = None,
    embedding: bool = False,
) -> TrainStore:
    """The training store with a view cache that reads (or opens for streaming) its views on demand; with
    ``embedding``, a second one for the views' embeddings (checked to exist here).

    ``added``: a second store whose rows follow the first's (``--add-train``); view ``i`` of the first is read
    with view ``i mod K`` of the added store's K training views.
    """
    info = open_info(ref)
    views = views or train_views(info, ref)
    rows = cache.read_rows(ref.path)
    if embedding and not info.identity.embedding_dim:
        open_variant(ref, views[0], device, False, cache.EMBEDDING_ARRAY)  # raises, saying how to add them
    arrays = ("features", cache.EMBEDDING_ARRAY) if embedding else ("features",)
    if added is None:
        caches = [ViewCache(partial(_open_view, ref, device, in_memory, name)) for name in arrays]
        embedding_cache = caches[-1] if embedding else None
        return TrainStore(ref, info, rows, views, caches[0], in_memory, embedding_cache=embedding_cache)
    added_views = train_views(open_info(added), added)
    added_of = {view: added_views[i % len(added_views)] for i, view in enumerate(views)}
    n_base = len(rows)

    def loader(array_name: str) -> Callable[[str], FeatureSource]:
        def load(variant: str) -> FeatureSource:
            first = open_variant(ref, variant, device, in_memory, array_name)
            second = open_variant(added, added_of[variant], device, in_memory, array_name)
            assert not isinstance(first, ConcatenatedFeatures) and not isinstance(second, ConcatenatedFeatures)
            return ConcatenatedFeatures(first, second, n_base)

        return load

    caches = [ViewCache(loader(name)) for name in arrays]
    combined = concatenate_rows(rows, cache.read_rows(added.path))
    added_rows = np.arange(n_base, len(combined))
    embedding_cache = caches[-1] if embedding else None
    return TrainStore(ref, info, combined, views, caches[0], in_memory, added_rows, embedding_cache=embedding_cache)


def _open_view(ref: StoreRef, device: torch.device, in_memory: bool, array_name: str, variant: str) -> FeatureSource:
    return open_variant(ref, variant, device, in_memory, array_name)


def concatenate_rows(first: cache.RowTable, second: cache.RowTable) -> cache.RowTable:
    """The rows of two stores, one after the other (classes kept where both have them, '' for the missing side)."""
    classes = None
    if first.classes is not None or second.classes is not None:
        classes = np.concatenate(
            [t.classes if t.classes is not None else np.full(len(t), "", dtype=object) for t in (first, second)]
        )
    return cache.RowTable(
        labels=np.concatenate([first.labels, second.labels]),
        paths=np.concatenate([first.paths, second.paths]),
        datasets=np.concatenate([first.datasets, second.datasets]),
        classes=classes,
        valid=np.concatenate([first.valid, second.valid]),
        errors=np.concatenate([first.errors, second.errors]),
    )


def open_info(ref: StoreRef) -> cache.StoreInfo:
    try:
        return cache.open_store_info(ref.path)
    except cache.StoreError as error:
        raise DataError(f"{ref.name}: {error}") from None


def check_compatible(infos: list[cache.StoreInfo]) -> None:
    """Refuse to train on one store and score another made differently."""
    first = infos[0]
    for other in infos[1:]:
        differences = first.identity.compatible_features(other.identity)
        if differences:
            raise DataError(f"{other.path} and {first.path} hold different features:\n  " + "\n  ".join(differences))


def class_mask(rows: cache.RowTable, classes: tuple[str, ...] | None, where: Path) -> np.ndarray:
    """Rows of ``classes`` (all rows when None), valid or not."""
    if classes is None:
        return np.ones(len(rows), dtype=bool)
    if rows.classes is None:
        raise DataError(f"{where}: the store has no class column, so classes={list(classes)} cannot be selected")
    present = set(rows.classes.tolist())
    missing = sorted(set(classes) - present)
    if missing:
        raise DataError(f"{where}: classes {missing} not in the store (it has {sorted(present)})")
    return np.isin(rows.classes, classes)


def dataset_mask(rows: cache.RowTable, datasets: tuple[str, ...] | None, where: Path) -> np.ndarray:
    """Rows of ``datasets`` (all rows when None), valid or not: a protocol cell's training subset."""
    if datasets is None:
        return np.ones(len(rows), dtype=bool)
    present = set(rows.datasets.tolist())
    missing = sorted(set(datasets) - present)
    if missing:
        raise DataError(f"{where}: datasets {missing} not in the store (it has {sorted(present)})")
    return np.isin(rows.datasets, datasets)


def training_rows(store: TrainStore, config: RunConfig) -> tuple[np.ndarray, int]:
    """Rows a run trains on (of its classes and its ``train_datasets``), and how many invalid rows were excluded.

    Every head trains on these rows, so the protocols (``protocols.py``) hold for all. Raises
    ``OneLabelError`` when the valid rows are all real or all fake (before
    ``train_fraction`` draws from them), and ``DataError`` when fewer than
    two rows are usable.
    """
    of_classes = class_mask(store.rows, config.classes, store.info.path)
    of_classes &= dataset_mask(store.rows, config.train_datasets, store.info.path)
    rows = np.flatnonzero(of_classes & store.rows.valid)
    n_invalid = int(np.count_nonzero(of_classes)) - len(rows)
    labels = set(store.rows.labels[rows].tolist())
    if len(labels) == 1:
        which = "real (label 0)" if labels == {0} else "fake (label 1)"
        classes = "all classes" if config.classes is None else f"classes {list(config.classes)}"
        if config.train_datasets is not None:
            classes += f" of datasets {list(config.train_datasets)}"
        raise OneLabelError(
            f"{store.info.path}: the {len(rows)} valid training rows of {classes} are all {which}; "
            "a detector needs real and fake images to train on"
        )
    if config.train_fraction < 1.0:
        rng = np.random.default_rng([config.seed, len(rows)])
        count = max(2, round(config.train_fraction * len(rows)))
        rows = np.sort(rng.choice(rows, size=count, replace=False))
    if store.added_rows is not None:  # an added split's rows, whatever the run's classes, datasets and fraction
        added = store.added_rows[store.rows.valid[store.added_rows]]
        n_invalid += len(store.added_rows) - len(added)
        rows = np.union1d(rows, added)
    if len(rows) < 2:
        raise DataError(f"{store.info.path}: only {len(rows)} usable training rows")
    return rows, n_invalid


@dataclass(frozen=True)
class GridData:
    """The stores of a grid, opened once and shared by every run."""

    train: TrainStore
    val: LoadedStore
    tests: tuple[LoadedStore, ...]
    identity: dict[str, Any]
