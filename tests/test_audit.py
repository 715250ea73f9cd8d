"""Tests of pipeline.features.image_headers and pipeline.features.audit: header facts, JPEG quality, shortcut AUCs and flags, CLI."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from conftest import read_csv_rows
from pipeline.cli import main
from pipeline.features import Manifest, ManifestRow, write_manifest
from pipeline.features.audit import (
    ALL_FEATURES,
    FEATURE_NAMES,
    AuditConfig,
    AuditError,
    FeatureAuc,
    flag_dataset,
    run_audit,
    score_features,
)
from pipeline.features.augment import format_align_bytes
from pipeline.features.image_headers import (
    STANDARD_CHROMINANCE_TABLE,
    STANDARD_LUMINANCE_TABLE,
    ImageHeader,
    read_format_aligned_header,
    read_image_header,
)
from pipeline.names import FORMAT_ALIGN


def noise(size: tuple[int, int], seed: int, channels: int = 3) -> np.ndarray:
    """Random pixels of (width, height)."""
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save(
    path: Path, size: tuple[int, int], seed: int, quality: int = 90, mode: str = "RGB", exif: bool = False
) -> Path:
    """A noise image saved by extension (JPEG at ``quality``), optionally with an EXIF block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(noise(size, seed)).convert(mode)
    options: dict = {"quality": quality} if path.suffix == ".jpg" else {}
    if exif:
        tags = Image.Exif()
        tags[0x010F] = "TestCamera"  # Make
        options["exif"] = tags
    image.save(path, **options)
    return path


def write_split(root: Path, name: str, images: list[tuple[str, int, str, dict]]) -> Path:
    """Write each (dataset, label, file name, save options) under root/<dataset>/<label>/ and a manifest."""
    rows = []
    for index, (dataset, label, file_name, options) in enumerate(images):
        relative = f"{dataset}/{label}/{file_name}"
        if options is not None:
            save(root / relative, seed=index, **options)
        rows.append(ManifestRow(relative, label, dataset))
    csv_path = root / "manifests" / f"{name}.csv"
    write_manifest(Manifest(name, tuple(rows), root), csv_path)
    return csv_path


def audit(csv_path: Path, out: Path, **options):
    return run_audit(AuditConfig(split=csv_path.stem, manifest=csv_path, out=out, progress=False, **options))


def format_shortcut(n: int = 10) -> list[tuple[str, int, str, dict]]:
    """Dataset 'gan': reals JPEG, fakes PNG, same size."""
    return [("gan", 0, f"r{i:02d}.jpg", {"size": (32, 32), "quality": 90}) for i in range(n)] + [
        ("gan", 1, f"f{i:02d}.png", {"size": (32, 32)}) for i in range(n)
    ]


def clean_images(dataset: str, n: int = 12) -> list[tuple[str, int, str, dict]]:
    """Both labels with the same formats, qualities and sizes (only the noise differs)."""
    images = []
    for label in (0, 1):
        for i in range(n):
            extension = (".png", ".jpg")[i % 2]
            options = {"size": ((40, 40), (48, 40))[(i // 2) % 2], "quality": (70, 90)[(i // 4) % 2]}
            images.append((dataset, label, f"{label}_{i:02d}{extension}", options))
    return images


# ---------------------------------------------------------------- headers


def test_quality_50_tables_are_the_standard_tables(tmp_path: Path) -> None:
    """IJG quality 50 writes ITU T.81 Annex K tables unscaled: checks our constants against libjpeg's."""
    image = Image.open(save(tmp_path / "q50.jpg", (16, 16), 0, quality=50))
    assert tuple(image.quantization[0]) == STANDARD_LUMINANCE_TABLE
    assert tuple(image.quantization[1]) == STANDARD_CHROMINANCE_TABLE


@pytest.mark.parametrize("quality", [30, 40, 50, 62, 75, 85, 90, 95, 98, 99, 100])
def test_jpeg_quality_estimate_pillow_and_opencv(tmp_path: Path, quality: int) -> None:
    pillow_file = save(tmp_path / "pil.jpg", (40, 24), quality, quality=quality)
    opencv_file = tmp_path / "cv2.jpg"
    cv2.imwrite(str(opencv_file), noise((40, 24), quality), [cv2.IMWRITE_JPEG_QUALITY, quality])
    for path in (pillow_file, opencv_file):
        estimate = read_image_header(path).jpeg_quality
        assert estimate is not None and abs(estimate - quality) <= 2, (path.name, estimate)


def test_jpeg_quality_of_a_greyscale_jpeg(tmp_path: Path) -> None:
    header = read_image_header(save(tmp_path / "grey.jpg", (24, 24), 0, quality=65, mode="L"))
    assert (header.mode, header.jpeg_quality) == ("L", 65)  # one table only


def test_header_fields(tmp_path: Path) -> None:
    png = save(tmp_path / "a.png", (30, 20), 0, mode="RGBA", exif=True)
    jpeg = save(tmp_path / "b.jpg", (17, 9), 1, quality=80)
    disguised = save(tmp_path / "c.jpg", (8, 8), 2)
    disguised.rename(tmp_path / "c.png")  # a JPEG named .png: the format comes from the content
    assert read_image_header(png) == ImageHeader("PNG", 30, 20, "RGBA", True, png.stat().st_size, None, "")
    assert read_image_header(jpeg) == ImageHeader("JPEG", 17, 9, "RGB", False, jpeg.stat().st_size, 80, "")
    assert read_image_header(tmp_path / "c.png").format == "JPEG"
    assert read_image_header(save(tmp_path / "e.jpg", (8, 8), 3, exif=True)).has_exif is True
    assert read_image_header(save(tmp_path / "e.webp", (8, 8), 3, exif=True)).has_exif is True


def test_unreadable_files_are_error_headers(tmp_path: Path) -> None:
    (tmp_path / "garbage.png").write_bytes(b"this is not an image" * 4)
    (tmp_path / "empty.png").write_bytes(b"")
    assert read_image_header(tmp_path / "garbage.png") == ImageHeader(
        file_size=80, error="not an image (cannot identify format)"
    )
    assert read_image_header(tmp_path / "empty.png").error == "file is empty (0 bytes)"
    assert read_image_header(tmp_path / "missing.png").error == "missing file"
    assert read_image_header(tmp_path).error == "not a file (it is a directory)"


def test_huge_image_header_is_read_without_decoding(tmp_path: Path) -> None:
    """A 20000 x 20000 PNG header (over Pillow's bomb limit x 2) still reads: no pixel is decoded."""
    small = save(tmp_path / "small.png", (4, 4), 0)
    data = bytearray(small.read_bytes())
    data[16:24] = (20000).to_bytes(4, "big") * 2  # IHDR width and height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR CRC (type + 13 data bytes)
    (tmp_path / "huge.png").write_bytes(bytes(data))
    header = read_image_header(tmp_path / "huge.png")
    assert (header.error, header.width, header.height) == ("", 20000, 20000)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's limit is restored


def test_a_jpeg_truncated_after_its_header_still_describes_itself(tmp_path: Path) -> None:
    """Headers only: the audit describes files, it does not validate their pixel data."""
    whole = save(tmp_path / "whole.jpg", (64, 64), 0, quality=85)
    (tmp_path / "cut.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    header = read_image_header(tmp_path / "cut.jpg")
    assert (header.error, header.format, header.width, header.jpeg_quality) == ("", "JPEG", 64, 85)
    assert header.file_size == whole.stat().st_size // 2


def test_shared_files_are_read_once(tmp_path: Path) -> None:
    """Reals listed under several datasets (UFD diffusion, Synthbuster) are read once, reported per row."""
    import pipeline.features.audit as audit_module

    read: list[Path] = []
    shared = save(tmp_path / "real.png", (8, 8), 0)
    fakes = [save(tmp_path / f"fake{i}.png", (8, 8), i) for i in (1, 2)]
    headers = audit_module.read_headers(
        [shared, fakes[0], shared, fakes[1]], workers=2, progress=False, description="",
        reader=lambda path: read.append(path) or read_image_header(path),
    )  # fmt: skip
    assert sorted(read) == sorted([shared, *fakes])
    assert headers == [read_image_header(path) for path in (shared, fakes[0], shared, fakes[1])]


# ---------------------------------------------------------------- AUCs and flags


def exif_headers(n_exif_real: int, n_exif_fake: int, n: int = 30) -> tuple[list[ImageHeader], np.ndarray]:
    """n reals then n fakes, all alike except EXIF presence."""
    headers = [
        ImageHeader("PNG", 32, 32, "RGB", i < (n_exif_real if label == 0 else n_exif_fake), 1000, None)
        for label in (0, 1)
        for i in range(n)
    ]
    return headers, np.repeat([0, 1], n)


@pytest.mark.parametrize("n_exif_real,n_exif_fake", [(6, 24), (25, 4)])
def test_one_feature_auc_equals_sklearn_on_the_raw_feature(n_exif_real: int, n_exif_fake: int) -> None:
    """A binary feature: the tree's fold AUC is roc_auc_score of the feature itself, oriented the way that predicts."""
    headers, labels = exif_headers(n_exif_real, n_exif_fake)
    exif = np.array([header.has_exif for header in headers], dtype=float)
    oriented = exif if n_exif_fake > n_exif_real else 1 - exif
    splitter = StratifiedKFold(n_splits=5, shuffle=True, random_state=3)
    expected = [roc_auc_score(labels[test], oriented[test]) for _, test in splitter.split(exif[:, None], labels)]
    by_feature = {row.feature: row for row in score_features("d", headers, labels, folds=5, seed=3)}
    assert by_feature["exif"].auc == pytest.approx(np.mean(expected), abs=1e-12)
    assert by_feature["exif"].auc_std == pytest.approx(np.std(expected), abs=1e-12)
    assert by_feature["exif"].auc > 0.75  # either direction counts
    for constant in ("format", "size", "mode", "file_size", "jpeg_quality"):
        assert by_feature[constant].auc == 0.5
    assert (by_feature["exif"].n_real, by_feature["exif"].n_fake, by_feature["exif"].folds) == (30, 30, 5)


def test_too_few_images_of_a_label_gives_no_auc() -> None:
    headers, labels = exif_headers(1, 1, n=3)
    rows = score_features("tiny", headers[:4], labels[:4], folds=5, seed=0)  # 3 reals, 1 fake
    assert [row.feature for row in rows] == [*FEATURE_NAMES, ALL_FEATURES]
    assert all(math.isnan(row.auc) and row.folds == 0 for row in rows)
    assert "has 3 real, 1 fake" in rows[0].note
    assert flag_dataset(rows, 0.8) is None


def test_folds_shrink_to_the_smaller_label() -> None:
    headers, labels = exif_headers(1, 2, n=3)
    assert {row.folds for row in score_features("d", headers, labels, folds=5, seed=0)} == {3}


def auc_rows(values: dict[str, float]) -> list[FeatureAuc]:
    return [FeatureAuc("d", name, auc, 0.0, 10, 10, 5) for name, auc in values.items()]


def test_flag_names_the_best_single_feature_and_breaks_ties_in_feature_order() -> None:
    flag = flag_dataset(auc_rows({"format": 0.5, "size": 1.0, "file_size": 1.0, "exif": 0.85, "all": 1.0}), 0.8)
    assert (flag.feature, flag.auc) == ("size", 1.0)
    assert flag.over_threshold == (("size", 1.0), ("file_size", 1.0), ("all", 1.0), ("exif", 0.85))
    assert (
        flag.describe()
        == "FLAGGED d: size alone predicts real vs fake (AUC 1.000); also file_size 1.000, all 1.000, exif 0.850"
    )
    only_together = flag_dataset(auc_rows({"format": 0.7, "size": 0.75, "all": 0.9}), 0.8)
    assert (only_together.feature, only_together.auc) == ("all", 0.9)
    assert flag_dataset(auc_rows({"format": 0.79, "all": 0.7999}), 0.8) is None
    assert flag_dataset(auc_rows({"format": 0.79}), 0.75).feature == "format"


# ---------------------------------------------------------------- run_audit on files


def test_format_shortcut_is_flagged_and_a_clean_dataset_is_not(tmp_path: Path) -> None:
    csv_path = write_split(tmp_path / "data", "mixed", format_shortcut() + clean_images("clean"))
    summary = audit(csv_path, tmp_path / "out")
    assert [(flag.dataset, flag.feature, flag.auc) for flag in summary.result.flags] == [("gan", "format", 1.0)]
    assert "FLAGGED gan: format alone predicts real vs fake (AUC 1.000)" in summary.report()
    aucs = {(row["dataset"], row["feature"]): row for row in read_csv_rows(tmp_path / "out" / "audit_mixed.csv")}
    assert aucs[("gan", "format")]["auc"] == "1" and aucs[("gan", "format")]["responsible"] == "True"
    assert float(aucs[("gan", "mode")]["auc"]) == 0.5  # both labels RGB
    assert [row["responsible"] for key, row in aucs.items() if key[0] == "gan"].count("True") == 1
    clean = [float(row["auc"]) for (dataset, _), row in aucs.items() if dataset == "clean"]
    assert len(clean) == len(FEATURE_NAMES) + 1 and max(clean) < 0.8
    assert all(row["flagged"] == "False" for (dataset, _), row in aucs.items() if dataset == "clean")


def test_size_shortcut_is_flagged_with_size(tmp_path: Path) -> None:
    images = [("faces", 0, f"r{i}.png", {"size": (64, 64)}) for i in range(8)]
    images += [("faces", 1, f"f{i}.png", {"size": (48, 48)}) for i in range(8)]
    summary = audit(write_split(tmp_path / "data", "sizes", images), tmp_path / "out")
    (flag,) = summary.result.flags
    assert (flag.dataset, flag.feature, flag.auc) == ("faces", "size", 1.0)
    assert "format" not in dict(flag.over_threshold)  # both labels are PNG


def test_clean_split_flags_nothing(tmp_path: Path) -> None:
    csv_path = write_split(tmp_path / "data", "clean", clean_images("one") + clean_images("two", n=16))
    summary = audit(csv_path, tmp_path / "out")
    assert summary.result.flags == ()
    assert "no dataset flagged: no header feature reaches AUC 0.8" in summary.report()
    assert max(row.auc for row in summary.result.aucs) < 0.8


def test_summary_statistics_against_the_files(tmp_path: Path) -> None:
    images = [
        ("d", 0, f"r{i}.jpg", {"size": (20 + 4 * i, 30), "quality": q, "exif": i == 0})
        for i, q in enumerate((50, 70, 95))
    ]
    images += [
        ("d", 1, f"f{i}.png", {"size": (24, 24), "mode": mode}) for i, mode in enumerate(("RGB", "L", "L", "RGBA"))
    ]
    images += [("d", 1, "missing.png", None)]
    csv_path = write_split(tmp_path / "data", "stats", images)
    audit(csv_path, tmp_path / "out", folds=2)
    real, fake = read_csv_rows(tmp_path / "out" / "audit_stats_summary.csv")
    real_sizes = [(tmp_path / "data" / "d" / "0" / f"r{i}.jpg").stat().st_size for i in range(3)]
    assert real == {
        "dataset": "d", "label": "0", "n": "3", "n_errors": "0", "formats": "JPEG=3", "modes": "RGB=3",
        "exif_fraction": f"{1 / 3:.4g}", "jpeg_quality_min": "50", "jpeg_quality_median": "70", "jpeg_quality_max": "95",
        "width_min": "20", "width_median": "24", "width_max": "28", "height_min": "30", "height_median": "30", "height_max": "30",
        "file_size_min": str(min(real_sizes)), "file_size_median": str(int(np.median(real_sizes))), "file_size_max": str(max(real_sizes)),
    }  # fmt: skip
    assert (fake["n"], fake["n_errors"], fake["formats"], fake["modes"]) == ("5", "1", "PNG=4", "L=2;RGB=1;RGBA=1")
    assert (fake["jpeg_quality_min"], fake["exif_fraction"]) == ("", "0")


def test_unreadable_files_are_counted_rows_not_crashes(tmp_path: Path) -> None:
    images = format_shortcut(6) + [("gan", 1, "missing.png", None), ("gan", 0, "broken.jpg", None)]
    csv_path = write_split(tmp_path / "data", "broken", images)
    (tmp_path / "data" / "gan" / "0" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    summary = audit(csv_path, tmp_path / "out")
    assert summary.result.n_errors == 2
    assert "14 images in 1 dataset(s), 2 unreadable" in summary.report()
    rows = read_csv_rows(tmp_path / "out" / "audit_broken_images.csv")
    assert len(rows) == 14
    errors = {row["path"]: row["error"] for row in rows if row["error"]}
    assert errors["gan/1/missing.png"] == "missing file"
    assert errors["gan/0/broken.jpg"] == "not an image (cannot identify format)"
    assert (summary.result.aucs[0].n_real, summary.result.aucs[0].n_fake) == (6, 6)  # errors take no part
    document = json.loads((tmp_path / "out" / "audit_broken.json").read_text())
    assert sorted(row["path"] for row in document["errors"]) == ["gan/0/broken.jpg", "gan/1/missing.png"]
    assert document["n_errors"] == 2 and document["flags"][0]["feature"] == "format"


def test_a_dataset_with_one_label_is_reported_unmeasured(tmp_path: Path) -> None:
    images = format_shortcut(4) + [("reals_only", 0, f"r{i}.png", {"size": (8, 8)}) for i in range(3)]
    summary = audit(write_split(tmp_path / "data", "one_label", images), tmp_path / "out")
    assert "not measured (too few readable images of a label): reals_only" in summary.report()
    rows = [row for row in read_csv_rows(tmp_path / "out" / "audit_one_label.csv") if row["dataset"] == "reals_only"]
    assert len(rows) == len(FEATURE_NAMES) + 1 and {(row["auc"], row["flagged"], row["folds"]) for row in rows} == {
        ("", "False", "0")
    }
    document = json.loads((tmp_path / "out" / "audit_one_label.json").read_text())
    assert [row["auc"] for row in document["feature_aucs"] if row["dataset"] == "reals_only"] == [None] * len(rows)
    assert [flag["dataset"] for flag in document["flags"]] == ["gan"]


def test_json_holds_the_csv_content(tmp_path: Path) -> None:
    summary = audit(write_split(tmp_path / "data", "j", format_shortcut(6)), tmp_path / "out")
    document = json.loads((tmp_path / "out" / "audit_j.json").read_text())
    assert [path.name for path in summary.written] == [
        "audit_j.csv",
        "audit_j_summary.csv",
        "audit_j_images.csv",
        "audit_j.json",
    ]
    csv_aucs = read_csv_rows(tmp_path / "out" / "audit_j.csv")
    assert [(row["feature"], row["auc"]) for row in csv_aucs] == [  # the CSV: 4 significant digits
        (row["feature"], f"{row['auc']:.4g}") for row in document["feature_aucs"]
    ]
    assert [row["formats"] for row in document["summary"]] == [{"JPEG": 6}, {"PNG": 6}]
    assert document["flags"] == [
        {
            "dataset": "gan",
            "feature": "format",
            "auc": 1.0,
            "over_threshold": dict(summary.result.flags[0].over_threshold),
        }
    ]
    assert (document["split"], document["threshold"], document["folds"], document["seed"]) == ("j", 0.8, 5, 0)


def test_bad_config_and_data_root_override(tmp_path: Path) -> None:
    csv_path = write_split(tmp_path / "data", "moved", format_shortcut(4))
    with pytest.raises(AuditError, match="threshold"):
        audit(csv_path, tmp_path / "out", threshold=0.4)
    with pytest.raises(AuditError, match="folds"):
        audit(csv_path, tmp_path / "out", folds=1)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(AuditError, match=f"{tmp_path / 'a_file'}: cannot write the audit"):
        audit(csv_path, tmp_path / "a_file")
    (tmp_path / "data").rename(tmp_path / "elsewhere")
    moved = tmp_path / "elsewhere" / "manifests" / "moved.csv"
    assert audit(moved, tmp_path / "out").result.n_errors == 8  # the remembered root is gone
    summary = audit(moved, tmp_path / "out", data_root=tmp_path / "elsewhere")
    assert summary.result.n_errors == 0 and summary.result.flags[0].feature == "format"


# ---------------------------------------------------------------- the format-aligned files


def scene(seed: int, size: int = 64) -> np.ndarray:
    """A smooth colour field plus noise whose amplitude varies from image to image (same law for both labels)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([rng.uniform(40, 215) + rng.uniform(-60, 60) * x + rng.uniform(-60, 60) * y for _ in range(3)], -1)
    return np.clip(base + rng.normal(0, rng.uniform(2, 40), base.shape), 0, 255).astype(np.uint8)


def write_scene_split(root: Path, name: str, shortcut: bool, n: int = 16) -> Path:
    """Dataset 'gan' of scenes: with ``shortcut`` reals JPEG (quality 90) and fakes PNG, else both labels mixed."""
    rows = []
    for index in range(2 * n):
        label = index % 2
        as_jpeg = label == 0 if shortcut else (index // 2) % 2 == 0
        relative = f"gan/{label}/{index:03d}." + ("jpg" if as_jpeg else "png")
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene(index)).save(root / relative, **({"quality": 90} if as_jpeg else {}))
        rows.append(ManifestRow(relative, label, "gan"))
    csv_path = root / "manifests" / f"{name}.csv"
    write_manifest(Manifest(name, tuple(rows), root), csv_path)
    return csv_path


def test_format_align_removes_the_format_shortcut_and_a_clean_split_stays_clean(tmp_path: Path) -> None:
    shortcut = write_scene_split(tmp_path / "data", "shortcut", shortcut=True)
    original = audit(shortcut, tmp_path / "out")
    assert [(flag.dataset, flag.feature) for flag in original.result.flags] == [("gan", "format")]
    aligned = audit(shortcut, tmp_path / "out", perturbation=FORMAT_ALIGN)
    assert aligned.result.flags == () and aligned.variant == "format-align-q95"
    assert {(h.format, h.jpeg_quality, h.mode, h.has_exif) for h in aligned.result.headers} == {
        ("JPEG", 95, "RGB", False)
    }
    assert [h.width for h in aligned.result.headers] == [h.width for h in original.result.headers]
    assert "no dataset flagged" in aligned.report() and "format-align-q95" in aligned.report()
    assert [path.name for path in aligned.written] == [
        "audit_shortcut_format-align-q95.csv", "audit_shortcut_format-align-q95_summary.csv",
        "audit_shortcut_format-align-q95_images.csv", "audit_shortcut_format-align-q95.json",
    ]  # fmt: skip
    document = json.loads(aligned.written[3].read_text())
    assert document["variant"] == "format-align-q95" and document["flags"] == []
    # the size of a re-encoded file depends on its pixels alone: described, not scored
    assert {row.feature for row in aligned.result.aucs} == {"format", "jpeg_quality", "size", "mode", "exif", "all"}
    assert "file_size" not in document["features"] and all(s.file_size for s in aligned.result.summaries)
    assert json.loads(original.written[3].read_text())["variant"] is None
    size_shortcut = [
        (dataset, label, name.replace(".jpg", ".png"), {**options, "size": (32 + 16 * label, 32)})
        for dataset, label, name, options in format_shortcut()
    ]  # every file PNG, fakes wider: a size shortcut, which re-encoding leaves in place
    sized = write_split(tmp_path / "data", "sized", size_shortcut)
    assert [flag.feature for flag in audit(sized, tmp_path / "out", perturbation=FORMAT_ALIGN).result.flags] == ["size"]
    clean = write_scene_split(tmp_path / "data", "clean", shortcut=False)
    assert audit(clean, tmp_path / "out").result.flags == ()
    assert audit(clean, tmp_path / "out", perturbation=FORMAT_ALIGN, align_quality=80).result.flags == ()


def test_format_aligned_header_is_that_of_the_extracted_bytes(tmp_path: Path) -> None:
    path = save(tmp_path / "a.png", (40, 24), 3)
    header = read_format_aligned_header(path, 70)
    encoded = format_align_bytes(np.asarray(Image.open(path).convert("RGB")), 70)
    assert (header.format, header.width, header.height, header.jpeg_quality) == ("JPEG", 40, 24, 70)
    assert header.file_size == len(encoded)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n nothing more")
    assert read_format_aligned_header(broken, 95).error
    with pytest.raises(AuditError, match="not 'jpeg'"):
        AuditConfig(split="x", manifest=path, perturbation="jpeg").validate()


# ---------------------------------------------------------------- CLI


def test_cli_audit(tmp_path: Path) -> None:
    csv_path = write_split(tmp_path / "data", "cli", format_shortcut(6))
    out = tmp_path / "reports"
    result = CliRunner().invoke(
        main, ["audit", "--split", "cli", "--manifest", str(csv_path), "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        str(out / name) for name in ("audit_cli.csv", "audit_cli_summary.csv", "audit_cli_images.csv", "audit_cli.json")
    ]
    assert "FLAGGED gan: format alone predicts real vs fake (AUC 1.000)" in result.stderr
    bad = CliRunner().invoke(main, ["audit", "--split", "cli", "--manifest", str(csv_path), "--threshold", "0.5"])
    assert bad.exit_code == 2 and "--threshold" in bad.stderr
    missing = CliRunner().invoke(main, ["audit", "--split", "nope", "--manifest", str(tmp_path / "nope.csv")])
    assert missing.exit_code == 1 and f"{tmp_path / 'nope.csv'}: no such file" in missing.stderr
    aligned = CliRunner().invoke(
        main, ["audit", "--split", "cli", "--manifest", str(csv_path), "--out", str(out), "--no-progress",
               "--perturb", "format-align", "--align-quality", "90"],
    )  # fmt: skip
    assert aligned.exit_code == 0, aligned.output
    assert aligned.stdout.splitlines()[-1] == str(out / "audit_cli_format-align-q90.json")
