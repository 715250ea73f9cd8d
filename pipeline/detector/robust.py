"""Robust verdicts: each image is scored as given and as the web re-encodes it, and called ``unsure`` when they disagree.

``REENCODINGS`` are fixed and deterministic (no random draw, so a rerun gives the same verdicts): a Pillow JPEG
at quality 75, a downscale to half the size, a Pillow WebP. :class:`RobustRecipe` adds their crops to a work
item of the scoring loop, so the copies go through the backbone in the same batches as the originals;
:func:`robust_scores` turns the scores of the original and its copies into ``score_min``, ``score_max`` and a
verdict. Usage and cost: docs/scoring.md#robust-verdicts.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..names import REENCODINGS, UNSURE

if TYPE_CHECKING:
    from ..features import PixelRecipe

JPEG_QUALITY = 75
WEBP_QUALITY = 80  # Pillow's default
SEPARATOR = "@"  # a re-encoded copy's variant name: <variant>@<re-encoding>, e.g. center@jpeg75


def _encoded(image: np.ndarray, **save: object) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, **save)
    buffer.seek(0)
    with Image.open(buffer) as reopened:
        return np.ascontiguousarray(np.asarray(reopened.convert("RGB"), dtype=np.uint8))


def jpeg75(image: np.ndarray) -> np.ndarray:
    """Pillow JPEG at quality 75 (4:2:0 chroma subsampling), decoded again."""
    return _encoded(image, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")


def half(image: np.ndarray) -> np.ndarray:
    """Downscaled to half its width and height (rounded down, at least 1 pixel), Pillow bicubic."""
    height, width = image.shape[:2]
    size = (max(1, width // 2), max(1, height // 2))
    return np.ascontiguousarray(np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC)))


def webp(image: np.ndarray) -> np.ndarray:
    """Pillow lossy WebP at quality 80 (its default), decoded again."""
    return _encoded(image, format="WEBP", quality=WEBP_QUALITY)


REENCODE: dict[str, Callable[[np.ndarray], np.ndarray]] = {"jpeg75": jpeg75, "half": half, "webp": webp}
assert tuple(REENCODE) == REENCODINGS


def reencoded(image: np.ndarray) -> list[np.ndarray]:
    """The copies of an (H, W, 3) uint8 RGB image, in the order of ``names.REENCODINGS``."""
    return [REENCODE[name](image) for name in REENCODINGS]


@dataclass(frozen=True)
class RobustRecipe:
    """A pixel recipe (``features.PixelRecipe``) that also makes its variants of each re-encoded copy.

    Its names are the base names, then ``<name>@<re-encoding>`` for each
    re-encoding; the scoring loop runs them all in the batch of the image.
    """

    base: PixelRecipe

    @property
    def crop(self) -> int:
        return self.base.crop

    @property
    def names(self) -> tuple[str, ...]:
        base = tuple(self.base.names)
        return base + tuple(f"{name}{SEPARATOR}{copy}" for copy in REENCODINGS for name in base)

    def groups(self) -> list[tuple[str, ...]]:
        """The names of the original's variants, then those of each copy (each group makes one score)."""
        base = tuple(self.base.names)
        return [base] + [tuple(f"{name}{SEPARATOR}{copy}" for name in base) for copy in REENCODINGS]

    def __call__(self, image: np.ndarray, row: int) -> dict[str, np.ndarray]:
        pixels = dict(self.base(image, row))
        for copy, array in zip(REENCODINGS, reencoded(image), strict=True):
            pixels.update({f"{name}{SEPARATOR}{copy}": value for name, value in self.base(array, row).items()})
        return pixels


@dataclass(frozen=True)
class RobustScores:
    """Per image: the score as given, the lowest and highest over it and its copies, and the verdict."""

    score: np.ndarray  # float64 (N,)
    score_min: np.ndarray
    score_max: np.ndarray
    verdict: tuple[str, ...]  # "real", "fake" or "unsure"

    def __len__(self) -> int:
        return len(self.score)


def verdict(score_min: float, score_max: float, threshold: float) -> str:
    """``fake`` when every score is at or above the threshold, ``real`` when every one is below, else ``unsure``."""
    if score_min >= threshold:
        return "fake"
    if score_max < threshold:
        return "real"
    return UNSURE


def robust_scores(scores: np.ndarray, threshold: float) -> RobustScores:
    """From (N, 1 + len(REENCODINGS)) scores, the original's first."""
    scores = np.asarray(scores, dtype=np.float64)
    low, high = scores.min(axis=1), scores.max(axis=1)
    verdicts = tuple(verdict(a, b, threshold) for a, b in zip(low.tolist(), high.tolist(), strict=True))
    return RobustScores(scores[:, 0].copy(), low, high, verdicts)


def with_copies(arrays: Sequence[np.ndarray], crops: Sequence[str]) -> tuple[list[np.ndarray], list[str]]:
    """Each image followed by its copies (each with the image's crop): what :func:`robust_scores` expects, flat."""
    images, image_crops = [], []
    for array, crop in zip(arrays, crops, strict=True):
        images += [array, *reencoded(array)]
        image_crops += [crop] * (1 + len(REENCODINGS))
    return images, image_crops
