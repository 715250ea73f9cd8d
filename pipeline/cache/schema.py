"""What a store is: its schema version, identity, row table and attributes, typed; where it lives; its shards."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import PipelineError
from ..names import DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_ROWS
from ..variants import VariantKind, VariantSpec

SCHEMA_PREFIX = "rine-pipeline/feature-store@"


SCHEMA = SCHEMA_PREFIX + "2"


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
    ``token`` is the per-block token rule (``cls``, or ``mean`` of the patch
    tokens for backbones without a CLS token), ``embedding_dim`` the width of
    the model's pooled image embedding stored beside the tokens (0: none, as
    in stores written before it was stored). Both default for older stores.
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
    token: str = "cls"
    embedding_dim: int = 0

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreIdentity:
        values = {}
        for f in fields(cls):
            if f.name in _ADDED_FIELDS and f.name not in attrs:
                continue  # a store written before the field existed: its default
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
        keys = (
            "model_id",
            "model_revision",
            "model_config",
            "tap",
            "token",
            "block_indices",
            "dim",
            "crop_size",
            "mean",
            "std",
        )
        return [d for d in self.differences(other) if d.split(":")[0].split(".")[0] in keys]


_ADDED_FIELDS = ("token", "embedding_dim")  # identity fields newer than the schema: absent in older stores


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


EMBEDDING_ARRAY = "embedding"  # embedding/<variant>: (N, 1, embedding_dim), row-aligned with features/<variant>


def digest_folder(array_name: str) -> str:
    """Where the digests of an array's committed shards are kept: ``digests/<variant>`` for the block tokens,
    ``<array>_digests/<variant>`` for another array (``embedding_digests``)."""
    return "digests" if array_name == "features" else f"{array_name}_digests"


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


def claims_folder(path: Path) -> Path:
    """Where processes sharing a store leave their claims on shards (``extract.py``), next to the store."""
    return Path(path).with_name(f".{Path(path).name}.claims")
