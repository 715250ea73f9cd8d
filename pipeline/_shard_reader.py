"""The fast path of ``cache.read_features``: rows read straight out of uncompressed shard files.

Private to ``cache`` (which decides when to use it and checks the store
first). An uncompressed Zarr v3 shard is the raw bytes of its inner chunks
plus an index of (offset, length) pairs, so wanted rows are read with plain
file reads into one pre-allocated array: runs of rows contiguous both in a
file and in the output are read directly (split into pieces that a few
threads share), rows scattered inside a chunk are picked from the whole
chunk. Chunks that hold no bytes (all fill value) and shard files never
written read as the fill value, exactly as ``zarr`` reads them; tests
compare the two on every kind of selection. Plain ``zarr`` reads of this
layout measured 0.12 of raw disk speed (``benchmarks/bench_read.py``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

_READ_THREADS = 2
_EMPTY_CHUNK = np.iinfo(np.uint64).max
_SPAN_BYTES = 64 << 20  # largest direct read one thread does at a time
_COPY_ALIGNMENT = 64
_PAGE_BYTES = 4096
_STAGING_BYTES = 4 << 20
_STAGING: list[np.ndarray] = []  # free staging buffers (list.append/pop are atomic)


class ShardFileError(RuntimeError):
    """A shard file that does not hold what its index says."""


@dataclass(frozen=True)
class ShardLayout:
    shard_rows: int
    chunk_rows: int
    index_at_end: bool


def raw_shard_layout(array: zarr.Array) -> ShardLayout | None:
    """The layout when shards are raw little-endian chunks, else None."""
    meta = array.metadata.to_dict()
    codecs = meta["codecs"]
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return None
    config = codecs[0]["configuration"]
    inner = config["codecs"]
    if len(inner) != 1 or inner[0]["name"] != "bytes":
        return None
    if array.dtype.itemsize > 1 and inner[0].get("configuration", {}).get("endian", "little") != "little":
        return None
    if meta["chunk_key_encoding"] != {"name": "default", "configuration": {"separator": "/"}}:
        return None
    shard_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    chunk_shape = config["chunk_shape"]
    if tuple(shard_shape[1:]) != tuple(array.shape[1:]) or tuple(chunk_shape[1:]) != tuple(array.shape[1:]):
        return None
    index_codecs = [c["name"] for c in config["index_codecs"]]
    if index_codecs not in (["bytes"], ["bytes", "crc32c"]):
        return None
    return ShardLayout(shard_shape[0], chunk_shape[0], config.get("index_location", "end") == "end")


@dataclass(frozen=True)
class _Span:
    """Bytes of one shard file that land, in order, in ``out`` rows [lo, hi)."""

    file: Path
    offset: int
    lo: int
    hi: int


@dataclass(frozen=True)
class _Gather:
    """Rows of ``out`` [lo, hi) picked (``wanted``) from one whole chunk of a shard file."""

    file: Path
    offset: int
    chunk_rows: int
    wanted: np.ndarray
    lo: int
    hi: int


def read_raw(array_dir: Path, layout: ShardLayout, array: zarr.Array, row_index: np.ndarray, out: np.ndarray) -> None:
    """Fill ``out`` from the shard files: contiguous runs by direct reads, scattered rows by whole chunks."""
    row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
    if not out.flags.c_contiguous:
        contiguous = np.empty(out.shape, dtype=out.dtype)
        read_raw(array_dir, layout, array, row_index, contiguous)
        out[...] = contiguous
        return
    spans, gathers, empty = _plan_raw_reads(array_dir, layout, array, row_index, row_bytes)
    fill = np.asarray(array.fill_value, dtype=array.dtype)
    for lo, hi in empty:
        out[lo:hi] = fill
    flat_out = out.reshape(len(row_index), row_bytes // array.dtype.itemsize).view(np.uint8)

    def run(task: _Span | _Gather) -> None:
        if isinstance(task, _Span):
            _read_span(task, flat_out, row_bytes)
        else:
            _read_gather(task, flat_out, row_bytes)

    tasks: list[_Span | _Gather] = [*spans, *gathers]
    if len(tasks) == 1:
        run(tasks[0])
        return
    with ThreadPoolExecutor(min(_READ_THREADS, len(tasks)) or 1) as pool:
        list(pool.map(run, tasks))


def _plan_raw_reads(
    array_dir: Path, layout: ShardLayout, array: zarr.Array, row_index: np.ndarray, row_bytes: int
) -> tuple[list[_Span], list[_Gather], list[tuple[int, int]]]:
    """Group wanted rows by inner chunk; merge runs contiguous both in a file and in ``out``.

    Returns the direct reads (split to at most ``_SPAN_BYTES`` each, so that
    threads share the work), the chunks to read whole and pick rows from, and
    the ``out`` row ranges of chunks that hold no bytes (fill value).
    """
    chunks_per_shard = layout.shard_rows // layout.chunk_rows
    chunk_bytes = layout.chunk_rows * row_bytes
    trailing = "/".join("0" for _ in array.shape[1:])
    chunk_of_row = row_index // layout.chunk_rows
    boundaries = np.flatnonzero(np.diff(chunk_of_row)) + 1
    starts = np.concatenate([[0], boundaries]).astype(np.int64) if len(row_index) else np.array([], dtype=np.int64)
    stops = (
        np.concatenate([boundaries, [len(row_index)]]).astype(np.int64)
        if len(row_index)
        else np.array([], dtype=np.int64)
    )
    crc_bytes = 4 * _has_crc(array)

    indexes: dict[int, np.ndarray | None] = {}
    for shard in np.unique(chunk_of_row // chunks_per_shard):
        shard_file = array_dir / "c" / str(int(shard)) / trailing
        indexes[int(shard)] = _read_shard_index(shard_file, chunks_per_shard, layout.index_at_end, crc_bytes)

    spans: list[_Span] = []
    gathers: list[_Gather] = []
    empty: list[tuple[int, int]] = []
    for lo, hi in zip(starts.tolist(), stops.tolist()):
        chunk = int(chunk_of_row[lo])
        shard, local = divmod(chunk, chunks_per_shard)
        index = indexes[shard]
        if index is None or index[local, 0] == _EMPTY_CHUNK:
            empty.append((lo, hi))
            continue
        offset, nbytes = int(index[local, 0]), int(index[local, 1])
        if nbytes != chunk_bytes:
            raise ShardFileError(f"{array_dir}: chunk {chunk} has {nbytes} bytes, expected {chunk_bytes}")
        shard_file = array_dir / "c" / str(shard) / trailing
        first_row = chunk * layout.chunk_rows
        wanted = row_index[lo:hi] - first_row
        if hi - lo != int(wanted[-1] - wanted[0]) + 1:
            gathers.append(_Gather(shard_file, offset, layout.chunk_rows, wanted, lo, hi))
            continue
        span = _Span(shard_file, offset + int(wanted[0]) * row_bytes, lo, hi)
        previous = spans[-1] if spans else None
        if (
            previous is not None
            and previous.file == span.file
            and previous.hi == span.lo
            and previous.offset + (previous.hi - previous.lo) * row_bytes == span.offset
        ):
            spans[-1] = _Span(previous.file, previous.offset, previous.lo, span.hi)
        else:
            spans.append(span)
    rows_per_piece = max(1, _SPAN_BYTES // row_bytes)
    pieces = [
        _Span(span.file, span.offset + (lo - span.lo) * row_bytes, lo, min(lo + rows_per_piece, span.hi))
        for span in spans
        for lo in range(span.lo, span.hi, rows_per_piece)
    ]
    return pieces, gathers, empty


def _read_shard_index(shard_file: Path, chunks_per_shard: int, index_at_end: bool, crc_bytes: int) -> np.ndarray | None:
    """The (chunks, 2) offset/length table of a shard file, None when the file does not exist."""
    if not shard_file.exists():
        return None
    index_bytes = chunks_per_shard * 16
    with open(shard_file, "rb") as handle:
        if index_at_end:
            handle.seek(-(index_bytes + crc_bytes), os.SEEK_END)
        index = np.frombuffer(handle.read(index_bytes), dtype="<u8")
    return index.reshape(chunks_per_shard, 2)


def _read_span(span: _Span, flat_out: np.ndarray, row_bytes: int) -> None:
    """Read a span straight into ``out`` when the kernel copy is cache-line aligned, else via a staging buffer.

    Measured on this project's VMs: a kernel read whose target and file offset
    differ by 8 or 16 bytes modulo 64 (numpy puts large arrays 16 bytes past a
    page boundary) runs at half speed; reading into an aligned staging buffer
    and copying from it costs far less than that.
    """
    target = flat_out[span.lo : span.hi].reshape(-1)
    with open(span.file, "rb", buffering=0) as handle:
        handle.seek(span.offset)
        if (target.ctypes.data - span.offset) % _COPY_ALIGNMENT == 0:
            _read_exact(handle, memoryview(target), span.file)
            return
        staging = _take_staging()
        try:
            shift = span.offset % _COPY_ALIGNMENT
            room = len(staging) - shift
            for start in range(0, len(target), room):
                piece = target[start : start + room]
                _read_exact(handle, memoryview(staging[shift : shift + len(piece)]), span.file)
                piece[...] = staging[shift : shift + len(piece)]
        finally:
            _STAGING.append(staging)


def _read_gather(task: _Gather, flat_out: np.ndarray, row_bytes: int) -> None:
    scratch = np.empty((task.chunk_rows, row_bytes), dtype=np.uint8)
    with open(task.file, "rb", buffering=0) as handle:
        handle.seek(task.offset)
        _read_exact(handle, memoryview(scratch).cast("B"), task.file)
    flat_out[task.lo : task.hi] = scratch[task.wanted]


def page_aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty`` starting on a page boundary, where the kernel copies shard bytes fastest (see ``_read_span``)."""
    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n_bytes + _PAGE_BYTES, dtype=np.uint8)
    start = (-raw.ctypes.data) % _PAGE_BYTES
    return raw[start : start + n_bytes].view(dtype).reshape(shape)


def _take_staging() -> np.ndarray:
    """A page-aligned staging buffer, reused across reads (new pages fault slowly on first touch)."""
    try:
        return _STAGING.pop()
    except IndexError:
        raw = np.empty(_STAGING_BYTES + _PAGE_BYTES, dtype=np.uint8)
        start = (-raw.ctypes.data) % _PAGE_BYTES
        return raw[start : start + _STAGING_BYTES]


def _has_crc(array: zarr.Array) -> int:
    config = array.metadata.to_dict()["codecs"][0]["configuration"]
    return int(any(c["name"] == "crc32c" for c in config["index_codecs"]))


def _read_exact(handle: Any, view: memoryview, name: Path) -> None:
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise ShardFileError(f"{name}: shard file is shorter than its index says")
        done += got
