"""Helpers shared by the benchmark scripts: timing, scratch folders, synthetic stores and backbones.

Not part of the package: the scripts in this folder import it by file name
(``python benchmarks/bench_x.py`` puts this folder first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import cache
from pipeline.heads import StoreRef, stores


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated runs of one measured action."""

    seconds: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def describe(self) -> str:
        runs = ", ".join(f"{s:.3f}" for s in self.seconds)
        return f"median {self.median:.3f} s, best {self.best:.3f} s (runs: {runs})"


def time_repeats(action: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    """Run ``action`` ``warmup`` times untimed, then ``repeats`` times timed."""
    for _ in range(warmup):
        action()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return Timing(tuple(seconds))


def time_interleaved(actions: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time several actions in alternation (round by round), so that load from
    other processes on this shared machine hits all of them alike."""
    for _ in range(warmup):
        for action in actions.values():
            action()
    seconds: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            start = time.perf_counter()
            action()
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(values)) for name, values in seconds.items()}


def print_machine() -> None:
    """One line describing where the numbers were measured."""
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.2f} (other processes share these CPUs)"
    )


def add_scratch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", type=Path, default=None, help="Scratch folder (default: a new temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the scratch folder afterwards.")


@contextlib.contextmanager
def scratch_dir(args: argparse.Namespace, prefix: str) -> Iterator[Path]:
    """The scratch folder of a run, removed afterwards unless --keep."""
    if args.work_dir is not None:
        path = Path(args.work_dir)
        path.mkdir(parents=True, exist_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if args.keep:
            print(f"kept scratch folder {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class RandomRows:
    """Standard normal float16 rows made on demand, so that a store of many GB never sits in memory.

    ``rows[start:stop]`` draws from a generator seeded by (seed, start): the
    same slice always holds the same values.
    """

    shape: tuple[int, int, int]
    seed: int = 0

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        rng = np.random.default_rng([self.seed, start])
        return rng.standard_normal((stop - start, *self.shape[1:]), dtype=np.float32).astype(np.float16)


def write_synthetic_store(
    path: Path,
    n_rows: int,
    n_blocks: int,
    dim: int,
    *,
    shard_rows: int,
    chunk_rows: int,
    labels: np.ndarray | None = None,
    seed: int = 0,
) -> None:
    """A complete feature store (variant ``center``) of random float16 features, via ``cache.write_store``."""
    labels = np.arange(n_rows) % 2 if labels is None else labels
    cache.write_store(
        path,
        cache.placeholder_identity(n_blocks, dim, shard_rows=shard_rows, chunk_rows=chunk_rows),
        split=path.stem,
        labels=[int(v) for v in labels],
        paths=[f"img_{i:07d}.png" for i in range(n_rows)],
        datasets=["synthetic"] * n_rows,
        features={"center": RandomRows((n_rows, n_blocks, dim), seed)},
    )


def synthetic_store(name: str, features: torch.Tensor, labels: np.ndarray, classes: np.ndarray) -> stores.LoadedStore:
    """Features already in device memory dressed as a store (no files): its rows, one ``center`` variant."""
    n_rows, blocks, dim = features.shape
    identity = cache.placeholder_identity(blocks, dim)
    info = cache.StoreInfo(Path(name), identity, name, n_rows, {}, ("center",), {})
    rows = cache.RowTable(
        labels=labels.astype(np.int8),
        paths=np.array([f"{name}/{i:07d}.png" for i in range(n_rows)], dtype=object),
        datasets=np.full(n_rows, name, dtype=object),
        classes=classes,
        valid=np.ones(n_rows, dtype=bool),
        errors=np.full(n_rows, "", dtype=object),
    )
    return stores.LoadedStore(StoreRef(name, Path(name)), info, rows, {"center": stores.InMemoryFeatures(features)})


def synthetic_train_store(store: stores.LoadedStore) -> stores.TrainStore:
    """A ``synthetic_store`` as a training store: its ``center`` variant is the one training view."""
    view_cache = stores.ViewCache(lambda name: store.features[name])
    return stores.TrainStore(store.ref, store.info, store.rows, ("center",), view_cache)


VIT_B32_SHAPE = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    patch_size=32,
    image_size=224,
    intermediate_size=3072,
)


VIT_L14_SHAPE = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    intermediate_size=4096,
)


def save_random_clip(path: Path, seed: int = 0, **shape: int) -> Path:
    """A randomly initialised CLIP vision tower (ViT-B/32 shape by default), saved like a hub checkpoint."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**{**VIT_B32_SHAPE, **shape})).eval()
    model.save_pretrained(path)
    return path


def write_folder_images(root: Path, n_images: int, size: int, seed: int = 0) -> Path:
    """``n_images`` random RGB PNGs of size x size under root/<set>/{0_real,1_fake}/ (half each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n_images):
        folder = root / "bench" / ("0_real" if i % 2 == 0 else "1_fake")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:06d}.png", compress_level=1)
    return root


def write_folder_manifest(root: Path, manifests_dir: Path, split: str) -> Path:
    """The ``folder``-layout manifest of ``root`` written as ``manifests_dir/<split>.csv``."""
    from pipeline.features import build_manifest, manifest_path, write_manifest

    manifest = build_manifest("folder", root, split)
    path = manifest_path(manifests_dir, split)
    write_manifest(manifest, path)
    return path


def premade_center_batches(manifest_csv: Path, crop: int, batch: int) -> list[np.ndarray]:
    """The manifest's images decoded and center-cropped beforehand, in order, as uint8 batches."""
    from pipeline.features import images, read_manifest

    manifest = read_manifest(manifest_csv)
    crops = [images.center_crop(images.decode_image(manifest.resolve(i)), crop) for i in range(len(manifest))]
    return [np.stack(crops[i : i + batch]) for i in range(0, len(crops), batch)]


def quiet_transformers() -> None:
    """No download or loading progress bars from transformers, and no hub access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
