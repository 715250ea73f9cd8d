"""Backbone families: tiny random CLIP, SigLIP, DINOv2 (with and without registers) and DINOv3 models, tapped by
``Backbone`` and checked against hooks and outputs computed here by hand; the embedding stored by extraction;
an unsupported architecture refused naming what is supported."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import zarr

from conftest import TINY_CLIP, make_folder_dataset
from pipeline import cache
from pipeline.features import Backbone, BackboneConfig, build_manifest, write_manifest
from pipeline.features.extract import run_extract
from pipeline.features.families import IMAGENET_MEAN, IMAGENET_STD, UnsupportedBackbone
from pipeline.features.options import ExtractConfig

TINY = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4)  # fmt: skip
TINY_TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip

# family -> (how to build the tiny model, the class that reads it back here, the pre-MLP norm, the token rule)
MODELS = {
    "clip": (lambda: transformers.CLIPModel(transformers.CLIPConfig(
        text_config=TINY_TEXT, vision_config=TINY_CLIP, projection_dim=12)), "CLIPModel", "layer_norm2", "cls"),
    "siglip": (lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY)),
               "SiglipVisionModel", "layer_norm2", "mean"),
    "dinov2": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(**TINY)), "Dinov2Model", "norm2", "cls"),
    "dinov2-registers": (lambda: transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        **TINY, num_register_tokens=2)), "Dinov2WithRegistersModel", "norm2", "cls"),
    "dinov3": (lambda: transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**TINY, num_register_tokens=2)),
               "DINOv3ViTModel", "norm2", "cls"),
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for name, (build, *_rest) in MODELS.items():
        torch.manual_seed(1)
        path = tmp_path_factory.mktemp(name)
        build().eval().save_pretrained(path)
        dirs[name] = path
    return dirs


def by_hand(name: str, path: Path, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """ln2 and hidden tokens of every block and the pooled embedding, from this test's own hooks."""
    _, class_name, norm_name, rule = MODELS[name]
    model = getattr(transformers, class_name).from_pretrained(path, attn_implementation="eager").eval()
    tower = model.vision_model if name == "clip" else model
    blocks = {
        "clip": lambda: tower.encoder.layers,
        "siglip": lambda: tower.vision_model.encoder.layers if hasattr(tower, "vision_model") else tower.encoder.layers,
        "dinov2": lambda: tower.encoder.layer,
        "dinov2-registers": lambda: tower.encoder.layer,
        "dinov3": lambda: tower.layer if hasattr(tower, "layer") else tower.model.layer,
    }[name]()
    captured = {}
    for index, block in enumerate(blocks):
        getattr(block, norm_name).register_forward_hook(
            lambda module, inputs, output, index=index: captured.__setitem__(index, output.detach().clone())
        )
    with torch.no_grad():
        outputs = tower(pixel_values=pixels, output_hidden_states=True)
        pooled = model.visual_projection(outputs.pooler_output) if name == "clip" else outputs.pooler_output

    def token(x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if rule == "cls" else x.mean(dim=1)

    n = len(blocks)
    return {
        "ln2": torch.stack([token(captured[i]) for i in range(n)], dim=1).numpy(),
        "hidden": torch.stack([token(outputs.hidden_states[i + 1]) for i in range(n)], dim=1).numpy(),
        "embedding": pooled[:, None].numpy(),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_taps_and_embedding_equal_an_independent_hook_computation(model_dirs, name):
    backbone = Backbone(BackboneConfig(model=str(model_dirs[name]), device="cpu", dtype="float32"))
    assert backbone.token == MODELS[name][3] and backbone.crop_size == 32
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    got = backbone.forward_taps(images, ("ln2", "hidden", "embedding"))
    expected = by_hand(name, model_dirs[name], backbone.pixel_values(images).float())
    for key in ("ln2", "hidden", "embedding"):
        np.testing.assert_allclose(got[key].numpy(), expected[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert backbone.embedding_dim == expected["embedding"].shape[2]


def test_the_family_gives_the_normalisation_when_the_checkpoint_has_no_image_processor(model_dirs):
    backbone = Backbone(BackboneConfig(model=str(model_dirs["dinov2"]), device="cpu", dtype="float32"))
    assert (backbone.mean, backbone.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_an_architecture_that_cannot_be_tapped_is_refused_naming_the_supported_ones(tmp_path):
    transformers.ViTModel(transformers.ViTConfig(**TINY)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedBackbone, match=r"model_type 'vit' cannot be tapped; supported: CLIP and MetaCLIP"):
        Backbone(BackboneConfig(model=str(tmp_path), device="cpu", dtype="float32"))


def test_a_clip_vision_checkpoint_without_projection_has_no_embedding(tiny_clip_dir):
    backbone = Backbone(BackboneConfig(model=str(tiny_clip_dir), device="cpu", dtype="float32"))
    assert backbone.embedding_dim == 0
    with pytest.raises(ValueError, match="no pooled image embedding"):
        backbone.forward_taps(np.zeros((1, 32, 32, 3), dtype=np.uint8), ("embedding",))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_extraction_stores_the_embedding_row_aligned_from_the_same_pass(model_dirs, tmp_path, name):
    root = make_folder_dataset(tmp_path / "data", n_per_label=3, size=(40, 36))
    manifest = tmp_path / "val.csv"
    write_manifest(build_manifest("folder", root, "val"), manifest)
    config = ExtractConfig(
        split="val", manifest=manifest, cache_dir=tmp_path / "cache", batch_size=4, shard_rows=8, chunk_rows=4,
        backbone=BackboneConfig(model=str(model_dirs[name]), device="cpu", dtype="float32"), progress=False,
    )  # fmt: skip
    summary = run_extract(config)
    store = summary.stores["ln2"]
    info = cache.open_store_info(store)
    assert (info.identity.token, info.identity.embedding_dim) == (MODELS[name][3], 32 if name == "siglip" else 12)
    tokens = cache.read_features(store, "center")
    pooled = cache.read_features(store, "center", array_name="embedding")
    from pipeline.features import images as image_ops

    rows = cache.read_rows(store)
    crops = np.stack([image_ops.center_crop(image_ops.decode_image(root / p), 32) for p in rows.paths])
    backbone = Backbone(config.backbone)
    expected = backbone.forward_taps(crops, ("ln2", "embedding"))
    np.testing.assert_allclose(tokens, expected["ln2"].numpy().astype(np.float16), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(pooled, expected["embedding"].numpy().astype(np.float16), rtol=1e-3, atol=1e-3)
    assert replace(info.identity, embedding_dim=0).compatible_features(info.identity) == []


@pytest.mark.slow
def test_a_store_written_before_the_embedding_resumes_without_it(model_dirs, tmp_path):
    root = make_folder_dataset(tmp_path / "data", n_per_label=3, size=(40, 36))
    manifest = tmp_path / "val.csv"
    write_manifest(build_manifest("folder", root, "val"), manifest)
    config = ExtractConfig(
        split="val", manifest=manifest, cache_dir=tmp_path / "cache", batch_size=4, shard_rows=8, chunk_rows=4,
        backbone=BackboneConfig(model=str(model_dirs["clip"]), device="cpu", dtype="float32"), progress=False,
    )  # fmt: skip
    store = run_extract(config).stores["ln2"]
    group = zarr.open_group(store, mode="r+")  # as an older version wrote it: no token, no embedding
    for key in ("token", "embedding_dim"):
        del group.attrs[key]
    before = cache.read_features(store, "center")
    cache.unflag_shards(store, {"center": [0]})  # something left to do
    run_extract(config)  # resumed, not refused
    info = cache.open_store_info(store)
    assert "embedding_dim" not in info.attrs and info.identity.embedding_dim == 0
    assert info.complete_variants == ("center",)
    np.testing.assert_array_equal(cache.read_features(store, "center"), before)
    with pytest.raises(
        cache.NoEmbeddingError, match=r"re-extract the split with `pipeline extract \.\.\. --overwrite`"
    ):
        cache.read_features(store, "center", array_name="embedding")
