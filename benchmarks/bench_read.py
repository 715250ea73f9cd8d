"""Full read of a feature store through ``cache.read_features`` against a raw read of the same bytes.

Writes a (rows, blocks, dim) float16 array (default 40960 x 24 x 1024, 2 GB)
through ``cache.create_store`` / ``add_variant`` / ``commit_shard``, then times,
all warm (each read once before timing) and into pre-allocated buffers:

* raw: the shard files read sequentially with ``readinto`` into one buffer;
* ``cache.read_features(..., out=buffer)``;
* for context: plain ``zarr.open_array(...)[:]`` (zarr allocates its result)
  and an HDF5 copy of the same array (same chunk shape, no compression) read
  with h5py's ``read_direct`` into a pre-allocated buffer.

Prints the throughput of each and the ratio read_features / raw (target >= 0.8).

    .venv/bin/python benchmarks/bench_read.py [--rows 40960] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
import zarr

from _common import add_scratch_options, print_machine, scratch_dir, time_interleaved, time_repeats, write_synthetic_store
from pipeline import cache

TARGET = 0.8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40960)
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--shard-rows", type=int, default=cache.DEFAULT_SHARD_ROWS)
    parser.add_argument("--chunk-rows", type=int, default=cache.DEFAULT_CHUNK_ROWS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-context", action="store_true", help="Skip the plain zarr and h5py figures.")
    add_scratch_options(parser)
    return parser.parse_args()


def shard_files(array_dir: Path) -> list[Path]:
    """The shard files of a (rows, blocks, dim) array, in row order."""
    files = sorted((array_dir / "c").iterdir(), key=lambda p: int(p.name))
    return [folder / "0" / "0" for folder in files]


def read_raw(files: list[Path], buffer: np.ndarray) -> None:
    """Read the files one after another into ``buffer`` (uint8, their total size)."""
    view = memoryview(buffer)
    offset = 0
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while True:
                got = handle.readinto(view[offset:])
                if not got:
                    break
                offset += got
    if offset != len(buffer):
        raise RuntimeError(f"read {offset} bytes, expected {len(buffer)}")


def write_hdf5(path: Path, store: Path, features: np.ndarray, chunk_rows: int) -> None:
    """The same array in an HDF5 file, chunked like the store, uncompressed."""
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=features, chunks=(chunk_rows,) + features.shape[1:])


def report(name: str, n_bytes: int, timing, raw_seconds: float | None) -> None:
    rate = n_bytes / timing.median / 1e9
    ratio = "" if raw_seconds is None else f"  ({raw_seconds / timing.median:.2f} of raw)"
    print(f"{name:<34} {rate:6.2f} GB/s{ratio}   {timing.describe()}")


def main() -> int:
    args = parse_args()
    print_machine()
    shape = (args.rows, args.blocks, args.dim)
    n_bytes = int(np.prod(shape)) * 2
    print(
        f"inputs: features {shape} float16 = {n_bytes / 1e9:.2f} GB, shard_rows {args.shard_rows}, "
        f"chunk_rows {args.chunk_rows}, uncompressed; {args.repeats} timed rounds after one warm read, raw and read_features alternating"
    )
    with scratch_dir(args, "bench_read_") as work:
        store = work / "features.zarr"
        write_synthetic_store(store, args.rows, args.blocks, args.dim, shard_rows=args.shard_rows, chunk_rows=args.chunk_rows)
        array_dir = store / "features" / "center"
        files = shard_files(array_dir)
        raw_bytes = sum(f.stat().st_size for f in files)
        raw_buffer = np.empty(raw_bytes, dtype=np.uint8)
        raw_buffer.fill(0)  # first touch outside the timed region
        out = np.empty(shape, dtype=np.float16)
        out.fill(0)

        timings = time_interleaved(
            {"raw": lambda: read_raw(files, raw_buffer), "ours": lambda: cache.read_features(store, "center", out=out)},
            args.repeats,
        )
        raw, ours = timings["raw"], timings["ours"]
        print(f"raw files: {len(files)} shard files, {raw_bytes / 1e9:.3f} GB (features + shard indexes)")
        report("raw readinto (sequential)", raw_bytes, raw, None)
        report("cache.read_features(out=...)", n_bytes, ours, raw.median * n_bytes / raw_bytes)

        reference = zarr.open_array(array_dir, mode="r")[:]
        if not np.array_equal(reference.view(np.uint16), out.view(np.uint16)):
            raise RuntimeError("read_features returned other values than zarr")
        print("check: read_features == zarr.open_array(...)[:] bit for bit")
        if not args.skip_context:
            plain = time_repeats(lambda: zarr.open_array(array_dir, mode="r")[:], max(1, args.repeats // 2))
            report("zarr.open_array(...)[:] (allocates)", n_bytes, plain, raw.median * n_bytes / raw_bytes)
            h5_path = work / "features.h5"
            write_hdf5(h5_path, store, reference, args.chunk_rows)
            del reference

            def read_h5() -> None:
                with h5py.File(h5_path, "r") as handle:
                    handle["features"].read_direct(out)

            h5 = time_repeats(read_h5, args.repeats)
            report("h5py read_direct (same chunks)", n_bytes, h5, raw.median * n_bytes / raw_bytes)
        ratio = (n_bytes / ours.median) / (raw_bytes / raw.median)
        verdict = "meets" if ratio >= TARGET else "BELOW"
        print(f"RATIO read_features / raw throughput = {ratio:.3f} ({verdict} target {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
