"""The fast path of ``cache.read_features``: rows read straight out of raw shard files, every checksum verified.

Private to ``cache``. A raw shard is its inner chunks' bytes, each with its CRC32C, then an index with its own;
wanted rows are copied from read-only memory maps into one pre-allocated array by a few threads (checksums with
the ``crc32c`` package, which releases the GIL), verifying what zarr verifies and more (index, every chunk's
checksum and size, a committed shard's files present). ``ShardRowGatherer`` gathers rows in any order with
positional reads (training beyond memory). Problems raise :class:`ShardFileError` naming shard and file.
Layout and measurements: docs/cache-format.md.
"""

from __future__ import annotations

import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np
import zarr

_READ_THREADS = 2
_EMPTY_CHUNK = np.iinfo(np.uint64).max
_PIECE_BYTES = 1 << 20  # a chunk is checksummed and copied in pieces that stay in the CPU cache
_PAGE_BYTES = 4096
_CRC_BYTES = 4
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map every page at once (Linux): far fewer page faults
NO_DIGEST = -1  # the fill value of ``digests/<variant>``: no digest recorded (shard not committed)
VERIFY_CHUNK_CHECKSUMS = True  # off only in benchmarks/bench_read.py, to measure what verifying costs


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
    if geometry.layout.index_crc and crc32c.crc32c(table) != int.from_bytes(raw[-_CRC_BYTES:], "little"):
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


def shard_file_problems(
    array_dir: Path, layout: ShardLayout | None, array: zarr.Array, shard: int, digest: int = NO_DIGEST
) -> list[str]:
    """What is wrong with a committed shard's file, without reading its data (empty when nothing).

    ``digest``, when recorded, is the one :func:`shard_digest` gave when the shard was committed.
    """
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
    if not problems:
        try:
            check_digest(file, shard, geometry, index, digest)
        except ShardFileError as error:
            problems.append(str(error).removeprefix(f"shard {shard}: "))
    return problems


def _digest_of(file: Path, shard: int, geometry: _Geometry, index: np.ndarray) -> int:
    """CRC32C of the index (offsets, lengths, its checksum) and of every in-range chunk's stored CRC32C.

    The chunks' checksums stand for their contents (every read verifies a
    chunk against its checksum), so the digest names what the file holds.
    """
    with open(file, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(size - geometry.index_bytes if geometry.layout.index_at_end else 0)
        digest = crc32c.crc32c(handle.read(geometry.index_bytes))
        for local in range(geometry.chunks_in_range(shard)):
            offset = int(index[local, 0])
            if offset == _EMPTY_CHUNK:
                continue
            if geometry.layout.chunk_crc:
                handle.seek(offset + geometry.chunk_bytes)
                digest = crc32c.crc32c(handle.read(_CRC_BYTES), digest)
            else:
                handle.seek(offset)
                digest = crc32c.crc32c(crc32c.crc32c(handle.read(geometry.chunk_bytes)).to_bytes(4, "little"), digest)
    return digest


def shard_digest(array_dir: Path, layout: ShardLayout, array: zarr.Array, shard: int) -> int:
    """The digest of a shard file as it is on disk (recorded with the shard's progress flag when committed)."""
    file = shard_file(array_dir, shard, array.ndim)
    geometry = _geometry(layout, array)
    index = read_shard_index(file, shard, geometry)
    if index is None:
        raise ShardFileError(f"shard {shard}: file {file} is missing")
    return _digest_of(file, shard, geometry, index)


def check_digest(file: Path, shard: int, geometry: _Geometry, index: np.ndarray, digest: int) -> None:
    """Refuse a shard file whose digest is not the one recorded for ``shard`` (a file moved, swapped or copied)."""
    if digest != NO_DIGEST and _digest_of(file, shard, geometry, index) != digest:
        raise ShardFileError(
            f"shard {shard}: file {file} does not hold the rows committed as shard {shard} (its digest differs "
            "from the one recorded with the progress flag: a shard file swapped, moved or copied from elsewhere?)"
        )


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
    digests: np.ndarray | None = None,
) -> None:
    """Fill ``out`` with the rows ``row_index`` from the shard files, verifying what is read.

    ``committed`` (per shard, bool) marks the shards whose files must exist
    whole; ``None`` treats every absent file or chunk as the fill value.
    ``digests`` (per shard, ``NO_DIGEST`` where none is recorded) are checked
    against the files (:func:`check_digest`).
    """
    geometry = _geometry(layout, array)
    if not out.flags.c_contiguous:
        contiguous = np.empty(out.shape, dtype=out.dtype)
        read_raw(array_dir, layout, array, row_index, contiguous, committed, digests)
        out[...] = contiguous
        return
    reads, empty = _plan_reads(array_dir, geometry, array.ndim, row_index, committed, digests)
    fill = np.asarray(array.fill_value, dtype=array.dtype)
    for lo, hi in empty:
        out[lo:hi] = fill
    flat_out = out.reshape(len(row_index), geometry.row_bytes // array.dtype.itemsize).view(np.uint8)
    by_file: dict[Path, list[_ChunkRead]] = {}
    for read in reads:
        by_file.setdefault(read.file, []).append(read)
    if len(by_file) <= 1:
        for file_reads in by_file.values():
            _read_chunks_of_file(file_reads, flat_out, geometry)
        return
    with ThreadPoolExecutor(min(_READ_THREADS, len(by_file))) as pool:
        list(pool.map(lambda file_reads: _read_chunks_of_file(file_reads, flat_out, geometry), by_file.values()))


def _plan_reads(
    array_dir: Path,
    geometry: _Geometry,
    ndim: int,
    row_index: np.ndarray,
    committed: np.ndarray | None,
    digests: np.ndarray | None = None,
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
        if indexes[shard] is not None and digests is not None:
            check_digest(file, shard, geometry, indexes[shard], int(digests[shard]))
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


def _read_chunks_of_file(reads: list[_ChunkRead], flat_out: np.ndarray, geometry: _Geometry) -> None:
    """Copy the chunks of one shard file out of a read-only memory map, verifying each chunk's checksum.

    A memory map and numpy's copy run at the kernel's best read speed
    whatever the alignment of ``out`` (a ``readinto`` whose target and file
    offset differ by 4 to 28 bytes modulo 64 measured 2-6 GB/s instead of
    9-10 here), and a chunk's checksum is computed piece by piece over the
    bytes just copied into ``out``, while they are in the CPU cache (so the
    copy is checked too). (Shard files are replaced by renames, never
    truncated in place, which would make the map fault.)
    """
    first = min(read.offset for read in reads)
    start = first - first % mmap.ALLOCATIONGRANULARITY
    stop = max(read.offset for read in reads) + geometry.stored_chunk_bytes
    with open(reads[0].file, "rb") as handle:
        if stop > os.fstat(handle.fileno()).st_size:
            raise ShardFileError(f"shard {reads[0].shard}: file {reads[0].file} is shorter than its index says")
        mapped = mmap.mmap(
            handle.fileno(), stop - start, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | _POPULATE, offset=start
        )
    source = np.frombuffer(mapped, dtype=np.uint8)
    verify = geometry.layout.chunk_crc and VERIFY_CHUNK_CHECKSUMS
    for read in reads:
        stored = source[read.offset - start : read.offset - start + geometry.stored_chunk_bytes]
        data = stored[: geometry.chunk_bytes]
        crc = 0
        if read.wanted is None:
            target = flat_out[read.lo : read.hi].reshape(-1)
            for piece in range(0, geometry.chunk_bytes, _PIECE_BYTES):
                landed = target[piece : piece + _PIECE_BYTES]
                landed[...] = data[piece : piece + _PIECE_BYTES]
                if verify:
                    crc = crc32c.crc32c(landed, crc)
        else:
            crc = crc32c.crc32c(data) if verify else 0
            flat_out[read.lo : read.hi] = data.reshape(geometry.layout.chunk_rows, geometry.row_bytes)[read.wanted]
        if verify and crc != int.from_bytes(stored[geometry.chunk_bytes :].tobytes(), "little"):
            raise ShardFileError(
                f"shard {read.shard}: chunk {read.local} of {read.file} fails its CRC32C checksum (the data are damaged)"
            )


def page_aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty`` starting on a page boundary (whole pages: no false sharing with other arrays)."""
    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n_bytes + _PAGE_BYTES, dtype=np.uint8)
    start = (-raw.ctypes.data) % _PAGE_BYTES
    return raw[start : start + n_bytes].view(dtype).reshape(shape)


class ShardRowGatherer:
    """Rows of one array whose every shard is committed, gathered in any order from the shard files.

    Thread-safe: shard indexes and the set of verified chunks are shared
    under a lock; files are opened per call. Over an epoch, verifying costs
    at most one extra read of each chunk. A missing file or chunk, a damaged
    index or a chunk that fails its checksum raises ``ShardFileError``.
    """

    def __init__(
        self, array_dir: Path, layout: ShardLayout, array: zarr.Array, digests: np.ndarray | None = None
    ) -> None:
        self.array_dir = Path(array_dir)
        self.digests = digests
        self.geometry = _geometry(layout, array)
        self.ndim = array.ndim
        self._lock = threading.Lock()
        self._offsets: dict[int, np.ndarray] = {}  # shard -> byte offset of each of its chunks
        self._verified: set[int] = set()  # chunks (global numbers) whose checksum held

    def gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Fill ``out`` (len(rows), ...), C-contiguous, with ``rows`` in the given order."""
        geometry, layout = self.geometry, self.geometry.layout
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        flat = out.reshape(len(rows), -1).view(np.uint8).reshape(len(rows), geometry.row_bytes)
        chunks = rows // layout.chunk_rows
        shards = chunks // geometry.chunks_per_shard
        offsets = np.empty(len(rows), dtype=np.int64)
        for shard in np.unique(shards).tolist():
            here = shards == shard
            chunk_offsets = self._chunk_offsets(shard)
            offsets[here] = chunk_offsets[chunks[here] % geometry.chunks_per_shard]
            offsets[here] += (rows[here] % layout.chunk_rows) * geometry.row_bytes
        descriptors: dict[int, int] = {}
        try:
            pending = np.ones(len(rows), dtype=bool)
            with self._lock:
                unverified = [c for c in np.unique(chunks).tolist() if c not in self._verified]
            if layout.chunk_crc and VERIFY_CHUNK_CHECKSUMS:
                for chunk in unverified:
                    data = self._verified_chunk(chunk, descriptors)
                    here = np.flatnonzero(chunks == chunk)
                    flat[here] = data[rows[here] - chunk * layout.chunk_rows]
                    pending[here] = False
            # A run continues while the next pending row follows in the same file.
            todo = np.flatnonzero(pending)
            follows = (
                (np.diff(todo) == 1) & (np.diff(shards[todo]) == 0) & (np.diff(offsets[todo]) == geometry.row_bytes)
            )
            breaks = np.flatnonzero(~follows)
            for lo, hi in zip(
                np.concatenate([[0], breaks + 1]).tolist(), np.concatenate([breaks + 1, [len(todo)]]).tolist()
            ):
                if lo == hi:
                    continue
                first, last = int(todo[lo]), int(todo[hi - 1]) + 1
                shard = int(shards[first])
                target = memoryview(flat[first:last]).cast("B")
                self._read(self._descriptor(shard, descriptors), shard, target, int(offsets[first]))
        finally:
            for descriptor in descriptors.values():
                os.close(descriptor)

    def _file(self, shard: int) -> Path:
        return shard_file(self.array_dir, shard, self.ndim)

    def _descriptor(self, shard: int, descriptors: dict[int, int]) -> int:
        if shard not in descriptors:
            descriptors[shard] = os.open(self._file(shard), os.O_RDONLY)
        return descriptors[shard]

    def _read(self, descriptor: int, shard: int, target: memoryview, offset: int) -> None:
        done = 0
        while done < len(target):
            got = os.preadv(descriptor, [target[done:]], offset + done)
            if not got:
                raise ShardFileError(f"shard {shard}: file {self._file(shard)} is shorter than its index says")
            done += got

    def _chunk_offsets(self, shard: int) -> np.ndarray:
        with self._lock:
            if shard in self._offsets:
                return self._offsets[shard]
        geometry, file = self.geometry, self._file(shard)
        index = read_shard_index(file, shard, geometry)
        if index is None:
            raise ShardFileError(f"shard {shard}: file {file} is missing, but the shard is marked done")
        for local in range(geometry.chunks_in_range(shard)):
            offset, nbytes = index[local]
            if offset == _EMPTY_CHUNK:
                raise ShardFileError(
                    f"shard {shard}: chunk {local} is missing from {file}, but the shard is marked done"
                )
            if nbytes != geometry.stored_chunk_bytes:
                raise ShardFileError(
                    f"shard {shard}: chunk {local} of {file} has {nbytes} bytes, expected {geometry.stored_chunk_bytes}"
                )
        if self.digests is not None:
            check_digest(file, shard, geometry, index, int(self.digests[shard]))
        offsets = index[:, 0].astype(np.int64)
        with self._lock:
            self._offsets[shard] = offsets
        return offsets

    def _verified_chunk(self, chunk: int, descriptors: dict[int, int]) -> np.ndarray:
        """A chunk's rows (chunk_rows, row_bytes), read whole and checked against its CRC32C."""
        geometry = self.geometry
        shard, local = divmod(chunk, geometry.chunks_per_shard)
        stored = np.empty(geometry.stored_chunk_bytes, dtype=np.uint8)
        offset = int(self._chunk_offsets(shard)[local])
        self._read(self._descriptor(shard, descriptors), shard, memoryview(stored), offset)
        data = stored[: geometry.chunk_bytes]
        if crc32c.crc32c(data) != int.from_bytes(stored[geometry.chunk_bytes :].tobytes(), "little"):
            raise ShardFileError(
                f"shard {shard}: chunk {local} of {self._file(shard)} fails its CRC32C checksum (the data are damaged)"
            )
        with self._lock:
            self._verified.add(chunk)
        return data.reshape(geometry.layout.chunk_rows, geometry.row_bytes)
