"""Tests for pipeline.heads.head: layout, parameter counts, the released checkpoint, the loader's refusals, FastDropout."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.heads.head import (
    CheckpointError,
    FastDropout,
    RineHead,
    count_parameters,
    load_head,
    load_official_checkpoint,
    save_head,
)

CHECKPOINT = Path(__file__).parent / "data" / "rine_2class_trainable.pth"  # provenance: tests/data/README.md


class NotATensor:
    """A picklable object that ``torch.load(weights_only=True)`` must refuse."""

    def __init__(self) -> None:
        self.payload = "anything"


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Eval-mode RINE head written with plain tensor ops from the state-dict keys of spec section 3."""
    q = sum(1 for key in state if key.startswith("proj1.") and key.endswith(".weight"))
    h = x
    for i in range(q):
        h = F.relu(F.linear(h, state[f"proj1.{3 * i + 1}.weight"], state[f"proj1.{3 * i + 1}.bias"]))
    if aggregation == "tie":
        weights = torch.exp(state["alpha"]) / torch.exp(state["alpha"]).sum(dim=1, keepdim=True)
        h = (weights * h).sum(dim=1)
    else:
        h = h.sum(dim=1) / h.shape[1]
    for i in range(q):
        h = F.relu(F.linear(h, state[f"proj2.{3 * i + 1}.weight"], state[f"proj2.{3 * i + 1}.bias"]))
    h = F.relu(F.linear(h, state["head.0.weight"], state["head.0.bias"]))
    h = F.relu(F.linear(h, state["head.3.weight"], state["head.3.bias"]))
    return F.linear(h, state["head.6.weight"], state["head.6.bias"])


def official_state() -> dict[str, torch.Tensor]:
    return torch.load(CHECKPOINT, map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    ("proj_layers", "proj_dim", "expected"),
    [(4, 1024, 10_521_601), (4, 128, 283_009), (2, 1024, 6_323_201)],
)
def test_parameter_counts_match_paper(proj_layers: int, proj_dim: int, expected: int) -> None:
    head = RineHead(24, 1024, proj_dim, proj_layers)
    assert count_parameters(head) == expected


def test_state_dict_keys_follow_official_layout() -> None:
    head = RineHead(24, 1024, 128, 4)
    linear_keys = [
        f"{name}.{i}.{kind}" for name in ("proj1", "proj2") for i in (1, 4, 7, 10) for kind in ("weight", "bias")
    ]
    head_keys = [f"head.{i}.{kind}" for i in (0, 3, 6) for kind in ("weight", "bias")]
    assert set(head.state_dict()) == {"alpha", *linear_keys, *head_keys}
    assert set(head.state_dict()) == set(official_state())


def test_released_checkpoint_matches_independent_forward() -> None:
    head = load_official_checkpoint(CHECKPOINT)
    assert not head.training
    assert (head.n_blocks, head.in_dim, head.proj_dim, head.proj_layers) == (24, 1024, 128, 4)
    assert count_parameters(head) == 283_009
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 24, 1024, generator=generator)
    with torch.no_grad():
        logits, z = head(x)
    expected = reference_forward(official_state(), x, "tie")
    assert logits.shape == (8, 1) and z.shape == (8, 128)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert logits.std() > 0.01  # distinct inputs give distinct logits, so the comparison is not vacuous


def test_loader_does_not_move_the_global_seed() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_official_checkpoint(CHECKPOINT)
    assert torch.equal(torch.rand(3), expected)


def test_loader_unwraps_a_lone_state_dict_wrapper(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": official_state()}, path)
    x = torch.randn(2, 24, 1024)
    with torch.no_grad():
        torch.testing.assert_close(load_official_checkpoint(path)(x)[0], reference_forward(official_state(), x, "tie"))


def save_and_expect_refusal(state: object, path: Path, *fragments: str) -> None:
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_official_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_loader_refuses_missing_key(tmp_path: Path) -> None:
    state = official_state()
    del state["head.6.bias"]
    save_and_expect_refusal(state, tmp_path / "missing.pth", "missing keys: head.6.bias")


def test_loader_refuses_unexpected_key(tmp_path: Path) -> None:
    state = official_state()
    state["extra.weight"] = torch.zeros(3)
    save_and_expect_refusal(state, tmp_path / "extra.pth", "unexpected keys: extra.weight")


def test_loader_refuses_wrong_shape(tmp_path: Path) -> None:
    state = official_state()
    state["head.3.weight"] = torch.zeros(128, 127)
    save_and_expect_refusal(state, tmp_path / "shape.pth", "inconsistent shapes", "head.3.weight", "(128, 127)")


def test_loader_refuses_non_tensor_pickle(tmp_path: Path) -> None:
    state = official_state()
    state["note"] = NotATensor()
    save_and_expect_refusal(
        state, tmp_path / "object.pth", "not a plain tensor state dict", "weights_only=True", "NotATensor"
    )


def test_loader_refuses_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth: not a plain tensor state dict"):
        load_official_checkpoint(path)


def test_loader_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_official_checkpoint(tmp_path / "absent.pth")


def test_mean_aggregation_has_no_alpha_and_averages_blocks() -> None:
    torch.manual_seed(1)
    head = RineHead(5, 16, 8, 2, aggregation="mean").eval()
    assert "alpha" not in head.state_dict()
    assert count_parameters(head) == count_parameters(RineHead(5, 16, 8, 2)) - 5 * 8
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(head(x)[0], reference_forward(head.state_dict(), x, "mean"))


def test_single_block_head_for_last_block_ablation() -> None:
    head = RineHead(1, 16, 8, 1).eval()
    x = torch.randn(3, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(head(x[:, -1:])[0], reference_forward(head.state_dict(), x[:, -1:], "tie"))


def test_forward_accepts_float16_input() -> None:
    head = load_official_checkpoint(CHECKPOINT)
    x16 = torch.randn(4, 24, 1024).half()
    with torch.no_grad():
        logits, _ = head(x16)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference_forward(official_state(), x16.float(), "tie"), rtol=0, atol=1e-5)


def test_forward_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\(B, 24, 1024\)"):
        RineHead(24, 1024, 8, 1)(torch.zeros(2, 12, 1024))


def test_training_forward_backward_under_bfloat16_autocast() -> None:
    head = RineHead(4, 16, 8, 2).train()
    x = torch.randn(6, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, z = head(x)
    assert logits.dtype == torch.bfloat16 and z.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert torch.isfinite(head.alpha.grad).all() and head.proj1[1].weight.grad.abs().sum() > 0


def test_fast_dropout_is_identity_in_eval() -> None:
    dropout = FastDropout(0.5).eval()
    x = torch.randn(10, 7)
    assert dropout(x) is x


def test_fast_dropout_mask_is_a_fair_independent_coin() -> None:
    torch.manual_seed(0)
    n = 1 << 20
    out = FastDropout(0.5).train()(torch.ones(n + 3))  # a length that is not a multiple of 8 or 32
    kept = out != 0
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert 0.49 <= kept.float().mean().item() <= 0.51
    # Every bit position inside a random 32-bit word is fair (a wrong table or range would bias one).
    per_position = kept[:n].view(-1, 32).float().mean(dim=0)
    assert per_position.min() > 0.48 and per_position.max() < 0.52
    # Neighbours, including across byte and word boundaries, are independent: P(both kept) = 1/4.
    for lag in (1, 7, 8, 9, 31, 32, 33):
        both = (kept[:-lag] & kept[lag:]).float().mean().item()
        assert 0.245 <= both <= 0.255, lag


def test_fast_dropout_is_seeded_and_varies_between_calls() -> None:
    dropout = FastDropout(0.5).train()
    x = torch.ones(1000)
    torch.manual_seed(5)
    first, second = dropout(x), dropout(x)
    torch.manual_seed(5)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(first, second)


def test_fast_dropout_gradients_flow_through_kept_units() -> None:
    x = torch.randn(64, 33, requires_grad=True)
    out = FastDropout(0.5).train()(x)
    out.sum().backward()
    kept = out != 0
    torch.testing.assert_close(x.grad, kept.float() * 2)
    torch.testing.assert_close(out, x.detach() * kept * 2)


def test_fast_dropout_other_p_falls_back_to_torch_dropout() -> None:
    x = torch.randn(200, 50)
    torch.manual_seed(3)
    out = FastDropout(0.25).train()(x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, F.dropout(x, 0.25, training=True), rtol=0, atol=0)


def test_fast_dropout_keeps_bfloat16_dtype() -> None:
    x = torch.randn(100, 8).bfloat16()
    out = FastDropout(0.5).train()(x)
    assert out.dtype == torch.bfloat16
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] * 2, rtol=0, atol=0)


def test_crop_score_is_the_sigmoid_of_the_mean_logit():
    from pipeline.heads.head import crop_scores

    logits = torch.tensor([[4.0, -2.0, 0.0], [1.0, 1.0, 1.0]])
    expected = [1 / (1 + math.exp(-2 / 3)), 1 / (1 + math.exp(-1.0))]
    assert crop_scores(logits).dtype == torch.float64
    assert torch.allclose(crop_scores(logits), torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=0)
    assert not math.isclose(float(crop_scores(logits)[0]), float(torch.sigmoid(logits[0]).mean()), abs_tol=1e-3)
    with pytest.raises(ValueError, match=r"\(B, n_crops\)"):
        crop_scores(torch.zeros(3))


def test_tie_block_weights_are_the_softmax_over_blocks_and_do_not_depend_on_the_thread_count():
    from pipeline.heads.head import block_weights

    alpha = torch.randn(8, 24, 256, generator=torch.Generator().manual_seed(0))
    weights = block_weights(alpha)
    torch.testing.assert_close(weights, torch.softmax(alpha.double(), dim=1).float(), rtol=0, atol=1e-7)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3, 16):
            torch.set_num_threads(threads)
            assert torch.equal(block_weights(alpha), weights), threads
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- heads that cannot be trusted (issue 24)


def saved_head(tmp_path: Path, **metadata: str) -> tuple[Path, RineHead]:
    torch.manual_seed(0)
    head = RineHead(n_blocks=3, in_dim=8, proj_dim=4, proj_layers=1)
    path = tmp_path / "head.safetensors"
    save_head(head, path, {"note": "test"})
    if metadata:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(path), framework="pt") as handle:
            old = handle.metadata()
        save_file(load_file(str(path)), str(path), metadata={**old, **metadata})
    return path, head


def test_a_saved_head_loads_back_equal(tmp_path: Path) -> None:
    path, head = saved_head(tmp_path)
    loaded, metadata = load_head(path)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(loaded(x)[0], head.eval()(x)[0])
    assert metadata["note"] == "test"


def test_a_head_with_nan_weights_is_refused_naming_the_file(tmp_path: Path) -> None:
    path, head = saved_head(tmp_path)
    state = {key: value.clone() for key, value in head.state_dict().items()}
    state["proj1.1.weight"][0, 0] = float("nan")
    state["alpha"][0, 1, 1] = float("inf")
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"n_blocks": "3", "in_dim": "8", "proj_dim": "4", "proj_layers": "1",
                                           "aggregation": "tie"})  # fmt: skip
    with pytest.raises(CheckpointError, match=rf"^{path}: weights hold NaN or Inf \(alpha, proj1.1.weight\)"):
        load_head(path)
    torch.save(state, tmp_path / "official.pth")
    with pytest.raises(CheckpointError, match="official.pth: weights hold NaN or Inf"):
        load_official_checkpoint(tmp_path / "official.pth")


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ({"in_dim": str(10**12)}, r"inconsistent shapes: .*proj1.1.weight"),  # would allocate petabytes
        ({"n_blocks": "7"}, r"inconsistent shapes: alpha"),
        ({"proj_layers": "3"}, r"missing keys"),
        ({"proj_dim": "-4"}, r"metadata incomplete or invalid"),
        ({"in_dim": "eight"}, r"metadata incomplete or invalid"),
        ({"aggregation": "max"}, r"metadata incomplete or invalid"),
    ],
)
def test_metadata_that_does_not_match_the_tensors_is_refused_before_allocating(
    tmp_path: Path, metadata: dict, says: str
) -> None:
    path, _ = saved_head(tmp_path, **metadata)
    with pytest.raises(CheckpointError, match=rf"^{path}: .*{says}"):
        load_head(path)
