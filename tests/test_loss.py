"""Tests for pipeline.heads.loss against SupCon and BCE computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.heads.loss import rine_loss, supcon_loss


def supcon_by_hand(vectors: np.ndarray, labels: list[int], temperature: float, base_temperature: float) -> float:
    """Khosla et al. eq. 2 with one view, written as loops; anchors without positives count as 0."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    n = len(labels)
    total = 0.0
    for i in range(n):
        others = [a for a in range(n) if a != i]
        denominator = sum(math.exp(float(unit[i] @ unit[a]) / temperature) for a in others)
        positives = [p for p in others if labels[p] == labels[i]]
        if positives:
            log_probs = [float(unit[i] @ unit[p]) / temperature - math.log(denominator) for p in positives]
            total += -(temperature / base_temperature) * sum(log_probs) / len(positives)
    return total / n


def test_supcon_matches_hand_computation_on_four_vectors() -> None:
    angles = np.radians([0.0, 30.0, 90.0, 150.0])
    lengths = np.array([1.0, 2.0, 0.5, 3.0])  # normalisation happens inside the loss
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1) * lengths[:, None]
    labels = [0, 0, 1, 1]
    for temperature, base_temperature in ((0.07, 0.07), (0.5, 0.07), (1.0, 1.0)):
        expected = supcon_by_hand(vectors, labels, temperature, base_temperature)
        got = supcon_loss(torch.tensor(vectors), torch.tensor(labels), temperature, base_temperature)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(expected, rel=1e-12)


def test_supcon_closed_form_for_two_orthogonal_pairs() -> None:
    # Anchors 0 and 1 are identical, 2 and 3 identical and orthogonal to them; T = 1:
    # each anchor's positive has similarity 1 against two negatives at 0, so
    # loss_i = -log(e / (e + 2)) for all four anchors.
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    got = supcon_loss(z, torch.tensor([0, 0, 1, 1]), temperature=1.0, base_temperature=1.0)
    assert got.item() == pytest.approx(-math.log(math.e / (math.e + 2)), rel=1e-12)


@pytest.mark.parametrize("labels", [[0, 1, 1], [0, 1, 2, 3], [7]])
def test_supcon_is_finite_when_anchors_lack_positives(labels: list[int]) -> None:
    torch.manual_seed(0)
    z = torch.randn(len(labels), 5, dtype=torch.float64, requires_grad=True)
    loss = supcon_loss(z, torch.tensor(labels))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    expected = supcon_by_hand(z.detach().numpy(), labels, 0.07, 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if len(set(labels)) == len(labels):
        assert loss.item() == 0.0


def test_supcon_half_precision_is_computed_in_float32() -> None:
    torch.manual_seed(0)
    z = torch.randn(6, 4)
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    got = supcon_loss(z.bfloat16(), labels)
    assert got.dtype == torch.float32
    expected = supcon_by_hand(z.bfloat16().double().numpy(), labels.tolist(), 0.07, 0.07)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_rine_loss_is_bce_sum_plus_weighted_supcon() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 1, dtype=torch.float64)
    z = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    probabilities = 1 / (1 + np.exp(-logits.numpy().ravel()))
    y = labels.numpy()
    bce_sum = float(-(y * np.log(probabilities) + (1 - y) * np.log(1 - probabilities)).sum())
    contrastive = supcon_by_hand(z.numpy(), labels.tolist(), 0.07, 0.07)
    assert rine_loss(logits, z, labels, 0.2).item() == pytest.approx(bce_sum + 0.2 * contrastive, rel=1e-12)
    assert rine_loss(logits, z, labels, 0.0).item() == pytest.approx(bce_sum, rel=1e-12)


def test_rine_loss_factor_zero_skips_supcon_gradient() -> None:
    logits = torch.randn(4, 1, requires_grad=True)
    z = torch.randn(4, 3, requires_grad=True)
    rine_loss(logits, z, torch.tensor([0, 1, 0, 1]), 0.0).backward()
    assert z.grad is None and logits.grad is not None


def test_rine_loss_rejects_mismatched_labels() -> None:
    with pytest.raises(ValueError, match="3 logits for 4 labels"):
        rine_loss(torch.zeros(3, 1), torch.zeros(3, 2), torch.tensor([0, 1, 0, 1]), 0.1)


def test_supcon_matches_normalised_input_contract() -> None:
    torch.manual_seed(0)
    z = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1])
    torch.testing.assert_close(supcon_loss(z * 3.0, labels), supcon_loss(F.normalize(z, dim=1), labels))
