"""Scoring new images with a trained run's head or an official checkpoint."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_folder_dataset
from pipeline.cache import DEFAULT_MODEL
from pipeline.cli import main
from pipeline.predict import PredictConfig, PredictError, load_head_source, run_predict

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "rine_2class_trainable.pth"


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def trained_run(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("predict")
    data = make_folder_dataset(root / "data", n_per_label=8)
    manifests = root / "manifests"
    invoke("manifest", "--layout", "folder", "--root", str(data), "--split", "train", "--manifests-dir", str(manifests))
    invoke("manifest", "--layout", "folder", "--root", str(data), "--split", "test", "--manifests-dir", str(manifests))
    for split in ("train", "test"):
        invoke("extract", "--split", split, "--manifest", str(manifests / f"{split}.csv"), "--model", str(tiny_clip_dir),
               "--cache-dir", str(root / "cache"), "--shard-rows", "16", "--chunk-rows", "8", "--no-progress")  # fmt: skip
    grid = root / "grid.yaml"
    grid.write_text(
        f"name: p\nout: {root / 'runs'}\ndata:\n  cache_dir: {root / 'cache'}\n  model: {tiny_clip_dir}\n"
        "  train: train\n  val: test\n  test: [test]\nbase: {proj_dim: 16, proj_layers: 1, batch_size: 16}\n"
    )
    invoke("fit", "--grid", str(grid), "--no-progress", "--device", "cpu")
    (run_folder,) = (root / "runs" / "runs").iterdir()
    return run_folder, data


def test_predict_reproduces_the_scores_of_the_evaluated_split(trained_run, tiny_clip_dir):
    run_folder, data = trained_run
    with open(run_folder / "scores_test.csv", newline="") as handle:
        expected = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    predictions = run_predict(PredictConfig(head=run_folder, inputs=(data,), device="cpu"))
    assert len(predictions) == len(expected) == 32
    for prediction in predictions:
        key = prediction.path.relative_to(data).as_posix()
        # the cache holds float16 tokens, predict feeds the float32 ones
        assert prediction.score == pytest.approx(expected[key], abs=2e-3)


def test_cli_predict_writes_a_row_per_image_with_reasons_for_bad_ones(trained_run, tmp_path):
    run_folder, data = trained_run
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"")
    out = tmp_path / "scores.csv"
    stdout = invoke("predict", "--head", str(run_folder / "head.safetensors"), str(data / "a" / "0_real"), str(bad),
                    "--device", "cpu", "--out", str(out))  # fmt: skip
    assert stdout.strip() == str(out)
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows[:-1]] == sorted(str(p) for p in (data / "a" / "0_real").iterdir())
    assert all(0.0 <= float(r["score"]) <= 1.0 and r["prediction"] in ("real", "fake") for r in rows[:-1])
    assert rows[-1]["score"] == "" and "empty" in rows[-1]["error"]
    scores = np.array([float(r["score"]) for r in rows[:-1]])
    assert ((scores > 0.5) == np.array([r["prediction"] == "fake" for r in rows[:-1]])).all()


def test_official_checkpoint_defaults_to_vit_l14_ln2_and_refuses_another_backbone(tiny_clip_dir, tmp_path):
    source = load_head_source(OFFICIAL)
    assert (source.model, source.tap, source.blocks, source.head.n_blocks, source.head.in_dim) == (
        DEFAULT_MODEL, "ln2", "all", 24, 1024
    )
    image = make_folder_dataset(tmp_path / "data", n_per_label=1)
    with pytest.raises(PredictError, match="expects 24 blocks of dim 1024.*gives 3 of dim 32"):
        run_predict(PredictConfig(head=OFFICIAL, inputs=(image,), model=str(tiny_clip_dir), device="cpu"))
    with pytest.raises(PredictError, match="no such head file"):
        load_head_source(tmp_path)
