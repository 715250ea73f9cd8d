"""G RINE heads of one shape trained as one: every parameter stacked along a leading axis of size G.

Each layer of the G heads is one batched matmul; proj1 and the pooling over blocks, where a step's large
tensors live, run by hand in buffers kept between steps (with their own backward), the rest through autograd.
``HalfMasks`` draws every p = 0.5 dropout mask of a step at once from one generator, the same masks whatever G,
which is what makes a head trained in a stack equal one trained alone. ``HeadStack(heads)`` and ``to_heads()``
convert from and to ``RineHead`` modules exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .head import RineHead, block_weights, build_byte_to_bits

DROPOUT_SCALE = 2.0  # 1 / (1 - p) for p = 0.5, the only dropout the head uses


@dataclass(frozen=True)
class HeadShape:
    """What heads must share to be stacked."""

    n_blocks: int
    in_dim: int
    proj_dim: int
    proj_layers: int
    aggregation: str

    @classmethod
    def of(cls, head: RineHead) -> HeadShape:
        return cls(head.n_blocks, head.in_dim, head.proj_dim, head.proj_layers, head.aggregation)

    def mask_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """The dropout sites of one forward, in order, as the per-head shapes of their masks."""
        tokens = (batch * self.n_blocks, self.proj_dim)
        return (
            [(batch * self.n_blocks, self.in_dim)]
            + [tokens] * self.proj_layers
            + [(batch, self.proj_dim)] * (self.proj_layers + 1)
            + [(batch, self.proj_dim)] * 2
        )


class HalfMasks:
    """p = 0.5 dropout masks (entries 0 or 2) for every site of a step, from one draw on ``generator``.

    Each mask bit is one bit of a uniformly random 32-bit word; a 256-row table
    turns each random byte into 8 multipliers. The words and the multipliers
    are written into buffers kept between steps (fresh memory is slow to touch
    on the VMs this runs on). A mask stays valid until the next ``draw``.
    """

    def __init__(self, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> None:
        self.generator = generator
        self.table = build_byte_to_bits(DROPOUT_SCALE).to(device=device, dtype=dtype)
        self._words = torch.empty(0, dtype=torch.int32, device=device)
        self._values = torch.empty(0, dtype=dtype, device=device)

    def draw(self, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        sizes = [_numel(shape) for shape in shapes]
        padded = [-(-size // 32) * 32 for size in sizes]  # every site starts on a word boundary
        n_words = sum(padded) // 32
        if self._words.numel() < n_words:
            self._words = torch.empty(n_words, dtype=torch.int32, device=self.table.device)
            self._values = torch.empty(n_words * 32, dtype=self.table.dtype, device=self.table.device)
        words = self._words[:n_words]
        # The range 2**32 makes every word uniform over all 32-bit patterns (no modulo bias).
        torch.randint(-(2**31), 2**31, (n_words,), generator=self.generator, out=words)
        values = self._values[: n_words * 32].view(-1, 8)
        torch.index_select(self.table, 0, words.view(torch.uint8).int(), out=values)
        flat = values.view(-1)
        masks, start = [], 0
        for shape, size, room in zip(shapes, sizes, padded, strict=True):
            masks.append(flat[start : start + size].view(shape))
            start += room
        return masks


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class Workspace:
    """Buffers kept between steps, by name: a step's large activations reuse the memory of the last step's.

    Fresh memory costs a page fault per page on first touch, which made up a
    large share of a training step on the VMs this project measures on.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        size = _numel(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:size].view(shape)


def relu_dropout_(a: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """ReLU then dropout (``mask``: 0 or 2, broadcast; None: ReLU only), in place. Not differentiable."""
    a.clamp_min_(0)
    return a if mask is None else a.mul_(mask)


def _relu_dropout_backward_(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``grad`` zeroed where ``out`` (a ``relu_dropout_`` output) is 0, in place; the caller applies the mask's scale.

    ``out > 0`` exactly where the unit passed the ReLU and was kept; there its
    slope is the mask's value (2), elsewhere 0.
    """
    return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


@dataclass
class _Projected:
    """What the backward of ``project_blocks`` needs from its forward."""

    x: torch.Tensor  # the (masked) input, (B*n, d)
    hidden: list[torch.Tensor]  # each layer's output, (G, B*n, d')
    weights: list[torch.Tensor]  # cast to the compute dtype
    block_weights: torch.Tensor | None  # softmax(alpha), (G, n, d'); None for the mean
    batch: int
    scale: float  # the dropout masks' value for a kept unit (1 without masks)


def _layer_buffer(workspace: Workspace, name: str, like: torch.Tensor, size: int, tokens: int, width: int):
    """A contiguous (G, B*n, d') buffer of ``like``'s dtype and device."""
    return workspace.get(name, (size, tokens, width), like.dtype, like.device)


def project_blocks(
    x: torch.Tensor,
    masks: Sequence[torch.Tensor] | None,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    alpha: torch.Tensor | None,
    batch: int,
    workspace: Workspace,
    keep: bool,
) -> tuple[torch.Tensor, _Projected | None]:
    """proj1 and the pooling over blocks of G heads: x (B*n, d) in the compute dtype -> pooled (G, B, d').

    Not differentiable by itself (``_ProjectBlocks`` is its autograd wrapper).
    ``keep``: keep every layer's output for the backward; otherwise two
    buffers alternate (evaluation). Every large tensor is a contiguous
    (G, B*n, d') buffer: layouts that BLAS and oneDNN (bfloat16) take as
    they are, without copies.
    """
    dtype = x.dtype
    tokens = x.shape[0]
    size, width = biases[0].shape
    mask = iter(masks) if masks is not None else iter(lambda: None, 1)
    input_mask = next(mask)
    if input_mask is not None:
        x = torch.mul(x, input_mask, out=workspace.get("input", x.shape, dtype, x.device))
    cast = [weight.to(dtype) for weight in weights]
    first = _layer_buffer(workspace, "h0", x, size, tokens, width)
    first_bias = biases[0].to(dtype)
    for head in range(size):  # the shared input, once per head
        torch.addmm(first_bias[head], x, cast[0][head], out=first[head])
    hidden = [relu_dropout_(first, next(mask))]
    for layer in range(1, len(weights)):
        out = _layer_buffer(workspace, f"h{layer}" if keep else f"h{layer % 2}", x, size, tokens, width)
        torch.baddbmm(biases[layer].to(dtype).unsqueeze(1), hidden[-1], cast[layer], out=out)
        hidden.append(relu_dropout_(out, next(mask)))
    last = hidden[-1].view(size, batch, tokens // batch, width)
    weights = None
    if alpha is not None:
        weights = block_weights(alpha.float()).to(dtype)  # (G, n, d')
        # scratch: the buffer the backward starts its gradient in (or, without a backward, the free one)
        scratch_name = f"g{(len(hidden) - 1) % 2}" if keep else f"h{len(hidden) % 2}"
        scratch = workspace.get(scratch_name, last.shape, dtype, x.device)
        pooled = torch.mul(last, weights.unsqueeze(1), out=scratch).sum(dim=2)
    else:
        pooled = last.mean(dim=2)
    if not keep:
        return pooled, None
    scale = 1.0 if masks is None else DROPOUT_SCALE
    return pooled, _Projected(x, hidden, cast, weights, batch, scale)


def project_blocks_backward(
    grad_pooled: torch.Tensor, saved: _Projected, workspace: Workspace
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Gradients of ``project_blocks``: (d alpha or None, [d W1, d b1, d W2, d b2, ...]), float32."""
    x, hidden, cast, scale = saved.x, saved.hidden, saved.weights, saved.scale
    dtype = x.dtype
    size, tokens, width = hidden[0].shape
    top = len(hidden) - 1
    grad_pooled = grad_pooled.to(dtype)
    last = hidden[-1].view(size, saved.batch, tokens // saved.batch, width)
    grad = _layer_buffer(workspace, f"g{top % 2}", x, size, tokens, width)
    grad_alpha = None
    if saved.block_weights is not None:
        scratch = grad.view(last.shape)  # free until the gradient is written into it below
        grad_block_weights = torch.mul(last, grad_pooled.unsqueeze(2), out=scratch).sum(dim=1).float()
        softmax = saved.block_weights.float()
        grad_alpha = softmax * (grad_block_weights - (grad_block_weights * softmax).sum(dim=1, keepdim=True))
        torch.mul(grad_pooled.unsqueeze(2), saved.block_weights.unsqueeze(1), out=grad.view(last.shape))
    else:
        grad.view(last.shape).copy_(grad_pooled.unsqueeze(2).expand(last.shape)).div_(last.shape[2])
    grads: list[torch.Tensor] = []
    for layer in range(top, 0, -1):
        _relu_dropout_backward_(grad, hidden[layer])
        grad_weight = torch.baddbmm(cast[layer], hidden[layer - 1].transpose(1, 2), grad, beta=0, alpha=scale)
        grads[:0] = [grad_weight.float(), grad.sum(dim=1).mul_(scale).float()]
        below = _layer_buffer(workspace, f"g{(layer - 1) % 2}", x, size, tokens, width)
        torch.baddbmm(below, grad, cast[layer].transpose(1, 2), beta=0, alpha=scale, out=below)
        grad = below
    _relu_dropout_backward_(grad, hidden[0])
    grad_first = torch.empty_like(cast[0])
    for head in range(size):
        torch.addmm(cast[0][head], x.t(), grad[head], beta=0, alpha=scale, out=grad_first[head])
    grads[:0] = [grad_first.float(), grad.sum(dim=1).mul_(scale).float()]
    return grad_alpha, grads


class _ProjectBlocks(torch.autograd.Function):
    """Autograd wrapper of ``project_blocks`` / ``project_blocks_backward``."""

    @staticmethod
    def forward(ctx, x, masks, workspace, batch, alpha, *parameters):  # noqa: D102
        weights, biases = parameters[0::2], parameters[1::2]
        pooled, saved = project_blocks(x, masks, weights, biases, alpha, batch, workspace, keep=True)
        ctx.saved, ctx.workspace = saved, workspace
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled):  # noqa: D102
        grad_alpha, grads = project_blocks_backward(grad_pooled, ctx.saved, ctx.workspace)
        del ctx.saved
        return (None, None, None, None, grad_alpha, *grads)


def _stack_parameter(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).contiguous())


def _stack_weight(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    """nn.Linear weights (out, in) stacked as (G, in, out), so that ``x @ W`` and its gradient need no transpose."""
    return nn.Parameter(torch.stack([t.detach().t() for t in tensors]).contiguous())


class HeadStack(nn.Module):
    """The parameters of G heads of one ``HeadShape``, stacked; ``forward`` runs all G on one batch.

    Layouts: ``alpha`` (G, n, d'); every weight (G, in, out); biases (G, out).
    """

    def __init__(self, heads: Sequence[RineHead]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("a HeadStack needs at least one head")
        self.shape = HeadShape.of(heads[0])
        others = {HeadShape.of(head) for head in heads} - {self.shape}
        if others:
            raise ValueError(
                f"heads of different shapes cannot be stacked: {self.shape} and {sorted(map(str, others))}"
            )
        self.size = len(heads)
        self.workspace = Workspace()
        q = self.shape.proj_layers
        states = [head.state_dict() for head in heads]

        def weight(key: str) -> nn.Parameter:
            return _stack_weight([state[key] for state in states])

        def bias(key: str) -> nn.Parameter:
            return _stack_parameter([state[key] for state in states])

        if self.shape.aggregation == "tie":
            self.alpha = nn.Parameter(torch.cat([state["alpha"] for state in states]).contiguous())
        self.proj1_weight = nn.ParameterList(weight(f"proj1.{1 + 3 * i}.weight") for i in range(q))
        self.proj1_bias = nn.ParameterList(bias(f"proj1.{1 + 3 * i}.bias") for i in range(q))
        self.proj2_weight = nn.ParameterList(weight(f"proj2.{1 + 3 * i}.weight") for i in range(q))
        self.proj2_bias = nn.ParameterList(bias(f"proj2.{1 + 3 * i}.bias") for i in range(q))
        self.head_weight = nn.ParameterList(weight(f"head.{i}.weight") for i in (0, 3, 6))
        self.head_bias = nn.ParameterList(bias(f"head.{i}.bias") for i in (0, 3, 6))

    def head_state(self, index: int) -> dict[str, torch.Tensor]:
        """Head ``index`` as a ``RineHead`` state dict (float32 copies on the CPU)."""
        state = {}
        if self.shape.aggregation == "tie":
            state["alpha"] = self.alpha[index : index + 1]
        for i in range(self.shape.proj_layers):
            state[f"proj1.{1 + 3 * i}.weight"] = self.proj1_weight[i][index].t()
            state[f"proj1.{1 + 3 * i}.bias"] = self.proj1_bias[i][index]
            state[f"proj2.{1 + 3 * i}.weight"] = self.proj2_weight[i][index].t()
            state[f"proj2.{1 + 3 * i}.bias"] = self.proj2_bias[i][index]
        for j, i in enumerate((0, 3, 6)):
            state[f"head.{i}.weight"] = self.head_weight[j][index].t()
            state[f"head.{i}.bias"] = self.head_bias[j][index]
        return {key: value.detach().float().cpu().contiguous() for key, value in state.items()}

    def to_heads(self) -> list[RineHead]:
        """The G heads as ``RineHead`` modules in eval mode, with exactly the stacked values."""
        shape = self.shape
        heads = []
        for index in range(self.size):
            with torch.device("meta"):  # no initialisation: every value is loaded next
                head = RineHead(
                    shape.n_blocks, shape.in_dim, shape.proj_dim, shape.proj_layers, aggregation=shape.aggregation
                )
            head.load_state_dict(self.head_state(index), strict=True, assign=True)
            heads.append(head.eval())
        return heads

    def forward(
        self, x: torch.Tensor, masks: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the G heads on ``x`` (B, n_blocks, in_dim) in ``x``'s dtype: (logits (G, B), z (G, B, d')).

        The outputs are float32 (float64 for a float64 ``x``).

        ``masks``: the dropout masks of ``HeadShape.mask_shapes(B)`` (training),
        or None (evaluation: no dropout). Differentiable with respect to the
        parameters when grad mode is on.
        """
        batch, n_blocks, in_dim = x.shape
        if (n_blocks, in_dim) != (self.shape.n_blocks, self.shape.in_dim):
            raise ValueError(
                f"HeadStack expects input (B, {self.shape.n_blocks}, {self.shape.in_dim}), got {tuple(x.shape)}"
            )
        dtype = x.dtype
        x = x.reshape(batch * n_blocks, in_dim)
        q = self.shape.proj_layers
        proj1_masks, rest = (masks[: q + 1], masks[q + 1 :]) if masks is not None else (None, None)
        alpha = self.alpha if self.shape.aggregation == "tie" else None
        parameters = [t for pair in zip(self.proj1_weight, self.proj1_bias) for t in pair]
        if torch.is_grad_enabled():
            pooled = _ProjectBlocks.apply(x, proj1_masks, self.workspace, batch, alpha, *parameters)
        else:
            pooled, _ = project_blocks(
                x, proj1_masks, self.proj1_weight, self.proj1_bias, alpha, batch, self.workspace, keep=False
            )
        mask = iter(rest) if rest is not None else iter(lambda: None, 1)
        pooled_mask = next(mask)
        p = pooled if pooled_mask is None else pooled * pooled_mask
        for weight, bias in zip(self.proj2_weight, self.proj2_bias):
            p = _relu_dropout(_stacked_linear(p, weight, bias, dtype), next(mask))
        z = p
        c = z
        for weight, bias in zip(self.head_weight[:2], self.head_bias[:2]):
            c = _relu_dropout(_stacked_linear(c, weight, bias, dtype), next(mask))
        logits = _stacked_linear(c, self.head_weight[2], self.head_bias[2], dtype)
        out_dtype = torch.promote_types(dtype, torch.float32)  # bfloat16 -> float32 for the loss
        return logits.squeeze(2).to(out_dtype), z.to(out_dtype)


def _relu_dropout(a: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """ReLU then dropout through autograd (the small (G, B, d') tensors after the pooling)."""
    a = torch.relu(a)
    return a if mask is None else a * mask


def _stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(G, M, in) @ weight (G, in, out) + bias (G, out): one baddbmm for the G heads."""
    return torch.baddbmm(bias.to(dtype).unsqueeze(1), x, weight.to(dtype))
