"""Error analysis of a scored split: accuracy on reals and on fakes, and where the errors are by size and format.

An error is a real scored > 0.5 or a fake scored <= 0.5. Per dataset, rows are counted in buckets of three
facets (label; the shorter side against the crop; the file format), each with its images, errors, error rate,
share of the errors and share of the images. Sizes and formats come from the audit's per-image records when
present, else from the image headers; ``unknown`` when neither is reachable. A format-aligned variant's format
bucket names what the detector saw and what the file was (``JPEG q95 (was PNG)``); other perturbed variants keep
the original file format, which the page labels as such.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..features import read_headers
from ..names import DEFAULT_THRESHOLD
from ..variants import VariantKind, VariantSpec
from .audits import UNKNOWN, UNKNOWN_FACTS, ImageFacts
from .scores import ScoredSplit

FACETS = ("label", "size", "format")
DEFAULT_CROP = 224
HEADER_WORKERS = 8


@dataclass(frozen=True)
class BucketCount:
    split: str
    variant: str
    dataset: str
    facet: str  # one of FACETS
    bucket: str
    n: int
    n_errors: int
    dataset_n: int
    dataset_errors: int

    @property
    def error_rate(self) -> float:
        return self.n_errors / self.n

    @property
    def share_of_errors(self) -> float:
        return self.n_errors / self.dataset_errors if self.dataset_errors else float("nan")

    @property
    def share_of_images(self) -> float:
        return self.n / self.dataset_n


def size_bucket(facts: ImageFacts, crop: int) -> tuple[int, str]:
    """(rank, label) of the shorter side against the crop: padded, up to 2x, up to 4x, larger, unknown."""
    if facts.width is None or facts.height is None:
        return 4, UNKNOWN
    side = min(facts.width, facts.height)
    if side < crop:
        return 0, f"< {crop} (padded)"
    if side < 2 * crop:
        return 1, f"{crop}-{2 * crop - 1}"
    if side < 4 * crop:
        return 2, f"{2 * crop}-{4 * crop - 1}"
    return 3, f">= {4 * crop}"


def format_buckets(variant: str, originals: Sequence[str]) -> list[str]:
    """The format bucket of each image as the detector saw it: re-encoded for a format-aligned variant."""
    try:
        spec = VariantSpec.from_name(variant)
    except ValueError:
        return list(originals)
    if spec.kind is not VariantKind.FORMAT_ALIGN:
        return list(originals)
    return [f"JPEG q{spec.quality} (was {original})" for original in originals]


def analyse_errors(scored: ScoredSplit, facts: Sequence[ImageFacts], crop: int | None) -> list[BucketCount]:
    """Bucket counts of every dataset of a scored split; ``facts`` is row-aligned with it."""
    if len(facts) != len(scored.labels):
        raise ValueError(f"{len(facts)} image facts for {len(scored.labels)} scored rows")
    wrong = (scored.scores > DEFAULT_THRESHOLD) != (scored.labels == 1)
    sizes = [size_bucket(fact, crop or DEFAULT_CROP) for fact in facts]
    size_rank = {label: rank for rank, label in sizes}
    facets = {
        "label": np.where(scored.labels == 1, "fake", "real"),
        "size": np.asarray([label for _, label in sizes], dtype=object),
        "format": np.asarray(format_buckets(scored.variant, [fact.format for fact in facts]), dtype=object),
    }
    counts = []
    for dataset in scored.dataset_names():
        rows = scored.datasets == dataset
        dataset_n, dataset_errors = int(rows.sum()), int(wrong[rows].sum())
        for facet in FACETS:
            values = facets[facet][rows]
            buckets = list(dict.fromkeys(values.tolist()))
            if facet == "label":
                buckets = [b for b in ("real", "fake") if b in buckets]
            elif facet == "size":
                buckets.sort(key=size_rank.__getitem__)
            else:
                buckets.sort(key=lambda b: (b == UNKNOWN, -int(np.sum(values == b)), b))
            for bucket in buckets:
                inside = values == bucket
                counts.append(
                    BucketCount(
                        scored.split,
                        scored.variant,
                        dataset,
                        facet,
                        str(bucket),
                        int(inside.sum()),
                        int(wrong[rows][inside].sum()),
                        dataset_n,
                        dataset_errors,
                    )
                )
    return counts


class ImageFactsFinder:
    """Facts of scored rows: the audit's records first, else the headers under the data root (read once each)."""

    def __init__(self, audited: Mapping[tuple[str, str], ImageFacts], workers: int = HEADER_WORKERS) -> None:
        self.audited = audited
        self.workers = workers
        self.read: dict[Path, ImageFacts] = {}

    def facts(self, scored: ScoredSplit, data_root: Path | None) -> list[ImageFacts]:
        """Row-aligned facts of ``scored``; ``data_root`` None: the audit's records or unknown."""
        keys = list(zip(scored.datasets.tolist(), scored.paths.tolist()))
        if data_root is None:
            return [self.audited.get(key, UNKNOWN_FACTS) for key in keys]
        files = [data_root / path for _, path in keys]
        todo = list(dict.fromkeys(f for key, f in zip(keys, files) if key not in self.audited and f not in self.read))
        for path, header in zip(todo, read_headers(todo, self.workers, False, "headers")):
            self.read[path] = (
                UNKNOWN_FACTS if header.error else ImageFacts(header.format or UNKNOWN, header.width, header.height)
            )
        return [self.audited.get(key) or self.read[f] for key, f in zip(keys, files)]
