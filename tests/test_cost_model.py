"""benchmarks/cost_model.py: its FLOP and parameter formulas against torch's FLOP counter and the real modules."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, CLIPVisionModel

from conftest import load_benchmark_script
from pipeline.heads.head import RineHead, count_parameters


@pytest.fixture(scope="module")
def cost_model():
    return load_benchmark_script("cost_model")


def counted_flops(module: torch.nn.Module, *inputs: torch.Tensor, **kwargs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("q, width", [(1, 128), (2, 1024), (4, 256)])
def test_head_flops_and_parameters_match_the_real_head(cost_model, q: int, width: int) -> None:
    head = RineHead(24, 1024, width, q).eval()
    assert cost_model.head_parameters(24, 1024, q, width) == count_parameters(head)
    batch = 3
    assert batch * cost_model.head_flops(24, 1024, q, width) == pytest.approx(
        counted_flops(head, torch.randn(batch, 24, 1024)), rel=0.01
    )  # the counter counts matmuls only: the formula leaves out the bias adds (~1e-3)


def test_the_paper_s_parameter_counts(cost_model) -> None:
    assert cost_model.head_parameters(24, 1024, 4, 1024) == 10_521_601  # paper Table 1
    assert cost_model.head_parameters(24, 1024, 4, 128) == 283_009
    assert cost_model.head_parameters(24, 1024, 2, 1024) == 6_323_201


def test_backbone_flops_match_the_counted_forward_of_a_clip_vision_tower(cost_model) -> None:
    shape = cost_model.BackboneShape("small", hidden=64, layers=2, patch=8, image=64, mlp=256)
    config = CLIPVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8, image_size=64,
                              intermediate_size=256, attn_implementation="eager")  # fmt: skip
    model = CLIPVisionModel(config).eval()
    assert 2 * shape.forward_flops() == pytest.approx(
        counted_flops(model, pixel_values=torch.randn(2, 3, 64, 64)), rel=0.01
    )
    assert cost_model.VIT_L14.forward_flops() == pytest.approx(162.0e9, rel=0.01)  # 81 GMACs, the usual figure


def test_the_random_towers_it_times_have_the_shapes_it_models(cost_model) -> None:
    # openai/clip-vit-large-patch14's and clip-vit-base-patch32's vision configs
    assert cost_model.VIT_L14.clip_config() == dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                    patch_size=14, image_size=224, intermediate_size=4096)  # fmt: skip
    assert cost_model.VIT_B32.clip_config() == dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                    patch_size=32, image_size=224, intermediate_size=3072)  # fmt: skip
    assert cost_model.L14_6.clip_config()["num_hidden_layers"] == 6
