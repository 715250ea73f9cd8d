"""Grids on Dask: ``run_grid`` on a local Dask cluster of 2 worker processes against ``--jobs 2`` (2 threads).

Synthetic float16 stores (training ``--rows`` x ``--blocks`` x ``--dim``,
val and test ``--eval-rows``) are written with ``cache.write_store``; the
grid is xi 0.1/0.2/0.4/0.8 x q 1/2 x d' ``--proj-dims`` (one epoch, batch
128, float32): 4 configs per fused group, so 2 x len(d') groups. A
``local:2`` cluster (``cluster.dask_client``: 2 worker processes, one group
at a time each, ``cpu_count // 2`` torch threads each) is started once and
timed; then, in alternating rounds, the same grid runs into a fresh folder
with ``--jobs 2`` (threads of this process, ``cpu_count // 2`` torch threads
each) and on the cluster (``--scheduler`` its address). Both modes load the
stores in round 0 (the warm-up, reported): this process for ``--jobs``
anew every run, each worker process once for all its groups (the worker
cache). Checks that every ``results.csv`` equals the first one but for
``fit_seconds``, prints configs/s (configs / grid wall time) of both and
``RATIO dask local:2 / --jobs 2 configs/s`` (target >= 0.8), and the same
ratio over all rounds, the warm-up and the cluster's start included.

    .venv/bin/python benchmarks/bench_dask.py [--rows 4096] [--blocks 12] [--dim 768] [--proj-dims 128,256] [--repeats 3]
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

from pipeline.heads import FitConfig, parse_grid, run_grid
from pipeline.heads.cluster import ClusterConfig, dask_client, worker_threads

TARGET = 0.8
GRID_YAML = """\
name: dask
data:
  model: synthetic
  train: {{store: {train}}}
  val: {{store: {val}}}
  test: [{{store: {test}}}]
base: {{epochs: 1, batch_size: 128, amp: none}}
grid:
  contrastive_factor: [0.1, 0.2, 0.4, 0.8]
  proj_layers: [1, 2]
  proj_dim: [{proj_dims}]
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096, help="Training rows.")
    parser.add_argument("--eval-rows", type=int, default=1024, help="Rows of the val and of the test store.")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--proj-dims", default="128,256", help="Comma-separated d' values (4 x 2 configs each).")
    parser.add_argument("--repeats", type=int, default=3)
    add_scratch_options(parser)
    return parser.parse_args()


def timeless_results(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "fit_seconds"} for row in csv.DictReader(handle)]


def main() -> int:
    args = parse_args()
    print_machine()
    with scratch_dir(args, "bench_dask_") as work:
        labels = np.random.default_rng(0).integers(0, 2, max(args.rows, args.eval_rows))
        stores = {}
        for seed, (name, rows) in enumerate((("train", args.rows), ("val", args.eval_rows), ("test", args.eval_rows))):
            stores[name] = work / f"{name}.zarr"
            write_synthetic_store(
                stores[name], rows, args.blocks, args.dim, shard_rows=1024, chunk_rows=256, labels=labels[:rows],
                seed=seed,
            )  # fmt: skip
        text = GRID_YAML.format(**stores, proj_dims=args.proj_dims)
        n_configs = len(parse_grid(text, out=work / "probe").runs)
        print(
            f"inputs: training store {args.rows} x {args.blocks} x {args.dim} float16, val and test {args.eval_rows} "
            f"rows; grid: {n_configs} configs (xi 4 x q 2 x d' {args.proj_dims}) in {n_configs // 4} fused groups, "
            f"one epoch, batch 128, float32; {worker_threads(2)} torch thread(s) per job / worker"
        )
        start = time.perf_counter()
        with dask_client(ClusterConfig(scheduler="local:2")) as client:
            startup = time.perf_counter() - start
            print(f"dask local:2 cluster started in {startup:.1f} s")
            modes = {
                "--jobs 2": FitConfig(device="cpu", jobs=2, progress=False),
                "dask local:2": FitConfig(
                    device="cpu", progress=False, cluster=ClusterConfig(scheduler=client.scheduler.address)
                ),
            }
            walls: dict[str, list[float]] = {mode: [] for mode in modes}
            reference = None
            for round_ in range(args.repeats + 1):  # round 0 warms up (and loads the workers' stores)
                for mode, options in modes.items():
                    spec = parse_grid(text, out=work / "runs" / f"{mode.replace(' ', '_')}-{round_}")
                    begin = time.perf_counter()
                    summary = run_grid(spec, options)
                    walls[mode].append(time.perf_counter() - begin)
                    table = timeless_results(summary.results)
                    reference = reference or table
                    if table != reference:
                        raise RuntimeError(f"{mode}, round {round_}: results differ from the first run's")
    print("every results.csv identical but for fit_seconds")
    rates = {}
    for mode, seconds in walls.items():
        rates[mode] = n_configs / statistics.median(seconds[1:])
        runs = ", ".join(f"{s:.1f}" for s in seconds[1:])
        print(f"{mode}: {rates[mode]:.2f} configs/s (grid wall median of {runs} s; warm-up round {seconds[0]:.1f} s)")
    ratio = rates["dask local:2"] / rates["--jobs 2"]
    verdict = "meets" if ratio >= TARGET else "BELOW"
    print(f"RATIO dask local:2 / --jobs 2 configs/s = {ratio:.3f} ({verdict} target {TARGET})")
    dask_total, jobs_total = startup + sum(walls["dask local:2"]), sum(walls["--jobs 2"])
    print(
        f"ratio over all {args.repeats + 1} grids, warm-up included, counting the cluster's start "
        f"({jobs_total:.1f} s / {dask_total:.1f} s): {jobs_total / dask_total:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
