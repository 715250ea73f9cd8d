"""Score new images with a trained run's head or an official RINE checkpoint.

Images go through the same evaluation pre-processing as extraction (center
crop, no resize, CLIP normalisation), the backbone and tap the head was
trained on, then the head; the score is the probability that the image is
synthetic.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import images
from .backbone import Backbone, BackboneSpec
from .cache import DEFAULT_MODEL
from .head import RineHead, load_head, load_official_checkpoint
from .manifest import IMAGE_EXTENSIONS


class PredictError(RuntimeError):
    """The head, backbone or inputs cannot be used together."""


@dataclass(frozen=True)
class HeadSource:
    """A loaded head and what it expects from the backbone."""

    head: RineHead
    model: str
    tap: str
    blocks: str  # block selection for the backbone (parse_blocks syntax)
    last_block_only: bool


@dataclass(frozen=True)
class PredictConfig:
    head: Path  # run folder, head.safetensors, or the authors' .pth
    inputs: tuple[Path, ...]
    model: str | None = None  # override the backbone recorded with the head
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 32
    max_pixels: int = images.DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Prediction:
    path: Path
    score: float | None  # probability of fake; None when the image could not be used
    error: str = ""


def load_head_source(path: Path) -> HeadSource:
    """Read a run folder / safetensors head, or an official ``.pth`` checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / "head.safetensors"
    if not path.is_file():
        raise PredictError(f"{path}: no such head file (give a run folder, a head.safetensors or an official .pth)")
    if path.suffix == ".safetensors":
        head, metadata = load_head(path)
        blocks = ",".join(str(b) for b in json.loads(metadata["store_blocks"]))
        return HeadSource(head, metadata["model"], metadata["tap"], blocks, metadata.get("head_blocks", metadata.get("blocks_used")) == "last")
    # The authors' heads were trained on every block's ln_2 output of ViT-L/14.
    return HeadSource(load_official_checkpoint(path), DEFAULT_MODEL, "ln2", "all", False)


def list_images(inputs: Sequence[Path]) -> list[Path]:
    """Files as given; folders expanded to their images, sorted."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            found.append(item)
    return found


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_predict(config: PredictConfig) -> list[Prediction]:
    source = load_head_source(config.head)
    backbone = Backbone(BackboneSpec(model=config.model or source.model, device=config.device, dtype=config.dtype), source.blocks)
    n_blocks = 1 if source.last_block_only else len(backbone.blocks)
    if (source.head.n_blocks, source.head.in_dim) != (n_blocks, backbone.dim):
        raise PredictError(
            f"the head expects {source.head.n_blocks} blocks of dim {source.head.in_dim}, "
            f"the backbone {backbone.spec.model} gives {n_blocks} of dim {backbone.dim}"
        )
    head = source.head.to(backbone.device).eval()
    predictions: list[Prediction] = []
    for batch in _batches(list_images(config.inputs), config.batch_size):
        results: dict[int, Prediction] = {}
        crops, kept = [], []
        for index, path in enumerate(batch):
            try:
                crops.append(images.center_crop(images.decode_image(path, config.max_pixels), backbone.crop_size))
                kept.append(index)
            except images.ImageDecodeError as error:
                results[index] = Prediction(path, None, str(error))
        if crops:
            tokens = backbone.forward_taps(np.stack(crops), [source.tap])[source.tap].float()
            if source.last_block_only:
                tokens = tokens[:, -1:]
            with torch.inference_mode():
                logits, _ = head(tokens)
            scores = torch.sigmoid(logits.float().squeeze(1)).cpu().numpy()
            results.update((index, Prediction(batch[index], float(score))) for index, score in zip(kept, scores))
        predictions.extend(results[index] for index in range(len(batch)))
    return predictions
