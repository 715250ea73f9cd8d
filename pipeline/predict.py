"""Score new images with a trained run's head or an official RINE checkpoint.

Images go through the very loop of stage one (``extract.extract_shards``)
with the same pixel source (decoding a few batches ahead in threads) and
forward step, on the backbone and tap the head was trained on: the center
crop without resizing, or with ``ten_crop`` torchvision's ten crops scored as
the authors score them, the sigmoid of the mean of the ten logits. Instead of
a store, each batch goes to the head. The score is the probability that the
image is synthetic; :func:`predictions_csv` / :func:`write_predictions` give
the ``pipeline predict`` output.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import cache, images
from .backbone import Backbone, BackboneConfig
from .cache import DEFAULT_MODEL
from .errors import PipelineError
from .extract import FinishedShard, ForwardStep, ImageSource, PixelRecipe, extract_shards, plan_batches
from .files import write_text_atomic
from .head import RineHead, load_head, load_official_checkpoint
from .variants import VariantSpec, ten_crop_variants

PREDICTION_COLUMNS = ("path", "score", "prediction", "error")
FAKE_THRESHOLD = 0.5  # a score above it is predicted fake


class PredictError(PipelineError, RuntimeError):
    """The head, backbone or inputs cannot be used together."""


@dataclass(frozen=True)
class HeadSource:
    """A loaded head and what it expects from the backbone."""

    head: RineHead
    model: str
    tap: str
    block_selection: str  # for the backbone (backbone.parse_block_selection syntax)
    last_block_only: bool


@dataclass(frozen=True)
class PredictConfig:
    head: Path  # run folder, head.safetensors, or the authors' .pth
    inputs: tuple[Path, ...]
    model: str | None = None  # override the backbone recorded with the head
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 32
    ten_crop: bool = False  # score by the ten crops (large images, e.g. Synthbuster)
    decode_workers: int = 2
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
        selection = ",".join(str(b) for b in json.loads(metadata["store_blocks"]))
        last_only = metadata.get("head_blocks", metadata.get("blocks_used")) == "last"
        return HeadSource(head, metadata["model"], metadata["tap"], selection, last_only)
    # The authors' heads were trained on every block's ln_2 output of ViT-L/14.
    return HeadSource(load_official_checkpoint(path), DEFAULT_MODEL, "ln2", "all", False)


def list_images(inputs: Sequence[Path]) -> list[Path]:
    """Files as given; folders expanded to their images, sorted."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found.extend(
                sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in images.IMAGE_EXTENSIONS)
            )
        else:
            found.append(item)
    return found


class HeadScorer:
    """The committer of ``pipeline predict``: scores each finished batch with the head, in order.

    Batch ``b`` holds images ``b * batch_size ...``; an image's score is the
    sigmoid of the mean of its logits over ``variants`` (one, or the ten crops).
    """

    def __init__(
        self,
        source: HeadSource,
        variants: Sequence[VariantSpec],
        device: torch.device,
        paths: Sequence[Path],
        batch_size: int,
    ) -> None:
        self.head = source.head.to(device).eval()
        self.source = source
        self.variants = tuple(variants)
        self.device = device
        self.paths = paths
        self.batch_size = batch_size
        self.predictions: list[Prediction] = []
        self.seconds = 0.0

    @torch.inference_mode()
    def submit(self, finished: FinishedShard) -> None:
        start = time.perf_counter()
        logits = []
        for variant in self.variants:
            tokens = torch.from_numpy(finished.features[(self.source.tap, variant.name)]).to(self.device)
            if self.source.last_block_only:
                tokens = tokens[:, -1:]
            logits.append(self.head(tokens)[0].float().squeeze(1))
        scores = torch.sigmoid(torch.stack(logits).mean(dim=0)).cpu().numpy()
        first = finished.shard * self.batch_size
        for i, (ok, error) in enumerate(zip(finished.valid, finished.errors)):
            score = float(scores[i]) if ok else None
            self.predictions.append(Prediction(self.paths[first + i], score, error))
        self.seconds += time.perf_counter() - start

    def close(self) -> None:
        """Scoring is synchronous: nothing is left in flight."""


def run_predict(config: PredictConfig) -> list[Prediction]:
    """Score every image of ``config.inputs`` (files, and folders' images) in order."""
    source = load_head_source(config.head)
    backbone_config = BackboneConfig(model=config.model or source.model, device=config.device, dtype=config.dtype)
    try:
        backbone = Backbone(backbone_config, source.block_selection)
    except (OSError, ValueError) as error:
        raise PredictError(f"{backbone_config.model}: cannot load the backbone ({error})") from None
    n_blocks = 1 if source.last_block_only else len(backbone.block_indices)
    if (source.head.n_blocks, source.head.in_dim) != (n_blocks, backbone.dim):
        raise PredictError(
            f"the head expects {source.head.n_blocks} blocks of dim {source.head.in_dim}, "
            f"the backbone {backbone.config.model} gives {n_blocks} of dim {backbone.dim}"
        )
    paths = list_images(config.inputs)
    variants = ten_crop_variants() if config.ten_crop else (VariantSpec.center(),)
    recipe = PixelRecipe(variants, backbone.crop_size)
    n_batches = cache.shard_count(len(paths), config.batch_size)
    work = plan_batches(dict.fromkeys(range(n_batches), recipe), len(paths), config.batch_size, config.batch_size)
    scorer = HeadScorer(source, variants, backbone.device, paths, config.batch_size)
    extract_shards(
        work,
        ImageSource(lambda row: paths[row], config.max_pixels, config.decode_workers),
        ForwardStep(backbone, (source.tap,), np.float32),
        scorer,
    )
    return scorer.predictions


def predictions_csv(predictions: Sequence[Prediction]) -> str:
    """``path,score,prediction,error``: score to 6 decimals, prediction fake/real, both empty for unusable images."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    for p in predictions:
        score = "" if p.score is None else f"{p.score:.6f}"
        label = "" if p.score is None else ("fake" if p.score > FAKE_THRESHOLD else "real")
        writer.writerow([str(p.path), score, label, p.error])
    return buffer.getvalue()


def write_predictions(predictions: Sequence[Prediction], path: Path) -> None:
    """The CSV of :func:`predictions_csv`, complete or absent."""
    write_text_atomic(path, predictions_csv(predictions))
