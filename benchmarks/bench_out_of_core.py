"""Training beyond memory: ``run_grid`` with a memory budget below the split's size against the same grid in memory.

A synthetic float16 store of ``--rows`` x 24 x 1024 (400 MB by default; the
training split), and small val and test stores, are written with
``cache.write_store`` and read once, so that their files sit in the page
cache. The same grid (four contrastive factors of one head shape, one fused
group; small heads by default, the case where reading rows weighs most) then
runs in alternating rounds with the default budget (features loaded whole)
and with ``--memory-budget 1`` byte (every batch gathered from the shard
files with ``cache.open_feature_rows``). Prints the training samples/s of
both (rows x configs / fit seconds, from ``results.csv``), the grid wall
times, checks the two results tables are identical but for timing, and
prints ``RATIO out-of-core / in-memory samples/s`` (target >= 0.7).

    .venv/bin/python benchmarks/bench_out_of_core.py [--rows 8192] [--proj-dim 128] [--proj-layers 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _common import add_scratch_options, print_machine, scratch_dir, write_synthetic_store

from pipeline import cache
from pipeline.heads import FitConfig, parse_grid, run_grid

TARGET = 0.7
GRID_YAML = """\
name: out-of-core
data:
  model: synthetic
  train: {{store: {train}}}
  val: {{store: {val}}}
  test: [{{store: {test}}}]
base: {{epochs: 1, batch_size: 128, proj_dim: {proj_dim}, proj_layers: {proj_layers}, amp: none}}
grid:
  contrastive_factor: [0.1, 0.2, 0.4, 0.8]
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192, help="Training rows (x 24 x 1024 float16).")
    parser.add_argument("--eval-rows", type=int, default=512, help="Rows of the val and of the test store.")
    parser.add_argument("--proj-dim", type=int, default=128)
    parser.add_argument("--proj-layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    add_scratch_options(parser)
    return parser.parse_args()


def read_results(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def main() -> int:
    args = parse_args()
    print_machine()
    with scratch_dir(args, "bench_out_of_core_") as work:
        labels = np.random.default_rng(0).integers(0, 2, max(args.rows, args.eval_rows))
        stores = {}
        for seed, (name, rows) in enumerate((("train", args.rows), ("val", args.eval_rows), ("test", args.eval_rows))):
            stores[name] = work / f"{name}.zarr"
            write_synthetic_store(
                stores[name], rows, 24, 1024, shard_rows=1024, chunk_rows=256, labels=labels[:rows], seed=seed
            )
            cache.read_features(stores[name], "center")  # into the page cache
        size = cache.open_feature_rows(stores["train"], "center").nbytes
        print(
            f"inputs: training store {args.rows} x 24 x 1024 float16 ({size / 1e6:.0f} MB, in the page cache), val and "
            f"test {args.eval_rows} rows; grid: xi 0.1/0.2/0.4/0.8 (one fused group), q={args.proj_layers}, "
            f"d'={args.proj_dim}, one epoch, batch 128, float32; out-of-core budget 1 byte"
        )
        text = GRID_YAML.format(**stores, proj_dim=args.proj_dim, proj_layers=args.proj_layers)
        modes = {"in-memory": None, "out-of-core": 1}
        samples: dict[str, list[float]] = {mode: [] for mode in modes}
        walls: dict[str, list[float]] = {mode: [] for mode in modes}
        tables = {}
        for round_ in range(args.repeats + 1):  # round 0 warms up
            for mode, budget in modes.items():
                spec = parse_grid(text, out=work / "runs" / f"{mode}-{round_}")
                start = time.perf_counter()
                summary = run_grid(spec, FitConfig(device="cpu", progress=False, memory_budget=budget))
                wall = time.perf_counter() - start
                rows = read_results(summary.results)
                tables[mode] = [{k: v for k, v in row.items() if k != "fit_seconds"} for row in rows]
                fit_seconds = sum(float(row["fit_seconds"]) for row in rows if row["split"] == "val")
                if round_:
                    samples[mode].append(args.rows * 4 / fit_seconds)
                    walls[mode].append(wall)
        if tables["in-memory"] != tables["out-of-core"]:
            raise RuntimeError("out-of-core results differ from in-memory results")
    for mode in modes:
        print(
            f"{mode}: {statistics.median(samples[mode]):.0f} config-samples/s (runs: "
            f"{', '.join(f'{s:.0f}' for s in samples[mode])}); grid wall {statistics.median(walls[mode]):.1f} s"
        )
    print("results.csv of both: identical but for fit_seconds")
    ratio = statistics.median(samples["out-of-core"]) / statistics.median(samples["in-memory"])
    print(
        f"RATIO out-of-core / in-memory samples/s = {ratio:.3f} ({'meets' if ratio >= TARGET else 'BELOW'} target {TARGET})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
