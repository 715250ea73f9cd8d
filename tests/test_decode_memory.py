"""The memory a decompression bomb costs, measured in a subprocess (issue 24, item 10; docs/data.md#bad-images)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIDE = 4000  # 16 M pixels: a few kB as PNG, 64 MB in Pillow, 48 MB as RGB

ONE_DECODE = """
import resource, sys
from pipeline.features import images
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pixels = images.decode_image(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / (pixels.shape[0] * pixels.shape[1]))
"""

THE_LOOP = """
import resource, sys
import numpy as np
from pipeline.features import images
from pipeline.features.loop import BatchWork, ImageSource, PixelRecipe
from pipeline.variants import VariantSpec

capacity, paths = int(sys.argv[1]), sys.argv[2:]
images.DECODE_BUDGET = images.PixelBudget(capacity)
source = ImageSource(lambda row: paths[row], max_pixels=10**9, workers=2)
recipe = PixelRecipe((VariantSpec.center(),), 32)
work = [BatchWork(row, np.array([row]), recipe, closes_shard=True) for row in range(len(paths))]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert all(batch.valid.all() for batch in source.batches(work))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / capacity)
"""


def run(script: str, *args: object) -> float:
    probe = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    return float(probe.stdout)


def bomb(path: Path, mode: str) -> Path:
    """One random row repeated: a small file of many pixels, none of them zero (untouched zero pages cost nothing)."""
    row = np.random.default_rng(0).integers(1, 255, (1, SIDE, 4), dtype=np.uint8)
    Image.fromarray(np.repeat(row, SIDE, axis=0), "RGBA").convert(mode).save(path)
    assert path.stat().st_size < 2_000_000
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "bound"), [("RGB", 8.0), ("RGBA", 8.0), ("P", 5.0), ("L", 5.0)])
def test_one_decode_costs_at_most_about_8_bytes_per_pixel(tmp_path: Path, mode: str, bound: float) -> None:
    path = bomb(tmp_path / f"{mode}.png", mode)
    per_pixel = run(ONE_DECODE, path)
    assert per_pixel <= bound, per_pixel  # Pillow's copy (4 or 1 bytes) and the result (3)


@pytest.mark.slow
def test_two_decode_threads_stay_within_8_bytes_per_pixel_of_the_budget(tmp_path: Path) -> None:
    """Four bombs as large as the budget, two decode threads: one image at a time, its array included."""
    paths = [bomb(tmp_path / f"{i}.png", "RGB") for i in range(4)]
    per_budget_pixel = run(THE_LOOP, SIDE * SIDE, *paths)
    assert per_budget_pixel <= 8.0, per_budget_pixel  # 13 before: a decoded array outlived its budget
    assert np.isfinite(per_budget_pixel)
