"""Fitting and scoring the heads that read one vector per image (``probes``): ``linear`` with RINE's optimiser,
epochs, views and seeds; ``logreg`` with scikit-learn; ``knn`` in one pass over the training rows.

A group of such configs (the same head kind and training rows, any ``features`` and ``k``/``C``: e.g. a
per-block probe for every block) is one batch of work: each view is read once for the whole group, and every
head takes its vector (one block's token, or the embedding) from what was read. docs/training.md, "Heads".
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..names import EMBEDDING_FEATURES, LOGREG_MAX_ITER
from .config import RunConfig
from .probes import KnnProbe, LinearProbe, ProbeHead, normalise
from .stores import DataError, FeatureSource, InMemoryFeatures, LoadedStore, TrainStore, store_block_indices
from .train import FitResult, make_adam

SCORE_BATCH = 4096


@dataclass(frozen=True)
class ProbeInput:
    """Where a config's vector is in a store's rows: which array (features or embedding) and which position."""

    embedding: bool
    n_blocks: int  # vectors per stored row: the store's blocks, or 1 for the embedding
    dim: int
    position: int


def probe_input(train: TrainStore, run: RunConfig) -> ProbeInput:
    """``features: embedding`` or ``block:K`` (K a cached backbone block, negative from the last one) resolved
    against the training store."""
    identity = train.info.identity
    if run.features == EMBEDDING_FEATURES:
        return ProbeInput(True, 1, identity.embedding_dim, 0)
    blocks = store_block_indices(identity)
    block = run.block
    if block is None:
        raise DataError(f"head {run.head} reads one vector; features {run.features} is for head rine")
    if block < 0 and -block <= len(blocks):
        block = blocks[block]
    if block not in blocks:
        raise DataError(f"{train.info.path}: features {run.features}: the store holds blocks {list(blocks)}")
    return ProbeInput(False, len(blocks), identity.dim, blocks.index(block))


class GroupVectors:
    """The vectors of rows of one source for every head of a group, read once: a column of an in-memory
    tensor (no copy of the other blocks), or the rows of a streamed source gathered once for all positions."""

    def __init__(self) -> None:
        self._gathered: dict[tuple[int, bytes], torch.Tensor] = {}
        self._lock = threading.Lock()  # the probes of a group ask from several threads

    def get(self, source: FeatureSource, rows: np.ndarray, position: int) -> torch.Tensor:
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        if isinstance(source, InMemoryFeatures):
            return source.tensor[:, position].index_select(0, index.to(source.tensor.device))
        key = (id(source), np.asarray(rows, dtype=np.int64).tobytes())
        with self._lock:
            if key not in self._gathered:
                self._gathered[key] = source.gather(index)
            return self._gathered[key][:, position]


def fit_probe_group(
    store: TrainStore, configs: Sequence[RunConfig], inputs: Sequence[ProbeInput], rows: np.ndarray, n_invalid: int
) -> list[FitResult]:
    """Fit every config of a group (one head kind, one set of training rows) on ``rows`` of the training store."""
    head = configs[0].head
    if head == "linear":
        return [fit_linear(store, config, where, rows, n_invalid) for config, where in zip(configs, inputs)]
    view = store.epoch_views(1)[0]  # logreg and knn: one pass over the first epoch's view
    sources = {where.embedding: _acquire(store, view, where.embedding) for where in inputs}
    labels = store.rows.labels[rows].astype(np.int64)
    fit = fit_logreg if head == "logreg" else fit_knn
    vectors = GroupVectors()

    def fit_one(config: RunConfig, where: ProbeInput) -> FitResult:
        start = time.perf_counter()
        fitted = fit(vectors.get(sources[where.embedding], rows, where.position), labels, config, where)
        return FitResult(fitted, time.perf_counter() - start, len(rows), n_invalid, (), (view,), ())

    try:
        # the probes of a group at once, one per core, each on one BLAS thread: their solvers are matrix-vector
        # products, which threads of one BLAS call share badly (10x slower on a loaded 2-core machine, measured)
        with (
            warnings.catch_warnings(),
            threadpool_limits(1),
            ThreadPoolExecutor(max(1, min(len(configs), os.cpu_count() or 1))) as pool,
        ):
            warnings.simplefilter("ignore", ConvergenceWarning)  # n_iter is what it is; the metrics judge the fit
            return list(pool.map(fit_one, configs, inputs))
    finally:
        for embedding in sources:
            _cache(store, embedding).release(view)


def _cache(store: TrainStore, embedding: bool):
    return store.embedding_cache if embedding else store.view_cache


def _acquire(store: TrainStore, view: str, embedding: bool) -> FeatureSource:
    return _cache(store, embedding).acquire(view).result()


def fit_logreg(x: torch.Tensor, labels: np.ndarray, config: RunConfig, where: ProbeInput) -> LinearProbe:
    """scikit-learn's ``LogisticRegression(C)`` on standardised float64 vectors (lbfgs, ``LOGREG_MAX_ITER``),
    the standardisation folded into the head's float64 weights: its logits are the pipeline's
    ``decision_function`` up to float rounding."""
    features = x.double().cpu().numpy()
    scaler = StandardScaler().fit(features)
    model = LogisticRegression(C=config.C, max_iter=LOGREG_MAX_ITER).fit(scaler.transform(features), labels)
    weight = model.coef_[0] / scaler.scale_
    bias = model.intercept_[0] - float(np.dot(weight, scaler.mean_))
    head = LinearProbe(where.n_blocks, where.dim, where.position, "logreg", torch.float64)
    with torch.no_grad():
        head.linear.weight.copy_(torch.from_numpy(weight).unsqueeze(0))
        head.linear.bias.fill_(bias)
    return head.eval()


def fit_knn(x: torch.Tensor, labels: np.ndarray, config: RunConfig, where: ProbeInput) -> KnnProbe:
    """The training vectors, L2-normalised, and their labels: the bank the cosine neighbours are found in."""
    head = KnnProbe(where.n_blocks, where.dim, where.position, config.k, len(labels))
    with torch.no_grad():
        head.bank.copy_(normalise(x).cpu())
        head.labels.copy_(torch.from_numpy(labels.astype(np.float32)))
    return head.eval()


def fit_linear(store: TrainStore, config: RunConfig, where: ProbeInput, rows: np.ndarray, n_invalid: int) -> FitResult:
    """One linear layer trained with BCE, with RINE's machinery: Adam (fused where torch has it), ``batch_size``,
    the lr schedule of ``lr_at_epoch``, epoch e on view ``e mod K``, the init and the shuffles from ``seed``."""
    device = torch.device("cpu")
    head = LinearProbe(where.n_blocks, where.dim, where.position, "linear")
    shuffle = torch.Generator().manual_seed(config.seed)
    bound = 1.0 / where.dim**0.5  # nn.Linear's default init, drawn from the config's own stream (thread-safe)
    with torch.no_grad():
        head.linear.weight.uniform_(-bound, bound, generator=shuffle)
        head.linear.bias.uniform_(-bound, bound, generator=shuffle)
    epoch_views = store.epoch_views(config.epochs)
    labels_all = torch.from_numpy(store.rows.labels.astype(np.float32))
    rows_tensor = torch.from_numpy(rows)
    optimizer = None
    losses, lrs = [], []
    start = time.perf_counter()
    head.train()
    for epoch, view in enumerate(epoch_views):
        source = _acquire(store, view, where.embedding)
        try:
            if optimizer is None:
                device = _device_of(source)
                head.to(device)
                optimizer = make_adam(head, config.lr)
            lr = config.lr_at_epoch(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            lrs.append(lr)
            order = rows_tensor[torch.randperm(len(rows), generator=shuffle)]
            total = 0.0
            for batch_start in range(0, len(order), config.batch_size):
                batch = order[batch_start : batch_start + config.batch_size]
                x = source.gather(batch)[:, where.position].float()
                y = labels_all.index_select(0, batch).to(device)
                logits = head.linear(x).squeeze(1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            losses.append(total / len(order))
        finally:
            _cache(store, where.embedding).release(view)
    head.eval()
    seconds = time.perf_counter() - start
    return FitResult(head, seconds, len(rows), n_invalid, tuple(losses), epoch_views, tuple(lrs))


def _device_of(source: FeatureSource) -> torch.device:
    return source.tensor.device if isinstance(source, InMemoryFeatures) else source.device


@torch.inference_mode()
def probe_logits(
    heads: Sequence[ProbeHead], inputs: Sequence[ProbeInput], store: LoadedStore, rows: np.ndarray
) -> list[torch.Tensor]:
    """Logits (N, n_crops) of every head of a group on ``rows``, float32 on the CPU; each variant's rows read once
    for the group."""
    vectors = GroupVectors()
    out = []
    for head, where in zip(heads, inputs):
        sources = store.embeddings if where.embedding else store.features
        columns = []
        for variant in store.variants:
            x = vectors.get(sources[variant], rows, where.position)
            parts = [head_logits(head, x[start : start + SCORE_BATCH]) for start in range(0, len(rows), SCORE_BATCH)]
            columns.append(torch.cat(parts) if parts else torch.empty(0))
        out.append(torch.stack(columns, dim=1))
    return out


def head_logits(head: ProbeHead, x: torch.Tensor) -> torch.Tensor:
    """Logits (B,) of a probe on its vectors (B, d), float32 on the CPU."""
    return head.to(x.device).logits_of(x)[:, 0].float().cpu()
