"""Writing stores, complete or absent and durably: creation, variants, shard commits, the lock, deletion."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

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
from ..variants import VariantSpec
from . import _shard_reader
from ._shard_reader import NO_DIGEST
from .reading import check_identity
from .schema import (
    EMBEDDING_ARRAY,
    SCHEMA,
    SCHEMA_PREFIX,
    StoreError,
    StoreIdentity,
    digest_folder,
    shard_bounds,
    shard_count,
)

# Row and flag arrays: compressed, and checksummed like the features.
_CHECKED_CODECS = (ZstdCodec(level=3), Crc32cCodec())


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
    embeddings: Mapping[str, Any] | None = None,
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
    (typically under a temporary name): no lock is taken. ``embeddings``: the
    same variants' (N, identity.embedding_dim) pooled embeddings, required
    exactly when ``identity.embedding_dim`` is not 0.
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
    if bool(identity.embedding_dim) != bool(embeddings) or set(embeddings or features) != set(features):
        raise ValueError("embeddings: give one per variant exactly when identity.embedding_dim is not 0")
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
        pooled = {
            name: np.asarray(array[start:stop], dtype=identity.dtype).reshape(stop - start, 1, -1)
            for name, array in (embeddings or {}).items()
        }
        _commit(path, shard, values, valid_rows[start:stop], reasons[start:stop], nullcontext(), pooled)
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
        if identity.embedding_dim:
            group.create_array(
                f"{EMBEDDING_ARRAY}/{variant.name}",
                shape=(n_rows, 1, identity.embedding_dim),
                chunks=(chunk_rows, 1, identity.embedding_dim),
                shards=(shard_rows, 1, identity.embedding_dim),
                dtype=identity.dtype,
                compressors=[Crc32cCodec()],
                fill_value=0,
                overwrite=True,
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
        for array_name in ("features", EMBEDDING_ARRAY) if identity.embedding_dim else ("features",):
            group.create_array(
                f"{digest_folder(array_name)}/{variant.name}",
                shape=(shard_count(n_rows, shard_rows),),
                chunks=(1,),
                dtype="int64",
                fill_value=NO_DIGEST,
                compressors=_CHECKED_CODECS,
                overwrite=True,
            )
        variants[variant.name] = _jsonable(asdict(variant))
        group.attrs["variants"] = variants


def shard_done(path: Path, variant: str, shard: int) -> bool:
    """Whether one shard of a variant is committed (read fresh: another process may have just committed it)."""
    return bool(zarr.open_array(Path(path) / "progress" / variant, mode="r")[shard])


def commit_shard(
    path: Path,
    shard: int,
    features: Mapping[str, np.ndarray],
    valid: np.ndarray,
    errors: Sequence[str],
    embeddings: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write one whole shard of one or more variants, then its validity and progress flags (in that order).

    ``features`` maps variant names to the shard's (rows, n_blocks, dim)
    tokens; ``embeddings`` the same names to the shard's (rows, 1, embedding_dim)
    pooled image embeddings, required when the store holds them (its identity's
    ``embedding_dim``) and ignored when it does not. When other variants already
    hold this shard, ``valid`` is merged with what they recorded (a row stays
    valid only where it was valid for them, with their reason where not).
    """
    _commit(Path(path), shard, features, np.asarray(valid, dtype=bool), errors, store_lock(path), embeddings)


def _commit(
    path: Path,
    shard: int,
    features: Mapping[str, np.ndarray],
    valid: np.ndarray,
    errors: Sequence[str],
    lock: AbstractContextManager,
    embeddings: Mapping[str, np.ndarray] | None = None,
) -> None:
    reasons = np.asarray(list(errors), dtype=object)
    digests: dict[str, int] = {}  # digest array -> the digest of the shard file just written
    with _writable_group(path) as group:
        shard_rows = group.attrs["shard_rows"]
        start, stop = shard_bounds(shard, group.attrs["n_rows"], shard_rows)
        with_embedding = bool(group.attrs.get("embedding_dim", 0))
        missing = [variant for variant in features if with_embedding and variant not in (embeddings or {})]
        if missing:
            raise ValueError(f"{path} stores image embeddings, but shard {shard} of {missing} comes without them")
        for variant, values in features.items():
            if values.shape[0] != stop - start:
                raise ValueError(f"shard {shard} of {path} has {stop - start} rows, got {values.shape[0]}")
            arrays = {"features": values, **({EMBEDDING_ARRAY: embeddings[variant]} if with_embedding else {})}
            for array_name, data in arrays.items():
                array = group[f"{array_name}/{variant}"]
                # The whole shard is rewritten: never read through what a damaged file holds (zarr merges with it).
                remove_path(_shard_reader.shard_file(path / array_name / variant, shard, array.ndim))
                array[start:stop] = data
                layout = _shard_reader.raw_shard_layout(array)
                if layout is not None:
                    digests[f"{digest_folder(array_name)}/{variant}"] = _shard_reader.shard_digest(
                        path / array_name / variant, layout, array, shard
                    )
    with lock, _writable_group(path) as group:
        others = [name for name in group.attrs["variants"] if name not in features]
        if any(group[f"progress/{name}"][shard] for name in others):
            earlier_valid = group["valid"][start:stop]
            earlier_errors = np.asarray(group["error"][start:stop], dtype=object)
            reasons = np.where(earlier_valid, reasons, earlier_errors)
            valid = valid & earlier_valid
        group["valid"][start:stop] = valid
        group["error"][start:stop] = reasons
        for name, digest in digests.items():
            if name in group:  # absent in stores of earlier versions
                group[name][shard] = digest
        for variant in features:
            group[f"progress/{variant}"][shard] = True


def unflag_shards(path: Path, shards: Mapping[str, Sequence[int]]) -> None:
    """Clear the progress flags of ``{variant: shards}`` so that the next extraction redoes them."""
    with store_lock(path), _writable_group(Path(path)) as group:
        for variant, numbers in shards.items():
            for shard in numbers:
                group[f"progress/{variant}"][shard] = False


def drop_variants(path: Path, names: Sequence[str]) -> None:
    """Remove variants whole (their feature, progress and digest arrays, and their entry in the attributes)."""
    path = Path(path)
    with store_lock(path), disk_errors_explained(path):
        for name in names:
            for folder in ("features", "progress", "digests", EMBEDDING_ARRAY, digest_folder(EMBEDDING_ARRAY)):
                remove_path(path / folder / name)
        with _writable_group(path) as group:
            group.attrs["variants"] = {k: v for k, v in group.attrs["variants"].items() if k not in names}
