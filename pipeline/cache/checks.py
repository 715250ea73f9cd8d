"""Checking stores: cheap checks of committed shards' files (before a resume trusts a flag), and full verification."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from . import _shard_reader
from .reading import (
    ShardProblem,
    _read_flags,
    _row_chunk_problems,
    open_array,
    open_store_info,
    read_digests,
    read_features,
    read_rows,
)
from .schema import EMBEDDING_ARRAY, StoreError, StoreInfo, digest_folder, shard_bounds, shard_count
from .writing import drop_variants, unflag_shards


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
    arrays = ("features", EMBEDDING_ARRAY) if info.identity.embedding_dim else ("features",)
    for name in names:
        for array_name in arrays:
            array = open_array(path, f"{array_name}/{name}")
            layout = _shard_reader.raw_shard_layout(array)
            digests = read_digests(info, name, array_name)
            for shard in np.flatnonzero(info.shard_flags[name]).tolist():
                digest = _shard_reader.NO_DIGEST if digests is None else int(digests[shard])
                folder = path / array_name / name
                for problem in _shard_reader.shard_file_problems(folder, layout, array, shard, digest):
                    problems.append(ShardProblem(f"{array_name}/{name}", shard, problem, name))
    return problems + _row_chunk_problems(info, names)


def verify_store(path: Path) -> list[str]:
    """Check a store end to end; a list of what is wrong (empty when it is whole and sound).

    Every variant's arrays openable; row arrays readable (their checksums
    verified by zarr) and aligned with ``n_rows``; every variant complete,
    each committed shard's files present with the sizes of their index and
    the digest recorded with its flag, every chunk's CRC32C, no shard
    holding data without its progress flag; no NaN or Inf in valid rows.
    """
    broken = _broken_variants(Path(path))
    if broken:  # the other checks need every variant's arrays
        return list(broken.values())
    return list(dict.fromkeys(_verify(Path(path))[0]))  # a lost row chunk is named once, not once per variant


def reset_damaged_shards(path: Path) -> int:
    """Clear the progress flags of the committed shards ``verify_store`` finds wrong; how many were cleared.

    Damaged, missing, swapped or short files, unreadable ``valid``/``error``
    chunks and valid rows holding NaN or Inf: the next ``pipeline extract``
    rewrites those shards whole (never reading through the damaged files).
    A variant whose arrays cannot be opened (missing or garbage metadata) is
    dropped whole, every one of its shards counted, and extracted anew.
    """
    path = Path(path)
    broken = _broken_variants(path)
    if broken:
        n_rows, shard_rows = (zarr.open_group(path, mode="r").attrs[key] for key in ("n_rows", "shard_rows"))
        drop_variants(path, list(broken))
        return len(broken) * shard_count(n_rows, shard_rows)
    damaged = _verify(path)[1]
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
        for shard in _unreadable_row_chunks(path, info):
            for name in info.variants:
                if info.shard_flags[name][shard]:
                    damaged.setdefault(name, set()).add(shard)
        return [*problems, str(error)], damaged
    for name, values in (("labels", rows.labels), ("paths", rows.paths), ("valid", rows.valid)):
        if len(values) != info.n_rows:
            problems.append(f"{path}: array {name} has {len(values)} rows, the store {info.n_rows}")
    flags = _read_flags(path, list(info.variants), info.n_shards)
    for name in info.variants:
        array = open_array(path, f"features/{name}")
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
                damaged.setdefault(name, set()).add(shard)
                first = start + int(valid_rows[np.flatnonzero(bad)[0]])
                problems.append(
                    f"{path}: features/{name} shard {shard}: {int(bad.sum())} valid row(s) hold NaN or Inf "
                    f"(first: row {first}, {rows.paths[first]})"
                )
    return problems, damaged


def _unreadable_row_chunks(path: Path, info: StoreInfo) -> list[int]:
    """Shards whose ``valid`` or ``error`` chunk fails to read (checksum, truncation, garbage)."""
    group = zarr.open_group(path, mode="r")
    bad = []
    for shard in range(info.n_shards):
        start, stop = shard_bounds(shard, info.n_rows, info.identity.shard_rows)
        try:
            group["valid"][start:stop], group["error"][start:stop]
        except (OSError, ValueError, RuntimeError):
            bad.append(shard)
    return bad


def _broken_variants(path: Path) -> dict[str, str]:
    """{variant: what is wrong} for the variants whose feature, progress or digest arrays cannot be opened."""
    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs)
        variants = attrs.get("variants", {})
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # open_store_info explains what is wrong with the group
    folders = ["features", "progress", "digests"]
    if attrs.get("embedding_dim"):
        folders += [EMBEDDING_ARRAY, digest_folder(EMBEDDING_ARRAY)]
    broken = {}
    for name in variants:
        for array in (f"{folder}/{name}" for folder in folders):
            if "digests/" in array and not (path / array).exists():
                continue  # stores written before digests existed
            try:
                opened = open_array(path, array)
                if not array.startswith(("features/", f"{EMBEDDING_ARRAY}/")):
                    opened[:]  # one small chunk per shard: a damaged flag or digest is found here
            except StoreError as error:
                broken[name] = str(error)
                break
            except (OSError, ValueError, RuntimeError) as error:
                broken[name] = f"{path}: array {array} cannot be read ({type(error).__name__}: {error})"
                break
    return broken
