"""Full read of a feature store through ``cache.read_features`` against a raw read of the same bytes.

Writes a (rows, blocks, dim) float16 array (default 40960 x 24 x 1024, 2 GB)
through ``cache.write_store`` (rows made shard by shard), then times,
all warm (each read once before timing) and into pre-allocated buffers:

* raw: the shard files read sequentially with ``readinto`` into one
  pre-allocated buffer, each file at a page-aligned offset (where the
  kernel copies fastest, so the strongest baseline);
* ``cache.read_features(..., out=buffer)`` into a pre-allocated page-aligned
  array (the placement of the raw buffer, and the one ``read_features``
  gives the arrays it allocates itself, as ``stores.load_store`` uses it);
* the same into a ``np.empty`` array, which numpy places 16 bytes past a
  page boundary: a kernel read whose target is 8 or 16 bytes off the file
  offset modulo 64 runs at about half speed on this machine, so
  ``read_features`` sends such targets through a staging buffer;
* for context: an HDF5 copy of the same array (same chunk shape, no
  compression) read with h5py's ``read_direct`` into the ``np.empty`` array,
  and plain ``zarr.open_array(...)[:]`` (zarr allocates its result).

* ``read_features`` into the aligned array with the chunks' CRC32C checks
  switched off, to measure what verifying them costs.

The readers take turns round by round. Prints the throughput of each, the
ratio read_features / raw for both placements of ``out`` (target >= 0.8; the
first is the headline), and the ratio read_features with / without checksum
verification (target >= 0.8: verifying costs at most 20 %).

    .venv/bin/python benchmarks/bench_read.py [--rows 40960] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
import zarr
from _common import (
    Timing,
    add_scratch_options,
    print_machine,
    scratch_dir,
    time_interleaved,
    time_repeats,
    write_synthetic_store,
)

from pipeline import cache
from pipeline.cache import _shard_reader
from pipeline.names import DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_ROWS

TARGET = 0.8
VERIFY_TARGET = 0.8  # checksums may cost at most 20 % of the reader's throughput


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40960)
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS)
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-context", action="store_true", help="Skip the plain zarr and h5py figures.")
    add_scratch_options(parser)
    return parser.parse_args()


def shard_files(array_dir: Path) -> list[Path]:
    """The shard files of a (rows, blocks, dim) array, in row order."""
    files = sorted((array_dir / "c").iterdir(), key=lambda p: int(p.name))
    return [folder / "0" / "0" for folder in files]


PAGE = 4096


def page_aligned_empty(n_bytes: int) -> np.ndarray:
    """A uint8 buffer starting on a page boundary, touched once (first touch is slow here)."""
    raw = np.empty(n_bytes + PAGE, dtype=np.uint8)
    start = (-raw.ctypes.data) % PAGE
    buffer = raw[start : start + n_bytes]
    buffer.fill(0)
    return buffer


def raw_slots(files: list[Path]) -> list[tuple[Path, int, int]]:
    """(file, buffer offset, size): each file at a page-aligned place, the kernel's fastest copy."""
    slots, offset = [], 0
    for file in files:
        size = file.stat().st_size
        slots.append((file, offset, size))
        offset += -(-size // PAGE) * PAGE
    return slots


def read_raw(slots: list[tuple[Path, int, int]], buffer: np.ndarray) -> None:
    """Read each whole file sequentially with readinto into its slot of ``buffer``."""
    view = memoryview(buffer)
    for file, offset, size in slots:
        done = 0
        with open(file, "rb", buffering=0) as handle:
            while done < size:
                got = handle.readinto(view[offset + done : offset + size])
                if not got:
                    raise RuntimeError(f"{file}: shorter than {size} bytes")
                done += got


def read_unverified(store: Path, out: np.ndarray) -> None:
    """``read_features`` with the chunk checksums left unchecked: what verifying them costs."""
    _shard_reader.VERIFY_CHUNK_CHECKSUMS = False
    try:
        cache.read_features(store, "center", out=out)
    finally:
        _shard_reader.VERIFY_CHUNK_CHECKSUMS = True


def write_hdf5(path: Path, features: np.ndarray, chunk_rows: int) -> None:
    """The same array in an HDF5 file, chunked like the store, uncompressed."""
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=features, chunks=(chunk_rows,) + features.shape[1:])


def read_hdf5(path: Path, out: np.ndarray) -> None:
    with h5py.File(path, "r") as handle:
        handle["features"].read_direct(out)


def report(name: str, n_bytes: int, timing: Timing, raw: Timing | None, raw_bytes: int) -> None:
    rate = n_bytes / timing.median / 1e9
    ratio = "" if raw is None else f"  ({rate / (raw_bytes / raw.median / 1e9):.2f} of raw)"
    print(f"{name:<42} {rate:6.2f} GB/s{ratio:<16} {timing.describe()}")


def check_same_as_zarr(array_dir: Path, values: np.ndarray) -> None:
    reference = zarr.open_array(array_dir, mode="r")[:]
    if not np.array_equal(reference.view(np.uint16), values.view(np.uint16)):
        raise RuntimeError("read_features returned other values than zarr")


def main() -> int:
    args = parse_args()
    print_machine()
    shape = (args.rows, args.blocks, args.dim)
    n_bytes = int(np.prod(shape)) * 2
    print(
        f"inputs: features {shape} float16 = {n_bytes / 1e9:.2f} GB, shard_rows {args.shard_rows}, "
        f"chunk_rows {args.chunk_rows}, uncompressed; every reader once untimed, then {args.repeats} "
        "timed rounds in which the readers take turns"
    )
    with scratch_dir(args, "bench_read_") as work:
        store = work / "features.zarr"
        write_synthetic_store(
            store, args.rows, args.blocks, args.dim, shard_rows=args.shard_rows, chunk_rows=args.chunk_rows
        )
        array_dir = store / "features" / "center"
        files = shard_files(array_dir)
        slots = raw_slots(files)
        raw_bytes = sum(size for _, _, size in slots)
        raw_buffer = page_aligned_empty(slots[-1][1] + slots[-1][2])
        out = np.empty(shape, dtype=np.float16)  # numpy's usual placement: 16 bytes past a page boundary
        out.fill(0)  # first touch outside the timed region
        aligned_out = page_aligned_empty(n_bytes).view(np.float16).reshape(shape)

        for target in (aligned_out, out):
            check_same_as_zarr(array_dir, cache.read_features(store, "center", out=target))
        print("check: read_features == zarr.open_array(...)[:] bit for bit, into both buffers")
        readers = {
            "raw readinto (sequential, aligned)": lambda: read_raw(slots, raw_buffer),
            "cache.read_features(out=aligned)": lambda: cache.read_features(store, "center", out=aligned_out),
            "cache.read_features(out=np.empty)": lambda: cache.read_features(store, "center", out=out),
            "read_features(out=aligned), CRC not verified": lambda: read_unverified(store, aligned_out),
        }
        if not args.skip_context:
            h5_path = work / "features.h5"
            write_hdf5(h5_path, out, args.chunk_rows)
            readers["h5py read_direct (same chunks, np.empty)"] = lambda: read_hdf5(h5_path, out)
        timings = time_interleaved(readers, args.repeats)
        raw = timings["raw readinto (sequential, aligned)"]
        ours = timings["cache.read_features(out=np.empty)"]
        aligned = timings["cache.read_features(out=aligned)"]
        print(
            f"raw: {len(files)} shard files, {raw_bytes / 1e9:.3f} GB (features + shard indexes), each at a page boundary"
        )
        print(f"np.empty out buffer address mod {PAGE}: {out.ctypes.data % PAGE}")
        for name, timing in timings.items():
            report(name, raw_bytes if timing is raw else n_bytes, timing, None if timing is raw else raw, raw_bytes)
        if not args.skip_context:
            plain = time_repeats(lambda: zarr.open_array(array_dir, mode="r")[:], max(1, args.repeats // 3))
            report("zarr.open_array(...)[:] (allocates)", n_bytes, plain, raw, raw_bytes)
        unverified = timings["read_features(out=aligned), CRC not verified"]
        ratio = unverified.median / aligned.median
        verdict = "meets" if ratio >= VERIFY_TARGET else "BELOW"
        print(
            f"RATIO read_features with / without CRC32C verification (aligned out) = {ratio:.3f} "
            f"({verdict} target {VERIFY_TARGET})"
        )
        for label, timing in (("page-aligned out, as read_features allocates it", aligned), ("np.empty out", ours)):
            ratio = (n_bytes / timing.median) / (raw_bytes / raw.median)
            verdict = "meets" if ratio >= TARGET else "BELOW"
            print(f"RATIO read_features / raw throughput ({label}) = {ratio:.3f} ({verdict} target {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
