"""The RINE training objective: summed binary cross-entropy plus a supervised contrastive term."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), one view per sample, contrast mode "all".

    ``z`` (B, D) is L2-normalised along its last axis here. For anchor i, with the other
    samples a != i as contrast set and P(i) = {p != i : labels[p] == labels[i]},
    ``loss_i = -(T / base_T) * mean_{p in P(i)} log(exp(s_ip / T) / sum_{a != i} exp(s_ia / T))``
    with s the cosine similarity; the result is the mean of loss_i over all B anchors.
    An anchor with no positive contributes 0 (its positive count is taken as 1, as in
    the maintained upstream implementation the authors use), so the loss and its
    gradient are finite for any labels, a batch of one included. Half-precision
    inputs are computed in float32. ``z`` of shape (G, B, D) gives the G losses (G,)
    of G heads on the same batch, each exactly as alone.
    """
    if z.ndim not in (2, 3):
        raise ValueError(f"supcon_loss expects z of shape (B, D) or (G, B, D), got {tuple(z.shape)}")
    if labels.ndim != 1 or labels.shape[0] != z.shape[-2]:
        raise ValueError(f"supcon_loss expects labels of shape ({z.shape[-2]},), got {tuple(labels.shape)}")
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    z = F.normalize(z, dim=-1)
    similarity = z @ z.transpose(-1, -2) / temperature
    logits = similarity - similarity.max(dim=-1, keepdim=True).values.detach()
    not_self = ~torch.eye(z.shape[-2], dtype=torch.bool, device=z.device)
    positive = (labels.view(-1, 1) == labels.view(1, -1)) & not_self
    # The floor only matters for a batch of one, whose contrast set is empty.
    contrast_sum = (torch.exp(logits) * not_self).sum(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)
    log_prob = logits - torch.log(contrast_sum)
    positive_count = positive.sum(dim=1).clamp_min(1)
    mean_log_prob_positive = (positive * log_prob).sum(dim=-1) / positive_count
    return -(temperature / base_temperature) * mean_log_prob_positive.mean(dim=-1)


def rine_loss(logits: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, contrastive_factor: float) -> torch.Tensor:
    """Return BCEWithLogits summed over the batch + ``contrastive_factor`` * ``supcon_loss(z, labels)``.

    ``logits`` (B, 1) or (B,), ``labels`` (B,) with 0 = real, 1 = fake. A factor of 0
    skips the contrastive term entirely (the ablation "without contrastive loss").
    """
    if logits.numel() != labels.numel():
        raise ValueError(f"rine_loss got {logits.numel()} logits for {labels.numel()} labels")
    targets = labels.to(dtype=logits.dtype).view(logits.shape)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    if contrastive_factor != 0:
        loss = loss + contrastive_factor * supcon_loss(z, labels)
    return loss


def group_losses(
    logits: torch.Tensor,
    z: torch.Tensor,
    labels: torch.Tensor,
    contrastive_factors: torch.Tensor,
    contrastive: bool = True,
) -> torch.Tensor:
    """``rine_loss`` of G heads on one batch: logits (G, B), z (G, B, D), factors (G,) -> losses (G,).

    Loss g depends on head g's outputs only, so the gradient of ``losses.sum()``
    with respect to head g's parameters is that of its own loss. ``contrastive``
    False skips the SupCon term (every factor 0, as ``rine_loss`` does; the
    caller says so, because reading the factors back from a GPU would stall
    it); a factor of 0 among others multiplies a finite SupCon by 0.
    """
    if logits.ndim != 2 or logits.shape[1] != labels.numel() or contrastive_factors.shape != logits.shape[:1]:
        raise ValueError(
            f"group_losses expects logits (G, B), labels (B,), factors (G,); got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(contrastive_factors.shape)}"
        )
    targets = labels.to(dtype=logits.dtype).expand_as(logits)
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)
    if contrastive:
        losses = losses + contrastive_factors.to(logits.dtype) * supcon_loss(z, labels)
    return losses
