"""Scoring stores with fitted heads: every head of a group on each batch at once, in float32 whatever precision the heads trained in (bf16 logits would take a few hundred distinct values over thousands of rows)."""

from __future__ import annotations

import numpy as np
import torch

from .config import RunConfig
from .head import RineHead
from .head_stack import HeadStack
from .probes import ProbeHead
from .stores import FeatureSource, InMemoryFeatures, LoadedStore
from .train import block_view

EVAL_BATCH = 1024


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
    head: RineHead | ProbeHead, features: FeatureSource, rows: np.ndarray, config: RunConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N,), z (N, proj_dim)) of one head on ``rows``, float32 on the CPU (z: a probe's input vector)."""
    if not isinstance(head, RineHead):
        with torch.inference_mode():
            x = features.gather(torch.from_numpy(np.asarray(rows, dtype=np.int64)))
            logits, z = head.to(x.device)(x)
        return logits[:, 0].float().cpu(), z.float().cpu()
    logits, z = stack_outputs(HeadStack([head]).to(_source_device(features)), features, rows, config)
    return logits[0], z[0]


def _source_device(features: FeatureSource) -> torch.device:
    return features.tensor.device if isinstance(features, InMemoryFeatures) else features.device
