"""What bf16 head training (``amp: bf16``) changes against float32 (``amp: none``, the default): time and numbers.

A fused group of four configs (xi 0.1, 0.2, 0.4, 0.8) of the paper's head
shape on ViT-L/14 features (24 blocks x 1024; q 2, d' 1024 by default),
batch 128, one epoch, trained with ``train.fit_group`` from the same seed in
float32 and in bf16 on a synthetic task a head learns to ~0.9 AP: float16
tokens drawn from a standard normal, the fakes shifted along one direction
in every block, and a tenth of the labels flipped in training and test (so
no head can be perfect). Both groups are scored in float32 on the same test
rows (``scoring.group_logits``: scores are never rounded to bf16, whatever the
training precision). Prints, per config and over the group: the fit's wall
time in each precision (and their ratio), the largest and the mean absolute
difference of the test scores (sigmoid of the logit), and the difference of
test ACC (threshold 0.5) and AP.

bf16 is fast only where the hardware multiplies bfloat16 (CUDA GPUs, CPUs
with AMX or AVX-512 BF16, see the capability line); elsewhere it is emulated
and ~100x slower than float32, so on such a CPU measure a smaller head
(``--proj-layers 4 --proj-dim 128``: the released 2-class head's shape).

    .venv/bin/python benchmarks/bench_precision.py [--rows 4096] [--test-rows 2048] [--proj-layers 2 --proj-dim 1024]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from _common import print_machine, synthetic_store, synthetic_train_store
from sklearn.metrics import average_precision_score

from pipeline.devices import bf16_is_fast, resolve_device
from pipeline.heads import RunConfig, scoring, train

GROUP_FACTORS = (0.1, 0.2, 0.4, 0.8)
SHIFT = 2.5  # length of the fakes' shift along the unit direction, in every block
LABEL_NOISE = 0.1  # share of labels flipped


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096, help="Training rows (one epoch).")
    parser.add_argument("--test-rows", type=int, default=2048, help="Test rows scored by every head.")
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--proj-layers", type=int, default=2)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def synthetic_task(rows: int, blocks: int, dim: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Float16 tokens and labels: fakes shifted by ``SHIFT`` along a fixed unit direction, ``LABEL_NOISE`` flipped."""
    direction = torch.randn(dim, generator=torch.Generator().manual_seed(1234))
    direction /= direction.norm()
    labels = np.arange(rows) % 2
    generator = torch.Generator().manual_seed(seed)
    features = torch.empty(rows, blocks, dim, dtype=torch.float16)
    for start in range(0, rows, 1024):
        piece = torch.randn(min(1024, rows - start), blocks, dim, generator=generator)
        fake = torch.from_numpy(labels[start : start + len(piece)].astype(np.float32))
        features[start : start + len(piece)] = (piece + SHIFT * fake[:, None, None] * direction).half()
    flipped = np.random.default_rng(seed).random(rows) < LABEL_NOISE
    return features, np.where(flipped, 1 - labels, labels)


def main() -> int:
    args = parse_args()
    print_machine()
    device = resolve_device(args.device)
    print(f"device {device}; bf16 fast here: {bf16_is_fast(device)}")
    features, labels = synthetic_task(args.rows, args.blocks, args.dim, args.seed)
    test_features, test_labels = synthetic_task(args.test_rows, args.blocks, args.dim, args.seed + 1)
    store = synthetic_train_store(synthetic_store("train", features.to(device), labels, None))
    test = synthetic_store("test", test_features.to(device), test_labels, None)
    print(
        f"inputs: {args.rows} training rows, {args.test_rows} test rows of ({args.blocks}, {args.dim}) float16; "
        f"fakes shifted by {SHIFT} along one unit direction, {LABEL_NOISE:.0%} of labels flipped; group of "
        f"{len(GROUP_FACTORS)} heads (xi {list(GROUP_FACTORS)}), q {args.proj_layers}, d' {args.proj_dim}, batch 128, "
        f"one epoch, seed {args.seed}"
    )
    seconds, scores = {}, {}
    for amp in ("none", "bf16"):
        configs = [
            RunConfig(
                contrastive_factor=xi, proj_layers=args.proj_layers, proj_dim=args.proj_dim, seed=args.seed, amp=amp
            )
            for xi in GROUP_FACTORS
        ]
        group = train.fit_group(store, configs, device=device)
        seconds[amp] = group.fit_seconds
        logits = scoring.group_logits(group.stack, test, np.arange(args.test_rows), configs[0])[..., 0]
        scores[amp] = torch.sigmoid(logits.double()).numpy()  # (G, N), float32 scoring either way
        print(f"amp {amp}: fit {group.fit_seconds:.1f} s")
    store.view_cache.close()
    print(f"RATIO fit time float32 / bf16 = {seconds['none'] / seconds['bf16']:.2f}x (bf16 speed-up)")
    differences = np.abs(scores["none"] - scores["bf16"])
    print("xi    ACC fp32  ACC bf16  dACC     AP fp32  AP bf16  dAP      max |dscore|  mean |dscore|")
    for index, xi in enumerate(GROUP_FACTORS):
        fp32, bf16 = scores["none"][index], scores["bf16"][index]
        acc = [float(np.mean((s > 0.5) == test_labels)) for s in (fp32, bf16)]
        ap = [float(average_precision_score(test_labels, s)) for s in (fp32, bf16)]
        print(
            f"{xi:<5} {acc[0]:.4f}    {acc[1]:.4f}    {acc[1] - acc[0]:+.4f}  {ap[0]:.4f}   {ap[1]:.4f}   "
            f"{ap[1] - ap[0]:+.4f}  {differences[index].max():.4f}        {differences[index].mean():.4f}"
        )
    print(f"SCORES all heads: max |dscore| {differences.max():.4f}, mean |dscore| {differences.mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
