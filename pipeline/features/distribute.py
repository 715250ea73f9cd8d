"""Sharing the shards of a store among processes: claims, this rank's order, rounds until nothing is pending.

Any number of processes (torchrun ranks, ``--rank/--world-size``, runs started by hand) extract into one store:
each claims a shard before working on it (``claims.py``), starts with its own (``shard % world_size == rank``),
takes over the others' unclaimed ones from the end, and returns once the stores are complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .. import cache
from ..variants import VariantSpec
from .backbone import Backbone
from .claims import ShardClaims
from .loop import BatchWork, PixelRecipe, PixelSource, ShardCommitter, ShardJob, extract_shards, plan_batches
from .manifest import Manifest
from .options import BadImageStop, ExtractConfig, ExtractError, StageTimes

CLAIM_POLL_SECONDS = 2.0  # how often a process that has nothing left to claim looks again


def shard_rows(shards: Mapping[int, object], n_rows: int, rows_per_shard: int) -> list[range]:
    return [range(*cache.shard_bounds(shard, n_rows, rows_per_shard)) for shard in shards]


def extract_claimed_shards(
    config: ExtractConfig,
    manifest: Manifest,
    backbone: Backbone,
    stores: dict[str, Path],
    wanted: Mapping[str, tuple[str, ...]],
    claims: ShardClaims,
    source: PixelSource,
    step: Callable[[np.ndarray], dict[str, np.ndarray]],
    bar: tqdm,
) -> tuple[list[int], StageTimes]:
    """Extract every shard some store still lacks, claiming each first; until no shard is pending anywhere.

    In rounds: each round claims and extracts what it can (this rank's own
    shards first, ``shard % world_size == rank``, then the others from the
    end), commits, and releases its claims; a round that could claim nothing
    (other processes hold the rest) waits and looks again, taking over stale
    claims. So every process returns once the stores are complete, whoever
    did the work.
    """
    done: list[int] = []
    times = StageTimes()
    previous = pending_targets(stores, wanted)
    while previous:
        jobs: dict[int, ShardJob] = {}
        order = shard_order(sorted(previous), config.rank, config.world_size)
        work = claimed_batches(order, previous, stores, claims, jobs, backbone.crop_size, config, len(manifest))
        committer = ShardCommitter(stores, jobs, claims)
        try:
            round_times = extract_shards(work, source, step, committer, fail_fast=config.fail_fast, progress=bar.update)
        except BadImageStop as stop:
            path = manifest.rows[stop.row].path
            raise ExtractError(f"{path}: {stop.reason} (stopped by --fail-fast; committed shards are kept)") from None
        done += committer.committed
        for name in ("decode", "backbone", "write", "wait_for_pixels", "wait_for_writes"):
            setattr(times, name, getattr(times, name) + getattr(round_times, name))
        pending = pending_targets(stores, wanted)
        by_others = set(previous) - set(pending) - set(committer.committed)
        bar.update(sum(len(rows) for rows in shard_rows(dict.fromkeys(by_others), len(manifest), config.shard_rows)))
        if pending and not jobs:
            time.sleep(CLAIM_POLL_SECONDS)
        previous = pending
    return done, times


def shard_order(shards: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's own shards in order, then every other shard from the end (where their owners get last)."""
    own = [shard for shard in shards if shard % world_size == rank]
    return own + [shard for shard in reversed(shards) if shard % world_size != rank]


def claimed_batches(
    order: Sequence[int],
    pending: Mapping[int, dict[str, tuple[str, ...]]],
    stores: Mapping[str, Path],
    claims: ShardClaims,
    jobs: dict[int, ShardJob],
    crop: int,
    config: ExtractConfig,
    n_rows: int,
) -> Iterator[BatchWork]:
    """The batches of each shard in ``order`` that this process could claim (recorded in ``jobs``); others are skipped."""
    for shard in order:
        targets = still_pending(stores, pending[shard], shard)
        if not targets:
            continue
        paths = [cache.claims_folder(stores[tap]) / f"{v}.{shard:06d}" for tap, names in targets.items() for v in names]
        if not claims.try_claim(paths):
            continue
        targets = still_pending(stores, targets, shard)  # committed by another process just before the claim
        if not targets:
            claims.release(paths)
            continue
        jobs[shard] = ShardJob(targets, tuple(paths))
        variants = tuple(
            VariantSpec.from_name(v) for v in dict.fromkeys(v for names in targets.values() for v in names)
        )
        recipe = PixelRecipe(variants, crop, config.seed)
        yield from plan_batches({shard: recipe}, n_rows, config.shard_rows, config.batch_size)


def still_pending(
    stores: Mapping[str, Path], targets: Mapping[str, tuple[str, ...]], shard: int
) -> dict[str, tuple[str, ...]]:
    """``targets`` without the variants whose shard is committed by now."""
    fresh = {
        tap: tuple(v for v in names if not cache.shard_done(stores[tap], v, shard)) for tap, names in targets.items()
    }
    return {tap: names for tap, names in fresh.items() if names}


def pending_targets(
    stores: Mapping[str, Path], wanted: Mapping[str, Sequence[str]]
) -> dict[int, dict[str, tuple[str, ...]]]:
    """Shard -> {tap: the wanted variants that tap's store still lacks there}; shards lacking none are left out."""
    pending: dict[int, dict[str, list[str]]] = {}
    for tap, names in wanted.items():
        for name in names:
            for shard in cache.pending_shards(stores[tap], name):
                pending.setdefault(shard, {}).setdefault(tap, []).append(name)
    return {shard: {tap: tuple(names) for tap, names in targets.items()} for shard, targets in sorted(pending.items())}
