"""Backbone: both taps checked against hooks and hidden states computed here by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from conftest import TINY_CLIP
from pipeline.features.backbone import CLIP_MEAN, CLIP_STD, Backbone, BackboneConfig, parse_block_selection

CLIP_MEAN_BY_HAND = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD_BY_HAND = np.array([0.26862954, 0.26130258, 0.27577711])
TINY_TEXT = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def cpu_config(model: Path) -> BackboneConfig:
    return BackboneConfig(model=str(model), device="cpu", dtype="float32")


def random_crops(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def encoder_layers(model: CLIPVisionModel) -> torch.nn.ModuleList:
    """transformers 5: encoder on the model itself; 4.x: under .vision_model."""
    owner = model if hasattr(model, "encoder") else model.vision_model
    return owner.encoder.layers


def normalise_by_hand(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    pixels = images.astype(np.float64) / 255.0
    pixels = (pixels - mean) / std
    return torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32))


def reference_tokens(
    model_dir: Path, images: np.ndarray, mean: np.ndarray = CLIP_MEAN_BY_HAND, std: np.ndarray = CLIP_STD_BY_HAND
) -> tuple[np.ndarray, np.ndarray]:
    """(ln2, hidden) CLS tokens of every block, (B, n_layers, dim), from our own hooks."""
    model = CLIPVisionModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(encoder_layers(model)):

        def hook(module, inputs, output, index=index):
            captured[index] = output[:, 0].detach().clone()

        handles.append(layer.layer_norm2.register_forward_hook(hook))
    with torch.no_grad():
        outputs = model(pixel_values=normalise_by_hand(images, mean, std), output_hidden_states=True)
    for handle in handles:
        handle.remove()
    n_layers = len(encoder_layers(model))
    ln2 = torch.stack([captured[i] for i in range(n_layers)], dim=1).numpy()
    hidden = torch.stack([outputs.hidden_states[i + 1][:, 0] for i in range(n_layers)], dim=1).numpy()
    return ln2, hidden


def test_both_taps_equal_own_hooks_from_one_forward_pass(tiny_clip_dir: Path) -> None:
    images = random_crops(5, 32, seed=1)
    backbone = Backbone(cpu_config(tiny_clip_dir))
    calls = []
    backbone.model.embeddings.register_forward_pre_hook(lambda module, args: calls.append(1))

    taps = backbone.forward_taps(images, ["ln2", "hidden"])

    assert len(calls) == 1
    ln2, hidden = reference_tokens(tiny_clip_dir, images)
    assert taps["ln2"].shape == (5, 3, 32) and taps["hidden"].shape == (5, 3, 32)
    np.testing.assert_allclose(taps["ln2"].numpy(), ln2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(taps["hidden"].numpy(), hidden, rtol=1e-4, atol=1e-5)
    assert np.abs(ln2 - hidden).max() > 0.1  # the two taps are different tensors


def test_single_taps_and_block_selection_match_hooks(tiny_clip_dir: Path) -> None:
    images = random_crops(3, 32, seed=2)
    ln2, hidden = reference_tokens(tiny_clip_dir, images)
    backbone = Backbone(cpu_config(tiny_clip_dir), block_selection="0,2")

    only_ln2 = backbone.forward_taps(images, ["ln2"])
    only_hidden = backbone.forward_taps(images, ["hidden"])

    assert set(only_ln2) == {"ln2"} and set(only_hidden) == {"hidden"}
    assert backbone.block_indices == (0, 2)
    np.testing.assert_allclose(only_ln2["ln2"].numpy(), ln2[:, [0, 2]], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(only_hidden["hidden"].numpy(), hidden[:, [0, 2]], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown tap"):
        backbone.forward_taps(images, ["mlp"])


def test_backbone_reports_model_geometry(tiny_clip_dir: Path) -> None:
    backbone = Backbone(cpu_config(tiny_clip_dir))
    assert (backbone.n_layers, backbone.dim, backbone.crop_size) == (3, 32, 32)
    assert backbone.block_indices == (0, 1, 2)
    assert backbone.dtype == torch.float32
    assert backbone.revision.startswith("local-sha256:")


def test_a_local_backbone_loads_without_the_loading_weights_bar(tiny_clip_dir: Path, capfd) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    Backbone(cpu_config(tiny_clip_dir))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # restored for whatever runs next


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", (0, 1, 2, 3)),
        ("last:2", (2, 3)),
        ("last:4", (0, 1, 2, 3)),
        ("-1", (3,)),
        ("0,2", (0, 2)),
        ("1, -1", (1, 3)),
        (" all ", (0, 1, 2, 3)),
    ],
)
def test_parse_block_selection_accepts(text: str, expected: tuple[int, ...]) -> None:
    assert parse_block_selection(text, 4) == expected


@pytest.mark.parametrize("text", ["last:0", "last:5", "4", "-5", "2,0", "1,1", "1,-3", "abc", "last:x", ""])
def test_parse_block_selection_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_block_selection(text, 4)


def test_parse_block_selection_error_names_the_problem() -> None:
    with pytest.raises(ValueError, match="index 7 outside a 4-block model"):
        parse_block_selection("0,7", 4)
    with pytest.raises(ValueError, match="distinct and increasing"):
        parse_block_selection("2,1", 4)
    with pytest.raises(ValueError, match=r"K must be in 1\.\.4"):
        parse_block_selection("last:9", 4)


def test_full_clip_checkpoint_loads_its_vision_tower(tmp_path: Path) -> None:
    torch.manual_seed(3)
    full = CLIPModel(CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_CLIP, projection_dim=8)).eval()
    full_dir = tmp_path / "full"
    full.save_pretrained(full_dir)
    vision_only = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).eval()
    vision_only.load_state_dict(full.vision_model.state_dict())
    vision_dir = tmp_path / "vision"
    vision_only.save_pretrained(vision_dir)
    images = random_crops(4, 32, seed=4)

    from_full = Backbone(cpu_config(full_dir)).forward_taps(images, ["ln2", "hidden"])
    from_vision = Backbone(cpu_config(vision_dir)).forward_taps(images, ["ln2", "hidden"])

    ln2, hidden = reference_tokens(vision_dir, images)
    for tap in ("ln2", "hidden"):
        assert torch.equal(from_full[tap], from_vision[tap])
    np.testing.assert_allclose(from_full["ln2"].numpy(), ln2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(from_full["hidden"].numpy(), hidden, rtol=1e-4, atol=1e-5)


def test_checkpoint_missing_vision_weights_is_refused(tiny_clip_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_clip_dir / "config.json", broken / "config.json")
    weights = load_file(tiny_clip_dir / "model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if ".layers.2." not in name}
    assert len(kept) < len(weights)
    save_file(kept, broken / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(ValueError, match="lacks .* vision-tower weights"):
        Backbone(cpu_config(broken))


def test_normalisation_read_from_preprocessor_config(tiny_clip_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "with-preprocessor"
    shutil.copytree(tiny_clip_dir, model_dir)
    mean, std = [0.5, 0.25, 0.125], [0.2, 0.3, 0.4]
    (model_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    images = random_crops(3, 32, seed=5)

    backbone = Backbone(cpu_config(model_dir))
    tokens = backbone.forward_taps(images, ["ln2"])["ln2"].numpy()

    assert backbone.mean == pytest.approx(tuple(mean)) and backbone.std == pytest.approx(tuple(std))
    ln2_own, _ = reference_tokens(model_dir, images, np.array(mean), np.array(std))
    ln2_clip, _ = reference_tokens(model_dir, images)
    np.testing.assert_allclose(tokens, ln2_own, rtol=1e-4, atol=1e-5)
    assert np.abs(tokens - ln2_clip).max() > 1e-2


def test_clip_normalisation_by_default(tiny_clip_dir: Path) -> None:
    assert not (tiny_clip_dir / "preprocessor_config.json").exists()
    backbone = Backbone(cpu_config(tiny_clip_dir))
    assert backbone.mean == pytest.approx(tuple(CLIP_MEAN_BY_HAND), abs=1e-12)
    assert backbone.std == pytest.approx(tuple(CLIP_STD_BY_HAND), abs=1e-12)
    assert (CLIP_MEAN, CLIP_STD) == (backbone.mean, backbone.std)
    images = random_crops(2, 32, seed=6)
    expected = normalise_by_hand(images, CLIP_MEAN_BY_HAND, CLIP_STD_BY_HAND)
    torch.testing.assert_close(backbone.pixel_values(images), expected, rtol=1e-6, atol=1e-6)


def test_crop_size_follows_config_image_size(tmp_path: Path) -> None:
    torch.manual_seed(7)
    config = CLIPVisionConfig(**{**TINY_CLIP, "image_size": 48})
    model_dir = tmp_path / "tiny48"
    CLIPVisionModel(config).eval().save_pretrained(model_dir)
    images = random_crops(2, 48, seed=8)

    backbone = Backbone(cpu_config(model_dir))
    tokens = backbone.forward_taps(images, ["ln2"])["ln2"].numpy()

    assert backbone.crop_size == 48
    ln2, _ = reference_tokens(model_dir, images)
    np.testing.assert_allclose(tokens, ln2, rtol=1e-4, atol=1e-5)


def test_a_hub_id_loads_from_the_hub_cache_and_records_the_commit(tiny_clip_dir, tmp_path, monkeypatch):
    """The same code path as `openai/clip-vit-large-patch14`, served offline from a hub cache layout."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--test-org--tiny-clip"
    shutil.copytree(tiny_clip_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    from_hub = Backbone(BackboneConfig("test-org/tiny-clip", device="cpu"))
    assert from_hub.revision == commit
    assert Backbone(BackboneConfig("test-org/tiny-clip", revision="main", device="cpu")).revision == commit
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    from_dir = Backbone(BackboneConfig(str(tiny_clip_dir), device="cpu"))
    assert torch.equal(from_hub.forward_taps(images, ["ln2"])["ln2"], from_dir.forward_taps(images, ["ln2"])["ln2"])
