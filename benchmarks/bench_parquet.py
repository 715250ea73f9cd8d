"""Reading images from Parquet row groups vs from files: ``sources.RowImages.decode`` over a split, images/s.

Writes ``--images`` random RGB PNG files of ``--size`` pixels (folder layout, half real) and the same bytes as
one Parquet file in the Hugging Face ``datasets`` image layout (row groups of ``--row-group`` rows), builds both
manifests (``folder`` and ``parquet``: the latter hashes every image), checks that every row decodes to the same
pixels, then times, in alternating rounds, decoding every row of each in order (one thread: the work of one
decode worker, hashing and row-group reads included for Parquet). Prints images/s of both and
``RATIO parquet / files images/s`` (target >= 0.9: reading from row groups costs at most 10 %).

    .venv/bin/python benchmarks/bench_parquet.py [--images 2000] [--size 256] [--row-group 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import add_scratch_options, print_machine, scratch_dir, time_interleaved
from PIL import Image

from pipeline.features import build_manifest
from pipeline.features.sources import RowImages

TARGET = 0.9


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="Width and height of every image.")
    parser.add_argument("--row-group", type=int, default=100, help="Rows per Parquet row group (datasets: 100).")
    parser.add_argument("--repeats", type=int, default=3)
    add_scratch_options(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    print_machine()
    with scratch_dir(args, "bench-parquet-") as work:
        rng = np.random.default_rng(0)
        for i in range(args.images):
            folder = work / "files" / "set" / ("0_real", "1_fake")[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(
                folder / f"{i:06d}.png"
            )
        start = time.perf_counter()
        files = build_manifest("folder", work / "files", "bench")
        ordered = [work / "files" / row.path for row in files.rows]
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        table = pa.table(
            {
                "image": pa.array([{"bytes": p.read_bytes(), "path": p.name} for p in ordered], type=image_type),
                "label": pa.array([row.label for row in files.rows]),
            }
        )
        (work / "pq" / "set").mkdir(parents=True)
        pq.write_table(table, work / "pq" / "set" / "data.parquet", row_group_size=args.row_group)
        parquet = build_manifest("parquet", work / "pq" / "set", "bench")
        print(
            f"{len(parquet)} images into Parquet and both manifests (hashing every image): {time.perf_counter() - start:.2f} s"
        )
        sources = {"files": RowImages(files), "parquet": RowImages(parquet)}
        for index in range(0, len(files), max(1, len(files) // 50)):
            if not np.array_equal(sources["files"].decode(index), sources["parquet"].decode(index)):
                raise SystemExit(f"row {index}: Parquet pixels differ from the file's")

        def decode_all(name: str):
            rows = RowImages(files if name == "files" else parquet)  # a fresh reader: no row group cached
            return lambda: [rows.decode(index) for index in range(len(rows))]

        timings = time_interleaved({name: decode_all(name) for name in sources}, args.repeats)
        rate = {name: args.images / timing.median for name, timing in timings.items()}
        for name, timing in timings.items():
            print(f"{name}: {rate[name]:.0f} images/s ({timing.describe()})")
        ratio = rate["parquet"] / rate["files"]
        print(f"RATIO parquet / files images/s: {ratio:.3f} (target >= {TARGET})")


if __name__ == "__main__":
    main()
