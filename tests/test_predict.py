"""`pipeline predict`: the grid's own scores, thresholds from val, streaming resumable output, inputs, errors."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from conftest import TINY_CLIP, make_folder_dataset, read_csv_rows, write_image
from pipeline.cli import main
from pipeline.detector import (
    PREDICTION_COLUMNS,
    Detector,
    OutputError,
    PredictConfig,
    PredictError,
    collect_inputs,
    read_detector_files,
    run_predict,
)
from pipeline.features import Backbone, BackboneConfig, images
from pipeline.names import DEFAULT_MODEL, THRESHOLD_RULES
from pipeline.results.metrics import operating_point

OFFICIAL = Path(__file__).resolve().parent / "data" / "rine_2class_trainable.pth"  # provenance: tests/data/README.md


def invoke(*args: str, code: int = 0) -> str:
    """The command's output (stdout and stderr); an exception that escaped the CLI (a traceback) fails."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.output


def read_scores(path: Path) -> dict[str, float]:
    with open(path, newline="") as handle:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}


def test_predict_scores_equal_the_grids_saved_scores_for_center_and_ten_crops(trained_predict_run, tmp_path):
    run, data = trained_predict_run["run"], trained_predict_run["data"]
    for crop, saved in (("center", "scores_test.csv"), ("tencrop", "scores_test_tencrop.csv")):
        expected = read_scores(run / saved)
        out = tmp_path / f"{crop}.csv"
        summary = run_predict(
            PredictConfig(head=run, inputs=(data,), out=out, crop=crop, device="cpu", batch_size=5, progress=False)
        )
        rows = read_csv_rows(out)
        assert summary.n_scored == len(rows) == len(expected) == 32 and not summary.failures
        for row in rows:
            key = Path(row["path"]).relative_to(data).as_posix()
            # the same float16 features (predict rounds them as the store did), the same head and temperature
            assert float(row["score"]) == pytest.approx(expected[key], abs=1e-6), (crop, key)
            assert row["crop"] == crop and (row["width"], row["height"], row["format"]) == ("45", "38", "PNG")
        fake = np.array(["1_fake" in r["path"] for r in rows])
        scores = np.array([float(r["score"]) for r in rows])
        assert scores[fake].min() > scores[~fake].max() + 0.1  # a head that tells them apart


def test_every_threshold_name_labels_by_its_val_threshold_which_reproduces_its_val_metrics(
    trained_predict_run, tmp_path
):
    run, data = trained_predict_run["run"], trained_predict_run["data"]
    with safe_open(str(run / "head.safetensors"), framework="np") as handle:
        stored = json.loads(handle.metadata()["thresholds"])
    val = read_csv_rows(run / "scores_val.csv")
    labels, scores = np.array([int(r["label"]) for r in val]), np.array([float(r["score"]) for r in val])
    for rule in THRESHOLD_RULES:
        point = operating_point(labels, scores, stored[rule]["threshold"])
        assert point.as_dict() == pytest.approx(stored[rule]), rule
    assert stored["fpr5"]["real_acc"] >= 0.95 and stored["fpr1"]["real_acc"] >= 0.99

    for name, expected in [(rule, stored[rule]["threshold"]) for rule in THRESHOLD_RULES] + [("0.5", 0.5)]:
        out = tmp_path / f"{name}.csv"
        invoke("predict", str(data), "--head", str(run), "--threshold", name, "--out", str(out), "--device", "cpu",
               "--no-progress")  # fmt: skip
        rows = read_csv_rows(out)
        assert {(r["threshold_name"], float(r["threshold"])) for r in rows} == {
            (name if name in THRESHOLD_RULES else "fixed", expected)
        }
        assert all((r["label"] == "fake") == (float(r["score"]) >= expected) for r in rows)
    default = tmp_path / "default.csv"
    output = invoke("predict", str(data / "a"), "--head", str(run), "--out", str(default), "--device", "cpu")
    assert read_csv_rows(default)[0]["threshold_name"] == "val" and "chosen on val split test" in output
    threshold = float(read_csv_rows(default)[0]["threshold"])
    assert f"threshold {threshold:.4g} (val, chosen" in output  # 4 significant digits on the terminal
    assert re.search(r"acc \d+\.\d %, real acc \d+\.\d %, fake acc \d+\.\d %", output)


def test_bad_threshold_option_exits_2(trained_predict_run):
    for bad in ("median", "1.5", "-0.1"):
        invoke(
            "predict",
            str(trained_predict_run["data"]),
            "--head",
            str(trained_predict_run["run"]),
            "--threshold",
            bad,
            code=2,
        )


# ---------------------------------------------------------------- streaming output and resume

SLOW_COMMIT = '''\
"""Test helper: slow each batch's commit so that the test can kill the process mid-run."""
import os
import time

import pipeline.detector.predict as _predict

_submit = _predict.PredictionCommitter.submit


def _slow_submit(self, finished):
    time.sleep(float(os.environ["RINE_TEST_COMMIT_DELAY"]))
    return _submit(self, finished)


_predict.PredictionCommitter.submit = _slow_submit
'''


def predict_args(run: Path, data: Path, out: Path) -> list[str]:
    return ["predict", str(data), "--head", str(run), "--out", str(out), "--batch-size", "3", "--device", "cpu",
            "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_file_of_an_uninterrupted_run(trained_predict_run, tmp_path):
    """Every run a `python -m pipeline` process with the same environment (torch threads included)."""
    run, data = trained_predict_run["run"], shutil.copytree(trained_predict_run["data"], tmp_path / "data")
    (data / "b" / "0_real" / "broken.png").write_bytes(b"not an image")
    throttle = tmp_path / "throttle"
    throttle.mkdir()
    (throttle / "sitecustomize.py").write_text(SLOW_COMMIT)
    python_path = os.pathsep.join(p for p in (str(throttle), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": python_path, "RINE_TEST_COMMIT_DELAY": "0", "HF_HUB_OFFLINE": "1"}

    def start(out: Path, delay: str = "0") -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "pipeline", *predict_args(run, data, out)],
                                env={**env, "RINE_TEST_COMMIT_DELAY": delay}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    def finish(out: Path) -> str:
        process = start(out)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 3, stderr  # the broken file
        return stderr

    reference, out = tmp_path / "reference.csv", tmp_path / "killed.csv"
    finish(reference)
    process = start(out, delay="0.15")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.is_file() and out.read_text().count("\n") >= 8:  # the header and a few batches
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    lines = out.read_text().count("\n")
    assert 8 <= lines < 34
    with open(out, "a") as handle:  # as if the kill had torn a record
        handle.write(str(data / "a" / "0_real" / "img_000.png") + ",0.12")
    assert f"{lines - 1} were already in" in finish(out)
    assert out.read_bytes() == reference.read_bytes()
    assert "0 written" in finish(out)  # everything done: nothing computed, the same file
    assert out.read_bytes() == reference.read_bytes()


def test_resume_refuses_an_output_made_with_another_threshold_or_crop(trained_predict_run, tmp_path):
    run, data = trained_predict_run["run"], trained_predict_run["data"]
    out = tmp_path / "scores.csv"
    invoke(*predict_args(run, data / "a", out))
    before = out.read_bytes()
    for extra in (["--threshold", "eer"], ["--crop", "tencrop"]):
        output = invoke(*predict_args(run, data, out), *extra, code=1)
        assert "holds rows made with threshold" in output and "Traceback" not in output
    assert out.read_bytes() == before
    (tmp_path / "other.csv").write_text("path,score\nx.png,0.5\n")
    output = invoke(*predict_args(run, data, tmp_path / "other.csv"), code=1)
    assert "not an output of `pipeline predict`" in output


def test_jsonl_and_parquet_hold_the_csv_rows_and_parquet_resumes_from_its_partial_file(trained_predict_run, tmp_path):
    import pyarrow.parquet as pq

    run, data = trained_predict_run["run"], trained_predict_run["data"]
    invoke(*predict_args(run, data, tmp_path / "s.csv"))
    expected = read_csv_rows(tmp_path / "s.csv")
    invoke(*predict_args(run, data, tmp_path / "s.jsonl"))
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [list(r) for r in records[:1]] == [list(PREDICTION_COLUMNS)]
    assert [r["path"] for r in records] == [r["path"] for r in expected]
    assert [r["score"] for r in records] == [float(r["score"]) for r in expected]
    assert records[0]["width"] == 45 and records[0]["error"] is None  # missing values are null

    parquet = tmp_path / "s.parquet"
    partial = tmp_path / ".s.parquet.partial.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in records[:7]) + '{"path": "torn')  # a killed run
    output = invoke(*predict_args(run, data, parquet))
    assert "7 were already in" in output and not partial.exists()
    table = pq.read_table(parquet)
    assert table.column_names == list(PREDICTION_COLUMNS)
    assert table.to_pylist() == records


def test_stdout_gets_the_csv_when_no_out_is_given(trained_predict_run):
    result = CliRunner().invoke(main, ["predict", str(trained_predict_run["data"] / "a" / "0_real"), "--head",
                                       str(trained_predict_run["run"]), "--device", "cpu", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 8 and rows[0].keys() == set(PREDICTION_COLUMNS)


# ---------------------------------------------------------------- inputs and bad files


def test_inputs_are_files_folders_path_csvs_and_lists_each_path_once(tmp_path):
    data = make_folder_dataset(tmp_path / "data", n_per_label=2)
    folder_images = sorted(p for p in (data / "a").rglob("*.png"))
    (data / "a" / "notes.txt").write_text("not an image list: inside a folder, only images count")
    listing = tmp_path / "lists" / "some.txt"
    listing.parent.mkdir()
    listing.write_text("# my images\n../data/b/0_real/img_000.png\n\n  ../data/b/1_fake/img_001.png  \n")
    manifest = tmp_path / "m" / "split.csv"
    invoke("manifest", "--layout", "folder", "--root", str(data / "b"), "--split", "split", "--manifests-dir",
           str(manifest.parent))  # fmt: skip
    plain = tmp_path / "plain.csv"
    plain.write_text("path,whatever\nextra/x.png,1\ndata/a/0_real/img_001.png,2\n")  # the second is listed above
    single = write_image(tmp_path / "single.png", (8, 8), 0)
    found = collect_inputs([data / "a", listing, manifest, plain, single, data / "a" / "0_real"])
    n_folder = len(folder_images)
    assert found[:n_folder] == folder_images
    assert found[n_folder : n_folder + 2] == [
        listing.parent / "../data/b/0_real/img_000.png",
        listing.parent / "../data/b/1_fake/img_001.png",
    ]
    from_manifest = found[n_folder + 2 : -2]
    assert sorted(from_manifest) == sorted((data / "b").rglob("*.png"))  # the same files, spelled from its root
    assert found[-2:] == [tmp_path / "extra/x.png", single]  # an earlier path is not listed twice
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.png\n")
    with pytest.raises(PredictError, match="needs a 'path' column"):
        collect_inputs([bad])


def test_bad_files_get_rows_with_their_reason_and_exit_status_3(trained_predict_run, tmp_path):
    run = trained_predict_run["run"]
    good = write_image(tmp_path / "good.png", (40, 40), 1)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    write_image(tmp_path / "big.png", (80, 80), 2)
    listing = tmp_path / "list.txt"
    listing.write_text("good.png\nmissing.png\nempty.png\ntext.jpg\nbig.png\n")
    out = tmp_path / "s.csv"
    output = invoke("predict", str(listing), "--head", str(run), "--out", str(out), "--max-pixels", "5000",
                    "--device", "cpu", "--no-progress", code=3)  # fmt: skip
    rows = {Path(r["path"]).name: r for r in read_csv_rows(out)}
    assert rows["good.png"]["error"] == "" and rows["good.png"]["label"] in ("fake", "real")
    for name, reason in (("missing.png", "missing file"), ("empty.png", "empty"), ("text.jpg", "not an image"),
                         ("big.png", "exceeds the limit")):  # fmt: skip
        assert reason in rows[name]["error"] and rows[name]["score"] == rows[name]["label"] == "", name
    assert rows["big.png"]["width"] == "80" and rows["text.jpg"]["format"] == ""
    assert "4 images could not be scored" in output and str(good) in out.read_text()


def test_auto_crop_takes_ten_crops_of_large_images_only(trained_predict_run, tmp_path):
    run = trained_predict_run["run"]
    small = write_image(tmp_path / "small.png", (50, 40), 1)  # shorter side 40 < 2 x 32
    large = write_image(tmp_path / "large.png", (90, 70), 2)
    out = tmp_path / "s.csv"
    run_predict(PredictConfig(head=run, inputs=(tmp_path,), out=out, crop="auto", device="cpu", progress=False))
    rows = {Path(r["path"]).name: r for r in read_csv_rows(out)}
    assert (rows["small.png"]["crop"], rows["large.png"]["crop"]) == ("center", "tencrop")
    detector = Detector.load(run, device="cpu")
    assert float(rows["large.png"]["score"]) == pytest.approx(detector.score([large], crop="tencrop")[0], abs=1e-6)
    assert float(rows["small.png"]["score"]) == pytest.approx(detector.score([small])[0], abs=1e-6)
    run_predict(PredictConfig(head=run, inputs=(tmp_path,), out=tmp_path / "t.csv", crop="auto", auto_min_side=30,
                              device="cpu", progress=False))  # fmt: skip
    assert {r["crop"] for r in read_csv_rows(tmp_path / "t.csv")} == {"tencrop"}


# ---------------------------------------------------------------- backbones and head files


@pytest.fixture(scope="module")
def other_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny CLIP's shape with another seed, and with fewer blocks."""
    folders = {}
    for name, seed, layers in (("seed", 1, TINY_CLIP["num_hidden_layers"]), ("fewer", 0, 2)):
        torch.manual_seed(seed)
        model = CLIPVisionModel(CLIPVisionConfig(**{**TINY_CLIP, "num_hidden_layers": layers})).eval()
        folders[name] = tmp_path_factory.mktemp(f"clip-{name}")
        model.save_pretrained(folders[name])
    return folders


def test_another_backbone_is_refused_unless_allowed_and_then_recorded(trained_predict_run, other_clips, tmp_path):
    run, data = trained_predict_run["run"], trained_predict_run["data"] / "a" / "0_real"
    for name in ("seed", "fewer"):
        output = invoke("predict", str(data), "--head", str(run), "--model", str(other_clips[name]), "--device", "cpu",
                        code=1)  # fmt: skip
        assert "scoring is refused" in output and "--allow-other-backbone" in output and "Traceback" not in output
    out = tmp_path / "s.csv"
    invoke("predict", str(data), "--head", str(run), "--model", str(other_clips["seed"]), "--allow-other-backbone",
           "--out", str(out), "--device", "cpu", "--no-progress")  # fmt: skip
    backbones = {r["backbone"] for r in read_csv_rows(out)}
    assert len(backbones) == 1 and "allowed" in backbones.pop()
    output = invoke("predict", str(data), "--head", str(run), "--model", str(other_clips["fewer"]),
                    "--allow-other-backbone", "--device", "cpu", code=1)  # fmt: skip
    assert "outside a 2-block model" in output


def test_same_model_id_with_changed_weights_is_refused(trained_predict_run, tiny_clip_dir, tmp_path):
    """A local model's content hash is part of what the head records: edited weights are another backbone."""
    copy = tmp_path / "clip"
    copy.mkdir()
    for file in tiny_clip_dir.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    head = tmp_path / "head.safetensors"
    with safe_open(str(trained_predict_run["run"] / "head.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, str(head), metadata={**metadata, "model": str(copy)})
    assert Detector.load(head, device="cpu").backbone.config.model == str(copy)
    model = CLIPVisionModel.from_pretrained(copy)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(copy)
    with pytest.raises(PredictError, match="scoring is refused"):
        Detector.load(head, device="cpu")


def test_official_checkpoint_defaults_to_vit_l14_ln2_threshold_half_and_refuses_another_backbone(
    tiny_clip_dir, tmp_path
):
    head, spec = read_detector_files(OFFICIAL)
    assert (spec.model, spec.tap, spec.block_selection, spec.calibration, head.n_blocks, head.in_dim) == (
        DEFAULT_MODEL, "ln2", "all", None, 24, 1024)  # fmt: skip
    image = make_folder_dataset(tmp_path / "data", n_per_label=1)
    output = invoke("predict", str(image), "--head", str(OFFICIAL), "--model", str(tiny_clip_dir), "--device", "cpu",
                    code=1)  # fmt: skip
    assert "scoring is refused" in output
    with pytest.raises(PredictError, match="expects 24 blocks of dim 1024.*gives 3 of dim 32"):
        Detector.load(OFFICIAL, model=str(tiny_clip_dir), allow_other_backbone=True, device="cpu")


def test_official_checkpoint_threshold_is_half_and_named_rules_are_refused(tiny_clip_dir):
    head, spec = read_detector_files(OFFICIAL)
    detector = Detector(spec, head, Backbone(BackboneConfig(str(tiny_clip_dir), device="cpu")))
    assert (detector.threshold, detector.threshold_name, detector.thresholds) == (0.5, "fixed", {})
    assert "threshold 0.5 (fixed) (the authors' checkpoints were not calibrated" in detector.describe()
    with pytest.raises(PredictError, match="carries no val thresholds"):
        detector.use_threshold("eer")
    detector.use_threshold(0.7)
    assert (detector.threshold, detector.threshold_name) == (0.7, "fixed")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a readable safetensors head"),
        (b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!", "not a readable safetensors head"),
    ],
)
def test_empty_or_malformed_head_files_are_errors_not_tracebacks(tmp_path, content, message):
    head = tmp_path / "head.safetensors"
    head.write_bytes(content)
    write_image(tmp_path / "x.png", (8, 8), 0)
    output = invoke("predict", str(tmp_path), "--head", str(head), code=1)
    assert output.startswith("Error:") and message in output and "Traceback" not in output


@pytest.mark.parametrize("key", ["model", "store_blocks", "thresholds", "n_blocks"])
def test_head_metadata_missing_a_key_is_an_error_naming_it(trained_predict_run, tmp_path, key):
    with safe_open(str(trained_predict_run["run"] / "head.safetensors"), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != key}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    head = tmp_path / "head.safetensors"
    save_file(tensors, str(head), metadata=metadata)
    write_image(tmp_path / "x.png", (8, 8), 0)
    output = invoke("predict", str(tmp_path), "--head", str(head), code=1)
    assert output.startswith("Error:") and key in output and "Traceback" not in output


def test_a_resumed_output_rewritten_by_another_program_is_refused(trained_predict_run, tmp_path):
    out = tmp_path / "s.csv"
    invoke(*predict_args(trained_predict_run["run"], trained_predict_run["data"] / "a", out))
    out.write_bytes(out.read_bytes().replace(b"\n", b"\r\n"))  # saved again by a spreadsheet, say
    with pytest.raises(OutputError, match="not laid out as `pipeline predict` writes it"):
        run_predict(
            PredictConfig(head=trained_predict_run["run"], inputs=(trained_predict_run["data"],), out=out, device="cpu")
        )


def test_detector_crops_are_the_evaluations(trained_predict_run, tiny_clip_dir):
    """Detector.score recomputed crop by crop with the backbone and head: center and the mean ten-crop logit."""
    run, data = trained_predict_run["run"], trained_predict_run["data"]
    detector = Detector.load(run, device="cpu")
    file = sorted((data / "b" / "1_fake").iterdir())[0]
    backbone = Backbone(BackboneConfig(str(tiny_clip_dir), device="cpu", dtype="float32"))
    image = images.decode_image(file)
    with torch.inference_mode():

        def logit(crop: np.ndarray) -> float:
            tokens = backbone.forward_taps(crop[None], ["ln2"])["ln2"].half().float()
            return float(detector.head(tokens)[0])

        ten = np.mean([logit(crop) for crop in images.ten_crop(image, 32)])
        center = logit(images.center_crop(image, 32))
    temperature = detector.spec.temperature
    assert detector.score([file], crop="tencrop")[0] == pytest.approx(1 / (1 + np.exp(-ten / temperature)), abs=1e-6)
    assert detector.score([file])[0] == pytest.approx(1 / (1 + np.exp(-center / temperature)), abs=1e-6)


def test_a_full_disk_is_an_error_naming_the_output(trained_predict_run, tmp_path):
    out = tmp_path / "scores.csv"
    out.symlink_to("/dev/full")  # every write fails with ENOSPC
    output = invoke(*predict_args(trained_predict_run["run"], trained_predict_run["data"] / "a", out), code=1)
    assert output.startswith("Error:") or "\nError: " in output
    assert f"{out}: cannot write (No space left on device)" in output


def test_import_pipeline_and_its_detector_class_load_no_torch():
    code = "import sys, pipeline; from pipeline import Detector; print('torch' in sys.modules, Detector.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "Detector"]


def test_an_output_cut_mid_batch_resumes_to_the_uninterrupted_file_with_auto_crops(trained_predict_run, tmp_path):
    folder = tmp_path / "mixed"
    for i in range(7):
        write_image(folder / f"{i}.png", (90, 70) if i % 3 == 0 else (40, 40), i)  # shorter side 70: ten crops
    reference, cut = tmp_path / "reference.csv", tmp_path / "cut.csv"
    args = ("--crop", "auto", "--batch-size", "3", "--device", "cpu", "--no-progress")
    invoke("predict", str(folder), "--head", str(trained_predict_run["run"]), "--out", str(reference), *args)
    lines = reference.read_text().splitlines(keepends=True)
    assert [line.split(",")[5] for line in lines[1:]] == ["tencrop", "center", "center"] * 2 + ["tencrop"]
    cut.write_text("".join(lines[:6]) + lines[6][:20])  # header, 5 rows (batch 2 half done), a torn record
    output = invoke("predict", str(folder), "--head", str(trained_predict_run["run"]), "--out", str(cut), *args)
    assert "2 written" in output and "5 were already in" in output
    assert cut.read_bytes() == reference.read_bytes()
