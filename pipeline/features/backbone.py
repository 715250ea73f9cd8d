"""Load a frozen vision transformer (CLIP, SigLIP, DINOv2, DINOv3: ``families``) and tap a token of its blocks.

Two taps come out of one forward pass: ``ln2``, each block's layer norm before its MLP (CLIP's ``layer_norm2``:
the authors' tensor, the only one their heads and numbers were made with), and ``hidden``, the block outputs
(``hidden_states[1:]``: what the paper's text describes). The token of a block is its CLS token, or the mean of
its patch tokens for a backbone without one (SigLIP). The same pass gives the model's pooled image embedding
(``EMBEDDING``). docs/data.md, "Which tap" and "Backbones".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from ..cache import canonical_model_config
from ..devices import resolve_device
from ..errors import PipelineError
from ..names import COMPUTE_DTYPES, DEFAULT_MODEL, EMBEDDING_TAP, TAPS
from .families import CLIP_MEAN as CLIP_MEAN  # re-exported: the CLIP normalisation stays importable from here
from .families import CLIP_STD as CLIP_STD
from .families import Family, family_of

DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}


@dataclass(frozen=True)
class BackboneConfig:
    """What to load and how to run it."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "auto"  # "auto" = float16 on GPU (the authors' setting), float32 on CPU; else one of COMPUTE_DTYPES
    local_files_only: bool = False  # a hub id from the hub cache only, without asking the hub (it is there)


class BlockSelectionError(PipelineError, ValueError):
    """A ``--blocks`` value that does not fit the model."""


def parse_block_selection(text: str, n_layers: int) -> tuple[int, ...]:
    """Block selection like timm's feature_take_indices.

    ``all``; ``last:K`` (the last K blocks); or a comma list of indices where
    negative ones count from the end (``-1`` = last block).
    """
    text = text.strip()
    if text == "all":
        return tuple(range(n_layers))
    try:
        if text.startswith("last:"):
            count = int(text.split(":", 1)[1])
            if not 1 <= count <= n_layers:
                raise BlockSelectionError(f"block selection {text!r}: K must be in 1..{n_layers}")
            return tuple(range(n_layers - count, n_layers))
        indices = [int(part) for part in text.split(",")]
    except BlockSelectionError:
        raise
    except ValueError:
        raise BlockSelectionError(
            f"block selection {text!r}: expected all, last:K or a comma list of integers"
        ) from None
    for index in indices:
        if not -n_layers <= index < n_layers:
            raise BlockSelectionError(f"block selection {text!r}: index {index} outside a {n_layers}-block model")
    indices = [index % n_layers for index in indices]
    if len(set(indices)) != len(indices) or indices != sorted(indices):
        raise BlockSelectionError(f"block selection {text!r}: indices must be distinct and increasing")
    return tuple(indices)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of auto, {', '.join(COMPUTE_DTYPES)}")
    return DTYPES[dtype]


class Backbone:
    """A frozen vision tower returning per-block tokens for chosen taps, and its pooled image embedding."""

    def __init__(self, config: BackboneConfig, block_selection: str = "all") -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        checkpoint_config = _checkpoint_config(config)
        self.family: Family = family_of(checkpoint_config, config.model)
        self.token = self.family.token
        # A full CLIPModel (SiglipModel) checkpoint works too: the vision config and the
        # vision_model.* weights are taken from it, the text tower is ignored.
        with _quiet_transformers(local=Path(config.model).is_dir()):
            self.model, loading = getattr(transformers, self.family.model_class).from_pretrained(
                config.model,
                revision=config.revision,
                dtype=self.dtype,
                attn_implementation="sdpa",
                output_loading_info=True,
                local_files_only=config.local_files_only,
            )
        if loading["missing_keys"]:
            missing = sorted(loading["missing_keys"])
            raise ValueError(
                f"{config.model}: the checkpoint lacks {len(missing)} vision-tower weights "
                f"(e.g. {missing[:3]}); refusing to run a partly random backbone"
            )
        self.model.to(self.device).eval().requires_grad_(False)
        vision = self.model.config
        self.n_layers = vision.num_hidden_layers
        self.dim = vision.hidden_size
        self.block_indices = parse_block_selection(block_selection, self.n_layers)
        preprocessor = _preprocessor_config(config)
        self.crop_size = _crop_size(self.family, vision.image_size, preprocessor)
        self.mean, self.std = _normalisation(self.family, preprocessor)
        self.revision = _resolved_revision(config)
        self.model_config = canonical_model_config(checkpoint_config)
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        self.projection = _clip_projection(config, self.dtype, self.device) if self.family.name == "clip" else None
        self.embedding_dim = _embedding_dim(self.family, vision, self.projection)

    def pixel_values(self, images: np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) uint8 RGB -> normalised (B, 3, S, S) in the model dtype."""
        return self.normalise(torch.from_numpy(images).to(self.device, non_blocking=True))

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """:meth:`pixel_values` of a uint8 tensor; plain torch, so it traces (ONNX export)."""
        batch = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        return ((batch - self._mean) / self._std).to(self.dtype)

    @torch.inference_mode()
    def forward_taps(self, images: np.ndarray, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokens (B, n_blocks, dim) per tap, and with ``EMBEDDING_TAP`` the embedding (B, 1, e), from one pass."""
        return self.tap_tokens(self.pixel_values(images), taps)

    def tap_tokens(self, pixel_values: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        """:meth:`forward_taps` from normalised pixels (B, 3, S, S); plain torch, so it traces (ONNX export)."""
        unknown = set(taps) - set(TAPS) - {EMBEDDING_TAP}
        if unknown:
            raise ValueError(f"unknown tap(s) {sorted(unknown)}; choose from {TAPS}")
        if EMBEDDING_TAP in taps and not self.embedding_dim:
            raise ValueError(f"{self.config.model}: this checkpoint has no pooled image embedding")
        captured: dict[int, torch.Tensor] = {}
        handles = []
        if "ln2" in taps:
            layers = self.family.layers(self.model)
            for block in self.block_indices:
                norm = getattr(layers[block], self.family.ln2)
                handles.append(norm.register_forward_hook(_token_hook(captured, block, self.token)))
        try:
            outputs = self.model(pixel_values=pixel_values, output_hidden_states="hidden" in taps)
        finally:
            for handle in handles:
                handle.remove()
        result = {}
        if "ln2" in taps:
            result["ln2"] = torch.stack([captured[b] for b in self.block_indices], dim=1)
        if "hidden" in taps:
            hidden = outputs.hidden_states[1:]
            result["hidden"] = torch.stack([block_token(hidden[b], self.token) for b in self.block_indices], dim=1)
        if EMBEDDING_TAP in taps:
            pooled = outputs.pooler_output
            result[EMBEDDING_TAP] = (pooled if self.projection is None else self.projection(pooled)).unsqueeze(1)
        return result


def block_token(tokens: torch.Tensor, rule: str) -> torch.Tensor:
    """A block's token (B, dim) of its output (B, T, dim): the CLS token, or the mean of the patch tokens."""
    return tokens[:, 0] if rule == "cls" else tokens.mean(dim=1)


@contextmanager
def _quiet_transformers(local: bool = False):
    """Hide the load report listing the text-tower weights of a full CLIPModel and, for a local folder (nothing to
    download), transformers' per-command "Loading weights" bar; a hub download keeps its progress bars."""
    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if local and bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if local and bars:
            hf_logging.enable_progress_bar()


def _token_hook(captured: dict[int, torch.Tensor], block: int, rule: str):
    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        captured[block] = block_token(output, rule)

    return hook


def _checkpoint_config(config: BackboneConfig) -> dict[str, Any]:
    config_file = cached_file(
        config.model, "config.json", revision=config.revision, local_files_only=config.local_files_only
    )
    return json.loads(Path(config_file).read_text(encoding="utf-8"))


def _preprocessor_config(config: BackboneConfig) -> dict[str, Any]:
    """The checkpoint's preprocessor_config.json (its image processor), or {} when it has none."""
    config_file = cached_file(
        config.model,
        "preprocessor_config.json",
        revision=config.revision,
        local_files_only=config.local_files_only,
        _raise_exceptions_for_missing_entries=False,
    )
    return {} if config_file is None else json.loads(Path(config_file).read_text())


def _normalisation(family: Family, preprocessor: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from the checkpoint's image processor, else the family's (CLIP's for CLIP)."""
    mean, std = preprocessor.get("image_mean", family.mean), preprocessor.get("image_std", family.std)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _model_config_text(config: BackboneConfig) -> str:
    """The checkpoint's config.json as canonical JSON: part of a store's identity (``cache.canonical_model_config``)."""
    return canonical_model_config(_checkpoint_config(config))


def _crop_size(family: Family, image_size: int, preprocessor: dict[str, Any]) -> int:
    """The model's input size: its config's for position embeddings of one size (CLIP, SigLIP), else its image
    processor's crop (DINOv2 and DINOv3 interpolate theirs: 224 where their config says 518)."""
    if family.fixed_size:
        return int(image_size)
    for key in ("crop_size", "size"):
        size = preprocessor.get(key)
        if isinstance(size, dict) and "height" in size:
            return int(size["height"])
        if isinstance(size, int):
            return size
    return int(image_size)


def _clip_projection(config: BackboneConfig, dtype: torch.dtype, device: torch.device) -> torch.nn.Linear | None:
    """CLIP's ``visual_projection`` read from the checkpoint's safetensors, when it has one (a full CLIPModel or a
    CLIPVisionModelWithProjection); the vision tower itself is loaded as ``CLIPVisionModel``, as always."""
    from safetensors import safe_open

    files = []
    local = {"revision": config.revision, "local_files_only": config.local_files_only}
    index = cached_file(
        config.model, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **local
    )
    if index is not None:
        shard = json.loads(Path(index).read_text()).get("weight_map", {}).get(PROJECTION_KEY)
        files = [] if shard is None else [cached_file(config.model, shard, **local)]
    else:
        single = cached_file(config.model, "model.safetensors", _raise_exceptions_for_missing_entries=False, **local)
        files = [] if single is None else [single]
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            if PROJECTION_KEY in handle.keys():
                weight = handle.get_tensor(PROJECTION_KEY)
                projection = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                projection.weight.data.copy_(weight)
                return projection.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return None


PROJECTION_KEY = "visual_projection.weight"


def _embedding_dim(family: Family, vision: Any, projection: torch.nn.Linear | None) -> int:
    """Width of the pooled image embedding, 0 when the checkpoint has none."""
    if family.name == "clip":
        return 0 if projection is None else projection.out_features
    if family.name == "siglip" and not getattr(vision, "vision_use_head", True):
        return 0
    return int(vision.hidden_size)


def _resolved_revision(config: BackboneConfig) -> str:
    """The hub commit a hub id resolved to, or a content hash of a local dir.

    A hub download lives in ``.../snapshots/<commit>/``: the folder the
    checkpoint's config.json was read from names the exact commit, whether
    ``--revision`` was a branch, a tag, a commit or absent.
    """
    local = Path(config.model)
    if local.is_dir():
        return local_content_hash(local)
    snapshot = Path(
        cached_file(config.model, "config.json", revision=config.revision, local_files_only=config.local_files_only)
    ).parent
    if snapshot.parent.name != "snapshots":
        raise ValueError(f"{config.model}: cannot tell which commit was loaded (config.json at {snapshot})")
    return snapshot.name


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a local model folder, in the order :func:`local_content_hash` reads them."""
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))


def local_content_hash(folder: Path) -> str:
    """A local model folder's weights as ``local-sha256:<16 hex>`` (a store's ``model_revision``); its config is
    the other half of its identity (:func:`_model_config_text`)."""
    digest = hashlib.sha256()
    for file in weight_files(Path(folder)):
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return "local-sha256:" + digest.hexdigest()[:16]
