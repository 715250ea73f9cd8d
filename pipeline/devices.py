"""Pick the torch device both stages run on."""

from __future__ import annotations

import os

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device: str) -> torch.device:
    """``auto`` = a CUDA device when there is one, else the CPU; anything torch cannot run on here is refused.

    Under ``torchrun`` (``LOCAL_RANK`` set) ``auto`` and ``cuda`` mean
    ``cuda:LOCAL_RANK``: one GPU per rank.
    """
    local_rank = os.environ.get("LOCAL_RANK")
    if device in ("auto", "cuda") and torch.cuda.is_available() and local_rank is not None and local_rank.isdigit():
        return _checked_cuda(torch.device("cuda", int(local_rank)), f"cuda:{local_rank} (LOCAL_RANK)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; choose {DEVICE_CHOICES}") from None
    if resolved.type == "cuda":
        return _checked_cuda(resolved, device)
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no MPS device")
    if resolved.type not in ("cpu", "mps") or (resolved.type == "cpu" and resolved.index not in (None, 0)):
        raise ValueError(f"device {device!r} is not one the pipeline runs on; choose {DEVICE_CHOICES}")
    return resolved


def _checked_cuda(resolved: torch.device, asked: str) -> torch.device:
    if not torch.cuda.is_available():
        raise ValueError(f"device {asked!r} asked for, but torch sees no CUDA device")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {asked!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return resolved
