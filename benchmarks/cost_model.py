"""The cost model of docs/cost-model.md: its formulas, checked against runs measured here, and the cost
of a full reproduction on 1, 8 and 64 GPUs.

Formulas (F = forward FLOPs, from the shapes; the rates are measured here or assumed for GPUs):

* extraction seconds = load + images x views x per-image cost / devices, per-image cost = F_backbone / R_backbone
  plus decoding (c_decode per core: on a CPU both share the cores and add up; on a GPU host the two overlap and
  the slower one sets the pace: max(F / R_gpu, c_decode / cores per GPU));
* store bytes = rows x views x blocks x dim x 2 (float16);
* fit seconds = sum over fused groups of rows x epochs x (c_group + G x 3 F_head / R_head): one pass of
  the group's data (gather, cast, input dropout) plus the matmuls of its G heads (training = 3 x forward);
* fit memory = the training view in memory (two when runs read several views) + the evaluation stores +
  4 x the group's parameters (weights, gradients, Adam's two moments) + its activations, or, above
  ``--memory-budget``, the budget (batches streamed from the shard files).

The check: constants are fitted on calibration runs (extraction of ViT-B/16-shaped center crops; a grid of two
head shapes) and predict other runs (a 6-layer ViT-L/14 shape with augmented views; a grid of two other head
shapes, groups of 4, twice the rows), which are then measured: the script prints predicted / measured for each,
and for ViT-B/32 (small matmuls, where a CPU runs well below its FLOP rate: outside the model's domain).

    .venv/bin/python benchmarks/cost_model.py                # measure (~7 min on a 2-core CPU), check, plan
    .venv/bin/python benchmarks/cost_model.py --plan-only    # the reproduction's cost from the constants only
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
from _common import (
    add_scratch_options,
    print_machine,
    quiet_transformers,
    save_random_clip,
    scratch_dir,
    write_folder_images,
    write_folder_manifest,
    write_synthetic_store,
)

from pipeline.features import Backbone, BackboneConfig, ExtractConfig, run_extract
from pipeline.heads import RunConfig, StoreRef, train
from pipeline.heads.stores import open_train_store
from pipeline.variants import VariantGroup


@dataclass(frozen=True)
class BackboneShape:
    """A CLIP vision tower's shape: what its forward costs and what a row of its store weighs."""

    name: str
    hidden: int
    layers: int
    patch: int
    image: int
    mlp: int

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1

    def forward_flops(self) -> float:
        """Matmul FLOPs of one image: per layer 2T(4d^2 + 2 d m) for the projections and MLP, 4 T^2 d for
        attention; plus the patch embedding."""
        t, d = self.tokens, self.hidden
        per_layer = 2 * t * (4 * d * d + 2 * d * self.mlp) + 4 * t * t * d
        return self.layers * per_layer + 2 * (t - 1) * 3 * self.patch**2 * d

    def row_bytes(self) -> int:
        """One stored row: the CLS token of every block, float16."""
        return self.layers * self.hidden * 2

    def clip_config(self) -> dict[str, int]:
        """The ``CLIPVisionConfig`` keywords of a random tower of this shape (CLIP's heads are 64 wide)."""
        return dict(hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.hidden // 64,
                    patch_size=self.patch, image_size=self.image, intermediate_size=self.mlp)  # fmt: skip


VIT_L14 = BackboneShape("ViT-L/14", 1024, 24, 14, 224, 4096)
VIT_B16 = BackboneShape("ViT-B/16", 768, 12, 16, 224, 3072)
VIT_B32 = BackboneShape("ViT-B/32", 768, 12, 32, 224, 3072)
PAPER_BACKBONES = (VIT_L14, VIT_B32)  # the two backbones of the paper's tables
PAPER_SHAPES = [(q, width) for q in (1, 2, 4) for width in (128, 256, 512, 1024)]  # x 4 xi = the 48 configs


def head_flops(blocks: int, dim: int, q: int, width: int) -> float:
    """Forward FLOPs of one RINE head on one sample: proj1 on every block token, proj2 and the classifier once."""
    return 2 * (blocks * (dim * width + (q - 1) * width**2) + q * width**2 + 2 * width**2 + width)


def head_parameters(blocks: int, dim: int, q: int, width: int) -> int:
    return blocks * width + dim * width + (2 * q + 1) * width**2 + (2 * q + 3) * width + 1


@dataclass(frozen=True)
class Constants:
    """The model's rates; the ``*_here`` ones are measured by this script, the GPU ones assumed (see docs/cost-model.md)."""

    backbone_flops_here: float  # FLOP/s of the backbone forward on this CPU (float32)
    decode_center_here: float  # seconds per image per core: decode + center crop
    decode_augmented_here: float  # seconds per image per core: decode + blur/JPEG/crop/flip recipe
    group_seconds_here: float  # c_group: seconds per sample per fused group on this CPU
    head_flops_here: float  # FLOP/s of head training on this CPU (float32)
    # Assumed for one H200 (the targets of benchmarks/gpu_check.py, until it has run there):
    gpu_vit_l14_images: float = 2500.0  # img/s of ViT-L/14 in float16 -> R_gpu = 2500 x F(ViT-L/14)
    gpu_grid_seconds: float = 60.0  # the 48-config 4-class grid (144k rows, 1 epoch) -> R_head on the GPU
    cores_per_gpu: int = 16  # decode threads per GPU (the H200 machine: 16 cores)
    disk_bytes_per_second: float = 2e9  # reading a training view from the store (NVMe / parallel FS), per worker


def extraction_model_seconds(c: Constants, shape: BackboneShape, forwards: int, decode: float) -> float:
    """Extraction on this CPU (decoding and the forward share the cores), without the backbone load."""
    return forwards * (shape.forward_flops() / c.backbone_flops_here + decode)


def group_model_seconds(group_seconds: float, head_rate: float, rows: int, epochs: int, configs: int,
                        blocks: int, dim: int, q: int, width: int) -> float:  # fmt: skip
    return rows * epochs * (group_seconds + configs * 3 * head_flops(blocks, dim, q, width) / head_rate)


# ----------------------------------------------------------------------------- measurements here


@dataclass(frozen=True)
class ExtractionRun:
    """One measured ``run_extract``: what it extracted and its wall time without the backbone load."""

    role: str  # calibration, check, or outside (the model's domain)
    shape: BackboneShape
    images: int
    views: int  # augmented views (0: the center crop)
    seconds: float

    @property
    def forwards(self) -> int:
        return self.images * max(self.views, 1)


L14_6 = dataclasses.replace(VIT_L14, name="ViT-L/14 shape, 6 of its 24 layers", layers=6)


def measure_extraction(work: Path, images: int, repeats: int) -> tuple[dict[str, float], list[ExtractionRun]]:
    """Decode costs per image and core (a tiny CLIP, one decode thread, center crops and augmented views); the
    backbone's FLOP/s calibrated on ViT-B/16 center crops; checked on a 6-layer ViT-L/14 shape with 2 augmented
    views, and shown outside the model's domain on ViT-B/32 (small matmuls). The runs alternate ``repeats``
    times; the fastest round of each counts (the least load from other processes)."""
    data = write_folder_images(work / "data", images, 256)
    manifests = {split: write_folder_manifest(data, work / "manifests", split) for split in ("center", "train")}

    def extract(model: Path, views: int, workers: int) -> tuple[float, float, float]:
        """(wall without the backbone load, backbone seconds, decode thread-seconds) of one run_extract."""
        config = BackboneConfig(model=str(model), device="cpu", dtype="float32")
        start = time.perf_counter()
        Backbone(config)  # the load, as run_extract does it first
        load = time.perf_counter() - start
        split = "train" if views else "center"
        summary = run_extract(
            ExtractConfig(
                split=split,
                manifest=manifests[split],
                backbone=config,
                cache_dir=work / "cache",
                batch_size=16,
                decode_workers=workers,
                overwrite=True,
                progress=False,
                variant_group=VariantGroup.views(views) if views else VariantGroup.center(),
            )
        )
        return summary.times.wall - load, summary.times.backbone, summary.times.decode

    tiny = save_random_clip(work / "tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, patch_size=32)  # fmt: skip
    plans = [
        ("decode", None, 0),
        ("decode", None, 2),
        ("calibration", VIT_B16, 0),
        ("check", L14_6, 2),
        ("outside", VIT_B32, 0),
    ]
    models = [tiny if shape is None else save_random_clip(work / f"model-{i}", **shape.clip_config())
              for i, (_, shape, _) in enumerate(plans)]  # fmt: skip
    rounds: list[list[tuple[float, float, float]]] = [[] for _ in plans]
    for _ in range(repeats):
        for i, ((_, shape, views), model) in enumerate(zip(plans, models)):
            rounds[i].append(extract(model, views, 1 if shape is None else 2))  # decode costs: one thread
    best = [min(r) for r in rounds]
    constants = {
        "decode_center": min(r[2] for r in rounds[0]) / images,
        "decode_augmented": min(r[2] for r in rounds[1]) / (2 * images),
        "backbone_flops": images * VIT_B16.forward_flops() / best[2][1],
    }
    runs = [ExtractionRun(role, shape, images, views, b[0]) for (role, shape, views), b in zip(plans, best) if shape]
    return constants, runs


def measure_fit(work: Path, rows: int, repeats: int) -> dict[str, object]:
    """Calibrate c_group and R_head on two head shapes (groups of 2 on ``rows`` rows); predict two other shapes
    (groups of 4 on twice the rows); measure them. Each group is fitted by ``train.fit_group``, as ``pipeline fit``
    fits it (its ``fit_seconds``); features 24 x 1024 (ViT-L/14), float32. The four groups alternate ``repeats``
    times; each one's fastest round counts."""
    stores = {}
    for count in (rows, 2 * rows):
        path = work / f"train-{count}.zarr"
        write_synthetic_store(path, count, 24, 1024, shard_rows=256, chunk_rows=256)
        stores[count] = open_train_store(StoreRef("train", path), torch.device("cpu"))
    groups = {("calibration", q, w): (rows, 2) for q, w in ((1, 128), (2, 512))}
    groups |= {("check", q, w): (2 * rows, 4) for q, w in ((4, 256), (1, 1024))}
    seconds: dict[tuple[str, int, int], list[float]] = {key: [] for key in groups}
    for _ in range(repeats):
        for (role, q, w), (count, size) in groups.items():
            configs = [RunConfig(contrastive_factor=xi, proj_layers=q, proj_dim=w, amp="none")
                       for xi in (0.1, 0.2, 0.4, 0.8)[:size]]  # fmt: skip
            seconds[role, q, w].append(train.fit_group(stores[count], configs, device=torch.device("cpu")).fit_seconds)
    for store in stores.values():
        store.view_cache.close()
    measured = {key: min(values) for key, values in seconds.items()}
    calibration = [key for key in groups if key[0] == "calibration"]
    # seconds = rows * (c_group + G * 3 F / R): non-negative least squares in (c_group, 1/R)
    design = np.array([[rows, rows * 2 * 3 * head_flops(24, 1024, q, w)] for _, q, w in calibration])
    (c_group, inverse_rate), _ = scipy.optimize.nnls(design, np.array([measured[key] for key in calibration]))
    return {"group_seconds": float(c_group), "head_flops": float(1 / inverse_rate), "measured": measured,
            "groups": groups}  # fmt: skip


# ----------------------------------------------------------------------------- the reproduction on GPUs


@dataclass(frozen=True)
class Reproduction:
    """20-class ProGAN training (720k images) with 15 augmented views, val + the 20 test sets, per backbone;
    the paper's 48-config grid (1 epoch) and the epochs study (1, 3, 5, 10, 15 epochs of one config)."""

    train_images: int = 720_000
    views: int = 15
    eval_images: int = 110_000  # val + the 20 test sets, approximately (public set sizes)
    study_epochs: tuple[int, ...] = (1, 3, 5, 10, 15)
    study_shape: tuple[int, int] = (2, 1024)  # the 4-class best (q, d')


def gpu_extraction_rate(c: Constants, shape: BackboneShape, decode: float) -> tuple[float, str]:
    """Images/s of one GPU and what bounds it: the forward at the rate assumed for ViT-L/14, or the decoding."""
    forward = c.gpu_vit_l14_images * VIT_L14.forward_flops() / shape.forward_flops()
    decoding = c.cores_per_gpu / decode
    return (forward, "forward") if forward <= decoding else (decoding, "decode")


def gpu_head_rate(c: Constants) -> float:
    """FLOP/s of head training on one GPU implied by the assumed 48-config grid time (c_group taken as 0)."""
    flops = sum(4 * 3 * head_flops(24, 1024, q, w) for q, w in PAPER_SHAPES) * 144_000
    return flops / c.gpu_grid_seconds


def plan(c: Constants, r: Reproduction, devices: int) -> dict[str, float]:
    """Hours of extraction and of fitting, disk and peak fit memory of the reproduction on ``devices`` GPUs."""
    extract_seconds, disk = 0.0, 0.0
    groups = []  # seconds of each fused group (the unit Dask hands to a GPU)
    memory = 0.0
    head_rate = gpu_head_rate(c)
    for shape in PAPER_BACKBONES:
        extract_seconds += r.train_images * r.views / gpu_extraction_rate(c, shape, c.decode_augmented_here)[0]
        extract_seconds += r.eval_images / gpu_extraction_rate(c, shape, c.decode_center_here)[0]
        disk += (r.train_images * r.views + r.eval_images) * shape.row_bytes()
        view_bytes = r.train_images * shape.row_bytes()
        view_seconds = view_bytes / c.disk_bytes_per_second
        n, d = shape.layers, shape.hidden
        runs = [(1, 4, q, w) for q, w in PAPER_SHAPES] + [(e, 1, *r.study_shape) for e in r.study_epochs]
        for epochs, size, q, w in runs:
            epoch = r.train_images * size * 3 * head_flops(n, d, q, w) / head_rate
            scoring = r.eval_images * size * head_flops(n, d, q, w) / head_rate
            groups.append(epochs * max(epoch, view_seconds) + scoring)
            resident = min(epochs, 2) * view_bytes + r.eval_images * shape.row_bytes()
            state = 4 * 4 * size * head_parameters(n, d, q, w) + size * 128 * n * w * (q + 1) * 4 * 2
            memory = max(memory, resident + state)
    workers = [0.0] * devices  # longest group first onto the least loaded GPU
    for seconds in sorted(groups, reverse=True):
        heapq.heapreplace(workers, workers[0] + seconds)
    return {"extract_h": extract_seconds / devices / 3600, "fit_h": max(workers) / 3600, "disk_tb": disk / 1e12,
            "fit_memory_gb": memory / 1e9, "groups": len(groups)}  # fmt: skip


# ----------------------------------------------------------------------------- output


def print_checks(runs: list[ExtractionRun], fit: dict[str, object], c: Constants) -> None:
    print("\nCHECKS (predicted / measured; the model's constants come from the calibration runs)")
    for run in runs:
        decode = c.decode_augmented_here if run.views else c.decode_center_here
        predicted = extraction_model_seconds(c, run.shape, run.forwards, decode)
        crops = f"{run.images} images x {run.views} augmented views" if run.views else f"{run.images} center crops"
        print(f"  extraction, {run.role}: {run.shape.name}, {crops}: predicted {predicted:.1f} s, measured "
              f"{run.seconds:.1f} s, ratio {predicted / run.seconds:.2f}")  # fmt: skip
    for (role, q, w), measured in fit["measured"].items():
        rows, size = fit["groups"][role, q, w]
        predicted = group_model_seconds(c.group_seconds_here, c.head_flops_here, rows, 1, size, 24, 1024, q, w)
        print(f"  fit, {role}: q {q}, d' {w}, group of {size}, {rows} rows x 24 x 1024: predicted {predicted:.2f} s, "
              f"measured {measured:.2f} s, ratio {predicted / measured:.2f}")  # fmt: skip


def print_constants(c: Constants) -> None:
    print("\nCONSTANTS")
    print(f"  measured here: backbone forward {c.backbone_flops_here / 1e9:.0f} GFLOP/s (float32); decode + center "
          f"crop {c.decode_center_here * 1e3:.2f} ms/image/core; decode + training augmentation "
          f"{c.decode_augmented_here * 1e3:.2f} ms/image/core; head training {c.head_flops_here / 1e9:.0f} GFLOP/s "
          f"+ {c.group_seconds_here * 1e6:.0f} us per sample per fused group")  # fmt: skip
    print(f"  assumed per H200: ViT-L/14 {c.gpu_vit_l14_images:.0f} img/s in float16 "
          f"({c.gpu_vit_l14_images * VIT_L14.forward_flops() / 1e12:.0f} TFLOP/s); 48-config 4-class grid in "
          f"{c.gpu_grid_seconds:.0f} s ({gpu_head_rate(c) / 1e12:.0f} TFLOP/s of head training); "
          f"{c.cores_per_gpu} decode cores per GPU; views read at {c.disk_bytes_per_second / 1e9:.0f} GB/s")  # fmt: skip
    for shape in (VIT_B32, VIT_B16, VIT_L14):
        print(f"  {shape.name}: {shape.forward_flops() / 1e9:.1f} GFLOP/image, {shape.row_bytes():,} bytes/row")


def print_plan(c: Constants) -> None:
    r = Reproduction()
    print(f"\nREPRODUCTION ({r.train_images:,} training images x {r.views} views + {r.eval_images:,} val/test, "
          f"ViT-L/14 and ViT-B/32; 48-config grid + epochs study {r.study_epochs} per backbone)")  # fmt: skip
    for shape in PAPER_BACKBONES:
        rate, bound = gpu_extraction_rate(c, shape, c.decode_augmented_here)
        print(f"  {shape.name}: {rate:,.0f} img/s per GPU with augmentation ({bound}-bound)")
    print("  GPUs | extraction h | fit h | total h | disk TB | peak fit memory per GPU GB")
    for devices in (1, 8, 64):
        p = plan(c, r, devices)
        print(f"  {devices:>4} | {p['extract_h']:12.2f} | {p['fit_h']:5.2f} | {p['extract_h'] + p['fit_h']:7.2f} | "
              f"{p['disk_tb']:7.2f} | {p['fit_memory_gb']:.0f}")  # fmt: skip


# The constants measured by a run of this script on the development machine (see docs/cost-model.md);
# --plan-only uses them.
RECORDED = Constants(
    backbone_flops_here=106e9, decode_center_here=0.94e-3, decode_augmented_here=3.50e-3, group_seconds_here=111e-6,
    head_flops_here=146e9,
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan-only", action="store_true", help="Print the reproduction's cost from the recorded "
                        "constants; measure nothing.")  # fmt: skip
    parser.add_argument("--images", type=int, default=32, help="Images of the extraction runs.")
    parser.add_argument("--rows", type=int, default=1024, help="Training rows of the calibration groups (the check "
                        "groups have twice as many).")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="Alternating rounds of calibration and check runs.")
    add_scratch_options(parser)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    print_machine()
    if args.plan_only:
        print_constants(RECORDED)
        print_plan(RECORDED)
        return 0
    quiet_transformers()
    with scratch_dir(args, "cost_model_") as work:
        extraction, runs = measure_extraction(work / "extract", args.images, args.repeats)
        fit = measure_fit(work / "fit", args.rows, args.repeats)
    constants = Constants(
        backbone_flops_here=extraction["backbone_flops"], decode_center_here=extraction["decode_center"],
        decode_augmented_here=extraction["decode_augmented"], group_seconds_here=fit["group_seconds"],
        head_flops_here=fit["head_flops"],
    )  # fmt: skip
    print_constants(constants)
    print_checks(runs, fit, constants)
    print_plan(constants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
