"""Robust verdicts (`predict --robust`, `Detector.score(robust=True)`): the copies are the documented re-encodings,
an image built to flip under them is unsure, images far from the threshold never are."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.detector import ROBUST_COLUMNS, Detector, PredictConfig, run_predict
from pipeline.detector.robust import verdict

pytestmark = pytest.mark.slow


def pillow_copies(image: np.ndarray) -> list[np.ndarray]:
    """The re-encodings as docs/scoring.md states them, written here with Pillow independently of the package."""
    copies = []
    for options in ({"format": "JPEG", "quality": 75}, {"format": "WEBP", "quality": 80}):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, **options)
        copies.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    height, width = image.shape[:2]
    copies.append(np.asarray(Image.fromarray(image).resize((width // 2, height // 2), Image.Resampling.BICUBIC)))
    return copies


def checkerboard(dark: int = 64) -> np.ndarray:
    """Dark with every other pixel white: dark as given, a bright grey once downscaled by 1/2 (built to flip)."""
    image = np.full((96, 96, 3), dark, dtype=np.uint8)
    image[::2, ::2] = 255
    image[1::2, 1::2] = 255
    return image


def far_images() -> dict[str, np.ndarray]:
    """Flat and noisy images, dark (real for the two-tone head) and bright (fake), far from its val threshold."""
    rng = np.random.default_rng(3)
    images = {}
    for level in (64, 176):
        images[f"flat{level}"] = np.full((96, 96, 3), level, dtype=np.uint8)
        noise = level + rng.integers(-40, 41, (96, 96, 3))
        images[f"noise{level}"] = np.clip(noise, 0, 255).astype(np.uint8)
    return images


@pytest.fixture(scope="module")
def detector(trained_predict_run) -> Detector:
    return Detector.load(trained_predict_run["run"], device="cpu")


def test_scores_are_the_image_and_its_reencoded_copies(detector, trained_predict_run):
    images = [checkerboard(), *far_images().values()]
    paths = sorted(trained_predict_run["data"].rglob("*.png"))[:3]
    robust = detector.score([*images, *paths], robust=True, batch_size=4)
    plain = detector.score([*images, *paths])
    assert robust.score == pytest.approx(plain, abs=1e-6)
    for i, image in enumerate([*images, *(np.asarray(Image.open(p).convert("RGB")) for p in paths)]):
        copies = detector.score(pillow_copies(image))
        everything = np.concatenate([[plain[i]], copies])
        assert robust.score_min[i] == pytest.approx(everything.min(), abs=1e-6)
        assert robust.score_max[i] == pytest.approx(everything.max(), abs=1e-6)
        assert robust.verdict[i] == verdict(everything.min(), everything.max(), detector.threshold)
    assert (robust.score_max - robust.score_min).max() > 0.05  # the copies really score differently


def test_an_image_built_to_flip_is_unsure_and_images_far_from_the_threshold_never_are(detector):
    threshold = detector.threshold
    fragile = detector.score([checkerboard()], robust=True)
    assert fragile.score[0] < threshold - 0.02 and fragile.score_max[0] > threshold + 0.1  # real as given, fake halved
    assert fragile.verdict == ("unsure",)
    far = far_images()
    result = detector.score(list(far.values()), robust=True)
    assert np.abs(result.score - threshold).min() > 0.1
    assert result.verdict == tuple("fake" if s >= threshold else "real" for s in result.score)
    assert result.verdict == ("real", "real", "fake", "fake")


def test_predict_robust_adds_the_columns_and_counts_unsure_images(trained_predict_run, tmp_path: Path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(checkerboard()).save(folder / "fragile.png")
    for name, image in far_images().items():
        Image.fromarray(image).save(folder / f"{name}.png")
    out = tmp_path / "robust.csv"
    result = CliRunner().invoke(
        main,
        ["predict", str(folder), "--head", str(trained_predict_run["run"]), "--robust", "--out", str(out),
         "--device", "cpu", "--no-progress", "--batch-size", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "robust verdicts: 1 unsure of 5 scored" in result.output
    with out.open(newline="") as handle:
        rows = {Path(row["path"]).stem: row for row in csv.DictReader(handle)}
    assert tuple(next(iter(rows.values())))[-3:] == ROBUST_COLUMNS
    assert {name: row["verdict"] for name, row in rows.items()} == {
        "fragile": "unsure", "flat64": "real", "noise64": "real", "flat176": "fake", "noise176": "fake"
    }  # fmt: skip
    for row in rows.values():
        assert float(row["score_min"]) <= float(row["score"]) <= float(row["score_max"])
    plain = run_predict(
        PredictConfig(head=trained_predict_run["run"], inputs=(folder,), out=tmp_path / "plain.csv", device="cpu",
                      batch_size=3, progress=False)
    )  # fmt: skip
    assert plain.n_unsure is None
    with (tmp_path / "plain.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            assert "verdict" not in row
            assert float(row["score"]) == pytest.approx(float(rows[Path(row["path"]).stem]["score"]), abs=1e-6)
    again = CliRunner().invoke(
        main, ["predict", str(folder), "--head", str(trained_predict_run["run"]), "--robust", "--out",
               str(tmp_path / "plain.csv"), "--device", "cpu", "--no-progress"],
    )  # fmt: skip
    assert again.exit_code == 1 and "another --robust" in again.output
