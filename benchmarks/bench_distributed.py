"""Distributed extraction: ``torchrun`` with 2 ranks of 1 thread each against 1 process with 2 threads.

A ViT-B/32-shaped CLIP vision tower with random weights is saved with
``save_pretrained``; N random 256x256 PNGs are written in the ``folder``
layout with their manifest. In alternating rounds, each into a fresh store,
it runs as real commands

* ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m pipeline
  extract ...`` with ``OMP_NUM_THREADS=1`` (one torch thread per rank) and
  ``--workers 1`` (one decode thread per rank);
* ``python -m pipeline extract ...`` with ``OMP_NUM_THREADS=2`` and
  ``--workers 2``: the same total of threads in one process.

Throughput is images / extraction wall time, the wall time each process
reports for ``run_extract`` (backbone load, store, decode, forward, write;
for the ranks: the slowest rank), so that Python's and torch's import time,
the same for both, does not blur the comparison; the end-to-end command
times are printed too. Prints ``RATIO`` = 2-rank / 1-process images/s
(target >= 0.9).

    .venv/bin/python benchmarks/bench_distributed.py [--images 384] [--shard-rows 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    add_scratch_options,
    print_machine,
    quiet_transformers,
    save_random_clip,
    scratch_dir,
    write_folder_images,
    write_folder_manifest,
)

TARGET = 0.9
REPORT = re.compile(r"(\d+) images in ([\d.]+) s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--size", type=int, default=256, help="Side of the random PNGs.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shard-rows", type=int, default=32, help="Rows per shard: the unit the ranks share.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12, help="Encoder layers (12 = ViT-B/32).")
    add_scratch_options(parser)
    return parser.parse_args()


def run(command: list[str], threads: int) -> tuple[int, float, float]:
    """(images, slowest reported extraction seconds, command seconds) of one extraction command."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr}")
    reports = [(int(n), float(t)) for n, t in REPORT.findall(result.stderr)]
    return sum(n for n, _ in reports), max(t for _, t in reports), seconds


def main() -> int:
    args = parse_args()
    quiet_transformers()
    print_machine()
    print(
        f"inputs: {args.images} random {args.size}x{args.size} PNGs, random ViT-B/32-shaped CLIP "
        f"({args.layers} layers), float32 on the CPU, batch {args.batch}, shards of {args.shard_rows} rows; "
        f"{args.repeats} rounds alternating the two ways"
    )
    with scratch_dir(args, "bench_distributed_") as work:
        model = save_random_clip(work / "clip", num_hidden_layers=args.layers)
        manifest = write_folder_manifest(write_folder_images(work / "data", args.images, args.size), work, "bench")

        def command(out: Path, workers: int) -> list[str]:
            return [
                "-m", "pipeline", "extract", "--split", "bench", "--manifest", str(manifest), "--model", str(model),
                "--out", str(out), "--device", "cpu", "--batch-size", str(args.batch), "--shard-rows",
                str(args.shard_rows), "--chunk-rows", str(args.shard_rows), "--workers", str(workers), "--no-progress",
            ]  # fmt: skip

        ways = {
            "torchrun 2 ranks x 1 thread": lambda out: run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                + command(out, 1),
                threads=1,
            ),
            "1 process x 2 threads": lambda out: run([sys.executable, *command(out, 2)], threads=2),
        }
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for round_index in range(args.repeats):
            for name, way in ways.items():
                images, extract_seconds, command_seconds = way(work / f"{len(rates[name])}-{name[:5]}.zarr")
                if images != args.images:
                    raise RuntimeError(f"{name}: {images} images extracted, expected {args.images}")
                rates[name].append(images / extract_seconds)
                print(
                    f"round {round_index}: {name:<28} {images / extract_seconds:6.1f} img/s "
                    f"(extraction {extract_seconds:.1f} s, command {command_seconds:.1f} s)"
                )
        medians = {name: statistics.median(values) for name, values in rates.items()}
        for name, value in medians.items():
            print(f"{name:<28} median {value:6.1f} img/s")
        ratio = medians["torchrun 2 ranks x 1 thread"] / medians["1 process x 2 threads"]
        verdict = "meets" if ratio >= TARGET else "BELOW"
        print(f"RATIO 2 ranks / 1 process images/s = {ratio:.3f} ({verdict} target {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
