"""The feature cache: the one door between stage one and stage two, and the only module that touches Zarr.

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

and attributes: the :class:`StoreIdentity` fields (what the numbers depend
on), ``split``, ``n_rows``, ``variants`` and whatever the writer adds
(``training``, ``data_root``, ...). A variant is one way of turning an image
into pixels (``center``, ``view_000``, ``tencrop_3``, ``jpeg-official``):
``pipeline/variants.py`` names and parses them, for both stages.

Writing: :func:`create_store` (rows and attributes, whole or absent), then
per variant :func:`add_variant` and :func:`commit_shard` shard by shard: the
feature shard, the shard's ``valid`` and ``error`` chunks, then its progress
flag. Zarr's local store writes every file through a temporary name and a
rename, so each of those files is whole or absent and a resume can trust
every flag it finds. :func:`write_store` does all of it in one call for
features already in hand (tests, benchmarks, converters).

Reading: :func:`open_store_info`, :func:`read_rows` and
:func:`read_features`, which reads whole inner chunks of uncompressed shards
straight from the shard files into one pre-allocated array
(``pipeline/_shard_reader.py``); anything else falls back to ``zarr``.

Stores written before ``block_indices`` was so named (attribute ``blocks``)
still open.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import _shard_reader
from .errors import PipelineError
from .files import atomic_path
from .variants import VariantKind, VariantSpec

SCHEMA = "rine-pipeline/feature-store@1"
TAPS = ("ln2", "hidden")  # see backbone.py for what each tap is
STORE_DTYPES = ("float16", "float32")  # dtypes of the stored features
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")  # dtypes the backbone may run in (backbone.py)
DEFAULT_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_SHARD_ROWS = 1024
DEFAULT_CHUNK_ROWS = 256
_LEGACY_ATTRIBUTE_NAMES = {"block_indices": "blocks"}  # field -> its name in older stores


class StoreError(PipelineError, RuntimeError):
    """A store that cannot be used as asked (missing, mismatched, incomplete)."""


@dataclass(frozen=True)
class StoreIdentity:
    """What the stored numbers depend on; a store built otherwise is refused.

    ``block_indices`` are the backbone blocks whose tokens are stored (0-based,
    increasing), ``dtype`` the stored dtype, ``compute_dtype`` the backbone's.
    """

    manifest_sha256: str
    model_id: str
    model_revision: str
    tap: str
    block_indices: tuple[int, ...]
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
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreIdentity:
        values = {}
        for f in fields(cls):
            value = attrs[f.name] if f.name in attrs else attrs[_LEGACY_ATTRIBUTE_NAMES.get(f.name, f.name)]
            values[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def differences(self, other: StoreIdentity) -> list[str]:
        """Human-readable list of the fields where ``other`` differs."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name}: store has {mine!r}, asked for {theirs!r}")
        return out

    def compatible_features(self, other: StoreIdentity) -> list[str]:
        """Differences that forbid training on one store and scoring another."""
        keys = ("model_id", "model_revision", "tap", "block_indices", "dim", "crop_size", "mean", "std")
        return [d for d in self.differences(other) if d.split(":")[0] in keys]


def placeholder_identity(n_blocks: int, dim: int, **fields_given: Any) -> StoreIdentity:
    """An identity for features not extracted from a manifest (tests, benchmarks): placeholders unless given."""
    values: dict[str, Any] = dict(
        manifest_sha256="0" * 64,
        model_id="synthetic",
        model_revision="synthetic",
        tap="ln2",
        block_indices=tuple(range(n_blocks)),
        dim=dim,
        crop_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        dtype="float16",
        compute_dtype="float32",
        seed=0,
        max_pixels=1,
        shard_rows=DEFAULT_SHARD_ROWS,
        chunk_rows=DEFAULT_CHUNK_ROWS,
    )
    return StoreIdentity(**{**values, **fields_given})


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

    def train_views(self) -> tuple[str, ...]:
        """Names of the complete training views, in view order."""
        views = [spec for spec in self.variants.values() if spec.kind is VariantKind.TRAIN_VIEW]
        return tuple(
            spec.name for spec in sorted(views, key=lambda spec: spec.index) if spec.name in self.complete_variants
        )


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
    classes: Sequence[str | None] | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write a new store's row metadata and attributes, without variants; whole or absent."""
    n_rows = len(labels)
    with atomic_path(path) as tmp:
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
                **_jsonable(dict(extra_attrs or {})),
            }
        )


def write_store(
    path: Path,
    identity: StoreIdentity,
    *,
    split: str,
    labels: Sequence[int],
    paths: Sequence[str],
    datasets: Sequence[str],
    features: Mapping[str, Any],
    classes: Sequence[str | None] | None = None,
    valid: Sequence[bool] | None = None,
    errors: Sequence[str] | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete store in one call from features already in hand.

    ``features`` maps stored variant names (``VariantSpec.from_name``) to
    (N, len(identity.block_indices), identity.dim) arrays, or anything with
    that ``shape`` that returns rows for ``[start:stop]`` (so a generator of
    synthetic rows need not hold them all); values are cast to
    ``identity.dtype``. ``valid`` defaults to all rows valid; ``errors`` to
    "" for valid rows and "invalid" for the others. Shards are committed as
    an extraction commits them, so the result is indistinguishable from an
    extracted store.
    """
    n_rows = len(labels)
    valid_rows = np.ones(n_rows, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    reasons = np.asarray(
        ["" if ok else "invalid" for ok in valid_rows] if errors is None else list(errors), dtype=object
    )
    expected = (n_rows, len(identity.block_indices), identity.dim)
    for name, array in features.items():
        if tuple(array.shape) != expected:
            raise ValueError(f"features[{name!r}] has shape {tuple(array.shape)}, the store needs {expected}")
    if len(valid_rows) != n_rows or len(reasons) != n_rows:
        raise ValueError(f"valid and errors need {n_rows} entries, got {len(valid_rows)} and {len(reasons)}")
    specs = [VariantSpec.from_name(name) for name in features]
    create_store(
        path,
        identity,
        split=split,
        labels=labels,
        paths=paths,
        datasets=datasets,
        classes=classes,
        extra_attrs=extra_attrs,
    )
    for spec in specs:
        add_variant(path, spec, *expected[1:])
        for shard in range(shard_count(n_rows, identity.shard_rows)):
            start, stop = shard_bounds(shard, n_rows, identity.shard_rows)
            values = np.asarray(features[spec.name][start:stop], dtype=identity.dtype)
            commit_shard(path, spec.name, shard, values, valid_rows[start:stop], reasons[start:stop])
    return path


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
        raise StoreError(
            f"{path}: not a rine-pipeline feature store (schema {attrs.get('schema')!r}, expected {SCHEMA!r})"
        )
    variants = {name: VariantSpec.from_name(name) for name in attrs["variants"]}
    identity = StoreIdentity.from_attrs(attrs)
    n_shards = shard_count(attrs["n_rows"], identity.shard_rows)
    complete = tuple(name for name in variants if int(np.count_nonzero(group[f"progress/{name}"][:])) == n_shards)
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
    variants[variant.name] = _jsonable(asdict(variant))
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
    chunks are read straight from the shard files by a few threads
    (``_shard_reader``), other layouts through ``zarr``; ``out``
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
        out = _shard_reader.page_aligned_empty(shape, array.dtype)
    elif out.shape != shape or out.dtype != array.dtype:
        raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {shape} {array.dtype}")
    layout = _shard_reader.raw_shard_layout(array)
    if layout is None:
        out[...] = array.get_orthogonal_selection((row_index,))
        return out
    try:
        _shard_reader.read_raw(path / "features" / variant, layout, array, row_index, out)
    except _shard_reader.ShardFileError as error:
        raise StoreError(str(error)) from None
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
