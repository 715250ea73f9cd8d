"""Head-training FLOP/s through ``train.fit_head`` against this machine's matmul FLOP/s.

The published 4-class head (ViT-L/14 features: n = 24 blocks, d = 1024;
q = 2, d' = 1024), batch 128, BCE + SupCon, Adam, trained for one epoch from
float16 features held in memory (a synthetic store loaded by
``train.open_train_store``; the first fit loads the view, later fits reuse it). Its FLOPs are counted analytically (printed below);
the peak is a loop of (4096 x 1024) @ (1024 x 1024) matmuls in the same run.
Both are timed in alternating rounds. Prints the fp32 ratio (target >= 0.6)
and the bf16-autocast ratio against bf16 matmuls.

    .venv/bin/python benchmarks/bench_head.py [--rows 3072] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from _common import add_scratch_options, print_machine, scratch_dir, write_synthetic_store

from pipeline import train
from pipeline.config import RunConfig, StoreRef

TARGET = 0.6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3072, help="Training rows (steps = rows / batch).")
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--proj-layers", type=int, default=2)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--contrastive-factor", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul", type=int, nargs=3, default=(4096, 1024, 1024), metavar=("M", "K", "N"))
    parser.add_argument("--matmul-iters", type=int, default=20)
    parser.add_argument("--skip-bf16", action="store_true")
    add_scratch_options(parser)
    return parser.parse_args()


@dataclass(frozen=True)
class LinearShape:
    name: str
    m: int  # rows going through the layer per step
    k: int
    n: int
    needs_input_grad: bool

    @property
    def forward_flops(self) -> int:
        return 2 * self.m * self.k * self.n


def head_linears(batch: int, blocks: int, dim: int, proj_dim: int, proj_layers: int) -> list[LinearShape]:
    """Every Linear of the RINE head with the rows it sees in one training step."""
    tokens = batch * blocks
    layers = [LinearShape("proj1.0", tokens, dim, proj_dim, False)]
    layers += [LinearShape(f"proj1.{i}", tokens, proj_dim, proj_dim, True) for i in range(1, proj_layers)]
    layers += [LinearShape(f"proj2.{i}", batch, proj_dim, proj_dim, True) for i in range(proj_layers)]
    layers += [LinearShape(f"head.{i}", batch, proj_dim, proj_dim, True) for i in range(2)]
    layers += [LinearShape("head.out", batch, proj_dim, 1, True)]
    return layers


def step_flops(layers: list[LinearShape]) -> int:
    """Forward 2mkn per Linear; backward 2mkn for weight grads, 2mkn more for input grads where needed."""
    return sum(layer.forward_flops * (3 if layer.needs_input_grad else 2) for layer in layers)


def print_flop_formula(layers: list[LinearShape], per_step: int, batch: int) -> None:
    print("FLOPs per step = sum over Linears of 2*m*k*n * (1 forward + 1 weight grad + 1 input grad unless first)")
    for layer in layers:
        factor = 3 if layer.needs_input_grad else 2
        print(
            f"  {layer.name:<9} m={layer.m:<6} k={layer.k:<5} n={layer.n:<5} x{factor}: {layer.forward_flops * factor / 1e9:8.3f} GFLOP"
        )
    print(
        f"  total {per_step / 1e9:.3f} GFLOP per step of {batch} samples (elementwise work, softmax, loss and Adam not counted)"
    )


def matmul_flops_per_second(dtype: torch.dtype, shape: tuple[int, int, int], iters: int) -> float:
    m, k, n = shape
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)
    start = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b, out=out)
    return 2 * m * k * n * iters / (time.perf_counter() - start)


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    print_machine()
    layers = head_linears(args.batch, args.blocks, args.dim, args.proj_dim, args.proj_layers)
    per_step = step_flops(layers)
    steps = -(-args.rows // args.batch)
    print(
        f"inputs: {args.rows} training rows of ({args.blocks}, {args.dim}) float16 features in memory, one epoch = "
        f"{steps} steps; head q={args.proj_layers} d'={args.proj_dim}, batch {args.batch}, xi={args.contrastive_factor}, "
        f"Adam; matmul peak from ({args.matmul[0]}x{args.matmul[1]})@({args.matmul[1]}x{args.matmul[2]}) x {args.matmul_iters}"
    )
    print_flop_formula(layers, per_step, args.batch)
    config = RunConfig(
        contrastive_factor=args.contrastive_factor,
        proj_layers=args.proj_layers,
        proj_dim=args.proj_dim,
        batch_size=args.batch,
    )
    modes = {"fp32": (config, torch.float32)}
    if not args.skip_bf16:
        modes["bf16"] = (replace(config, amp="bf16"), torch.bfloat16)
    device = torch.device("cpu")
    with scratch_dir(args, "bench_head_") as work:
        path = work / "train.zarr"
        labels = np.random.default_rng(0).integers(0, 2, args.rows)
        write_synthetic_store(path, args.rows, args.blocks, args.dim, shard_rows=1024, chunk_rows=256, labels=labels)
        store = train.open_train_store(StoreRef("train", path), device)
        for run_config, _ in modes.values():
            train.fit_head(store, run_config, device=device)  # warm-up: allocator, kernels, first touch
        fit_seconds: dict[str, list[float]] = {name: [] for name in modes}
        peaks: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(args.repeats):
            for name, (run_config, dtype) in modes.items():
                peaks[name].append(matmul_flops_per_second(dtype, tuple(args.matmul), args.matmul_iters))
                fit_seconds[name].append(train.fit_head(store, run_config, device=device).fit_seconds)
    for name in modes:
        seconds = statistics.median(fit_seconds[name])
        achieved = per_step * steps / seconds
        peak = statistics.median(peaks[name])
        ratio = achieved / peak
        runs = ", ".join(f"{s:.2f}" for s in fit_seconds[name])
        print(
            f"{name}: fit_head {seconds:.2f} s per epoch (runs: {runs}) = {args.rows / seconds:.0f} samples/s = "
            f"{achieved / 1e9:.0f} GFLOP/s; matmul peak {peak / 1e9:.0f} GFLOP/s "
            f"(runs: {', '.join(f'{p / 1e9:.0f}' for p in peaks[name])})"
        )
        target = f" ({'meets' if ratio >= TARGET else 'BELOW'} target {TARGET})" if name == "fp32" else ""
        print(f"RATIO {name} head training / {name} matmul FLOP/s = {ratio:.3f}{target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
