"""Repairs before an extraction trusts its store: damaged committed shards reported and redone; with --retry-invalid, shards holding undecodable rows redone; the failures a store records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .. import cache
from .options import FAILURE_EXAMPLES


def unflag_damaged_shards(stores: Mapping[str, Path], wanted: Mapping[str, Sequence[str]]) -> list[str]:
    """Shards marked done whose files are missing or wrong: reported, and unflagged so that this run redoes them."""
    notes = []
    for tap, path in stores.items():
        problems = cache.damaged_shards(path, wanted[tap])
        if not problems:
            continue
        redo: dict[str, set[int]] = {}
        for problem in problems:
            redo.setdefault(problem.variant or "", set()).add(problem.shard)
        cache.unflag_shards(path, {variant: sorted(shards) for variant, shards in redo.items()})
        notes.append(f"{path}: {len(problems)} problem(s) in shards marked done; re-extracting them:")
        notes += [f"  {problem.describe(path)}" for problem in problems[:FAILURE_EXAMPLES]]
    return notes


def unflag_invalid_shards(stores: Mapping[str, Path]) -> list[str]:
    """--retry-invalid: every committed shard holding an invalid row is unflagged for all its variants, to be redone."""
    notes = []
    for path in stores.values():
        info = cache.open_store_info(path)
        rows = cache.read_rows(path)
        invalid = cache.committed_rows(info) & ~rows.valid
        shards = sorted(set((np.flatnonzero(invalid) // info.identity.shard_rows).tolist()))
        if shards:
            cache.unflag_shards(path, {variant: shards for variant in info.variants})
            notes.append(f"{path}: retrying {int(invalid.sum())} invalid rows in {len(shards)} shard(s)")
    return notes


def collect_failures(path: Path) -> tuple[tuple[str, str], ...]:
    """(path, reason) of every image the store records as unusable, this run's and earlier ones'."""
    rows = cache.read_rows(path)
    bad = np.flatnonzero(cache.committed_rows(cache.open_store_info(path)) & ~rows.valid)
    return tuple((str(rows.paths[i]), str(rows.errors[i])) for i in bad)
