"""Galleries of a run's worst errors: the reals scored most fake and the fakes scored most real.

Worst false positives: reals with score > 0.5, highest score first; worst
false negatives: fakes with score <= 0.5, lowest first (the ``acc``
threshold). Each item is shown as a small JPEG thumbnail embedded as a data
URI when its file is reachable under the store's data root, else by its
path and the reason.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..features import ImageDecodeError, decode_image
from ..names import DEFAULT_THRESHOLD
from .scores import ScoredSplit

THUMBNAIL_SIZE = 112
THUMBNAIL_QUALITY = 80
DEFAULT_GALLERY_SIZE = 8
FALSE_POSITIVES, FALSE_NEGATIVES = "false_positives", "false_negatives"


@dataclass(frozen=True)
class GalleryItem:
    split: str
    dataset: str
    path: str  # relative to the data root
    label: int
    score: float
    thumbnail: str | None  # data URI; None when the file could not be shown
    note: str = ""  # why there is no thumbnail


def worst_errors(splits: Sequence[ScoredSplit], kind: str, count: int) -> list[tuple[ScoredSplit, int]]:
    """The ``count`` most confident errors of ``kind`` over ``splits``: (split, row) pairs, worst first."""
    candidates: list[tuple[float, str, int, ScoredSplit]] = []
    for scored in splits:
        if kind == FALSE_POSITIVES:
            rows = np.flatnonzero((scored.labels == 0) & (scored.scores > DEFAULT_THRESHOLD))
            candidates += [(-scored.scores[row], scored.split, int(row), scored) for row in rows]
        elif kind == FALSE_NEGATIVES:
            rows = np.flatnonzero((scored.labels == 1) & (scored.scores <= DEFAULT_THRESHOLD))
            candidates += [(scored.scores[row], scored.split, int(row), scored) for row in rows]
        else:
            raise ValueError(f"unknown error kind {kind!r}")
    candidates.sort(key=lambda item: item[:3])
    return [(scored, row) for _, _, row, scored in candidates[:count]]


@functools.lru_cache(maxsize=4096)  # the same test images recur in every run's gallery
def thumbnail_uri(path: Path, size: int = THUMBNAIL_SIZE) -> str:
    """A JPEG thumbnail (longer side ``size``) of the decoded image as a data URI; ImageDecodeError if unreadable."""
    image = Image.fromarray(decode_image(path))
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gallery(
    picks: Sequence[tuple[ScoredSplit, int]], data_roots: dict[str, Path | None], notes: dict[str, str]
) -> list[GalleryItem]:
    """Items of the picked rows; ``data_roots``/``notes`` per split (a None root: no thumbnails, the note says why)."""
    items = []
    for scored, row in picks:
        root = data_roots.get(scored.split)
        thumbnail, note = None, notes.get(scored.split, "data root unknown")
        if root is not None:
            try:
                thumbnail, note = thumbnail_uri(root / scored.paths[row]), ""
            except ImageDecodeError as error:
                note = f"{root / scored.paths[row]}: {error.reason}"
        items.append(
            GalleryItem(
                scored.split,
                str(scored.datasets[row]),
                str(scored.paths[row]),
                int(scored.labels[row]),
                float(scored.scores[row]),
                thumbnail,
                note,
            )
        )
    return items
