"""``pipeline predict`` end to end against the bare backbone forward, and its peak memory over many images.

Speed: a ViT-B/32-shaped CLIP vision tower with random weights (hidden 768,
12 layers, 12 heads, patch 32, image 224, MLP 3072) is saved with
``save_pretrained``, and a RINE head over its 12 blocks (q 1, d' 128, with
val thresholds) is saved as a run folder's ``head.safetensors``; N random
256x256 PNGs lie in one folder. In alternating rounds it times

* the bare backbone: the same images, decoded and center-cropped beforehand
  into uint8 batches of the predict batch size, through
  ``Backbone.forward_taps`` (no decode, no head, no output);
* ``run_predict`` end to end into a fresh CSV: detector load (backbone and
  head), folder listing, threaded decode and crop, forward, head, header of
  each image, rows written and synced batch by batch.

Prints images/s of both and ``RATIO predict / bare backbone images/s``
(target >= 0.9). Then ``run_predict`` with ``robust=True`` (each image also
scored as its three re-encoded copies, in the same batches) in the same rounds:
``RATIO predict --robust / predict images/s`` (the cost of robust verdicts;
about 1/4 expected, as the backbone sees four images per image).

Memory: the tests' tiny CLIP (32 px) and head; ``python -m pipeline predict``
over a folder of 2,000 and one of 20,000 random 32x32 PNGs, each in its own
process, which reports its peak resident memory (``VmHWM``, Linux). Prints both
and ``RATIO peak RSS 20,000 / 2,000 images`` (target: about 1, memory that
does not grow with the number of images).

    .venv/bin/python benchmarks/bench_predict.py [--images 256] [--batch 32] [--workers 2] [--memory 2000,20000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _common import add_scratch_options, print_machine, quiet_transformers, save_random_clip, scratch_dir
from PIL import Image

from pipeline.detector import PredictConfig, run_predict
from pipeline.features import Backbone, BackboneConfig, images
from pipeline.heads import RineHead, calibrate_head, save_head

TARGET = 0.9
TINY_CLIP = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=4)  # fmt: skip
# The child reports its own peak: VmHWM of /proc/self/status (ru_maxrss would carry the peak of the
# parent it was forked from across exec).
CHILD = """\
import sys
from pipeline.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
status = open("/proc/self/status").read().splitlines()
print("PEAK_RSS_KB", next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=256, help="Side of the random PNGs.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="Decode workers of run_predict.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory", default="2000,20000", help="Image counts of the memory runs ('' to skip).")
    add_scratch_options(parser)
    return parser.parse_args()


def write_images(folder: Path, n_images: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:06d}.png", compress_level=1)
    return folder


def save_run_head(folder: Path, backbone: Backbone, proj_dim: int = 128) -> Path:
    """A run folder holding a random head over every block of ``backbone``, with val thresholds."""
    torch.manual_seed(0)
    head = RineHead(len(backbone.block_indices), backbone.dim, proj_dim, 1).eval()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    calibration = calibrate_head("none", torch.from_numpy(rng.normal(labels, 1.0)[:, None]), labels, "val")
    metadata = {
        "model": backbone.config.model,
        "model_revision": backbone.revision,
        "tap": "ln2",
        "store_blocks": str(list(backbone.block_indices)),
        "store_dtype": "float16",
        "head_blocks": "all",
        **calibration.to_metadata(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_head(head, folder / "head.safetensors", metadata)
    return folder


def center_batches(folder: Path, crop: int, batch: int) -> list[np.ndarray]:
    files = sorted(folder.iterdir())
    crops = [images.center_crop(images.decode_image(file), crop) for file in files]
    return [np.stack(crops[i : i + batch]) for i in range(0, len(crops), batch)]


def time_backbone(backbone: Backbone, batches: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for pixels in batches:
        backbone.forward_taps(pixels, ("ln2",))
    return time.perf_counter() - start


def time_predict(config: PredictConfig) -> tuple[float, str]:
    config.out.unlink(missing_ok=True)
    start = time.perf_counter()
    summary = run_predict(config)
    return time.perf_counter() - start, summary.report()


def speed(args: argparse.Namespace, work: Path) -> None:
    model_dir = save_random_clip(work / "vit-b32-random")
    backbone = Backbone(BackboneConfig(model=str(model_dir), device="cpu", dtype="float32"))
    run = save_run_head(work / "run", backbone)
    data = write_images(work / "images", args.images, args.size)
    batches = center_batches(data, backbone.crop_size, args.batch)
    config = PredictConfig(head=run, inputs=(data,), out=work / "scores.csv", device="cpu", dtype="float32",
                           batch_size=args.batch, decode_workers=args.workers, progress=False)  # fmt: skip
    time_backbone(backbone, batches[:2])
    time_predict(config)
    robust_config = replace(config, robust=True)
    bare_seconds, predict_seconds, robust_seconds = [], [], []
    for _ in range(args.repeats):
        bare_seconds.append(time_backbone(backbone, batches))
        seconds, report = time_predict(config)
        predict_seconds.append(seconds)
        print("  run_predict: " + report.replace("\n", "\n  "))
        seconds, report = time_predict(robust_config)
        robust_seconds.append(seconds)
        print("  run_predict --robust: " + report.replace("\n", "\n  "))
    bare = args.images / statistics.median(bare_seconds)
    end_to_end = args.images / statistics.median(predict_seconds)
    print(f"bare forward_taps: {bare:.1f} img/s (runs: {', '.join(f'{s:.2f} s' for s in bare_seconds)})")
    print(f"run_predict end to end: {end_to_end:.1f} img/s (runs: {', '.join(f'{s:.2f} s' for s in predict_seconds)})")
    ratio = end_to_end / bare
    verdict = "meets" if ratio >= TARGET else "BELOW"
    print(f"RATIO predict / bare backbone images/s = {ratio:.3f} ({verdict} target {TARGET})")
    robust = args.images / statistics.median(robust_seconds)
    print(f"run_predict --robust: {robust:.1f} img/s (runs: {', '.join(f'{s:.2f} s' for s in robust_seconds)})")
    print(f"RATIO predict --robust / predict images/s = {robust / end_to_end:.3f}")


def peak_rss_kb(run: Path, folder: Path, out: Path, batch: int) -> int:
    command = [sys.executable, "-c", CHILD, "predict", str(folder), "--head", str(run), "--out", str(out),
               "--device", "cpu", "--batch-size", str(batch), "--no-progress"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next(line for line in result.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return int(line.split()[1])


def memory(args: argparse.Namespace, work: Path) -> None:
    counts = [int(n) for n in args.memory.split(",") if n]
    if not counts:
        return
    model_dir = save_random_clip(work / "tiny-clip", **TINY_CLIP)
    run = save_run_head(work / "tiny-run", Backbone(BackboneConfig(model=str(model_dir), device="cpu")), 16)
    peaks = {}
    for count in counts:
        folder = write_images(work / f"small-{count}", count, 32, seed=count)
        start = time.perf_counter()
        peaks[count] = peak_rss_kb(run, folder, work / f"small-{count}.csv", args.batch)
        rows = (work / f"small-{count}.csv").read_text().count("\n") - 1
        print(f"predict over {count} images of 32x32: {rows} rows in {time.perf_counter() - start:.1f} s, "
              f"peak RSS {peaks[count] / 1024:.0f} MiB")  # fmt: skip
    low, high = min(counts), max(counts)
    print(f"RATIO peak RSS {high} / {low} images = {peaks[high] / peaks[low]:.3f} (target: about 1)")


def main() -> int:
    args = parse_args()
    quiet_transformers()
    print_machine()
    print(
        f"speed inputs: {args.images} random {args.size}x{args.size} PNGs in one folder, random CLIP vision tower "
        f"ViT-B/32 shape, float32 on the CPU, batch {args.batch}, {args.workers} decode workers, tap ln2, features "
        f"rounded to float16, head q 1 d' 128; {args.repeats} rounds after one untimed round"
    )
    with scratch_dir(args, "bench_predict_") as work:
        speed(args, work)
        memory(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
