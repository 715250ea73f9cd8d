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

A shard of rows is the unit of work and of resume: for every shard that some
requested variant still lacks, each image is decoded once, turned into the
pixels of every missing variant, run through the backbone, and the finished
shard is committed to every tap's store. ``pipeline predict`` drives the same
loop with the same source and step, and a committer that scores with a head.
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

from . import __version__, cache, images
from .backbone import Backbone, BackboneConfig
from .cache import STORE_DTYPES, TAPS
from .errors import PipelineError
from .manifest import Manifest, read_manifest
from .variants import PERTURB_PRESETS, PERTURBATIONS, VariantKind, VariantSpec, ten_crop_variants

FAILURE_EXAMPLES = 10
# Perturbation p of row r draws from view_rng(seed, r, PERTURB_STREAM + index of p in PERTURBATIONS):
# streams apart from the training views 0, 1, ...
PERTURB_STREAM = 1000


class ExtractError(PipelineError, RuntimeError):
    """Extraction stopped (bad arguments, or --fail-fast on a bad image)."""


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
    perturbation: str | None = None
    perturb_preset: str = "official"
    ten_crop: bool = False  # evaluation by ten crops (large images, e.g. Synthbuster)
    seed: int = 0
    shard_rows: int = cache.DEFAULT_SHARD_ROWS
    chunk_rows: int = cache.DEFAULT_CHUNK_ROWS
    decode_workers: int = 2
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    fail_fast: bool = False
    overwrite: bool = False
    progress: bool = True

    def is_training(self) -> bool:
        """Training splits get seeded augmented views, others the center crop."""
        return self.split.startswith("train") if self.augment is None else self.augment

    def variants(self) -> tuple[VariantSpec, ...]:
        if self.perturbation is not None:
            return (VariantSpec.perturbed(self.perturbation, self.perturb_preset),)
        if self.is_training():
            return tuple(VariantSpec.train_view(v) for v in range(self.views))
        if self.ten_crop:
            return ten_crop_variants()
        return (VariantSpec.center(),)

    def validate(self) -> None:
        if not self.taps or set(self.taps) - set(TAPS):
            raise ExtractError(f"taps must be a non-empty subset of {TAPS}, got {self.taps}")
        if self.out is not None and len(self.taps) != 1:
            raise ExtractError("--out names one store, so it takes exactly one --tap")
        if min(self.views, self.batch_size, self.decode_workers, self.shard_rows, self.chunk_rows) < 1:
            raise ExtractError("--views, --batch-size, --workers, --shard-rows and --chunk-rows must be at least 1")
        if self.views > 1 and not self.is_training():
            raise ExtractError(
                f"--views {self.views} asks for augmented views, but {self.split!r} is not a training split; add --augment"
            )
        if self.shard_rows % self.chunk_rows:
            raise ExtractError(
                f"--chunk-rows {self.chunk_rows} must divide --shard-rows {self.shard_rows} "
                f"(a shard holds whole inner chunks; e.g. --chunk-rows {np.gcd(self.shard_rows, self.chunk_rows)})"
            )
        if self.store_dtype not in STORE_DTYPES:
            raise ExtractError(f"unknown store dtype {self.store_dtype!r}; choose from {STORE_DTYPES}")
        if self.perturbation is not None and self.perturbation not in PERTURBATIONS:
            raise ExtractError(f"unknown perturbation {self.perturbation!r}; choose from {PERTURBATIONS}")
        if self.perturb_preset not in PERTURB_PRESETS:
            raise ExtractError(f"unknown perturbation preset {self.perturb_preset!r}; choose from {PERTURB_PRESETS}")
        if self.perturbation is not None and self.is_training():
            raise ExtractError("perturbations are for evaluation splits; pass --no-augment")
        if self.ten_crop and (self.perturbation is not None or self.is_training()):
            raise ExtractError("--ten-crop is an evaluation crop: not with --perturb or a training split")


def store_path(config: ExtractConfig, tap: str) -> Path:
    if config.out is not None:
        return config.out
    return cache.default_store_path(config.cache_dir, config.backbone.model, tap, config.split)


@dataclass
class StageTimes:
    """Seconds spent per stage; decoding and writing overlap with the backbone."""

    decode: float = 0.0
    backbone: float = 0.0
    write: float = 0.0
    wait_for_pixels: float = 0.0
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

    def report(self) -> str:
        t = self.times
        rate = self.images_processed / t.wall if t.wall > 0 else 0.0
        lines = [
            f"{self.n_rows} rows; {self.shards_done} shards extracted, {self.shards_skipped} already done; "
            f"{self.images_processed} images in {t.wall:.1f} s ({rate:.1f} img/s)",
            f"time: decoding {t.decode:.1f} s (in {t.wait_for_pixels:.1f} s of waiting), "
            f"backbone {t.backbone:.1f} s, writing {t.write:.1f} s",
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
    index)`` followed by the center crop.
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


class ShardCommitter:
    """Commits finished shards to each tap's store in one background thread, at most one queued."""

    def __init__(self, stores: dict[str, Path]) -> None:
        self.stores = stores
        self.seconds = 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="write")
        self._last: Future[None] | None = None

    def submit(self, finished: FinishedShard) -> None:
        self._wait()
        self._last = self._pool.submit(self._commit, finished)

    def _commit(self, finished: FinishedShard) -> None:
        start = time.perf_counter()
        for (tap, variant), array in finished.features.items():
            cache.commit_shard(self.stores[tap], variant, finished.shard, array, finished.valid, finished.errors)
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
                committer.submit(FinishedShard(shard, joined, np.concatenate(valid), tuple(errors)))
                features, valid, errors, shard = {}, [], [], None
            if progress is not None:
                progress(len(batch.work.rows))
            waited = time.perf_counter()
    finally:
        committer.close()
    times.write = committer.seconds
    times.wall = time.perf_counter() - wall_start
    return times


# ---------------------------------------------------------------- stores


def run_extract(config: ExtractConfig) -> ExtractSummary:
    """Extract the split into one store per tap; resumable, see module doc."""
    config.validate()
    wall_start = time.perf_counter()
    manifest = read_manifest(config.manifest)
    if config.data_root is None and manifest.data_root is None:
        raise ExtractError(f"{config.manifest}: no data root recorded; pass --data-root")
    try:
        backbone = Backbone(config.backbone, config.block_selection)
    except (OSError, ValueError) as error:
        raise ExtractError(f"{config.backbone.model}: cannot load the backbone ({error})") from None
    variants = config.variants()
    stores = {tap: prepare_store(config, manifest, backbone, tap, variants) for tap in config.taps}
    missing = missing_variants(stores, variants)
    recipes = {shard: PixelRecipe(wanted, backbone.crop_size, config.seed) for shard, wanted in missing.items()}
    work = plan_batches(recipes, len(manifest), config.shard_rows, config.batch_size)
    source = ImageSource(lambda row: manifest.resolve(row, config.data_root), config.max_pixels, config.decode_workers)
    n_images = sum(len(batch.rows) for batch in work)
    with tqdm(
        total=n_images, unit="img", desc=f"extract {config.split}", disable=not config.progress, smoothing=0.05
    ) as bar:
        try:
            times = extract_shards(
                work,
                source,
                ForwardStep(backbone, config.taps, config.store_dtype),
                ShardCommitter(stores),
                fail_fast=config.fail_fast,
                progress=bar.update,
            )
        except BadImageStop as stop:
            path = manifest.rows[stop.row].path
            raise ExtractError(f"{path}: {stop.reason} (stopped by --fail-fast; committed shards are kept)") from None
    times.wall = time.perf_counter() - wall_start
    return ExtractSummary(
        stores=stores,
        n_rows=len(manifest),
        shards_done=len(missing),
        shards_skipped=cache.shard_count(len(manifest), config.shard_rows) - len(missing),
        images_processed=n_images,
        failures=collect_failures(next(iter(stores.values()))),
        times=times,
    )


def missing_variants(stores: Mapping[str, Path], variants: Sequence[VariantSpec]) -> dict[int, tuple[VariantSpec, ...]]:
    """Shard -> the variants that some tap's store still lacks there (shards lacking none are left out)."""
    missing: dict[int, list[VariantSpec]] = {}
    for variant in variants:
        pending = set().union(*(cache.pending_shards(path, variant.name) for path in stores.values()))
        for shard in pending:
            missing.setdefault(shard, []).append(variant)
    return {shard: tuple(wanted) for shard, wanted in missing.items()}


def collect_failures(path: Path) -> tuple[tuple[str, str], ...]:
    """(path, reason) of every image the store records as unusable, this run's and earlier ones'."""
    rows = cache.read_rows(path)
    bad = np.flatnonzero(rows.errors != "")
    return tuple((str(rows.paths[i]), str(rows.errors[i])) for i in bad)


def prepare_store(
    config: ExtractConfig,
    manifest: Manifest,
    backbone: Backbone,
    tap: str,
    variants: Sequence[VariantSpec],
) -> Path:
    """Create the tap's store, or check that an existing one matches; add variants."""
    path = store_path(config, tap)
    identity = cache.StoreIdentity(
        manifest_sha256=manifest.sha256(),
        model_id=config.backbone.model,
        model_revision=backbone.revision,
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
    if config.overwrite:
        cache.delete_store(path)
    if path.exists():
        try:
            cache.check_identity(path, identity)
        except cache.StoreError as error:
            raise ExtractError(str(error)) from None
    else:
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
        )
    for variant in variants:
        cache.add_variant(path, variant, len(backbone.block_indices), backbone.dim)
    return path
