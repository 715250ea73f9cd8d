"""End-to-end ``run_extract`` speed against the bare backbone forward on the same batches.

A ViT-B/32-shaped CLIP vision tower with random weights (hidden 768, 12
layers, 12 heads, patch 32, image 224, MLP 3072) is saved with
``save_pretrained``; N random 256x256 PNGs are written in the ``folder``
layout with their manifest. In alternating rounds it times

* the bare backbone: the same images, decoded and center-cropped beforehand
  into uint8 batches of the extraction batch size, through
  ``Backbone.forward_taps`` (no decode, no write);
* ``run_extract`` end to end into a fresh store (float32 on the CPU, tap ln2):
  backbone load, decode, crop, forward, write.

Prints images/s of both and their ratio (target >= 0.9), plus the stage
times ``run_extract`` reports and the backbone load time alone.

    .venv/bin/python benchmarks/bench_extract.py [--images 256] [--batch 32] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
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

from pipeline.features import Backbone, BackboneConfig, ExtractConfig, ExtractSummary, run_extract

TARGET = 0.9


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=256, help="Side of the random PNGs.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--workers", type=int, default=ExtractConfig.decode_workers, help="Decode workers of run_extract."
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12, help="Encoder layers (12 = ViT-B/32).")
    add_scratch_options(parser)
    return parser.parse_args()


def time_backbone(backbone: Backbone, batches: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for pixels in batches:
        backbone.forward_taps(pixels, ("ln2",))
    return time.perf_counter() - start


def extract_once(config: ExtractConfig) -> tuple[float, ExtractSummary]:
    start = time.perf_counter()
    summary = run_extract(config)
    return time.perf_counter() - start, summary


def main() -> int:
    args = parse_args()
    quiet_transformers()
    print_machine()
    print(
        f"inputs: {args.images} random {args.size}x{args.size} PNGs (folder layout), random CLIP vision tower "
        f"ViT-B/32 shape with {args.layers} layers, float32 on the CPU, batch {args.batch}, {args.workers} decode "
        f"workers, tap ln2, store float16; {args.repeats} rounds after one untimed round"
    )
    with scratch_dir(args, "bench_extract_") as work:
        model_dir = save_random_clip(work / "vit-b32-random", num_hidden_layers=args.layers)
        write_folder_images(work / "data", args.images, args.size)
        manifest_csv = write_folder_manifest(work / "data", work / "manifests", "bench")
        backbone_config = BackboneConfig(model=str(model_dir), device="cpu", dtype="float32")
        load_start = time.perf_counter()
        backbone = Backbone(backbone_config)
        load_seconds = time.perf_counter() - load_start
        batches = premade_center_batches(manifest_csv, backbone.crop_size, args.batch)
        config = ExtractConfig(
            split="bench",
            manifest=manifest_csv,
            backbone=backbone_config,
            cache_dir=work / "cache",
            batch_size=args.batch,
            decode_workers=args.workers,
            overwrite=True,
            progress=False,
        )
        time_backbone(backbone, batches[:2])
        extract_once(config)
        bare_seconds, extract_seconds, summaries = [], [], []
        for _ in range(args.repeats):
            bare_seconds.append(time_backbone(backbone, batches))
            seconds, summary = extract_once(config)
            extract_seconds.append(seconds)
            summaries.append(summary)
    bare = args.images / statistics.median(bare_seconds)
    end_to_end = args.images / statistics.median(extract_seconds)
    print(f"backbone load (includes hashing the weights): {load_seconds:.2f} s")
    print(f"bare forward_taps: {bare:.1f} img/s (runs: {', '.join(f'{s:.2f} s' for s in bare_seconds)})")
    print(f"run_extract end to end: {end_to_end:.1f} img/s (runs: {', '.join(f'{s:.2f} s' for s in extract_seconds)})")
    for summary in summaries:
        print("  " + summary.report().replace("\n", "\n  "))
    ratio = end_to_end / bare
    print(
        f"RATIO run_extract / bare backbone images/s = {ratio:.3f} ({'meets' if ratio >= TARGET else 'BELOW'} target {TARGET})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
