"""Fit RINE heads from cached block tokens, several configs at once, and score stores with them.

**Fused groups.** Configs that differ only in the contrastive factor xi (or
in the calibration fitted afterwards) share their training rows, batch
order, epochs, lr schedule and head shape (``group_key``): :func:`fit_group` trains them together as one
``HeadStack``: each batch is gathered and cast once, every layer of the group
is one batched matmul, the dropout masks of a step are one draw, and one
fused Adam step updates the group. Each config's loss is its own BCE +
xi x SupCon; their sum is back-propagated, so each head's gradient is its
own. The dropout stream is the run's seed (as are its initial weights and
batch order), so a config trained alone (:func:`fit_head`, a group of one,
``pipeline fit --no-fuse``) and in a group sees the same masks and batches:
the two agree to float rounding (tested). Evaluation scores all heads of a
group on each batch in one pass (:func:`group_logits`).

**Precision.** Training runs in float32 (``amp: none``, the default, as the
authors); ``amp: bf16`` runs its matmuls and elementwise work in bfloat16 with
float32 master weights, loss and optimizer. Scoring is float32 whatever the
training precision (``stack_outputs``), so N images get about N distinct scores.

**Features.** A store's variants are either read whole into one tensor (on
the GPU when there is one) that every group of a process shares
(``InMemoryFeatures``), or, for stores beyond the memory budget, streamed
(``StreamedFeatures``): each batch, training or scoring, is gathered row by
row from the store's shard files (``cache.open_feature_rows``). Either way a
batch holds the same values, so results do not depend on where the
features live (tested bit for bit).

**GPU.** On CUDA each group's step is captured once as a CUDA graph and
replayed (``GroupSteps``); the features, masks and optimizer state stay on
the device.

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

import dataclasses
import functools
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import cache
from ..devices import compute_dtype
from ..errors import PipelineError
from ..names import CENTER, TEN_CROP
from ..variants import ten_crop_variants
from .config import RunConfig, StoreRef
from .head import RineHead
from .head_stack import HalfMasks, HeadStack
from .loss import group_losses

EVAL_BATCH = 1024
VIEW_CACHE_CAPACITY = 2
_SEED_LOCK = threading.Lock()


class DataError(PipelineError, RuntimeError):
    """Stores that cannot be trained or evaluated on as asked."""


class OneLabelError(DataError):
    """Training rows that are all real or all fake."""


def store_block_indices(identity: cache.StoreIdentity) -> tuple[int, ...]:
    """The backbone blocks a store holds (the one place that names the identity field)."""
    return identity.block_indices


# ----------------------------------------------------------------------------- feature sources


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


FeatureSource = InMemoryFeatures | StreamedFeatures


def variant_bytes(info: cache.StoreInfo) -> int:
    """Bytes of one variant of a store's features."""
    identity = info.identity
    return info.n_rows * len(store_block_indices(identity)) * identity.dim * np.dtype(identity.dtype).itemsize


def open_variant(ref: StoreRef, variant: str, device: torch.device, in_memory: bool) -> FeatureSource:
    """One variant of a store as a feature source: read whole, or opened for streaming."""
    try:
        if in_memory:
            return InMemoryFeatures(torch.from_numpy(cache.read_features(ref.path, variant)).to(device))
        return StreamedFeatures(cache.open_feature_rows(ref.path, variant), device)
    except cache.StoreError as error:
        raise DataError(f"{ref.name}: {error}") from None


@dataclass(frozen=True)
class LoadedStore:
    """An evaluation store's rows and the features of the variants a grid scores."""

    ref: StoreRef
    info: cache.StoreInfo
    rows: cache.RowTable
    features: dict[str, FeatureSource]  # variant -> its features

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


def load_store(ref: StoreRef, device: torch.device, in_memory: bool = True) -> LoadedStore:
    """An evaluation store's rows, and its evaluation variants read into memory once (or opened for streaming)."""
    features = {variant: open_variant(ref, variant, device, in_memory) for variant in evaluation_variants(ref)}
    return LoadedStore(ref=ref, info=open_info(ref), rows=cache.read_rows(ref.path), features=features)


def open_train_store(
    ref: StoreRef, device: torch.device, views: tuple[str, ...] | None = None, in_memory: bool = True
) -> TrainStore:
    """The training store with a view cache that reads (or opens for streaming) its views on demand."""
    info = open_info(ref)
    views = views or train_views(info, ref)
    view_cache = ViewCache(lambda variant: open_variant(ref, variant, device, in_memory))
    return TrainStore(ref, info, cache.read_rows(ref.path), views, view_cache, in_memory)


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
    """Rows a run trains on, and how many invalid rows of its classes were excluded.

    Raises ``OneLabelError`` when the valid rows of the run's classes are all
    real or all fake (before ``train_fraction`` draws from them), and
    ``DataError`` when fewer than two rows are usable.
    """
    of_classes = class_mask(store.rows, config.classes, store.info.path)
    rows = np.flatnonzero(of_classes & store.rows.valid)
    n_invalid = int(np.count_nonzero(of_classes)) - len(rows)
    labels = set(store.rows.labels[rows].tolist())
    if len(labels) == 1:
        which = "real (label 0)" if labels == {0} else "fake (label 1)"
        classes = "all classes" if config.classes is None else f"classes {list(config.classes)}"
        raise OneLabelError(
            f"{store.info.path}: the {len(rows)} valid training rows of {classes} are all {which}; "
            "a detector needs real and fake images to train on"
        )
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


# ----------------------------------------------------------------------------- fitting


def group_key(config: RunConfig) -> RunConfig:
    """What configs must share to train as one group: everything but the contrastive factor and the calibration.

    (The calibration is fitted per head on its val logits, after training.)
    """
    return dataclasses.replace(config, contrastive_factor=0.0, calibration="none")


def fusable_groups(configs: Sequence[RunConfig], max_size: int) -> list[list[int]]:
    """Indices of ``configs`` grouped by ``group_key``, at most ``max_size`` per group, in the order of their first."""
    by_key: dict[RunConfig, list[list[int]]] = {}
    for index, config in enumerate(configs):
        groups = by_key.setdefault(group_key(config), [[]])
        if len(groups[-1]) == max_size:
            groups.append([])
        groups[-1].append(index)
    return sorted((group for groups in by_key.values() for group in groups), key=lambda group: group[0])


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


@dataclass(frozen=True)
class GroupFit:
    """The heads of a group trained together, and what their training saw."""

    stack: HeadStack
    configs: tuple[RunConfig, ...]
    fit_seconds: float  # wall time of the whole group
    n_train: int
    n_train_invalid: int
    epoch_losses: tuple[tuple[float, ...], ...]  # per config, per epoch
    epoch_views: tuple[str, ...]
    epoch_lrs: tuple[float, ...]
    cuda_graph: bool = False  # whether its steps were replayed from a captured CUDA graph

    def results(self) -> list[FitResult]:
        """One ``FitResult`` per config; ``fit_seconds`` is its share of the group's wall time."""
        share = self.fit_seconds / len(self.configs)
        return [
            FitResult(head, share, self.n_train, self.n_train_invalid, losses, self.epoch_views, self.epoch_lrs)
            for head, losses in zip(self.stack.to_heads(), self.epoch_losses, strict=True)
        ]


def check_group(configs: Sequence[RunConfig]) -> None:
    keys = {group_key(config) for config in configs}
    if len(keys) != 1:
        raise ValueError(
            f"configs of one group may differ only in contrastive_factor and calibration, got {len(keys)} kinds"
        )


def build_stack(store: TrainStore, configs: Sequence[RunConfig], device: torch.device) -> HeadStack:
    """The group's heads, each initialised exactly as it would be alone (its seed, then its module init)."""
    heads = []
    for config in configs:
        with _SEED_LOCK:  # parallel groups (threads) must not interleave seeding and init
            torch.manual_seed(config.seed)
            heads.append(build_head(store.info, config))
    return HeadStack(heads).to(device)


CUDA_GRAPH_WARMUP = 3  # eager steps before a group's step is captured (optimizer state, workspace, cuBLAS)


class GroupSteps:
    """The training step of a group: eager, or on CUDA replayed from a captured CUDA graph.

    A step gathers nothing itself: it takes the batch's stored features and
    labels, casts the features once to the compute dtype, draws the step's
    masks, runs the stack, the losses, the backward and one fused Adam step,
    and adds the losses to ``totals`` on the device (no sync per step).

    On CUDA (``graphs``), after ``CUDA_GRAPH_WARMUP`` eager steps on a side
    stream the whole step (forward, backward, Adam with a tensor lr) is
    captured once with static input buffers and replayed for every full
    batch; a batch of another size (an epoch's last) runs eagerly. Masks are
    drawn outside the graph into the buffers it reads. The eager and the
    replayed step run the same kernels; a capture that fails falls back to
    eager steps with a warning.
    """

    def __init__(self, stack: HeadStack, configs: Sequence[RunConfig], device: torch.device, graphs: bool) -> None:
        config = configs[0]
        self.stack = stack
        self.dtype = compute_dtype(config.amp)
        self.batch_size = config.batch_size
        self.last_block = config.head_blocks == "last"
        # Dropout draws from the group's own stream (its seed), so parallel groups stay reproducible.
        self.masks = HalfMasks(torch.Generator(device=device).manual_seed(config.seed), device, self.dtype)
        self.factors = torch.tensor([c.contrastive_factor for c in configs], device=device)
        self.contrastive = any(c.contrastive_factor != 0 for c in configs)
        self.graphs = graphs and device.type == "cuda"
        self.optimizer = make_adam(stack, config.lr, capturable=self.graphs)
        self.totals = torch.zeros(len(configs), dtype=torch.float64, device=device)
        self.captured = False
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, torch.Tensor] | None = None
        self._warmup_left = CUDA_GRAPH_WARMUP

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def step(self, stored: torch.Tensor, labels: torch.Tensor) -> None:
        """Train on one batch: features (B, n, d) as stored, labels (B,) float, both on the device."""
        if not self.graphs or len(labels) != self.batch_size:
            self._run(stored, labels, self._draw(len(labels)))
        elif self._warmup_left > 0:
            self._warmup_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run(stored, labels, self._draw(len(labels)))
            torch.cuda.current_stream().wait_stream(side)
        elif self._graph is None:
            self._capture(stored, labels)
        else:
            static_features, static_labels = self._static
            static_features.copy_(stored)
            static_labels.copy_(labels)
            self._draw(len(labels))  # into the buffers the graph reads
            self._graph.replay()

    def _draw(self, batch: int) -> list[torch.Tensor]:
        return self.masks.draw(self.stack.shape.mask_shapes(batch))

    def _run(self, stored: torch.Tensor, labels: torch.Tensor, masks: list[torch.Tensor]) -> None:
        x = (stored[:, -1:] if self.last_block else stored).to(self.dtype)  # the one cast of the batch
        logits, z = self.stack(x, masks)
        losses = group_losses(logits, z, labels, self.factors, self.contrastive)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        self.totals += losses.detach()

    def _capture(self, stored: torch.Tensor, labels: torch.Tensor) -> None:
        """Capture the step on this batch, then replay it once: that is this batch's step (eager if capture fails)."""
        self._static = (stored.clone(), labels.clone())
        masks = self._draw(len(labels))
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with torch.cuda.graph(graph):
                self._run(*self._static, masks)
        except RuntimeError as error:
            warnings.warn(
                f"CUDA graph capture failed, the group trains without graphs: {error}", RuntimeWarning, stacklevel=3
            )
            self.graphs = False
            torch.cuda.synchronize()
            self._run(stored, labels, masks)
            return
        self._graph = graph
        self.captured = True
        graph.replay()


def fit_group(
    store: TrainStore,
    configs: Sequence[RunConfig],
    *,
    device: torch.device,
    progress: bool = False,
    cuda_graphs: bool = True,
) -> GroupFit:
    """Train configs that share ``group_key`` together, with the authors' protocol (see the module docstring).

    ``cuda_graphs``: on a CUDA device, replay each step from a captured graph (``GroupSteps``).
    """
    configs = tuple(configs)
    check_group(configs)
    config = configs[0]
    rows, n_invalid = training_rows(store, config)
    stack = build_stack(store, configs, device)
    steps = GroupSteps(stack, configs, device, cuda_graphs)
    shuffle = torch.Generator().manual_seed(config.seed)
    labels = torch.from_numpy(store.rows.labels.astype(np.float32)).to(device)
    rows_tensor = torch.from_numpy(rows)
    epoch_views = store.epoch_views(config.epochs)
    steps_per_epoch = -(-len(rows) // config.batch_size)
    bar = tqdm(total=config.epochs * steps_per_epoch, unit="step", leave=False, disable=not progress, desc="fit")
    losses, lrs = [], []
    held: list[str] = [epoch_views[0]]
    pending = store.view_cache.acquire(epoch_views[0])
    start = time.perf_counter()
    stack.train()
    try:
        for epoch in range(config.epochs):
            features = pending.result()
            if epoch + 1 < config.epochs:  # prefetch the next epoch's view while this one trains
                held.append(epoch_views[epoch + 1])
                pending = store.view_cache.acquire(epoch_views[epoch + 1])
            lr = config.lr_at_epoch(epoch)
            steps.set_lr(lr)
            lrs.append(lr)
            order = rows_tensor[torch.randperm(len(rows), generator=shuffle)]
            order_on_device = order.to(device)
            steps.totals.zero_()
            for batch_start in range(0, len(order), config.batch_size):
                batch_rows = order[batch_start : batch_start + config.batch_size]
                batch_labels = labels.index_select(0, order_on_device[batch_start : batch_start + config.batch_size])
                steps.step(features.gather(batch_rows), batch_labels)
                bar.update(1)
            losses.append((steps.totals / len(order)).tolist())
            del features
            store.view_cache.release(held.pop(0))
    finally:
        for name in held:
            store.view_cache.release(name)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    fit_seconds = time.perf_counter() - start
    bar.close()
    stack.eval()
    per_config = tuple(tuple(epoch[i] for epoch in losses) for i in range(len(configs)))
    return GroupFit(
        stack, configs, fit_seconds, len(rows), n_invalid, per_config, epoch_views, tuple(lrs), steps.captured
    )


def fit_head(store: TrainStore, config: RunConfig, *, device: torch.device, progress: bool = False) -> FitResult:
    """Train one head alone (the unfused trainer: a group of one)."""
    return fit_group(store, [config], device=device, progress=progress).results()[0]


class FusedAdam:
    """Adam with torch's defaults (betas 0.9 / 0.999, eps 1e-8, no weight decay) as one call of torch's fused
    kernel per step: ``torch.optim.Adam(fused=True)``'s update, bit for bit (tested), without ``torch.optim``'s
    machinery, whose first use in a process imports ``torch._dynamo`` (~1.3 s of every ``pipeline fit``).

    ``param_groups[0]["lr"]`` is the lr of the next step, as in ``torch.optim``.
    """

    defaults = {"fused": True}

    def __init__(self, parameters: Sequence[torch.nn.Parameter], lr: float) -> None:
        self.parameters = list(parameters)
        self.param_groups = [{"lr": lr}]
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.parameters]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.parameters]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.parameters]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        with_grad = [i for i, p in enumerate(self.parameters) if p.grad is not None]
        steps = [self.steps[i] for i in with_grad]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            [self.parameters[i] for i in with_grad],
            [self.parameters[i].grad for i in with_grad],
            [self.exp_avgs[i] for i in with_grad],
            [self.exp_avg_sqs[i] for i in with_grad],
            [],
            steps,
            amsgrad=False,
            lr=float(self.param_groups[0]["lr"]),
            beta1=0.9,
            beta2=0.999,
            weight_decay=0.0,
            eps=1e-8,
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )


@functools.cache
def has_fused_adam(device_type: str) -> bool:
    """Whether torch has the fused Adam kernel for this kind of device (CUDA; the CPU from torch 2.4)."""
    probe = torch.zeros(1, device=device_type)
    try:
        torch._fused_adam_([probe], [probe.clone()], [probe.clone()], [probe.clone()], [], [probe.clone()],
                           amsgrad=False, lr=0.0, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                           maximize=False, grad_scale=None, found_inf=None)  # fmt: skip
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return True


def make_adam(module: torch.nn.Module, lr: float, capturable: bool = False) -> FusedAdam | torch.optim.Adam:
    """Adam, fused into one pass over the parameters per step where torch has that kernel (``FusedAdam``).

    The same update as the default per-tensor loop up to float rounding; that
    loop took ~20 % of a training step of the 4-class head on a 2-core CPU.
    Torch has fused Adam for CUDA, and for the CPU from version 2.4.
    ``capturable`` (CUDA graphs): ``torch.optim.Adam`` with the lr a tensor on the
    device and the step count there, so that a captured step reads the lr set later.
    """
    if capturable:
        device = next(module.parameters()).device
        return torch.optim.Adam(module.parameters(), lr=torch.tensor(lr, device=device), fused=True, capturable=True)
    if has_fused_adam(next(module.parameters()).device.type):
        return FusedAdam(list(module.parameters()), lr)
    return torch.optim.Adam(module.parameters(), lr=lr)


# ----------------------------------------------------------------------------- scoring


@torch.inference_mode()
def stack_outputs(
    stack: HeadStack, features: FeatureSource, rows: np.ndarray, config: RunConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (G, N), z (G, N, proj_dim)) of every head of ``stack`` on ``rows``, float32 on the CPU.

    Batches of rows in increasing order (``EVAL_BATCH`` shared by the G
    heads, so that memory does not grow with the group), each run through all
    heads at once in float32, whatever precision the heads trained in: bf16
    logits would take a few hundred distinct values over thousands of rows.
    """
    stack.eval()
    logits = torch.empty(stack.size, len(rows), dtype=torch.float32)
    z = torch.empty(stack.size, len(rows), stack.shape.proj_dim, dtype=torch.float32)
    index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    batch = max(1, EVAL_BATCH // stack.size)
    for start in range(0, len(rows), batch):
        x = block_view(features.gather(index[start : start + batch]), config).float()
        batch_logits, batch_z = stack(x)
        logits[:, start : start + batch] = batch_logits.cpu()
        z[:, start : start + batch] = batch_z.cpu()
    return logits, z


def group_logits(stack: HeadStack, store: LoadedStore, rows: np.ndarray, config: RunConfig) -> torch.Tensor:
    """Logits (G, N, n_crops) of every head on ``rows``: one column per evaluated variant (one, or the ten crops).

    ``pipeline.heads.calibration`` turns a head's (N, n_crops) into scores (the
    sigmoid of the mean logit, over its temperature).
    """
    return torch.stack([stack_outputs(stack, store.features[v], rows, config)[0] for v in store.variants], dim=2)


def forward_rows(
    head: RineHead, features: FeatureSource, rows: np.ndarray, config: RunConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N,), z (N, proj_dim)) of one head on ``rows``, float32 on the CPU."""
    logits, z = stack_outputs(HeadStack([head]).to(_source_device(features)), features, rows, config)
    return logits[0], z[0]


def _source_device(features: FeatureSource) -> torch.device:
    return features.tensor.device if isinstance(features, InMemoryFeatures) else features.device
