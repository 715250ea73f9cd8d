"""The product with the heads beside RINE: ``pipeline predict``, ``Detector`` and ``pipeline export`` on run
folders of linear, logreg and knn heads (block tokens and the embedding of a tiny full CLIP), giving the scores
the grid saved."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import CLIPConfig, CLIPModel

from conftest import TINY_CLIP, make_two_tone_dataset
from pipeline.cli import main
from pipeline.detector import Detector, ExportConfig, PredictConfig, run_export, run_predict

TINY_TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
HEADS = ("linear-embedding", "logreg-block:1", "knn-block:-1")


def invoke(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def probe_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("probe-product")
    torch.manual_seed(0)
    model = root / "clip"
    CLIPModel(CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_CLIP, projection_dim=12)).save_pretrained(model)
    data = make_two_tone_dataset(root / "data", n_per_label=8)
    manifests = root / "manifests"
    for split in ("train", "test"):
        invoke("manifest", "--layout", "folder", "--root", str(data), "--split", split, "--manifests-dir",
               str(manifests))  # fmt: skip
    common = ["--model", str(model), "--cache-dir", str(root / "cache"), "--shard-rows", "16", "--chunk-rows", "8",
              "--no-progress", "--device", "cpu"]  # fmt: skip
    for split in ("train", "test"):
        invoke("extract", "--split", split, "--manifest", str(manifests / f"{split}.csv"), *common)
    grid = root / "grid.yaml"
    grid.write_text(
        f"name: p\nout: {root / 'runs'}\ndata:\n  cache_dir: {root / 'cache'}\n  model: {model}\n"
        "  train: train\n  val: test\n  test: [test]\n"
        "base: {batch_size: 8, epochs: 1, lr: 0.01, lr_milestones: [], calibration: temperature}\n"
        "grid:\n  - {head: [linear], features: [embedding]}\n  - {head: [logreg], features: ['block:1']}\n"
        "  - {head: [knn], features: ['block:-1'], k: [3]}\n"
    )
    invoke("fit", "--grid", str(grid), "--no-progress", "--device", "cpu")
    with open(root / "runs" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    runs = {f"{r['head']}-{r['features']}": root / "runs" / "runs" / r["run"] for r in rows}
    assert set(runs) == set(HEADS)
    return {"runs": runs, "data": data}


def saved_scores(run: Path, data: Path) -> dict[Path, float]:
    with open(run / "scores_test.csv", newline="") as handle:
        return {data / row["path"]: float(row["score"]) for row in csv.DictReader(handle)}


@pytest.mark.slow
@pytest.mark.parametrize("name", HEADS)
def test_predict_and_the_detector_give_the_scores_the_grid_saved(probe_runs, tmp_path, name):
    run, data = probe_runs["runs"][name], probe_runs["data"]
    expected = saved_scores(run, data)
    out = tmp_path / "scores.csv"
    run_predict(PredictConfig(head=run, inputs=(data,), out=out, device="cpu", batch_size=5, progress=False))
    with open(out, newline="") as handle:
        predicted = {Path(row["path"]): float(row["score"]) for row in csv.DictReader(handle)}
    assert len(predicted) == len(expected) == 32
    for path, score in predicted.items():
        assert score == pytest.approx(expected[path], abs=1e-6), path
    detector = Detector.load(run, device="cpu")
    paths = sorted(expected)[:6]
    assert detector.score(paths) == pytest.approx([expected[p] for p in paths], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", HEADS)
def test_an_exported_probe_scores_as_its_run(probe_runs, tmp_path, name):
    run, data = probe_runs["runs"][name], probe_runs["data"]
    summary = run_export(ExportConfig(run_dir=run, out=tmp_path / "det"))
    config = json.loads((summary.out / "config.json").read_text())
    head, features = name.split("-", 1)
    assert (config["head"]["kind"], config["features"]) == (head, features)
    expected = saved_scores(run, data)
    paths = sorted(expected)[:4]
    detector = Detector.load(summary.out, device="cpu")
    assert detector.score(paths) == pytest.approx([expected[p] for p in paths], abs=1e-6)
    assert "# Detector det" in (summary.out / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", HEADS)
def test_the_onnx_graph_of_a_probe_gives_the_torch_logits(probe_runs, tmp_path, name):
    import numpy as np
    import onnxruntime

    summary = run_export(ExportConfig(run_dir=probe_runs["runs"][name], out=tmp_path / "det", onnx=True))
    detector = Detector.load(summary.out, device="cpu")
    crops = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    session = onnxruntime.InferenceSession(str(summary.out / "detector.onnx"))
    logits, _ = session.run(["logit", "score"], {"pixels": crops})
    expected = detector.logits(detector.forward_step()(crops)[detector.spec.input_name])
    # both graphs round the tokens to float16; one on a rounding boundary may land a float16 step apart in the
    # two, which the logreg head's standardised (large) weights turn into ~1e-3 of its logit
    np.testing.assert_allclose(logits, expected.numpy(), rtol=0, atol=2e-3)
    assert np.ptp(logits) > 0.05
