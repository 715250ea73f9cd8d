"""The feature cache: the only module that touches Zarr.

One store per (split, model, tap) is a Zarr v3 group holding row-aligned arrays
in manifest order::

    labels   (N,)  int8        0 real, 1 fake
    paths    (N,)  string      relative to the data root
    dataset  (N,)  string
    class    (N,)  string      only when the manifest has classes
    valid    (N,)  bool        False where the image could not be decoded
    error    (N,)  string      why, "" for valid rows
    features/<variant>  (N, n_blocks, dim)  float16 by default, sharded
    progress/<variant>  (n_shards,) bool    a shard is committed when True

A variant is one way of turning an image into pixels: ``center`` (the
evaluation crop), ``view_000`` ... (seeded training augmentations),
``tencrop_0`` ... ``tencrop_9`` (ten-crop evaluation of large images) or a
perturbation such as ``jpeg-official``. Work is committed shard by shard: the
feature shard, the shard's ``valid`` and ``error`` chunks, then its progress
flag. Zarr's local store writes every file through a temporary name and a
rename, so each of those files is whole or absent and a resume can trust
every flag it finds.

Reading goes through whole inner chunks of uncompressed shards, mapped
straight from the shard files into one pre-allocated array (plain
``zarr`` reads measured 0.12 of raw disk speed on this layout); anything else
falls back to ``zarr``.
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

SCHEMA = "rine-pipeline/feature-store@1"
TAPS = ("ln2", "hidden")  # see backbone.py for what each tap is
DEFAULT_MODEL = "openai/clip-vit-large-patch14"
TEN_CROP = "tencrop"  # variants tencrop_0 .. tencrop_9; scored by the sigmoid of their mean logit
DEFAULT_SHARD_ROWS = 1024
DEFAULT_CHUNK_ROWS = 256
_READ_THREADS = 2
_EMPTY_CHUNK = np.iinfo(np.uint64).max
_SPAN_BYTES = 64 << 20  # largest direct read one thread does at a time
_COPY_ALIGNMENT = 64
_PAGE_BYTES = 4096
_STAGING_BYTES = 4 << 20
_STAGING: list[np.ndarray] = []  # free staging buffers (list.append/pop are atomic)


class StoreError(RuntimeError):
    """A store that cannot be used as asked (missing, mismatched, incomplete)."""


@dataclass(frozen=True)
class StoreIdentity:
    """What the stored numbers depend on; a store built otherwise is refused."""

    manifest_sha256: str
    model_id: str
    model_revision: str
    tap: str
    blocks: tuple[int, ...]
    dim: int
    crop_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: str
    compute_dtype: str
    seed: int
    max_pixels: int
    shard_rows: int
    chunk_rows: int

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "StoreIdentity":
        values = {}
        for f in fields(cls):
            value = attrs[f.name]
            values[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def differences(self, other: "StoreIdentity") -> list[str]:
        """Human-readable list of the fields where ``other`` differs."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name}: store has {mine!r}, asked for {theirs!r}")
        return out

    def compatible_features(self, other: "StoreIdentity") -> list[str]:
        """Differences that forbid training on one store and scoring another."""
        keys = ("model_id", "model_revision", "tap", "blocks", "dim", "crop_size", "mean", "std")
        return [d for d in self.differences(other) if d.split(":")[0] in keys]


@dataclass(frozen=True)
class VariantSpec:
    """How the pixels of one feature array were produced."""

    name: str
    kind: str  # "center", "train_view", "ten_crop" or "perturb"
    view: int = 0
    perturbation: str | None = None
    preset: str | None = None

    @staticmethod
    def center() -> "VariantSpec":
        return VariantSpec("center", "center")

    @staticmethod
    def train_view(view: int) -> "VariantSpec":
        return VariantSpec(f"view_{view:03d}", "train_view", view=view)

    @staticmethod
    def ten_crop(crop: int) -> "VariantSpec":
        """One of torchvision's ten crops (corners, center, then the same of the flip)."""
        return VariantSpec(f"{TEN_CROP}_{crop}", "ten_crop", view=crop)

    @staticmethod
    def perturbed(perturbation: str, preset: str) -> "VariantSpec":
        return VariantSpec(f"{perturbation}-{preset}", "perturb", perturbation=perturbation, preset=preset)


@dataclass(frozen=True)
class RowTable:
    """Row-aligned metadata of a store, in manifest order."""

    labels: np.ndarray
    paths: np.ndarray
    datasets: np.ndarray
    classes: np.ndarray | None
    valid: np.ndarray
    errors: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class StoreInfo:
    """Everything recorded in a store's attributes, typed."""

    path: Path
    identity: StoreIdentity
    split: str
    n_rows: int
    variants: dict[str, VariantSpec]
    complete_variants: tuple[str, ...]
    attrs: dict[str, Any] = field(repr=False)


def model_slug(model: str) -> str:
    """A folder name for a hub id (``org--name``) or a local directory (its name)."""
    path = Path(model)
    return path.name if path.is_dir() else model.replace("/", "--")


def default_store_path(cache_dir: Path, model: str, tap: str, split: str) -> Path:
    """Where a split's store lives unless an explicit path is given."""
    return Path(cache_dir) / model_slug(model) / tap / f"{split}.zarr"


def shard_count(n_rows: int, shard_rows: int) -> int:
    return -(-n_rows // shard_rows)


def shard_bounds(shard: int, n_rows: int, shard_rows: int) -> tuple[int, int]:
    start = shard * shard_rows
    return start, min(start + shard_rows, n_rows)


def create_store(
    path: Path,
    identity: StoreIdentity,
    *,
    split: str,
    labels: Sequence[int],
    paths: Sequence[str],
    datasets: Sequence[str],
    classes: Sequence[str | None] | None,
    extra_attrs: dict[str, Any],
) -> None:
    """Write a new store's row metadata and attributes; whole or absent."""
    n_rows = len(labels)
    tmp = path.with_name(path.name + f".creating-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(tmp, mode="w", zarr_format=3)
    _write_1d(group, "labels", np.asarray(labels, dtype=np.int8))
    _write_1d(group, "paths", np.asarray(paths, dtype=object), dtype=str)
    _write_1d(group, "dataset", np.asarray(datasets, dtype=object), dtype=str)
    if classes is not None:
        _write_1d(group, "class", np.asarray([c or "" for c in classes], dtype=object), dtype=str)
    group.create_array("valid", shape=(n_rows,), chunks=(identity.shard_rows,), dtype=bool, fill_value=False)
    group.create_array("error", shape=(n_rows,), chunks=(identity.shard_rows,), dtype=str, fill_value="")
    group.attrs.update(
        {
            "schema": SCHEMA,
            "split": split,
            "n_rows": n_rows,
            "variants": {},
            **_jsonable(asdict(identity)),
            **_jsonable(extra_attrs),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)


def _write_1d(group: zarr.Group, name: str, values: np.ndarray, dtype: Any = None) -> None:
    array = group.create_array(name, shape=values.shape, chunks=(max(1, len(values)),), dtype=dtype or values.dtype)
    array[:] = values


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def delete_store(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def open_store_info(path: Path) -> StoreInfo:
    """Read and type a store's attributes, with clear errors for non-stores."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: not a feature store (no zarr.json); run `pipeline extract` first")
    group = zarr.open_group(path, mode="r")
    attrs = dict(group.attrs)
    if attrs.get("schema") != SCHEMA:
        raise StoreError(f"{path}: not a rine-pipeline feature store (schema {attrs.get('schema')!r}, expected {SCHEMA!r})")
    variants = {name: VariantSpec(**spec) for name, spec in attrs["variants"].items()}
    identity = StoreIdentity.from_attrs(attrs)
    n_shards = shard_count(attrs["n_rows"], identity.shard_rows)
    complete = tuple(
        name for name in variants if int(np.count_nonzero(group[f"progress/{name}"][:])) == n_shards
    )
    return StoreInfo(
        path=path,
        identity=identity,
        split=attrs["split"],
        n_rows=attrs["n_rows"],
        variants=variants,
        complete_variants=complete,
        attrs=attrs,
    )


def check_identity(path: Path, wanted: StoreIdentity) -> None:
    """Refuse a store whose numbers were made from other inputs than ``wanted``."""
    info = open_store_info(path)
    differences = info.identity.differences(wanted)
    if differences:
        raise StoreError(
            f"{path} was built from other inputs:\n  "
            + "\n  ".join(differences)
            + "\nUse --overwrite to rebuild it, or --out to write a new store elsewhere."
        )


def add_variant(path: Path, variant: VariantSpec, n_blocks: int, dim: int) -> None:
    """Create the (empty) feature and progress arrays of a variant, if missing."""
    group = zarr.open_group(path, mode="r+")
    variants = dict(group.attrs["variants"])
    if variant.name in variants:
        return
    identity = StoreIdentity.from_attrs(dict(group.attrs))
    n_rows = group.attrs["n_rows"]
    shard_rows, chunk_rows = identity.shard_rows, identity.chunk_rows
    group.create_array(
        f"features/{variant.name}",
        shape=(n_rows, n_blocks, dim),
        chunks=(chunk_rows, n_blocks, dim),
        shards=(shard_rows, n_blocks, dim),
        dtype=identity.dtype,
        compressors=None,
        fill_value=0,
        overwrite=True,  # left over by a run killed before the variant was recorded
    )
    group.create_array(
        f"progress/{variant.name}",
        shape=(shard_count(n_rows, shard_rows),),
        chunks=(1,),
        dtype=bool,
        fill_value=False,
        overwrite=True,
    )
    variants[variant.name] = asdict(variant)
    group.attrs["variants"] = variants


def pending_shards(path: Path, variant: str) -> list[int]:
    group = zarr.open_group(path, mode="r")
    done = group[f"progress/{variant}"][:]
    return [int(i) for i in np.flatnonzero(~done)]


def commit_shard(
    path: Path,
    variant: str,
    shard: int,
    features: np.ndarray,
    valid: np.ndarray,
    errors: Sequence[str],
) -> None:
    """Write one whole shard of one variant, then mark it done (in that order)."""
    group = zarr.open_group(path, mode="r+")
    shard_rows = group.attrs["shard_rows"]
    start, stop = shard_bounds(shard, group.attrs["n_rows"], shard_rows)
    if features.shape[0] != stop - start:
        raise ValueError(f"shard {shard} of {path} has {stop - start} rows, got {features.shape[0]}")
    group[f"features/{variant}"][start:stop] = features
    group["valid"][start:stop] = valid
    group["error"][start:stop] = np.asarray(list(errors), dtype=object)
    group[f"progress/{variant}"][shard] = True


def read_rows(path: Path) -> RowTable:
    group = zarr.open_group(path, mode="r")
    return RowTable(
        labels=group["labels"][:],
        paths=np.asarray(group["paths"][:], dtype=object),
        datasets=np.asarray(group["dataset"][:], dtype=object),
        classes=np.asarray(group["class"][:], dtype=object) if "class" in group else None,
        valid=group["valid"][:],
        errors=np.asarray(group["error"][:], dtype=object),
    )


def read_features(
    path: Path,
    variant: str,
    rows: slice | np.ndarray | None = None,
    *,
    out: np.ndarray | None = None,
    require_complete: bool = True,
) -> np.ndarray:
    """Load features of ``variant`` for ``rows`` (all by default) as one array.

    ``rows`` is a slice or an increasing array of row indices. Whole inner
    chunks are read straight from the shard files by a few threads; ``out``
    may be a pre-allocated (len(rows), n_blocks, dim) array to fill. Arrays
    that start on a page boundary (as the ones allocated here do) are filled
    fastest; others go through a small staging buffer.
    """
    info = open_store_info(path)
    if variant not in info.variants:
        raise StoreError(f"{path}: no variant {variant!r}; it has {sorted(info.variants) or 'none'}")
    if require_complete and variant not in info.complete_variants:
        missing = len(pending_shards(path, variant))
        raise StoreError(f"{path}: variant {variant!r} is incomplete ({missing} shards missing); re-run the extraction")
    array = zarr.open_array(path / "features" / variant, mode="r")
    row_index = _row_index(rows, array.shape[0])
    shape = (len(row_index),) + tuple(array.shape[1:])
    if out is None:
        out = _page_aligned_empty(shape, array.dtype)
    elif out.shape != shape or out.dtype != array.dtype:
        raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {shape} {array.dtype}")
    layout = _raw_shard_layout(array)
    if layout is None:
        out[...] = array.get_orthogonal_selection((row_index,))
    else:
        _read_raw(path / "features" / variant, layout, array, row_index, out)
    return out


def _row_index(rows: slice | np.ndarray | None, n_rows: int) -> np.ndarray:
    if rows is None:
        return np.arange(n_rows)
    if isinstance(rows, slice):
        return np.arange(n_rows)[rows]
    index = np.asarray(rows, dtype=np.int64)
    if index.ndim != 1 or (len(index) and (index.min() < 0 or index.max() >= n_rows)):
        raise IndexError(f"row indices must be a 1-d array within [0, {n_rows})")
    if np.any(np.diff(index) <= 0):
        raise ValueError("row indices must be strictly increasing")
    return index


@dataclass(frozen=True)
class _ShardLayout:
    shard_rows: int
    chunk_rows: int
    index_at_end: bool


def _raw_shard_layout(array: zarr.Array) -> _ShardLayout | None:
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
    return _ShardLayout(shard_shape[0], chunk_shape[0], config.get("index_location", "end") == "end")


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


def _read_raw(array_dir: Path, layout: _ShardLayout, array: zarr.Array, row_index: np.ndarray, out: np.ndarray) -> None:
    """Fill ``out`` from the shard files: contiguous runs by direct reads, scattered rows by whole chunks."""
    row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
    if not out.flags.c_contiguous:
        contiguous = np.empty(out.shape, dtype=out.dtype)
        _read_raw(array_dir, layout, array, row_index, contiguous)
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
    array_dir: Path, layout: _ShardLayout, array: zarr.Array, row_index: np.ndarray, row_bytes: int
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
    stops = np.concatenate([boundaries, [len(row_index)]]).astype(np.int64) if len(row_index) else np.array([], dtype=np.int64)
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
            raise StoreError(f"{array_dir}: chunk {chunk} has {nbytes} bytes, expected {chunk_bytes}")
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


def _page_aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
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
            raise StoreError(f"{name}: shard file is shorter than its index says")
        done += got


def describe_store(path: Path) -> str:
    """A human-readable summary of a store: attributes, variants, failures."""
    info = open_store_info(path)
    rows = read_rows(path)
    lines = [f"store        {info.path}", f"split        {info.split}", f"rows         {info.n_rows}"]
    for key, value in sorted(info.attrs.items()):
        if key in ("variants", "split", "n_rows"):
            continue
        lines.append(f"{key:<12} {value}")
    lines.append("variants:")
    n_shards = shard_count(info.n_rows, info.identity.shard_rows)
    for name in info.variants:
        done = n_shards - len(pending_shards(path, name))
        state = "complete" if name in info.complete_variants else f"{done}/{n_shards} shards"
        lines.append(f"  {name:<20} {state}")
    failed = np.flatnonzero(rows.errors != "")
    lines.append(f"invalid rows {len(failed)}")
    for row in failed[:20]:
        lines.append(f"  {rows.paths[row]}: {rows.errors[row]}")
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more")
    return "\n".join(lines)
