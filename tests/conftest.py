"""Shared fixtures: a tiny random CLIP saved to disk, loaded by path like a hub id."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

TINY_CLIP = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).eval()
    path = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(path)
    return path


def write_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    """A random RGB image of (width, height) saved by extension."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def make_folder_dataset(root: Path, n_per_label: int = 6, size: tuple[int, int] = (40, 36), seed: int = 0) -> Path:
    """root/<dataset>/{0_real,1_fake}/*.png for datasets 'a' and 'b'."""
    for d, dataset in enumerate(("a", "b")):
        for label, folder in enumerate(("0_real", "1_fake")):
            for i in range(n_per_label):
                write_image(root / dataset / folder / f"img_{i:03d}.png", size, seed * 1000 + d * 100 + label * 10 + i)
    return root


def write_store(
    path: Path,
    features: dict[str, np.ndarray],
    labels: np.ndarray,
    datasets: list[str],
    classes: list[str] | None = None,
    valid: np.ndarray | None = None,
    *,
    tap: str = "ln2",
    model: str = "synthetic",
    shard_rows: int = 64,
    chunk_rows: int = 16,
) -> Path:
    """A feature store written by ``cache.write_store``, without any backbone.

    ``features`` maps variant names ("center", "view_000", "tencrop_3",
    "jpeg-official") to (N, n_blocks, dim) arrays.
    """
    from pipeline import cache

    n_rows, n_blocks, dim = next(iter(features.values())).shape
    identity = cache.placeholder_identity(
        n_blocks, dim, model_id=model, model_revision="test", tap=tap, crop_size=32, max_pixels=10**8,
        shard_rows=shard_rows, chunk_rows=chunk_rows,
    )  # fmt: skip
    valid = np.ones(n_rows, dtype=bool) if valid is None else valid
    return cache.write_store(
        path,
        identity,
        split=path.stem,
        labels=labels.tolist(),
        paths=[f"{datasets[i]}/{'1_fake' if labels[i] else '0_real'}/{i:05d}.png" for i in range(n_rows)],
        datasets=datasets,
        classes=classes,
        features=features,
        valid=valid,
        errors=["" if ok else "synthetic failure" for ok in valid],
    )


def separable_features(
    n_rows: int, n_blocks: int = 4, dim: int = 16, seed: int = 0, shift: float = 1.5
) -> tuple[np.ndarray, np.ndarray]:
    """Features whose fakes are shifted along a fixed direction in every block."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n_rows) % 2).astype(np.int8)
    direction = np.random.default_rng(12345).standard_normal(dim)
    direction /= np.linalg.norm(direction)
    features = rng.standard_normal((n_rows, n_blocks, dim)) + shift * labels[:, None, None] * direction
    return features.astype(np.float32), labels
