"""`pipeline cache export --format hdf5` and `pipeline cache import`: a store as one HDF5 file and back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import crc32c
import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import separable_features, write_store
from pipeline import cache
from pipeline.cache import hdf5
from pipeline.cli import main as cli
from pipeline.variants import VariantSpec

N_ROWS = 70  # two shards of 64 rows: the last one partial


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    features, labels = separable_features(N_ROWS, n_blocks=3, dim=8)
    valid = np.ones(N_ROWS, dtype=bool)
    valid[[5, 66]] = False
    variants = {"center": features, "jpeg-official": features * 2, **{f"tencrop_{i}": features + i for i in range(10)}}
    datasets = ["progan" if i % 3 else "sitd" for i in range(N_ROWS)]
    classes = ["car" if i % 2 else "horse" for i in range(N_ROWS)]
    path = write_store(tmp_path / "test_gan.zarr", variants, labels, datasets, classes, valid)
    # what `pipeline extract` adds besides the identity: every JSON kind of attribute value
    extra = {
        "training": False,
        "data_root": "/data/ü",
        "n_layers": 3,
        "ratio": 0.25,
        "note": None,
        "sizes": {"a": [1, 2]},
    }
    zarr.open_group(path, mode="r+").attrs.update(extra)
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def test_export_holds_every_array_variant_and_attribute(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "export" / "test_gan.h5"
    result = invoke("cache", "export", store, out, "--format", "hdf5", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    info, rows = cache.open_store_info(store), cache.read_rows(store)
    with h5py.File(out, "r") as handle:  # read back with h5py alone, as another tool would
        assert sorted(handle) == ["class", "dataset", "error", "features", "labels", "paths", "valid"]
        np.testing.assert_array_equal(handle["labels"][:], rows.labels)
        np.testing.assert_array_equal(handle["valid"][:], rows.valid)
        for name, column in (
            ("paths", rows.paths),
            ("dataset", rows.datasets),
            ("class", rows.classes),
            ("error", rows.errors),
        ):
            assert handle[name].asstr()[:].tolist() == column.tolist(), name
        assert handle["error"].asstr()[5] != "" and handle["valid"][5] == np.False_
        assert sorted(handle["features"]) == sorted(info.variants)
        for variant in info.variants:
            dataset = handle["features"][variant]
            assert dataset.dtype == np.float16 and dataset.chunks == (info.identity.chunk_rows, 3, 8)
            np.testing.assert_array_equal(dataset[:], cache.read_features(store, variant))
        attrs = handle.attrs
        assert attrs["split"] == "test_gan" and attrs["n_rows"] == N_ROWS and attrs["tap"] == "ln2"
        assert attrs["training"] == np.False_ and attrs["data_root"] == "/data/ü" and attrs["ratio"] == 0.25
        assert json.loads(attrs["variants"]) == info.attrs["variants"]
        assert set(json.loads(attrs["json_attributes"])) == {
            k for k, v in info.attrs.items() if not isinstance(v, (str, int, float))
        }


def test_import_reads_an_export_back_into_an_equal_store(store: Path, tmp_path: Path) -> None:
    exported, back = tmp_path / "s.h5", tmp_path / "back" / "test_gan.zarr"
    assert invoke("cache", "export", store, exported, "--no-progress").exit_code == 0
    result = invoke("cache", "import", exported, back, "--no-progress")
    assert result.exit_code == 0, result.output
    original, imported = cache.open_store_info(store), cache.open_store_info(back)
    assert imported.attrs == original.attrs
    assert imported.identity == original.identity
    assert imported.complete_variants == original.complete_variants == tuple(original.variants)
    rows, rows_back = cache.read_rows(store), cache.read_rows(back)
    for column in ("labels", "paths", "datasets", "classes", "valid", "errors"):
        np.testing.assert_array_equal(getattr(rows_back, column), getattr(rows, column))
    for variant in original.variants:
        np.testing.assert_array_equal(cache.read_features(back, variant), cache.read_features(store, variant))
    assert [p.name for p in back.parent.iterdir()] == [back.name]  # no temporary sibling left


def test_import_refuses_an_existing_store_unless_overwrite(store: Path, tmp_path: Path) -> None:
    exported = tmp_path / "s.h5"
    hdf5.export_hdf5(store, exported, progress=False)
    target = tmp_path / "taken.zarr"
    target.mkdir()
    result = invoke("cache", "import", exported, target)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert invoke("cache", "import", exported, target, "--overwrite", "--no-progress").exit_code == 0
    assert cache.open_store_info(target).n_rows == N_ROWS


def test_an_h5_file_that_is_not_an_export_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle["x"] = np.arange(3)
    result = invoke("cache", "import", other, tmp_path / "s.zarr")
    assert result.exit_code == 1 and "not a feature store exported by `pipeline cache export`" in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_an_incomplete_variant_is_refused_and_no_file_written(store: Path, tmp_path: Path) -> None:
    cache.add_variant(store, VariantSpec.perturbed("blur", "official"), 3, 8)  # no shard committed
    out = tmp_path / "s.h5"
    result = invoke("cache", "export", store, out)
    assert result.exit_code == 1 and "blur-official are incomplete" in result.output
    assert not out.exists()


def test_an_interrupted_export_leaves_no_file(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):  # killed (Ctrl-C) when the whole file is written, just before its rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    out = tmp_path / "s.h5"
    with pytest.raises(KeyboardInterrupt):
        hdf5.export_hdf5(store, out, progress=False)
    assert list(tmp_path.glob("*.h5*")) == [] and list(tmp_path.glob(".*")) == []


# ---------------------------------------------------------------- never overwrite, never trust (issue 24)


def test_export_refuses_an_existing_file_unless_overwrite(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine.h5"
    out.write_bytes(b"a user's file")
    result = invoke("cache", "export", store, out, "--no-progress")
    assert result.exit_code == 1 and f"{out} exists; pass --overwrite" in result.output
    assert out.read_bytes() == b"a user's file"
    assert invoke("cache", "export", store, out, "--overwrite", "--no-progress").exit_code == 0
    assert h5py.File(out, "r")["labels"].shape == (N_ROWS,)


def test_export_overwrite_through_a_link_replaces_the_link_not_its_target(store: Path, tmp_path: Path) -> None:
    target, link = tmp_path / "target.txt", tmp_path / "link.h5"
    target.write_text("keep me")
    link.symlink_to(target)
    assert "exists; pass --overwrite" in invoke("cache", "export", store, link, "--no-progress").output
    result = invoke("cache", "export", store, link, "--overwrite", "--no-progress")
    assert result.exit_code == 0, result.output
    assert target.read_text() == "keep me" and not link.is_symlink() and h5py.is_hdf5(link)
    folder = tmp_path / "folder.h5"
    folder.mkdir()
    result = invoke("cache", "export", store, folder, "--overwrite", "--no-progress")
    assert result.exit_code == 2 and "is a directory" in result.output and "Traceback" not in result.output


def test_every_exported_dataset_carries_a_checksum(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.h5"
    hdf5.export_hdf5(store, out, progress=False)
    with h5py.File(out, "r") as handle:
        features = handle["features/center"]
        assert features.fletcher32 and handle["labels"].fletcher32
        assert int(features.attrs["crc32c"]) == crc32c.crc32c(np.ascontiguousarray(features[:]))
        assert all("crc32c" in handle[name].attrs for name in ("labels", "paths", "dataset", "class", "valid", "error"))


def flip_feature_bytes(path: Path) -> None:
    with h5py.File(path, "r") as handle:
        offset = handle["features/center"].id.get_chunk_info(1).byte_offset
    with open(path, "r+b") as raw:
        raw.seek(offset + 5)
        byte = raw.read(1)
        raw.seek(offset + 5)
        raw.write(bytes([byte[0] ^ 0x40]))


def rewrite_a_row(path: Path) -> None:  # as another tool would: HDF5's own filter checksums stay valid
    with h5py.File(path, "r+") as handle:
        handle["features/center"][3] = handle["features/center"][4]


def rename_a_path(path: Path) -> None:
    with h5py.File(path, "r+") as handle:
        paths = handle["paths"].asstr()[:]
        paths[0] = "elsewhere.png"
        handle["paths"][...] = paths


@pytest.mark.slow
@pytest.mark.parametrize("tamper", [flip_feature_bytes, rewrite_a_row, rename_a_path])
def test_a_tampered_export_is_refused_and_nothing_is_imported(store: Path, tmp_path: Path, tamper) -> None:
    out = tmp_path / "s.h5"
    hdf5.export_hdf5(store, out, progress=False)
    tamper(out)
    result = invoke("cache", "import", out, tmp_path / "back.zarr", "--no-progress")
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {out}: ") and result.output.count("\n") == 1, result.output
    assert "checksum" in result.output or "cannot be read" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5", "test_gan.zarr"]  # no store, no temporary


def test_an_export_with_short_label_arrays_is_an_error_line(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.h5"
    hdf5.export_hdf5(store, out, progress=False)
    with h5py.File(out, "r+") as handle:
        labels = handle["labels"][:-3]
        del handle["labels"]
        handle["labels"] = labels
        handle["labels"].attrs["crc32c"] = crc32c.crc32c(labels)
    result = invoke("cache", "import", out, tmp_path / "back.zarr", "--no-progress")
    assert (
        result.exit_code == 1
        and result.output == f"Error: {out}: dataset /labels has {N_ROWS - 3} rows, the store {N_ROWS}\n"
    )
