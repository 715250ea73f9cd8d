"""Thresholds and temperature that travel with a head: the fit, the metadata, and what `pipeline fit` records."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from scipy.optimize import brentq
from scipy.special import expit

from conftest import separable_features, write_store
from pipeline import cache
from pipeline.heads import CheckpointError, load_head, parse_grid
from pipeline.heads.calibration import HeadCalibration, calibrate_head, fit_temperature
from pipeline.heads.grid import FitConfig, ViewReuseWarning, run_grid
from pipeline.results.metrics import choose_thresholds, operating_point


def bce(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    return float(np.mean(np.logaddexp(0, z) - labels * z))


def scipy_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Where the derivative of the cross-entropy in 1/T vanishes (it is convex in 1/T), by scipy's brentq."""
    x, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    return 1.0 / brentq(lambda inverse: np.mean((expit(inverse * x) - y) * x), 1e-4, 1e4, xtol=1e-15)


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_fit_temperature_finds_the_minimum_scipy_finds(scale):
    rng = np.random.default_rng(int(scale * 10))
    labels = rng.integers(0, 2, 400)
    logits = scale * rng.normal(2 * labels - 1, 1.5)  # over- (scale 4) or under-confident (0.3) logits
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(scipy_temperature(logits, labels), rel=1e-7)
    assert bce(logits, labels, temperature) <= bce(logits, labels, 1.0)


def test_a_separable_val_set_sharpens_and_an_uninformative_one_flattens_within_the_range():
    labels = np.array([0, 0, 1, 1])
    assert 0.01 <= fit_temperature(np.array([-2.0, -1.0, 1.0, 3.0]), labels) < 0.1
    assert fit_temperature(np.array([2.0, 1.0, -1.0, -2.0]), labels) == 100.0  # the logits point the wrong way


def test_calibrate_head_without_temperature_chooses_thresholds_on_the_mean_logit_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    logits = torch.from_numpy(rng.normal(labels[:, None], 1.0, (50, 10)).astype(np.float32))
    calibration = calibrate_head("none", logits, labels, "val_x")
    scores = expit(logits.double().mean(dim=1).numpy())  # float64, as the scores written
    assert (calibration.temperature, calibration.val_split, calibration.n_val) == (1.0, "val_x", 50)
    assert calibration.thresholds == choose_thresholds(labels, scores)
    calibrated = calibrate_head("temperature", logits, labels, "val_x")
    assert calibrated.temperature == pytest.approx(scipy_temperature(logits.mean(dim=1).numpy(), labels), rel=1e-7)
    expected = torch.sigmoid(logits.mean(1) / calibrated.temperature)
    np.testing.assert_allclose(calibrated.scores(logits), expected, rtol=0, atol=1e-6)


def test_metadata_round_trips_and_a_missing_or_bad_key_is_named():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 30)
    calibration = calibrate_head("temperature", torch.from_numpy(rng.normal(labels, 1.0)[:, None]), labels, "v")
    metadata = calibration.to_metadata()
    assert HeadCalibration.from_metadata(metadata, "h") == calibration
    for key in metadata:
        with pytest.raises(CheckpointError, match=key):
            HeadCalibration.from_metadata({k: v for k, v in metadata.items() if k != key}, "h")
    for key, bad in (("temperature", "-1"), ("thresholds", '{"val": {}}'), ("calibration", "platt")):
        with pytest.raises(CheckpointError, match="h: head metadata: bad"):
            HeadCalibration.from_metadata({**metadata, key: bad}, "h")


@pytest.fixture(scope="module")
def calibrated_grid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("calibrated")
    features, labels = separable_features(300, seed=2, shift=1.2)
    write_store(root / "train.zarr", {"view_000": features[:160]}, labels[:160], ["progan"] * 160)
    write_store(root / "val.zarr", {"center": features[160:220]}, labels[160:220], ["progan"] * 60)
    write_store(root / "test.zarr", {"center": features[220:]}, labels[220:], ["gan_a"] * 40 + ["gan_b"] * 40)
    grid = f"""
name: calibrated
out: {root / "out"}
data: {{train: {{store: {root / "train.zarr"}}}, val: {{store: {root / "val.zarr"}}}, test: [{{store: {root / "test.zarr"}}}]}}
base: {{proj_dim: 16, proj_layers: 1, batch_size: 32, epochs: 6, lr: 0.01, calibration: temperature}}
"""
    with pytest.warns(ViewReuseWarning):  # six epochs of one view
        run_grid(parse_grid(grid), FitConfig(device="cpu", progress=False))
    return root


def test_fit_records_the_temperature_of_the_val_logits_and_the_thresholds_of_the_val_scores(calibrated_grid):
    (run,) = (calibrated_grid / "out" / "runs").iterdir()
    head, metadata = load_head(run / "head.safetensors")
    with torch.no_grad():  # the val logits, recomputed from the store and the saved head
        features = torch.from_numpy(cache.read_features(calibrated_grid / "val.zarr", "center")).float()
        logits = head(features)[0].squeeze(1).numpy().astype(np.float64)
    labels = cache.read_rows(calibrated_grid / "val.zarr").labels
    temperature = float(metadata["temperature"])
    assert metadata["calibration"] == "temperature" and temperature != 1.0
    assert temperature == pytest.approx(scipy_temperature(logits, labels), rel=1e-5)
    with open(run / "scores_val.csv", newline="") as handle:
        saved = np.array([float(row["score"]) for row in csv.DictReader(handle)])
    np.testing.assert_allclose(saved, 1 / (1 + np.exp(-logits / temperature)), atol=1e-6)
    stored = json.loads(metadata["thresholds"])
    for rule, point in stored.items():
        assert operating_point(labels, saved, point["threshold"]).as_dict() == pytest.approx(point), rule
    assert metadata["val_split"] == "val" and metadata["n_val"] == "60"


def test_results_apply_the_val_thresholds_to_each_test_set(calibrated_grid):
    (run,) = (calibrated_grid / "out" / "runs").iterdir()
    with safe_open(str(run / "head.safetensors"), framework="np") as handle:
        stored = json.loads(handle.metadata()["thresholds"])
    with open(calibrated_grid / "out" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(run / "scores_test.csv", newline="") as handle:
        scores = list(csv.DictReader(handle))
    assert {row["calibration"] for row in rows} == {"temperature"}
    for row in (r for r in rows if r["split"] == "test"):
        mine = [(int(s["label"]), float(s["score"])) for s in scores if s["dataset"] == row["dataset"]]
        labels, values = np.array([m[0] for m in mine]), np.array([m[1] for m in mine])
        for point, rule in (("calibrated", "val"), ("val_eer", "eer"), ("val_fpr1", "fpr1"), ("val_fpr5", "fpr5")):
            threshold = stored[rule]["threshold"]
            assert float(row[f"{point}_threshold"]) == threshold
            assert float(row[f"{point}_fake_acc"]) == pytest.approx(np.mean(values[labels == 1] >= threshold))
            assert float(row[f"{point}_real_acc"]) == pytest.approx(np.mean(values[labels == 0] < threshold))
    val = [r for r in rows if r["split"] == "val"]
    assert val and all(math.isnan(float(r["val_fpr1_threshold"])) for r in val)  # not applied to itself
