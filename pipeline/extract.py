"""Stage one: images of a split -> CLIP block tokens in feature stores.

The loop knows neither CLIP nor Zarr: it takes a pixel source (decode and
crop, in a thread pool, a few batches ahead), a backbone step (pixels ->
tokens per tap) and a committer (one whole shard at a time, in a background
thread), so decoding and writing overlap with the forward passes.

A shard of rows is the unit of work and of resume: for every shard that some
requested variant still lacks, each image is decoded once, turned into the
pixels of every missing variant, run through the backbone, and the finished
shard is committed to every tap's store.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from . import __version__, cache, images
from .backbone import Backbone, BackboneSpec
from .cache import TAPS
from .manifest import Manifest, read_manifest

FAILURE_EXAMPLES = 10


class ExtractError(RuntimeError):
    """Extraction stopped (bad arguments, or --fail-fast on a bad image)."""


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `pipeline extract` needs, resolved from the command line."""

    split: str
    manifest: Path
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    data_root: Path | None = None
    taps: tuple[str, ...] = ("ln2",)
    blocks: str = "all"
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

    def variants(self) -> tuple[cache.VariantSpec, ...]:
        if self.perturbation is not None:
            if self.is_training():
                raise ExtractError("perturbations are for evaluation splits; pass --no-augment")
            return (cache.VariantSpec.perturbed(self.perturbation, self.perturb_preset),)
        if self.is_training():
            return tuple(cache.VariantSpec.train_view(v) for v in range(self.views))
        if self.ten_crop:
            return tuple(cache.VariantSpec.ten_crop(i) for i in range(10))
        return (cache.VariantSpec.center(),)

    def validate(self) -> None:
        if not self.taps or set(self.taps) - set(TAPS):
            raise ExtractError(f"taps must be a non-empty subset of {TAPS}, got {self.taps}")
        if self.out is not None and len(self.taps) != 1:
            raise ExtractError("--out names one store, so it takes exactly one --tap")
        if self.views < 1 or self.batch_size < 1 or self.decode_workers < 1:
            raise ExtractError("--views, --batch-size and --workers must be at least 1")
        if self.views > 1 and not self.is_training():
            raise ExtractError(f"--views {self.views} asks for augmented views, but {self.split!r} is not a training split; add --augment")
        if self.shard_rows % self.chunk_rows:
            raise ExtractError(f"shard rows ({self.shard_rows}) must be a multiple of chunk rows ({self.chunk_rows})")
        if self.perturbation is not None and self.perturbation not in images.PERTURBATIONS:
            raise ExtractError(f"unknown perturbation {self.perturbation!r}; choose from {images.PERTURBATIONS}")
        if self.ten_crop and (self.perturbation is not None or self.is_training()):
            raise ExtractError("--ten-crop is an evaluation crop: not with --perturb or a training split")
        if self.perturb_preset not in images.PERTURB_PRESETS:
            raise ExtractError(f"unknown perturbation preset {self.perturb_preset!r}; choose from {images.PERTURB_PRESETS}")


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


@dataclass(frozen=True)
class PixelBatch:
    """Pixels of one batch of rows, for every variant still missing."""

    shard: int
    rows: np.ndarray
    pixels: dict[str, np.ndarray]  # variant -> (B, S, S, 3) uint8
    valid: np.ndarray
    errors: tuple[str, ...]
    decode_seconds: float


def make_pixel_function(variant: cache.VariantSpec, crop: int, seed: int) -> Callable[[np.ndarray, int], np.ndarray]:
    """(decoded image, manifest row) -> (crop, crop, 3) uint8 for one variant."""
    if variant.kind == "center":
        return lambda image, row: images.center_crop(image, crop)
    if variant.kind == "train_view":
        return lambda image, row: images.augment_train_view(image, crop, images.view_rng(seed, row, variant.view))
    if variant.kind == "ten_crop":
        return lambda image, row: ten_crops_of(image, crop)[variant.view]
    stream = 1000 + images.PERTURBATIONS.index(variant.perturbation)

    def perturbed(image: np.ndarray, row: int) -> np.ndarray:
        rng = images.view_rng(seed, row, stream)
        return images.center_crop(images.perturb_image(image, variant.perturbation, variant.preset, rng), crop)

    return perturbed


_last_ten_crops = threading.local()


def ten_crops_of(image: np.ndarray, crop: int) -> np.ndarray:
    """The ten crops of ``image``, computed once for the ten variants that each take one."""
    last = getattr(_last_ten_crops, "value", None)
    if last is None or last[0] is not image or last[1] != crop:
        last = (image, crop, images.ten_crop(image, crop))
        _last_ten_crops.value = last
    return last[2]


class PixelSource:
    """Decodes and crops batches in a thread pool, a bounded number ahead."""

    def __init__(
        self,
        manifest: Manifest,
        data_root: Path | None,
        pixel_functions: dict[str, Callable[[np.ndarray, int], np.ndarray]],
        crop: int,
        max_pixels: int,
        workers: int,
    ) -> None:
        self.manifest = manifest
        self.data_root = data_root
        self.pixel_functions = pixel_functions
        self.crop = crop
        self.max_pixels = max_pixels
        self.workers = workers

    def load(self, shard: int, rows: np.ndarray, variants: Sequence[str]) -> PixelBatch:
        start = time.perf_counter()
        out = {v: np.zeros((len(rows), self.crop, self.crop, 3), dtype=np.uint8) for v in variants}
        valid = np.zeros(len(rows), dtype=bool)
        errors = []
        for i, row in enumerate(rows):
            try:
                image = images.decode_image(self.manifest.resolve(int(row), self.data_root), self.max_pixels)
                for variant in variants:
                    out[variant][i] = self.pixel_functions[variant](image, int(row))
                valid[i] = True
                errors.append("")
            except images.ImageDecodeError as error:
                errors.append(str(error) or type(error).__name__)
        return PixelBatch(shard, rows, out, valid, tuple(errors), time.perf_counter() - start)

    def batches(self, work: Sequence[tuple[int, np.ndarray, Sequence[str]]]) -> Iterator[PixelBatch]:
        """Yield batches in order, keeping ``workers + 1`` in flight."""
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            pending: deque[Future[PixelBatch]] = deque()
            items = iter(work)
            for item in items:
                pending.append(pool.submit(self.load, *item))
                if len(pending) > self.workers:
                    break
            while pending:
                batch = pending.popleft().result()
                for item in items:
                    pending.append(pool.submit(self.load, *item))
                    break
                yield batch


class ShardCommitter:
    """Commits finished shards in one background thread, at most one queued."""

    def __init__(self, stores: dict[str, Path]) -> None:
        self.stores = stores
        self.seconds = 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="write")
        self._last: Future[None] | None = None

    def submit(self, shard: int, features: dict[tuple[str, str], np.ndarray], valid: np.ndarray, errors: list[str]) -> None:
        self.wait()
        self._last = self._pool.submit(self._commit, shard, features, valid, errors)

    def _commit(self, shard: int, features: dict[tuple[str, str], np.ndarray], valid: np.ndarray, errors: list[str]) -> None:
        start = time.perf_counter()
        for (tap, variant), array in features.items():
            cache.commit_shard(self.stores[tap], variant, shard, array, valid, errors)
        self.seconds += time.perf_counter() - start

    def wait(self) -> None:
        if self._last is not None:
            self._last.result()
            self._last = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def run_extract(config: ExtractConfig) -> ExtractSummary:
    """Extract the split into one store per tap; resumable, see module doc."""
    config.validate()
    wall_start = time.perf_counter()
    manifest = read_manifest(config.manifest)
    if config.data_root is None and manifest.data_root is None:
        raise ExtractError(f"{config.manifest}: no data root recorded; pass --data-root")
    try:
        backbone = Backbone(config.backbone, config.blocks)
    except (OSError, ValueError) as error:
        raise ExtractError(f"{config.backbone.model}: cannot load the backbone ({error})") from None
    variants = config.variants()
    stores = {tap: prepare_store(config, manifest, backbone, tap, variants) for tap in config.taps}

    n_rows = len(manifest)
    n_shards = cache.shard_count(n_rows, config.shard_rows)
    missing: dict[int, list[str]] = {}  # shard -> variants some tap's store still lacks
    for variant in variants:
        pending = set().union(*(cache.pending_shards(path, variant.name) for path in stores.values()))
        for shard in pending:
            missing.setdefault(shard, []).append(variant.name)
    work = []
    for shard in sorted(missing):
        start, stop = cache.shard_bounds(shard, n_rows, config.shard_rows)
        for lo in range(start, stop, config.batch_size):
            work.append((shard, np.arange(lo, min(lo + config.batch_size, stop)), tuple(missing[shard])))

    pixel_functions = {v.name: make_pixel_function(v, backbone.crop_size, config.seed) for v in variants}
    source = PixelSource(manifest, config.data_root, pixel_functions, backbone.crop_size, config.max_pixels, config.decode_workers)
    committer = ShardCommitter(stores)
    times = StageTimes()
    total_images = sum(len(rows) for _, rows, _ in work)
    progress = tqdm(total=total_images, unit="img", desc=f"extract {config.split}", disable=not config.progress, smoothing=0.05)
    buffers: dict[tuple[str, str], list[np.ndarray]] = {}
    shard_valid: list[np.ndarray] = []
    shard_errors: list[str] = []
    current_shard: int | None = None
    store_dtype = np.dtype(config.store_dtype)
    try:
        waited = time.perf_counter()
        for batch in source.batches(work):
            times.wait_for_pixels += time.perf_counter() - waited
            times.decode += batch.decode_seconds
            if batch.shard != current_shard:
                current_shard, buffers, shard_valid, shard_errors = batch.shard, {}, [], []
            if config.fail_fast:
                stop_at_first_failure(manifest, batch)
            start = time.perf_counter()
            for variant, pixels in batch.pixels.items():
                tokens = backbone.forward_taps(pixels, config.taps)
                for tap, value in tokens.items():
                    values = value.float().cpu().numpy().astype(store_dtype)
                    values[~batch.valid] = 0
                    buffers.setdefault((tap, variant), []).append(values)
            times.backbone += time.perf_counter() - start
            shard_valid.append(batch.valid)
            shard_errors.extend(batch.errors)
            if batch.rows[-1] == cache.shard_bounds(batch.shard, n_rows, config.shard_rows)[1] - 1:
                features = {key: np.concatenate(parts) for key, parts in buffers.items()}
                committer.submit(batch.shard, features, np.concatenate(shard_valid), shard_errors)
            progress.update(len(batch.rows))
            waited = time.perf_counter()
        committer.wait()
    finally:
        progress.close()
        committer.close()
    times.write = committer.seconds
    times.wall = time.perf_counter() - wall_start
    return ExtractSummary(
        stores=stores,
        n_rows=n_rows,
        shards_done=len(missing),
        shards_skipped=n_shards - len(missing),
        images_processed=total_images,
        failures=collect_failures(next(iter(stores.values()))),
        times=times,
    )


def stop_at_first_failure(manifest: Manifest, batch: PixelBatch) -> None:
    for row, ok, reason in zip(batch.rows, batch.valid, batch.errors):
        if not ok:
            path = manifest.rows[int(row)].path
            raise ExtractError(f"{path}: {reason} (stopped by --fail-fast; committed shards are kept)")


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
    variants: Sequence[cache.VariantSpec],
) -> Path:
    """Create the tap's store, or check that an existing one matches; add variants."""
    path = store_path(config, tap)
    identity = cache.StoreIdentity(
        manifest_sha256=manifest.sha256(),
        model_id=config.backbone.model,
        model_revision=backbone.revision,
        tap=tap,
        blocks=backbone.blocks,
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
        cache.add_variant(path, variant, len(backbone.blocks), backbone.dim)
    return path
