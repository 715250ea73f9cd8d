"""The fast path of ``cache.read_features``: rows read straight out of raw shard files, checksums verified.

Private to ``cache`` (which decides when to use it and checks the store
first). A raw Zarr v3 shard is its inner chunks' bytes, each followed by the
chunk's CRC32C (zarr's ``crc32c`` codec), then an index of (offset, length)
pairs followed by its own CRC32C. Wanted rows are read with plain file reads
into one pre-allocated array: a chunk wanted whole is read straight into its
place in ``out`` in pieces, each piece's checksum computed while it is still
in the CPU cache; a chunk wanted in part is read whole, verified, and its
rows picked. A few threads share the chunks.

What zarr would verify is verified here too, and more: the index checksum,
every chunk's checksum and size, offsets inside the file, and, for shards
whose progress flag is set, that the file and every chunk in range exist (an
extraction writes every chunk, also one of zeros, so a missing one is lost
data, not fill). Shards not yet committed read as the fill value, exactly as
``zarr`` reads them; tests compare the two on every kind of selection.
Problems raise :class:`ShardFileError` naming the shard and the file. Plain
``zarr`` reads of this layout measured 0.12 of raw disk speed
(``benchmarks/bench_read.py``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr

_READ_THREADS = 2
_EMPTY_CHUNK = np.iinfo(np.uint64).max
_PIECE_BYTES = 1 << 20  # a direct read is done and checksummed in pieces that stay in the CPU cache
_COPY_ALIGNMENT = 64
_PAGE_BYTES = 4096
_CRC_BYTES = 4
VERIFY_CHUNK_CHECKSUMS = True  # off only in benchmarks/bench_read.py, to measure what verifying costs
_STAGING: list[np.ndarray] = []  # free staging buffers of _PIECE_BYTES + a page (list.append/pop are atomic)


class ShardFileError(RuntimeError):
    """A shard file that is missing, short, or does not hold what its index says."""


@dataclass(frozen=True)
class ShardLayout:
    shard_rows: int
    chunk_rows: int
    index_at_end: bool
    index_crc: bool
    chunk_crc: bool


def raw_shard_layout(array: zarr.Array) -> ShardLayout | None:
    """The layout when shards are raw little-endian chunks (with or without checksums), else None."""
    meta = array.metadata.to_dict()
    codecs = meta["codecs"]
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return None
    config = codecs[0]["configuration"]
    inner = [c["name"] for c in config["codecs"]]
    if inner not in (["bytes"], ["bytes", "crc32c"]):
        return None
    if array.dtype.itemsize > 1 and config["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
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
    return ShardLayout(
        shard_rows=shard_shape[0],
        chunk_rows=chunk_shape[0],
        index_at_end=config.get("index_location", "end") == "end",
        index_crc=index_codecs == ["bytes", "crc32c"],
        chunk_crc=inner == ["bytes", "crc32c"],
    )


def shard_file(array_dir: Path, shard: int, ndim: int) -> Path:
    return array_dir / "c" / str(shard) / "/".join("0" for _ in range(ndim - 1))


@dataclass(frozen=True)
class _Geometry:
    """Sizes of one array's shards, in bytes and rows."""

    layout: ShardLayout
    n_rows: int
    row_bytes: int

    @property
    def chunks_per_shard(self) -> int:
        return self.layout.shard_rows // self.layout.chunk_rows

    @property
    def chunk_bytes(self) -> int:
        return self.layout.chunk_rows * self.row_bytes

    @property
    def stored_chunk_bytes(self) -> int:
        return self.chunk_bytes + _CRC_BYTES * self.layout.chunk_crc

    @property
    def index_bytes(self) -> int:
        return self.chunks_per_shard * 16 + _CRC_BYTES * self.layout.index_crc

    def chunks_in_range(self, shard: int) -> int:
        """Inner chunks of a shard holding at least one row of the array (zarr writes those, never the others)."""
        first_row = shard * self.layout.shard_rows
        rows = max(0, min(self.layout.shard_rows, self.n_rows - first_row))
        return -(-rows // self.layout.chunk_rows)


def _geometry(layout: ShardLayout, array: zarr.Array) -> _Geometry:
    return _Geometry(layout, array.shape[0], int(np.prod(array.shape[1:])) * array.dtype.itemsize)


def read_shard_index(file: Path, shard: int, geometry: _Geometry) -> np.ndarray | None:
    """The verified (chunks, 2) offset/length table of a shard file; None when the file does not exist."""
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        return None
    if size < geometry.index_bytes:
        what = "empty (0 bytes)" if size == 0 else f"{size} bytes, shorter than its index ({geometry.index_bytes})"
        raise ShardFileError(f"shard {shard}: file {file} is {what}")
    with open(file, "rb") as handle:
        if geometry.layout.index_at_end:
            handle.seek(size - geometry.index_bytes)
        raw = handle.read(geometry.index_bytes)
    table = raw[: geometry.chunks_per_shard * 16]
    if geometry.layout.index_crc and google_crc32c.value(table) != int.from_bytes(raw[-_CRC_BYTES:], "little"):
        raise ShardFileError(f"shard {shard}: file {file} has a damaged index (its CRC32C does not match)")
    index = np.frombuffer(table, dtype="<u8").reshape(geometry.chunks_per_shard, 2)
    data_start = 0 if geometry.layout.index_at_end else geometry.index_bytes
    data_end = size - geometry.index_bytes if geometry.layout.index_at_end else size
    used = index[:, 0] != _EMPTY_CHUNK
    ends = index[used, 0] + index[used, 1]
    if used.any() and (index[used, 0].min() < data_start or ends.max() > data_end):
        raise ShardFileError(
            f"shard {shard}: file {file} is {size} bytes, too short for the chunks its index lists (truncated?)"
        )
    return index


def shard_file_problems(array_dir: Path, layout: ShardLayout | None, array: zarr.Array, shard: int) -> list[str]:
    """What is wrong with a committed shard's file, without reading its data (empty when nothing)."""
    file = shard_file(array_dir, shard, array.ndim)
    if layout is None:
        return [] if file.exists() else [f"file {file} is missing"]
    geometry = _geometry(layout, array)
    try:
        index = read_shard_index(file, shard, geometry)
    except ShardFileError as error:
        return [str(error).removeprefix(f"shard {shard}: ")]
    if index is None:
        return [f"file {file} is missing"]
    problems = []
    for local in range(geometry.chunks_in_range(shard)):
        offset, nbytes = index[local]
        if offset == _EMPTY_CHUNK:
            problems.append(f"chunk {local} is missing from {file}")
        elif nbytes != geometry.stored_chunk_bytes:
            problems.append(f"chunk {local} of {file} has {nbytes} bytes, expected {geometry.stored_chunk_bytes}")
    return problems


@dataclass(frozen=True)
class _ChunkRead:
    """One stored chunk: read whole into ``out`` rows [lo, hi) (``wanted`` None), or into a scratch buffer to pick ``wanted`` rows from."""

    file: Path
    shard: int
    local: int
    offset: int
    lo: int
    hi: int
    wanted: np.ndarray | None


def read_raw(
    array_dir: Path,
    layout: ShardLayout,
    array: zarr.Array,
    row_index: np.ndarray,
    out: np.ndarray,
    committed: np.ndarray | None = None,
) -> None:
    """Fill ``out`` with the rows ``row_index`` from the shard files, verifying what is read.

    ``committed`` (per shard, bool) marks the shards whose files must exist
    whole; ``None`` treats every absent file or chunk as the fill value.
    """
    geometry = _geometry(layout, array)
    if not out.flags.c_contiguous:
        contiguous = np.empty(out.shape, dtype=out.dtype)
        read_raw(array_dir, layout, array, row_index, contiguous, committed)
        out[...] = contiguous
        return
    reads, empty = _plan_reads(array_dir, geometry, array.ndim, row_index, committed)
    fill = np.asarray(array.fill_value, dtype=array.dtype)
    for lo, hi in empty:
        out[lo:hi] = fill
    flat_out = out.reshape(len(row_index), geometry.row_bytes // array.dtype.itemsize).view(np.uint8)

    def run(task: _ChunkRead) -> None:
        if task.wanted is None:
            _read_whole_chunk(task, flat_out, geometry)
        else:
            _read_part_of_chunk(task, flat_out, geometry)

    if len(reads) <= 1:
        for task in reads:
            run(task)
        return
    with ThreadPoolExecutor(min(_READ_THREADS, len(reads))) as pool:
        list(pool.map(run, reads))


def _plan_reads(
    array_dir: Path, geometry: _Geometry, ndim: int, row_index: np.ndarray, committed: np.ndarray | None
) -> tuple[list[_ChunkRead], list[tuple[int, int]]]:
    """One read per stored chunk holding wanted rows; and the ``out`` row ranges of chunks holding none (fill value)."""
    layout = geometry.layout
    chunk_of_row = row_index // layout.chunk_rows
    boundaries = np.flatnonzero(np.diff(chunk_of_row)) + 1
    starts = np.concatenate([[0], boundaries]).astype(np.int64) if len(row_index) else np.array([], dtype=np.int64)
    stops = np.concatenate([boundaries, [len(row_index)]]).astype(np.int64) if len(row_index) else starts
    indexes: dict[int, np.ndarray | None] = {}
    for shard in np.unique(chunk_of_row // geometry.chunks_per_shard).tolist():
        file = shard_file(array_dir, shard, ndim)
        indexes[shard] = read_shard_index(file, shard, geometry)
        if indexes[shard] is None and committed is not None and committed[shard]:
            raise ShardFileError(f"shard {shard}: file {file} is missing, but the shard is marked done")
    reads: list[_ChunkRead] = []
    empty: list[tuple[int, int]] = []
    for lo, hi in zip(starts.tolist(), stops.tolist()):
        chunk = int(chunk_of_row[lo])
        shard, local = divmod(chunk, geometry.chunks_per_shard)
        file = shard_file(array_dir, shard, ndim)
        index = indexes[shard]
        if index is None or index[local, 0] == _EMPTY_CHUNK:
            if committed is not None and committed[shard]:
                raise ShardFileError(
                    f"shard {shard}: chunk {local} is missing from {file}, but the shard is marked done"
                )
            empty.append((lo, hi))
            continue
        offset, nbytes = int(index[local, 0]), int(index[local, 1])
        if nbytes != geometry.stored_chunk_bytes:
            raise ShardFileError(
                f"shard {shard}: chunk {local} of {file} has {nbytes} bytes, expected {geometry.stored_chunk_bytes}"
            )
        wanted = row_index[lo:hi] - chunk * layout.chunk_rows
        whole = hi - lo == layout.chunk_rows  # increasing rows of one chunk: all of them
        reads.append(_ChunkRead(file, shard, local, offset, lo, hi, None if whole else wanted))
    return reads, empty


def _read_whole_chunk(task: _ChunkRead, flat_out: np.ndarray, geometry: _Geometry) -> None:
    """Read a chunk straight into ``out`` piece by piece, checksumming each piece while it is cached.

    Measured on this project's VMs: a kernel read whose target and file offset
    differ by 8 or 16 bytes modulo 64 runs at half speed; such pieces are read
    into an aligned staging buffer and copied, which costs far less.
    """
    target = flat_out[task.lo : task.hi].reshape(-1)
    verify = geometry.layout.chunk_crc and VERIFY_CHUNK_CHECKSUMS
    crc = 0
    with open(task.file, "rb", buffering=0) as handle:
        handle.seek(task.offset)
        direct = (target.ctypes.data - task.offset) % _COPY_ALIGNMENT == 0
        staging = None if direct else _take_staging()
        try:
            shift = task.offset % _COPY_ALIGNMENT
            for start in range(0, len(target), _PIECE_BYTES):
                piece = target[start : start + _PIECE_BYTES]
                landing = piece if staging is None else staging[shift : shift + len(piece)]
                _read_exact(handle, memoryview(landing), task)
                if verify:
                    crc = google_crc32c.extend(crc, landing)
                if staging is not None:
                    piece[...] = landing
        finally:
            if staging is not None:
                _STAGING.append(staging)
        if verify:
            _check_crc(crc, handle.read(_CRC_BYTES), task)


def _read_part_of_chunk(task: _ChunkRead, flat_out: np.ndarray, geometry: _Geometry) -> None:
    scratch = np.empty(geometry.stored_chunk_bytes, dtype=np.uint8)
    with open(task.file, "rb", buffering=0) as handle:
        handle.seek(task.offset)
        _read_exact(handle, memoryview(scratch), task)
    data = scratch[: geometry.chunk_bytes]
    if geometry.layout.chunk_crc and VERIFY_CHUNK_CHECKSUMS:
        _check_crc(google_crc32c.value(data), scratch[geometry.chunk_bytes :].tobytes(), task)
    flat_out[task.lo : task.hi] = data.reshape(geometry.layout.chunk_rows, geometry.row_bytes)[task.wanted]


def _check_crc(computed: int, stored: bytes, task: _ChunkRead) -> None:
    if len(stored) != _CRC_BYTES or computed != int.from_bytes(stored, "little"):
        raise ShardFileError(
            f"shard {task.shard}: chunk {task.local} of {task.file} fails its CRC32C checksum (the data are damaged)"
        )


def page_aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty`` starting on a page boundary, where the kernel copies shard bytes fastest (see ``_read_whole_chunk``)."""
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
        return page_aligned_empty((_PIECE_BYTES + _PAGE_BYTES,), np.dtype(np.uint8))


def _read_exact(handle: Any, view: memoryview, task: _ChunkRead) -> None:
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise ShardFileError(f"shard {task.shard}: file {task.file} is shorter than its index says")
        done += got
