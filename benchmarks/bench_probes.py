"""Per-block probes against one RINE config, from the same cache: what "try many heads in seconds" costs.

A synthetic ViT-L/14-shaped store (24 blocks of 1024 dims, float16; fakes shifted along one direction in every
block, so that the probes converge as on real features) with train, val and test splits. In alternating
rounds it times ``run_grid`` of

* R: one RINE config, the published 4-class head (q 2, d' 1024, batch 128, one epoch, float32);
* P: 24 per-block probes (``head: logreg, features: block:K`` for K = 0..23, C 1), one group of work: the view
  read once, each probe fitted on its block's column;

each into a fresh output folder (loading, fitting, scoring val and test, writing the run folders). Prints R,
P, P / 24 (seconds per probe), and the ratios P / 24 / R (one probe against the RINE config) and P / R (all 24).

    .venv/bin/python benchmarks/bench_probes.py [--rows 8192] [--eval-rows 2048] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _common import add_scratch_options, print_machine, scratch_dir

from pipeline import cache
from pipeline.heads import FitConfig, parse_grid, run_grid

N_BLOCKS, DIM = 24, 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192, help="Training rows.")
    parser.add_argument("--eval-rows", type=int, default=2048, help="Rows of the val and of the test split.")
    parser.add_argument("--repeats", type=int, default=2)
    add_scratch_options(parser)
    return parser.parse_args()


@dataclass(frozen=True)
class ShiftedRows:
    """Standard normal float16 rows, fakes (odd rows) shifted by ``shift`` along a fixed unit direction."""

    shape: tuple[int, int, int]
    seed: int
    shift: float = 0.25

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        values = np.random.default_rng([self.seed, start]).standard_normal((stop - start, *self.shape[1:]))
        direction = np.random.default_rng(1234).standard_normal(self.shape[2])
        fake = (np.arange(start, stop) % 2)[:, None, None]
        return (values + self.shift * fake * direction / np.linalg.norm(direction)).astype(np.float16)


def write_split(path: Path, n_rows: int, seed: int, variant: str) -> None:
    identity = cache.placeholder_identity(N_BLOCKS, DIM, shard_rows=1024, chunk_rows=256)
    cache.write_store(
        path,
        identity,
        split=path.stem,
        labels=[i % 2 for i in range(n_rows)],
        paths=[f"img_{i:07d}.png" for i in range(n_rows)],
        datasets=["synthetic"] * n_rows,
        features={variant: ShiftedRows((n_rows, N_BLOCKS, DIM), seed)},
    )


def grid_text(root: Path, out: Path, grid: str) -> str:
    return (
        f"name: bench\nout: {out}\ndata:\n  train: {{store: {root / 'train.zarr'}}}\n"
        f"  val: {{store: {root / 'val.zarr'}}}\n  test: [{{store: {root / 'test.zarr'}, name: test}}]\n"
        "base: {proj_layers: 2, proj_dim: 1024, batch_size: 128, epochs: 1}\n"
        f"grid:\n{grid}"
    )


RINE = "  - {head: [rine]}\n"
PROBES = f"  - {{head: [logreg], features: {[f'block:{k}' for k in range(N_BLOCKS)]}}}\n"


def timed_grid(root: Path, out: Path, grid: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = run_grid(parse_grid(grid_text(root, out, grid)), FitConfig(device="cpu", progress=False))
    seconds = time.perf_counter() - start
    if summary.n_errors:
        raise SystemExit(f"{summary.n_errors} config(s) failed; see {summary.results}")
    return seconds


def main() -> None:
    args = parse_args()
    print_machine()
    print(f"store: {N_BLOCKS} blocks x {DIM} dims float16; train {args.rows} rows, val and test {args.eval_rows} each")
    with scratch_dir(args, "bench-probes-") as root:
        write_split(root / "train.zarr", args.rows, 1, "view_000")
        write_split(root / "val.zarr", args.eval_rows, 2, "center")
        write_split(root / "test.zarr", args.eval_rows, 3, "center")
        rine, probes = [], []
        for round_ in range(args.repeats):
            rine.append(timed_grid(root, root / "rine", RINE))
            probes.append(timed_grid(root, root / "probes", PROBES))
            print(f"round {round_}: RINE config {rine[-1]:.2f} s, {N_BLOCKS} per-block probes {probes[-1]:.2f} s")
    r, p = min(rine), min(probes)
    print(f"R (one RINE config, best of {args.repeats}): {r:.2f} s")
    print(
        f"P ({N_BLOCKS} logreg per-block probes, one grid, best of {args.repeats}): {p:.2f} s = {p / N_BLOCKS:.2f} s/probe"
    )
    print(f"RATIO one probe / one RINE config = {p / N_BLOCKS / r:.3f}")
    print(f"RATIO all {N_BLOCKS} probes / one RINE config = {p / r:.3f}")


if __name__ == "__main__":
    main()
