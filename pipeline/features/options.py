"""What `pipeline extract` is asked to do (``ExtractConfig``, checked before anything is written), its errors, and what it reports."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import cache
from ..errors import PipelineError
from ..names import (
    CENTER,
    DEFAULT_ALIGN_QUALITY,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_CLAIM_TIMEOUT,
    DEFAULT_MAX_INVALID,
    DEFAULT_MAX_PIXELS,
    DEFAULT_PERTURB_PRESET,
    DEFAULT_SHARD_ROWS,
    DEFAULT_STORE_DTYPE,
    FORMAT_ALIGN,
    STORE_DTYPES,
    TAPS,
    TEN_CROP,
)
from ..variants import VariantGroup, VariantSpec
from .backbone import BackboneConfig
from .manifest import check_split_name

FAILURE_EXAMPLES = 10


class ExtractError(PipelineError, RuntimeError):
    """Extraction stopped (bad arguments, or --fail-fast on a bad image)."""


class OptionError(ExtractError):
    """Options that cannot work together or do not fit the model (the command exits 2)."""


class TooManyInvalid(ExtractError):
    """More rows than ``max_invalid`` could not be decoded; the store keeps all that was done."""

    def __init__(self, summary: ExtractSummary, max_invalid: float) -> None:
        share = summary.n_invalid / max(summary.n_rows, 1)
        super().__init__(
            f"{summary.n_invalid} of {summary.n_rows} rows ({share:.1%}) could not be decoded, more than "
            f"--max-invalid {max_invalid:.1%} (a wrong --data-root?). The store keeps them as invalid; fix the "
            "files or --data-root and run again with --retry-invalid"
        )
        self.summary = summary


class BadImageStop(ExtractError):
    """``fail_fast`` met an image that cannot be used: its row and the reason."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(f"row {row}: {reason}")
        self.row = row
        self.reason = reason


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `pipeline extract` needs, resolved from the command line."""

    split: str
    manifest: Path
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data_root: Path | None = None
    taps: tuple[str, ...] = ("ln2",)
    block_selection: str = "all"  # all, last:K or a comma list (backbone.parse_block_selection)
    cache_dir: Path = Path("cache")
    out: Path | None = None
    batch_size: int = 32
    store_dtype: str = DEFAULT_STORE_DTYPE
    # what is made of every image; None: by the split's name, augmented views (one) for a name starting with
    # "train", the center crop otherwise (variant_group_of builds one from the command's options)
    variant_group: VariantGroup | None = None
    seed: int = 0
    shard_rows: int = DEFAULT_SHARD_ROWS
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    decode_workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    fail_fast: bool = False
    overwrite: bool = False
    progress: bool = True
    max_invalid: float = DEFAULT_MAX_INVALID  # share of rows that may fail to decode before the run fails
    retry_invalid: bool = False  # re-extract the shards holding invalid rows
    rank: int = 0  # this process among world_size processes sharing the work (torchrun, SLURM, ...)
    world_size: int = 1
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT  # seconds after which a claim not refreshed is taken over

    @property
    def group(self) -> VariantGroup:
        """The variants made of every image (see ``variant_group``)."""
        if self.variant_group is not None:
            return self.variant_group
        return VariantGroup.views(1) if self.split.startswith("train") else VariantGroup.center()

    def is_training(self) -> bool:
        """Training splits get seeded augmented views, others evaluation pixels."""
        return self.group.is_training

    def variants(self) -> tuple[VariantSpec, ...]:
        return self.group.members

    def validate(self) -> None:
        """Refuse options that cannot work together (:class:`OptionError`: exit status 2), before anything is written."""
        try:
            check_split_name(self.split)
        except ValueError as error:
            raise OptionError(str(error)) from None
        if not self.taps or set(self.taps) - set(TAPS):
            raise OptionError(f"taps must be a non-empty subset of {TAPS}, got {self.taps}")
        if self.out is not None and len(self.taps) != 1:
            raise OptionError("--out names one store, so it takes exactly one --tap")
        if min(self.batch_size, self.decode_workers, self.shard_rows, self.chunk_rows, self.max_pixels) < 1:
            raise OptionError("--batch-size, --workers, --shard-rows, --chunk-rows and --max-pixels must be at least 1")
        if self.seed < 0:
            raise OptionError(f"--seed must be 0 or more (it seeds numpy's SeedSequence), got {self.seed}")
        if not 0.0 <= self.max_invalid <= 1.0:
            raise OptionError(f"--max-invalid is a share of rows in [0, 1], got {self.max_invalid}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise OptionError(f"--rank {self.rank} must be in [0, --world-size {self.world_size})")
        if self.overwrite and self.world_size > 1:
            raise OptionError(
                "--overwrite deletes the store, which other ranks are writing: rebuild it with one process, "
                "or delete it before starting the ranks"
            )
        if self.claim_timeout <= 0:
            raise OptionError(f"--claim-timeout must be positive, got {self.claim_timeout}")
        if self.shard_rows % self.chunk_rows:
            raise OptionError(
                f"--chunk-rows {self.chunk_rows} must divide --shard-rows {self.shard_rows} "
                f"(a shard holds whole inner chunks; e.g. --chunk-rows {np.gcd(self.shard_rows, self.chunk_rows)})"
            )
        if self.store_dtype not in STORE_DTYPES:
            raise OptionError(f"unknown store dtype {self.store_dtype!r}; choose from {STORE_DTYPES}")


def variant_group_of(
    split: str,
    *,
    views: int = 1,
    augment: bool | None = None,
    perturbation: str | None = None,
    preset: str = DEFAULT_PERTURB_PRESET,
    align_quality: int = DEFAULT_ALIGN_QUALITY,
    crop: str = CENTER,
) -> VariantGroup:
    """The group `pipeline extract`'s options ask for; :class:`OptionError` for options that do not fit together.

    ``augment`` (default: the split's name starts with "train") makes ``views`` training views; otherwise a
    ``perturbation`` (one of ``PERTURBATIONS``, or ``FORMAT_ALIGN`` at ``align_quality``) or the ``crop``
    (``center`` or ``tencrop``) of an evaluation split.
    """
    training = split.startswith("train") if augment is None else augment
    if views < 1:
        raise OptionError(f"--views must be at least 1, got {views}")
    if crop not in (CENTER, TEN_CROP):
        raise OptionError(f"--crop {crop!r}: extraction takes {CENTER} or {TEN_CROP}")
    if training:
        if perturbation is not None:
            raise OptionError("perturbations are for evaluation splits; pass --no-augment")
        if crop == TEN_CROP:
            raise OptionError(f"--crop {TEN_CROP} is an evaluation crop: not with a training split (pass --no-augment)")
        return VariantGroup.views(views)
    if views > 1:
        raise OptionError(
            f"--views {views} asks for augmented views, but {split!r} is not a training split; add --augment"
        )
    if perturbation is not None and crop == TEN_CROP:
        raise OptionError(f"--crop {TEN_CROP} is an evaluation crop of the images as they are: not with --perturb")
    try:
        if perturbation == FORMAT_ALIGN:
            return VariantGroup.format_aligned(align_quality)
        if perturbation is not None:
            return VariantGroup.perturbed(perturbation, preset)
    except ValueError as error:
        raise OptionError(str(error)) from None
    return VariantGroup.from_name(crop)


def store_path(config: ExtractConfig, tap: str) -> Path:
    if config.out is not None:
        return config.out
    return cache.default_store_path(config.cache_dir, config.backbone.model, tap, config.split)


@dataclass
class StageTimes:
    """Seconds spent per stage; decoding and writing overlap with the backbone.

    ``wait_for_pixels`` and ``wait_for_writes`` are what the overlap left on
    the loop's path: the time it waited for decoded batches, and for the
    committer (a shard handed over while the previous one was still being
    written, and the last shard's write).
    """

    decode: float = 0.0
    backbone: float = 0.0
    write: float = 0.0
    wait_for_pixels: float = 0.0
    wait_for_writes: float = 0.0
    wall: float = 0.0


@dataclass(frozen=True)
class ExtractSummary:
    stores: dict[str, Path]
    n_rows: int
    shards_done: int
    shards_skipped: int
    images_processed: int
    failures: tuple[tuple[str, str], ...]
    times: StageTimes
    shards_by_others: int = 0
    notes: tuple[str, ...] = ()  # repairs and retries done before extracting

    @property
    def n_invalid(self) -> int:
        return len(self.failures)

    def report(self) -> str:
        t = self.times
        rate = self.images_processed / t.wall if t.wall > 0 else 0.0
        others = f", {self.shards_by_others} by other processes" if self.shards_by_others else ""
        lines = [
            *self.notes,
            f"{self.n_rows} rows; {self.shards_done} shards extracted, {self.shards_skipped} already done{others}; "
            f"{self.images_processed} images in {t.wall:.1f} s ({rate:.1f} img/s)",
            f"time: decoding {t.decode:.1f} s (in {t.wait_for_pixels:.1f} s of waiting), "
            f"backbone {t.backbone:.1f} s, writing {t.write:.1f} s (in {t.wait_for_writes:.1f} s of waiting)",
        ]
        if self.failures:
            reasons = Counter(reason for _, reason in self.failures)
            lines.append(f"{len(self.failures)} images could not be used (recorded with valid=false):")
            for reason, count in reasons.most_common():
                lines.append(f"  {count:>6} x {reason}")
            for path, reason in self.failures[:FAILURE_EXAMPLES]:
                lines.append(f"  e.g. {path}: {reason}")
            lines.append("  `pipeline cache info STORE` lists them all")
        return "\n".join(lines)
