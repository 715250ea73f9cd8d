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

Integrity. Every chunk of every array carries a CRC32C (zarr's ``crc32c``
codec, so any zarr client checks it too; a feature shard's inner chunks and
its index each carry one), and chunks are written even when they hold only
the fill value, so a committed shard has every file it should: a missing,
short or damaged file is an error naming the store, array and shard, never
zeros. Every file is written through a temporary name, synced, renamed and
its folder synced (``files.write_bytes_durable``), so that after a crash or
a power loss a file is whole or absent, and a progress flag is never on disk
before the data it vouches for.

Writing: :func:`create_store` (rows and attributes, whole or absent), then
per variant :func:`add_variant` and :func:`commit_shard` shard by shard:
the shard's features of one or more variants, then, under the store's lock,
its ``valid`` and ``error`` chunks and the progress flags. Several processes
(ranks of a distributed extraction, or uncoordinated runs) may write one
store: creation, attribute updates and those last steps are serialised by an
``fcntl`` lock on the hidden file ``.<store name>.lock`` next to the store;
feature data need no lock, because a shard's bytes are the same whoever
computes them. :func:`write_store` does all of it in one call for features
already in hand (tests, benchmarks, converters).

A row's ``valid`` is shared by every variant: when a shard is committed while
other variants already hold it, a row stays valid only if it was valid for
them too (and keeps their reason), so that no valid row ever points at
features computed from a failed decode.

Checking: :func:`damaged_shards` (cheap: files present, sizes, index
checksums) is what ``pipeline extract`` runs before trusting a progress
flag; :func:`verify_store` reads everything (``pipeline cache verify``).

Reading: :func:`open_store_info`, :func:`read_rows` and
:func:`read_features`, which reads whole inner chunks of the shard files
into one pre-allocated array and verifies their checksums
(``pipeline/_shard_reader.py``); layouts it does not know fall back to
``zarr``. :func:`open_feature_rows` gathers single rows in any order from
the same files, with the same checks (training on splits larger than
memory).

Stores of an older schema (``feature-store@1``: no checksums, no model
config in the identity) are refused with a message saying to rebuild them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from ..errors import PipelineError
from ..files import (
    _temporary_sibling,
    atomic_path,
    disk_errors_explained,
    fsync_directory,
    locked,
    remove_path,
    remove_stray_temporaries,
    write_bytes_durable,
)
from ..names import DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_ROWS
from ..variants import VariantKind, VariantSpec
from . import _shard_reader

SCHEMA_PREFIX = "rine-pipeline/feature-store@"
SCHEMA = SCHEMA_PREFIX + "2"
# Row and flag arrays: compressed, and checksummed like the features.
_CHECKED_CODECS = (ZstdCodec(level=3), Crc32cCodec())


MIN_ZARR = (3, 1, 3)  # writes every file through a temporary name and a rename; 3.1.2 could leave half a zarr.json


class StoreError(PipelineError, RuntimeError):
    """A store that cannot be used as asked (missing, mismatched, incomplete, damaged)."""


def check_zarr_version(version: str) -> None:
    """Refuse a zarr older than :data:`MIN_ZARR`, with what to do."""
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    if numbers < MIN_ZARR:
        raise StoreError(
            f"zarr {version} is installed; rine-pipeline needs zarr >= {'.'.join(map(str, MIN_ZARR))} "
            "(a kill during an attribute write can leave an older zarr's store unreadable): pip install -U zarr"
        )


check_zarr_version(zarr.__version__)


@dataclass(frozen=True)
class StoreIdentity:
    """What the stored numbers depend on; a store built otherwise is refused.

    ``block_indices`` are the backbone blocks whose tokens are stored (0-based,
    increasing), ``dtype`` the stored dtype, ``compute_dtype`` the backbone's,
    ``model_config`` the model's ``config.json`` as canonical JSON text
    (activation, layer-norm eps, ...: what the weights' hash does not cover).
    """

    manifest_sha256: str
    model_id: str
    model_revision: str
    model_config: str
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
            value = attrs[f.name]
            values[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def differences(self, other: StoreIdentity) -> list[str]:
        """Human-readable list of the fields where ``other`` differs (model config keys one by one)."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine == theirs:
                continue
            if f.name == "model_config":
                out += _config_differences(mine, theirs)
            else:
                out.append(f"{f.name}: store has {mine!r}, asked for {theirs!r}")
        return out

    def compatible_features(self, other: StoreIdentity) -> list[str]:
        """Differences that forbid training on one store and scoring another."""
        keys = ("model_id", "model_revision", "model_config", "tap", "block_indices", "dim", "crop_size", "mean", "std")
        return [d for d in self.differences(other) if d.split(":")[0].split(".")[0] in keys]


def _config_differences(mine: str, theirs: str) -> list[str]:
    ours, asked = json.loads(mine), json.loads(theirs)
    return [
        f"model_config.{key}: store has {ours.get(key, '(absent)')!r}, asked for {asked.get(key, '(absent)')!r}"
        for key in sorted(set(ours) | set(asked))
        if ours.get(key) != asked.get(key)
    ] or [f"model_config: store has {mine}, asked for {theirs}"]


def canonical_model_config(config: Mapping[str, Any]) -> str:
    """A model's config.json as identity text: sorted keys, without the fields that only record who saved it."""
    kept = {key: value for key, value in config.items() if key not in ("transformers_version", "_name_or_path")}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


def placeholder_identity(n_blocks: int, dim: int, **fields_given: Any) -> StoreIdentity:
    """An identity for features not extracted from a manifest (tests, benchmarks): placeholders unless given."""
    values: dict[str, Any] = dict(
        manifest_sha256="0" * 64,
        model_id="synthetic",
        model_revision="synthetic",
        model_config="{}",
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
    shard_flags: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)  # variant -> flags

    def train_views(self) -> tuple[str, ...]:
        """Names of the complete training views, in view order."""
        views = [spec for spec in self.variants.values() if spec.kind is VariantKind.TRAIN_VIEW]
        return tuple(
            spec.name for spec in sorted(views, key=lambda spec: spec.index) if spec.name in self.complete_variants
        )

    @property
    def n_shards(self) -> int:
        return shard_count(self.n_rows, self.identity.shard_rows)


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


# ---------------------------------------------------------------- durable writes, the lock


class _DurableLocalStore(LocalStore):
    """zarr's local store, writing every file through ``files.write_bytes_durable`` (synced, renamed, folder synced)."""

    async def set(self, key: str, value: Any) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        await asyncio.to_thread(write_bytes_durable, self.root / key, value.as_numpy_array())

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        if not (self.root / key).exists():
            await self.set(key, value)

    def set_sync(self, key: str, value: Any) -> None:
        self._check_writable()
        write_bytes_durable(self.root / key, value.as_numpy_array())


@contextmanager
def _writable_group(path: Path, mode: Literal["w", "r+"] = "r+") -> Iterator[zarr.Group]:
    """The store's group for writing: durable files, every chunk written (also one of fill values), disk errors explained."""
    with disk_errors_explained(path), zarr.config.set({"array.write_empty_chunks": True}):
        yield zarr.open_group(store=_DurableLocalStore(path), mode=mode, zarr_format=3)


def store_lock(path: Path) -> AbstractContextManager[None]:
    """The lock serialising a store's creation and metadata updates across processes (``.<name>.lock`` next to it)."""
    return locked(Path(path).with_name(f".{Path(path).name}.lock"))


def claims_folder(path: Path) -> Path:
    """Where processes sharing a store leave their claims on shards (``extract.py``), next to the store."""
    return Path(path).with_name(f".{Path(path).name}.claims")


# ---------------------------------------------------------------- creating and deleting


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
    if_exists: Literal["error", "check", "replace"] = "error",
) -> bool:
    """Write a new store's row metadata and attributes, without variants; whole or absent. True when created.

    ``if_exists`` decides about a store already at ``path``: ``error``,
    ``check`` (keep it when its identity is ``identity``, else
    :class:`StoreError` listing the differences) or ``replace`` (delete it
    first: only a store of this project, see :func:`delete_store`). Under the
    store's lock, so that of several processes creating one store exactly
    one does and the others check its identity. Stray temporaries of killed
    writers in and next to the store are removed first.
    """
    path = Path(path)
    with disk_errors_explained(path), store_lock(path):
        remove_stray_temporaries(path.parent, recursive=False)
        if if_exists == "replace":
            delete_store(path)
        if path.exists() or path.is_symlink():
            if if_exists == "error":
                raise StoreError(f"{path} exists; choose another path or rebuild it with --overwrite")
            check_identity(path, identity)
            remove_stray_temporaries(path, recursive=True)
            return False
        _write_new_store(path, identity, split, labels, paths, datasets, classes, extra_attrs)
    return True


def _write_new_store(
    path: Path,
    identity: StoreIdentity,
    split: str,
    labels: Sequence[int],
    paths: Sequence[str],
    datasets: Sequence[str],
    classes: Sequence[str | None] | None,
    extra_attrs: Mapping[str, Any] | None,
) -> None:
    n_rows = len(labels)
    with atomic_path(path) as tmp, _writable_group(tmp, mode="w") as group:
        _write_1d(group, "labels", np.asarray(labels, dtype=np.int8))
        _write_1d(group, "paths", np.asarray(paths, dtype=object), dtype=str)
        _write_1d(group, "dataset", np.asarray(datasets, dtype=object), dtype=str)
        if classes is not None:
            _write_1d(group, "class", np.asarray([c or "" for c in classes], dtype=object), dtype=str)
        for name, dtype, fill in (("valid", bool, False), ("error", str, "")):
            group.create_array(
                name,
                shape=(n_rows,),
                chunks=(identity.shard_rows,),
                dtype=dtype,
                fill_value=fill,
                compressors=_CHECKED_CODECS,
            )
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
    fsync_directory(path.parent)


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
    extracted store. The store is the caller's alone while it is written
    (typically under a temporary name): no lock is taken.
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
    path = Path(path)
    if path.exists():
        raise StoreError(f"{path} exists; write_store makes a new store")
    _write_new_store(path, identity, split, labels, paths, datasets, classes, extra_attrs)
    for spec in specs:
        _add_variant(path, spec, *expected[1:], lock=nullcontext())
    for shard in range(shard_count(n_rows, identity.shard_rows)):
        start, stop = shard_bounds(shard, n_rows, identity.shard_rows)
        values = {spec.name: np.asarray(features[spec.name][start:stop], dtype=identity.dtype) for spec in specs}
        _commit(path, shard, values, valid_rows[start:stop], reasons[start:stop], lock=nullcontext())
    return path


def _write_1d(group: zarr.Group, name: str, values: np.ndarray, dtype: Any = None) -> None:
    array = group.create_array(
        name,
        shape=values.shape,
        chunks=(max(1, len(values)),),
        dtype=dtype or values.dtype,
        compressors=_CHECKED_CODECS,
    )
    array[:] = values


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def not_a_store_reason(path: Path) -> str | None:
    """Why ``path`` is not a feature store of this project (any schema version), or None when it is one."""
    path = Path(path)
    if path.is_symlink():
        return "is a symbolic link"
    if not path.is_dir():
        return "is not a folder"
    try:
        meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "is not a zarr store (no zarr.json)"
    except (OSError, ValueError) as error:
        return f"has an unreadable zarr.json ({error})"
    schema = meta.get("attributes", {}).get("schema") if isinstance(meta, dict) else None
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_PREFIX):
        return f"is not a feature store of rine-pipeline (its attributes say schema {schema!r})"
    return None


def delete_store(path: Path) -> None:
    """Delete a feature store of this project (or an empty folder); anything else at ``path`` is refused, untouched.

    The store is first renamed to a temporary name (so a kill while deleting
    never leaves a half store under its name; the remains are cleaned by the
    next run), then removed.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        path.rmdir()  # an empty folder: nothing to lose
        return
    reason = not_a_store_reason(path)
    if reason is not None:
        raise StoreError(f"{path} {reason}: refusing to delete it (--overwrite only replaces a feature store)")
    with disk_errors_explained(path):
        doomed = _temporary_sibling(path)
        os.replace(path, doomed)
        remove_path(doomed)


# ---------------------------------------------------------------- reading attributes


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
        except (OSError, ValueError) as error:
            raise StoreError(f"{path}: array progress/{name} cannot be read ({error})") from None
        if out[name].shape != (n_shards,):
            raise StoreError(f"{path}: array progress/{name} has shape {out[name].shape}, expected ({n_shards},)")
    return out


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


# ---------------------------------------------------------------- variants and shards


def add_variant(path: Path, variant: VariantSpec, n_blocks: int, dim: int) -> None:
    """Create the (empty) feature and progress arrays of a variant, if missing; safe against concurrent writers."""
    _add_variant(Path(path), variant, n_blocks, dim, lock=store_lock(path))


def _add_variant(path: Path, variant: VariantSpec, n_blocks: int, dim: int, lock: AbstractContextManager) -> None:
    with lock, _writable_group(path) as group:  # opened under the lock: its attributes are the latest
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
            compressors=[Crc32cCodec()],  # raw bytes + a checksum per inner chunk, read by _shard_reader
            fill_value=0,
            overwrite=True,  # left over by a run killed before the variant was recorded
        )
        group.create_array(
            f"progress/{variant.name}",
            shape=(shard_count(n_rows, shard_rows),),
            chunks=(1,),
            dtype=bool,
            fill_value=False,
            compressors=_CHECKED_CODECS,
            overwrite=True,
        )
        variants[variant.name] = _jsonable(asdict(variant))
        group.attrs["variants"] = variants


def pending_shards(path: Path, variant: str) -> list[int]:
    group = zarr.open_group(path, mode="r")
    done = group[f"progress/{variant}"][:]
    return [int(i) for i in np.flatnonzero(~done)]


def shard_done(path: Path, variant: str, shard: int) -> bool:
    """Whether one shard of a variant is committed (read fresh: another process may have just committed it)."""
    return bool(zarr.open_array(Path(path) / "progress" / variant, mode="r")[shard])


def commit_shard(
    path: Path,
    shard: int,
    features: Mapping[str, np.ndarray],
    valid: np.ndarray,
    errors: Sequence[str],
) -> None:
    """Write one whole shard of one or more variants, then its validity and progress flags (in that order).

    ``features`` maps variant names to the shard's (rows, n_blocks, dim)
    tokens. When other variants already hold this shard, ``valid`` is merged
    with what they recorded (a row stays valid only where it was valid for
    them, with their reason where not).
    """
    _commit(Path(path), shard, features, np.asarray(valid, dtype=bool), errors, lock=store_lock(path))


def _commit(
    path: Path,
    shard: int,
    features: Mapping[str, np.ndarray],
    valid: np.ndarray,
    errors: Sequence[str],
    lock: AbstractContextManager,
) -> None:
    reasons = np.asarray(list(errors), dtype=object)
    with _writable_group(path) as group:
        shard_rows = group.attrs["shard_rows"]
        start, stop = shard_bounds(shard, group.attrs["n_rows"], shard_rows)
        for variant, values in features.items():
            if values.shape[0] != stop - start:
                raise ValueError(f"shard {shard} of {path} has {stop - start} rows, got {values.shape[0]}")
            group[f"features/{variant}"][start:stop] = values
    with lock, _writable_group(path) as group:
        others = [name for name in group.attrs["variants"] if name not in features]
        if any(group[f"progress/{name}"][shard] for name in others):
            earlier_valid = group["valid"][start:stop]
            earlier_errors = np.asarray(group["error"][start:stop], dtype=object)
            reasons = np.where(earlier_valid, reasons, earlier_errors)
            valid = valid & earlier_valid
        group["valid"][start:stop] = valid
        group["error"][start:stop] = reasons
        for variant in features:
            group[f"progress/{variant}"][shard] = True


def unflag_shards(path: Path, shards: Mapping[str, Sequence[int]]) -> None:
    """Clear the progress flags of ``{variant: shards}`` so that the next extraction redoes them."""
    with store_lock(path), _writable_group(Path(path)) as group:
        for variant, numbers in shards.items():
            for shard in numbers:
                group[f"progress/{variant}"][shard] = False


# ---------------------------------------------------------------- checks


@dataclass(frozen=True)
class ShardProblem:
    """Something wrong with one shard of one array."""

    array: str  # "features/center", "valid", ...
    shard: int
    problem: str
    variant: str | None = None  # the variant whose flag vouches for the shard, when it is one

    def describe(self, path: Path) -> str:
        return f"{path}: {self.array} shard {self.shard}: {self.problem}"


def damaged_shards(path: Path, variants: Sequence[str] | None = None) -> list[ShardProblem]:
    """Committed shards whose files are missing or wrong (cheap: presence, sizes, index checksums; no data read).

    For every variant (all by default) and every shard its flag marks done:
    the feature shard file is there, its index checksum holds and every inner
    chunk in range is present with its size; and the shard's ``valid`` and
    ``error`` chunks are there and not empty.
    """
    path = Path(path)
    info = open_store_info(path)
    names = list(info.variants) if variants is None else list(variants)
    problems: list[ShardProblem] = []
    for name in names:
        array = zarr.open_array(path / "features" / name, mode="r")
        layout = _shard_reader.raw_shard_layout(array)
        for shard in np.flatnonzero(info.shard_flags[name]).tolist():
            for problem in _shard_reader.shard_file_problems(path / "features" / name, layout, array, shard):
                problems.append(ShardProblem(f"features/{name}", shard, problem, name))
    return problems + _row_chunk_problems(info, names)


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


def verify_store(path: Path) -> list[str]:
    """Check a store end to end; a list of what is wrong (empty when it is whole and sound).

    Row arrays readable (their checksums verified by zarr) and aligned with
    ``n_rows``; every variant complete, each committed shard's files present
    with the sizes of their index, every chunk's CRC32C, no shard holding
    data without its progress flag; no NaN or Inf in valid rows.
    """
    return list(dict.fromkeys(_verify(Path(path))[0]))  # a lost row chunk is named once, not once per variant


def reset_damaged_shards(path: Path) -> int:
    """Clear the progress flags of committed shards whose files are missing, short or damaged; how many were cleared."""
    damaged = _verify(Path(path))[1]
    unflag_shards(path, {variant: sorted(shards) for variant, shards in damaged.items()})
    return sum(len(shards) for shards in damaged.values())


def _verify(path: Path) -> tuple[list[str], dict[str, set[int]]]:
    """(what is wrong, {variant: committed shards whose files are damaged})."""
    info = open_store_info(path)
    structural = damaged_shards(path)
    problems = [problem.describe(path) for problem in structural]
    damaged: dict[str, set[int]] = {}
    for problem in structural:
        damaged.setdefault(problem.variant or "", set()).add(problem.shard)
    try:
        rows = read_rows(path)
    except StoreError as error:
        return [*problems, str(error)], damaged
    for name, values in (("labels", rows.labels), ("paths", rows.paths), ("valid", rows.valid)):
        if len(values) != info.n_rows:
            problems.append(f"{path}: array {name} has {len(values)} rows, the store {info.n_rows}")
    flags = _read_flags(path, list(info.variants), info.n_shards)
    for name in info.variants:
        array = zarr.open_array(path / "features" / name, mode="r")
        if array.shape[0] != info.n_rows:
            problems.append(f"{path}: features/{name} has {array.shape[0]} rows, the store {info.n_rows}")
            continue
        if _shard_reader.raw_shard_layout(array) is None:
            problems.append(f"{path}: features/{name} is not stored as checksummed raw shards")
        for shard in range(info.n_shards):
            if not flags[name][shard]:
                has_data = _shard_reader.shard_file(path / "features" / name, shard, array.ndim).exists()
                state = "holds data but has no progress flag" if has_data else "is not extracted yet"
                problems.append(f"{path}: features/{name} shard {shard} {state} (run `pipeline extract` to finish it)")
                continue
            if shard in damaged.get(name, ()):
                continue
            start, stop = shard_bounds(shard, info.n_rows, info.identity.shard_rows)
            try:
                values = read_features(path, name, slice(start, stop), require_complete=False)
            except StoreError as error:
                problems.append(str(error))
                damaged.setdefault(name, set()).add(shard)
                continue
            valid_rows = np.flatnonzero(rows.valid[start:stop])
            bad = ~np.isfinite(values[valid_rows]).all(axis=(1, 2))
            if bad.any():
                first = start + int(valid_rows[np.flatnonzero(bad)[0]])
                problems.append(
                    f"{path}: features/{name} shard {shard}: {int(bad.sum())} valid row(s) hold NaN or Inf "
                    f"(first: row {first}, {rows.paths[first]})"
                )
    return problems, damaged


# ---------------------------------------------------------------- reading rows and features


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
    buffer.
    """
    path = Path(path)
    info = open_store_info(path)
    array = _open_variant(info, variant, require_complete)
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
            _shard_reader.read_raw(path / "features" / variant, layout, array, row_index, out, committed)
    except _shard_reader.ShardFileError as error:
        raise StoreError(f"{path}: features/{variant} {error}") from None
    except (OSError, ValueError) as error:
        raise StoreError(f"{path}: features/{variant} cannot be read ({type(error).__name__}: {error})") from None
    return out


class FeatureRows:
    """The features of one complete variant, gathered row by row in any order without loading the variant.

    For training beyond memory: ``gather(rows)`` returns exactly
    ``read_features(path, variant)[rows]`` for rows in any order (a shuffled
    batch), read straight from the shard files with the checks of
    ``read_features`` (``_shard_reader.ShardRowGatherer``); other layouts go
    through ``zarr`` (slow, the same values). Safe to share between threads.
    """

    def __init__(self, path: Path, variant: str, array: zarr.Array) -> None:
        self.path = Path(path)
        self.variant = variant
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self._array = array
        layout = _shard_reader.raw_shard_layout(array)
        array_dir = self.path / "features" / variant
        self._gatherer = None if layout is None else _shard_reader.ShardRowGatherer(array_dir, layout, array)

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
            raise StoreError(f"{self.path}: features/{self.variant} {error}") from None
        except (OSError, ValueError) as error:
            raise StoreError(
                f"{self.path}: features/{self.variant} cannot be read ({type(error).__name__}: {error})"
            ) from None
        return out


def open_feature_rows(path: Path, variant: str) -> FeatureRows:
    """A complete variant of a store, opened for row gathers (``FeatureRows``); nothing is read yet."""
    path = Path(path)
    return FeatureRows(path, variant, _open_variant(open_store_info(path), variant, require_complete=True))


def _open_variant(info: StoreInfo, variant: str, require_complete: bool) -> zarr.Array:
    """A variant's feature array, refused when the store has no such variant or it is incomplete."""
    if variant not in info.variants:
        raise StoreError(f"{info.path}: no variant {variant!r}; it has {sorted(info.variants) or 'none'}")
    if require_complete and variant not in info.complete_variants:
        missing = int(np.count_nonzero(~info.shard_flags[variant]))
        raise StoreError(
            f"{info.path}: variant {variant!r} is incomplete ({missing} shards missing); re-run the extraction"
        )
    return zarr.open_array(info.path / "features" / variant, mode="r")


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
