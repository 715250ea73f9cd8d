"""Tests of pipeline.manifest: layouts, CSV round trip, identity, validation."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.manifest import (
    LAYOUTS,
    Manifest,
    ManifestError,
    ManifestRow,
    build_manifest,
    manifest_path,
    read_manifest,
    write_manifest,
)


def touch(root: Path, *relatives: str) -> None:
    """Create files (a few bytes each: layouts do not decode images)."""
    for relative in relatives:
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"not decoded")


def rows_of(manifest: Manifest) -> list[tuple[str, int, str, str | None]]:
    return [(r.path, r.label, r.dataset, r.class_name) for r in manifest.rows]


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def test_layout_names() -> None:
    assert LAYOUTS == (
        "cnndetection-train",
        "cnndetection-val",
        "cnndetection-test",
        "ufd-diffusion",
        "synthbuster",
        "folder",
    )


# ------------------------------------------------------------------ cnndetection train / val


def make_progan_tree(root: Path, part: str) -> None:
    touch(
        root,
        f"{part}/horse/0_real/b.png",
        f"{part}/horse/0_real/A.PNG",  # extension case does not matter
        f"{part}/horse/0_real/notes.txt",  # not an image
        f"{part}/horse/0_real/.hidden.png",  # hidden file
        f"{part}/horse/0_real/.cache/c.png",  # hidden folder
        f"{part}/horse/0_real/sub/d.jpeg",  # nested below a label folder
        f"{part}/horse/1_fake/f.webp",
        f"{part}/chair/0_real/r.jpg",
        f"{part}/chair/1_fake/g.tif",
        f"{part}/car/0_real/r.bmp",
        f"{part}/car/1_fake/h.TIFF",
        f"{part}/README.txt",  # stray file next to the class folders
    )


@pytest.mark.parametrize(
    "layout,part", [("cnndetection-train", "train"), ("cnndetection-val", "val")]
)
def test_cnndetection_training_layout_rows(tmp_path: Path, layout: str, part: str) -> None:
    make_progan_tree(tmp_path, part)
    manifest = build_manifest(layout, tmp_path, "progan_" + part)
    assert rows_of(manifest) == [
        (f"{part}/car/0_real/r.bmp", 0, "progan", "car"),
        (f"{part}/car/1_fake/h.TIFF", 1, "progan", "car"),
        (f"{part}/chair/0_real/r.jpg", 0, "progan", "chair"),
        (f"{part}/chair/1_fake/g.tif", 1, "progan", "chair"),
        (f"{part}/horse/0_real/A.PNG", 0, "progan", "horse"),
        (f"{part}/horse/0_real/b.png", 0, "progan", "horse"),
        (f"{part}/horse/0_real/sub/d.jpeg", 0, "progan", "horse"),
        (f"{part}/horse/1_fake/f.webp", 1, "progan", "horse"),
    ]
    assert manifest.split == "progan_" + part
    assert manifest.layout == layout
    assert manifest.data_root == tmp_path.resolve()
    assert manifest.has_classes()
    assert len(manifest) == 8
    assert manifest.resolve(0) == tmp_path.resolve() / part / "car" / "0_real" / "r.bmp"


def test_cnndetection_class_filter(tmp_path: Path) -> None:
    make_progan_tree(tmp_path, "train")
    one = build_manifest("cnndetection-train", tmp_path, "s", classes=["horse"])
    assert {r.class_name for r in one.rows} == {"horse"}
    assert len(one) == 4
    two = build_manifest("cnndetection-train", tmp_path, "s", classes=["horse", "chair"])
    assert sorted({r.class_name for r in two.rows}) == ["chair", "horse"]
    assert len(two) == 6
    assert two.options["classes"] == ("chair", "horse")
    with pytest.raises(ManifestError, match="'zebra'") as error:
        build_manifest("cnndetection-train", tmp_path, "s", classes=["horse", "zebra"])
    assert "car, chair, horse" in str(error.value)  # the classes that do exist


def test_cnndetection_missing_folders_are_named(tmp_path: Path) -> None:
    (tmp_path / "cnndet").mkdir()
    root = (tmp_path / "cnndet").resolve()
    with pytest.raises(ManifestError) as error:
        build_manifest("cnndetection-train", root, "s")
    assert str(error.value) == (
        f"no folder train/ under {root}: expected train/<class>/{{0_real,1_fake}}"
    )
    touch(root, "train/horse/0_real/a.png")
    with pytest.raises(ManifestError, match=r"no folder train/horse/1_fake/ under "):
        build_manifest("cnndetection-train", root, "s")
    (root / "train/horse/1_fake").mkdir()
    with pytest.raises(ManifestError, match=r"1_fake.*no images"):
        build_manifest("cnndetection-train", root, "s")


def test_build_option_errors(tmp_path: Path) -> None:
    make_progan_tree(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown layout 'nope'"):
        build_manifest("nope", tmp_path, "s")
    with pytest.raises(ValueError, match="not the string"):
        build_manifest("cnndetection-train", tmp_path, "s", classes="horse")
    with pytest.raises(ValueError, match="must not be empty"):
        build_manifest("cnndetection-train", tmp_path, "s", classes=[])
    with pytest.raises(ValueError, match="does not take generators"):
        build_manifest("cnndetection-train", tmp_path, "s", generators=["progan"])
    with pytest.raises(ValueError, match="does not take classes"):
        build_manifest("ufd-diffusion", tmp_path, "s", classes=["horse"])
    with pytest.raises(ValueError, match="does not take raise_root"):
        build_manifest("folder", tmp_path, "s", raise_root=tmp_path)
    with pytest.raises(ValueError, match="needs raise_root"):
        build_manifest("synthbuster", tmp_path, "s")
    with pytest.raises(ManifestError, match="data root is not a folder"):
        build_manifest("folder", tmp_path / "missing", "s")


# ------------------------------------------------------------------ cnndetection test


def make_test_tree(root: Path) -> None:
    touch(
        root,
        "test/progan/horse/0_real/r1.png",
        "test/progan/horse/1_fake/f1.png",
        "test/progan/cat/0_real/r2.png",
        "test/progan/cat/1_fake/f2.png",
        "test/biggan/0_real/r.png",
        "test/biggan/1_fake/f.png",
        "test/seeingdark/0_real/r.png",
        "test/seeingdark/1_fake/f.png",
        "test/diffusion_datasets/guided/1_fake/x.png",  # not a GAN test set
        "test/diffusion_datasets/imagenet/0_real/y.png",
    )


def test_cnndetection_test_layout_rows(tmp_path: Path) -> None:
    make_test_tree(tmp_path)
    manifest = build_manifest("cnndetection-test", tmp_path, "gan_test")
    assert rows_of(manifest) == [
        ("test/biggan/0_real/r.png", 0, "biggan", None),
        ("test/biggan/1_fake/f.png", 1, "biggan", None),
        ("test/progan/cat/0_real/r2.png", 0, "progan", "cat"),
        ("test/progan/cat/1_fake/f2.png", 1, "progan", "cat"),
        ("test/progan/horse/0_real/r1.png", 0, "progan", "horse"),
        ("test/progan/horse/1_fake/f1.png", 1, "progan", "horse"),
        ("test/seeingdark/0_real/r.png", 0, "sitd", None),
        ("test/seeingdark/1_fake/f.png", 1, "sitd", None),
    ]
    # Mixed classes: the class column holds "" for rows without one, read back as None.
    csv_path = tmp_path / "manifests" / "gan_test.csv"
    write_manifest(manifest, csv_path)
    assert csv_path.read_text(encoding="utf-8").splitlines()[:4] == [
        "path,label,dataset,class",
        "test/biggan/0_real/r.png,0,biggan,",
        "test/biggan/1_fake/f.png,1,biggan,",
        "test/progan/cat/0_real/r2.png,0,progan,cat",
    ]
    assert read_manifest(csv_path).rows == manifest.rows


def test_cnndetection_test_generator_filter(tmp_path: Path) -> None:
    make_test_tree(tmp_path)
    manifest = build_manifest("cnndetection-test", tmp_path, "sitd", generators=["sitd", "biggan"])
    assert sorted({r.dataset for r in manifest.rows}) == ["biggan", "sitd"]
    assert not manifest.has_classes()
    csv_path = tmp_path / "sitd.csv"
    write_manifest(manifest, csv_path)
    assert csv_path.read_text(encoding="utf-8").splitlines()[0] == "path,label,dataset"
    with pytest.raises(ManifestError, match="'seeingdark'"):  # filter by dataset name
        build_manifest("cnndetection-test", tmp_path, "s", generators=["seeingdark"])


def test_cnndetection_test_structure_errors(tmp_path: Path) -> None:
    touch(
        tmp_path, "test/gaugan/0_real/r.png", "test/gaugan/1_fake/f.png", "test/gaugan/extra/x.png"
    )
    mixed = r"gaugan: mixes 0_real/1_fake with other folders \(extra\)"
    with pytest.raises(ManifestError, match=mixed):
        build_manifest("cnndetection-test", tmp_path, "s")
    other = tmp_path / "other"
    touch(other, "test/stylegan/car/0_real/r.png")
    with pytest.raises(ManifestError, match=r"no folder test/stylegan/car/1_fake/ under "):
        build_manifest("cnndetection-test", other, "s")


# ------------------------------------------------------------------ UFD diffusion


def make_ufd_tree(root: Path) -> None:
    base = "test/diffusion_datasets"
    touch(
        root,
        f"{base}/guided/1_fake/g1.png",
        f"{base}/guided/1_fake/g2.png",
        f"{base}/ldm_200/1_fake/l1.png",
        f"{base}/dalle/1_fake/d1.png",
        f"{base}/imagenet/0_real/i1.png",
        f"{base}/laion/0_real/a1.png",
        f"{base}/laion/0_real/a2.png",
    )


def test_ufd_diffusion_layout_rows_share_reals(tmp_path: Path) -> None:
    make_ufd_tree(tmp_path)
    manifest = build_manifest("ufd-diffusion", tmp_path, "diffusion")
    b = "test/diffusion_datasets"
    assert rows_of(manifest) == [
        (f"{b}/dalle/1_fake/d1.png", 1, "dalle", None),
        (f"{b}/guided/1_fake/g1.png", 1, "guided", None),
        (f"{b}/guided/1_fake/g2.png", 1, "guided", None),
        (f"{b}/imagenet/0_real/i1.png", 0, "guided", None),
        (f"{b}/laion/0_real/a1.png", 0, "dalle", None),
        (f"{b}/laion/0_real/a1.png", 0, "ldm_200", None),
        (f"{b}/laion/0_real/a2.png", 0, "dalle", None),
        (f"{b}/laion/0_real/a2.png", 0, "ldm_200", None),
        (f"{b}/ldm_200/1_fake/l1.png", 1, "ldm_200", None),
    ]
    # the same path under two datasets is allowed on disk too
    csv_path = tmp_path / "diffusion.csv"
    write_manifest(manifest, csv_path)
    assert read_manifest(csv_path).rows == manifest.rows


def test_ufd_diffusion_generator_filter_and_missing_reals(tmp_path: Path) -> None:
    make_ufd_tree(tmp_path)
    for real in (tmp_path / "test/diffusion_datasets/laion/0_real").iterdir():
        real.unlink()
    (tmp_path / "test/diffusion_datasets/laion/0_real").rmdir()
    guided = build_manifest("ufd-diffusion", tmp_path, "guided", generators=["guided"])
    assert {r.dataset for r in guided.rows} == {"guided"}
    assert [r.label for r in guided.rows] == [1, 1, 0]
    missing = r"no folder test/diffusion_datasets/laion/0_real/ under"
    with pytest.raises(ManifestError, match=missing):
        build_manifest("ufd-diffusion", tmp_path, "s", generators=["dalle"])
    with pytest.raises(ManifestError, match="'glide_100_10'"):
        build_manifest("ufd-diffusion", tmp_path, "s", generators=["glide_100_10"])


# ------------------------------------------------------------------ Synthbuster


def test_synthbuster_layout_rows(tmp_path: Path) -> None:
    data = tmp_path / "data"
    touch(
        data,
        "synthbuster/dalle2/a.png",
        "synthbuster/dalle2/b.png",
        "synthbuster/midjourney-v5/m.png",
        "synthbuster/prompts.csv",  # metadata next to the generator folders
        "synthbuster/meta/info.txt",  # a folder without images is not a generator
        "RAISEpng/r1.png",
        "RAISEpng/r2.png",
    )
    manifest = build_manifest(
        "synthbuster", data / "synthbuster", "synthbuster", raise_root=data / "RAISEpng"
    )
    assert manifest.data_root == data.resolve()
    assert rows_of(manifest) == [
        ("RAISEpng/r1.png", 0, "dalle2", None),
        ("RAISEpng/r1.png", 0, "midjourney-v5", None),
        ("RAISEpng/r2.png", 0, "dalle2", None),
        ("RAISEpng/r2.png", 0, "midjourney-v5", None),
        ("synthbuster/dalle2/a.png", 1, "dalle2", None),
        ("synthbuster/dalle2/b.png", 1, "dalle2", None),
        ("synthbuster/midjourney-v5/m.png", 1, "midjourney-v5", None),
    ]
    for index in range(len(manifest)):
        assert manifest.resolve(index).is_file()
    raise_root = data / "RAISEpng"
    only = build_manifest(
        "synthbuster", data / "synthbuster", "s", raise_root=raise_root, generators=["dalle2"]
    )
    assert [r.dataset for r in only.rows] == ["dalle2"] * 4
    with pytest.raises(ManifestError, match="'meta'"):
        build_manifest(
            "synthbuster", data / "synthbuster", "s", raise_root=raise_root, generators=["meta"]
        )


def test_synthbuster_raise_inside_root(tmp_path: Path) -> None:
    touch(tmp_path, "sb/glide/g.png", "sb/RAISEpng/r.png")
    manifest = build_manifest(
        "synthbuster", tmp_path / "sb", "s", raise_root=tmp_path / "sb/RAISEpng"
    )
    assert manifest.data_root == (tmp_path / "sb").resolve()
    assert rows_of(manifest) == [
        ("RAISEpng/r.png", 0, "glide", None),
        ("glide/g.png", 1, "glide", None),
    ]


# ------------------------------------------------------------------ generic folder


def test_folder_layout_rows(tmp_path: Path) -> None:
    root = tmp_path / "mydata"
    touch(
        root,
        "a/b/0_real/x.png",
        "a/b/1_fake/deep/er/y.png",
        "0_real/z.png",
        "1_fake/w.jpg",
        "c/1_fake/v.png",
        "loose.png",  # not under a label folder
        "c/other/u.png",
    )
    manifest = build_manifest("folder", root, "mine")
    assert rows_of(manifest) == [
        ("0_real/z.png", 0, "mydata", None),
        ("1_fake/w.jpg", 1, "mydata", None),
        ("a/b/0_real/x.png", 0, "a/b", None),
        ("a/b/1_fake/deep/er/y.png", 1, "a/b", None),
        ("c/1_fake/v.png", 1, "c", None),
    ]


def test_folder_layout_errors(tmp_path: Path) -> None:
    touch(tmp_path, "x/images/a.png")
    with pytest.raises(ManifestError, match="no folder named 0_real/ or 1_fake/ under"):
        build_manifest("folder", tmp_path, "s")
    touch(tmp_path, "y/1_fake/sub/0_real/a.png")
    with pytest.raises(ManifestError, match="0_real/ folder inside another label folder"):
        build_manifest("folder", tmp_path, "s")


def test_symlinks_are_followed_and_loops_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    touch(elsewhere, "horses/h.png")
    root = tmp_path / "root"
    touch(root, "set/0_real/r.png")
    (root / "set/1_fake").mkdir()
    (root / "set/1_fake/linked").symlink_to(elsewhere / "horses", target_is_directory=True)
    (root / "set/0_real/link.png").symlink_to(elsewhere / "horses/h.png")
    manifest = build_manifest("folder", root, "s")
    assert rows_of(manifest) == [
        ("set/0_real/link.png", 0, "set", None),
        ("set/0_real/r.png", 0, "set", None),
        ("set/1_fake/linked/h.png", 1, "set", None),
    ]
    (root / "set/0_real/broken.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ManifestError, match="broken.png: broken symbolic link"):
        build_manifest("folder", root, "s")
    (root / "set/0_real/broken.png").unlink()
    (root / "set/0_real/loop").symlink_to(root / "set/0_real", target_is_directory=True)
    with pytest.raises(ManifestError, match="symbolic link loop"):
        build_manifest("folder", root, "s")


# ------------------------------------------------------------------ write / read / identity


def save_tiny_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path)


def test_round_trip_with_sidecar_unicode_and_spaces(tmp_path: Path) -> None:
    data = tmp_path / "dätä root"
    names = ["real/été photo.png", 'fake/a, "quoted" name.png', "fake/日本 画像.png"]
    for value, name in enumerate(names):
        save_tiny_png(data / name, 10 * value)
    manifest = Manifest(
        split="mixed",
        rows=(
            ManifestRow(names[0], 0, "set one", "chat noir"),
            ManifestRow(names[1], 1, "set one", None),
            ManifestRow(names[2], 1, "セット", "猫"),
        ),
        data_root=data,
        layout="folder",
        options={"classes": ["a", "b"]},
    )
    csv_path = manifest_path(tmp_path / "manifests", "mixed")
    assert csv_path == tmp_path / "manifests" / "mixed.csv"
    write_manifest(manifest, csv_path)
    assert sorted(p.name for p in csv_path.parent.iterdir()) == ["mixed.csv", "mixed.json"]
    assert json.loads((tmp_path / "manifests/mixed.json").read_text(encoding="utf-8")) == {
        "data_root": str(data),
        "layout": "folder",
        "options": {"classes": ["a", "b"]},
    }
    back = read_manifest(csv_path)
    assert back == manifest
    assert back.rows[1].class_name is None
    assert back.resolve(2) == data / "fake" / "日本 画像.png"
    with Image.open(back.resolve(2)) as image:
        assert np.asarray(image)[0, 0, 0] == 20
    moved = tmp_path / "moved"
    assert back.resolve(0, data_root=moved) == moved / "real" / "été photo.png"
    assert back.resolve(-1, moved) == moved / "fake" / "日本 画像.png"


def test_resolve_without_any_root_is_an_error(tmp_path: Path) -> None:
    csv_path = write_text(tmp_path / "bare.csv", "path,label,dataset\na/b.png,1,x\n")
    manifest = read_manifest(csv_path)
    assert manifest.data_root is None and manifest.layout is None
    with pytest.raises(ManifestError, match="no data root given"):
        manifest.resolve(0)
    assert manifest.resolve(0, tmp_path) == tmp_path / "a" / "b.png"


def test_sha256_is_the_hash_of_the_canonical_csv(tmp_path: Path) -> None:
    rows = (ManifestRow("x/a.png", 0, "d"), ManifestRow("x/b c.png", 1, "d"))
    manifest = Manifest("ident", rows, data_root=tmp_path / "one")
    expected_text = "path,label,dataset\nx/a.png,0,d\nx/b c.png,1,d\n"
    assert manifest.sha256() == hashlib.sha256(expected_text.encode("utf-8")).hexdigest()
    assert replace(manifest, data_root=tmp_path / "two").sha256() == manifest.sha256()
    assert replace(manifest, data_root=None, layout="folder").sha256() == manifest.sha256()
    flipped = replace(manifest, rows=(rows[0], replace(rows[1], label=0)))
    assert flipped.sha256() != manifest.sha256()
    csv_path = tmp_path / "ident.csv"
    write_manifest(manifest, csv_path)
    assert hashlib.sha256(csv_path.read_bytes()).hexdigest() == manifest.sha256()
    # A CSV written elsewhere (CRLF line ends, BOM) reads back with the same identity.
    windows_text = "\ufeff" + expected_text.replace("\n", "\r\n")
    foreign = write_text(tmp_path / "other" / "ident.csv", windows_text)
    assert read_manifest(foreign).sha256() == manifest.sha256()


def test_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path: Path) -> None:
    csv_path = tmp_path / "s.csv"
    first = Manifest("s", (ManifestRow("a.png", 0, "d"), ManifestRow("b.png", 1, "d")), tmp_path)
    write_manifest(first, csv_path)
    second = Manifest("s", (ManifestRow("c.png", 1, "e"),), None)
    write_manifest(second, csv_path)
    assert csv_path.read_text(encoding="utf-8") == "path,label,dataset\nc.png,1,e\n"
    assert json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["data_root"] is None
    assert sorted(os.listdir(tmp_path)) == ["s.csv", "s.json"]
    assert read_manifest(csv_path) == second


@pytest.mark.parametrize(
    "row,reason",
    [
        (ManifestRow("/abs/a.png", 0, "d"), "line 3: path must be relative to the data root"),
        (ManifestRow("x/../a.png", 0, "d"), "line 3: path must not contain '..'"),
        (ManifestRow("a.png", 2, "d"), "line 3: label must be 0 or 1, got '2'"),
        (ManifestRow("a.png", True, "d"), "line 3: label must be 0 or 1, got 'True'"),
        (ManifestRow("b.png", 0, ""), "line 3: empty dataset"),
        (ManifestRow("b.png", 0, "d", ""), "line 3: class must be None or a non-empty name"),
        (ManifestRow("a.png", 1, "d"), "line 3: duplicate of line 2 (path 'a.png', dataset 'd')"),
    ],
)
def test_write_refuses_rows_that_would_not_read_back(
    tmp_path: Path, row: ManifestRow, reason: str
) -> None:
    csv_path = tmp_path / "s.csv"
    good = Manifest("s", (ManifestRow("a.png", 0, "d"),), tmp_path)
    write_manifest(good, csv_path)
    before = csv_path.read_bytes()
    with pytest.raises(ManifestError) as error:
        write_manifest(replace(good, rows=(good.rows[0], row)), csv_path)
    assert str(csv_path) in str(error.value)
    assert reason in str(error.value)
    assert csv_path.read_bytes() == before


def test_write_checks_the_file_name_and_split_name(tmp_path: Path) -> None:
    manifest = Manifest("s", (ManifestRow("a.png", 0, "d"),), None)
    with pytest.raises(ManifestError, match="must be written to a file named s.csv"):
        write_manifest(manifest, tmp_path / "t.csv")
    with pytest.raises(ValueError, match="plain file stem"):
        manifest_path(tmp_path, "../escape")
    with pytest.raises(ValueError, match="plain file stem"):
        manifest_path(tmp_path, "")


# ------------------------------------------------------------------ read validation


@pytest.mark.parametrize(
    "text,line,reason",
    [
        ("path,dataset\na.png,d\n", 1, "missing required column 'label'"),
        ("path,label,dataset,extra\na.png,0,d,e\n", 1, "unknown column 'extra'"),
        ("path,label,dataset,class,class\na.png,0,d,c,c\n", 1, "column 'class' appears twice"),
        ("label,path,dataset\n0,a.png,d\n", 1, "columns must be in the order path,label,dataset"),
        (
            "path,label,dataset\na.png,0,d\nb.png,1\n",
            3,
            "expected 3 fields (path,label,dataset), got 2",
        ),
        ("path,label,dataset,class\na.png,0,d,c,x\n", 2, "expected 4 fields"),
        ("path,label,dataset\na.png,0,d\n\n", 3, "expected 3 fields (path,label,dataset), got 0"),
        ("path,label,dataset\n,0,d\n", 2, "empty path"),
        ("path,label,dataset\na.png,0,d\n/data/b.png,1,d\n", 3, "absolute path '/data/b.png'"),
        ("path,label,dataset\nC:/data/b.png,1,d\n", 2, "absolute path 'C:/data/b.png'"),
        ("path,label,dataset\na/../../b.png,1,d\n", 2, "must not contain '..' components"),
        ("path,label,dataset\na//b.png,1,d\n", 2, "must be normalised"),
        ("path,label,dataset\n./b.png,1,d\n", 2, "must be normalised"),
        ("path,label,dataset\na\\b.png,1,d\n", 2, "must use '/' separators"),
        ("path,label,dataset\na.png,0,d\nb.png,2,d\n", 3, "label must be 0 or 1, got '2'"),
        ("path,label,dataset\na.png, 1,d\n", 2, "label must be 0 or 1, got ' 1'"),
        ("path,label,dataset\na.png,0,\n", 2, "empty dataset"),
        ('path,label,dataset\n"a\nb.png",0,d\n', 2, "path contains a control character"),
        ("path,label,dataset\na\x00b.png,0,d\n", 2, "path contains a control character"),
        ("path,label,dataset\na.png,0,d\tx\n", 2, "dataset contains a control character"),
        (
            "path,label,dataset\na.png,0,d\nb.png,1,d\nx.png,0,e\na.png,1,d\n",
            5,
            "duplicate of line 2 (path 'a.png', dataset 'd')",
        ),
    ],
)
def test_read_validation_errors_name_file_line_and_reason(
    tmp_path: Path, text: str, line: int, reason: str
) -> None:
    csv_path = write_text(tmp_path / "manifests" / "x.csv", text)
    with pytest.raises(ManifestError) as error:
        read_manifest(csv_path)
    message = str(error.value)
    assert message.startswith(f"{csv_path} line {line}: "), message
    assert reason in message


def test_same_path_under_two_datasets_is_allowed(tmp_path: Path) -> None:
    text = "path,label,dataset\nr.png,0,ldm_200\nr.png,0,dalle\n"
    csv_path = write_text(tmp_path / "x.csv", text)
    assert rows_of(read_manifest(csv_path)) == [
        ("r.png", 0, "ldm_200", None),
        ("r.png", 0, "dalle", None),
    ]


@pytest.mark.parametrize(
    "text,reason",
    [
        (None, "no such file"),
        ("path,label,dataset\n", "no rows (header only)"),
        ("", "line 1: empty file"),
    ],
)
def test_read_file_level_errors(tmp_path: Path, text: str | None, reason: str) -> None:
    csv_path = tmp_path / "manifests" / "x.csv"
    if text is not None:
        write_text(csv_path, text)
    with pytest.raises(ManifestError) as error:
        read_manifest(csv_path)
    assert str(error.value).startswith(str(csv_path))
    assert reason in str(error.value)


@pytest.mark.parametrize(
    "sidecar,reason",
    [
        ("{not json", "line 1: invalid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"data_root": "/d", "colour": 1}', "unknown key 'colour'"),
        ('{"layout": "folder"}', "missing key 'data_root'"),
        ('{"data_root": "relative/dir"}', "data_root must be an absolute path"),
        ('{"data_root": "/d", "layout": 3}', "layout must be a string"),
        ('{"data_root": "/d", "options": []}', "options must be a JSON object"),
    ],
)
def test_sidecar_errors_name_the_json_file(tmp_path: Path, sidecar: str, reason: str) -> None:
    csv_path = write_text(tmp_path / "x.csv", "path,label,dataset\na.png,0,d\n")
    json_path = write_text(tmp_path / "x.json", sidecar)
    with pytest.raises(ManifestError) as error:
        read_manifest(csv_path)
    assert str(error.value).startswith(str(json_path))
    assert reason in str(error.value)
