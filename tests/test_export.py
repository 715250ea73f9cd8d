"""`pipeline export`: a run as a detector folder that loads back, its model card, and its ONNX graph."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import onnxruntime
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open

from conftest import COMMIT, copy_folder, fill_hub_cache, head_recording, write_image
from pipeline.cli import main
from pipeline.detector import BackboneUnavailable, Detector, ExportConfig, PredictError, run_export
from pipeline.features import local_content_hash
from pipeline.results import read_result_rows


def invoke(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def exported(trained_predict_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "detector"
    invoke("export", str(trained_predict_run["run"]), "--out", str(out), "--onnx")
    return out


def test_the_folder_holds_head_config_card_and_graph_and_the_config_says_what_the_head_recorded(
    trained_predict_run, exported
):
    run = trained_predict_run["run"]
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "detector.onnx",
                                                           "head.safetensors"]  # fmt: skip
    assert (exported / "head.safetensors").read_bytes() == (run / "head.safetensors").read_bytes()
    with safe_open(str(run / "head.safetensors"), framework="np") as handle:
        metadata = handle.metadata()
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == "rine-pipeline/detector@1"
    assert config["backbone"] == {"model": metadata["model"], "revision": metadata["model_revision"], "tap": "ln2",
                                  "source": "local", "model_config": json.loads(metadata["model_config"])}  # fmt: skip
    assert metadata["model_revision"].startswith("local-sha256:")
    assert config["block_indices"] == json.loads(metadata["store_blocks"]) == [0, 1, 2]
    assert config["thresholds"] == json.loads(metadata["thresholds"])
    assert config["temperature"] == float(metadata["temperature"]) and config["calibration"] == "temperature"
    assert (config["store_dtype"], config["crop"], config["head"]["proj_dim"]) == ("float16", "center", 16)
    assert config["source"]["run"] == run.name and config["onnx"]["file"] == "detector.onnx"


def test_the_model_card_has_its_sections_and_the_runs_metrics(trained_predict_run, exported):
    card = (exported / "README.md").read_text()
    for section in ("## How to load", "## Backbone and features", "## Training data", "## Configuration",
                    "## Thresholds", "## Metrics", "## Intended use and limitations"):  # fmt: skip
        assert section in card, section
    assert 'Detector.load("detector")' in card and "pipeline predict --head detector" in card
    rows = [row for _, row in read_result_rows(trained_predict_run["run"] / "metrics.csv")]
    for row in rows:
        cells = f"| {row.split} | {row.variant} | {row.dataset} | {row.n} | {100 * row.metric('acc'):.1f} | "
        assert cells + f"{100 * row.metric('ap'):.1f} |" in card, cells
    assert "32 images used" in card


def test_the_export_loads_back_and_scores_as_the_run(trained_predict_run, exported, tmp_path):
    files = sorted(trained_predict_run["data"].rglob("*.png"))[::5]
    from_run = Detector.load(trained_predict_run["run"], device="cpu")
    from_export = Detector.load(exported, device="cpu", threshold="fpr5")
    assert from_export.spec.calibration == from_run.spec.calibration
    assert from_export.threshold == from_run.thresholds["fpr5"]
    for crop in ("center", "tencrop"):
        np.testing.assert_array_equal(from_export.score(files, crop=crop), from_run.score(files, crop=crop))
    out = tmp_path / "s.csv"
    invoke("predict", *map(str, files), "--head", str(exported), "--out", str(out), "--device", "cpu")
    assert out.read_text().count("\n") == len(files) + 1


def test_onnx_graph_gives_the_torch_logits_and_scores(exported):
    detector = Detector.load(exported, device="cpu")
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)  # a batch size other than the traced one
    crops[1] = crops[1] // 2 + 128  # a brighter one
    session = onnxruntime.InferenceSession(str(exported / "detector.onnx"))
    logits, scores = session.run(["logit", "score"], {"pixels": crops})
    expected = detector.logits(detector.forward_step()(crops)[detector.spec.tap])
    np.testing.assert_allclose(logits, expected.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores, detector.scores(expected[:, None]), rtol=0, atol=1e-5)
    assert np.ptp(logits) > 0.1


def test_export_never_replaces_a_folder_it_did_not_write(trained_predict_run, exported, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    for extra in ([], ["--overwrite"]):
        output = invoke("export", str(trained_predict_run["run"]), "--out", str(photos), *extra, code=1)
        assert "not a folder written by `pipeline export`" in output
    assert [p.name for p in photos.iterdir()] == ["holiday.jpg"]
    copy = tmp_path / "copy"
    run_export(ExportConfig(trained_predict_run["run"], copy))
    output = invoke("export", str(trained_predict_run["run"]), "--out", str(copy), code=1)
    assert "--overwrite" in output
    (copy / "README.md").write_text("stale")
    run_export(ExportConfig(trained_predict_run["run"], copy, overwrite=True))
    assert "\n# RINE detector copy\n" in (copy / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_export_of_a_folder_that_is_not_a_run_is_an_error(tmp_path):
    output = invoke("export", str(tmp_path), "--out", str(tmp_path / "x"), code=1)
    assert "not a finished run folder" in output


def test_pixels_to_score_module_matches_the_detector_on_the_last_block_ablation(trained_predict_run, tmp_path):
    """The graph's module on a head reading only the last block, without rounding to float16."""
    from dataclasses import replace

    from pipeline.detector.export import PixelsToScore
    from pipeline.heads import RineHead

    detector = Detector.load(trained_predict_run["run"], device="cpu")
    torch.manual_seed(0)
    detector.head = RineHead(1, 32, 8, 1).eval()
    detector.spec = replace(detector.spec, head_blocks="last", store_dtype="float32")
    crops = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        logit, score = PixelsToScore(detector)(torch.from_numpy(crops))
    expected = detector.logits(detector.forward_step()(crops)["ln2"])
    torch.testing.assert_close(logit, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(score, torch.sigmoid(expected / detector.spec.temperature), rtol=0, atol=1e-6)


def test_a_damaged_config_json_is_an_error_naming_the_file(exported, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    write_image(tmp_path / "images" / "x.png", (40, 40), 0)
    (copy / "head.safetensors").write_bytes((exported / "head.safetensors").read_bytes())
    config = json.loads((exported / "config.json").read_text())
    outside = {**config["backbone"], "included": {"folder": "../elsewhere", "revision": "local-sha256:0"}}
    for damage in (
        {"backbone": None},
        {"thresholds": {"val": {}}},
        {"format": "something else"},
        {"backbone": outside},
    ):
        (copy / "config.json").write_text(json.dumps({**config, **damage}))
        output = invoke("predict", str(tmp_path / "images"), "--head", str(copy), code=1)
        assert output.startswith("Error:") and "config.json" in output, damage
    (copy / "config.json").write_text("{not json")
    assert "not readable JSON" in invoke("predict", str(tmp_path / "images"), "--head", str(copy), code=1)


# ---------------------------------------------------------------- portable exports


def run_recording(run: Path, out: Path, **metadata: str) -> Path:
    """A copy of the run folder whose head records another backbone (as one trained on it would)."""
    shutil.copytree(run, out)
    head_recording(run, out / "head.safetensors", **metadata)
    return out


def card_metadata(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.slow
def test_an_export_with_its_backbone_scores_offline_where_no_other_copy_is(
    trained_predict_run, tiny_clip_dir, tmp_path, monkeypatch
):
    images = sorted(trained_predict_run["data"].rglob("*.png"))[::3]
    project = tmp_path / "project"
    copy_folder(tiny_clip_dir, project / "models" / "tiny-clip")
    run = run_recording(trained_predict_run["run"], project / "run", model="models/tiny-clip")
    monkeypatch.chdir(project)
    expected = Detector.load(run, device="cpu").score(images)
    out, plain = tmp_path / "share" / "detector", tmp_path / "share" / "plain"
    invoke("export", str(run), "--out", str(out), "--include-backbone")
    invoke("export", str(run), "--out", str(plain))
    assert sorted(p.name for p in (out / "backbone").iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "backbone" / "model.safetensors").read_bytes() == (tiny_clip_dir / "model.safetensors").read_bytes()
    included = json.loads((out / "config.json").read_text())["backbone"]
    assert included["model"] == "models/tiny-clip" and included["source"] == "local"
    assert included["included"] == {"folder": "backbone", "revision": local_content_hash(out / "backbone")}
    card = (out / "README.md").read_text()
    assert card_metadata(card) == {"library_name": "rine-pipeline", "pipeline_tag": "image-classification",
                                   "tags": ["synthetic-image-detection", "ai-generated-image-detection", "rine",
                                            "clip"]}  # fmt: skip
    assert "This folder carries its backbone" in card

    elsewhere = tmp_path / "elsewhere"
    copy_folder(tiny_clip_dir, elsewhere / "my-weights")
    monkeypatch.chdir(elsewhere)  # the plain export, from here, with --model at a copy: no --allow-other-backbone
    with_copy = elsewhere / "with-copy.csv"
    invoke("predict", *map(str, images), "--head", str(plain), "--model", "my-weights", "--out", str(with_copy),
           "--device", "cpu", "--no-progress")  # fmt: skip
    rows = [line.split(",") for line in with_copy.read_text().splitlines()[1:]]
    np.testing.assert_allclose([float(row[1]) for row in rows], expected, rtol=0, atol=1e-7)
    assert {row[9] for row in rows} == {f"models/tiny-clip@{local_content_hash(tiny_clip_dir)}"}
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    environment.pop("HF_HUB_CACHE", None)
    scores = elsewhere / "s.csv"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "predict", *map(str, images), "--head", str(out), "--out", str(scores),
         "--device", "cpu", "--no-progress"],
        cwd=elsewhere, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split(",") for line in scores.read_text().splitlines()[1:]]
    np.testing.assert_allclose([float(row[1]) for row in rows], expected, rtol=0, atol=1e-7)
    assert {row[9] for row in rows} == {f"models/tiny-clip@{local_content_hash(tiny_clip_dir)}"}

    (out / "backbone" / "config.json").write_text(
        (out / "backbone" / "config.json").read_text().replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": 0.001')
    )  # an edited copy is not the head's backbone
    with pytest.raises(PredictError, match="config.json layer_norm_eps: 0.001"):
        Detector.load(out, device="cpu")


def test_a_hub_backbone_export_names_its_base_model_and_carries_it_from_the_cache(
    trained_predict_run, tiny_clip_dir, tmp_path, monkeypatch
):
    fill_hub_cache(tmp_path / "hub", "test-org/tiny-clip", tiny_clip_dir, COMMIT, monkeypatch)
    run = run_recording(trained_predict_run["run"], tmp_path / "run", model="test-org/tiny-clip",
                        model_revision=COMMIT)  # fmt: skip
    plain, carrying = tmp_path / "plain", tmp_path / "carrying"
    run_export(ExportConfig(run, plain))
    run_export(ExportConfig(run, carrying, include_backbone=True))
    card = (plain / "README.md").read_text()
    assert card_metadata(card)["base_model"] == "test-org/tiny-clip"
    assert f"huggingface-cli download test-org/tiny-clip --revision {COMMIT}" in card
    backbone = json.loads((carrying / "config.json").read_text())["backbone"]
    assert (backbone["model"], backbone["revision"], backbone["source"]) == ("test-org/tiny-clip", COMMIT, "hub")
    images = sorted(trained_predict_run["data"].rglob("*.png"))[:4]
    expected = Detector.load(plain, device="cpu").score(images)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(BackboneUnavailable, match="test-org/tiny-clip at revision " + COMMIT):
        Detector.load(plain, device="cpu")
    detector = Detector.load(carrying, device="cpu")
    assert detector.backbone_label() == f"test-org/tiny-clip@{COMMIT}"
    np.testing.assert_array_equal(detector.score(images), expected)


def test_a_detector_repo_id_loads_from_a_prefilled_offline_cache(trained_predict_run, exported, tmp_path, monkeypatch):
    repo_commit = "fedcba9876543210fedcba9876543210fedcba98"
    fill_hub_cache(tmp_path / "hub", "test-org/rine-detector", exported, repo_commit, monkeypatch)
    images = sorted(trained_predict_run["data"].rglob("*.png"))[:5]
    expected = Detector.load(exported, device="cpu").score(images)
    for revision in (None, "main", repo_commit):
        detector = Detector.load("test-org/rine-detector", revision=revision, device="cpu")
        np.testing.assert_array_equal(detector.score(images), expected)
    out = tmp_path / "s.jsonl"
    invoke("predict", *map(str, images), "--head", "test-org/rine-detector", "--revision", "main", "--out", str(out),
           "--device", "cpu", "--no-progress")  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in records] == pytest.approx(expected.tolist(), abs=1e-7)
    output = invoke("predict", str(images[0]), "--head", str(exported), "--revision", "v2", code=2)
    assert "--revision (revision=) is for a hub repo id" in output
    output = invoke("predict", str(images[0]), "--head", "test-org/missing", "--revision", "v2", code=1)
    assert "test-org/missing (revision v2): no such local path" in output and "HF_HUB_OFFLINE" in output
    assert "huggingface-cli download test-org/missing --revision v2" in output


# ---------------------------------------------------------------- issue 24: outputs safe to open, no traceback


HOSTILE = ("<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "[click](javascript:alert(3)) | cell")


def test_the_model_card_escapes_dataset_split_and_config_text(trained_predict_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_predict_run["run"], run)
    metrics = (run / "metrics.csv").read_text()
    lines = metrics.splitlines()
    header = lines[0].split(",")
    column = header.index("dataset")
    hostile_lines = [lines[0]]
    for index, line in enumerate(lines[1:]):
        cells = line.split(",")
        cells[column] = '"' + HOSTILE[index % len(HOSTILE)] + '"'
        hostile_lines.append(",".join(cells))
    (run / "metrics.csv").write_text("\n".join(hostile_lines) + "\n")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["run"]["note"] = "<b onmouseover=alert(4)>x</b>"
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "card"
    run_export(ExportConfig(run, out))
    card = (out / "README.md").read_text()
    for raw in ("<script", "<img", "<b ", "[click](javascript:"):
        assert raw not in card, raw
    assert "| &lt;script&gt;alert(1)&lt;/script&gt; |" in card and "&lt;b onmouseover=alert(4)&gt;x&lt;/b&gt;" in card
    assert "&lt;img src=x onerror=alert(2)&gt;" in card and "\\[click\\](javascript:alert(3)) \\| cell" in card


def test_export_through_a_symbolic_link_is_one_error_line(trained_predict_run, tmp_path):
    real = tmp_path / "real"
    run_export(ExportConfig(trained_predict_run["run"], real))
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    output = invoke("export", str(trained_predict_run["run"]), "--out", str(link), "--overwrite", code=1)
    assert output.startswith(f"Error: {link}: is a symbolic link") and output.count("\n") == 1
    assert link.is_symlink() and (real / "README.md").is_file()  # both untouched
