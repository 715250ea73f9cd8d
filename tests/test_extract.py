"""Stage one: the loop and its parts on fakes (milliseconds), then end to end with the tiny CLIP.

End to end: an evaluation store against the backbone run here by hand, resume
after kill -9 bit-identical to an uninterrupted run, refusal of stores built
from other inputs, and awkward files recorded in place.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

from conftest import TINY_CLIP, make_folder_dataset, throttled_environment, write_image
from pipeline import cache
from pipeline.cli import main
from pipeline.features import (
    Backbone,
    BackboneConfig,
    Manifest,
    ManifestRow,
    augment,
    build_manifest,
    images,
    read_manifest,
    write_manifest,
)
from pipeline.features.distribute import pending_targets
from pipeline.features.extract import prepare_store, run_extract
from pipeline.features.loop import (
    PERTURB_STREAM,
    BatchWork,
    FinishedShard,
    ImageSource,
    PixelBatch,
    PixelRecipe,
    ShardCommitter,
    ShardJob,
    extract_shards,
    plan_batches,
)
from pipeline.features.options import BadImageStop, ExtractConfig, ExtractError, OptionError, variant_group_of
from pipeline.names import DEFAULT_MAX_PIXELS, PERTURBATIONS, TAPS
from pipeline.variants import VariantGroup, VariantSpec, ten_crop_variants

CROP = 32  # TINY_CLIP image_size


# ---------------------------------------------------------------- helpers


def cpu_config(model: Path) -> BackboneConfig:
    return BackboneConfig(model=str(model), device="cpu", dtype="float32")


def extract_config(model: Path, manifest: Path, cache_dir: Path, **changes: object) -> ExtractConfig:
    config = ExtractConfig(
        split=manifest.stem,
        manifest=manifest,
        backbone=cpu_config(model),
        cache_dir=cache_dir,
        batch_size=4,
        shard_rows=8,
        chunk_rows=4,
        progress=False,
    )
    return replace(config, **changes)


def folder_manifest(root: Path, split: str, manifests: Path) -> Path:
    path = manifests / f"{split}.csv"
    write_manifest(build_manifest("folder", root, split), path)
    return path


def write_images(root: Path, sizes: list[tuple[int, int]], seed: int = 0) -> None:
    """root/set/{0_real,1_fake}/img_XX.png alternating labels, sizes (width, height) as given."""
    for i, size in enumerate(sizes):
        folder = ("0_real", "1_fake")[i % 2]
        write_image(root / "set" / folder / f"img_{i:02d}.png", size, seed * 100 + i)


def tokens_by_hand(model: Path, pixels: list[np.ndarray], tap: str = "ln2") -> np.ndarray:
    """Float32 CLS tokens of each crop, one forward pass per crop, blocks all."""
    backbone = Backbone(cpu_config(model))
    return np.concatenate([backbone.forward_taps(p[None], [tap])[tap].numpy() for p in pixels])


def assert_fp16_equal(stored: np.ndarray, expected32: np.ndarray) -> None:
    """Stored float16 equals the float32 reference cast to float16, up to one float16 step.

    (Batched and single-image forward passes may differ in the last float32 bits,
    which can move a value across a float16 rounding boundary.)
    """
    assert stored.dtype == np.float16 and stored.shape == expected32.shape
    expected = expected32.astype(np.float16)
    step = np.maximum(np.spacing(np.abs(expected)), np.spacing(np.abs(stored))).astype(np.float32)
    diff = np.abs(stored.astype(np.float32) - expected.astype(np.float32))
    assert np.all(diff <= step), f"max difference {diff.max()} over float16 steps {step[diff > step][:5]}"
    assert np.abs(expected).max() > 0.1


def read_zarr(store: Path, name: str) -> np.ndarray:
    return zarr.open_array(store / name, mode="r")[...]


def resolve_rows(manifest: Path) -> list[Path]:
    loaded = read_manifest(manifest)
    return [loaded.resolve(i) for i in range(len(loaded))]


# ---------------------------------------------------------------- the loop, on fakes


def fake_pixels(row: int, variant: str, crop: int = 2) -> np.ndarray:
    """A (crop, crop, 3) image whose values say which row and variant it is."""
    return np.full((crop, crop, 3), (row * 10 + int(variant[-1])) % 256, dtype=np.uint8)


class FakeSource:
    """Pixels made from (row, variant); rows in ``bad`` fail like undecodable files."""

    def __init__(self, bad: dict[int, str] | None = None) -> None:
        self.bad = bad or {}

    def batches(self, work):
        for item in work:
            rows = item.rows.tolist()
            pixels = {name: np.stack([fake_pixels(r, name) for r in rows]) for name in item.recipe.names}
            valid = np.array([r not in self.bad for r in rows])
            for i, row in enumerate(rows):
                if row in self.bad:
                    for array in pixels.values():
                        array[i] = 0
            yield PixelBatch(item, pixels, valid, tuple(self.bad.get(r, "") for r in rows), decode_seconds=0.001)


def fake_step(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Two taps of (B, 2, 3) 'tokens' computed from the pixels, +1 so that zeroed rows show."""
    first = pixels[:, 0, 0, :].astype(np.float16) + 1
    return {"ln2": np.stack([first, 2 * first], axis=1), "hidden": np.stack([-first, first], axis=1)}


class RecordingCommitter:
    def __init__(self, blocks_for: float = 0.0) -> None:
        self.shards: list[FinishedShard] = []
        self.closed = False
        self.seconds = 0.25
        self.blocks_for = blocks_for  # seconds each submit and the close keep the loop waiting

    def submit(self, finished: FinishedShard) -> None:
        assert not self.closed
        time.sleep(self.blocks_for)
        self.shards.append(finished)

    def close(self) -> None:
        time.sleep(self.blocks_for)
        self.closed = True


def two_view_work(n_rows: int = 10, shard_rows: int = 6, batch_size: int = 4) -> list[BatchWork]:
    recipe = PixelRecipe((VariantSpec.train_view(0), VariantSpec.train_view(1)), crop=2)
    return plan_batches(
        dict.fromkeys(range(cache.shard_count(n_rows, shard_rows)), recipe), n_rows, shard_rows, batch_size
    )


def test_plan_batches_cuts_each_shard_into_batches_and_marks_its_last() -> None:
    recipe = PixelRecipe((VariantSpec.center(),), crop=2)
    work = plan_batches({2: recipe, 0: recipe}, n_rows=14, shard_rows=6, batch_size=4)
    assert [(w.shard, w.rows.tolist(), w.closes_shard) for w in work] == [
        (0, [0, 1, 2, 3], False),
        (0, [4, 5], True),
        (2, [12, 13], True),
    ]
    assert all(w.recipe is recipe for w in work)


def test_extract_shards_commits_each_shard_whole_with_invalid_rows_zeroed() -> None:
    committer, progress = RecordingCommitter(), []
    times = extract_shards(two_view_work(), FakeSource({7: "file is empty (0 bytes)"}), fake_step, committer,
                           progress=progress.append)  # fmt: skip

    assert committer.closed and progress == [4, 2, 4]
    assert [s.shard for s in committer.shards] == [0, 1]
    second = committer.shards[1]
    assert second.valid.tolist() == [True, False, True, True]
    assert second.errors == ("", "file is empty (0 bytes)", "", "")
    for finished, rows in zip(committer.shards, (range(0, 6), range(6, 10))):
        assert set(finished.features) == {(tap, view) for tap in ("ln2", "hidden") for view in ("view_000", "view_001")}
        for (tap, variant), tokens in finished.features.items():
            expected = fake_step(np.stack([fake_pixels(r, variant) for r in rows]))[tap]
            expected[~finished.valid] = 0
            np.testing.assert_array_equal(tokens, expected, err_msg=f"{tap} {variant}")
    assert not second.features[("ln2", "view_000")][1].any()
    assert times.write == 0.25 and times.decode == pytest.approx(0.003) and times.wall >= times.backbone > 0


def test_extract_shards_counts_the_time_the_loop_waits_for_the_committer() -> None:
    quick = extract_shards(two_view_work(), FakeSource({}), fake_step, RecordingCommitter())
    blocked = extract_shards(two_view_work(), FakeSource({}), fake_step, RecordingCommitter(blocks_for=0.05))

    assert quick.wait_for_writes < 0.05
    assert 0.15 <= blocked.wait_for_writes <= blocked.wall  # two submits and the close


def test_fail_fast_stops_before_the_shard_holding_a_bad_image() -> None:
    committer = RecordingCommitter()
    with pytest.raises(BadImageStop) as caught:
        extract_shards(two_view_work(), FakeSource({7: "truncated image data"}), fake_step, committer, fail_fast=True)
    assert (caught.value.row, caught.value.reason) == (7, "truncated image data")
    assert [s.shard for s in committer.shards] == [0] and committer.closed


def test_the_committer_is_closed_when_the_step_fails() -> None:
    committer = RecordingCommitter()

    def failing_step(pixels: np.ndarray) -> dict[str, np.ndarray]:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        extract_shards(two_view_work(), FakeSource(), failing_step, committer)
    assert committer.closed and committer.shards == []


def test_work_that_leaves_a_shard_open_is_refused() -> None:
    work = [w for w in two_view_work() if w.rows.tolist() != [4, 5]]  # shard 0 never closed
    with pytest.raises(ValueError, match="shard 0's work ended without a batch that closes it"):
        extract_shards(work, FakeSource(), fake_step, RecordingCommitter())


# ---------------------------------------------------------------- pixel recipes and the image source


def test_recipe_gives_each_kind_the_authors_pixels() -> None:
    image = np.random.default_rng(0).integers(0, 256, (45, 38, 3), dtype=np.uint8)
    variants = (
        VariantSpec.center(),
        VariantSpec.train_view(2),
        VariantSpec.ten_crop(7),
        VariantSpec.perturbed("jpeg", "paper"),
        VariantSpec.format_aligned(90),
    )
    pixels = PixelRecipe(variants, CROP, seed=11)(image, 5)
    assert list(pixels) == ["center", "view_002", "tencrop_7", "jpeg-paper", "format-align-q90"]
    np.testing.assert_array_equal(pixels["center"], images.center_crop(image, CROP))
    np.testing.assert_array_equal(
        pixels["view_002"], augment.augment_train_view(image, CROP, augment.view_rng(11, 5, 2))
    )
    np.testing.assert_array_equal(pixels["tencrop_7"], images.ten_crop(image, CROP)[7])
    stream = PERTURB_STREAM + PERTURBATIONS.index("jpeg")
    perturbed = augment.perturb_image(image, "jpeg", "paper", augment.view_rng(11, 5, stream))
    np.testing.assert_array_equal(pixels["jpeg-paper"], images.center_crop(perturbed, CROP))
    reencoded = np.asarray(Image.open(io.BytesIO(augment.format_align_bytes(image, 90))).convert("RGB"))
    np.testing.assert_array_equal(pixels["format-align-q90"], images.center_crop(reencoded, CROP))


def test_perturbed_rows_differ_from_center_only_where_the_draw_perturbs() -> None:
    image = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    recipe = PixelRecipe((VariantSpec.center(), VariantSpec.perturbed("blur", "official")), CROP, seed=4)
    stream = PERTURB_STREAM + PERTURBATIONS.index("blur")
    untouched = [row for row in range(12) if augment.view_rng(4, row, stream).random() >= 0.5]
    assert 0 < len(untouched) < 12
    for row in range(12):
        pixels = recipe(image, row)
        assert np.array_equal(pixels["blur-official"], pixels["center"]) == (row in untouched), row


def test_training_views_are_seeded_by_seed_row_and_view() -> None:
    image = np.random.default_rng(2).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    recipe = PixelRecipe(tuple(VariantSpec.train_view(v) for v in range(3)), CROP, seed=11)
    first, again = recipe(image, 3), recipe(image, 3)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["view_000"], first["view_001"])
    assert not np.array_equal(first["view_000"], recipe(image, 4)["view_000"])
    other_seed = PixelRecipe(recipe.variants, CROP, seed=12)(image, 3)
    assert not np.array_equal(first["view_000"], other_seed["view_000"])


def test_ten_crops_are_cut_once_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = images.ten_crop

    def counting(image: np.ndarray, size: int) -> np.ndarray:
        calls.append(image.shape)
        return original(image, size)

    monkeypatch.setattr(images, "ten_crop", counting)
    image = np.random.default_rng(3).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    pixels = PixelRecipe(ten_crop_variants(), CROP)(image, 0)
    assert calls == [(64, 48, 3)]
    np.testing.assert_array_equal(np.stack(list(pixels.values())), original(image, CROP))


def test_image_source_decodes_each_image_once_in_order_and_records_bad_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [write_image(tmp_path / f"img_{i}.png", (40 + i, 36), seed=i) for i in range(7)]
    files[3].write_bytes(b"")
    files[5] = tmp_path / "gone.png"
    decoded = []
    original = images.decoded_image

    def counting(path: Path, max_pixels: int):
        decoded.append(path)
        return original(path, max_pixels)

    monkeypatch.setattr(images, "decoded_image", counting)
    recipe = PixelRecipe((VariantSpec.center(), *ten_crop_variants()), CROP)
    work = plan_batches({0: recipe, 1: recipe}, n_rows=7, shard_rows=4, batch_size=2)
    source = ImageSource(lambda row: files[row], DEFAULT_MAX_PIXELS, workers=2)
    batches = list(source.batches(work))

    assert [b.work.rows.tolist() for b in batches] == [[0, 1], [2, 3], [4, 5], [6]]
    assert sorted(decoded, key=str) == sorted(files, key=str)  # each file decoded once, for 11 variants
    valid = np.concatenate([b.valid for b in batches])
    errors = [e for b in batches for e in b.errors]
    assert valid.tolist() == [True, True, True, False, True, False, True]
    assert errors[3] == "file is empty (0 bytes)" and errors[5] == "missing file"
    for batch in batches:
        for i, row in enumerate(batch.work.rows.tolist()):
            if batch.valid[i]:
                expected = recipe(np.asarray(Image.open(files[row]).convert("RGB")), row)
                for name in recipe.names:
                    np.testing.assert_array_equal(batch.pixels[name][i], expected[name])
            else:
                assert not any(batch.pixels[name][i].any() for name in recipe.names)


# ---------------------------------------------------------------- config, stores and commits, without a backbone


def test_config_errors_are_refused(tmp_path: Path) -> None:
    config = ExtractConfig(
        split="val", manifest=tmp_path / "val.csv", cache_dir=tmp_path / "cache", shard_rows=8, chunk_rows=4
    )
    config.validate()
    bad = {
        "taps must be a non-empty subset": replace(config, taps=("ln2", "mlp")),
        "exactly one --tap": replace(config, out=tmp_path / "x.zarr", taps=("ln2", "hidden")),
        "--chunk-rows 4 must divide --shard-rows 6 .*e.g. --chunk-rows 2": replace(config, shard_rows=6),
        "--chunk-rows 16 must divide --shard-rows 8": replace(config, chunk_rows=16),
        "must be at least 1": replace(config, chunk_rows=0),
        "unknown store dtype 'int8'": replace(config, store_dtype="int8"),
    }
    for text, changed in bad.items():
        with pytest.raises(ExtractError, match=text):
            changed.validate()
        with pytest.raises(ExtractError, match=text):
            run_extract(changed)  # before reading the manifest or loading anything
    assert not (tmp_path / "cache").exists()


def test_options_that_do_not_fit_together_are_refused_naming_the_option() -> None:
    bad = {
        "not a training split; add --augment": dict(views=2),
        "unknown perturbation 'rain'": dict(perturbation="rain"),
        "unknown perturbation preset 'custom'": dict(perturbation="jpeg", preset="custom"),
        "perturbations are for evaluation splits": dict(augment=True, perturbation="jpeg"),
        "a JPEG quality is in 1..100": dict(perturbation="format-align", align_quality=0),
        "--crop tencrop is an evaluation crop": dict(crop="tencrop", augment=True),
        "not with --perturb": dict(crop="tencrop", perturbation="blur"),
    }
    for text, options in bad.items():
        with pytest.raises(OptionError, match=text):
            variant_group_of("val", **options)


@pytest.mark.parametrize(
    "split, options, expected",
    [
        ("test", {}, ["center"]),
        ("test", {"crop": "tencrop"}, [f"tencrop_{i}" for i in range(10)]),
        ("test", {"perturbation": "crop", "preset": "paper"}, ["crop-paper"]),
        ("test", {"perturbation": "format-align", "align_quality": 80}, ["format-align-q80"]),
        ("train_4class", {"views": 3}, ["view_000", "view_001", "view_002"]),
        ("test", {"augment": True}, ["view_000"]),
        ("train", {"augment": False}, ["center"]),
    ],
)
def test_the_variant_group_follows_the_split_and_options(tmp_path: Path, split, options, expected) -> None:
    group = variant_group_of(split, **options)
    config = ExtractConfig(split=split, manifest=tmp_path / "m.csv", variant_group=group)
    assert [v.name for v in config.variants()] == expected
    assert config.is_training() == expected[0].startswith("view_")
    default = ExtractConfig(split=split, manifest=tmp_path / "m.csv")  # no group: by the split's name
    assert default.is_training() == split.startswith("train")


def fake_backbone() -> SimpleNamespace:
    """What prepare_store reads from a backbone."""
    return SimpleNamespace(revision="r1", model_config="{}", block_indices=(0, 1), dim=3, crop_size=CROP,
                           mean=(0.5,) * 3, std=(0.25,) * 3, dtype=torch.float32, n_layers=2, token="cls",
                           embedding_dim=0)  # fmt: skip


def test_a_new_variant_joins_an_existing_store_and_only_it_is_pending(tmp_path: Path) -> None:
    manifest_file = tmp_path / "test.csv"
    write_manifest(
        Manifest("test", tuple(ManifestRow(f"{i}.png", i % 2, "d") for i in range(10)), tmp_path), manifest_file
    )
    manifest = read_manifest(manifest_file)
    config = ExtractConfig(
        split="test", manifest=manifest_file, cache_dir=tmp_path / "cache", shard_rows=4, chunk_rows=2
    )
    stores = {
        tap: prepare_store(replace(config, taps=(tap,)), manifest, fake_backbone(), tap, config.variants())
        for tap in TAPS
    }
    assert stores["hidden"] == tmp_path / "cache" / config.backbone.model.replace("/", "--") / "hidden" / "test.zarr"
    both = {tap: ("center",) for tap in TAPS}
    assert pending_targets(stores, both) == {shard: both for shard in range(3)}
    jobs = {shard: ShardJob(both) for shard in range(3)}
    committer = ShardCommitter(stores, jobs)
    for shard in range(3):
        n = cache.shard_bounds(shard, 10, 4)[1] - shard * 4
        features = {(tap, "center"): np.full((n, 2, 3), shard + (tap == "hidden") * 10, np.float16) for tap in TAPS}
        committer.submit(FinishedShard(shard, features, np.ones(n, bool), ("",) * n))
    committer.close()
    assert committer.seconds > 0 and committer.committed == [0, 1, 2]
    for tap in TAPS:
        expected = np.array([0] * 4 + [1] * 4 + [2] * 2) + (tap == "hidden") * 10
        np.testing.assert_array_equal(cache.read_features(stores[tap], "center")[:, 0, 0], expected)

    jpeg = replace(config, variant_group=VariantGroup.perturbed("jpeg", "official"))
    path = prepare_store(jpeg, manifest, fake_backbone(), "ln2", jpeg.variants())
    assert path == stores["ln2"]
    info = cache.open_store_info(path)
    assert list(info.variants) == ["center", "jpeg-official"] and info.complete_variants == ("center",)
    assert pending_targets({"ln2": path}, {"ln2": ("center", "jpeg-official")}) == {
        shard: {"ln2": ("jpeg-official",)} for shard in range(3)
    }
    cache.commit_shard(path, 1, {"jpeg-official": np.ones((4, 2, 3), np.float16)}, np.ones(4, bool), [""] * 4)
    assert sorted(pending_targets({"ln2": path}, {"ln2": ("jpeg-official",)})) == [0, 2]
    assert pending_targets(stores, both) == {}


# ---------------------------------------------------------------- evaluation store


@pytest.fixture(scope="module")
def eval_run(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An evaluation split of 11 rows with classes (hand-written manifest), extracted once."""
    base = tmp_path_factory.mktemp("eval")
    root = base / "data"
    sizes = [
        (40, 36),
        (28, 30),
        (33, 50),
        (32, 32),
        (64, 20),
        (41, 41),
        (40, 36),
        (17, 60),
        (36, 40),
        (50, 50),
        (35, 33),
    ]
    write_images(root, sizes, seed=1)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    classes = ["cat", "dog", ""] * 4
    lines = ["path,label,dataset,class"]
    for i, name in enumerate(files):
        lines.append(f"{name},{int('1_fake' in name)},{'gan' if i < 6 else 'diffusion'},{classes[i]}")
    manifest = base / "manifests" / "val.csv"
    manifest.parent.mkdir()
    manifest.write_text("\n".join(lines) + "\n")
    manifest.with_suffix(".json").write_text(json.dumps({"data_root": str(root)}))
    config = extract_config(tiny_clip_dir, manifest, base / "cache")
    summary = run_extract(config)
    return {"config": config, "summary": summary, "files": files, "classes": classes[: len(files)], "root": root}


def test_store_rows_align_with_manifest(eval_run: dict) -> None:
    summary, files, root = eval_run["summary"], eval_run["files"], eval_run["root"]
    store = summary.stores["ln2"]
    assert store == eval_run["config"].cache_dir / eval_run["config"].backbone.model.split("/")[-1] / "ln2" / "val.zarr"
    assert (summary.n_rows, summary.shards_done, summary.shards_skipped, summary.images_processed) == (11, 2, 0, 11)
    assert summary.failures == ()
    rows = cache.read_rows(store)
    assert list(rows.paths) == files
    np.testing.assert_array_equal(rows.labels, [int("1_fake" in f) for f in files])
    assert list(rows.datasets) == ["gan"] * 6 + ["diffusion"] * 5
    assert list(rows.classes) == eval_run["classes"]
    assert rows.valid.all() and set(rows.errors) == {""}
    info = cache.open_store_info(store)
    assert info.split == "val" and info.attrs["training"] is False
    assert info.identity.tap == "ln2" and info.identity.block_indices == (0, 1, 2)
    assert (info.identity.dim, info.identity.crop_size, info.identity.shard_rows, info.identity.chunk_rows) == (
        32,
        32,
        8,
        4,
    )
    assert info.attrs["data_root"] == str(root)
    assert list(info.variants) == ["center"] and info.complete_variants == ("center",)


def test_center_features_equal_backbone_on_center_crop(eval_run: dict, tiny_clip_dir: Path) -> None:
    store = eval_run["summary"].stores["ln2"]
    files, root = eval_run["files"], eval_run["root"]
    crops = []
    for name in files:
        pixels = np.asarray(Image.open(root / name).convert("RGB"))
        crops.append(images.center_crop(pixels, CROP))
    # The 28x30 image is zero-padded by 1 row above and below, 2 columns left and right.
    k = files.index("set/1_fake/img_01.png")
    small = np.asarray(Image.open(root / files[k]).convert("RGB"))
    assert small.shape == (30, 28, 3)
    assert not crops[k][[0, 31]].any() and not crops[k][:, [0, 1, 30, 31]].any()
    np.testing.assert_array_equal(crops[k][1:31, 2:30], small)
    expected = tokens_by_hand(tiny_clip_dir, crops)
    stored = cache.read_features(store, "center")
    assert stored.shape == (11, 3, 32)
    assert_fp16_equal(stored, expected)
    np.testing.assert_array_equal(read_zarr(store, "features/center"), stored)


def test_rerun_skips_every_shard_without_backbone_work(eval_run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    store = eval_run["summary"].stores["ln2"]
    before = read_zarr(store, "features/center")
    calls = []
    original = Backbone.forward_taps

    def counting(self, pixels, taps):
        calls.append(len(pixels))
        return original(self, pixels, taps)

    monkeypatch.setattr(Backbone, "forward_taps", counting)
    summary = run_extract(eval_run["config"])
    assert calls == []
    assert (summary.shards_done, summary.shards_skipped, summary.images_processed) == (0, 2, 0)
    np.testing.assert_array_equal(read_zarr(store, "features/center"), before)


# ---------------------------------------------------------------- resume after kill -9

KILL_SHARDS = 11  # 41 rows in shards of 4
KILL_VARIANTS = ("view_000", "view_001")


def kill_args(model: Path, manifest: Path, out: Path) -> list[str]:
    return [
        "extract",
        "--split",
        "train",
        "--manifest",
        str(manifest),
        "--model",
        str(model),
        "--out",
        str(out),
        "--shard-rows",
        "4",
        "--chunk-rows",
        "2",
        "--batch-size",
        "2",
        "--views",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]


def shards_done(store: Path, variant: str) -> int | None:
    """Committed shards of a variant, None while the store has no such progress array."""
    if not (store / "progress" / variant / "zarr.json").is_file():
        return None
    return int(np.count_nonzero(zarr.open_array(store / "progress" / variant, mode="r")[...]))


@pytest.fixture(scope="module")
def kill_setup(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """41 training images (one empty file among them), an uninterrupted CLI run, and two killed ones.

    Both killed runs are real ``python -m pipeline extract`` processes started
    together; a sitecustomize on their PYTHONPATH slows each backbone call so
    that the kill lands where the test wants it.
    """
    base = tmp_path_factory.mktemp("kill")
    root = make_folder_dataset(base / "data", n_per_label=10, seed=3)
    (root / "a" / "1_fake" / "zz_empty.png").write_bytes(b"")
    manifest = folder_manifest(root, "train", base / "manifests")

    def start(name: str, delay: float) -> tuple[subprocess.Popen, Path]:
        out = base / f"{name}.zarr"
        env = throttled_environment(base / "throttle", delay)
        with open(base / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", *kill_args(tiny_clip_dir, manifest, out)],
                cwd=base,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return process, out

    # mid: kill once a shard (not all) of the last view is committed; early: once the
    # store and its progress arrays exist but no shard is committed (each call sleeps 0.5 s).
    children = {"mid": start("mid", 0.03), "early": start("early", 0.5)}
    try:
        reference = base / "reference.zarr"
        result = CliRunner().invoke(main, kill_args(tiny_clip_dir, manifest, reference))
        assert result.exit_code == 0, result.output
        seen = kill_at_checkpoints(children, base)
    finally:
        for process, _ in children.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    assert len(seen) == len(children), f"timed out waiting for the runs to reach their kill points: {seen}"
    return {"manifest": manifest, "reference": reference, "children": {n: out for n, (_, out) in children.items()}}


def kill_at_checkpoints(children: dict[str, tuple[subprocess.Popen, Path]], logs: Path) -> dict[str, int]:
    """SIGKILL each child at its point; the committed shard count of each when killed."""
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 120
    while len(seen) < len(children) and time.monotonic() < deadline:
        for name, (process, out) in children.items():
            if name in seen:
                continue
            done = shards_done(out, KILL_VARIANTS[-1])
            if done is not None and (done >= 1 if name == "mid" else done == 0):
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                seen[name] = done
            elif process.poll() is not None:
                pytest.fail(
                    f"{name} run ended (status {process.returncode}) before it could be killed:\n"
                    + (logs / f"{name}.log").read_text()
                )
        time.sleep(0.005)
    return seen


def assert_stores_identical(store: Path, reference: Path) -> None:
    for name in ("labels", "paths", "dataset", "valid", "error", *(f"features/{v}" for v in KILL_VARIANTS)):
        got, want = read_zarr(store, name), read_zarr(reference, name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    for variant in KILL_VARIANTS:
        np.testing.assert_array_equal(cache.read_features(store, variant), cache.read_features(reference, variant))
        assert cache.pending_shards(store, variant) == []


def resume(model: Path, setup: dict, name: str) -> str:
    result = CliRunner().invoke(main, kill_args(model, setup["manifest"], setup["children"][name]))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_reference_run_is_complete_and_records_the_empty_file(kill_setup: dict) -> None:
    reference = kill_setup["reference"]
    rows = cache.read_rows(reference)
    assert len(rows) == 41
    bad = np.flatnonzero(~rows.valid)
    assert [rows.paths[i] for i in bad] == ["a/1_fake/zz_empty.png"]
    assert rows.errors[bad[0]] == "file is empty (0 bytes)"
    for variant in KILL_VARIANTS:
        features = cache.read_features(reference, variant)
        assert not features[bad].any() and np.all(np.abs(features[rows.valid]).max(axis=(1, 2)) > 0)


@pytest.mark.slow
def test_resume_after_kill_mid_run_matches_an_uninterrupted_run(kill_setup: dict, tiny_clip_dir: Path) -> None:
    store = kill_setup["children"]["mid"]
    done = [shards_done(store, v) for v in KILL_VARIANTS]
    assert 1 <= done[-1] and min(done) < KILL_SHARDS, f"kill did not land mid-run: {done}"
    output = resume(tiny_clip_dir, kill_setup, "mid")
    assert f"{KILL_SHARDS - min(done)} shards extracted, {min(done)} already done" in output
    assert_stores_identical(store, kill_setup["reference"])


@pytest.mark.slow
def test_resume_after_kill_before_any_shard_matches_an_uninterrupted_run(kill_setup: dict, tiny_clip_dir: Path) -> None:
    store = kill_setup["children"]["early"]
    assert [shards_done(store, v) for v in KILL_VARIANTS] == [0, 0]
    output = resume(tiny_clip_dir, kill_setup, "early")
    assert f"{KILL_SHARDS} shards extracted, 0 already done" in output
    assert_stores_identical(store, kill_setup["reference"])


# ---------------------------------------------------------------- refusing other inputs


@pytest.fixture()
def small_split(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_images(root, [(40, 36), (30, 44), (36, 36), (50, 40)], seed=4)
    return folder_manifest(root, "val", tmp_path / "manifests")


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("other-clip")
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).eval().save_pretrained(path)
    return path


def test_store_from_another_manifest_is_refused(tiny_clip_dir: Path, small_split: Path, tmp_path: Path) -> None:
    config = extract_config(tiny_clip_dir, small_split, tmp_path / "cache")
    store = run_extract(config).stores["ln2"]
    write_image(tmp_path / "data" / "set" / "0_real" / "img_99.png", (40, 36), seed=99)
    folder_manifest(tmp_path / "data", "val", tmp_path / "manifests")
    with pytest.raises(ExtractError) as caught:
        run_extract(config)
    message = str(caught.value)
    assert str(store) in message and "manifest_sha256: store has" in message
    assert "seed:" not in message and "model_id:" not in message and "--overwrite" in message

    summary = run_extract(replace(config, overwrite=True))
    assert summary.stores["ln2"] == store and summary.n_rows == 5 and summary.images_processed == 5
    assert len(cache.read_rows(store)) == 5


def test_store_from_another_model_tap_or_seed_is_refused_and_overwrite_rebuilds(
    tiny_clip_dir: Path, other_model_dir: Path, small_split: Path, tmp_path: Path
) -> None:
    out = tmp_path / "explicit.zarr"
    config = extract_config(tiny_clip_dir, small_split, tmp_path / "cache", out=out)
    run_extract(config)
    cases = {
        "model": (
            replace(config, backbone=cpu_config(other_model_dir)),
            ["model_id: store has", "model_revision: store has"],
        ),
        "tap": (replace(config, taps=("hidden",)), ["tap: store has 'ln2', asked for 'hidden'"]),
        "seed": (replace(config, seed=3), ["seed: store has 0, asked for 3"]),
        "blocks": (replace(config, block_selection="last:2"), ["block_indices: store has (0, 1, 2), asked for (1, 2)"]),
    }
    for name, (changed, expected) in cases.items():
        with pytest.raises(ExtractError) as caught:
            run_extract(changed)
        message = str(caught.value)
        for text in expected:
            assert text in message, (name, message)
        assert message.count(": store has") == len(expected), (name, message)

    rebuilt = run_extract(replace(config, backbone=cpu_config(other_model_dir), overwrite=True))
    assert rebuilt.stores["ln2"] == out and rebuilt.images_processed == 4
    assert cache.open_store_info(out).identity.model_id == str(other_model_dir)
    crops = [images.center_crop(np.asarray(Image.open(p).convert("RGB")), CROP) for p in resolve_rows(small_split)]
    assert_fp16_equal(cache.read_features(out, "center"), tokens_by_hand(other_model_dir, crops))


# ---------------------------------------------------------------- bad inputs


def save_png_16bit(path: Path, seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).integers(0, 65536, (36, 40), dtype=np.uint16)
    Image.fromarray(values).save(path)  # mode I;16
    return values


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One split holding every kind of awkward file, and the pixels we expect for the good ones."""
    base = tmp_path_factory.mktemp("corpus")
    real, fake = base / "data" / "set" / "0_real", base / "data" / "set" / "1_fake"
    real.mkdir(parents=True)
    fake.mkdir(parents=True)
    expected: dict[str, np.ndarray] = {}

    def rgb_of(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"))

    write_image(real / "plain.png", (40, 36), 1)
    expected["set/0_real/plain.png"] = rgb_of(real / "plain.png")
    write_image(real / "ünïcødé 图 name.png", (36, 40), 2)
    expected["set/0_real/ünïcødé 图 name.png"] = rgb_of(real / "ünïcødé 图 name.png")
    write_image(fake / "with  spaces.png", (40, 36), 3)
    expected["set/1_fake/with  spaces.png"] = rgb_of(fake / "with  spaces.png")
    write_image(real / "grey.png", (40, 36), 4, mode="L")
    grey = np.asarray(Image.open(real / "grey.png"))
    assert grey.ndim == 2
    expected["set/0_real/grey.png"] = np.repeat(grey[:, :, None], 3, axis=2)
    write_image(fake / "cmyk.jpg", (40, 36), 5, mode="CMYK")
    with Image.open(fake / "cmyk.jpg") as opened:
        assert opened.mode == "CMYK"
    expected["set/1_fake/cmyk.jpg"] = rgb_of(fake / "cmyk.jpg")
    wide = save_png_16bit(fake / "sixteen.png", 6)
    with Image.open(fake / "sixteen.png") as opened:
        assert opened.mode.startswith("I")
    expected["set/1_fake/sixteen.png"] = np.repeat((wide >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    palette = Image.fromarray(np.random.default_rng(7).integers(0, 256, (36, 40, 3), dtype=np.uint8)).convert("P")
    palette.save(fake / "palette.png", transparency=0)
    with Image.open(fake / "palette.png") as opened:
        assert opened.mode == "P" and "transparency" in opened.info
    expected["set/1_fake/palette.png"] = rgb_of(fake / "palette.png")
    write_image(real / "one.png", (1, 1), 8)
    expected["set/0_real/one.png"] = rgb_of(real / "one.png")

    (real / "empty.png").write_bytes(b"")
    write_image(fake / "truncated.png", (40, 36), 9)
    data = (fake / "truncated.png").read_bytes()
    (fake / "truncated.png").write_bytes(data[: len(data) // 2])
    (fake / "text.png").write_text("this is not an image\n")
    write_image(real / "huge.png", (120, 100), 10)  # 12000 pixels > max_pixels below
    bad = {
        "set/0_real/empty.png": "file is empty",
        "set/1_fake/truncated.png": "truncated",
        "set/1_fake/text.png": "not an image",
        "set/0_real/huge.png": "120x100 = 12000 pixels exceeds the limit of 5000",
        "set/1_fake/gone.png": "missing file",
    }
    built = build_manifest("folder", base / "data", "val")
    rows = built.rows + (ManifestRow("set/1_fake/gone.png", 1, "set"),)
    manifest_file = base / "manifests" / "val.csv"
    write_manifest(Manifest(split="val", rows=rows, data_root=built.data_root), manifest_file)
    assert {r.path for r in rows} == set(expected) | set(bad)
    return {"base": base, "manifest": manifest_file, "rows": rows, "expected": expected, "bad": bad}


def test_bad_inputs_are_recorded_in_place_and_good_ones_extracted(corpus: dict, tiny_clip_dir: Path) -> None:
    config = extract_config(
        tiny_clip_dir, corpus["manifest"], corpus["base"] / "cache", max_pixels=5000, batch_size=3, max_invalid=0.5
    )
    summary = run_extract(config)

    store = summary.stores["ln2"]
    rows = cache.read_rows(store)
    paths = [r.path for r in corpus["rows"]]
    assert list(rows.paths) == paths
    features = cache.read_features(store, "center")
    for i, path in enumerate(paths):
        if path in corpus["bad"]:
            assert not rows.valid[i], path
            assert corpus["bad"][path] in rows.errors[i], (path, rows.errors[i])
            assert not features[i].any(), path
        else:
            assert rows.valid[i] and rows.errors[i] == "", (path, rows.errors[i])
    assert dict(summary.failures).keys() == corpus["bad"].keys()
    for path, reason in summary.failures:
        assert corpus["bad"][path] in reason
    good = [i for i, p in enumerate(paths) if p not in corpus["bad"]]
    crops = [images.center_crop(corpus["expected"][paths[i]], CROP) for i in good]
    assert_fp16_equal(features[good], tokens_by_hand(tiny_clip_dir, crops))
    report = summary.report()
    assert "5 images could not be used" in report and "set/1_fake/gone.png: missing file" in report


def test_fail_fast_names_the_first_bad_file(corpus: dict, tiny_clip_dir: Path) -> None:
    config = extract_config(
        tiny_clip_dir, corpus["manifest"], corpus["base"] / "fail-fast", max_pixels=5000, fail_fast=True
    )
    first_bad = next(r.path for r in corpus["rows"] if r.path in corpus["bad"])
    with pytest.raises(ExtractError, match="--fail-fast") as caught:
        run_extract(config)
    assert str(caught.value).startswith(f"{first_bad}: {corpus['bad'][first_bad]}")


# ---------------------------------------------------------------- reliability (issue 12)


@pytest.fixture()
def small_run(tiny_clip_dir: Path, tmp_path: Path) -> dict:
    """12 images in shards of 4, extracted once."""
    root = make_folder_dataset(tmp_path / "data", n_per_label=3, seed=6)
    manifest = folder_manifest(root, "val", tmp_path / "manifests")
    config = extract_config(tiny_clip_dir, manifest, tmp_path / "cache", shard_rows=4, chunk_rows=2)
    summary = run_extract(config)
    store = summary.stores["ln2"]
    return {"config": config, "store": store, "features": cache.read_features(store, "center"), "root": root}


def test_a_flagged_shard_whose_file_is_lost_is_reported_and_re_extracted(small_run: dict) -> None:
    store = small_run["store"]
    (store / "features" / "center" / "c" / "1" / "0" / "0").unlink()
    (store / "valid" / "c" / "2").unlink()
    summary = run_extract(small_run["config"])
    report = summary.report()
    assert "re-extracting them" in report and "features/center shard 1: file" in report and "valid shard 2" in report
    assert (summary.shards_done, summary.shards_skipped) == (2, 1)
    np.testing.assert_array_equal(cache.read_features(store, "center"), small_run["features"])
    assert cache.verify_store(store) == []


def test_editing_the_local_models_config_then_resuming_is_refused(small_run: dict, tmp_path: Path) -> None:
    model = tmp_path / "model-copy"
    shutil.copytree(small_run["config"].backbone.model, model)
    config = replace(small_run["config"], backbone=replace(small_run["config"].backbone, model=str(model)),
                     out=tmp_path / "copy.zarr")  # fmt: skip
    run_extract(config)
    settings = json.loads((model / "config.json").read_text())
    settings["layer_norm_eps"] = 1e-3
    (model / "config.json").write_text(json.dumps(settings))
    with pytest.raises(ExtractError, match=r"model_config.layer_norm_eps: store has 1e-05, asked for 0.001"):
        run_extract(config)


def test_a_wrong_data_root_fails_the_run_and_retry_invalid_repairs_only_those_shards(
    small_run: dict, tmp_path: Path
) -> None:
    config = replace(small_run["config"], out=tmp_path / "wrong.zarr")
    result = CliRunner().invoke(main, cli_args(config, "--data-root", str(tmp_path / "nowhere")))
    assert result.exit_code == 2 and "nowhere' does not exist" in result.output  # caught before anything is done
    (tmp_path / "elsewhere").mkdir()
    result = CliRunner().invoke(main, cli_args(config, "--data-root", str(tmp_path / "elsewhere")))
    assert result.exit_code == 3, result.output
    assert "12 of 12 rows (100.0%) could not be decoded, more than --max-invalid 5.0%" in result.output
    rows = cache.read_rows(config.out)
    assert not rows.valid.any() and set(rows.errors) == {"missing file"}
    assert cache.open_store_info(config.out).complete_variants == ("center",)  # the store keeps what was done

    result = CliRunner().invoke(main, cli_args(config, "--data-root", str(small_run["root"]), "--retry-invalid"))
    assert result.exit_code == 0, result.output
    assert "retrying 12 invalid rows in 3 shard(s)" in result.output
    np.testing.assert_array_equal(cache.read_features(config.out, "center"), small_run["features"])
    assert cache.read_rows(config.out).valid.all()


def test_retry_invalid_rewrites_only_the_shards_holding_invalid_rows(small_run: dict) -> None:
    store, config = small_run["store"], small_run["config"]
    broken = small_run["root"] / "a" / "1_fake" / "img_001.png"  # row 4: shard 1
    saved = broken.read_bytes()
    broken.write_bytes(b"")
    config = replace(config, out=store.parent / "second.zarr", max_invalid=0.1)
    run_extract(config)
    assert list(np.flatnonzero(~cache.read_rows(config.out).valid)) == [4]
    untouched = {s: (config.out / "features" / "center" / "c" / str(s) / "0" / "0").stat().st_ino for s in (0, 2)}
    broken.write_bytes(saved)
    summary = run_extract(replace(config, retry_invalid=True))
    assert summary.shards_done == 1 and summary.n_invalid == 0
    assert {
        s: (config.out / "features" / "center" / "c" / str(s) / "0" / "0").stat().st_ino for s in (0, 2)
    } == untouched
    np.testing.assert_array_equal(cache.read_features(config.out, "center"), small_run["features"])


def cli_args(config: ExtractConfig, *extra: str) -> list[str]:
    return [
        "extract", "--split", config.split, "--manifest", str(config.manifest), "--model", config.backbone.model,
        "--out", str(config.out), "--shard-rows", str(config.shard_rows), "--chunk-rows", str(config.chunk_rows),
        "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def test_overwrite_of_a_folder_that_is_not_a_store_is_refused_and_the_photos_survive(
    small_run: dict, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    write_image(photos / "holiday.png", (20, 20), seed=1)
    before = (photos / "holiday.png").read_bytes()
    result = CliRunner().invoke(main, cli_args(replace(small_run["config"], out=photos), "--overwrite"))
    assert result.exit_code == 1 and "refusing to delete it" in result.output
    assert sorted(p.name for p in photos.iterdir()) == ["holiday.png"]
    assert (photos / "holiday.png").read_bytes() == before
    result = CliRunner().invoke(main, cli_args(replace(small_run["config"], out=small_run["store"]), "--overwrite"))
    assert result.exit_code == 0, result.output
    assert "3 shards extracted, 0 already done" in result.output


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (["--device", "tpu"], "--device"),
        (["--device", "meta"], "--device"),
        (["--split", "../evil"], "--split"),
        (["--seed", "-1"], "--seed"),
        (["--views", "3"], "not a training split"),
        (["--blocks", "last:9"], "--blocks"),
        (["--rank", "2", "--world-size", "2"], "--rank 2"),
        (["--rank", "1"], "--rank and --world-size go together"),
        (["--overwrite", "--rank", "0", "--world-size", "2"], "--overwrite"),
        (["--max-invalid", "1.5"], "--max-invalid"),
    ],
)
def test_every_bad_option_exits_2_before_any_store_exists(small_run: dict, tmp_path: Path, bad: list[str], says: str):
    config = replace(small_run["config"], out=tmp_path / "never.zarr")
    result = CliRunner().invoke(main, cli_args(config, *bad))
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert not config.out.exists()


def test_a_full_disk_or_read_only_output_is_an_error_naming_the_file(
    small_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for code, text in ((errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")):

        def refuse(fd: int, code: int = code, text: str = text) -> None:
            raise OSError(code, text)  # as the kernel reports a full or read-only disk when data reach it

        monkeypatch.setattr(os, "fsync", refuse)
        out = tmp_path / f"full-{code}.zarr"
        result = CliRunner().invoke(main, cli_args(replace(small_run["config"], out=out)))
        assert result.exit_code == 1, result.output
        assert f"cannot write ({text})" in result.output and "zarr.json" in result.output
        assert not out.exists()

        def refuse_replace(src: object, dst: object, code: int = code, text: str = text) -> None:
            raise OSError(code, text, str(dst))

        monkeypatch.undo()
        monkeypatch.setattr(os, "replace", refuse_replace)
        manifests = tmp_path / f"manifests-{code}"
        result = CliRunner().invoke(
            main,
            ["manifest", "--layout", "folder", "--root", str(small_run["root"]), "--split", "val",
             "--manifests-dir", str(manifests)],
        )  # fmt: skip
        assert result.exit_code == 1, result.output
        assert f"val.csv: cannot write ({text})" in result.output
        monkeypatch.undo()


def test_an_odd_file_name_is_recorded_and_the_manifest_goes_on(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "data", n_per_label=2, seed=7)
    write_image(root / "a" / "0_real" / "line\nbreak.png", (20, 20), seed=2)
    write_image(root / "a" / "1_fake" / "back\\slash.png", (20, 20), seed=3)
    undecodable = os.fsencode(str(root / "b" / "0_real")) + b"/latin-\xe9.png"
    with open(undecodable, "wb") as handle:
        handle.write((root / "a" / "0_real" / "img_000.png").read_bytes())
    result = CliRunner().invoke(
        main, ["manifest", "--layout", "folder", "--root", str(root), "--split", "odd", "--manifests-dir",
               str(tmp_path / "m")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 file(s) skipped" in result.output
    manifest = read_manifest(tmp_path / "m" / "odd.csv")
    assert len(manifest) == 8
    assert sorted(name for name, _ in manifest.skipped) == [
        "a/0_real/line\\nbreak.png", "a/1_fake/back\\slash.png", "b/0_real/latin-\\xe9.png"
    ]  # fmt: skip
    reasons = dict(manifest.skipped)
    assert "control character" in reasons["a/0_real/line\\nbreak.png"]
    assert "not valid UTF-8" in reasons["b/0_real/latin-\\xe9.png"]


def test_decoding_holds_pixels_within_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four threads decode four 60x50 images under a budget of 5000 pixels: never two at once; pixels unchanged."""
    paths = [write_image(tmp_path / f"{i}.png", (60, 50), seed=i) for i in range(4)]
    budget = images.PixelBudget(5000)
    monkeypatch.setattr(images, "DECODE_BUDGET", budget)
    with ThreadPoolExecutor(4) as pool:
        decoded = list(pool.map(images.decode_image, paths))
    assert budget.peak == 3000 and budget.in_use == 0
    for path, pixels in zip(paths, decoded):
        np.testing.assert_array_equal(pixels, np.asarray(Image.open(path).convert("RGB")))


MEMORY_PROBE = """
import resource, sys
import numpy as np
from pipeline.features import images
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pixels = images.decode_image(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / (pixels.shape[0] * pixels.shape[1]), int(pixels[100, 100, 0]))
"""


@pytest.mark.slow
def test_a_large_16_bit_png_decodes_within_about_6_bytes_per_pixel(tmp_path: Path) -> None:
    side = 3000
    ramp = (np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16).reshape(side, side)
    Image.fromarray(ramp).save(tmp_path / "big16.png")  # mode I;16
    assert Image.open(tmp_path / "big16.png").mode.startswith("I;16")
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "big16.png")], capture_output=True, text=True, check=True
    )
    per_pixel, value = probe.stdout.split()
    assert int(value) == int(ramp[100, 100]) >> 8  # the high byte, as before
    assert float(per_pixel) < 8.0, per_pixel  # int64 intermediates took ~19 bytes per pixel
