"""The backbone families stage one can tap: which transformers class loads each, where its blocks are, its
per-block token rule, its pooled image embedding and its pre-processing defaults.

A checkpoint's family is read from its ``config.json`` (``model_type``, or the vision config's); anything else
is refused naming what is supported. docs/data.md, "Backbones".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import PipelineError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class UnsupportedBackbone(PipelineError, ValueError):
    """A checkpoint of an architecture stage one cannot tap."""


@dataclass(frozen=True)
class Family:
    """How to load and tap one kind of vision transformer."""

    name: str
    model_types: tuple[str, ...]  # config.json model_type values (a full model's, or its vision tower's)
    model_class: str  # the transformers class that loads the vision tower
    token: str  # per-block token rule: "cls" (token 0) or "mean" (mean of the patch tokens: no CLS token)
    ln2: str  # the block's layer norm before its MLP: the "ln2" tap
    fixed_size: bool  # position embeddings of one size: the crop is config.image_size; else the processor's crop
    mean: tuple[float, ...]  # normalisation when the checkpoint has no preprocessor_config.json
    std: tuple[float, ...]
    embedding: str  # what its pooled image embedding is, for the docs and `cache info`

    def layers(self, model: Any) -> Any:
        """The model's transformer blocks, in order."""
        for path in ("vision_model.encoder.layers", "encoder.layers", "encoder.layer", "model.layer", "layer"):
            owner = model
            for name in path.split("."):
                owner = getattr(owner, name, None)
                if owner is None:
                    break
            if owner is not None:
                return owner
        raise UnsupportedBackbone(f"{type(model).__name__}: no transformer blocks found")


def _dino(name: str, model_type: str, model_class: str) -> Family:
    """A DINO family: CLS token, ``norm2`` before the MLP, ImageNet normalisation, the processor's crop."""
    return Family(
        name=name,
        model_types=(model_type,),
        model_class=model_class,
        token="cls",
        ln2="norm2",
        fixed_size=False,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        embedding="the final layer norm's CLS token (pooler_output)",
    )


FAMILIES: tuple[Family, ...] = (
    Family(
        name="clip",
        model_types=("clip", "clip_vision_model"),
        model_class="CLIPVisionModel",
        token="cls",
        ln2="layer_norm2",
        fixed_size=True,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        embedding="the projected image_embeds (visual_projection of the pooled CLS), when the checkpoint has the projection",
    ),
    Family(
        name="siglip",
        model_types=("siglip", "siglip_vision_model"),
        model_class="SiglipVisionModel",
        token="mean",
        ln2="layer_norm2",
        fixed_size=True,
        mean=HALF,
        std=HALF,
        embedding="the attention-pooled pooler_output",
    ),
    _dino("dinov2", "dinov2", "Dinov2Model"),
    _dino("dinov2-registers", "dinov2_with_registers", "Dinov2WithRegistersModel"),
    _dino("dinov3", "dinov3_vit", "DINOv3ViTModel"),
)

SUPPORTED = (
    "CLIP and MetaCLIP (model_type clip), SigLIP and fixed-resolution SigLIP 2 (siglip), DINOv2 (dinov2), "
    "DINOv2 with registers (dinov2_with_registers), DINOv3 (dinov3_vit)"
)


def family_of(config: Mapping[str, Any], where: str) -> Family:
    """The family of a checkpoint from its config.json, or :class:`UnsupportedBackbone` naming what is supported."""
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    vision = config.get("vision_config") or {}
    for family in FAMILIES:
        if vision.get("model_type") in family.model_types:
            return family
    hint = " (NaFlex SigLIP 2 takes images at their own sizes; use a fixed-resolution checkpoint)" * (
        model_type == "siglip2"
    )
    raise UnsupportedBackbone(f"{where}: model_type {model_type!r} cannot be tapped{hint}; supported: {SUPPORTED}")
