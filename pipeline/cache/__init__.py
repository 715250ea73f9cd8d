"""The cache: the one door between stage one and stage two, and the only package that touches Zarr.

The cache is the set of feature stores, one Zarr v3 store per (split, backbone, tap); its format (arrays,
attributes, variants, integrity) is documented once, in ``docs/cache-format.md``. ``schema`` types a store
(identity, rows, attributes), ``writing`` creates and commits it complete-or-absent and durably, ``reading``
reads it with every checksum verified (raw shard files: ``_shard_reader``), ``checks`` verifies it, and
``hdf5`` copies a store to one HDF5 file and back. Import from here, not from the modules.
"""

from .checks import damaged_shards, reset_damaged_shards, verify_store
from .reading import (
    FeatureRows,
    NoEmbeddingError,
    ShardProblem,
    check_identity,
    committed_rows,
    describe_store,
    open_feature_rows,
    open_store_info,
    pending_shards,
    read_features,
    read_rows,
)
from .schema import (
    EMBEDDING_ARRAY,
    SCHEMA,
    RowTable,
    StoreError,
    StoreIdentity,
    StoreInfo,
    canonical_model_config,
    check_zarr_version,
    claims_folder,
    default_store_path,
    model_slug,
    placeholder_identity,
    shard_bounds,
    shard_count,
)
from .writing import (
    add_variant,
    commit_shard,
    create_store,
    delete_store,
    not_a_store_reason,
    shard_done,
    store_lock,
    unflag_shards,
    write_store,
)

__all__ = [
    "EMBEDDING_ARRAY",
    "SCHEMA",
    "FeatureRows",
    "NoEmbeddingError",
    "RowTable",
    "ShardProblem",
    "StoreError",
    "StoreIdentity",
    "StoreInfo",
    "add_variant",
    "canonical_model_config",
    "check_identity",
    "check_zarr_version",
    "claims_folder",
    "commit_shard",
    "committed_rows",
    "create_store",
    "damaged_shards",
    "default_store_path",
    "delete_store",
    "describe_store",
    "model_slug",
    "not_a_store_reason",
    "open_feature_rows",
    "open_store_info",
    "pending_shards",
    "placeholder_identity",
    "read_features",
    "read_rows",
    "reset_damaged_shards",
    "shard_bounds",
    "shard_count",
    "shard_done",
    "store_lock",
    "unflag_shards",
    "verify_store",
    "write_store",
]
