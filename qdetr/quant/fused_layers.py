"""A quantized conv / linear as one autograd node, on the native CPU kernel path.

Built from parts, a quantized layer ``y = op(Q_a(x), Q_w(W)) + b`` records about eight autograd
nodes per forward (two quantizers, the clamp and views of their steps, the op) and runs the
:func:`qdetr.layers.recompute.recompute_saved` hooks for every tensor the op saves: about
0.3 ms of Python and autograd bookkeeping per layer and training step, whatever the layer's
size, against 0.08 ms for the float layer. :func:`fused_layer_forward` does the same arithmetic
in one node:

* forward: ``x̂`` and ``ŵ`` by the native kernels (:mod:`qdetr.quant.native_kernels`) into
  reusable buffers, then the float op on them; only ``x``, ``W`` and the steps are saved;
* backward: ``x̂`` and ``ŵ`` recomputed, the op's input / weight / bias gradients by the same
  ATen calls autograd makes for it (``convolution_backward``; for linear layers the two
  ``mm`` of ``addmm``'s backward and the bias sum), then the two quantizers' backward kernels,
  the LSQ gradient scales and the step clamp's mask, exactly as the separate nodes apply them.

Outputs and gradients are bit-identical to the separate-node path (tested for both layer
kinds, float32 and float64, with and without bias). It applies where the native kernels apply
(contiguous float32 / float64 CPU tensors, no autocast, no tracing or compiling) to a plain
``QuantConv2d`` / ``QuantLinear`` whose two quantizers are plain, enabled, calibrated and
hook-free (a forward hook on a quantizer must still see its call); everything else, and a
backward pass that builds a graph (``create_graph=True``), runs the separate nodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks

from qdetr.quant import kernels, native_kernels
from qdetr.quant.quantizers import MIN_STEP, LSQActQuantizer, LSQWeightQuantizer

__all__ = ["fused_layer_forward"]

_conv_backward = torch.ops.aten.convolution_backward.default
_DTYPES = (torch.float32, torch.float64)
_PLAIN = (torch.Tensor, nn.Parameter)


def _hook_free(module: nn.Module) -> bool:
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _global_hooks() -> bool:
    return bool(
        _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks
        or _module_hooks._global_backward_hooks
        or _module_hooks._global_backward_pre_hooks
    )


def _steps_fit(scale: torch.Tensor, channels: int, per_channel: bool) -> bool:
    return scale.dim() == 1 and scale.shape[0] == (channels if per_channel else 1)


def _applies(layer: nn.Module, x: torch.Tensor, conv: bool) -> bool:
    """Cheap checks, in the order most likely to fail first."""
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    if type(wq) is not LSQWeightQuantizer or type(aq) is not LSQActQuantizer:
        return False
    if not (wq.enabled and aq.enabled and wq._is_initialized and aq._is_initialized) or aq.calibrating:
        return False
    weight = layer.weight
    if x.device.type != "cpu" or x.dtype not in _DTYPES or not x.is_contiguous() or x.numel() == 0:
        return False
    if type(x) not in _PLAIN or type(weight) not in _PLAIN or weight.device.type != "cpu" or not weight.is_contiguous():
        return False
    if weight.dtype != x.dtype or wq.scale.dtype != x.dtype or aq.scale.dtype != x.dtype or aq.zero_point.dtype != x.dtype:
        return False
    if layer.bias is not None and layer.bias.dtype != x.dtype:
        return False
    if conv:
        if x.dim() != 4 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return False
    elif x.dim() not in (2, 3):
        return False
    if not (_steps_fit(wq.scale, weight.shape[0], wq.per_channel) and _steps_fit(aq.scale, x.shape[aq._axis_for(x.dim())], aq.per_channel)):
        return False
    if aq.zero_point.shape != aq.scale.shape:
        return False
    if kernels.get_kernel_backend() != "native" or not native_kernels.native_kernels_available():
        return False
    if torch.is_autocast_enabled("cpu") or torch._C._is_tracing() or torch.compiler.is_compiling():
        return False
    return _hook_free(wq) and _hook_free(aq) and not _global_hooks()


def _rows(x: torch.Tensor, axis: int | None) -> tuple[int, int, int]:
    """``(P, C, Q)`` of a contiguous tensor with its steps along ``axis`` (None: one step)."""
    if axis is None:
        return 1, 1, x.numel()
    c = x.shape[axis]
    q = 1
    for n in x.shape[axis + 1:]:
        q *= n
    return x.numel() // (c * q), c, q


class _Steps:
    """The quantizers' steps as the loops take them: clamped steps and rounded zero points as
    contiguous (C,) tensors, the integer ranges and the (P, C, Q) layouts of x and W."""

    __slots__ = ("s_w", "s_a", "z_a", "w_range", "a_range", "w_rows", "a_rows")

    def __init__(self, layer: nn.Module, x: torch.Tensor) -> None:
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        self.s_w = wq.scale.detach().clamp_min(MIN_STEP)
        self.s_a = aq.scale.detach().clamp_min(MIN_STEP)
        self.z_a = torch.round(aq.zero_point.detach())
        self.w_range = (wq.qmin, wq.qmax)
        self.a_range = aq.qrange
        self.w_rows = _rows(layer.weight, 0 if wq.per_channel else None)
        self.a_rows = _rows(x, aq._axis_for(x.dim()) if aq.per_channel else None)

    def quantized_operands(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x̂, ŵ)`` in reusable buffers (:data:`qdetr.quant.native_kernels.OUTPUTS`)."""
        w_hat = native_kernels.weight_forward_rows(weight, self.s_w, self.w_rows, *self.w_range)
        x_hat = native_kernels.act_forward_rows(x, self.s_a, self.z_a, self.a_rows, *self.a_range)
        return x_hat, w_hat


def _op_forward(layer: nn.Module, conv: bool, x_hat: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    if conv:
        return F.conv2d(x_hat, w_hat, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x_hat, w_hat, layer.bias)


def _op_backward(layer: nn.Module, conv: bool, grad: torch.Tensor, x_hat, w_hat, mask: list[bool]):
    """``(grad_x̂, grad_ŵ, grad_b)`` as autograd computes them for the float op (None where not needed)."""
    if conv:
        bias_sizes = list(layer.bias.shape) if layer.bias is not None else None
        return _conv_backward(
            grad, x_hat, w_hat, bias_sizes, list(layer.stride), list(layer.padding), list(layer.dilation),
            False, [0, 0], layer.groups, mask,
        )
    # F.linear runs addmm (mm without bias) on the input folded to (N, in) and the weight's
    # transposed view; these are the products addmm's backward takes for those layouts.
    grad2d = grad.reshape(-1, grad.shape[-1])
    x2d = x_hat.reshape(-1, x_hat.shape[-1])
    grad_x = grad2d.mm(w_hat).view(x_hat.shape) if mask[0] else None
    grad_w = grad2d.t().mm(x2d) if mask[1] else None
    grad_b = grad2d.sum(0) if mask[2] else None
    return grad_x, grad_w, grad_b


def _clamp_mask(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The gradient through ``scale.clamp_min(MIN_STEP)``: kept where ``scale >= MIN_STEP``."""
    return torch.where(scale >= MIN_STEP, grad, torch.zeros((), dtype=grad.dtype))


class _FusedQuantLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, w_scale, a_scale, a_zero, layer, conv, x_hat, w_hat, steps):
        ctx.layer, ctx.conv, ctx.steps = layer, conv, steps
        ctx.save_for_backward(x, weight, w_scale, a_scale, a_zero)
        return _op_forward(layer, conv, x_hat, w_hat)

    @staticmethod
    def backward(ctx, grad):
        x, weight, w_scale, a_scale, a_zero = ctx.saved_tensors
        layer, conv = ctx.layer, ctx.conv
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        if torch.is_grad_enabled():  # create_graph: differentiate the separate-node path instead
            with torch.enable_grad():
                inputs = (x, weight, layer.bias, w_scale, a_scale, a_zero)
                out = _separate_nodes(layer, conv, x)
                wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[:6]) if need]
                grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
                return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:6]) + (None,) * 5
        steps = ctx.steps
        need = ctx.needs_input_grad
        mask = [need[0] or need[4] or need[5], need[1] or need[3], need[2]]
        x_hat, w_hat = steps.quantized_operands(x, weight)
        grad_xh, grad_wh, grad_b = _op_backward(layer, conv, grad, x_hat, w_hat, mask)
        del x_hat, w_hat
        grad_x = grad_w = grad_ws = grad_as = grad_az = None
        if grad_xh is not None:
            if grad_xh.is_contiguous():
                grad_x, g_s, g_z = native_kernels.act_backward_rows(x, steps.s_a, steps.z_a, grad_xh, steps.a_rows, *steps.a_range, True)
            else:
                grad_x, g_s, g_z = kernels.act_backward(x, steps.s_a, steps.z_a, grad_xh, *steps.a_range, grad_in_place=True)
            g = aq.grad_scale(x)
            grad_as = _clamp_mask((g_s * g).view(a_scale.shape), a_scale)
            grad_az = (g_z * g).view(a_zero.shape)
        if grad_wh is not None:
            if grad_wh.is_contiguous():
                grad_w, g_s = native_kernels.weight_backward_rows(weight, steps.s_w, grad_wh, steps.w_rows, *steps.w_range, True)
            else:
                grad_w, g_s = kernels.weight_backward(weight, steps.s_w, grad_wh, *steps.w_range, grad_in_place=True)
            grad_ws = _clamp_mask((g_s * wq.grad_scale(weight)).view(w_scale.shape), w_scale)
        return grad_x, grad_w, grad_b, grad_ws, grad_as, grad_az, None, None, None, None, None


def _separate_nodes(layer: nn.Module, conv: bool, x: torch.Tensor) -> torch.Tensor:
    """The layer computed by its quantizer modules and the float op (the path outside this file)."""
    x_hat = layer.input_quantizer(x)
    w_hat = layer.weight_quantizer(layer.weight)
    return _op_forward(layer, conv, x_hat, w_hat)


def fused_layer_forward(layer: nn.Module, x: torch.Tensor, conv: bool) -> torch.Tensor | None:
    """``layer(x)`` as one autograd node, or None where the fused path does not apply.

    Args:
        layer: a ``QuantConv2d`` (``conv=True``) or ``QuantLinear``.
        x: (B, C_in, H, W) for a conv, (N, in_features) or (B, L, in_features) for a linear layer.
        conv: which of the two ``layer`` is.

    Returns:
        The layer's output, bit-identical to the separate-node path, or None.
    """
    if not _applies(layer, x, conv):
        return None
    steps = _Steps(layer, x)
    x_hat, w_hat = steps.quantized_operands(x.detach(), layer.weight.detach())
    if not torch.is_grad_enabled():
        return _op_forward(layer, conv, x_hat, w_hat)
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    return _FusedQuantLayer.apply(
        x, layer.weight, layer.bias, wq.scale, aq.scale, aq.zero_point, layer, conv, x_hat, w_hat, steps
    )
