"""Fit RINE heads from cached block tokens, several configs at once, with the authors' protocol.

Configs that differ only in xi (or the calibration fitted afterwards) train as one ``HeadStack``
(:func:`fit_group`): each batch gathered and cast once, every layer one batched matmul, one fused Adam step;
each config's loss is its own, so a config trained alone (:func:`fit_head`) agrees to float rounding. Epoch e
reads training view ``e mod K`` with the lr of ``RunConfig.lr_at_epoch``; float32 by default (``amp: bf16`` an
opt-in); on CUDA each group's step is replayed from a captured graph (``GroupSteps``). docs/training.md.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import cache
from ..devices import compute_dtype
from ..names import DEFAULT_HEAD
from .config import RunConfig
from .head import RineHead
from .head_stack import HalfMasks, HeadStack
from .loss import group_losses
from .stores import TrainStore, store_block_indices, training_rows

_SEED_LOCK = threading.Lock()


def block_view(x: torch.Tensor, config: RunConfig) -> torch.Tensor:
    """The blocks the head sees: all, or only the last (ablation)."""
    return x[:, -1:] if config.head_blocks == "last" else x


def build_head(info: cache.StoreInfo, config: RunConfig) -> RineHead:
    n_blocks = 1 if config.head_blocks == "last" else len(store_block_indices(info.identity))
    return RineHead(n_blocks, info.identity.dim, config.proj_dim, config.proj_layers, aggregation=config.aggregation)


def group_key(config: RunConfig) -> RunConfig:
    """What configs must share to train as one group: everything but the contrastive factor and the calibration.

    (The calibration is fitted per head on its val logits, after training.) The other heads group by their kind
    and training rows: any features, k and C (``probe_fit``: one read of the data for the group).
    """
    if config.head != DEFAULT_HEAD:
        config = dataclasses.replace(config, features="", k=0, C=0.0)
    return dataclasses.replace(config, contrastive_factor=0.0, calibration="none")


def fusable_groups(configs: Sequence[RunConfig], max_size: int) -> list[list[int]]:
    """Indices of ``configs`` grouped by ``group_key``, in the order of their first; at most ``max_size`` per RINE
    group (memory grows with a stack), any number per group of the other heads."""
    by_key: dict[RunConfig, list[list[int]]] = {}
    for index, config in enumerate(configs):
        groups = by_key.setdefault(group_key(config), [[]])
        if len(groups[-1]) == max_size and config.head == DEFAULT_HEAD:
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


# torch.optim.Adam's defaults (betas, eps, no weight decay, no AMSGrad), as the fused kernel takes them
ADAM_OPTIONS: dict[str, Any] = {
    "amsgrad": False,
    "beta1": 0.9,
    "beta2": 0.999,
    "weight_decay": 0.0,
    "eps": 1e-8,
    "maximize": False,
    "grad_scale": None,
    "found_inf": None,
}


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
            lr=float(self.param_groups[0]["lr"]),
            **ADAM_OPTIONS,
        )


@functools.cache
def has_fused_adam(device_type: str) -> bool:
    """Whether torch has the fused Adam kernel for this kind of device (CUDA; the CPU from torch 2.4)."""
    probe = torch.zeros(1, device=device_type)
    try:
        torch._fused_adam_(
            [probe],
            [probe.clone()],
            [probe.clone()],
            [probe.clone()],
            [],
            [probe.clone()],
            lr=0.0,
            **ADAM_OPTIONS,
        )
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
