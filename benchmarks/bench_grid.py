"""Cost of the paper's 48-config grid done the official way against our cached way.

The official code re-runs CLIP over the data for every config; we run it once
(``run_extract``) and train and evaluate all 48 heads from the cache
(``grid.run_grid``). On the same random 256x256 PNGs (train, val and test
splits) and a random ViT-B/32-shaped CLIP vision tower, float32 on the CPU,
it measures:

* B: the bare backbone (``Backbone.forward_taps`` on pre-made center-cropped
  batches) over the train + test images, once;
* E: ``run_extract`` of the train, val and test splits into fresh stores
  (each split's bare pass runs right before its extraction, so that both
  see the same load from other processes on this shared machine);
* H: ``run_grid`` of the 48 configs (xi {0.1, 0.2, 0.4, 0.8} x q {1, 2, 4} x
  d' {128, 256, 512, 1024}, one epoch, batch 128), loading the stores, fitting,
  scoring val and test, writing every run folder.

official = 48 * B + H (the heads cost the same either way; the official
protocol's val passes are not counted), ours = E + H. Prints all components
and official / ours (target >= 30).

    .venv/bin/python benchmarks/bench_grid.py [--train 512 --val 128 --test 512] [--jobs 1]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from _common import (
    add_scratch_options,
    premade_center_batches,
    print_machine,
    quiet_transformers,
    save_random_clip,
    scratch_dir,
    write_folder_images,
    write_folder_manifest,
)

from pipeline.backbone import Backbone, BackboneConfig
from pipeline.config import parse_grid
from pipeline.extract import ExtractConfig, run_extract
from pipeline.grid import FitOptions, run_grid

TARGET = 30.0
GRID_YAML = """\
name: bench
data:
  cache_dir: {cache}
  model: {model}
  tap: ln2
  train: train
  val: val
  test: [test]
base:
  epochs: 1
  batch_size: 128
grid:
  contrastive_factor: [0.1, 0.2, 0.4, 0.8]
  proj_layers: [1, 2, 4]
  proj_dim: [128, 256, 512, 1024]
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=512, help="Training images.")
    parser.add_argument("--val", type=int, default=128, help="Validation images.")
    parser.add_argument("--test", type=int, default=512, help="Test images.")
    parser.add_argument("--size", type=int, default=256, help="Side of the random PNGs.")
    parser.add_argument("--batch", type=int, default=32, help="Backbone batch size.")
    parser.add_argument("--jobs", type=int, default=1, help="run_grid jobs (threads).")
    add_scratch_options(parser)
    return parser.parse_args()


def read_column(results_csv: Path, column: str, *, split: str) -> list[str]:
    with open(results_csv, newline="") as handle:
        return [row[column] for row in csv.DictReader(handle) if row["split"] == split]


def main() -> int:
    args = parse_args()
    quiet_transformers()
    print_machine()
    print(
        f"inputs: random {args.size}x{args.size} PNGs, {args.train} train / {args.val} val / {args.test} test; "
        f"random ViT-B/32-shaped CLIP vision tower, float32 on the CPU, backbone batch {args.batch}; "
        f"grid of 48 heads, one epoch, batch 128, run_grid jobs {args.jobs}"
    )
    with scratch_dir(args, "bench_grid_") as work:
        model_dir = save_random_clip(work / "vit-b32-random")
        backbone_config = BackboneConfig(model=str(model_dir), device="cpu", dtype="float32")
        manifests = {}
        for seed, (split, count) in enumerate((("train", args.train), ("val", args.val), ("test", args.test))):
            write_folder_images(work / "data" / split, count, args.size, seed=seed)
            manifests[split] = write_folder_manifest(work / "data" / split, work / "manifests", split)

        backbone = Backbone(backbone_config)
        backbone_seconds: dict[str, float] = {}
        extract_seconds: dict[str, float] = {}
        for split in ("train", "test", "val"):  # each bare pass right before its extraction: same machine load
            if split != "val":
                batches = premade_center_batches(manifests[split], backbone.crop_size, args.batch)
                backbone.forward_taps(batches[0], ("ln2",))  # warm-up
                start = time.perf_counter()
                for pixels in batches:
                    backbone.forward_taps(pixels, ("ln2",))
                backbone_seconds[split] = time.perf_counter() - start
            config = ExtractConfig(
                split=split,
                manifest=manifests[split],
                backbone=backbone_config,
                cache_dir=work / "cache",
                batch_size=args.batch,
                augment=False,
                progress=False,
            )
            start = time.perf_counter()
            run_extract(config)
            extract_seconds[split] = time.perf_counter() - start
        del backbone

        grid = parse_grid(GRID_YAML.format(cache=work / "cache", model=model_dir), out=work / "runs")
        start = time.perf_counter()
        summary = run_grid(grid, FitOptions(device="cpu", jobs=args.jobs, progress=False))
        grid_seconds = time.perf_counter() - start
        if summary.n_errors:
            raise RuntimeError(f"{summary.n_errors} grid runs failed; see {summary.results}")
        fit_seconds = [float(r) for r in read_column(summary.results, "fit_seconds", split="val")]

    n_configs = len(grid.runs)
    extract_total = sum(extract_seconds.values())
    backbone_total = sum(backbone_seconds.values())
    official = n_configs * backbone_total + grid_seconds
    ours = extract_total + grid_seconds
    print(
        f"B  bare backbone over train+test ({args.train + args.test} images, once): train {backbone_seconds['train']:.1f} s, "
        f"test {backbone_seconds['test']:.1f} s = {backbone_total:.1f} s"
    )
    print(
        "E  run_extract: "
        + ", ".join(f"{split} {seconds:.1f} s" for split, seconds in extract_seconds.items())
        + f" = {extract_total:.1f} s"
    )
    print(
        f"H  run_grid, {n_configs} configs: {grid_seconds:.1f} s (fitting {sum(fit_seconds):.1f} s of it; "
        f"per config {min(fit_seconds):.2f}-{max(fit_seconds):.2f} s)"
    )
    print(f"official = {n_configs} * B + H = {official:.1f} s; ours = E + H = {ours:.1f} s")
    ratio = official / ours
    print(f"RATIO official / ours = {ratio:.1f}x ({'meets' if ratio >= TARGET else 'BELOW'} target {TARGET:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
