"""The extraction loop and its parts: pixels -> backbone -> finished shards, knowing neither CLIP nor Zarr.

:func:`extract_shards` takes a pixel source (:class:`ImageSource`: each image decoded once, in a thread pool a
few batches ahead, turned into the pixels of every variant by a :class:`PixelRecipe`), a forward step
(:class:`ForwardStep`: one backbone pass for every tap) and a committer (:class:`ShardCommitter`: each finished
shard written to every tap's store in a background thread). Tests pass fakes; ``pipeline predict`` drives the
same loop with a committer that scores.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .. import cache
from ..names import EMBEDDING_TAP, PERTURBATIONS
from ..variants import VariantKind, VariantSpec
from . import augment, images
from .backbone import Backbone
from .claims import ShardClaims
from .options import BadImageStop, StageTimes

# Perturbation p of row r draws from view_rng(seed, r, PERTURB_STREAM + index of p in PERTURBATIONS):
# streams apart from the training views 0, 1, ...
PERTURB_STREAM = 1000


@dataclass(frozen=True)
class PixelRecipe:
    """``(decoded image, row) -> {variant: (crop, crop, 3) uint8}`` for a group of variants.

    Each kind as in the authors' code: the center crop without resizing; the
    training recipe drawn from ``view_rng(seed, row, view)``; torchvision's
    ten crops, cut once per call for every ``tencrop_i`` asked for; a
    perturbation drawn from ``view_rng(seed, row, PERTURB_STREAM + its
    index)`` followed by the center crop; the format-align re-encoding
    (``augment.format_align``, no randomness) followed by the center crop.
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
                rng = augment.view_rng(self.seed, row, variant.index)
                pixels[variant.name] = augment.augment_train_view(image, self.crop, rng)
            elif variant.kind is VariantKind.TEN_CROP:
                if ten_crops is None:
                    ten_crops = images.ten_crop(image, self.crop)
                pixels[variant.name] = ten_crops[variant.index]
            elif variant.kind is VariantKind.FORMAT_ALIGN:
                assert variant.quality is not None
                pixels[variant.name] = images.center_crop(augment.format_align(image, variant.quality), self.crop)
            else:
                assert variant.perturbation is not None and variant.preset is not None
                rng = augment.view_rng(self.seed, row, PERTURB_STREAM + PERTURBATIONS.index(variant.perturbation))
                perturbed = augment.perturb_image(image, variant.perturbation, variant.preset, rng)
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

    def __init__(
        self,
        image_path: Callable[[int], Path],
        max_pixels: int,
        workers: int,
        decoded: Callable[[int], AbstractContextManager[np.ndarray]] | None = None,
    ) -> None:
        self.image_path = image_path
        self.max_pixels = max_pixels
        self.workers = workers
        # row -> its pixels in a block; by default the file at image_path(row) (``sources.RowImages.decoded`` reads
        # Parquet rows too)
        self.decoded = decoded or (lambda row: images.decoded_image(self.image_path(row), self.max_pixels))

    def load(self, work: BatchWork) -> PixelBatch:
        start = time.perf_counter()
        crop = work.recipe.crop
        out = {name: np.zeros((len(work.rows), crop, crop, 3), dtype=np.uint8) for name in work.recipe.names}
        valid = np.zeros(len(work.rows), dtype=bool)
        errors = []
        for i, row in enumerate(work.rows.tolist()):
            try:
                with self.decoded(row) as image:  # the decode budget held till the crops are cut
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


class ForwardStep:
    """(B, S, S, 3) uint8 pixels -> ``{tap: (B, n_blocks, dim)}`` numpy tokens in ``dtype``; with ``embedding``
    (and a backbone that has one) also ``{EMBEDDING_TAP: (B, 1, e)}``, from the same forward pass."""

    def __init__(self, backbone: Backbone, taps: Sequence[str], dtype: str | np.dtype, embedding: bool = False) -> None:
        self.backbone = backbone
        self.taps = tuple(taps) + ((EMBEDDING_TAP,) if embedding and backbone.embedding_dim else ())
        self.dtype = np.dtype(dtype)

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        tokens = self.backbone.forward_taps(pixels, self.taps)
        return {tap: value.float().cpu().numpy().astype(self.dtype, copy=False) for tap, value in tokens.items()}


@dataclass(frozen=True)
class FinishedShard:
    """Every row of one shard: tokens per (tap, variant) (and the embedding per (EMBEDDING_TAP, variant)), zero for
    invalid rows."""

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
            pooled = {
                v: finished.features[(EMBEDDING_TAP, v)] for v in variants if (EMBEDDING_TAP, v) in finished.features
            }
            cache.commit_shard(self.stores[tap], finished.shard, features, finished.valid, finished.errors, pooled)
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
