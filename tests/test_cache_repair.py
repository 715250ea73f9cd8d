"""Stores that know which rows each shard holds, and repairs that repair (issue 24, items 1 and 2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import crc32c
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import make_folder_dataset
from pipeline import cache
from pipeline.cli import main
from pipeline.features import BackboneConfig, ExtractConfig, build_manifest, run_extract, write_manifest
from pipeline.variants import VariantSpec

N_BLOCKS, DIM = 3, 5


def shard_file_of(path: Path, variant: str, shard: int) -> Path:
    return path / "features" / variant / "c" / str(shard) / "0" / "0"


def write_24(path: Path) -> tuple[Path, np.ndarray]:
    """24 rows in three full shards of 8 (chunks of 2): shard files of the same size, each valid on its own."""
    values = (np.random.default_rng(5).standard_normal((24, N_BLOCKS, DIM)) + 3).astype(np.float16)
    identity = cache.placeholder_identity(N_BLOCKS, DIM, shard_rows=8, chunk_rows=2)
    cache.write_store(
        path, identity, split="val", labels=[i % 2 for i in range(24)], paths=[f"{i}.png" for i in range(24)],
        datasets=["a"] * 24, features={"center": values},
    )  # fmt: skip
    return path, values


def recommit(path: Path, values: np.ndarray) -> None:
    """What `pipeline extract` does for every pending shard: commit it whole again."""
    for shard in cache.pending_shards(path, "center"):
        start, stop = cache.shard_bounds(shard, len(values), 8)
        cache.commit_shard(
            path, shard, {"center": values[start:stop]}, np.ones(stop - start, bool), [""] * (stop - start)
        )


def store_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_swapped_shard_files_are_refused_by_the_reader_and_verify_and_reset_repairs_them(tmp_path: Path) -> None:
    path, values = write_24(tmp_path / "s.zarr")
    clean = store_files(path)
    first, second = shard_file_of(path, "center", 0), shard_file_of(path, "center", 1)
    a, b = first.read_bytes(), second.read_bytes()
    assert len(a) == len(b) and a != b  # both whole and valid on their own
    first.write_bytes(b)
    second.write_bytes(a)

    with pytest.raises(cache.StoreError, match=r"features/center shard 0: file .* does not hold the rows committed"):
        cache.read_features(path, "center")
    with pytest.raises(cache.StoreError, match=r"shard 1: file .* does not hold the rows committed as shard 1"):
        cache.read_features(path, "center", slice(8, 16))
    np.testing.assert_array_equal(cache.read_features(path, "center", slice(16, 24)), values[16:])
    with pytest.raises(cache.StoreError, match="does not hold the rows"):
        cache.open_feature_rows(path, "center").gather(np.array([9, 2]))
    assert [(p.shard, "does not hold the rows" in p.problem) for p in cache.damaged_shards(path)] == [
        (0, True),
        (1, True),
    ]
    result = CliRunner().invoke(main, ["cache", "verify", str(path)])
    assert result.exit_code == 1 and "2 problem(s) found" in result.output, result.output

    assert cache.reset_damaged_shards(path) == 2
    recommit(path, values)
    assert cache.verify_store(path) == []
    assert store_files(path) == clean


def wrong_index_length(file: Path, n_chunks: int) -> None:
    """Rewrite chunk 0's length in the index, and the index checksum with it: a valid index that lies."""
    data = bytearray(file.read_bytes())
    table_at = len(data) - (n_chunks * 16 + 4)
    data[table_at + 8 : table_at + 16] = (60).to_bytes(8, "little")
    data[-4:] = crc32c.crc32c(bytes(data[table_at:-4])).to_bytes(4, "little")
    file.write_bytes(bytes(data))


def garble_index(file: Path, n_chunks: int) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:-20] + bytes(16) + data[-4:])


def truncate_tail(file: Path, n_chunks: int) -> None:
    file.write_bytes(file.read_bytes()[:-7])


DAMAGE = {"truncated-tail": truncate_tail, "garbled-index": garble_index, "wrong-index-length": wrong_index_length}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_damaged_index_is_repaired_by_reset_bad_and_a_new_commit(tmp_path: Path, damage: str) -> None:
    path, values = write_24(tmp_path / "s.zarr")
    clean = store_files(path)
    DAMAGE[damage](shard_file_of(path, "center", 1), 4)
    assert [p.shard for p in cache.damaged_shards(path)] == [1]
    with pytest.raises(cache.StoreError, match="pipeline cache verify .* --reset-bad"):
        cache.read_features(path, "center")  # fit's error says how to repair it
    assert cache.reset_damaged_shards(path) == 1
    recommit(path, values)  # zarr would fail reading the damaged file's checksum if the commit read it
    assert cache.verify_store(path) == [] and store_files(path) == clean


def test_a_garbled_valid_chunk_is_reset_and_rewritten(tmp_path: Path) -> None:
    path, values = write_24(tmp_path / "s.zarr")
    clean = store_files(path)
    chunk = path / "valid" / "c" / "2"
    chunk.write_bytes(b"\x00" * len(chunk.read_bytes()))
    assert any("row arrays cannot be read" in p for p in cache.verify_store(path))
    assert cache.reset_damaged_shards(path) == 1
    recommit(path, values)
    assert cache.verify_store(path) == [] and store_files(path) == clean


def test_nan_rows_are_reset_and_re_extracted(tmp_path: Path) -> None:
    path, values = write_24(tmp_path / "s.zarr")
    clean = store_files(path)
    poisoned = values[8:16].copy()
    poisoned[3, 1, 1] = np.nan  # as a backbone gone wrong would commit it: checksums and digest all hold
    cache.commit_shard(path, 1, {"center": poisoned}, np.ones(8, bool), [""] * 8)
    assert cache.verify_store(path) == [
        f"{path}: features/center shard 1: 1 valid row(s) hold NaN or Inf (first: row 11, 11.png)"
    ]
    assert cache.reset_damaged_shards(path) == 1
    recommit(path, values)
    assert cache.verify_store(path) == [] and store_files(path) == clean


# ---------------------------------------------------------------- through the commands


@pytest.fixture()
def extracted(tiny_clip_dir: Path, tmp_path: Path) -> dict:
    """12 images in shards of 4, extracted once, and a copy of the clean store."""
    root = make_folder_dataset(tmp_path / "data", n_per_label=3, seed=6)
    manifest = tmp_path / "manifests" / "val.csv"
    write_manifest(build_manifest("folder", root, "val"), manifest)
    config = ExtractConfig(
        split="val", manifest=manifest, backbone=BackboneConfig(model=str(tiny_clip_dir), device="cpu", dtype="float32"),
        cache_dir=tmp_path / "cache", batch_size=4, shard_rows=4, chunk_rows=2, progress=False,
    )  # fmt: skip
    store = run_extract(config).stores["ln2"]
    shutil.copytree(store, tmp_path / "clean.zarr")
    return {"config": config, "store": store, "clean": store_files(store)}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_reset_bad_then_extract_repairs_a_damaged_index_bit_identical(extracted: dict, damage: str) -> None:
    store = extracted["store"]
    DAMAGE[damage](shard_file_of(store, "center", 1), 2)  # shards of 4 rows in chunks of 2
    result = CliRunner().invoke(main, ["cache", "verify", str(store), "--reset-bad"])
    assert result.exit_code == 1 and "reset 1 shard flag(s)" in result.output, result.output
    summary = run_extract(extracted["config"])
    assert summary.shards_done == 1
    assert cache.verify_store(store) == [] and store_files(store) == extracted["clean"]


@pytest.mark.slow
def test_extract_resume_alone_repairs_swapped_shards(extracted: dict) -> None:
    store = extracted["store"]
    first, second = shard_file_of(store, "center", 0), shard_file_of(store, "center", 2)
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    summary = run_extract(extracted["config"])
    assert summary.shards_done == 2 and "does not hold the rows" in summary.report()
    assert cache.verify_store(store) == [] and store_files(store) == extracted["clean"]


def test_digests_are_recorded_with_each_flag(tmp_path: Path) -> None:
    path, _ = write_24(tmp_path / "s.zarr")
    digests = zarr.open_array(path / "digests" / "center", mode="r")[:]
    assert digests.dtype == np.int64 and (digests >= 0).all() and len(set(digests.tolist())) == 3


METADATA_DAMAGE = {
    "garbage-feature-zarr-json": lambda p: (p / "features/center/zarr.json").write_text("garbage"),
    "deleted-features-folder": lambda p: shutil.rmtree(p / "features"),
    "garbage-progress-zarr-json": lambda p: (p / "progress/center/zarr.json").write_text("{}"),
    "garbled-progress-chunk": lambda p: (p / "progress/center/c/1").write_bytes(b"\x00" * 9),
    "deleted-digests": lambda p: shutil.rmtree(p / "digests/center"),
}


@pytest.mark.parametrize("damage", list(METADATA_DAMAGE))
def test_damaged_array_metadata_is_one_error_line_and_reset_bad_drops_the_variant(tmp_path: Path, damage: str) -> None:
    path, values = write_24(tmp_path / "s.zarr")
    clean = store_files(path)
    METADATA_DAMAGE[damage](path)
    if damage == "deleted-digests":  # read as a store of an earlier version: no digests to check
        assert cache.verify_store(path) == []
        return
    result = CliRunner().invoke(main, ["cache", "verify", str(path)])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("Error: "), result.output
    result = CliRunner().invoke(main, ["cache", "info", str(path)])
    assert isinstance(result.exception, (SystemExit, type(None))), result.exception  # no traceback
    with pytest.raises(cache.StoreError, match="cannot be (opened|read).*--reset-bad"):
        cache.read_features(path, "center")
    assert cache.reset_damaged_shards(path) == 3
    cache.add_variant(path, VariantSpec.from_name("center"), N_BLOCKS, DIM)  # as `pipeline extract` does
    recommit(path, values)
    assert cache.verify_store(path) == [] and store_files(path) == clean
