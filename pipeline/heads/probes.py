"""The heads beside RINE that read one vector per image: ``linear`` and ``logreg`` (a linear layer) and ``knn``
(cosine nearest neighbours), with their file format.

Every head takes what a store holds per row, (B, n, d) -- the cached blocks' tokens, or the pooled embedding as
(B, 1, e) -- picks its vector (``position``: which of the n), and returns ``(logits (B, 1), z)`` like
``RineHead``, so that scoring, calibration, ``Detector`` and export treat every head alike. Plain torch.
"""

from __future__ import annotations

import torch
from torch import nn

KNN_SMOOTHING = 0.5  # the knn logit: log((fake votes + 0.5) / (real votes + 0.5)), finite for unanimous votes


class LinearProbe(nn.Module):
    """One linear layer on one vector: ``head: linear`` (trained with BCE) and ``head: logreg`` (scikit-learn's
    fit, standardisation folded into the weights, float64)."""

    def __init__(self, n_blocks: int, in_dim: int, position: int, kind: str = "linear", dtype=torch.float32) -> None:
        super().__init__()
        check_position(position, n_blocks)
        self.kind = kind
        self.n_blocks = n_blocks  # what a row holds: the store's blocks, or 1 for the embedding
        self.in_dim = in_dim
        self.position = position
        self.linear = nn.Linear(in_dim, 1, dtype=dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, n_blocks={self.n_blocks}, in_dim={self.in_dim}, position={self.position}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = pick(x, self.n_blocks, self.in_dim, self.position)
        return self.logits_of(z), z.float()

    def logits_of(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1), float32, of the head's vectors (B, in_dim)."""
        return self.linear(z.to(self.linear.weight.dtype)).float()


class KnnProbe(nn.Module):
    """Cosine k nearest neighbours among the training vectors (``bank``, L2-normalised, float32, with ``labels``).

    The logit is the smoothed log-odds of the neighbours' votes (``KNN_SMOOTHING``); ties between equally
    similar neighbours go to the earlier training row (``torch.topk`` on the CPU).
    """

    def __init__(self, n_blocks: int, in_dim: int, position: int, k: int, n_bank: int) -> None:
        super().__init__()
        check_position(position, n_blocks)
        self.kind = "knn"
        self.n_blocks = n_blocks
        self.in_dim = in_dim
        self.position = position
        self.k = min(k, n_bank)
        self.register_buffer("bank", torch.zeros(n_bank, in_dim))
        self.register_buffer("labels", torch.zeros(n_bank))

    def extra_repr(self) -> str:
        return f"n_blocks={self.n_blocks}, in_dim={self.in_dim}, position={self.position}, k={self.k}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = pick(x, self.n_blocks, self.in_dim, self.position).float()
        return self.logits_of(z), z

    def logits_of(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1), float32, of the head's vectors (B, in_dim)."""
        similarity = normalise(z) @ self.bank.T
        nearest = torch.topk(similarity, self.k, dim=1).indices
        fake = self.labels[nearest].sum(dim=1)
        return torch.log((fake + KNN_SMOOTHING) / (self.k - fake + KNN_SMOOTHING)).unsqueeze(1)


ProbeHead = LinearProbe | KnnProbe


def normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def check_position(position: int, n_blocks: int) -> None:
    if not 0 <= position < n_blocks:
        raise ValueError(f"position {position} outside the {n_blocks} vectors of a row")


def pick(x: torch.Tensor, n_blocks: int, in_dim: int, position: int) -> torch.Tensor:
    """The head's vector (B, d) of rows (B, n_blocks, in_dim)."""
    if x.ndim != 3 or tuple(x.shape[1:]) != (n_blocks, in_dim):
        raise ValueError(f"the head expects input (B, {n_blocks}, {in_dim}), got {tuple(x.shape)}")
    return x[:, position]


def probe_shape(head: ProbeHead) -> dict[str, str]:
    """The metadata a probe's file needs to be rebuilt alone."""
    shape = {
        "head": head.kind,
        "n_blocks": str(head.n_blocks),
        "in_dim": str(head.in_dim),
        "position": str(head.position),
    }
    if isinstance(head, KnnProbe):
        shape |= {"k": str(head.k), "n_bank": str(len(head.bank))}
    else:
        shape |= {"weight_dtype": str(head.linear.weight.dtype).removeprefix("torch.")}
    return shape


def build_probe(metadata: dict[str, str]) -> ProbeHead:
    """An empty probe of the shape its metadata records (``probe_shape``); KeyError/ValueError when incomplete."""
    n_blocks, in_dim, position = int(metadata["n_blocks"]), int(metadata["in_dim"]), int(metadata["position"])
    if min(n_blocks, in_dim) < 1:
        raise ValueError(f"sizes must be positive, found n_blocks {n_blocks}, in_dim {in_dim}")
    if metadata["head"] == "knn":
        return KnnProbe(n_blocks, in_dim, position, int(metadata["k"]), int(metadata["n_bank"]))
    if metadata["head"] in ("linear", "logreg"):
        dtype = getattr(torch, metadata["weight_dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"weight_dtype {metadata['weight_dtype']!r} is not a torch dtype")
        return LinearProbe(n_blocks, in_dim, position, metadata["head"], dtype)
    raise ValueError(f"unknown head {metadata['head']!r}")
