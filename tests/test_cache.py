"""Feature stores: round trips, the raw shard reader against zarr, identity and completeness checks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from pipeline import cache
from pipeline.cache import StoreError, StoreIdentity, _shard_reader
from pipeline.variants import VariantKind, VariantSpec

N_BLOCKS, DIM = 3, 5


def make_identity(**changes: object) -> StoreIdentity:
    fields = dict(manifest_sha256="ab" * 32, model_id="tiny/model", model_revision="local-sha256:0123", crop_size=32,
                  max_pixels=1000, shard_rows=8, chunk_rows=2)  # fmt: skip
    return cache.placeholder_identity(N_BLOCKS, DIM, **{**fields, **changes})


def new_store(
    path: Path,
    n_rows: int,
    identity: StoreIdentity | None = None,
    paths: list[str] | None = None,
    classes: list[str | None] | None = None,
) -> Path:
    identity = identity or make_identity()
    cache.create_store(
        path,
        identity,
        split="val",
        labels=[i % 2 for i in range(n_rows)],
        paths=paths or [f"d/img_{i:03d}.png" for i in range(n_rows)],
        datasets=["a" if i < n_rows // 2 else "b" for i in range(n_rows)],
        classes=classes,
        extra_attrs={"note": "test"},
    )
    return path


def features_for(n_rows: int, seed: int, dtype: str = "float16") -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((n_rows, N_BLOCKS, DIM))
    return (values + 3.0).astype(dtype)  # never zero, so no chunk is dropped by accident


def commit_all(path: Path, variant: str, values: np.ndarray, shard_rows: int) -> None:
    for shard in range(cache.shard_count(len(values), shard_rows)):
        start, stop = cache.shard_bounds(shard, len(values), shard_rows)
        cache.commit_shard(
            path, shard, {variant: values[start:stop]}, np.ones(stop - start, bool), [""] * (stop - start)
        )


def zarr_features(path: Path, variant: str) -> np.ndarray:
    return zarr.open_array(path / "features" / variant, mode="r")[...]


def build_store_21(path: Path, chunk_rows: int) -> tuple[Path, np.ndarray]:
    """21 rows in shards of 8, every shard committed; the last shard is partial."""
    values = features_for(21, seed=1)
    cache.write_store(
        path,
        make_identity(chunk_rows=chunk_rows),
        split="val",
        labels=[i % 2 for i in range(21)],
        paths=[f"d/img_{i:03d}.png" for i in range(21)],
        datasets=["a" if i < 10 else "b" for i in range(21)],
        features={"center": values},
        extra_attrs={"note": "test"},
    )
    return path, values


@pytest.fixture()
def store_21(tmp_path: Path) -> tuple[Path, np.ndarray]:
    return build_store_21(tmp_path / "s.zarr", chunk_rows=2)


@pytest.fixture(params=[2, 4], ids=["chunk2", "chunk4"])
def reader_store(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, np.ndarray]:
    """With chunks of 2 the last shard's last chunk lies wholly past row 20;
    with chunks of 4, rows inside one chunk can be non-adjacent."""
    return build_store_21(tmp_path / "s.zarr", chunk_rows=request.param)


def test_round_trip_of_rows_and_features(store_21: tuple[Path, np.ndarray]) -> None:
    path, values = store_21
    rows = cache.read_rows(path)
    assert len(rows) == 21
    np.testing.assert_array_equal(rows.labels, [i % 2 for i in range(21)])
    assert rows.labels.dtype == np.int8
    assert list(rows.paths) == [f"d/img_{i:03d}.png" for i in range(21)]
    assert list(rows.datasets) == ["a"] * 10 + ["b"] * 11
    assert rows.classes is None
    assert rows.valid.all() and list(rows.errors) == [""] * 21

    features = cache.read_features(path, "center")
    assert features.dtype == np.float16 and features.shape == (21, N_BLOCKS, DIM)
    np.testing.assert_array_equal(features, values)

    info = cache.open_store_info(path)
    assert info.identity == make_identity()
    assert info.split == "val" and info.n_rows == 21
    assert info.variants == {"center": VariantSpec.center()}
    assert info.complete_variants == ("center",)
    assert info.attrs["note"] == "test"


@pytest.mark.parametrize(
    "rows",
    [
        None,
        slice(3, 17),
        slice(0, 21, 3),
        slice(16, 21),
        np.array([0, 1, 3, 7, 8, 9, 15, 16, 20]),  # crosses chunk and shard boundaries
        np.array([0, 2, 5, 7, 9, 12, 14, 19, 20]),  # gaps inside chunks
        np.array([16, 18, 20]),  # gaps inside the last, partial shard
        np.array([5]),
        np.array([19, 20]),
        np.arange(21),
        np.array([], dtype=np.int64),
    ],
    ids=["all", "slice", "strided", "last-shard", "fancy", "gaps", "last-gaps", "one", "last-rows", "arange", "empty"],
)
def test_raw_reader_equals_zarr(reader_store: tuple[Path, np.ndarray], rows: object) -> None:
    path, values = reader_store
    expected = zarr_features(path, "center")
    np.testing.assert_array_equal(expected, values)
    index = np.arange(21) if rows is None else np.arange(21)[rows]
    got = cache.read_features(path, "center", rows)
    assert got.dtype == np.float16 and got.shape == (len(index), N_BLOCKS, DIM)
    np.testing.assert_array_equal(got, expected[index])


def test_store_layout_takes_the_raw_path(reader_store: tuple[Path, np.ndarray]) -> None:
    path, _ = reader_store
    array = zarr.open_array(path / "features" / "center", mode="r")
    layout = _shard_reader.raw_shard_layout(array)
    assert layout is not None
    assert (layout.shard_rows, layout.chunk_rows) == (8, cache.open_store_info(path).identity.chunk_rows)


def test_raw_reader_fills_into_given_out(reader_store: tuple[Path, np.ndarray]) -> None:
    path, values = reader_store
    out = np.full((4, N_BLOCKS, DIM), 7, dtype=np.float16)
    result = cache.read_features(path, "center", np.array([2, 9, 10, 18]), out=out)
    assert result is out
    np.testing.assert_array_equal(out, values[[2, 9, 10, 18]])
    with pytest.raises(ValueError, match="out has shape"):
        cache.read_features(path, "center", np.array([1, 2]), out=np.empty((2, N_BLOCKS, DIM), np.float32))


def test_raw_reader_into_strided_and_unaligned_out(reader_store: tuple[Path, np.ndarray]) -> None:
    path, values = reader_store
    expected = zarr_features(path, "center")
    rows = np.array([0, 1, 2, 3, 4, 6, 9, 10, 11, 12, 13, 14, 15, 16, 17, 20])
    strided = np.full((2 * len(rows), N_BLOCKS, DIM), 9, dtype=np.float16)[::2]
    assert not strided.flags.c_contiguous
    cache.read_features(path, "center", rows, out=strided)
    np.testing.assert_array_equal(strided, expected[rows])
    nbytes = len(rows) * N_BLOCKS * DIM * 2
    buffer = np.zeros(nbytes + 128, dtype=np.uint8)
    for shift in range(0, 64, 2):  # every float16 offset modulo the copy alignment
        out = buffer[shift : shift + nbytes].view(np.float16).reshape(len(rows), N_BLOCKS, DIM)
        out[...] = 9
        cache.read_features(path, "center", rows, out=out)
        np.testing.assert_array_equal(out, expected[rows], err_msg=f"shift {shift}")


def test_raw_reader_with_small_read_pieces(
    reader_store: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks checksummed and copied in pieces smaller than a row, into any alignment of out, give the same bytes."""
    path, values = reader_store
    row_bytes = N_BLOCKS * DIM * 2
    monkeypatch.setattr(_shard_reader, "_PIECE_BYTES", row_bytes // 2 + 6)
    expected = zarr_features(path, "center")
    for rows in (None, np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 16, 17, 18, 19, 20]), slice(2, 19)):
        index = np.arange(21) if rows is None else np.arange(21)[rows]
        buffer = np.zeros(len(index) * row_bytes + 64, dtype=np.uint8)
        for shift in (0, 2, 10):
            out = buffer[shift : shift + len(index) * row_bytes].view(np.float16).reshape(len(index), N_BLOCKS, DIM)
            cache.read_features(path, "center", rows, out=out)
            np.testing.assert_array_equal(out, expected[index])


def test_row_indices_must_increase_and_stay_in_range(store_21: tuple[Path, np.ndarray]) -> None:
    path, _ = store_21
    with pytest.raises(ValueError, match="strictly increasing"):
        cache.read_features(path, "center", np.array([3, 2]))
    with pytest.raises(ValueError, match="strictly increasing"):
        cache.read_features(path, "center", np.array([2, 2]))
    with pytest.raises(IndexError):
        cache.read_features(path, "center", np.array([0, 21]))
    with pytest.raises(IndexError):
        cache.read_features(path, "center", np.array([-1, 3]))


def test_zero_chunks_are_written_and_unwritten_shards_read_as_zarr_does(tmp_path: Path) -> None:
    path = new_store(tmp_path / "zeros.zarr", 21)
    cache.add_variant(path, VariantSpec.center(), N_BLOCKS, DIM)
    values = features_for(21, seed=2)
    values[2:4] = 0  # one whole inner chunk of zeros: written all the same (zarr's default would drop it)
    values[8:16] = 0  # a whole shard of zeros (every row invalid): its file is written
    commit_all(path, "center", values, 8)
    assert (path / "features" / "center" / "c" / "1" / "0" / "0").is_file()
    assert cache.damaged_shards(path) == []

    expected = zarr_features(path, "center")
    np.testing.assert_array_equal(expected, values)
    np.testing.assert_array_equal(cache.read_features(path, "center"), expected)
    rows = np.array([1, 2, 3, 4, 9, 15, 16])
    np.testing.assert_array_equal(cache.read_features(path, "center", rows), expected[rows])

    # A shard never committed (incomplete store) reads as the fill value too.
    cache.add_variant(path, VariantSpec.train_view(0), N_BLOCKS, DIM)
    first = features_for(8, seed=3)
    cache.commit_shard(path, 0, {"view_000": first}, np.ones(8, bool), [""] * 8)
    partial = cache.read_features(path, "view_000", require_complete=False)
    np.testing.assert_array_equal(partial, zarr_features(path, "view_000"))
    np.testing.assert_array_equal(partial[:8], first)
    assert not partial[8:].any()


def test_float32_store(tmp_path: Path) -> None:
    path = new_store(tmp_path / "f32.zarr", 13, make_identity(dtype="float32", shard_rows=4, chunk_rows=4))
    cache.add_variant(path, VariantSpec.center(), N_BLOCKS, DIM)
    values = features_for(13, seed=4, dtype="float32")
    commit_all(path, "center", values, 4)

    full = cache.read_features(path, "center")
    assert full.dtype == np.float32
    np.testing.assert_array_equal(full, zarr_features(path, "center"))
    np.testing.assert_array_equal(full, values)
    rows = np.array([0, 3, 4, 11, 12])
    np.testing.assert_array_equal(cache.read_features(path, "center", rows), values[rows])


def test_compressed_array_falls_back_to_zarr(reader_store: tuple[Path, np.ndarray]) -> None:
    path, _ = reader_store
    values = features_for(21, seed=5)
    compressed = zarr.create_array(
        path / "features" / "center",
        shape=values.shape,
        chunks=(4, N_BLOCKS, DIM),
        shards=(8, N_BLOCKS, DIM),
        dtype="float16",
        compressors=ZstdCodec(level=3),
        fill_value=0,
        overwrite=True,
    )
    compressed[...] = values
    assert _shard_reader.raw_shard_layout(compressed) is None

    np.testing.assert_array_equal(cache.read_features(path, "center"), values)
    rows = np.array([1, 3, 7, 8, 20])
    np.testing.assert_array_equal(cache.read_features(path, "center", rows), values[rows])


def test_unsharded_array_falls_back_to_zarr(store_21: tuple[Path, np.ndarray]) -> None:
    path, _ = store_21
    values = features_for(21, seed=6)
    plain = zarr.create_array(
        path / "features" / "center", shape=values.shape, chunks=(4, N_BLOCKS, DIM), dtype="float16", overwrite=True
    )
    plain[...] = values
    assert _shard_reader.raw_shard_layout(plain) is None
    np.testing.assert_array_equal(cache.read_features(path, "center", slice(5, 19)), values[5:19])


def test_identity_mismatch_names_each_differing_field(store_21: tuple[Path, np.ndarray]) -> None:
    path, _ = store_21
    cache.check_identity(path, make_identity())  # the same identity passes
    wanted = make_identity(seed=7, tap="hidden", block_indices=(1, 2))
    with pytest.raises(StoreError) as caught:
        cache.check_identity(path, wanted)
    message = str(caught.value)
    assert "seed: store has 0, asked for 7" in message
    assert "tap: store has 'ln2', asked for 'hidden'" in message
    assert "block_indices: store has (0, 1, 2), asked for (1, 2)" in message
    for same in ("manifest_sha256", "model_id", "dtype", "shard_rows", "max_pixels"):
        assert f"{same}:" not in message
    assert str(path) in message and "--overwrite" in message


def test_compatible_features_ignores_manifest_and_seed() -> None:
    store = make_identity()
    other_split = make_identity(manifest_sha256="cd" * 32, seed=3, max_pixels=5)
    assert store.compatible_features(other_split) == []
    other_model = make_identity(model_id="other", tap="hidden")
    assert [d.split(":")[0] for d in store.compatible_features(other_model)] == ["model_id", "tap"]


def test_incomplete_variant_is_refused(tmp_path: Path) -> None:
    path = new_store(tmp_path / "part.zarr", 21)
    cache.add_variant(path, VariantSpec.center(), N_BLOCKS, DIM)
    cache.commit_shard(path, 1, {"center": features_for(8, seed=7)}, np.ones(8, bool), [""] * 8)
    assert cache.pending_shards(path, "center") == [0, 2]
    with pytest.raises(StoreError, match=r"'center' is incomplete \(2 shards missing\)"):
        cache.read_features(path, "center")
    with pytest.raises(StoreError, match="no variant 'view_000'"):
        cache.read_features(path, "view_000")
    assert cache.open_store_info(path).complete_variants == ()


def test_commit_shard_refuses_wrong_row_count(tmp_path: Path) -> None:
    path = new_store(tmp_path / "rows.zarr", 21)
    cache.add_variant(path, VariantSpec.center(), N_BLOCKS, DIM)
    with pytest.raises(ValueError, match="shard 2 .* has 5 rows, got 8"):
        cache.commit_shard(path, 2, {"center": features_for(8, seed=8)}, np.ones(8, bool), [""] * 8)
    assert cache.pending_shards(path, "center") == [0, 1, 2]


def test_add_variant_is_idempotent(store_21: tuple[Path, np.ndarray]) -> None:
    path, values = store_21
    cache.add_variant(path, VariantSpec.center(), N_BLOCKS, DIM)
    np.testing.assert_array_equal(cache.read_features(path, "center"), values)
    cache.add_variant(path, VariantSpec.perturbed("jpeg", "official"), N_BLOCKS, DIM)
    info = cache.open_store_info(path)
    assert list(info.variants) == ["center", "jpeg-official"]
    assert info.variants["jpeg-official"] == VariantSpec(
        "jpeg-official", "perturb", perturbation="jpeg", preset="official"
    )
    assert info.complete_variants == ("center",)


def test_add_variant_after_a_crash_between_its_arrays_and_its_attribute(tmp_path: Path) -> None:
    """A kill inside add_variant leaves the arrays without the attribute; the next run must go on."""
    path = new_store(tmp_path / "crash.zarr", 21)
    group = zarr.open_group(path, mode="r+")
    group.create_array(
        "features/center",
        shape=(21, N_BLOCKS, DIM),
        chunks=(2, N_BLOCKS, DIM),
        shards=(8, N_BLOCKS, DIM),
        dtype="float16",
        compressors=None,
        fill_value=0,
    )
    group.create_array("progress/center", shape=(3,), chunks=(1,), dtype=bool, fill_value=False)

    cache.add_variant(path, VariantSpec.center(), N_BLOCKS, DIM)

    values = features_for(21, seed=9)
    commit_all(path, "center", values, 8)
    np.testing.assert_array_equal(cache.read_features(path, "center"), values)


def test_describe_store_lists_variants_and_failures(tmp_path: Path) -> None:
    path = new_store(tmp_path / "desc.zarr", 21, classes=["cat"] * 10 + [None] * 11)
    cache.add_variant(path, VariantSpec.center(), N_BLOCKS, DIM)
    cache.add_variant(path, VariantSpec.train_view(0), N_BLOCKS, DIM)
    valid = np.ones(8, bool)
    valid[[2, 5]] = False
    errors = [""] * 8
    errors[2], errors[5] = "file is empty (0 bytes)", "missing file"
    for shard in range(3):
        start, stop = cache.shard_bounds(shard, 21, 8)
        n = stop - start
        cache.commit_shard(path, shard, {"center": features_for(n, seed=shard)}, valid[:n], errors[:n])
    cache.commit_shard(path, 0, {"view_000": features_for(8, seed=9)}, valid, errors)

    text = cache.describe_store(path)

    assert "rows         21" in text
    assert "model_id     tiny/model" in text and "tap          ln2" in text
    lines = text.splitlines()
    center_line = next(line for line in lines if line.strip().startswith("center"))
    view_line = next(line for line in lines if line.strip().startswith("view_000"))
    assert center_line.split() == ["center", "complete"]
    assert view_line.split() == ["view_000", "1/3", "shards"]
    assert "invalid rows 5" in text
    assert "d/img_002.png: file is empty (0 bytes)" in text
    assert "d/img_013.png: missing file" in text
    rows = cache.read_rows(path)
    assert list(rows.classes) == ["cat"] * 10 + [""] * 11
    assert np.flatnonzero(~rows.valid).tolist() == [2, 5, 10, 13, 18]  # the last shard has only 5 rows


def test_describe_store_caps_listed_failures(tmp_path: Path) -> None:
    path = new_store(tmp_path / "many.zarr", 24, make_identity(shard_rows=24, chunk_rows=4))
    cache.add_variant(path, VariantSpec.center(), N_BLOCKS, DIM)
    cache.commit_shard(path, 0, {"center": features_for(24, seed=1)}, np.zeros(24, bool), ["bad"] * 24)
    text = cache.describe_store(path)
    assert "invalid rows 24" in text
    assert text.count(": bad") == 20
    assert "... and 4 more" in text


def test_unicode_and_spaces_survive_in_paths(tmp_path: Path) -> None:
    names = ["a/ünïcødé 图像.png", "b/with  two spaces.png", "c/emoji 🙂.jpg", "d/plain.png", "e/tab-free ñ.png"]
    path = new_store(
        tmp_path / "dir with spaces é" / "s.zarr", 5, make_identity(shard_rows=4, chunk_rows=2), paths=names
    )
    rows = cache.read_rows(path)
    assert list(rows.paths) == names
    cache.add_variant(path, VariantSpec.center(), N_BLOCKS, DIM)
    values = features_for(5, seed=10)
    commit_all(path, "center", values, 4)
    np.testing.assert_array_equal(cache.read_features(path, "center"), values)
    errors = ["", "", "", "", "décodage raté: ü"]
    cache.commit_shard(path, 1, {"center": values[4:]}, np.zeros(1, bool), errors[4:])
    assert "e/tab-free ñ.png: décodage raté: ü" in cache.describe_store(path)


def test_create_store_leaves_no_temporary_folder(tmp_path: Path) -> None:
    path = new_store(tmp_path / "clean.zarr", 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".clean.zarr.lock", "clean.zarr"]
    assert cache.open_store_info(path).variants == {}


def test_non_stores_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a feature store"):
        cache.open_store_info(tmp_path)
    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["schema"] = "something-else"
    with pytest.raises(StoreError, match="not a rine-pipeline feature store"):
        cache.open_store_info(tmp_path / "other.zarr")


def test_default_store_path_and_shard_arithmetic(tmp_path: Path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    assert cache.default_store_path(tmp_path, "openai/clip-vit-large-patch14", "ln2", "val") == (
        tmp_path / "openai--clip-vit-large-patch14" / "ln2" / "val.zarr"
    )
    assert cache.default_store_path(tmp_path / "c", str(model_dir), "hidden", "train") == (
        tmp_path / "c" / "my-model" / "hidden" / "train.zarr"
    )
    assert [cache.shard_count(n, 8) for n in (1, 8, 9, 16, 17)] == [1, 1, 2, 2, 3]
    assert [cache.shard_bounds(s, 21, 8) for s in range(3)] == [(0, 8), (8, 16), (16, 21)]


def test_write_store_equals_a_store_committed_shard_by_shard(tmp_path: Path) -> None:
    """write_store (tests, benchmarks) produces exactly what create/add/commit produce, for every variant kind."""
    valid = np.ones(21, bool)
    valid[[4, 17]] = False
    errors = ["" if ok else "file is empty (0 bytes)" for ok in valid]
    features = {
        name: features_for(21, seed=s) for s, name in enumerate(("center", "view_001", "tencrop_7", "blur-paper"))
    }
    written = cache.write_store(
        tmp_path / "written.zarr", make_identity(), split="val", labels=[i % 2 for i in range(21)],
        paths=[f"d/img_{i:03d}.png" for i in range(21)], datasets=["a" if i < 10 else "b" for i in range(21)],
        features=features, valid=valid, errors=errors, extra_attrs={"note": "test"},
    )  # fmt: skip
    by_hand = new_store(tmp_path / "by_hand.zarr", 21)
    for name, values in features.items():
        cache.add_variant(by_hand, VariantSpec.from_name(name), N_BLOCKS, DIM)
        for shard in range(3):
            start, stop = cache.shard_bounds(shard, 21, 8)
            cache.commit_shard(by_hand, shard, {name: values[start:stop]}, valid[start:stop], errors[start:stop])

    written_info, by_hand_info = cache.open_store_info(written), cache.open_store_info(by_hand)
    assert written_info.attrs == by_hand_info.attrs
    assert written_info.complete_variants == tuple(features)
    assert written_info.variants["tencrop_7"] == VariantSpec.ten_crop(7)
    for name in ("labels", "paths", "dataset", "valid", "error", *(f"features/{v}" for v in features)):
        np.testing.assert_array_equal(
            zarr.open_array(written / name)[...], zarr.open_array(by_hand / name)[...], err_msg=name
        )
    np.testing.assert_array_equal(cache.read_rows(written).valid, valid)


def test_write_store_takes_lazy_rows_and_defaults_every_row_valid(tmp_path: Path) -> None:
    class Rows:
        """Rows made on demand: write_store asks for one shard at a time."""

        shape = (21, N_BLOCKS, DIM)
        asked: list[tuple[int, int]] = []

        def __getitem__(self, rows: slice) -> np.ndarray:
            self.asked.append((rows.start, rows.stop))
            return np.full((rows.stop - rows.start, N_BLOCKS, DIM), rows.start + 1.0)

    path = cache.write_store(
        tmp_path / "lazy.zarr", make_identity(), split="val", labels=[0] * 21, paths=[f"{i}.png" for i in range(21)],
        datasets=["a"] * 21, features={"center": Rows()},
    )  # fmt: skip
    assert Rows.asked == [(0, 8), (8, 16), (16, 21)]
    features = cache.read_features(path, "center")
    assert features.dtype == np.float16
    np.testing.assert_array_equal(features[:, 0, 0], [1.0] * 8 + [9.0] * 8 + [17.0] * 5)
    rows = cache.read_rows(path)
    assert rows.valid.all() and set(rows.errors) == {""}


def test_write_store_refuses_bad_shapes_and_unknown_variants_before_writing(tmp_path: Path) -> None:
    common = dict(split="val", labels=[0, 1, 0], paths=["a.png", "b.png", "c.png"], datasets=["a"] * 3)
    with pytest.raises(ValueError, match=r"features\['center'\] has shape \(3, 2, 5\), the store needs \(3, 3, 5\)"):
        cache.write_store(tmp_path / "s.zarr", make_identity(), features={"center": np.zeros((3, 2, DIM))}, **common)
    with pytest.raises(ValueError, match="unknown variant 'tencrop'.*names the group"):
        cache.write_store(
            tmp_path / "s.zarr", make_identity(), features={"tencrop": np.zeros((3, N_BLOCKS, DIM))}, **common
        )
    with pytest.raises(ValueError, match="valid and errors need 3 entries"):
        cache.write_store(
            tmp_path / "s.zarr",
            make_identity(),
            features={"center": np.zeros((3, N_BLOCKS, DIM))},
            valid=[True],
            **common,
        )
    assert not (tmp_path / "s.zarr").exists()


def test_train_views_lists_complete_views_in_view_order(tmp_path: Path) -> None:
    views = {name: features_for(21, seed=1) for name in ("view_010", "view_002", "center", "view_000")}
    path = cache.write_store(
        tmp_path / "t.zarr", make_identity(), split="train", labels=[0] * 21, paths=[f"{i}.png" for i in range(21)],
        datasets=["a"] * 21, features=views,
    )  # fmt: skip
    cache.add_variant(path, VariantSpec.train_view(1), N_BLOCKS, DIM)  # incomplete: no shard committed
    info = cache.open_store_info(path)
    assert info.train_views() == ("view_000", "view_002", "view_010")
    assert info.variants["view_001"].kind is VariantKind.TRAIN_VIEW


def test_a_store_of_the_older_schema_is_refused_with_what_to_do(store_21: tuple[Path, np.ndarray]) -> None:
    path, _ = store_21
    zarr.open_group(path, mode="r+").attrs["schema"] = "rine-pipeline/feature-store@1"
    with pytest.raises(StoreError, match=r"schema 'rine-pipeline/feature-store@1'.*rebuild it with .*--overwrite"):
        cache.open_store_info(path)


# ---------------------------------------------------------------- integrity: damage is an error, never zeros


def shard_file_of(path: Path, variant: str, shard: int) -> Path:
    return path / "features" / variant / "c" / str(shard) / "0" / "0"


def test_deleted_shard_file_of_a_committed_shard_is_an_error_naming_store_array_and_shard(
    store_21: tuple[Path, np.ndarray],
) -> None:
    path, _ = store_21
    shard_file_of(path, "center", 1).unlink()
    with pytest.raises(StoreError, match=rf"{path}: features/center shard 1: file .* is missing"):
        cache.read_features(path, "center")
    np.testing.assert_array_equal(cache.read_features(path, "center", slice(0, 8))[:, 0, 0] != 0, True)
    (problem,) = cache.damaged_shards(path)
    assert (problem.array, problem.shard, problem.variant) == ("features/center", 1, "center")


def test_garbled_index_and_bit_rot_fail_their_checksums_here_and_in_zarr(store_21: tuple[Path, np.ndarray]) -> None:
    path, _ = store_21
    file = shard_file_of(path, "center", 0)
    data = bytearray(file.read_bytes())
    data[-10] ^= 0xFF  # inside the index
    file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="features/center shard 0: file .* has a damaged index"):
        cache.read_features(path, "center")
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(path / "features" / "center", mode="r")[:8]

    file = shard_file_of(path, "center", 1)
    data = bytearray(file.read_bytes())
    data[10] ^= 0x01  # one bit of one value of chunk 0
    file.write_bytes(bytes(data))
    for rows in (slice(8, 16), np.array([8, 9]), np.array([9])):  # whole chunk, and rows picked from it
        with pytest.raises(StoreError, match=r"features/center shard 1: chunk 0 of .* fails its CRC32C"):
            cache.read_features(path, "center", rows, require_complete=False)
    np.testing.assert_array_equal(cache.read_features(path, "center", slice(16, 21)), store_21[1][16:21])
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(path / "features" / "center", mode="r")[8:10]


@pytest.mark.parametrize("size", [0, 130], ids=["zero-length", "truncated"])
def test_zero_length_or_truncated_shard_is_an_error(store_21: tuple[Path, np.ndarray], size: int) -> None:
    path, _ = store_21
    file = shard_file_of(path, "center", 2)  # 3 chunks of 64 bytes, then the 68-byte index
    file.write_bytes(file.read_bytes()[:size])
    expected = "is empty \\(0 bytes\\)" if size == 0 else "has a damaged index|too short for the chunks its index lists"
    with pytest.raises(StoreError, match=rf"features/center shard 2: file .* ({expected})"):
        cache.read_features(path, "center")
    assert [p.shard for p in cache.damaged_shards(path)] == [2]


def test_lost_valid_or_error_chunk_is_detected_not_read_as_all_invalid(store_21: tuple[Path, np.ndarray]) -> None:
    path, _ = store_21
    for array in ("valid", "error"):
        chunk = path / array / "c" / "1"
        saved = chunk.read_bytes()
        chunk.unlink()
        with pytest.raises(StoreError, match=rf"{array} shard 1: chunk file .* is missing"):
            cache.read_rows(path)
        with pytest.raises(StoreError, match=rf"{array} shard 1"):
            cache.describe_store(path)
        assert [(p.array, p.shard) for p in cache.damaged_shards(path)] == [(array, 1)]
        chunk.write_bytes(saved)
    assert cache.read_rows(path).valid.all()


def test_verify_store_finds_a_truncated_shard_a_missing_flag_and_nan_rows(tmp_path: Path) -> None:
    values = features_for(21, seed=11)
    values[3, 1, 2] = np.nan  # a valid row holding NaN
    values[5, 0, 0] = np.inf  # an invalid row may hold anything: not reported
    valid = np.ones(21, bool)
    valid[5] = False
    path = cache.write_store(
        tmp_path / "v.zarr", make_identity(), split="val", labels=[0] * 21, paths=[f"{i}.png" for i in range(21)],
        datasets=["a"] * 21, features={"center": values, "view_000": features_for(21, seed=12)}, valid=valid,
    )  # fmt: skip
    problems = cache.verify_store(path)
    assert problems == [f"{path}: features/center shard 0: 1 valid row(s) hold NaN or Inf (first: row 3, 3.png)"]

    truncated = shard_file_of(path, "view_000", 2)
    truncated.write_bytes(truncated.read_bytes()[:-7])
    (path / "progress" / "center" / "c" / "1").unlink()  # a lost flag: the shard holds data without it
    problems = cache.verify_store(path)
    assert any("features/view_000 shard 2" in p for p in problems), problems
    assert f"{path}: features/center shard 1 holds data but has no progress flag" in "\n".join(problems)
    assert any("NaN or Inf" in p for p in problems)

    assert cache.reset_damaged_shards(path) == 2  # the truncated shard and the one holding NaN
    assert cache.pending_shards(path, "view_000") == [2] and cache.pending_shards(path, "center") == [0, 1]


def test_commit_writes_durably_and_the_flag_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file of a commit is synced, renamed and its folder synced, the progress flag after all data."""
    from pipeline import files

    path = new_store(tmp_path / "d.zarr", 21)
    cache.add_variant(path, VariantSpec.center(), N_BLOCKS, DIM)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    cache.commit_shard(path, 1, {"center": features_for(8, seed=1)}, np.ones(8, bool), [""] * 8)
    written = [Path(p) for p in synced]
    relative = [p.relative_to(path).as_posix() if p.is_relative_to(path) else str(p) for p in written]
    files_synced = [r for r in relative if files.TEMPORARY_NAME.match(Path(r).name)]
    assert [Path(r).parent.as_posix() for r in files_synced] == [
        "features/center/c/1/0", "valid/c", "error/c", "digests/center/c", "progress/center/c"
    ]  # fmt: skip
    for folder in ("features/center/c/1/0", "valid/c", "error/c", "digests/center/c", "progress/center/c"):
        assert folder in relative, relative  # the folder of every renamed file is synced too
    assert (
        relative.index("progress/center/c")
        > relative.index("digests/center/c")
        > relative.index("error/c")
        > relative.index("features/center/c/1/0")
    )


# ---------------------------------------------------------------- deleting, temporaries, concurrency


def test_overwrite_refuses_a_folder_of_photos_and_keeps_it(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    with pytest.raises(StoreError, match="is not a zarr store.*refusing to delete it"):
        cache.delete_store(photos)
    other = zarr.open_group(tmp_path / "other.zarr", mode="w")
    other.attrs["schema"] = "someone-else"
    with pytest.raises(StoreError, match="not a feature store of rine-pipeline.*refusing"):
        cache.delete_store(tmp_path / "other.zarr")
    (tmp_path / "link.zarr").symlink_to(photos)
    with pytest.raises(StoreError, match="symbolic link"):
        cache.delete_store(tmp_path / "link.zarr")
    assert (photos / "holiday.jpg").read_bytes() == b"\xff\xd8 a photo" and (tmp_path / "other.zarr").is_dir()

    store = new_store(tmp_path / "mine.zarr", 5)
    cache.delete_store(store)
    assert not store.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_stray_temporaries_of_killed_writers_are_removed_by_the_next_run(store_21: tuple[Path, np.ndarray]) -> None:
    from pipeline import files

    path, _ = store_21
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    inside = path / "features" / "center" / "c" / "0" / "0" / f".0.{files.HOST_TAG}-{dead_pid}.0123abcd.tmp"
    beside = path.parent / f".{path.name}.{files.HOST_TAG}-{dead_pid}.89abcdef.tmp"
    live = path / "valid" / "c" / f".1.{files.HOST_TAG}-{os.getpid()}.00000000.tmp"
    old_partial = path / "error" / "c" / f"2.{'ab' * 16}.partial"
    for stray in (inside, live, old_partial):
        stray.write_bytes(b"half a shard")
    beside.mkdir()
    (beside / "zarr.json").write_text("{}")
    os.utime(old_partial, (0, 0))  # older than any write
    assert not cache.create_store(
        path, make_identity(), split="val", labels=[], paths=[], datasets=[], if_exists="check"
    )  # an existing store with this identity is kept
    assert not inside.exists() and not beside.exists() and not old_partial.exists()
    assert live.exists()  # a write in progress (this process) is left alone


CONCURRENT_WRITER = """
import sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, {tests!r})
from test_cache import make_identity, features_for, N_BLOCKS, DIM
from pipeline import cache
from pipeline.variants import VariantSpec

path, me, go = Path({path!r}), int(sys.argv[1]), Path({go!r})
(go.parent / f"ready-{{me}}").touch()  # imported: waiting for the start signal
while not go.exists():
    time.sleep(0.001)
created = cache.create_store(path, make_identity(), split="val", labels=[i % 2 for i in range(21)],
                             paths=[f"d/img_{{i:03d}}.png" for i in range(21)], datasets=["a"] * 21,
                             if_exists="check")
for k in range(4):
    variant = VariantSpec.train_view(10 * me + k)
    cache.add_variant(path, variant, N_BLOCKS, DIM)
    for shard in range(3):
        start, stop = cache.shard_bounds(shard, 21, 8)
        values = features_for(21, seed=10 * me + k)[start:stop]
        cache.commit_shard(path, shard, {{variant.name: values}}, np.ones(stop - start, bool), [""] * (stop - start))
print("created" if created else "checked")
"""


@pytest.mark.slow
def test_three_processes_adding_variants_to_one_new_store_lose_nothing(tmp_path: Path) -> None:
    path, go = tmp_path / "shared.zarr", tmp_path / "go"
    script = tmp_path / "writer.py"
    script.write_text(CONCURRENT_WRITER.format(tests=str(Path(__file__).parent), path=str(path), go=str(go)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
    }
    writers = [
        subprocess.Popen(
            [sys.executable, str(script), str(me)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for me in range(3)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:  # every writer imported, waiting
        time.sleep(0.01)
    go.touch()
    outputs = [writer.communicate(timeout=120) for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0, 0], [err.decode() for _, err in outputs]
    assert sorted(out.decode().strip() for out, _ in outputs) == ["checked", "checked", "created"]
    info = cache.open_store_info(path)
    expected = sorted(VariantSpec.train_view(10 * me + k).name for me in range(3) for k in range(4))
    assert sorted(info.variants) == expected and sorted(info.complete_variants) == expected
    for name in expected:
        np.testing.assert_array_equal(cache.read_features(path, name), features_for(21, seed=int(name[5:])))
    assert cache.verify_store(path) == []
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("ready-"))
    assert left == [".shared.zarr.lock", "go", "shared.zarr", "writer.py"]


def test_zarr_older_than_3_1_3_is_refused() -> None:
    for old in ("3.1.2", "3.0.8", "2.18.3"):
        with pytest.raises(StoreError, match=rf"zarr {old} is installed; rine-pipeline needs zarr >= 3.1.3"):
            cache.check_zarr_version(old)
    for good in ("3.1.3", "3.1.6", "3.2.0.dev4", zarr.__version__):
        cache.check_zarr_version(good)
