"""A prepared check of every GPU path of the pipeline, for one GPU machine with no network.

Written to take under 8 minutes on an H200 (a guess until it has run on one:
no GPU was at hand when it was written; ``--checks`` and the size options
run a part of it).

Everything is made here: a random-weight CLIP vision tower of the ViT-L/14
shape (hidden 1024, 24 layers, 16 heads, patch 14, image 224, MLP 4096) saved
with ``save_pretrained`` and loaded by path as users load a hub id; random
256x256 PNGs with their manifest; synthetic feature stores written with
``cache.write_store``. Each check catches its own exception and prints one
line, ``PASS``, ``FAIL`` (with the reason) or ``SKIP`` (with the reason), so
that one broken path does not hide the others; a summary table (check,
result, number, target) ends the run, and the exit status is 1 if any check
failed.

Checks, in the order they run:

* dropout generator: ``HalfMasks`` on a generator of the device: the same
  seed gives the same masks, another seed others, entries 0 or 2, half kept;
* fused Adam: ``train.make_adam`` on the device is the fused kernel and
  three steps equal torch's reference Adam (and on CUDA its capturable form
  too);
* features on the device: a store's variant read whole onto the device
  (``InMemoryFeatures``) and streamed from the shard files
  (``StreamedFeatures``) gather exactly the rows ``cache.read_features`` reads;
* fused trainer: a group of 4 configs (xi 0.1-0.8) trained together on the
  device equals each config trained alone (val logits and losses; the
  weight difference is printed);
* CUDA graphs (CUDA only): the same group replayed from a captured CUDA graph
  equals its eager training, in float32 and in bf16;
* out-of-core training: ``run_grid`` with ``--memory-budget 1`` (every batch
  gathered from the shard files) writes the same results as in memory;
* fp16 extraction (CUDA only): ``run_extract`` in float16 gives finite
  features within 2 % of a float32 forward of the same images;
* extraction speed: ``run_extract`` (PNG decoding, crop, forward in float16
  on a GPU, write; its wall time less the backbone load, timed apart) vs the
  bare ``Backbone.forward_taps`` on the same pre-decoded batches, images/s
  and their ratio (target >= 2,500 img/s on an H200);
* torchrun: ``torchrun --nproc-per-node 2 -m pipeline extract`` with both
  ranks on the one device gives a store bit-identical to one process's (on
  the CPU only when named in ``--checks``: it costs three interpreter
  start-ups);
* grid: the paper's 48-config 4-class grid (``pipeline fit`` through
  ``grid.run_grid``, one epoch, batch 128) on a synthetic training store of
  the real size (144k x 24 x 1024 float16, ~7 GB, written at disk speed from
  a pool of random rows) with val and test stores, in float32 (the default,
  as the authors: no TF32): wall time (target <= 60 s on an H200, set when
  the grid trained in bf16; the float32 time is what to learn), peak GPU
  memory, and on CUDA every group replayed from a CUDA graph.

Targets are judged only on a full-size run on a GPU; ``--quick`` (small
sizes) and ``--cpu`` runs print them as not judged. ``--quick --cpu`` runs
in well under a minute on a 2-core CPU (``tests/test_gpu_check.py``); there
the CUDA-only checks print SKIP.

    python benchmarks/gpu_check.py                     # on the GPU machine: every check at full size
    python benchmarks/gpu_check.py --quick --cpu       # anywhere: small sizes, CUDA-only checks skipped
    python benchmarks/gpu_check.py --checks grid --grid-rows 40000   # one check, a smaller store
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _common import (
    VIT_L14_SHAPE,
    add_scratch_options,
    premade_center_batches,
    print_machine,
    quiet_transformers,
    save_random_clip,
    scratch_dir,
    write_folder_images,
    write_folder_manifest,
)

from pipeline import cache
from pipeline.features import Backbone, BackboneConfig, ExtractConfig, run_extract
from pipeline.heads import FitConfig, RunConfig, StoreRef, parse_grid, run_grid, scoring, stores, train
from pipeline.heads.head_stack import HalfMasks
from pipeline.names import DEFAULT_SHARD_ROWS
from pipeline.variants import VariantGroup

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
EXTRACT_TARGET = 2500.0  # img/s, run_extract in float16 on an H200
GRID_TARGET = 60.0  # seconds, the 48-config 4-class grid on an H200
QUICK_SHAPE = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=8, image_size=32, intermediate_size=64
)
FOUR_CLASSES = ("car", "cat", "chair", "horse")
PAPER_GRID_YAML = """\
name: gpu-check
data:
  model: synthetic
  train: {{store: {train}}}
  val: {{store: {val}}}
  test: [{{store: {test}}}]
base: {{epochs: 1, batch_size: 128, lr: 0.001, seed: 0, classes: [car, cat, chair, horse]}}
grid:
  contrastive_factor: [0.1, 0.2, 0.4, 0.8]
  proj_layers: [1, 2, 4]
  proj_dim: {proj_dims}
"""
OUT_OF_CORE_YAML = """\
name: gpu-check-out-of-core
data:
  model: synthetic
  train: {{store: {train}}}
  val: {{store: {val}}}
  test: [{{store: {test}}}]
base: {{epochs: 1, batch_size: 128, proj_layers: 1, proj_dim: 128}}
grid:
  contrastive_factor: [0.1, 0.2, 0.4, 0.8]
"""


# ----------------------------------------------------------------------------- options and sizes


@dataclass(frozen=True)
class Sizes:
    """How big each check's data is (full: the real sizes; ``--quick``: small)."""

    images: int  # PNGs extracted by the speed check
    image_side: int
    batch: int  # backbone batch
    workers: int  # decode threads
    rounds: int  # timed rounds of the speed check
    small_images: int  # PNGs of the fp16 and torchrun checks
    shard_rows: int  # rows per shard of their stores (the unit the ranks share)
    grid_rows: int  # training rows of the grid's store
    eval_rows: int  # rows of the grid's val and test stores
    blocks: int  # blocks x dim of the synthetic stores
    dim: int
    train_rows: int  # rows of the fused-trainer and out-of-core stores
    proj_dim: int  # d' of the fused-trainer group
    grid_proj_dims: tuple[int, ...]  # the grid's d' values (the paper's; quick: 16 times smaller)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Small sizes everywhere (a tiny CLIP, a small store).")
    parser.add_argument(
        "--cpu", action="store_true", help="Run on the CPU even if there is a GPU; CUDA-only checks SKIP."
    )
    parser.add_argument(
        "--checks",
        default="all",
        help=f"Comma list of checks to run (default all): {', '.join(CHECKS)}.",
    )
    parser.add_argument("--images", type=int, help="PNGs of the speed check [8192; quick 48].")
    parser.add_argument("--batch", type=int, help="Backbone batch size [256; quick 16].")
    parser.add_argument("--workers", type=int, help=f"Decode threads of run_extract [{min(16, os.cpu_count() or 1)}].")
    parser.add_argument("--rounds", type=int, help="Timed rounds of the speed check, after one untimed [2; quick 1].")
    parser.add_argument(
        "--grid-rows", type=int, help="Training rows of the grid's store [144000, the 4-class set; quick 512]."
    )
    parser.add_argument("--eval-rows", type=int, help="Rows of the grid's val and of its test store [8000; quick 256].")
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds the torchrun check may take.")
    add_scratch_options(parser)
    args = parser.parse_args(argv)
    unknown = set(args.checks.split(",")) - set(CHECKS) - {"all"}
    if unknown:
        parser.error(f"--checks: unknown {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    return args


def resolve_sizes(args: argparse.Namespace) -> Sizes:
    quick = args.quick
    workers = args.workers or min(16, os.cpu_count() or 1)
    return Sizes(
        images=args.images or (48 if quick else 8192),
        image_side=64 if quick else 256,
        batch=args.batch or (16 if quick else 256),
        workers=workers,
        rounds=args.rounds or (1 if quick else 2),
        small_images=24 if quick else 1024,
        shard_rows=8 if quick else 128,
        grid_rows=args.grid_rows or (512 if quick else 144_000),
        eval_rows=args.eval_rows or (256 if quick else 8000),
        blocks=4 if quick else 24,
        dim=32 if quick else 1024,
        train_rows=512 if quick else 4096,
        proj_dim=32 if quick else 256,
        grid_proj_dims=(8, 16, 32, 64) if quick else (128, 256, 512, 1024),
    )


# ----------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    """What a check found: its status, the number it measured, its target, and why (for FAIL and SKIP)."""

    status: str
    number: str = ""
    target: str = ""
    reason: str = ""


class CheckFailed(AssertionError):
    """A check whose result is wrong (as opposed to one that crashed)."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def judged(ctx: Context, value: float, target: float, better: str, unit: str) -> Outcome:
    """PASS, or FAIL when the run is judged (full size on a GPU) and ``value`` misses ``target``."""
    sign = ">=" if better == "higher" else "<="
    met = value >= target if better == "higher" else value <= target
    if not ctx.judges_targets:
        return Outcome(PASS, target=f"{sign} {target:g} {unit} (H200, full size; not judged here)")
    if met:
        return Outcome(PASS, target=f"{sign} {target:g} {unit}")
    return Outcome(FAIL, target=f"{sign} {target:g} {unit}", reason="misses its target")


# ----------------------------------------------------------------------------- shared data, made on first use


class Context:
    """The device, the sizes, and the data several checks share, each made once on first use."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.work = work
        self.quick = args.quick
        self.sizes = resolve_sizes(args)
        self.timeout = args.timeout
        self.named = set() if args.checks == "all" else set(args.checks.split(","))  # asked for by name
        self.device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda:0")
        self.cuda = self.device.type == "cuda"
        self.judges_targets = self.cuda and not args.quick
        self.extract_dtype = "float16" if self.cuda else "float32"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @functools.cached_property
    def model_dir(self) -> Path:
        """A random CLIP vision tower of the ViT-L/14 shape (quick: tiny), saved as a hub checkpoint is."""
        return save_random_clip(self.work / "clip-random", **(QUICK_SHAPE if self.quick else VIT_L14_SHAPE))

    @functools.cached_property
    def speed_manifest(self) -> Path:
        return self._png_manifest("speed", self.sizes.images)

    @functools.cached_property
    def small_manifest(self) -> Path:
        return self._png_manifest("small", self.sizes.small_images)

    def _png_manifest(self, split: str, count: int) -> Path:
        """``count`` random PNGs (64 distinct ones, copied: decoding costs the same) and their manifest."""
        root = self.work / "data" / split
        distinct = min(count, 64)
        write_folder_images(root, distinct, self.sizes.image_side, seed=len(split))
        files = sorted(root.rglob("*.png"))
        for i in range(distinct, count):
            source = files[i % distinct]
            shutil.copyfile(source, source.parent / f"img_{i:06d}.png")
        return write_folder_manifest(root, self.work / "manifests", split)

    def backbone_config(self, dtype: str | None = None) -> BackboneConfig:
        return BackboneConfig(model=str(self.model_dir), device=str(self.device), dtype=dtype or self.extract_dtype)

    def extract_config(self, split: str, manifest: Path, out: Path, shard_rows: int) -> ExtractConfig:
        """``run_extract`` into ``out`` (batches never span shards: shards of at least a batch for speed)."""
        return ExtractConfig(
            split=split, manifest=manifest, backbone=self.backbone_config(), out=out, batch_size=self.sizes.batch,
            decode_workers=self.sizes.workers, shard_rows=shard_rows, chunk_rows=shard_rows, variant_group=VariantGroup.center(),
            overwrite=True, progress=False,
        )  # fmt: skip

    @functools.cached_property
    def small_val(self) -> stores.LoadedStore:
        return stores.load_store(StoreRef("val", self.small_stores["val"]), self.device)

    @functools.cached_property
    def small_stores(self) -> dict[str, Path]:
        """Synthetic 2-class train (``train_rows``), val and test (a quarter of it each) stores."""
        s = self.sizes
        rows = {"train": s.train_rows, "val": max(128, s.train_rows // 4), "test": max(128, s.train_rows // 4)}
        return {
            name: write_pooled_store(self.work / "small" / f"{name}.zarr", count, s.blocks, s.dim, seed=seed)
            for seed, (name, count) in enumerate(rows.items())
        }


@dataclass(frozen=True)
class PooledRows:
    """Feature rows picked from a pool of random rows per label (fakes shifted along one direction).

    ``rows[start:stop]`` is a gather from the pools, so a store of many GB is
    written at the speed of the disk rather than of a random generator; the
    label is learnable (the shift), and rows repeat every pool size.
    """

    pools: tuple[np.ndarray, np.ndarray]  # real, fake: (P, n_blocks, dim) float16
    labels: np.ndarray  # (N,) 0 or 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.labels), *self.pools[0].shape[1:])

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self.labels))
        index = np.arange(start, stop)
        pick = (index * 7919) % len(self.pools[0])  # a prime stride: neighbouring rows differ
        out = np.empty((len(index), *self.shape[1:]), dtype=np.float16)
        fake = self.labels[index] == 1
        out[~fake] = self.pools[0][pick[~fake]]
        out[fake] = self.pools[1][pick[fake]]
        return out


def make_pools(blocks: int, dim: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    real = rng.standard_normal((size, blocks, dim), dtype=np.float32)
    direction = rng.standard_normal(dim, dtype=np.float32)
    fake = rng.standard_normal((size, blocks, dim), dtype=np.float32) + 0.5 * direction
    return real.astype(np.float16), fake.astype(np.float16)


def write_pooled_store(path: Path, n_rows: int, blocks: int, dim: int, seed: int, classes: bool = False) -> Path:
    """A complete synthetic store (variant ``center``, half fakes, dataset ``progan``), via ``cache.write_store``.

    ``classes``: a class column cycling through the 4-class setting's classes.
    """
    labels = np.arange(n_rows) % 2
    pools = make_pools(blocks, dim, min(n_rows, 2048), seed)
    shard_rows = min(1024, n_rows)
    chunk_rows = next(c for c in (256, 128, 64, 32, 16, 8, 4, 2, 1) if shard_rows % c == 0)
    return cache.write_store(
        path,
        cache.placeholder_identity(blocks, dim, shard_rows=shard_rows, chunk_rows=chunk_rows),
        split=path.stem,
        labels=[int(v) for v in labels],
        paths=[f"{path.stem}/img_{i:07d}.png" for i in range(n_rows)],
        datasets=["progan"] * n_rows,
        classes=[FOUR_CLASSES[(i // 2) % 4] for i in range(n_rows)] if classes else None,
        features={"center": PooledRows(pools, labels)},
    )


def max_relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest |a - b| / max|b| over pairs of tensors."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)))
    return worst


# ----------------------------------------------------------------------------- the checks


def check_dropout_generator(ctx: Context) -> Outcome:
    shapes = [(4096, 256), (128, 256), (100, 3)]  # the last not a multiple of 32 bits

    def draw(seed: int) -> list[torch.Tensor]:
        masks = HalfMasks(torch.Generator(device=ctx.device).manual_seed(seed), ctx.device, torch.float32)
        return [m.clone() for m in masks.draw(shapes)] + [m.clone() for m in masks.draw(shapes)]

    first, again, other = draw(7), draw(7), draw(8)
    require(all(m.device.type == ctx.device.type for m in first), "masks are not on the device")
    require(all(torch.equal(a, b) for a, b in zip(first, again)), "the same seed gave different masks")
    require(not torch.equal(first[0], other[0]), "two seeds gave the same masks")
    require(not torch.equal(first[0], first[3]), "two draws of one generator gave the same masks")
    values = torch.cat([m.flatten() for m in first])
    require(bool(((values == 0) | (values == 2)).all()), "mask entries other than 0 and 2")
    kept = float((values == 2).double().mean())
    require(abs(kept - 0.5) < 0.01, f"{kept:.4f} of the units kept, expected 0.5")
    return Outcome(PASS, number=f"{kept:.4f} kept of {values.numel():,} ({ctx.device})")


def check_fused_adam(ctx: Context) -> Outcome:
    def make_module() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))

    torch.manual_seed(0)
    initial = make_module().state_dict()
    kinds = ("reference", "fused", "capturable") if ctx.cuda else ("reference", "fused")
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).to(ctx.device)
    results = {}
    for kind in kinds:
        module = make_module()
        module.load_state_dict(initial)
        module.to(ctx.device)
        if kind == "reference":
            optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, foreach=False, fused=False)
        else:
            optimizer = train.make_adam(module, 1e-3, capturable=kind == "capturable")
            require(optimizer.defaults.get("fused") is True, f"make_adam ({kind}) did not pick the fused kernel")
        for _ in range(3):
            optimizer.zero_grad()
            module(x).square().mean().backward()
            optimizer.step()
        results[kind] = list(module.parameters())
    worst = max(max_relative_difference(results[kind], results["reference"]) for kind in kinds[1:])
    require(worst < 1e-5, f"fused Adam differs from the reference by {worst:.2e} (relative)")
    return Outcome(PASS, number=f"{' and '.join(kinds[1:])} = reference to {worst:.1e} ({ctx.device})")


def check_features_on_device(ctx: Context) -> Outcome:
    path = ctx.small_stores["val"]
    expected = cache.read_features(path, "center")
    rows = torch.from_numpy(np.random.default_rng(0).permutation(len(expected))[:300])
    ref = StoreRef("val", path)
    sources = {
        "in memory": stores.open_variant(ref, "center", ctx.device, in_memory=True),
        "streamed": stores.open_variant(ref, "center", ctx.device, in_memory=False),
    }
    require(isinstance(sources["in memory"], stores.InMemoryFeatures), "not read whole")
    require(sources["in memory"].tensor.device.type == ctx.device.type, "features read whole are not on the device")
    for name, source in sources.items():
        got = source.gather(rows)
        require(got.device.type == ctx.device.type, f"{name}: gathered rows are not on the device")
        require(np.array_equal(got.cpu().numpy(), expected[rows.numpy()]), f"{name}: rows differ from the store's")
    return Outcome(PASS, number=f"{len(rows)} rows in memory and streamed = read_features ({ctx.device})")


def fused_group_configs(ctx: Context, amp: str = "none") -> list[RunConfig]:
    return [
        RunConfig(contrastive_factor=xi, proj_layers=2, proj_dim=ctx.sizes.proj_dim, amp=amp, seed=3)
        for xi in (0.1, 0.2, 0.4, 0.8)
    ]


def fit_small_group(ctx: Context, configs: list[RunConfig], cuda_graphs: bool) -> train.GroupFit:
    store = stores.open_train_store(StoreRef("train", ctx.small_stores["train"]), ctx.device)
    try:
        return train.fit_group(store, configs, device=ctx.device, cuda_graphs=cuda_graphs)
    finally:
        store.view_cache.close()


def compare_fits(ctx: Context, fits: list[train.GroupFit], reference: list[train.GroupFit]) -> dict[str, float]:
    """How far heads trained one way are from the same heads trained another (each side: fits of one or more heads).

    ``logits``: the largest difference of their val logits over the spread
    (std) of the reference's, the measure the checks judge (float rounding
    moves it by ~1e-6 in float32; a wrong mask or batch by ~1); ``losses``:
    relative difference of the training losses; ``weights``: largest weight
    difference relative to the tensor's largest value (reported only: Adam
    turns the rounding of a near-zero gradient into a full step).
    """

    def side(group: list[train.GroupFit]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        val = ctx.small_val
        rows = np.arange(len(val.rows))
        logits = torch.cat([scoring.group_logits(fit.stack, val, rows, fit.configs[0])[..., 0] for fit in group])
        losses = torch.tensor([loss for fit in group for loss in fit.epoch_losses])
        weights = [torch.cat(tensors) for tensors in zip(*(fit.stack.parameters() for fit in group), strict=True)]
        return logits, losses, weights

    (logits, losses, weights), (want_logits, want_losses, want_weights) = side(fits), side(reference)
    return {
        "logits": float((logits - want_logits).abs().max() / want_logits.std()),
        "losses": max_relative_difference([losses], [want_losses]),
        "weights": max_relative_difference(weights, want_weights),
    }


def describe(difference: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.1e}" for name, value in difference.items())


def check_fused_trainer(ctx: Context) -> Outcome:
    configs = fused_group_configs(ctx)
    fused = fit_small_group(ctx, configs, cuda_graphs=False)
    alone = [fit_small_group(ctx, [config], cuda_graphs=False) for config in configs]
    difference = compare_fits(ctx, [fused], alone)
    require(
        difference["logits"] < 1e-3 and difference["losses"] < 1e-4,
        f"a group of 4 differs from its configs trained alone: {describe(difference)}",
    )
    steps = -(-fused.n_train // configs[0].batch_size)
    return Outcome(PASS, number=f"group of 4 = alone after {steps} steps: {describe(difference)} ({ctx.device})")


def check_cuda_graphs(ctx: Context) -> Outcome:
    if not ctx.cuda:
        return Outcome(SKIP, reason="CUDA graphs exist on CUDA only")
    found = []
    for amp, tolerance in (("none", 1e-3), ("bf16", 1e-2)):
        configs = fused_group_configs(ctx, amp)
        eager = fit_small_group(ctx, configs, cuda_graphs=False)
        graphed = fit_small_group(ctx, configs, cuda_graphs=True)
        require(graphed.cuda_graph, f"amp {amp}: the step was not captured (see the RuntimeWarning above)")
        difference = compare_fits(ctx, [graphed], [eager])
        require(difference["logits"] < tolerance, f"amp {amp}: replayed vs eager steps: {describe(difference)}")
        found.append(f"{amp}: {describe(difference)}")
    return Outcome(PASS, number="replayed = eager; " + "; ".join(found))


def check_out_of_core(ctx: Context) -> Outcome:
    text = OUT_OF_CORE_YAML.format(**ctx.small_stores)
    tables, placements = {}, {}
    for mode, budget in (("in memory", None), ("out of core", 1)):
        spec = parse_grid(text, out=ctx.work / "out-of-core" / mode.replace(" ", "-"))
        summary = run_grid(spec, FitConfig(device=str(ctx.device), progress=False, memory_budget=budget))
        require(summary.n_errors == 0, f"{mode}: {summary.n_errors} runs failed; see {summary.results}")
        tables[mode] = [{k: v for k, v in row.items() if k != "fit_seconds"} for row in read_csv(summary.results)]
        fit_json = next((spec.out / "runs").glob("*/fit.json")).read_text()
        placements[mode] = '"train": "streamed"' in fit_json
    require(not placements["in memory"] and placements["out of core"], f"features placed as {placements}")
    require(tables["in memory"] == tables["out of core"], "results.csv differ between in-memory and out-of-core")
    return Outcome(PASS, number=f"streamed = in memory ({len(tables['in memory'])} result rows, {ctx.device})")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def check_fp16_extraction(ctx: Context) -> Outcome:
    if not ctx.cuda:
        return Outcome(SKIP, reason="float16 extraction runs on CUDA (float32 on the CPU)")
    store = ctx.work / "fp16" / "small.zarr"
    summary = run_extract(ctx.extract_config("small", ctx.small_manifest, store, ctx.sizes.shard_rows))
    require(summary.n_invalid == 0, f"{summary.n_invalid} images could not be used")
    features = cache.read_features(store, "center")
    require(bool(np.isfinite(features).all()), "non-finite float16 features")
    backbone = Backbone(ctx.backbone_config("float32"))
    batches = premade_center_batches(ctx.small_manifest, backbone.crop_size, ctx.sizes.batch)[:2]
    reference = torch.cat([backbone.forward_taps(b, ("ln2",))["ln2"].float().cpu() for b in batches]).numpy()
    got = features[: len(reference)].astype(np.float32)
    error = float(np.abs(got - reference).max() / np.abs(reference).max())
    require(error < 0.02, f"float16 features differ from float32 ones by {error:.2e} (relative to the largest)")
    return Outcome(PASS, number=f"{len(features)} rows, finite; vs float32 {error:.1e} of the largest value")


def check_extraction_speed(ctx: Context) -> Outcome:
    """Images/s of ``run_extract`` once loaded (its wall time less the backbone load, which a real split of
    hundreds of thousands of images amortises) against the bare forward; the end-to-end rate is printed too."""
    s = ctx.sizes
    manifest = ctx.speed_manifest
    config = ctx.extract_config("speed", manifest, ctx.work / "speed" / "speed.zarr", DEFAULT_SHARD_ROWS)
    Backbone(config.backbone)  # the first load reads the weights from disk; the next ones from the page cache
    start = time.perf_counter()
    backbone = Backbone(config.backbone)  # the load, as run_extract does it first
    load = time.perf_counter() - start
    batches = premade_center_batches(manifest, backbone.crop_size, s.batch)

    def bare() -> float:
        ctx.sync()
        start = time.perf_counter()
        for pixels in batches:
            backbone.forward_taps(pixels, ("ln2",))
        ctx.sync()
        return time.perf_counter() - start

    def end_to_end() -> float:
        start = time.perf_counter()
        summary = run_extract(config)
        require(summary.images_processed == s.images, f"{summary.images_processed} of {s.images} images extracted")
        return time.perf_counter() - start

    bare(), end_to_end()  # warm-up: kernels, page cache
    bare_seconds, extract_seconds = [], []
    for _ in range(s.rounds):  # alternating, so that other load hits both alike
        bare_seconds.append(bare())
        extract_seconds.append(end_to_end())
    bare_rate = s.images / min(bare_seconds)
    rate = s.images / max(min(extract_seconds) - load, 1e-9)
    outcome = judged(ctx, rate, EXTRACT_TARGET, "higher", "img/s")
    number = f"{rate:,.0f} img/s loaded, bare forward {bare_rate:,.0f} img/s, ratio {rate / bare_rate:.2f}"
    print(
        f"  extraction speed: {number}; end to end {s.images / min(extract_seconds):,.0f} img/s with the backbone "
        f"load ({load:.1f} s); {ctx.extract_dtype}, batch {s.batch}, {s.workers} decode threads, {s.images} PNGs"
    )
    return dataclasses.replace(outcome, number=number)


def check_torchrun(ctx: Context) -> Outcome:
    if not ctx.cuda and "torchrun" not in ctx.named:
        return Outcome(
            SKIP,
            reason="on the CPU only when named (--checks torchrun: three interpreter start-ups); "
            "tests/test_distributed.py covers CPU ranks",
        )
    manifest, model = ctx.small_manifest, ctx.model_dir
    # An explicit cuda:0: both ranks share the one GPU (``cuda`` would mean cuda:LOCAL_RANK). A batch is a
    # whole shard, so that every forward has the same shape whichever rank runs it: the same kernels.
    device = "cuda:0" if ctx.cuda else "cpu"

    def command(out: Path) -> list[str]:
        s = ctx.sizes
        return [
            "-m", "pipeline", "extract", "--split", "small", "--manifest", str(manifest), "--model", str(model),
            "--out", str(out), "--device", device, "--dtype", ctx.extract_dtype, "--batch-size", str(s.shard_rows),
            "--shard-rows", str(s.shard_rows), "--chunk-rows", str(s.shard_rows), "--workers", "2", "--no-progress",
        ]  # fmt: skip

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    stores = {"one process": ctx.work / "torchrun" / "one.zarr", "2 ranks": ctx.work / "torchrun" / "ranks.zarr"}
    launchers = {
        "one process": [sys.executable],
        "2 ranks": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
    }
    seconds = {}
    for name, launcher in launchers.items():
        start = time.perf_counter()
        result = subprocess.run(
            [*launcher, *command(stores[name])], env=env, capture_output=True, text=True, timeout=ctx.timeout
        )
        seconds[name] = time.perf_counter() - start
        require(result.returncode == 0, f"{name} exited {result.returncode}: {result.stderr.strip()[-600:]}")
    differences = store_differences(stores["2 ranks"], stores["one process"])
    require(not differences, "the 2-rank store differs from the one-process store: " + "; ".join(differences))
    problems = cache.verify_store(stores["2 ranks"])
    require(not problems, "cache verify: " + "; ".join(problems))
    n_shards = cache.shard_count(ctx.sizes.small_images, ctx.sizes.shard_rows)
    return Outcome(
        PASS,
        number=f"{n_shards} shards bit-identical to one process ({seconds['2 ranks']:.0f} s vs "
        f"{seconds['one process']:.0f} s with start-up, {device})",
    )


def store_differences(store: Path, reference: Path) -> list[str]:
    """What differs between two stores of one split: row metadata, features, progress flags."""
    differences = []
    mine, theirs = cache.read_rows(store), cache.read_rows(reference)
    for name in ("labels", "paths", "datasets", "valid", "errors"):
        if not np.array_equal(getattr(mine, name), getattr(theirs, name)):
            differences.append(name)
    got, want = cache.read_features(store, "center"), cache.read_features(reference, "center")
    if got.dtype != want.dtype or not np.array_equal(got, want):
        worst = float(np.abs(got.astype(np.float32) - want.astype(np.float32)).max()) if got.shape == want.shape else -1
        differences.append(f"features (largest difference {worst:.3g})")
    flags = cache.open_store_info(store).shard_flags, cache.open_store_info(reference).shard_flags
    if {k: v.tolist() for k, v in flags[0].items()} != {k: v.tolist() for k, v in flags[1].items()}:
        differences.append("progress flags")
    return differences


def check_grid(ctx: Context) -> Outcome:
    s = ctx.sizes
    folder = ctx.work / "grid"
    start = time.perf_counter()
    stores = {
        "train": write_pooled_store(folder / "train.zarr", s.grid_rows, s.blocks, s.dim, seed=10, classes=True),
        "val": write_pooled_store(folder / "val.zarr", s.eval_rows, s.blocks, s.dim, seed=11, classes=True),
        "test": write_pooled_store(folder / "test.zarr", s.eval_rows, s.blocks, s.dim, seed=12),
    }
    write_seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in stores["train"].rglob("*") if f.is_file())
    print(f"  grid: stores written in {write_seconds:.1f} s (training store {size / 1e9:.2f} GB)")
    spec = parse_grid(PAPER_GRID_YAML.format(**stores, proj_dims=list(s.grid_proj_dims)), out=folder / "runs")
    require(len(spec.runs) == 48, f"{len(spec.runs)} configs, expected 48")
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    start = time.perf_counter()
    summary = run_grid(spec, FitConfig(device=str(ctx.device), progress=False))
    wall = time.perf_counter() - start
    require(summary.n_errors == 0, f"{summary.n_errors} runs failed; see {summary.results}")
    fits = [json.loads(path.read_text()) for path in (spec.out / "runs").glob("*/fit.json")]
    require(len(fits) == 48, f"{len(fits)} run folders, expected 48")
    group_seconds = {tuple(f["group"]["runs"]): f["group"]["fit_seconds"] for f in fits}
    graphs = {tuple(f["group"]["runs"]) for f in fits if f["group"]["cuda_graph"]}
    fit_seconds = sum(group_seconds.values())
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated(ctx.device) / 2**30:.1f} GiB" if ctx.cuda else ""
    amp = fits[0]["amp"]
    number = (
        f"{wall:.1f} s wall ({fit_seconds:.1f} s fitting, {len(group_seconds)} groups, {len(graphs)} from CUDA graphs, "
        f"amp {amp}){peak}"
    )
    print(f"  grid: {number}; {s.grid_rows:,} x {s.blocks} x {s.dim} training rows, {s.eval_rows:,} val and test rows")
    if ctx.cuda:
        require(
            len(graphs) == len(group_seconds), f"only {len(graphs)} of {len(group_seconds)} groups used CUDA graphs"
        )
    return dataclasses.replace(judged(ctx, wall, GRID_TARGET, "lower", "s"), number=number)


CHECKS: dict[str, Callable[[Context], Outcome]] = {
    "dropout": check_dropout_generator,
    "adam": check_fused_adam,
    "features": check_features_on_device,
    "fused": check_fused_trainer,
    "graphs": check_cuda_graphs,
    "out-of-core": check_out_of_core,
    "fp16": check_fp16_extraction,
    "extract": check_extraction_speed,
    "torchrun": check_torchrun,
    "grid": check_grid,
}
TITLES = {
    "dropout": "dropout generator",
    "adam": "fused Adam",
    "features": "features on the device",
    "fused": "fused trainer",
    "graphs": "CUDA graphs",
    "out-of-core": "out-of-core training",
    "fp16": "fp16 extraction",
    "extract": "extraction speed",
    "torchrun": "torchrun 2 ranks, one device",
    "grid": "grid, 48 configs, 4-class",
}


# ----------------------------------------------------------------------------- running and reporting


def run_check(ctx: Context, name: str) -> Outcome:
    """One check, its exception turned into a FAIL with the reason; prints its line."""
    start = time.perf_counter()
    try:
        outcome = CHECKS[name](ctx)
    except Exception as error:  # noqa: BLE001 - every check reports, whatever broke
        if not isinstance(error, CheckFailed):
            traceback.print_exc(file=sys.stdout)
        outcome = Outcome(FAIL, reason=f"{type(error).__name__}: {error}".replace("\n", " "))
    finally:
        if ctx.cuda:
            torch.cuda.empty_cache()
    detail = outcome.number if outcome.status == PASS else outcome.reason
    if outcome.status == FAIL and outcome.number:
        detail = f"{outcome.number}: {outcome.reason}"
    print(f"{outcome.status} {TITLES[name]}: {detail} [{time.perf_counter() - start:.1f} s]", flush=True)
    return outcome


def print_summary(outcomes: dict[str, Outcome]) -> None:
    rows = [("check", "result", "number", "target")]
    rows += [(TITLES[name], o.status, o.number or o.reason, o.target or "-") for name, o in outcomes.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print("SUMMARY")
    for row in rows:
        print("  " + " | ".join(value.ljust(width) for value, width in zip(row[:3], widths)) + " | " + row[3])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_transformers()
    print_machine()
    names = list(CHECKS) if args.checks == "all" else [n for n in CHECKS if n in args.checks.split(",")]
    start = time.perf_counter()
    with scratch_dir(args, "gpu_check_") as work:
        ctx = Context(args, work)
        gpu = f", {torch.cuda.get_device_name(ctx.device)}" if ctx.cuda else ""
        print(
            f"device {ctx.device}{gpu}; {'quick' if ctx.quick else 'full'} sizes: {ctx.sizes}; "
            f"targets {'judged' if ctx.judges_targets else 'not judged (quick or CPU run)'}",
            flush=True,
        )
        outcomes = {name: run_check(ctx, name) for name in names}
    print_summary(outcomes)
    failed = [TITLES[name] for name, outcome in outcomes.items() if outcome.status == FAIL]
    print(f"{len(failed)} of {len(outcomes)} checks failed{': ' + ', '.join(failed) if failed else ''}; "
          f"{time.perf_counter() - start:.0f} s in all")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
