"""Stage one's entry point: :func:`run_extract` wires the loop's parts for a split and its stores.

It checks the options, prepares one store per tap (created, or checked against an existing one), repairs what
it must not trust (``repair.py``), then extracts the pending shards among however many processes share the
store (``distribute.py``, ``loop.py``); a run whose share of undecodable rows exceeds ``max_invalid`` ends with
:class:`TooManyInvalid`, keeping the store.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .. import __version__, cache
from ..variants import VariantSpec
from .backbone import Backbone, BlockSelectionError
from .claims import ShardClaims
from .distribute import extract_claimed_shards, pending_targets, shard_rows
from .loop import ForwardStep, ImageSource
from .manifest import Manifest, read_manifest
from .options import ExtractConfig, ExtractError, ExtractSummary, OptionError, TooManyInvalid, store_path
from .repair import collect_failures, unflag_damaged_shards, unflag_invalid_shards
from .sources import RowImages


def run_extract(config: ExtractConfig) -> ExtractSummary:
    """Extract the split into one store per tap; resumable and shareable, see module doc.

    Raises :class:`OptionError` for options that do not fit (before any store
    is written), :class:`TooManyInvalid` (carrying the summary) when more than
    ``max_invalid`` of the rows could not be decoded.
    """
    config.validate()
    wall_start = time.perf_counter()
    manifest = read_manifest(config.manifest)
    if config.data_root is None and manifest.data_root is None:
        raise ExtractError(f"{config.manifest}: no data root recorded; pass --data-root")
    backbone = load_backbone(config)
    stores = {tap: prepare_store(config, manifest, backbone, tap, config.variants()) for tap in config.taps}
    wanted = {tap: tuple(variant.name for variant in config.variants()) for tap in config.taps}
    notes = unflag_damaged_shards(stores, wanted)
    if config.retry_invalid:
        wanted = {
            tap: tuple(dict.fromkeys([*names, *cache.open_store_info(stores[tap]).variants]))
            for tap, names in wanted.items()
        }
        notes += unflag_invalid_shards(stores)
    row_images = RowImages(manifest, config.data_root)
    source = ImageSource(
        row_images.location,
        config.max_pixels,
        config.decode_workers,
        decoded=lambda row: row_images.decoded(row, config.max_pixels),
    )
    step = ForwardStep(backbone, config.taps, config.store_dtype, embedding=True)
    pending = pending_targets(stores, wanted)
    n_shards = cache.shard_count(len(manifest), config.shard_rows)
    first_pending = len(pending)
    with (
        ShardClaims(config.rank, config.claim_timeout) as claims,
        tqdm(
            total=sum(len(rows) for rows in shard_rows(pending, len(manifest), config.shard_rows)),
            unit="img",
            desc=f"extract {config.split}"
            + (f" [rank {config.rank}/{config.world_size}]" if config.world_size > 1 else ""),
            disable=not config.progress,
            smoothing=0.05,
        ) as bar,
    ):
        done, times = extract_claimed_shards(config, manifest, backbone, stores, wanted, claims, source, step, bar)
    times.wall = time.perf_counter() - wall_start
    summary = ExtractSummary(
        stores=stores,
        n_rows=len(manifest),
        shards_done=len(done),
        shards_skipped=n_shards - first_pending,
        images_processed=sum(len(rows) for rows in shard_rows(dict.fromkeys(done), len(manifest), config.shard_rows)),
        failures=collect_failures(next(iter(stores.values()))),
        times=times,
        shards_by_others=first_pending - len(done),
        notes=tuple(notes),
    )
    if summary.n_invalid > config.max_invalid * summary.n_rows:
        raise TooManyInvalid(summary, config.max_invalid)
    return summary


def load_backbone(config: ExtractConfig) -> Backbone:
    try:
        return Backbone(config.backbone, config.block_selection)
    except BlockSelectionError as error:
        raise OptionError(f"--blocks: {error}") from None
    except (OSError, ValueError) as error:
        raise ExtractError(f"{config.backbone.model}: cannot load the backbone ({error})") from None


def prepare_store(
    config: ExtractConfig,
    manifest: Manifest,
    backbone: Backbone,
    tap: str,
    variants: Sequence[VariantSpec],
) -> Path:
    """Create the tap's store, or check that an existing one matches (race-free across processes); add variants."""
    path = store_path(config, tap)
    identity = cache.StoreIdentity(
        manifest_sha256=manifest.sha256(),
        model_id=config.backbone.model,
        model_revision=backbone.revision,
        model_config=backbone.model_config,
        tap=tap,
        block_indices=backbone.block_indices,
        dim=backbone.dim,
        crop_size=backbone.crop_size,
        mean=backbone.mean,
        std=backbone.std,
        dtype=config.store_dtype,
        compute_dtype=str(backbone.dtype).removeprefix("torch."),
        seed=config.seed,
        max_pixels=config.max_pixels,
        shard_rows=config.shard_rows,
        chunk_rows=config.chunk_rows,
        token=backbone.token,
        embedding_dim=backbone.embedding_dim,
    )
    if not config.overwrite:
        identity = as_older_store(path, identity)
    try:
        cache.create_store(
            path,
            identity,
            split=config.split,
            labels=[r.label for r in manifest.rows],
            paths=[r.path for r in manifest.rows],
            datasets=[r.dataset for r in manifest.rows],
            classes=[r.class_name for r in manifest.rows] if manifest.has_classes() else None,
            extra_attrs={
                "training": config.is_training(),
                "manifest": str(config.manifest),
                "data_root": str(config.data_root or manifest.data_root),
                "n_layers": backbone.n_layers,
                "package_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            if_exists="replace" if config.overwrite else "check",
        )
    except cache.StoreError as error:
        raise ExtractError(str(error)) from None
    for variant in variants:
        cache.add_variant(path, variant, len(backbone.block_indices), backbone.dim)
    return path


def as_older_store(path: Path, identity: cache.StoreIdentity) -> cache.StoreIdentity:
    """An existing store written before the image embedding was stored is resumed as it is, without one (its
    identity has no ``embedding_dim``); ``--overwrite`` rebuilds it with the embedding."""
    try:
        info = cache.open_store_info(path)
    except cache.StoreError:
        return identity
    if "embedding_dim" not in info.attrs:
        return dataclasses.replace(identity, embedding_dim=0)
    return identity
