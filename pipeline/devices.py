"""Pick the torch device both stages run on."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """``auto`` = the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return resolved
