"""Checking stores: cheap checks of committed shards' files (before a resume trusts a flag), and full verification."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from . import _shard_reader
from .reading import ShardProblem, _read_flags, _row_chunk_problems, open_store_info, read_features, read_rows
from .schema import EMBEDDING_ARRAY, StoreError, shard_bounds
from .writing import unflag_shards


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
            array = zarr.open_array(path / array_name / name, mode="r")
            layout = _shard_reader.raw_shard_layout(array)
            for shard in np.flatnonzero(info.shard_flags[name]).tolist():
                for problem in _shard_reader.shard_file_problems(path / array_name / name, layout, array, shard):
                    problems.append(ShardProblem(f"{array_name}/{name}", shard, problem, name))
    return problems + _row_chunk_problems(info, names)


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
