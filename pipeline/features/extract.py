"""Stage one: images of a split -> CLIP block tokens in feature stores.

:func:`extract_shards` is the loop, and it knows neither CLIP nor Zarr. It
takes three parts, which :func:`run_extract` wires up (tests pass fakes):

* a pixel source (:class:`ImageSource`): decodes each image once, in a
  thread pool a bounded number of batches ahead, and turns it into the pixels
  of every variant its batch needs with a :class:`PixelRecipe` --
  ``(image, row) -> {variant: pixels}`` for a group of variants, so the ten
  crops of an image are cut once for its ten ``tencrop_i`` variants;
* a forward step (:class:`ForwardStep`): pixels -> ``{tap: tokens}`` in the
  stored dtype, one backbone pass for every tap;
* a committer (:class:`ShardCommitter`): writes each finished shard to every
  tap's store in a background thread, so writing overlaps the next shard.

A shard of rows is the unit of work, of resume and of distribution: for every
shard that some requested variant still lacks, each image is decoded once,
turned into the pixels of every missing variant, run through the backbone,
and the finished shard is committed to every tap's store that lacks it.
``pipeline predict`` drives the same loop with the same source and step, and
a committer that scores with a head.

:func:`run_extract` first trusts no flag blindly: committed shards whose
files are missing or wrong are reported and redone (``cache.damaged_shards``);
with ``retry_invalid`` the shards holding rows that failed to decode are
redone for every variant of the store. It then claims each shard before
extracting it (``claims.py``), so that any number of processes -- torchrun
ranks, ``--rank/--world-size`` processes, or runs started by hand -- share a
store: each starts with its own shards (``shard % world_size == rank``), takes
over the others' unclaimed ones, and returns when the stores are complete,
whoever did the work. A run whose share of undecodable rows exceeds
``max_invalid`` ends with :class:`TooManyInvalid`, keeping the store.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from .. import __version__, cache
from ..errors import PipelineError
from ..names import (
    DEFAULT_ALIGN_QUALITY,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_CLAIM_TIMEOUT,
    DEFAULT_MAX_INVALID,
    DEFAULT_MAX_PIXELS,
    DEFAULT_SHARD_ROWS,
    FORMAT_ALIGN,
    PERTURB_PRESETS,
    PERTURBATIONS,
    STORE_DTYPES,
    TAPS,
)
from ..variants import VariantKind, VariantSpec, ten_crop_variants
from . import images
from .backbone import Backbone, BackboneConfig, BlockSelectionError
from .claims import ShardClaims
from .manifest import Manifest, check_split_name, read_manifest

FAILURE_EXAMPLES = 10
CLAIM_POLL_SECONDS = 2.0  # how often a process that has nothing left to claim looks again
# Perturbation p of row r draws from view_rng(seed, r, PERTURB_STREAM + index of p in PERTURBATIONS):
# streams apart from the training views 0, 1, ...
PERTURB_STREAM = 1000


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
    store_dtype: str = "float16"
    views: int = 1
    augment: bool | None = None  # None: augment when the split name starts with "train"
    perturbation: str | None = None  # one of PERTURBATIONS, or FORMAT_ALIGN
    perturb_preset: str = "official"
    align_quality: int = DEFAULT_ALIGN_QUALITY  # JPEG quality of the format-align variant
    ten_crop: bool = False  # evaluation by ten crops (large images, e.g. Synthbuster)
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

    def is_training(self) -> bool:
        """Training splits get seeded augmented views, others the center crop."""
        return self.split.startswith("train") if self.augment is None else self.augment

    def variants(self) -> tuple[VariantSpec, ...]:
        if self.perturbation == FORMAT_ALIGN:
            return (VariantSpec.format_aligned(self.align_quality),)
        if self.perturbation is not None:
            return (VariantSpec.perturbed(self.perturbation, self.perturb_preset),)
        if self.is_training():
            return tuple(VariantSpec.train_view(v) for v in range(self.views))
        if self.ten_crop:
            return ten_crop_variants()
        return (VariantSpec.center(),)

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
        if min(self.views, self.batch_size, self.decode_workers, self.shard_rows, self.chunk_rows, self.max_pixels) < 1:
            raise OptionError(
                "--views, --batch-size, --workers, --shard-rows, --chunk-rows and --max-pixels must be at least 1"
            )
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
        if self.views > 1 and not self.is_training():
            raise OptionError(
                f"--views {self.views} asks for augmented views, but {self.split!r} is not a training split; add --augment"
            )
        if self.shard_rows % self.chunk_rows:
            raise OptionError(
                f"--chunk-rows {self.chunk_rows} must divide --shard-rows {self.shard_rows} "
                f"(a shard holds whole inner chunks; e.g. --chunk-rows {np.gcd(self.shard_rows, self.chunk_rows)})"
            )
        if self.store_dtype not in STORE_DTYPES:
            raise OptionError(f"unknown store dtype {self.store_dtype!r}; choose from {STORE_DTYPES}")
        if self.perturbation is not None and self.perturbation not in (*PERTURBATIONS, FORMAT_ALIGN):
            raise OptionError(
                f"unknown perturbation {self.perturbation!r}; choose from {PERTURBATIONS + (FORMAT_ALIGN,)}"
            )
        if not 1 <= self.align_quality <= 100:
            raise OptionError(f"--align-quality must be in 1..100, got {self.align_quality}")
        if self.perturb_preset not in PERTURB_PRESETS:
            raise OptionError(f"unknown perturbation preset {self.perturb_preset!r}; choose from {PERTURB_PRESETS}")
        if self.perturbation is not None and self.is_training():
            raise OptionError("perturbations are for evaluation splits; pass --no-augment")
        if self.ten_crop and (self.perturbation is not None or self.is_training()):
            raise OptionError("--ten-crop is an evaluation crop: not with --perturb or a training split")


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


# ---------------------------------------------------------------- pixels


@dataclass(frozen=True)
class PixelRecipe:
    """``(decoded image, row) -> {variant: (crop, crop, 3) uint8}`` for a group of variants.

    Each kind as in the authors' code: the center crop without resizing; the
    training recipe drawn from ``view_rng(seed, row, view)``; torchvision's
    ten crops, cut once per call for every ``tencrop_i`` asked for; a
    perturbation drawn from ``view_rng(seed, row, PERTURB_STREAM + its
    index)`` followed by the center crop; the format-align re-encoding
    (``images.format_align``, no randomness) followed by the center crop.
    """

    variants: tuple[VariantSpec, ...]
    crop: int
    seed: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(variant.name for variant in self.variants)

    def __call__(self, image: np.ndarray, row: int) -> dict[str, np.ndarray]:
        pixels: dict[str, np.ndarray] = {}
        ten_crops = None
        for variant in self.variants:
            if variant.kind is VariantKind.CENTER:
                pixels[variant.name] = images.center_crop(image, self.crop)
            elif variant.kind is VariantKind.TRAIN_VIEW:
                rng = images.view_rng(self.seed, row, variant.index)
                pixels[variant.name] = images.augment_train_view(image, self.crop, rng)
            elif variant.kind is VariantKind.TEN_CROP:
                if ten_crops is None:
                    ten_crops = images.ten_crop(image, self.crop)
                pixels[variant.name] = ten_crops[variant.index]
            elif variant.kind is VariantKind.FORMAT_ALIGN:
                assert variant.quality is not None
                pixels[variant.name] = images.center_crop(images.format_align(image, variant.quality), self.crop)
            else:
                assert variant.perturbation is not None and variant.preset is not None
                rng = images.view_rng(self.seed, row, PERTURB_STREAM + PERTURBATIONS.index(variant.perturbation))
                perturbed = images.perturb_image(image, variant.perturbation, variant.preset, rng)
                pixels[variant.name] = images.center_crop(perturbed, self.crop)
        return pixels


@dataclass(frozen=True)
class BatchWork:
    """One batch of rows of one shard, and the recipe of the variants that shard still lacks."""

    shard: int
    rows: np.ndarray
    recipe: PixelRecipe
    closes_shard: bool  # the shard's last batch: its features can be committed after it


@dataclass(frozen=True)
class PixelBatch:
    """Pixels of one batch, per variant of its recipe; invalid rows hold zeros."""

    work: BatchWork
    pixels: dict[str, np.ndarray]  # variant -> (B, S, S, 3) uint8
    valid: np.ndarray
    errors: tuple[str, ...]
    decode_seconds: float


def plan_batches(recipes: Mapping[int, PixelRecipe], n_rows: int, shard_rows: int, batch_size: int) -> list[BatchWork]:
    """The batches of the given shards (``shard -> recipe``), in shard order."""
    work = []
    for shard in sorted(recipes):
        start, stop = cache.shard_bounds(shard, n_rows, shard_rows)
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            work.append(BatchWork(shard, np.arange(lo, hi), recipes[shard], closes_shard=hi == stop))
    return work


class PixelSource(Protocol):
    def batches(self, work: Iterable[BatchWork]) -> Iterator[PixelBatch]: ...


class ImageSource:
    """Decodes rows' image files and applies their recipe, in a thread pool a few batches ahead.

    A file that cannot be decoded (``images.ImageDecodeError``) leaves its row
    invalid with the reason; every other exception stops the run.
    """

    def __init__(self, image_path: Callable[[int], Path], max_pixels: int, workers: int) -> None:
        self.image_path = image_path
        self.max_pixels = max_pixels
        self.workers = workers

    def load(self, work: BatchWork) -> PixelBatch:
        start = time.perf_counter()
        crop = work.recipe.crop
        out = {name: np.zeros((len(work.rows), crop, crop, 3), dtype=np.uint8) for name in work.recipe.names}
        valid = np.zeros(len(work.rows), dtype=bool)
        errors = []
        for i, row in enumerate(work.rows.tolist()):
            try:
                image = images.decode_image(self.image_path(row), self.max_pixels)
                for name, pixels in work.recipe(image, row).items():
                    out[name][i] = pixels
                valid[i] = True
                errors.append("")
            except images.ImageDecodeError as error:
                errors.append(str(error) or type(error).__name__)
        return PixelBatch(work, out, valid, tuple(errors), time.perf_counter() - start)

    def batches(self, work: Iterable[BatchWork]) -> Iterator[PixelBatch]:
        """Yield batches in order, keeping ``workers + 1`` in flight."""
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            pending: deque[Future[PixelBatch]] = deque()
            items = iter(work)
            for item in items:
                pending.append(pool.submit(self.load, item))
                if len(pending) > self.workers:
                    break
            while pending:
                batch = pending.popleft().result()
                for item in items:
                    pending.append(pool.submit(self.load, item))
                    break
                yield batch


# ---------------------------------------------------------------- backbone step


class ForwardStep:
    """(B, S, S, 3) uint8 pixels -> ``{tap: (B, n_blocks, dim)}`` numpy tokens in ``dtype``."""

    def __init__(self, backbone: Backbone, taps: Sequence[str], dtype: str | np.dtype) -> None:
        self.backbone = backbone
        self.taps = tuple(taps)
        self.dtype = np.dtype(dtype)

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        tokens = self.backbone.forward_taps(pixels, self.taps)
        return {tap: value.float().cpu().numpy().astype(self.dtype, copy=False) for tap, value in tokens.items()}


# ---------------------------------------------------------------- committing


@dataclass(frozen=True)
class FinishedShard:
    """Every row of one shard: tokens per (tap, variant), zero for invalid rows."""

    shard: int
    features: dict[tuple[str, str], np.ndarray]
    valid: np.ndarray
    errors: tuple[str, ...]


class Committer(Protocol):
    seconds: float  # time spent committing

    def submit(self, finished: FinishedShard) -> None: ...

    def close(self) -> None:
        """Wait until every submitted shard is committed (raising its error, if any)."""


@dataclass(frozen=True)
class ShardJob:
    """What one claimed shard is extracted for: tap -> the variants its store lacks there; the claims held on it."""

    targets: dict[str, tuple[str, ...]]
    claims: tuple[Path, ...] = ()


class ShardCommitter:
    """Commits finished shards to each tap's store in one background thread, at most one queued.

    ``jobs`` (filled as shards are claimed) says which variants go to which
    tap's store; after a shard is committed its claims are released.
    """

    def __init__(self, stores: dict[str, Path], jobs: Mapping[int, ShardJob], claims: ShardClaims | None = None):
        self.stores = stores
        self.jobs = jobs
        self.claims = claims
        self.seconds = 0.0
        self.committed: list[int] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="write")
        self._last: Future[None] | None = None

    def submit(self, finished: FinishedShard) -> None:
        self._wait()
        self._last = self._pool.submit(self._commit, finished)

    def _commit(self, finished: FinishedShard) -> None:
        start = time.perf_counter()
        job = self.jobs[finished.shard]
        for tap, variants in job.targets.items():
            features = {variant: finished.features[(tap, variant)] for variant in variants}
            cache.commit_shard(self.stores[tap], finished.shard, features, finished.valid, finished.errors)
        if self.claims is not None:
            self.claims.release(job.claims)
        self.committed.append(finished.shard)
        self.seconds += time.perf_counter() - start

    def _wait(self) -> None:
        if self._last is not None:
            self._last.result()
            self._last = None

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)


# ---------------------------------------------------------------- the loop


def extract_shards(
    work: Sequence[BatchWork],
    source: PixelSource,
    step: Callable[[np.ndarray], dict[str, np.ndarray]],
    committer: Committer,
    *,
    fail_fast: bool = False,
    progress: Callable[[int], object] | None = None,
) -> StageTimes:
    """Pixels of ``work`` -> ``step`` per variant -> one ``FinishedShard`` per shard to ``committer``.

    ``work`` lists each shard's batches in order, the last one marked
    ``closes_shard``. Tokens of invalid rows are zeroed. With ``fail_fast``
    the first invalid row raises :class:`BadImageStop` before its shard is
    committed (shards committed before stay). ``committer`` is closed in
    every case; ``progress`` is called with each batch's row count.
    """
    times = StageTimes()
    wall_start = time.perf_counter()
    features: dict[tuple[str, str], list[np.ndarray]] = {}
    valid: list[np.ndarray] = []
    errors: list[str] = []
    shard: int | None = None
    try:
        waited = time.perf_counter()
        for batch in source.batches(work):
            times.wait_for_pixels += time.perf_counter() - waited
            times.decode += batch.decode_seconds
            if shard is not None and batch.work.shard != shard:
                raise ValueError(f"shard {shard}'s work ended without a batch that closes it")
            shard = batch.work.shard
            if fail_fast and not batch.valid.all():
                first = int(np.argmin(batch.valid))
                raise BadImageStop(int(batch.work.rows[first]), batch.errors[first])
            start = time.perf_counter()
            for variant, pixels in batch.pixels.items():
                for tap, tokens in step(pixels).items():
                    if not batch.valid.all():
                        tokens = tokens.copy()
                        tokens[~batch.valid] = 0
                    features.setdefault((tap, variant), []).append(tokens)
            times.backbone += time.perf_counter() - start
            valid.append(batch.valid)
            errors.extend(batch.errors)
            if batch.work.closes_shard:
                joined = {key: np.concatenate(parts) for key, parts in features.items()}
                start = time.perf_counter()
                committer.submit(FinishedShard(shard, joined, np.concatenate(valid), tuple(errors)))
                times.wait_for_writes += time.perf_counter() - start
                features, valid, errors, shard = {}, [], [], None
            if progress is not None:
                progress(len(batch.work.rows))
            waited = time.perf_counter()
    finally:
        start = time.perf_counter()
        committer.close()
        times.wait_for_writes += time.perf_counter() - start
    times.write = committer.seconds
    times.wall = time.perf_counter() - wall_start
    return times


# ---------------------------------------------------------------- stores


def run_extract(config: ExtractConfig) -> ExtractSummary:
    """Extract the split into one store per tap; resumable and shareable, see module doc.

    Raises :class:`OptionError` for options that do not fit (before any store
    is written), :class:`TooManyInvalid` (carrying the summary) when more than
    ``max_invalid`` of the rows could not be decoded.
    """
    config.validate()
    wall_start = time.perf_counter()
    manifest = read_manifest(config.manifest)
    if config.data_root is None and manifest.data_root is None:
        raise ExtractError(f"{config.manifest}: no data root recorded; pass --data-root")
    backbone = load_backbone(config)
    stores = {tap: prepare_store(config, manifest, backbone, tap, config.variants()) for tap in config.taps}
    wanted = {tap: tuple(variant.name for variant in config.variants()) for tap in config.taps}
    notes = unflag_damaged_shards(stores, wanted)
    if config.retry_invalid:
        wanted = {
            tap: tuple(dict.fromkeys([*names, *cache.open_store_info(stores[tap]).variants]))
            for tap, names in wanted.items()
        }
        notes += unflag_invalid_shards(stores)
    source = ImageSource(lambda row: manifest.resolve(row, config.data_root), config.max_pixels, config.decode_workers)
    step = ForwardStep(backbone, config.taps, config.store_dtype)
    pending = pending_targets(stores, wanted)
    n_shards = cache.shard_count(len(manifest), config.shard_rows)
    first_pending = len(pending)
    with (
        ShardClaims(config.rank, config.claim_timeout) as claims,
        tqdm(
            total=sum(len(rows) for rows in shard_rows(pending, len(manifest), config.shard_rows)),
            unit="img",
            desc=f"extract {config.split}"
            + (f" [rank {config.rank}/{config.world_size}]" if config.world_size > 1 else ""),
            disable=not config.progress,
            smoothing=0.05,
        ) as bar,
    ):
        done, times = extract_claimed_shards(config, manifest, backbone, stores, wanted, claims, source, step, bar)
    times.wall = time.perf_counter() - wall_start
    summary = ExtractSummary(
        stores=stores,
        n_rows=len(manifest),
        shards_done=len(done),
        shards_skipped=n_shards - first_pending,
        images_processed=sum(len(rows) for rows in shard_rows(dict.fromkeys(done), len(manifest), config.shard_rows)),
        failures=collect_failures(next(iter(stores.values()))),
        times=times,
        shards_by_others=first_pending - len(done),
        notes=tuple(notes),
    )
    if summary.n_invalid > config.max_invalid * summary.n_rows:
        raise TooManyInvalid(summary, config.max_invalid)
    return summary


def load_backbone(config: ExtractConfig) -> Backbone:
    try:
        return Backbone(config.backbone, config.block_selection)
    except BlockSelectionError as error:
        raise OptionError(f"--blocks: {error}") from None
    except (OSError, ValueError) as error:
        raise ExtractError(f"{config.backbone.model}: cannot load the backbone ({error})") from None


def shard_rows(shards: Mapping[int, object], n_rows: int, rows_per_shard: int) -> list[range]:
    return [range(*cache.shard_bounds(shard, n_rows, rows_per_shard)) for shard in shards]


def extract_claimed_shards(
    config: ExtractConfig,
    manifest: Manifest,
    backbone: Backbone,
    stores: dict[str, Path],
    wanted: Mapping[str, tuple[str, ...]],
    claims: ShardClaims,
    source: PixelSource,
    step: Callable[[np.ndarray], dict[str, np.ndarray]],
    bar: tqdm,
) -> tuple[list[int], StageTimes]:
    """Extract every shard some store still lacks, claiming each first; until no shard is pending anywhere.

    In rounds: each round claims and extracts what it can (this rank's own
    shards first, ``shard % world_size == rank``, then the others from the
    end), commits, and releases its claims; a round that could claim nothing
    (other processes hold the rest) waits and looks again, taking over stale
    claims. So every process returns once the stores are complete, whoever
    did the work.
    """
    done: list[int] = []
    times = StageTimes()
    previous = pending_targets(stores, wanted)
    while previous:
        jobs: dict[int, ShardJob] = {}
        order = shard_order(sorted(previous), config.rank, config.world_size)
        work = claimed_batches(order, previous, stores, claims, jobs, backbone.crop_size, config, len(manifest))
        committer = ShardCommitter(stores, jobs, claims)
        try:
            round_times = extract_shards(work, source, step, committer, fail_fast=config.fail_fast, progress=bar.update)
        except BadImageStop as stop:
            path = manifest.rows[stop.row].path
            raise ExtractError(f"{path}: {stop.reason} (stopped by --fail-fast; committed shards are kept)") from None
        done += committer.committed
        for name in ("decode", "backbone", "write", "wait_for_pixels", "wait_for_writes"):
            setattr(times, name, getattr(times, name) + getattr(round_times, name))
        pending = pending_targets(stores, wanted)
        by_others = set(previous) - set(pending) - set(committer.committed)
        bar.update(sum(len(rows) for rows in shard_rows(dict.fromkeys(by_others), len(manifest), config.shard_rows)))
        if pending and not jobs:
            time.sleep(CLAIM_POLL_SECONDS)
        previous = pending
    return done, times


def shard_order(shards: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's own shards in order, then every other shard from the end (where their owners get last)."""
    own = [shard for shard in shards if shard % world_size == rank]
    return own + [shard for shard in reversed(shards) if shard % world_size != rank]


def claimed_batches(
    order: Sequence[int],
    pending: Mapping[int, dict[str, tuple[str, ...]]],
    stores: Mapping[str, Path],
    claims: ShardClaims,
    jobs: dict[int, ShardJob],
    crop: int,
    config: ExtractConfig,
    n_rows: int,
) -> Iterator[BatchWork]:
    """The batches of each shard in ``order`` that this process could claim (recorded in ``jobs``); others are skipped."""
    for shard in order:
        targets = still_pending(stores, pending[shard], shard)
        if not targets:
            continue
        paths = [cache.claims_folder(stores[tap]) / f"{v}.{shard:06d}" for tap, names in targets.items() for v in names]
        if not claims.try_claim(paths):
            continue
        targets = still_pending(stores, targets, shard)  # committed by another process just before the claim
        if not targets:
            claims.release(paths)
            continue
        jobs[shard] = ShardJob(targets, tuple(paths))
        variants = tuple(
            VariantSpec.from_name(v) for v in dict.fromkeys(v for names in targets.values() for v in names)
        )
        recipe = PixelRecipe(variants, crop, config.seed)
        yield from plan_batches({shard: recipe}, n_rows, config.shard_rows, config.batch_size)


def still_pending(
    stores: Mapping[str, Path], targets: Mapping[str, tuple[str, ...]], shard: int
) -> dict[str, tuple[str, ...]]:
    """``targets`` without the variants whose shard is committed by now."""
    fresh = {
        tap: tuple(v for v in names if not cache.shard_done(stores[tap], v, shard)) for tap, names in targets.items()
    }
    return {tap: names for tap, names in fresh.items() if names}


def pending_targets(
    stores: Mapping[str, Path], wanted: Mapping[str, Sequence[str]]
) -> dict[int, dict[str, tuple[str, ...]]]:
    """Shard -> {tap: the wanted variants that tap's store still lacks there}; shards lacking none are left out."""
    pending: dict[int, dict[str, list[str]]] = {}
    for tap, names in wanted.items():
        for name in names:
            for shard in cache.pending_shards(stores[tap], name):
                pending.setdefault(shard, {}).setdefault(tap, []).append(name)
    return {shard: {tap: tuple(names) for tap, names in targets.items()} for shard, targets in sorted(pending.items())}


def unflag_damaged_shards(stores: Mapping[str, Path], wanted: Mapping[str, Sequence[str]]) -> list[str]:
    """Shards marked done whose files are missing or wrong: reported, and unflagged so that this run redoes them."""
    notes = []
    for tap, path in stores.items():
        problems = cache.damaged_shards(path, wanted[tap])
        if not problems:
            continue
        redo: dict[str, set[int]] = {}
        for problem in problems:
            redo.setdefault(problem.variant or "", set()).add(problem.shard)
        cache.unflag_shards(path, {variant: sorted(shards) for variant, shards in redo.items()})
        notes.append(f"{path}: {len(problems)} problem(s) in shards marked done; re-extracting them:")
        notes += [f"  {problem.describe(path)}" for problem in problems[:FAILURE_EXAMPLES]]
    return notes


def unflag_invalid_shards(stores: Mapping[str, Path]) -> list[str]:
    """--retry-invalid: every committed shard holding an invalid row is unflagged for all its variants, to be redone."""
    notes = []
    for path in stores.values():
        info = cache.open_store_info(path)
        rows = cache.read_rows(path)
        invalid = cache.committed_rows(info) & ~rows.valid
        shards = sorted(set((np.flatnonzero(invalid) // info.identity.shard_rows).tolist()))
        if shards:
            cache.unflag_shards(path, {variant: shards for variant in info.variants})
            notes.append(f"{path}: retrying {int(invalid.sum())} invalid rows in {len(shards)} shard(s)")
    return notes


def collect_failures(path: Path) -> tuple[tuple[str, str], ...]:
    """(path, reason) of every image the store records as unusable, this run's and earlier ones'."""
    rows = cache.read_rows(path)
    bad = np.flatnonzero(cache.committed_rows(cache.open_store_info(path)) & ~rows.valid)
    return tuple((str(rows.paths[i]), str(rows.errors[i])) for i in bad)


def prepare_store(
    config: ExtractConfig,
    manifest: Manifest,
    backbone: Backbone,
    tap: str,
    variants: Sequence[VariantSpec],
) -> Path:
    """Create the tap's store, or check that an existing one matches (race-free across processes); add variants."""
    path = store_path(config, tap)
    identity = cache.StoreIdentity(
        manifest_sha256=manifest.sha256(),
        model_id=config.backbone.model,
        model_revision=backbone.revision,
        model_config=backbone.model_config,
        tap=tap,
        block_indices=backbone.block_indices,
        dim=backbone.dim,
        crop_size=backbone.crop_size,
        mean=backbone.mean,
        std=backbone.std,
        dtype=config.store_dtype,
        compute_dtype=str(backbone.dtype).removeprefix("torch."),
        seed=config.seed,
        max_pixels=config.max_pixels,
        shard_rows=config.shard_rows,
        chunk_rows=config.chunk_rows,
    )
    try:
        cache.create_store(
            path,
            identity,
            split=config.split,
            labels=[r.label for r in manifest.rows],
            paths=[r.path for r in manifest.rows],
            datasets=[r.dataset for r in manifest.rows],
            classes=[r.class_name for r in manifest.rows] if manifest.has_classes() else None,
            extra_attrs={
                "training": config.is_training(),
                "manifest": str(config.manifest),
                "data_root": str(config.data_root or manifest.data_root),
                "n_layers": backbone.n_layers,
                "package_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            if_exists="replace" if config.overwrite else "check",
        )
    except cache.StoreError as error:
        raise ExtractError(str(error)) from None
    for variant in variants:
        cache.add_variant(path, variant, len(backbone.block_indices), backbone.dim)
    return path
