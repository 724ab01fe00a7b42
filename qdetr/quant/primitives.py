"""Pure fake-quantization numerics (method.md sections 2 and 3).

Two autograd functions implement LSQ (weights) and LSQ+ (activations, learned integer
zero point) with the closed-form straight-through gradients of method.md. They save only
their *inputs* (which the surrounding graph keeps alive anyway) and recompute the clip
masks in backward, so no extra activation-sized tensor is stored for the backward pass.

Conventions (method.md section 1):

* ``round`` is round-half-to-even (``torch.round``);
* clamp first, then round; dequantise as ``(q - z) * s``;
* the step-size gradient is multiplied by ``g = 1 / sqrt(N * Qp)`` (LSQ gradient scale).
"""

from __future__ import annotations

import math

import torch

from qdetr.quant import kernels

__all__ = [
    "integer_range",
    "grad_scale_factor",
    "fake_quant_weight",
    "fake_quant_activation",
    "quantize_weight_codes",
]


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer levels ``(Qn, Qp)`` for a bit width.

    Args:
        bits: 2..8.
        signed: signed range ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.

    Returns:
        ``(Qn, Qp)``.

    Examples:
        >>> integer_range(4, True), integer_range(2, False)
        ((-8, 7), (0, 3))
    """
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def grad_scale_factor(numel_per_step: int, qp: int) -> float:
    """LSQ gradient scale ``g = 1 / sqrt(N * Qp)``.

    Args:
        numel_per_step: N, the number of elements sharing one step (at least 1 is used).
        qp: the largest integer level Qp.

    Examples:
        >>> grad_scale_factor(28, 7)
        0.07142857142857142
    """
    return 1.0 / math.sqrt(max(numel_per_step, 1) * qp)


class _FakeQuantWeight(torch.autograd.Function):
    """ŵ = s · round(clip(w / s, Qn, Qp)); STE gradients of method.md section 2.

    Saves only ``(w, s)``; the clip masks are recomputed in backward.
    """

    @staticmethod
    def forward(ctx, weight, scale, qn: int, qp: int, g: float, grad_in_place: bool):
        ctx.save_for_backward(weight, scale)
        ctx.qn, ctx.qp, ctx.g, ctx.grad_in_place = qn, qp, g, grad_in_place
        return kernels.weight_forward(weight, scale, qn, qp)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        in_place = ctx.grad_in_place and not torch.is_grad_enabled()  # never under create_graph
        grad_w, grad_s = kernels.weight_backward(weight, scale, grad_out, ctx.qn, ctx.qp, grad_in_place=in_place)
        return grad_w, grad_s * ctx.g, None, None, None, None


class _FakeQuantActivation(torch.autograd.Function):
    """x̂ = (round(clip(x / s + round(z), Qn, Qp)) - round(z)) · s; method.md section 3.2.

    Saves only ``(x, s, z)``; the clip masks are recomputed in backward.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qn: int, qp: int, g: float, grad_in_place: bool):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qn, ctx.qp, ctx.g, ctx.grad_in_place = qn, qp, g, grad_in_place
        return kernels.act_forward(x, scale, zero_point, qn, qp)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, zero_point = ctx.saved_tensors
        in_place = ctx.grad_in_place and not torch.is_grad_enabled()  # never under create_graph
        grad_x, grad_s, grad_z = kernels.act_backward(
            x, scale, zero_point, grad_out, ctx.qn, ctx.qp, grad_in_place=in_place
        )
        return grad_x, grad_s * ctx.g, grad_z * ctx.g, None, None, None, None


def fake_quant_weight(
    weight: torch.Tensor, scale: torch.Tensor, qn: int, qp: int, g: float, *, grad_in_place: bool = False
) -> torch.Tensor:
    """LSQ weight fake quantization.

    Args:
        weight: any shape, e.g. (C_out, C_in, kh, kw).
        scale: step sizes broadcastable to ``weight``, e.g. (C_out, 1, 1, 1); must be > 0.
        qn, qp: integer range.
        g: gradient scale applied to the step's gradient.
        grad_in_place: the result feeds only operations whose backward hands it a gradient
            nobody else holds (the weight of a conv or linear), so the backward may write the
            weight's gradient into that tensor instead of allocating one.

    Returns:
        Tensor like ``weight`` holding ``s * W_int``.

    Examples:
        >>> w = torch.randn(8, 4, requires_grad=True)
        >>> s = torch.full((8, 1), 0.1, requires_grad=True)
        >>> w_hat = fake_quant_weight(w, s, -8, 7, grad_scale_factor(4, 7))
        >>> w_hat.sum().backward()
        >>> w_hat.shape, w.grad.shape, s.grad.shape
        (torch.Size([8, 4]), torch.Size([8, 4]), torch.Size([8, 1]))
    """
    return _FakeQuantWeight.apply(weight, scale, qn, qp, g, grad_in_place)


def fake_quant_activation(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qn: int,
    qp: int,
    g: float,
    *,
    grad_in_place: bool = False,
) -> torch.Tensor:
    """LSQ+ activation fake quantization with a learned integer zero point.

    Args:
        x: any shape.
        scale: step sizes broadcastable to ``x`` (> 0).
        zero_point: float zero points broadcastable to ``x``, used as ``round(z)``.
        qn, qp: integer range.
        g: gradient scale applied to the step and zero-point gradients.
        grad_in_place: as in :func:`fake_quant_weight` (the result is only a conv or linear input).

    Returns:
        Tensor like ``x`` holding ``(q - round(z)) * s``.

    Examples:
        >>> x = torch.randn(2, 10, 8)                             # (B, L, C)
        >>> s, z = torch.full((1, 1, 8), 0.2), torch.zeros(1, 1, 8)
        >>> x_hat = fake_quant_activation(x, s, z, -8, 7, 1.0)
        >>> x_hat.shape, bool((x_hat / 0.2).round().abs().max() <= 8)
        (torch.Size([2, 10, 8]), True)
    """
    return _FakeQuantActivation.apply(x, scale, zero_point, qn, qp, g, grad_in_place)


def quantize_weight_codes(weight: torch.Tensor, scale: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """Integer codes ``W_int = clip(round(w / s), Qn, Qp)`` as int8 (method.md section 2).

    Args:
        weight: any shape, e.g. (C_out, C_in, kh, kw).
        scale: positive steps broadcastable to ``weight``, e.g. (C_out, 1, 1, 1).
        qn, qp: integer range (within int8).

    Returns:
        int8 tensor shaped like ``weight``.

    Examples:
        >>> quantize_weight_codes(torch.tensor([[0.26, -1.0, 9.0]]), torch.tensor([[0.5]]), -8, 7)
        tensor([[ 1, -2,  7]], dtype=torch.int8)
    """
    return torch.round((weight / scale).clamp(qn, qp)).to(torch.int8)
