"""The stage-one commands through click: manifest, extract, cache info."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import make_folder_dataset
from pipeline import cache
from pipeline.cli import main
from pipeline.errors import PipelineWarning
from pipeline.features import Backbone, BackboneConfig, images


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def extracted(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`pipeline manifest` then `pipeline extract` on a 12-image folder dataset."""
    base = tmp_path_factory.mktemp("cli")
    root = make_folder_dataset(base / "data", n_per_label=3, seed=5)
    (root / "b" / "0_real" / "zz broken.png").write_text("not an image")
    manifests = base / "manifests"
    made = invoke("manifest", "--layout", "folder", "--root", root, "--split", "val", "--manifests-dir", manifests)
    extract_args = [
        "extract",
        "--split",
        "val",
        "--manifest",
        manifests / "val.csv",
        "--model",
        tiny_clip_dir,
        "--cache-dir",
        base / "cache",
        "--shard-rows",
        "8",
        "--chunk-rows",
        "4",
        "--no-progress",
        "--device",
        "cpu",
        "--max-invalid",
        "0.1",  # one bad file among 13
    ]
    result = invoke(*extract_args)
    return {"base": base, "root": root, "manifest": made, "extract": result, "args": extract_args}


def test_manifest_command_prints_the_csv_path(extracted: dict) -> None:
    result = extracted["manifest"]
    assert result.exit_code == 0, result.output
    csv_path = extracted["base"] / "manifests" / "val.csv"
    assert result.stdout.strip() == str(csv_path)
    assert "13 images (7 real, 6 fake) in 2 dataset(s)" in result.stderr
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "path,label,dataset" and len(lines) == 14
    assert "a/0_real/img_000.png,0,a" in lines and "b/0_real/zz broken.png,0,b" in lines


def test_extract_prints_the_store_path_and_records_the_bad_file(extracted: dict, tiny_clip_dir: Path) -> None:
    result = extracted["extract"]
    assert result.exit_code == 0, result.output
    store = extracted["base"] / "cache" / tiny_clip_dir.name / "ln2" / "val.zarr"
    assert result.stdout.splitlines() == [str(store)]
    assert "13 rows; 2 shards extracted, 0 already done" in result.stderr
    assert "1 images could not be used" in result.stderr
    assert "b/0_real/zz broken.png: not an image" in result.stderr

    rows = cache.read_rows(store)
    assert len(rows) == 13 and int(np.count_nonzero(~rows.valid)) == 1
    features = cache.read_features(store, "center")
    backbone = Backbone(BackboneConfig(model=str(tiny_clip_dir), device="cpu", dtype="float32"))
    first = images.center_crop(np.asarray(Image.open(extracted["root"] / rows.paths[0]).convert("RGB")), 32)
    expected = backbone.forward_taps(first[None], ["ln2"])["ln2"].numpy()[0].astype(np.float16)
    np.testing.assert_allclose(features[0].astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_cache_info_lists_model_tap_variants_and_failures(extracted: dict, tiny_clip_dir: Path) -> None:
    store = extracted["base"] / "cache" / tiny_clip_dir.name / "ln2" / "val.zarr"
    result = invoke("cache", "info", store)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"model_id     {tiny_clip_dir}" in out
    assert "tap          ln2" in out
    assert "rows         13" in out
    assert "variants:" in out and any(line.split() == ["center", "complete"] for line in out.splitlines())
    assert "invalid rows 1" in out and "b/0_real/zz broken.png: not an image" in out


def test_cache_info_on_a_folder_that_is_not_a_store(tmp_path: Path) -> None:
    result = invoke("cache", "info", tmp_path)
    assert result.exit_code == 1
    assert "not a feature store" in result.output


def test_rerun_of_the_same_command_skips_everything(extracted: dict) -> None:
    result = invoke(*extracted["args"])
    assert result.exit_code == 0, result.output
    assert "0 shards extracted, 2 already done; 0 images" in result.stderr


def test_mismatched_rerun_exits_1_naming_the_difference(extracted: dict) -> None:
    result = invoke(*extracted["args"], "--seed", "9")
    assert result.exit_code == 1
    assert "seed: store has 0, asked for 9" in result.output
    assert "--overwrite" in result.output
    result = invoke(*extracted["args"], "--blocks", "-1")
    assert result.exit_code == 1
    assert "block_indices: store has (0, 1, 2), asked for (2,)" in result.output


@pytest.mark.parametrize(
    "bad",
    [
        ["--tap", "mlp"],
        ["--batch-size", "0"],
        ["--store-dtype", "int8"],
        ["--perturb", "rain"],
        ["--no-such-option"],
    ],
)
def test_bad_options_exit_2(extracted: dict, bad: list[str]) -> None:
    result = invoke(*extracted["args"], *bad)
    assert result.exit_code == 2, result.output
    assert bad[0] in result.output


def test_chunk_rows_that_do_not_divide_shard_rows_exit_2_instead_of_being_clamped(
    extracted: dict, tmp_path: Path
) -> None:
    args = list(extracted["args"])
    args[args.index("--cache-dir") + 1] = tmp_path / "cache"
    result = invoke(*args, "--chunk-rows", "16")  # larger than --shard-rows 8
    assert result.exit_code == 2
    assert "--chunk-rows 16 must divide --shard-rows 8" in result.output
    assert not (tmp_path / "cache").exists()


def test_manifest_of_the_ldm_layout_takes_its_three_roots(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in (
        "latent_diffusion_trainingset/valid/bedroom/f.png",
        "train/cat/0_real/1.png",
        "coco/val2014/COCO_val2014_7.jpg",
    ):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(b"x")
    (data / "latent_diffusion_trainingset/valid/real_lsun.txt").write_text("cat_1.png\n")
    (data / "latent_diffusion_trainingset/valid/real_coco.txt").write_text("7.jpg\n")
    base = ["manifest", "--layout", "ldm-val", "--root", data / "latent_diffusion_trainingset", "--split", "ldm_val",
            "--manifests-dir", tmp_path / "m"]  # fmt: skip
    missing = invoke(*base, "--coco-root", data / "coco")
    assert missing.exit_code == 2 and "needs progan_root" in missing.output  # an option the layout needs: a usage error
    result = invoke(*base, "--progan-root", data, "--coco-root", data / "coco")
    assert result.exit_code == 0, result.output
    assert "3 images (2 real, 1 fake) in 1 dataset(s)" in result.stderr
    assert (tmp_path / "m" / "ldm_val.csv").read_text().splitlines() == [
        "path,label,dataset",
        "coco/val2014/COCO_val2014_7.jpg,0,ldm",
        "latent_diffusion_trainingset/valid/bedroom/f.png,1,ldm",
        "train/cat/0_real/1.png,0,ldm",
    ]


def test_manifest_bad_layout_exits_2_and_missing_root_exits_2(tmp_path: Path) -> None:
    assert invoke("manifest", "--layout", "nope", "--root", tmp_path, "--split", "x").exit_code == 2
    assert invoke("manifest", "--layout", "folder", "--root", tmp_path / "absent", "--split", "x").exit_code == 2


def test_manifest_of_a_folder_without_label_folders_exits_1(tmp_path: Path) -> None:
    result = invoke(
        "manifest", "--layout", "folder", "--root", tmp_path, "--split", "x", "--manifests-dir", tmp_path / "m"
    )
    assert result.exit_code == 1
    assert "no folder named 0_real/ or 1_fake/" in result.output


def test_the_deprecated_ten_crop_flag_still_extracts_ten_crops_and_says_what_replaces_it(
    extracted: dict, tmp_path: Path
) -> None:
    args = list(extracted["args"])
    args[args.index("--cache-dir") + 1] = tmp_path / "cache"
    with pytest.warns(PipelineWarning, match="--ten-crop is deprecated: use --crop tencrop"):
        result = invoke(*args, "--ten-crop")
    assert result.exit_code == 0, result.output
    store = next((tmp_path / "cache").rglob("*.zarr"))
    assert [name for name in cache.open_store_info(store).variants if name.startswith("tencrop")] == [
        f"tencrop_{i}" for i in range(10)
    ]


def test_missing_manifest_exits_1_naming_it(tmp_path: Path, tiny_clip_dir: Path) -> None:
    missing = tmp_path / "manifests" / "val.csv"
    result = invoke(
        "extract",
        "--split",
        "val",
        "--manifest",
        missing,
        "--model",
        tiny_clip_dir,
        "--cache-dir",
        tmp_path / "cache",
        "--no-progress",
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert f"Error: {missing}: no such file" in result.output


def test_unloadable_model_exits_1_with_a_clean_message(extracted: dict, tmp_path: Path) -> None:
    """A model path that holds no checkpoint is an error message naming it, not a traceback."""
    args = list(extracted["args"])
    missing_model = tmp_path / "no-such-model"
    args[args.index("--model") + 1] = missing_model
    args[args.index("--cache-dir") + 1] = tmp_path / "cache"
    result = invoke(*args)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert "Error:" in result.output and str(missing_model) in result.output


def test_cache_export_to_a_full_disk_is_an_error_naming_the_file(
    extracted: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from pipeline.cache import hdf5

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))

    monkeypatch.setattr(hdf5.h5py, "File", full_disk)
    store = cache.default_store_path(extracted["base"] / "cache", str(extracted["args"][6]), "ln2", "val")
    result = invoke("cache", "export", store, tmp_path / "out.h5", "--no-progress")
    assert result.exit_code == 1, result.output
    assert "cannot write (No space left on device); free some space or write elsewhere" in result.output
    assert "Traceback" not in result.output
