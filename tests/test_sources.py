"""Tests of the GenImage and Parquet sources: pipeline.features.layouts (genimage-*, parquet), .parquet and .sources.

Parquet rows go through the manifest, the audit and stage one exactly as files do: the same pixels, the same
features bit for bit, the same header facts; an edited Parquet file is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import make_genimage_tree, write_image, write_image_parquet
from pipeline import cache
from pipeline.features import (
    AuditConfig,
    ExtractConfig,
    ManifestError,
    build_manifest,
    decode_image,
    read_manifest,
    run_audit,
    run_extract,
    write_manifest,
)
from pipeline.features.backbone import BackboneConfig
from pipeline.features.parquet import ParquetReader, parse_parquet_path
from pipeline.features.sources import RowImages, SourceChangedError

GENERATORS = ("adm", "biggan", "midjourney")


# ---------------------------------------------------------------- GenImage


def test_genimage_layout_lists_each_generator_as_a_dataset(tmp_path: Path) -> None:
    make_genimage_tree(tmp_path, GENERATORS, n_per_label=2)
    manifest = build_manifest("genimage-train", tmp_path, "genimage_train")
    assert {row.dataset for row in manifest.rows} == set(GENERATORS)
    assert len(manifest) == 3 * 2 * 2
    assert all(row.path.split("/")[1] == "train" for row in manifest.rows)
    assert {row.label for row in manifest.rows if "/ai/" in row.path} == {1}
    assert {row.label for row in manifest.rows if "/nature/" in row.path} == {0}
    val = build_manifest("genimage-val", tmp_path, "genimage_val", generators=["adm"])
    assert [row.path for row in val.rows] == [
        "adm/val/ai/000.png",
        "adm/val/ai/001.png",
        "adm/val/nature/000.png",
        "adm/val/nature/001.png",
    ]


def test_genimage_layout_finds_the_part_inside_one_subset_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "Midjourney" / "imagenet_midjourney" / "train" / "ai" / "a.png", (8, 8), 0)
    write_image(tmp_path / "Midjourney" / "imagenet_midjourney" / "train" / "nature" / "n.JPEG", (8, 8), 1)
    manifest = build_manifest("genimage-train", tmp_path, "train")
    assert [(row.path, row.label, row.dataset) for row in manifest.rows] == [
        ("Midjourney/imagenet_midjourney/train/ai/a.png", 1, "Midjourney"),
        ("Midjourney/imagenet_midjourney/train/nature/n.JPEG", 0, "Midjourney"),
    ]


def test_genimage_layout_names_what_is_missing(tmp_path: Path) -> None:
    write_image(tmp_path / "adm" / "train" / "ai" / "a.png", (8, 8), 0)
    with pytest.raises(ManifestError, match=r"no folder adm/train/nature/"):
        build_manifest("genimage-train", tmp_path, "train")
    with pytest.raises(ManifestError, match=r"adm: expected one val/ folder"):
        build_manifest("genimage-val", tmp_path, "val")


# ---------------------------------------------------------------- Parquet manifests


def png_bytes(path: Path, size: tuple[int, int], seed: int) -> bytes:
    return write_image(path, size, seed).read_bytes()


def test_parquet_manifest_names_file_and_row_with_the_bytes_hash(tmp_path: Path) -> None:
    images = [png_bytes(tmp_path / "src" / f"{i}.png", (20 + i, 18), i) for i in range(11)]
    labels = [i % 2 for i in range(11)]
    images[5] = None  # a row without bytes is skipped, with its reason
    write_image_parquet(tmp_path / "root" / "data" / "train-0.parquet", images, labels, row_group_size=4)
    manifest = build_manifest("parquet", tmp_path / "root", "train")
    assert [row.path for row in manifest.rows] == [f"data/train-0.parquet#{i}" for i in range(11) if i != 5]
    assert [row.label for row in manifest.rows] == [i % 2 for i in range(11) if i != 5]
    assert {row.dataset for row in manifest.rows} == {"root"}
    assert [row.sha256 for row in manifest.rows] == [
        hashlib.sha256(data).hexdigest() for data in images if data is not None
    ]
    assert manifest.skipped == (("data/train-0.parquet#5", "no image bytes in the row (null, or a path only)"),)
    csv_path = tmp_path / "manifests" / "train.csv"
    write_manifest(manifest, csv_path)
    assert csv_path.read_text().splitlines()[0] == "path,label,dataset,sha256"
    again = read_manifest(csv_path)
    assert again.rows == manifest.rows and again.sha256() == manifest.sha256()
    assert again.options["image_column"] is None and again.layout == "parquet"


def test_parquet_manifest_reads_the_named_columns(tmp_path: Path) -> None:
    images = [png_bytes(tmp_path / "src" / f"{i}.png", (16, 16), i) for i in range(4)]
    write_image_parquet(tmp_path / "root" / "a.parquet", images, ["real", "FAKE", "real", "fake"], ["x", "y", "y", "x"])
    manifest = build_manifest("parquet", tmp_path / "root", "test", generator_column="generator", generators=["y"])
    assert [(row.path, row.label, row.dataset) for row in manifest.rows] == [
        ("a.parquet#1", 1, "y"),
        ("a.parquet#2", 0, "y"),
    ]
    with pytest.raises(ManifestError, match=r"a.parquet: no column 'target' \(--label-column\); the file has image"):
        build_manifest("parquet", tmp_path / "root", "test", label_column="target")
    write_image_parquet(tmp_path / "bad" / "b.parquet", images, [0, 1, 2, 0])
    with pytest.raises(ManifestError, match=r"b.parquet row 2: label 2 is not 0/1"):
        build_manifest("parquet", tmp_path / "bad", "test")
    with pytest.raises(ValueError, match="does not take image_column"):
        build_manifest("folder", tmp_path / "root", "test", image_column="image")


# ---------------------------------------------------------------- reading rows


@pytest.fixture()
def twin_sources(tmp_path: Path) -> dict:
    """The same 10 images as files (folder layout) and as rows of a Parquet file, in the same order."""
    files = tmp_path / "files" / "set"
    paths = []
    for i in range(10):
        folder = ("0_real", "1_fake")[i % 2]
        paths.append(write_image(files / folder / f"img_{i:02d}.png", (30 + 3 * i, 41 - i), 50 + i))
    folder_manifest = build_manifest("folder", tmp_path / "files", "twin")
    ordered = [tmp_path / "files" / row.path for row in folder_manifest.rows]
    labels = [row.label for row in folder_manifest.rows]
    write_image_parquet(tmp_path / "pq" / "set" / "part.parquet", [p.read_bytes() for p in ordered], labels)
    parquet_manifest = build_manifest("parquet", tmp_path / "pq" / "set", "twin")
    manifests = {}
    for name, manifest in (("files", folder_manifest), ("parquet", parquet_manifest)):
        manifests[name] = tmp_path / name / "manifests" / "twin.csv"
        write_manifest(manifest, manifests[name])
    return {"tmp": tmp_path, "files": ordered, "manifests": manifests}


def test_parquet_rows_decode_to_the_files_pixels_reading_each_row_group_once(twin_sources: dict) -> None:
    rows = RowImages(read_manifest(twin_sources["manifests"]["parquet"]))
    for index, file in enumerate(twin_sources["files"]):
        np.testing.assert_array_equal(rows.decode(index), decode_image(file))
    assert rows.parquet.reads == 3  # 10 rows in row groups of 4, 4, 2
    assert rows.location(0) == twin_sources["tmp"] / "pq" / "set" / "part.parquet"


def test_reader_of_a_missing_file_or_row(tmp_path: Path) -> None:
    from pipeline.features import ImageDecodeError

    reader = ParquetReader("image")
    with pytest.raises(ImageDecodeError, match="missing file"):
        reader.read(tmp_path / "none.parquet", 0)
    write_image_parquet(tmp_path / "a.parquet", [b"x", b"y"], [0, 1])
    assert reader.read(tmp_path / "a.parquet", 1) == b"y"
    with pytest.raises(ManifestError, match=r"no row 2 \(the file has 2 rows\)"):
        reader.read(tmp_path / "a.parquet", 2)
    assert parse_parquet_path("a/b.parquet#12") == ("a/b.parquet", 12)
    assert parse_parquet_path("a/b.png") is None and parse_parquet_path("b.parquet#01") is None


def extract_config(model: Path, manifest: Path, cache_dir: Path) -> ExtractConfig:
    backbone = BackboneConfig(model=str(model), device="cpu", dtype="float32")
    return ExtractConfig(
        split=manifest.stem,
        manifest=manifest,
        backbone=backbone,
        cache_dir=cache_dir,
        batch_size=4,
        shard_rows=8,
        chunk_rows=4,
        progress=False,
    )


@pytest.mark.slow
def test_parquet_and_file_features_are_bit_identical(twin_sources: dict, tiny_clip_dir: Path) -> None:
    features = {}
    for name, manifest in twin_sources["manifests"].items():
        summary = run_extract(extract_config(tiny_clip_dir, manifest, twin_sources["tmp"] / name / "cache"))
        store = summary.stores["ln2"]
        assert cache.read_rows(store).valid.all()
        features[name] = cache.read_features(store, "center")
    assert features["files"].shape == (10, 3, 32)
    np.testing.assert_array_equal(features["parquet"], features["files"])
    assert features["parquet"].tobytes() == features["files"].tobytes()


def rewrite_one_image(parquet: Path, row: int, data: bytes) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)
    images = [value["bytes"] for value in table.column("image").to_pylist()]
    images[row] = data
    write_image_parquet(parquet, images, table.column("label").to_pylist())


@pytest.mark.slow
def test_an_edited_parquet_file_is_refused_by_extract_and_audit(twin_sources: dict, tiny_clip_dir: Path) -> None:
    parquet = twin_sources["tmp"] / "pq" / "set" / "part.parquet"
    rewrite_one_image(parquet, 6, write_image(twin_sources["tmp"] / "other.png", (30, 30), 999).read_bytes())
    manifest = twin_sources["manifests"]["parquet"]
    with pytest.raises(SourceChangedError, match=r"part.parquet row 6: the image changed since the manifest"):
        run_extract(extract_config(tiny_clip_dir, manifest, twin_sources["tmp"] / "edited-cache"))
    with pytest.raises(SourceChangedError, match="row 6"):
        run_audit(AuditConfig(split="twin", manifest=manifest, out=twin_sources["tmp"] / "audit", progress=False))


@pytest.mark.slow
def test_undecodable_parquet_rows_are_invalid_like_files(tmp_path: Path, tiny_clip_dir: Path) -> None:
    good = [png_bytes(tmp_path / f"{i}.png", (20, 20), i) for i in range(4)]
    write_image_parquet(
        tmp_path / "root" / "a.parquet", [good[0], b"not an image", good[2], good[3][:60]], [0, 1, 0, 1]
    )
    manifest = build_manifest("parquet", tmp_path / "root", "bad")
    write_manifest(manifest, tmp_path / "m" / "bad.csv")
    config = replace(extract_config(tiny_clip_dir, tmp_path / "m" / "bad.csv", tmp_path / "cache"), max_invalid=1.0)
    rows = cache.read_rows(run_extract(config).stores["ln2"])
    assert rows.valid.tolist() == [True, False, True, False]
    assert rows.errors[1] == "not an image (cannot identify format)"
    assert rows.errors[3] == "truncated image data" or rows.errors[3].startswith("cannot decode")


def test_audit_of_parquet_rows_reads_the_headers_the_files_have(twin_sources: dict) -> None:
    records = {}
    for name, manifest in twin_sources["manifests"].items():
        out = twin_sources["tmp"] / name / "audit"
        run_audit(AuditConfig(split="twin", manifest=manifest, out=out, progress=False, folds=2))
        lines = (out / "audit_twin_images.csv").read_text().splitlines()
        records[name] = [line.split(",", 1)[1] for line in lines[1:]]  # without the path
    assert len(records["files"]) == 10
    assert records["parquet"] == records["files"]


def test_cli_manifest_of_parquet_files_takes_the_column_options(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    images = [png_bytes(tmp_path / "src" / f"{i}.png", (16, 16), i) for i in range(4)]
    write_image_parquet(tmp_path / "root" / "a.parquet", images, [0, 1, 0, 1], ["x", "x", "y", "y"])
    args = ["manifest", "--layout", "parquet", "--root", str(tmp_path / "root"), "--split", "wild"]
    result = CliRunner().invoke(
        main, [*args, "--generator-column", "generator", "--manifests-dir", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    assert "4 images (2 real, 2 fake) in 2 dataset(s)" in result.output
    assert read_manifest(tmp_path / "m" / "wild.csv").options["generator_column"] == "generator"
    refused = CliRunner().invoke(main, [*args, "--layout", "folder", "--image-column", "img"])
    assert refused.exit_code == 2 and "does not take image_column" in refused.output
