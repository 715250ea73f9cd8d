"""Reading stores: attributes, row arrays and features (whole, a range, or rows in any order), every checksum verified."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from ..variants import VariantSpec
from . import _shard_reader
from .schema import (
    EMBEDDING_ARRAY,
    SCHEMA,
    SCHEMA_PREFIX,
    RowTable,
    StoreError,
    StoreIdentity,
    StoreInfo,
    digest_folder,
    shard_count,
)

REPAIR_ADVICE = "repair it with `pipeline cache verify {path} --reset-bad`, then the same `pipeline extract` again"


def open_store_info(path: Path) -> StoreInfo:
    """Read and type a store's attributes, with clear errors for non-stores and older schemas."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: not a feature store (no zarr.json); run `pipeline extract` first")
    try:
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
    except (OSError, ValueError) as error:
        raise StoreError(f"{path}: zarr.json cannot be read ({error})") from None
    schema = attrs.get("schema")
    if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX) and schema != SCHEMA:
        raise StoreError(
            f"{path}: written by another version of rine-pipeline (schema {schema!r}, this version reads {SCHEMA!r}: "
            "checksummed chunks and the model config in the identity); rebuild it with `pipeline extract ... --overwrite`"
        )
    if schema != SCHEMA:
        raise StoreError(f"{path}: not a rine-pipeline feature store (schema {schema!r}, expected {SCHEMA!r})")
    try:
        variants = {name: VariantSpec.from_name(name) for name in attrs["variants"]}
        identity = StoreIdentity.from_attrs(attrs)
        n_rows = int(attrs["n_rows"])
        split = attrs["split"]
    except KeyError as error:
        raise StoreError(f"{path}: attribute {error} missing from zarr.json") from None
    flags = _read_flags(path, variants, shard_count(n_rows, identity.shard_rows))
    complete = tuple(name for name in variants if flags[name].all())
    return StoreInfo(
        path=path,
        identity=identity,
        split=split,
        n_rows=n_rows,
        variants=variants,
        complete_variants=complete,
        attrs=attrs,
        shard_flags=flags,
    )


def _read_flags(path: Path, variants: Sequence[str], n_shards: int) -> dict[str, np.ndarray]:
    """Progress flags of each variant, (n_shards,) bool."""
    out = {}
    for name in variants:
        try:
            out[name] = np.asarray(zarr.open_array(path / "progress" / name, mode="r")[:], dtype=bool)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise StoreError(
                f"{path}: array progress/{name} cannot be read ({error}); "
                f"`pipeline cache verify {path} --reset-bad` resets its variant for the next `pipeline extract`"
            ) from None
        if out[name].shape != (n_shards,):
            raise StoreError(f"{path}: array progress/{name} has shape {out[name].shape}, expected ({n_shards},)")
    return out


def read_digests(info: StoreInfo, variant: str, array_name: str = "features") -> np.ndarray | None:
    """The digests recorded with the committed shards of a variant's array (``NO_DIGEST`` elsewhere); None in older
    stores."""
    name = f"{digest_folder(array_name)}/{variant}"
    folder = info.path / name
    if not (folder / "zarr.json").is_file():
        return None
    try:
        digests = np.asarray(zarr.open_array(folder, mode="r")[:], dtype=np.int64)
    except (OSError, ValueError) as error:
        raise StoreError(f"{info.path}: array {name} cannot be read ({error})") from None
    if digests.shape != (info.n_shards,):
        raise StoreError(f"{info.path}: array {name} has shape {digests.shape}, expected ({info.n_shards},)")
    return np.where(info.shard_flags[variant], digests, _shard_reader.NO_DIGEST)


def open_array(path: Path, name: str) -> zarr.Array:
    """An array of a store, for reading; missing or unreadable metadata is a :class:`StoreError` naming it."""
    try:
        return zarr.open_array(Path(path) / name, mode="r")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StoreError(
            f"{path}: array {name} cannot be opened ({type(error).__name__}: {error}); "
            f"`pipeline cache verify {path} --reset-bad` resets its variant for the next `pipeline extract`"
        ) from None


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


def pending_shards(path: Path, variant: str) -> list[int]:
    group = zarr.open_group(path, mode="r")
    done = group[f"progress/{variant}"][:]
    return [int(i) for i in np.flatnonzero(~done)]


@dataclass(frozen=True)
class ShardProblem:
    """Something wrong with one shard of one array."""

    array: str  # "features/center", "valid", ...
    shard: int
    problem: str
    variant: str | None = None  # the variant whose flag vouches for the shard, when it is one

    def describe(self, path: Path) -> str:
        return f"{path}: {self.array} shard {self.shard}: {self.problem}"


def _row_chunk_problems(info: StoreInfo, names: Sequence[str]) -> list[ShardProblem]:
    """Committed shards (of the variants ``names``) whose ``valid`` or ``error`` chunk file is missing or empty."""
    problems = []
    for row_array in ("valid", "error"):
        folder = info.path / row_array / "c"
        sizes = {entry.name: entry.stat().st_size for entry in os.scandir(folder)} if folder.is_dir() else {}
        for name in names:
            for shard in np.flatnonzero(info.shard_flags[name]).tolist():
                size = sizes.get(str(shard))
                if not size:
                    what = "missing" if size is None else "empty (0 bytes)"
                    problems.append(ShardProblem(row_array, shard, f"chunk file {folder / str(shard)} is {what}", name))
    return problems


def read_rows(path: Path) -> RowTable:
    """The row arrays; a committed shard whose ``valid`` or ``error`` chunk is lost is an error, not "all invalid"."""
    path = Path(path)
    info = open_store_info(path)
    for problem in _row_chunk_problems(info, list(info.variants))[:1]:
        raise StoreError(problem.describe(path) + "; run `pipeline extract` again to re-extract the shard")
    try:
        group = zarr.open_group(path, mode="r")
        return RowTable(
            labels=group["labels"][:],
            paths=np.asarray(group["paths"][:], dtype=object),
            datasets=np.asarray(group["dataset"][:], dtype=object),
            classes=np.asarray(group["class"][:], dtype=object) if "class" in group else None,
            valid=group["valid"][:],
            errors=np.asarray(group["error"][:], dtype=object),
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise StoreError(f"{path}: row arrays cannot be read ({type(error).__name__}: {error})") from None


def read_features(
    path: Path,
    variant: str,
    rows: slice | np.ndarray | None = None,
    *,
    out: np.ndarray | None = None,
    require_complete: bool = True,
    array_name: str = "features",
) -> np.ndarray:
    """Load features of ``variant`` for ``rows`` (all by default) as one array.

    ``rows`` is a slice or an increasing array of row indices. Whole inner
    chunks are read straight from the shard files by a few threads
    (``_shard_reader``), their checksums verified; a committed shard whose
    file or chunk is missing, short or damaged raises :class:`StoreError`
    naming the store, array and shard. Other layouts are read through
    ``zarr``. ``out`` may be a pre-allocated (len(rows), n_blocks, dim)
    array to fill. Arrays that start on a page boundary (as the ones
    allocated here do) are filled fastest; others go through a small staging
    buffer. ``array_name="embedding"`` reads the variant's pooled image
    embeddings (N, 1, embedding_dim) instead of its block tokens.
    """
    path = Path(path)
    info = open_store_info(path)
    array = _open_variant(info, variant, require_complete, array_name)
    row_index = _row_index(rows, array.shape[0])
    shape = (len(row_index),) + tuple(array.shape[1:])
    if out is None:
        out = _shard_reader.page_aligned_empty(shape, array.dtype)
    elif out.shape != shape or out.dtype != array.dtype:
        raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {shape} {array.dtype}")
    layout = _shard_reader.raw_shard_layout(array)
    try:
        if layout is None:
            out[...] = array.get_orthogonal_selection((row_index,))
        else:
            committed = info.shard_flags[variant]
            digests = read_digests(info, variant, array_name)
            _shard_reader.read_raw(path / array_name / variant, layout, array, row_index, out, committed, digests)
    except _shard_reader.ShardFileError as error:
        raise StoreError(f"{path}: {array_name}/{variant} {error}; {REPAIR_ADVICE.format(path=path)}") from None
    except (OSError, ValueError) as error:
        raise StoreError(f"{path}: {array_name}/{variant} cannot be read ({type(error).__name__}: {error})") from None
    return out


class FeatureRows:
    """The features of one complete variant, gathered row by row in any order without loading the variant.

    For training beyond memory: ``gather(rows)`` returns exactly
    ``read_features(path, variant)[rows]`` for rows in any order (a shuffled
    batch), read straight from the shard files with the checks of
    ``read_features`` (``_shard_reader.ShardRowGatherer``); other layouts go
    through ``zarr`` (slow, the same values). Safe to share between threads.
    """

    def __init__(
        self,
        path: Path,
        variant: str,
        array: zarr.Array,
        digests: np.ndarray | None = None,
        array_name: str = "features",
    ) -> None:
        self.path = Path(path)
        self.variant = variant
        self.array_name = array_name
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self._array = array
        layout = _shard_reader.raw_shard_layout(array)
        array_dir = self.path / array_name / variant
        self._gatherer = None if layout is None else _shard_reader.ShardRowGatherer(array_dir, layout, array, digests)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def gather(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) as one (len(rows), n_blocks, dim) array; ``out`` to fill."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0])):
            raise IndexError(f"row indices must be a 1-d array within [0, {self.shape[0]})")
        shape = (len(rows), *self.shape[1:])
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        elif out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out has shape {out.shape} {out.dtype}, expected a C-contiguous {shape} {self.dtype}")
        try:
            if self._gatherer is None:
                unique, inverse = np.unique(rows, return_inverse=True)
                out[...] = self._array.get_orthogonal_selection((unique,))[inverse]
            else:
                self._gatherer.gather(rows, out)
        except _shard_reader.ShardFileError as error:
            raise StoreError(
                f"{self.path}: {self.array_name}/{self.variant} {error}; {REPAIR_ADVICE.format(path=self.path)}"
            ) from None
        except (OSError, ValueError) as error:
            raise StoreError(
                f"{self.path}: {self.array_name}/{self.variant} cannot be read ({type(error).__name__}: {error})"
            ) from None
        return out


def open_feature_rows(path: Path, variant: str, array_name: str = "features") -> FeatureRows:
    """A complete variant of a store, opened for row gathers (``FeatureRows``); nothing is read yet."""
    info = open_store_info(Path(path))
    array = _open_variant(info, variant, True, array_name)
    return FeatureRows(info.path, variant, array, read_digests(info, variant, array_name), array_name)


class NoEmbeddingError(StoreError):
    """A store written without the model's pooled image embedding."""


def _open_variant(info: StoreInfo, variant: str, require_complete: bool, array_name: str = "features") -> zarr.Array:
    """A variant's feature (or embedding) array, refused when the store has no such variant or it is incomplete."""
    if array_name == EMBEDDING_ARRAY and not info.identity.embedding_dim:
        raise NoEmbeddingError(
            f"{info.path}: holds no image embedding (it was extracted before the embedding was stored, or from a "
            "checkpoint without a pooled output); re-extract the split with `pipeline extract ... --overwrite`, "
            "which stores the embedding from the same forward pass as the block tokens"
        )
    if variant not in info.variants:
        raise StoreError(f"{info.path}: no variant {variant!r}; it has {sorted(info.variants) or 'none'}")
    if require_complete and variant not in info.complete_variants:
        missing = int(np.count_nonzero(~info.shard_flags[variant]))
        raise StoreError(
            f"{info.path}: variant {variant!r} is incomplete ({missing} shards missing); re-run the extraction"
        )
    return open_array(info.path, f"{array_name}/{variant}")


def committed_rows(info: StoreInfo) -> np.ndarray:
    """(n_rows,) bool: rows of shards that some variant has committed (their ``valid`` and ``error`` are recorded)."""
    flags = list(info.shard_flags.values())
    committed = np.logical_or.reduce(flags) if flags else np.zeros(info.n_shards, dtype=bool)
    return np.repeat(committed, info.identity.shard_rows)[: info.n_rows]


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
    for name in info.variants:
        done = info.n_shards - len(pending_shards(path, name))
        state = "complete" if name in info.complete_variants else f"{done}/{info.n_shards} shards"
        lines.append(f"  {name:<20} {state}")
    failed = np.flatnonzero(committed_rows(info) & ~rows.valid)
    lines.append(f"invalid rows {len(failed)}")
    for row in failed[:20]:
        lines.append(f"  {rows.paths[row]}: {rows.errors[row]}")
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more")
    return "\n".join(lines)
