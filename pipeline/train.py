"""Fit one RINE head from cached block tokens, and score stores with it.

Features stay in one float16 tensor per store (on the GPU when there is one)
that every run of a process shares: a run only holds the indices of its rows
(class subset, training fraction, valid rows) and gathers each batch from
the shared tensor.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import cache
from .config import RunConfig, StoreRef
from .head import RineHead
from .loss import rine_loss

EVAL_BATCH = 1024
_SEED_LOCK = threading.Lock()


class DataError(RuntimeError):
    """Stores that cannot be trained or evaluated on as asked."""


@dataclass(frozen=True)
class LoadedStore:
    """One store's rows and the features of the variants a grid needs."""

    ref: StoreRef
    info: cache.StoreInfo
    rows: cache.RowTable
    features: dict[str, torch.Tensor]  # variant -> (N, n_blocks, dim), store dtype

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.features)


def train_variants(info: cache.StoreInfo, ref: StoreRef, max_epochs: int) -> tuple[str, ...]:
    """Variants read by training: view e mod K for epochs 0..max_epochs-1."""
    if ref.variant is not None:
        return (ref.variant,)
    views = sorted(name for name, spec in info.variants.items() if spec.kind == "train_view" and name in info.complete_variants)
    if not views:
        if "center" in info.complete_variants:
            return ("center",)
        raise DataError(f"{info.path}: no complete training views; extract it with --augment")
    return tuple(views[:max_epochs])


def evaluation_variants(ref: StoreRef) -> tuple[str, ...]:
    """Variants scored for an evaluation store: one, or the ten crops."""
    if ref.variant == cache.TEN_CROP:
        return tuple(cache.VariantSpec.ten_crop(i).name for i in range(10))
    return (ref.variant or "center",)


def load_store(ref: StoreRef, variants: tuple[str, ...] | None, device: torch.device) -> LoadedStore:
    """Read a store's rows and variants (default: its evaluation variants) into memory once."""
    info = open_info(ref)
    wanted = variants or evaluation_variants(ref)
    features = {}
    for variant in wanted:
        try:
            array = cache.read_features(ref.path, variant)
        except cache.StoreError as error:
            raise DataError(f"{ref.name}: {error}") from None
        features[variant] = torch.from_numpy(array).to(device)
    return LoadedStore(ref=ref, info=info, rows=cache.read_rows(ref.path), features=features)


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


def training_rows(store: LoadedStore, config: RunConfig) -> tuple[np.ndarray, int]:
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
    return x[:, -1:] if config.blocks == "last" else x


def build_head(store: LoadedStore, config: RunConfig) -> RineHead:
    n_blocks = 1 if config.blocks == "last" else len(store.info.identity.blocks)
    return RineHead(n_blocks, store.info.identity.dim, config.proj_dim, config.proj_layers, aggregation=config.aggregation)


@dataclass(frozen=True)
class FitResult:
    head: RineHead
    fit_seconds: float
    n_train: int
    n_train_invalid: int
    epoch_losses: tuple[float, ...]


def fit_head(store: LoadedStore, config: RunConfig, *, device: torch.device, progress: bool = False) -> FitResult:
    """Train one head with the authors' protocol from in-memory features."""
    rows, n_invalid = training_rows(store, config)
    with _SEED_LOCK:  # parallel runs (threads) must not interleave seeding and init
        torch.manual_seed(config.seed)
        head = build_head(store, config).to(device)
    # Dropout and shuffling draw from the run's own streams, so parallel runs stay reproducible.
    head.set_dropout_generator(torch.Generator(device=device).manual_seed(config.seed))
    optimizer = make_adam(head, config.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.lr_milestones), gamma=0.1)
    generator = torch.Generator().manual_seed(config.seed)
    labels = torch.from_numpy(store.rows.labels.astype(np.float32)).to(device)
    rows_tensor = torch.from_numpy(rows).to(device)
    variants = store.variants
    steps_per_epoch = -(-len(rows) // config.batch_size)
    bar = tqdm(total=config.epochs * steps_per_epoch, unit="step", leave=False, disable=not progress, desc="fit")
    losses = []
    start = time.perf_counter()
    head.train()
    for epoch in range(config.epochs):
        features = store.features[variants[epoch % len(variants)]]
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
        scheduler.step()
        losses.append(float(total) / len(order))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    fit_seconds = time.perf_counter() - start
    bar.close()
    head.eval()
    return FitResult(head, fit_seconds, len(rows), n_invalid, tuple(losses))


def score_store(head: RineHead, store: LoadedStore, rows: np.ndarray, config: RunConfig) -> np.ndarray:
    """Probability of fake per row; with several variants (ten-crop) the mean of their sigmoids."""
    return np.mean([score_rows(head, store.features[v], rows, config) for v in store.variants], axis=0)


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


@torch.inference_mode()
def score_rows(head: RineHead, features: torch.Tensor, rows: np.ndarray, config: RunConfig) -> np.ndarray:
    """Probability of fake (sigmoid of the logit) for ``rows``."""
    head.eval()
    out = np.empty(len(rows), dtype=np.float64)
    index = torch.from_numpy(rows).to(features.device)
    for start in range(0, len(rows), EVAL_BATCH):
        x = block_view(features[index[start : start + EVAL_BATCH]], config).float()
        with torch.autocast(features.device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16"):
            logits, _ = head(x)
        out[start : start + EVAL_BATCH] = torch.sigmoid(logits.float().squeeze(1)).cpu().numpy()
    return out
