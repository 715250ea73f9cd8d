"""Stacked heads against the RineHead modules they stack: outputs, gradients, masks, round trips."""

from __future__ import annotations

import pytest
import torch

from pipeline.heads.head import FastDropout, RineHead
from pipeline.heads.head_stack import HalfMasks, HeadShape, HeadStack, Workspace
from pipeline.heads.loss import group_losses, rine_loss


def make_heads(count: int, q: int, aggregation: str = "tie", n_blocks: int = 5, dim: int = 12, width: int = 8):
    heads = []
    for seed in range(count):
        torch.manual_seed(seed)
        heads.append(RineHead(n_blocks, dim, width, q, aggregation=aggregation).double())
    return heads


def dropout_sites(head: RineHead) -> list[FastDropout]:
    """The head's dropout modules in the order its forward calls them."""
    return [m for part in (head.proj1, head.proj2, head.head) for m in part if isinstance(m, FastDropout)]


def forward_with_masks(head: RineHead, x: torch.Tensor, masks: list[torch.Tensor]):
    """The module's own forward, each dropout multiplying by the given mask instead of drawing one."""
    sites = dropout_sites(head)
    assert len(sites) == len(masks)
    for site, mask in zip(sites, masks):
        site.draw_half_mask = lambda y, mask=mask: mask.reshape(y.shape).to(y.dtype)
    try:
        return head.train()(x)
    finally:
        for site in sites:
            del site.draw_half_mask


def gradients(head: RineHead) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in head.named_parameters()}


def stack_gradient(stack: HeadStack, index: int, key: str) -> torch.Tensor:
    """The gradient of head ``index``'s ``key`` (RineHead naming) inside the stack."""
    prefix, position, kind = key.split(".") if key != "alpha" else ("alpha", "", "")
    if prefix == "alpha":
        return stack.alpha.grad[index : index + 1]
    layer = {"proj1": (int(position) - 1) // 3, "proj2": (int(position) - 1) // 3, "head": int(position) // 3}[prefix]
    tensors = getattr(stack, f"{prefix}_{kind}")
    grad = tensors[layer].grad
    if kind == "bias":
        return grad[index]
    return grad[index].t()


@pytest.mark.parametrize(("q", "aggregation"), [(1, "tie"), (2, "tie"), (3, "mean")])
def test_stack_equals_its_heads_forward_and_backward_with_the_same_masks(q, aggregation):
    heads = make_heads(3, q, aggregation)
    stack = HeadStack(heads)
    batch = 6
    torch.manual_seed(10)
    x = torch.randn(batch, 5, 12, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    factors = torch.tensor([0.1, 0.0, 0.8], dtype=torch.float64)
    masks = HalfMasks(torch.Generator().manual_seed(3), torch.device("cpu"), torch.float64).draw(
        stack.shape.mask_shapes(batch)
    )
    logits, z = stack.double()(x, masks)
    losses = group_losses(logits, z, labels, factors)
    losses.sum().backward()
    for g, head in enumerate(heads):
        expected_logits, expected_z = forward_with_masks(head, x, masks)
        torch.testing.assert_close(logits[g], expected_logits.squeeze(1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(z[g], expected_z, rtol=1e-6, atol=1e-6)
        loss = rine_loss(expected_logits.squeeze(1), expected_z, labels, float(factors[g]))
        torch.testing.assert_close(losses[g], loss, rtol=1e-6, atol=1e-6)
        loss.backward()
        for key, grad in gradients(head).items():
            torch.testing.assert_close(stack_gradient(stack, g, key), grad, rtol=1e-5, atol=1e-7, msg=key)


def test_evaluation_without_masks_equals_the_heads_in_eval_mode():
    heads = make_heads(2, 2)
    stack = HeadStack(heads).double()
    x = torch.randn(7, 5, 12, dtype=torch.float64)
    with torch.inference_mode():
        logits, z = stack(x)
    for g, head in enumerate(heads):
        expected_logits, expected_z = head.eval()(x)
        torch.testing.assert_close(logits[g].double(), expected_logits.squeeze(1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(z[g].double(), expected_z, rtol=1e-6, atol=1e-6)


def test_to_heads_gives_back_exactly_the_stacked_heads():
    heads = make_heads(3, 2)
    back = HeadStack(heads).to_heads()
    for original, copy in zip(heads, back):
        state = copy.state_dict()
        assert {k: v.dtype for k, v in state.items()} == {k: torch.float32 for k in state}
        for key, value in original.state_dict().items():
            assert torch.equal(state[key], value.float()), key
    assert not any(m.training for head in back for m in head.modules())


def test_heads_of_other_shapes_cannot_be_stacked():
    with pytest.raises(ValueError, match="different shapes"):
        HeadStack([make_heads(1, 1)[0], make_heads(1, 2)[0]])


def test_masks_are_fair_coins_from_one_seeded_draw_and_fill_every_site():
    shape = HeadShape(n_blocks=3, in_dim=70, proj_dim=33, proj_layers=2, aggregation="tie")
    shapes = shape.mask_shapes(100)
    assert shapes == [(300, 70), (300, 33), (300, 33), (100, 33), (100, 33), (100, 33), (100, 33), (100, 33)]
    first = HalfMasks(torch.Generator().manual_seed(5), torch.device("cpu"), torch.float32).draw(shapes)
    again = HalfMasks(torch.Generator().manual_seed(5), torch.device("cpu"), torch.float32).draw(shapes)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    values = torch.cat([m.flatten() for m in first])
    assert set(values.unique().tolist()) == {0.0, 2.0}
    assert 0.48 < (values != 0).float().mean().item() < 0.52
    # sites are independent: the same position of two sites agrees half the time
    assert 0.45 < (first[3] == first[4]).float().mean().item() < 0.55


def test_workspace_reuses_a_buffer_for_the_same_name():
    workspace = Workspace()
    first = workspace.get("a", (4, 5), torch.float32, torch.device("cpu"))
    smaller = workspace.get("a", (2, 3), torch.float32, torch.device("cpu"))
    assert smaller.data_ptr() == first.data_ptr()
    other = workspace.get("b", (2, 3), torch.float32, torch.device("cpu"))
    assert other.data_ptr() != first.data_ptr()
