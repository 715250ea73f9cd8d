"""Head-training FLOP/s through ``train.fit_group`` against this machine's matmul FLOP/s, alone and fused.

The published 4-class head (ViT-L/14 features: n = 24 blocks, d = 1024;
q = 2, d' = 1024), batch 128, BCE + SupCon, Adam, trained for one epoch from
float16 features held in memory (a synthetic store; the first fit loads the
view, later fits reuse it): one config alone (``fit_head``, the unfused
trainer) and a fused group of four configs (xi 0.1, 0.2, 0.4, 0.8, one
``fit_group``), in float32 and in bf16 (bfloat16 matmuls, float32 master
weights). Head FLOPs are counted analytically (printed below; a group does
four times the work); the peak is a loop of (4096 x 1024) @ (1024 x 1024)
matmuls in the matching dtype, timed in alternation with the fits. Prints
one RATIO line per mode: fp32 target >= 0.7; bf16 target >= 0.5 where bf16
is fast (AMX or AVX-512 BF16; see the capability line), for information
elsewhere; and the speed-up bf16 / fp32 of each mode. (Float32 is the default
precision; bf16 is the ``amp: bf16`` opt-in, whose effect on the numbers
``bench_precision.py`` measures.)

    .venv/bin/python benchmarks/bench_head.py [--rows 3072] [--repeats 3] [--skip-bf16]
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

from pipeline.devices import bf16_is_fast, cpu_has_amx, cpu_has_avx512_bf16
from pipeline.heads import RunConfig, StoreRef, stores, train

TARGETS = {"fp32": 0.7, "bf16": 0.5}
GROUP_FACTORS = (0.1, 0.2, 0.4, 0.8)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3072, help="Training rows (steps = rows / batch).")
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--proj-layers", type=int, default=2)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
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
            f"  {layer.name:<9} m={layer.m:<6} k={layer.k:<5} n={layer.n:<5} x{factor}: "
            f"{layer.forward_flops * factor / 1e9:8.3f} GFLOP"
        )
    print(
        f"  total {per_step / 1e9:.3f} GFLOP per step of {batch} samples per config (elementwise work, softmax, "
        "loss and Adam not counted); a fused group of 4 does 4 times that"
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


def print_capabilities() -> None:
    cpu = torch.device("cpu")
    print(
        f"cpu capability: torch {torch.backends.cpu.get_cpu_capability()}, AMX bf16 {cpu_has_amx()}, "
        f"AVX-512 bf16 {cpu_has_avx512_bf16()}; bf16 counted fast here: {bf16_is_fast(cpu)}"
    )


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    print_machine()
    print_capabilities()
    layers = head_linears(args.batch, args.blocks, args.dim, args.proj_dim, args.proj_layers)
    per_step = step_flops(layers)
    steps = -(-args.rows // args.batch)
    print(
        f"inputs: {args.rows} training rows of ({args.blocks}, {args.dim}) float16 features in memory, one epoch = "
        f"{steps} steps; head q={args.proj_layers} d'={args.proj_dim}, batch {args.batch}, Adam; alone xi=0.2, "
        f"group xi={list(GROUP_FACTORS)}; matmul peak from ({args.matmul[0]}x{args.matmul[1]})@"
        f"({args.matmul[1]}x{args.matmul[2]}) x {args.matmul_iters}"
    )
    print_flop_formula(layers, per_step, args.batch)
    base = RunConfig(proj_layers=args.proj_layers, proj_dim=args.proj_dim, batch_size=args.batch, amp="none")
    precisions = {"fp32": ("none", torch.float32)}
    if not args.skip_bf16:
        precisions["bf16"] = ("bf16", torch.bfloat16)
    modes = {}
    for precision, (amp, _) in precisions.items():
        modes[f"{precision} alone"] = [replace(base, contrastive_factor=0.2, amp=amp)]
        modes[f"{precision} group of 4"] = [replace(base, contrastive_factor=xi, amp=amp) for xi in GROUP_FACTORS]
    device = torch.device("cpu")
    fit_seconds: dict[str, list[float]] = {name: [] for name in modes}
    peaks: dict[str, list[float]] = {name: [] for name in precisions}
    with scratch_dir(args, "bench_head_") as work:
        path = work / "train.zarr"
        labels = np.random.default_rng(0).integers(0, 2, args.rows)
        write_synthetic_store(path, args.rows, args.blocks, args.dim, shard_rows=1024, chunk_rows=256, labels=labels)
        store = stores.open_train_store(StoreRef("train", path), device)
        for configs in modes.values():
            train.fit_group(store, configs, device=device)  # warm-up: allocator, kernels, first touch
        for _ in range(args.repeats):
            for precision, (_, dtype) in precisions.items():
                peaks[precision].append(matmul_flops_per_second(dtype, tuple(args.matmul), args.matmul_iters))
            for name, configs in modes.items():
                fit_seconds[name].append(train.fit_group(store, configs, device=device).fit_seconds)
        store.view_cache.close()
    for name, configs in modes.items():
        precision = name.split()[0]
        seconds = statistics.median(fit_seconds[name])
        achieved = per_step * steps * len(configs) / seconds
        peak = statistics.median(peaks[precision])
        ratio = achieved / peak
        runs = ", ".join(f"{s:.2f}" for s in fit_seconds[name])
        print(
            f"{name}: {seconds:.2f} s per epoch (runs: {runs}) = {args.rows * len(configs) / seconds:.0f} "
            f"config-samples/s = {achieved / 1e9:.0f} GFLOP/s; {precision} matmul {peak / 1e9:.0f} GFLOP/s "
            f"(runs: {', '.join(f'{p / 1e9:.0f}' for p in peaks[precision])})"
        )
        counts = precision == "fp32" or bf16_is_fast(device)
        verdict = (
            ("meets" if ratio >= TARGETS[precision] else "BELOW") if counts else "for information: bf16 not fast here"
        )
        print(
            f"RATIO {name}: head training / {precision} matmul FLOP/s = {ratio:.3f} ({verdict}, target {TARGETS[precision]})"
        )
    for name in modes:
        if name.startswith("bf16"):
            fp32 = statistics.median(fit_seconds[name.replace("bf16", "fp32")])
            print(
                f"SPEED-UP {name.removeprefix('bf16 ')}: bf16 / fp32 samples/s = {fp32 / statistics.median(fit_seconds[name]):.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
