"""Scoring new images with a trained run's head or an official checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_folder_dataset
from pipeline import images
from pipeline.backbone import Backbone, BackboneConfig
from pipeline.cache import DEFAULT_MODEL
from pipeline.cli import main
from pipeline.extract import FinishedShard
from pipeline.predict import (
    HeadScorer,
    HeadSource,
    PredictConfig,
    PredictError,
    Prediction,
    load_head_source,
    predictions_csv,
    run_predict,
    write_predictions,
)
from pipeline.variants import VariantSpec

OFFICIAL = Path(__file__).resolve().parent / "data" / "rine_2class_trainable.pth"  # provenance: tests/data/README.md


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


def test_ten_crop_score_is_the_sigmoid_of_the_mean_of_the_ten_logits(trained_run, tiny_clip_dir):
    """The authors' ten-crop score (sigmoid(outputs.view(B, 10).mean(1))), recomputed here crop by crop."""
    run_folder, data = trained_run
    files = sorted((data / "b" / "1_fake").iterdir())[:3]
    predictions = run_predict(
        PredictConfig(head=run_folder, inputs=tuple(files), device="cpu", ten_crop=True, batch_size=2)
    )
    head = load_head_source(run_folder).head.eval()
    backbone = Backbone(BackboneConfig(str(tiny_clip_dir), device="cpu", dtype="float32"))
    centers = run_predict(PredictConfig(head=run_folder, inputs=tuple(files), device="cpu"))
    for prediction, center, file in zip(predictions, centers, files):
        crops = images.ten_crop(images.decode_image(file), 32)
        with torch.inference_mode():
            logits = torch.cat([head(backbone.forward_taps(crop[None], ["ln2"])["ln2"])[0] for crop in crops]).squeeze(
                1
            )
        assert prediction.path == file
        assert prediction.score == pytest.approx(float(torch.sigmoid(logits.mean())), abs=1e-5)
        assert prediction.score != pytest.approx(center.score, abs=1e-6)


class FirstValueHead(torch.nn.Module):
    """A 'head' whose logit is the first token value of the last block."""

    def forward(self, tokens):
        return tokens[:, -1, :1], None


def test_head_scorer_averages_logits_not_probabilities():
    """Two crops with logits -4 and +2: sigmoid(mean) = sigmoid(-1) = 0.269, the mean of sigmoids would be 0.445."""
    source = HeadSource(FirstValueHead(), "m", "ln2", "all", last_block_only=True)
    variants = (VariantSpec.ten_crop(0), VariantSpec.ten_crop(1))
    paths = [Path(f"{i}.png") for i in range(5)]
    scorer = HeadScorer(source, variants, torch.device("cpu"), paths, batch_size=3)
    tokens = {name: np.zeros((2, 2, 4), np.float32) for name in ("tencrop_0", "tencrop_1")}
    tokens["tencrop_0"][:, 1, 0], tokens["tencrop_1"][:, 1, 0] = [-4.0, 0.0], [2.0, 0.0]
    tokens["tencrop_0"][:, 0, 0] = 100.0  # an earlier block: ignored when the head reads only the last one
    scorer.submit(
        FinishedShard(1, {("ln2", n): t for n, t in tokens.items()}, np.array([True, False]), ("", "missing file"))
    )
    assert scorer.predictions[0].path == Path("3.png")
    assert scorer.predictions[0].score == pytest.approx(1 / (1 + np.exp(1.0)))
    assert scorer.predictions[1] == Prediction(Path("4.png"), None, "missing file")


def test_predictions_csv_and_its_atomic_file(tmp_path):
    predictions = [
        Prediction(Path("a b.png"), 0.75),
        Prediction(Path("c.png"), 0.5),
        Prediction(Path("d.png"), None, "missing file"),
    ]
    text = predictions_csv(predictions)
    assert text == "path,score,prediction,error\na b.png,0.750000,fake,\nc.png,0.500000,real,\nd.png,,,missing file\n"
    write_predictions(predictions, tmp_path / "out" / "scores.csv")
    assert (tmp_path / "out" / "scores.csv").read_text() == text
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["scores.csv"]


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
    assert (source.model, source.tap, source.block_selection, source.head.n_blocks, source.head.in_dim) == (
        DEFAULT_MODEL,
        "ln2",
        "all",
        24,
        1024,
    )
    image = make_folder_dataset(tmp_path / "data", n_per_label=1)
    with pytest.raises(PredictError, match="expects 24 blocks of dim 1024.*gives 3 of dim 32"):
        run_predict(PredictConfig(head=OFFICIAL, inputs=(image,), model=str(tiny_clip_dir), device="cpu"))
    with pytest.raises(PredictError, match="no such head file"):
        load_head_source(tmp_path)
