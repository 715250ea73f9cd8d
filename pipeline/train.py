"""Fit one RINE head from cached block tokens, and score stores with it.

Evaluation stores (val, tests) are read once into one float16 tensor per
variant (on the GPU when there is one) that every run of a process shares: a
run only holds the indices of its rows and gathers each batch from them.

Training follows the authors' loop: epoch e (0-based) reads training view
``e mod K`` of the K views in the store, with the lr of ``RunConfig.lr_at_epoch``
(lr / 10 from the start of the 6th and of the 11th epoch). Views are not all
held in memory: a ``ViewCache`` loads the view of epoch e when the epoch
starts and the next one in the background while it trains, keeps at most
``capacity`` (2) views that no run is using, and is shared by the runs of a
process, so a grid of one-epoch configs reads ``view_000`` once. Loading
order never changes what is trained: streamed training equals training on
views held in memory bit for bit.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import cache
from .config import RunConfig, StoreRef
from .errors import PipelineError
from .head import RineHead
from .loss import rine_loss
from .results import CENTER, TEN_CROP
from .variants import ten_crop_variants

EVAL_BATCH = 1024
VIEW_CACHE_CAPACITY = 2
_SEED_LOCK = threading.Lock()


class DataError(PipelineError, RuntimeError):
    """Stores that cannot be trained or evaluated on as asked."""


def store_block_indices(identity: cache.StoreIdentity) -> tuple[int, ...]:
    """The backbone blocks a store holds (the one place that names the identity field)."""
    return identity.block_indices


@dataclass(frozen=True)
class LoadedStore:
    """An evaluation store's rows and the features of the variants a grid scores."""

    ref: StoreRef
    info: cache.StoreInfo
    rows: cache.RowTable
    features: dict[str, torch.Tensor]  # variant -> (N, n_blocks, dim), store dtype

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.features)


class ViewCache:
    """Training views (variant name -> tensor) loaded on demand, shared by the runs of a process.

    ``acquire(name)`` returns a future of the view and holds it until
    ``release(name)``; a view no run holds stays cached, least recently used
    first out, while more than ``capacity`` views are resident. Loads run on
    one background thread, so acquiring the next epoch's view prefetches it.
    ``loads`` counts the loads per view (a view evicted and needed again is
    loaded again); ``peak_resident`` is the most views held at once.
    """

    def __init__(self, load: Callable[[str], torch.Tensor], capacity: int = VIEW_CACHE_CAPACITY) -> None:
        self._load = load
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _CachedView] = OrderedDict()
        self._executor: ThreadPoolExecutor | None = None
        self.loads: Counter[str] = Counter()
        self.peak_resident = 0

    def acquire(self, name: str) -> Future[torch.Tensor]:
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

    def _load_counted(self, name: str) -> torch.Tensor:
        tensor = self._load(name)
        with self._lock:
            self.loads[name] += 1
        return tensor

    def _evict(self) -> None:
        idle = [name for name, entry in self._entries.items() if entry.holders == 0]
        while len(self._entries) > self.capacity and idle:
            del self._entries[idle.pop(0)]


@dataclass
class _CachedView:
    future: Future[torch.Tensor]
    holders: int = 0


@dataclass(frozen=True)
class TrainStore:
    """The training store: its rows, its training views (names) and the cache that loads them."""

    ref: StoreRef
    info: cache.StoreInfo
    rows: cache.RowTable
    views: tuple[str, ...]
    view_cache: ViewCache = field(compare=False)

    def epoch_views(self, epochs: int) -> tuple[str, ...]:
        """The view each epoch reads: view e mod K."""
        return tuple(self.views[epoch % len(self.views)] for epoch in range(epochs))


def train_views(info: cache.StoreInfo, ref: StoreRef) -> tuple[str, ...]:
    """The complete training views of a store (or the variant the grid names, or ``center`` without views)."""
    if ref.variant is not None:
        return (ref.variant,)
    views = info.train_views()
    if views:
        return views
    if CENTER in info.complete_variants:
        return (CENTER,)
    raise DataError(f"{info.path}: no complete training views; extract it with --augment")


def evaluation_variants(ref: StoreRef) -> tuple[str, ...]:
    """Variants scored for an evaluation store: one, or the ten crops."""
    if ref.variant == TEN_CROP:
        return tuple(spec.name for spec in ten_crop_variants())
    return (ref.variant or CENTER,)


def read_variant(ref: StoreRef, variant: str, device: torch.device) -> torch.Tensor:
    try:
        array = cache.read_features(ref.path, variant)
    except cache.StoreError as error:
        raise DataError(f"{ref.name}: {error}") from None
    return torch.from_numpy(array).to(device)


def load_store(ref: StoreRef, device: torch.device) -> LoadedStore:
    """Read an evaluation store's rows and its evaluation variants into memory once."""
    features = {variant: read_variant(ref, variant, device) for variant in evaluation_variants(ref)}
    return LoadedStore(ref=ref, info=open_info(ref), rows=cache.read_rows(ref.path), features=features)


def open_train_store(ref: StoreRef, device: torch.device, views: tuple[str, ...] | None = None) -> TrainStore:
    """The training store with a view cache that reads its views on demand (nothing loaded yet)."""
    info = open_info(ref)
    views = views or train_views(info, ref)
    view_cache = ViewCache(lambda variant: read_variant(ref, variant, device))
    return TrainStore(ref=ref, info=info, rows=cache.read_rows(ref.path), views=views, view_cache=view_cache)


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


def training_rows(store: TrainStore, config: RunConfig) -> tuple[np.ndarray, int]:
    """Rows a run trains on, and how many invalid rows of its classes were excluded."""
    of_classes = class_mask(store.rows, config.classes, store.info.path)
    rows = np.flatnonzero(of_classes & store.rows.valid)
    n_invalid = int(np.count_nonzero(of_classes)) - len(rows)
    if config.train_fraction < 1.0:
        rng = np.random.default_rng([config.seed, len(rows)])
        count = max(2, round(config.train_fraction * len(rows)))
        rows = np.sort(rng.choice(rows, size=count, replace=False))
    if len(rows) < 2:
        raise DataError(f"{store.info.path}: only {len(rows)} usable training rows")
    return rows, n_invalid


def block_view(x: torch.Tensor, config: RunConfig) -> torch.Tensor:
    """The blocks the head sees: all, or only the last (ablation)."""
    return x[:, -1:] if config.head_blocks == "last" else x


def build_head(info: cache.StoreInfo, config: RunConfig) -> RineHead:
    n_blocks = 1 if config.head_blocks == "last" else len(store_block_indices(info.identity))
    return RineHead(n_blocks, info.identity.dim, config.proj_dim, config.proj_layers, aggregation=config.aggregation)


@dataclass(frozen=True)
class FitResult:
    head: RineHead
    fit_seconds: float
    n_train: int
    n_train_invalid: int
    epoch_losses: tuple[float, ...]
    epoch_views: tuple[str, ...]  # the view each epoch read
    epoch_lrs: tuple[float, ...]  # the lr each epoch trained with

    @property
    def views_used(self) -> int:
        return len(set(self.epoch_views))

    @property
    def views_reused(self) -> int:
        """Epochs that read a view an earlier epoch had read (more epochs than views)."""
        return len(self.epoch_views) - self.views_used


def fit_head(store: TrainStore, config: RunConfig, *, device: torch.device, progress: bool = False) -> FitResult:
    """Train one head with the authors' protocol; each epoch's view is loaded (and the next prefetched) as it starts."""
    rows, n_invalid = training_rows(store, config)
    with _SEED_LOCK:  # parallel runs (threads) must not interleave seeding and init
        torch.manual_seed(config.seed)
        head = build_head(store.info, config).to(device)
    # Dropout and shuffling draw from the run's own streams, so parallel runs stay reproducible.
    head.set_dropout_generator(torch.Generator(device=device).manual_seed(config.seed))
    optimizer = make_adam(head, config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    labels = torch.from_numpy(store.rows.labels.astype(np.float32)).to(device)
    rows_tensor = torch.from_numpy(rows).to(device)
    epoch_views = store.epoch_views(config.epochs)
    steps_per_epoch = -(-len(rows) // config.batch_size)
    bar = tqdm(total=config.epochs * steps_per_epoch, unit="step", leave=False, disable=not progress, desc="fit")
    losses, lrs = [], []
    held: list[str] = [epoch_views[0]]
    pending = store.view_cache.acquire(epoch_views[0])
    start = time.perf_counter()
    head.train()
    try:
        for epoch in range(config.epochs):
            features = pending.result()
            if epoch + 1 < config.epochs:  # prefetch the next epoch's view while this one trains
                held.append(epoch_views[epoch + 1])
                pending = store.view_cache.acquire(epoch_views[epoch + 1])
            lr = config.lr_at_epoch(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            lrs.append(lr)
            order = rows_tensor[torch.randperm(len(rows), generator=generator).to(device)]
            total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
            for batch_start in range(0, len(order), config.batch_size):
                batch_rows = order[batch_start : batch_start + config.batch_size]
                x = block_view(features[batch_rows], config).float()
                y = labels[batch_rows]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16"):
                    logits, z = head(x)
                loss = rine_loss(logits.float().squeeze(1), z.float(), y, config.contrastive_factor)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
                bar.update(1)
            losses.append(float(total) / len(order))
            del features
            store.view_cache.release(held.pop(0))
    finally:
        for name in held:
            store.view_cache.release(name)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    fit_seconds = time.perf_counter() - start
    bar.close()
    head.eval()
    return FitResult(head, fit_seconds, len(rows), n_invalid, tuple(losses), epoch_views, tuple(lrs))


def make_adam(head: RineHead, lr: float) -> torch.optim.Adam:
    """Adam, fused into one pass over the parameters per step where torch has that kernel.

    The same update as the default per-tensor loop up to float rounding; that
    loop took ~20 % of a training step of the 4-class head on a 2-core CPU.
    Torch has fused Adam for CUDA, and for the CPU from version 2.4.
    """
    try:
        return torch.optim.Adam(head.parameters(), lr=lr, fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch version
        return torch.optim.Adam(head.parameters(), lr=lr)


def store_logits(head: RineHead, store: LoadedStore, rows: np.ndarray, config: RunConfig) -> torch.Tensor:
    """Logits (N, n_crops) of ``rows``: one column per evaluated variant (one, or the ten crops).

    ``pipeline.calibration`` turns them into scores (``head.crop_scores``: the sigmoid of the mean logit).
    """
    return torch.stack([forward_rows(head, store.features[v], rows, config)[0] for v in store.variants], dim=1)


@torch.inference_mode()
def forward_rows(
    head: RineHead, features: torch.Tensor, rows: np.ndarray, config: RunConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N,), z (N, proj_dim)) of ``rows``, float32 on the CPU."""
    head.eval()
    logits = torch.empty(len(rows), dtype=torch.float32)
    z = torch.empty(len(rows), head.proj_dim, dtype=torch.float32)
    index = torch.from_numpy(rows).to(features.device)
    for start in range(0, len(rows), EVAL_BATCH):
        x = block_view(features[index[start : start + EVAL_BATCH]], config).float()
        with torch.autocast(features.device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16"):
            batch_logits, batch_z = head(x)
        logits[start : start + EVAL_BATCH] = batch_logits.float().squeeze(1).cpu()
        z[start : start + EVAL_BATCH] = batch_z.float().cpu()
    return logits, z
