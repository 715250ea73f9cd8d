"""Tests of pipeline.features.layouts: every layout on a miniature copy of its tree, option and structure errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipeline.features import LAYOUTS, Manifest, ManifestError, build_manifest, read_manifest, write_manifest
from pipeline.names import LAYOUT_NAMES


def touch(root: Path, *relatives: str) -> None:
    """Create files (a few bytes each: layouts do not decode images)."""
    for relative in relatives:
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"not decoded")


def rows_of(manifest: Manifest) -> list[tuple[str, int, str, str | None]]:
    return [(r.path, r.label, r.dataset, r.class_name) for r in manifest.rows]


def test_the_layouts_are_the_vocabularys() -> None:
    assert tuple(LAYOUTS) == LAYOUT_NAMES  # the CLI offers names.LAYOUT_NAMES without importing stage one


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


@pytest.mark.parametrize("layout,part", [("cnndetection-train", "train"), ("cnndetection-val", "val")])
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
    assert str(error.value) == (f"no folder train/ under {root}: expected train/<class>/{{0_real,1_fake}}")
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
    touch(tmp_path, "test/gaugan/0_real/r.png", "test/gaugan/1_fake/f.png", "test/gaugan/extra/x.png")
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
    manifest = build_manifest("synthbuster", data / "synthbuster", "synthbuster", raise_root=data / "RAISEpng")
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
    only = build_manifest("synthbuster", data / "synthbuster", "s", raise_root=raise_root, generators=["dalle2"])
    assert [r.dataset for r in only.rows] == ["dalle2"] * 4
    with pytest.raises(ManifestError, match="'meta'"):
        build_manifest("synthbuster", data / "synthbuster", "s", raise_root=raise_root, generators=["meta"])


def test_synthbuster_raise_inside_root(tmp_path: Path) -> None:
    touch(tmp_path, "sb/glide/g.png", "sb/RAISEpng/r.png")
    manifest = build_manifest("synthbuster", tmp_path / "sb", "s", raise_root=tmp_path / "sb/RAISEpng")
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
    (root / "set/0_real/loop").symlink_to(root / "set/0_real", target_is_directory=True)
    (root / "set/0_real/self.jpg").symlink_to(root / "set/0_real/self.jpg")
    (root / "set/1_fake/ping.png").symlink_to(root / "set/1_fake/pong.png")
    (root / "set/1_fake/pong.png").symlink_to(root / "set/1_fake/ping.png")
    os.mkfifo(root / "set/1_fake/pipe.png")
    manifest = build_manifest("folder", root, "s")  # recorded, and the manifest goes on
    assert len(manifest.rows) == 3
    assert manifest.skipped == (
        ("set/0_real/broken.png", "broken symbolic link"),
        ("set/0_real/loop", "symbolic link loop back to a parent folder"),
        ("set/0_real/self.jpg", "symbolic link loop (Too many levels of symbolic links)"),
        ("set/1_fake/ping.png", "symbolic link loop (Too many levels of symbolic links)"),
        ("set/1_fake/pipe.png", "not a regular file (a FIFO, socket or device)"),
        ("set/1_fake/pong.png", "symbolic link loop (Too many levels of symbolic links)"),
    )


def test_the_manifest_command_records_a_link_loop_and_goes_on(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    touch(tmp_path, "d/0_real/r.png")
    touch(tmp_path, "d/1_fake/f.png")
    (tmp_path / "d/0_real/loop.jpg").symlink_to(tmp_path / "d/0_real/loop.jpg")
    args = ["manifest", "--layout", "folder", "--root", str(tmp_path / "d"), "--split", "s"]
    result = CliRunner().invoke(main, [*args, "--manifests-dir", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "1 file(s) skipped" in result.output and "loop.jpg" in result.output
    assert (tmp_path / "m" / "s.csv").read_text().count("\n") == 3  # header and two rows


# ------------------------------------------------------------------ LDM training setting


def make_ldm_tree(data: Path) -> None:
    """A miniature of the authors' data/ folder for the LDM setting (names as in their lists)."""
    touch(
        data,
        # fakes: every file in every folder of each split, whatever its extension
        "latent_diffusion_trainingset/train/bedroom/f1.png",
        "latent_diffusion_trainingset/train/bedroom/f2.jpg",
        "latent_diffusion_trainingset/train/coco/f3.PNG",
        "latent_diffusion_trainingset/train/coco/.DS_Store",  # hidden: skipped
        "latent_diffusion_trainingset/train/empty/.keep",  # a folder with no visible file adds nothing
        "latent_diffusion_trainingset/valid/bedroom/v1.png",
        # LSUN reals come from ProGAN's *training* folders, for both splits
        "train/airplane/0_real/00001.png",
        "train/airplane/0_real/00002.png",
        "train/cat/0_real/00007.png",
        "val/cat/0_real/00007.png",  # never read: the LDM valid split uses train/ too
        # COCO reals: train2014 first, else val2014
        "coco/train2014/COCO_train2014_000000000009.jpg",
        "coco/val2014/COCO_val2014_000000000042.jpg",
        "coco/val2014/COCO_val2014_000000000009.jpg",  # shadowed by the train2014 file
    )
    split = data / "latent_diffusion_trainingset"
    (split / "train/real_lsun.txt").write_text("airplane_00001.png\ncat_00007.png\n\n")
    (split / "train/real_coco.txt").write_text("000000000009.jpg\n000000000042.jpg\n")
    (split / "valid/real_lsun.txt").write_text("airplane_00002.png\r\ncat_00007.png\r\n")
    (split / "valid/real_coco.txt").write_text("000000000042.jpg\n")


def build_ldm(data: Path, layout: str, **roots: Path) -> Manifest:
    options = {"progan_root": data, "coco_root": data / "coco", **roots}
    return build_manifest(layout, data / "latent_diffusion_trainingset", layout, **options)


def test_ldm_train_lists_every_fake_and_the_listed_reals(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_ldm_tree(data)
    manifest = build_ldm(data, "ldm-train")
    assert manifest.data_root == data.resolve()
    assert rows_of(manifest) == [
        ("coco/train2014/COCO_train2014_000000000009.jpg", 0, "ldm", None),
        ("coco/val2014/COCO_val2014_000000000042.jpg", 0, "ldm", None),
        ("latent_diffusion_trainingset/train/bedroom/f1.png", 1, "ldm", None),
        ("latent_diffusion_trainingset/train/bedroom/f2.jpg", 1, "ldm", None),
        ("latent_diffusion_trainingset/train/coco/f3.PNG", 1, "ldm", None),
        ("train/airplane/0_real/00001.png", 0, "ldm", None),
        ("train/cat/0_real/00007.png", 0, "ldm", None),
    ]
    for index in range(len(manifest)):
        assert manifest.resolve(index).is_file()
    assert manifest.layout == "ldm-train"
    assert manifest.options["progan_root"] == str(data.resolve())
    assert manifest.options["coco_root"] == str((data / "coco").resolve())
    csv_path = tmp_path / "manifests" / "ldm-train.csv"
    write_manifest(manifest, csv_path)
    assert read_manifest(csv_path) == manifest


def test_ldm_val_reads_the_valid_folder_and_lsun_reals_from_progan_train(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_ldm_tree(data)
    assert rows_of(build_ldm(data, "ldm-val")) == [
        ("coco/val2014/COCO_val2014_000000000042.jpg", 0, "ldm", None),
        ("latent_diffusion_trainingset/valid/bedroom/v1.png", 1, "ldm", None),
        ("train/airplane/0_real/00002.png", 0, "ldm", None),
        ("train/cat/0_real/00007.png", 0, "ldm", None),
    ]


def test_ldm_roots_in_separate_places_share_their_common_parent(tmp_path: Path) -> None:
    make_ldm_tree(tmp_path / "all")
    progan, coco = tmp_path / "disk1" / "CNNDetection", tmp_path / "disk2" / "coco"
    progan.mkdir(parents=True)
    coco.parent.mkdir()
    (tmp_path / "all" / "train").rename(progan / "train")
    (tmp_path / "all" / "coco").rename(coco)
    manifest = build_manifest(
        "ldm-val", tmp_path / "all" / "latent_diffusion_trainingset", "v", progan_root=progan, coco_root=coco
    )
    assert manifest.data_root == tmp_path.resolve()
    assert [r.path for r in manifest.rows if r.label == 0] == [
        "disk1/CNNDetection/train/airplane/0_real/00002.png",
        "disk1/CNNDetection/train/cat/0_real/00007.png",
        "disk2/coco/val2014/COCO_val2014_000000000042.jpg",
    ]


def test_ldm_errors_name_the_missing_folder_file_or_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_ldm_tree(data)
    split = data / "latent_diffusion_trainingset"
    with pytest.raises(ValueError, match=r"layout 'ldm-train' needs progan_root \(CNNDetection's root"):
        build_manifest("ldm-train", split, "s", coco_root=data / "coco")
    with pytest.raises(ValueError, match="layout 'ldm-train' needs coco_root"):
        build_manifest("ldm-train", split, "s", progan_root=data)
    with pytest.raises(ValueError, match="layout 'folder' does not take coco_root"):
        build_manifest("folder", data, "s", coco_root=data)
    with pytest.raises(ValueError, match="layout 'ldm-val' does not take classes"):
        build_ldm(data, "ldm-val", classes=["cat"])
    with pytest.raises(ManifestError, match="coco_root is not a folder"):
        build_ldm(data, "ldm-train", coco_root=data / "nowhere")

    (split / "valid/real_coco.txt").write_text("000000000042.jpg\n000000000077.jpg\n")
    with pytest.raises(ManifestError) as caught:
        build_ldm(data, "ldm-val")
    assert "1 real images listed in" in str(caught.value)
    assert str((data / "coco/val2014/COCO_val2014_000000000077.jpg").resolve()) in str(caught.value)
    (split / "valid/real_coco.txt").unlink()
    with pytest.raises(ManifestError, match=r"valid/real_coco.txt: no such file"):
        build_ldm(data, "ldm-val")

    (split / "train/real_lsun.txt").write_text("airplane_00001.png\nairplane00002.png\n")
    with pytest.raises(
        ManifestError, match=r"train/real_lsun.txt line 2: expected <class>_<file>, got 'airplane00002.png'"
    ):
        build_ldm(data, "ldm-train")
    (split / "train/real_lsun.txt").write_text("airplane_00001.png\nairplane_00001.png\n")
    with pytest.raises(ManifestError, match="00001.png: listed twice"):
        build_ldm(data, "ldm-train")

    touch(split, "train/bedroom/nested/x.png")
    with pytest.raises(ManifestError, match="nested: a folder where only image files are expected"):
        build_ldm(data, "ldm-train")
    for folder in ("train/bedroom", "train/coco"):
        shutil.rmtree(split / folder)
        (split / folder).mkdir()
    with pytest.raises(ManifestError, match="no files in any of its folders"):
        build_ldm(data, "ldm-train")
    (split / "valid").rename(split / "validation")
    with pytest.raises(ManifestError, match=r"no folder valid/ under .*latent_diffusion_trainingset"):
        build_ldm(data, "ldm-val")
