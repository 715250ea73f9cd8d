"""Pick the torch device both stages run on, the precision stage two computes in, and its memory."""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import torch

from .names import DEVICE_CHOICES

MEMORY_FRACTION = 0.8  # of the memory available now that stage two may fill with features by default
CPU_BF16_ENV = "RINE_CPU_BF16"  # "0" / "1": whether the CPU counts as running bfloat16 fast, instead of detecting it


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


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them (``/proc/cpuinfo``; empty where there is none)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bfloat16 (Intel Sapphire Rapids and later)."""
    return _cpu_has("_is_amx_tile_supported", "amx_bf16")


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU has the AVX-512 BF16 instructions (AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids)."""
    return _cpu_has("_is_avx512_bf16_supported", "avx512_bf16")


def _cpu_has(probe: str, flag: str) -> bool:
    """torch's ``torch.cpu.<probe>()`` where it says yes; otherwise (or in a torch without it) the kernel's ``flag``."""
    check = getattr(torch.cpu, probe, None)
    return bool(check is not None and check()) or flag in cpu_flags()


def bf16_is_fast(device: torch.device) -> bool:
    """Hardware whose bfloat16 matmuls run well ahead of float32: CUDA GPUs with bf16, and CPUs with AMX or with
    AVX-512 BF16 (where the head trains ~2x faster in bf16 than in float32, ``benchmarks/bench_head.py``).

    Only benchmarks and advice read it: no setting follows the machine (``amp`` is ``none`` unless a grid asks
    for ``bf16``). ``RINE_CPU_BF16=0`` or ``1`` in the environment overrides the CPU's detection.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced in ("0", "1"):
        return forced == "1"
    return cpu_has_amx() or cpu_has_avx512_bf16()


def compute_dtype(amp: str) -> torch.dtype:
    """The dtype stage two's training matmuls run in for ``amp`` (``none``: float32, ``bf16``: bfloat16)."""
    return torch.bfloat16 if amp == "bf16" else torch.float32


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matmuls computed in float32 (no TF32 on CUDA, no bf16 passes on oneDNN), restored on exit.

    PyTorch's default, under which the authors trained and scored; a library or a user may have lowered it
    (``torch.set_float32_matmul_precision("high")``), which would silently round every float32 head.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def available_memory(device: torch.device) -> int:
    """Bytes of features stage two may hold by default: ``MEMORY_FRACTION`` of the free GPU memory, or of the
    RAM available now (``MemAvailable`` on Linux, free pages elsewhere)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * MEMORY_FRACTION)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * MEMORY_FRACTION)
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * MEMORY_FRACTION)


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak memory of this process so far: resident set (``ru_maxrss``), and on a GPU the most torch allocated."""
    scale = 1 if os.uname().sysname == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    peak = {"process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}
    if device.type == "cuda":
        peak["cuda_allocated"] = int(torch.cuda.max_memory_allocated(device))
    return peak
