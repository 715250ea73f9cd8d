"""cache.open_feature_rows: rows in any order straight from the shard files, as read_features reads and checks them."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import separable_features, write_store
from pipeline import cache
from pipeline.cache import _shard_reader


@pytest.fixture
def store(tmp_path):
    features, labels = separable_features(150, n_blocks=3, dim=8, seed=1)
    features[32:48] = 0.0  # whole inner chunks of zeros
    return write_store(tmp_path / "s.zarr", {"center": features}, labels, ["d"] * 150, shard_rows=32, chunk_rows=8)


def shard_file(store, shard: int):
    return store / "features" / "center" / "c" / str(shard) / "0" / "0"


def test_gathered_rows_equal_the_whole_variant_indexed_in_any_order(store):
    whole = cache.read_features(store, "center")
    rows = cache.open_feature_rows(store, "center")
    assert rows.shape == whole.shape and rows.nbytes == whole.nbytes
    order = np.random.default_rng(0).permutation(150)
    assert np.array_equal(rows.gather(order), whole[order])  # first touch of every chunk: read whole and checked
    assert np.array_equal(rows.gather(order[::-1]), whole[order[::-1]])  # then row by row
    repeats = np.array([149, 0, 0, 33, 34, 35, 36, 40, 7, 149, 100])  # repeats, zero chunks, the short last shard
    assert np.array_equal(rows.gather(repeats), whole[repeats])
    assert not rows.gather(np.arange(32, 48)).any()
    out = np.empty((3, 3, 8), dtype=np.float16)
    assert rows.gather(np.array([5, 4, 3]), out=out) is out and np.array_equal(out, whole[[5, 4, 3]])


def test_each_chunk_checksum_is_verified_once(store, monkeypatch):
    checked = []
    crc = _shard_reader.crc32c.crc32c
    monkeypatch.setattr(
        _shard_reader.crc32c, "crc32c", lambda data, *start: checked.append(len(data)) or crc(data, *start)
    )
    rows = cache.open_feature_rows(store, "center")
    chunk_bytes = 8 * 3 * 8 * 2
    rows.gather(np.array([0, 1, 9]))  # chunks 0 and 1, and the shard's index
    assert checked.count(chunk_bytes) == 2
    rows.gather(np.array([2, 10, 3]))
    assert checked.count(chunk_bytes) == 2  # already verified: only the rows are read
    rows.gather(np.array([20]))
    assert checked.count(chunk_bytes) == 3


def test_damaged_data_and_files_are_store_errors_naming_the_store(store):
    data = bytearray(shard_file(store, 2).read_bytes())
    data[100] ^= 0xFF  # a flipped bit inside chunk 0 of shard 2 (rows 64..71)
    shard_file(store, 2).write_bytes(bytes(data))
    rows = cache.open_feature_rows(store, "center")
    assert rows.gather(np.array([0, 1])).shape == (2, 3, 8)  # other shards still read
    with pytest.raises(cache.StoreError, match=r"s\.zarr: features/center shard 2: chunk 0 .* fails its CRC32C"):
        rows.gather(np.array([70]))
    shard_file(store, 3).unlink()
    with pytest.raises(cache.StoreError, match="shard 3: file .* is missing, but the shard is marked done"):
        rows.gather(np.array([100]))
    whole = shard_file(store, 1).read_bytes()
    shard_file(store, 1).write_bytes(whole[:50])
    with pytest.raises(cache.StoreError, match="shard 1: file"):
        rows.gather(np.array([40]))


def test_bad_rows_and_incomplete_variants_are_refused(store):
    rows = cache.open_feature_rows(store, "center")
    with pytest.raises(IndexError):
        rows.gather(np.array([150]))
    with pytest.raises(ValueError, match="C-contiguous"):
        rows.gather(np.array([1, 2]), out=np.empty((2, 3, 8), dtype=np.float32))
    with pytest.raises(cache.StoreError, match="no variant 'view_000'"):
        cache.open_feature_rows(store, "view_000")
