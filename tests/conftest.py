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
