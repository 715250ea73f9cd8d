"""The RINE trainable head: per-block projection, TIE block weighting, projection and classifier.

Plain torch, no I/O except ``load_official_checkpoint``, which reads one of the authors'
released state dicts. The layout follows spec section 3 so that module names and
``nn.Sequential`` positions give the official state-dict keys.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.special import expit
from torch import nn

from ..errors import PipelineError
from ..files import atomic_path
from ..names import AGGREGATIONS, DEFAULT_HEAD
from .probes import ProbeHead, build_probe, probe_shape

_PROJ1_WEIGHT_KEY = re.compile(r"proj1\.(\d+)\.weight")
_WRAPPER_KEYS = ("state_dict", "model")
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")


class CheckpointError(PipelineError, ValueError):
    """A checkpoint file is not a RINE head state dict; the message names the file."""


def build_byte_to_bits(scale: float) -> torch.Tensor:
    """Return a (256, 8) table whose row b holds the 8 bits of byte b (least significant first), times ``scale``."""
    byte_values = torch.arange(256).unsqueeze(1)
    bits = (byte_values >> torch.arange(8)) & 1
    return bits.to(torch.float32) * scale


class FastDropout(nn.Module):
    """Dropout with the semantics of ``nn.Dropout``, faster on CPU for p = 0.5.

    For p = 0.5 the keep mask is built from uniformly random 32-bit words: every bit
    is an exact fair coin, each bit drives one element, and a 256-row lookup table
    turns each random byte into 8 multipliers in {0, 2} (kept units scaled by
    1 / (1 - p)). Measured on a 2-core CPU for a (128, 24, 1024) float32 input:
    ~3 ms against ~45 ms for ``nn.Dropout``, whose ``bernoulli_`` draws one float per
    element. Other p values fall back to ``F.dropout``. Identity in eval mode. Works
    on any device (the mask is drawn on the input's device from its default
    generator, so ``torch.manual_seed`` makes it reproducible), under autograd and
    under ``torch.autocast`` (the mask takes the input's dtype; 0 and 2 are exact).
    ``pipeline fit`` does not train ``RineHead`` modules but ``head_stack.HeadStack``,
    which draws the same kind of masks for a whole step at once (``HalfMasks``).
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p
        self.register_buffer("byte_to_scale", build_byte_to_bits(2.0), persistent=False)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p != 0.5:
            return F.dropout(x, self.p, training=True)
        return x * self.draw_half_mask(x)

    def draw_half_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Return a tensor shaped like ``x`` with entries 0 or 2, each an independent fair coin."""
        n_elements = x.numel()
        n_bytes = -(-n_elements // 8)
        n_words = -(-n_bytes // 4)
        # The range 2**32 makes every word uniform over all 32-bit patterns (no modulo bias).
        words = torch.randint(-(2**31), 2**31, (n_words,), dtype=torch.int32, device=x.device)
        random_bytes = words.view(torch.uint8)[:n_bytes]
        table = self.byte_to_scale.to(device=x.device, dtype=x.dtype)
        multipliers = table.index_select(0, random_bytes.int())
        return multipliers.view(-1)[:n_elements].view(x.shape)


def build_mlp_stack(in_dim: int, out_dim: int, n_layers: int, dropout: float) -> nn.Sequential:
    """Return Dropout, then ``n_layers`` times [Linear, ReLU, Dropout] (the first Linear maps in_dim -> out_dim)."""
    layers: list[nn.Module] = [FastDropout(dropout)]
    for index in range(n_layers):
        layers += [nn.Linear(in_dim if index == 0 else out_dim, out_dim), nn.ReLU(), FastDropout(dropout)]
    return nn.Sequential(*layers)


def build_classifier(dim: int, dropout: float) -> nn.Sequential:
    """Return Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear(dim -> 1)."""
    return nn.Sequential(
        nn.Linear(dim, dim),
        nn.ReLU(),
        FastDropout(dropout),
        nn.Linear(dim, dim),
        nn.ReLU(),
        FastDropout(dropout),
        nn.Linear(dim, 1),
    )


class RineHead(nn.Module):
    """The RINE head on cached CLS tokens of shape (B, n_blocks, in_dim).

    ``aggregation="tie"``: a parameter ``alpha`` (1, n_blocks, proj_dim), standard
    normal at init, weights the projected blocks by ``softmax(alpha, dim=1)`` (``block_weights``, over
    blocks, per feature). ``aggregation="mean"`` is the ablation "without TIE": a
    plain mean over blocks, no ``alpha``. The ablation "without intermediate blocks"
    is done by the caller, who feeds ``x[:, -1:]`` to a head built with
    ``n_blocks=1`` (with one block the softmax weight is 1, which is what the
    authors' ablation computes).

    Parameters are created in the authors' order (``alpha``, then the Linear
    layers), so a seed fixes the initial weights, but they are not the authors'
    initial weights for the same seed: their model first builds CLIP with
    ``clip.load``, whose module initialisation draws from the global generator,
    and only then draws ``alpha`` and the head; that state cannot be reproduced
    here without building CLIP the same way.
    """

    def __init__(
        self,
        n_blocks: int,
        in_dim: int,
        proj_dim: int,
        proj_layers: int,
        *,
        aggregation: str = "tie",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        sizes = {"n_blocks": n_blocks, "in_dim": in_dim, "proj_dim": proj_dim, "proj_layers": proj_layers}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.n_blocks = n_blocks
        self.in_dim = in_dim
        self.proj_dim = proj_dim
        self.proj_layers = proj_layers
        self.aggregation = aggregation
        if aggregation == "tie":
            self.alpha = nn.Parameter(torch.randn(1, n_blocks, proj_dim))
        self.proj1 = build_mlp_stack(in_dim, proj_dim, proj_layers, dropout)
        self.proj2 = build_mlp_stack(proj_dim, proj_dim, proj_layers, dropout)
        self.head = build_classifier(proj_dim, dropout)

    def extra_repr(self) -> str:
        return (
            f"n_blocks={self.n_blocks}, in_dim={self.in_dim}, proj_dim={self.proj_dim}, "
            f"proj_layers={self.proj_layers}, aggregation={self.aggregation!r}"
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map features (B, n_blocks, in_dim), any float dtype, to (logits (B, 1), z (B, proj_dim))."""
        expected = (self.n_blocks, self.in_dim)
        if x.ndim != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"RineHead expects input (B, {expected[0]}, {expected[1]}), got {tuple(x.shape)}")
        x = x.to(self.proj2[1].weight.dtype)
        per_block = self.proj1(x)
        if self.aggregation == "tie":
            pooled = (block_weights(self.alpha) * per_block).sum(dim=1)
        else:
            pooled = per_block.mean(dim=1)
        z = self.proj2(pooled)
        return self.head(z), z


def block_weights(alpha: torch.Tensor) -> torch.Tensor:
    """TIE's weights: the softmax of ``alpha`` (..., n_blocks, proj_dim) over its blocks (dim -2).

    Taken as a softmax over the last dim of the transposed tensor: each
    (head, unit) row is then computed alone, by the same code, whatever the
    number of torch threads. Torch's softmax over an inner dim splits the
    units across threads and rounds the vectorised ones and the scalar tail
    of each thread's share differently, so its last bits followed the thread
    count (from 3 threads on, already for a 2 x 4 x 16 alpha).
    """
    return torch.softmax(alpha.transpose(-1, -2), dim=-1).transpose(-1, -2)


def crop_scores(logits: torch.Tensor) -> torch.Tensor:
    """Probability of fake per image from the logits of its crops, shape (B, n_crops): sigmoid of their mean.

    The authors' ten-crop evaluation (``torch.sigmoid(outputs.view(B, 10).mean(1))``),
    not the mean of the ten sigmoids; with one crop it is the sigmoid of the logit.
    Float64 on the CPU, element by element (numpy's mean over the crops, scipy's
    ``expit``): a logit gets the same score whatever batch it is scored in and
    however many threads torch uses (``torch.sigmoid`` on a tensor past torch's
    grain size is split across threads, and its vectorised body and scalar tail
    round differently).
    """
    if logits.ndim != 2:
        raise ValueError(f"crop_scores expects logits of shape (B, n_crops), got {tuple(logits.shape)}")
    return torch.from_numpy(expit(logits.detach().double().cpu().numpy().mean(axis=1)))


def count_parameters(module: nn.Module) -> int:
    """Return the number of scalar parameters of ``module`` (trainable or not)."""
    return sum(parameter.numel() for parameter in module.parameters())


def load_official_checkpoint(path: Path) -> RineHead:
    """Load a released RINE head state dict (e.g. ``rine_2class_trainable.pth``) into a ``RineHead`` in eval mode.

    The file is read with ``weights_only=True`` (no pickled code runs) onto the CPU.
    q, d', d and n are inferred from the keys and shapes; anything that is not exactly
    a TIE head state dict raises ``CheckpointError`` naming the file and the problem.
    """
    path = Path(path)
    state = unwrap_state_dict(read_tensor_file(path), path)
    n_blocks, in_dim, proj_dim, proj_layers = infer_head_shape(state, path)
    with torch.random.fork_rng(devices=[]):  # building the module must not move the caller's seed
        model = RineHead(n_blocks, in_dim, proj_dim, proj_layers, aggregation="tie")
    check_state_dict_matches(model, state, path)
    check_finite(state, path)
    model.load_state_dict(state, strict=True)
    return model.eval()


def read_tensor_file(path: Path) -> object:
    """Return what ``torch.load(..., weights_only=True)`` reads from ``path`` onto the CPU."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise CheckpointError(
            f"{path}: not a plain tensor state dict, refused by torch.load with weights_only=True "
            f"({summarise_load_error(exc)})"
        ) from exc


def summarise_load_error(exc: Exception) -> str:
    """Return the informative part of a ``torch.load`` failure (the refused global, or the unpickler's reason)."""
    text = str(exc)
    refused_global = _REFUSED_GLOBAL.search(text)
    if refused_global:
        return f"it holds a pickled {refused_global.group(1)}, which is not a tensor"
    unpickler_reason = _UNPICKLER_REASON.search(text)
    if unpickler_reason:
        return unpickler_reason.group(1).strip()
    lines = text.strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def unwrap_state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """Return the state dict itself, unwrapping a lone ``{"state_dict": ...}`` or ``{"model": ...}``."""
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    if len(loaded) == 1 and next(iter(loaded)) in _WRAPPER_KEYS and isinstance(next(iter(loaded.values())), dict):
        loaded = next(iter(loaded.values()))
    not_tensors = sorted(str(key) for key, value in loaded.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(not_tensors)}")
    not_float = sorted(key for key, value in loaded.items() if not value.is_floating_point())
    if not_float:
        raise CheckpointError(f"{path}: entries that are not floating-point tensors: {', '.join(not_float)}")
    return loaded


def infer_head_shape(state: dict[str, torch.Tensor], path: Path) -> tuple[int, int, int, int]:
    """Return (n_blocks, in_dim, proj_dim, proj_layers) read from ``alpha`` and the proj1 weights."""
    for key in ("alpha", "proj1.1.weight"):
        if key not in state:
            raise CheckpointError(f"{path}: missing key {key!r}, not a RINE head state dict")
    alpha, first = state["alpha"], state["proj1.1.weight"]
    if alpha.ndim != 3 or alpha.shape[0] != 1:
        raise CheckpointError(f"{path}: 'alpha' must have shape (1, n_blocks, proj_dim), found {tuple(alpha.shape)}")
    if first.ndim != 2:
        raise CheckpointError(f"{path}: 'proj1.1.weight' must be 2-D (proj_dim, in_dim), found {tuple(first.shape)}")
    proj_layers = sum(1 for key in state if _PROJ1_WEIGHT_KEY.fullmatch(key))
    return int(alpha.shape[1]), int(first.shape[1]), int(alpha.shape[2]), proj_layers


def check_state_dict_matches(model: RineHead | ProbeHead, state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise ``CheckpointError`` listing missing keys, unexpected keys and shape mismatches against ``model``."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key}: {tuple(state[key].shape)} (expected {shape})"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"inconsistent shapes: {'; '.join(mismatched)}")
    if problems:
        shape = f"n_blocks={model.n_blocks}, in_dim={model.in_dim}, proj_dim={model.proj_dim}, q={model.proj_layers}"
        raise CheckpointError(f"{path}: not a RINE head state dict for {shape}: {' | '.join(problems)}")


def save_head(head: RineHead | ProbeHead, path: Path, metadata: dict[str, str]) -> None:
    """Write a head as safetensors; its shape goes into the metadata so it reloads alone.

    A RINE head's metadata has no ``head`` key (as before the other heads existed); the others record theirs
    (``probes.probe_shape``).
    """
    from safetensors.torch import save_file

    if isinstance(head, RineHead):
        shape = {
            "n_blocks": str(head.n_blocks),
            "in_dim": str(head.in_dim),
            "proj_dim": str(head.proj_dim),
            "proj_layers": str(head.proj_layers),
            "aggregation": head.aggregation,
        }
    else:
        shape = probe_shape(head)
    state = {key: value.detach().cpu().contiguous() for key, value in head.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={**metadata, **shape})


def load_head(path: Path) -> tuple[RineHead | ProbeHead, dict[str, str]]:
    """Read a head written by ``save_head`` (any kind); returns it in eval mode with its metadata."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError, SafetensorError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors head ({error})") from None
    try:
        with torch.device("meta"):  # the recorded shape, checked against the tensors before anything is allocated
            expected = head_of(metadata)
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: head metadata incomplete or invalid ({error})") from None
    check_state_dict_matches(expected, state, path)
    check_finite(state, path)
    head = head_of(metadata)
    head.load_state_dict(state, strict=True)
    return head.eval(), metadata


def head_of(metadata: dict[str, str]) -> RineHead | ProbeHead:
    """An empty head of the kind and shape its metadata records (on the current default device)."""
    if metadata.get("head", DEFAULT_HEAD) != DEFAULT_HEAD:
        return build_probe(metadata)
    shape = tuple(int(metadata[key]) for key in ("n_blocks", "in_dim", "proj_dim", "proj_layers"))
    if min(shape) < 1:
        raise ValueError(f"sizes must be positive, found {shape}")
    return RineHead(*shape, aggregation=metadata["aggregation"])


def check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights holding NaN or Inf: such a head scores nothing it could be trusted with."""
    bad = sorted(key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all())
    if bad:
        raise CheckpointError(f"{path}: weights hold NaN or Inf ({', '.join(bad)}); the head cannot be used")
