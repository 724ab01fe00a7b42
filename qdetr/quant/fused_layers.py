"""A quantized conv / linear as one autograd node, on the native CPU kernel path.

Built from parts, a quantized layer ``y = op(Q_a(x), Q_w(W)) + b`` records about eight autograd
nodes per forward (two quantizers, the clamp and views of their steps, the op) and runs the
:func:`qdetr.layers.recompute.recompute_saved` hooks for every tensor the op saves: about
0.3 ms of Python and autograd bookkeeping per layer and training step, whatever the layer's
size, against 0.03-0.08 ms for the float layer. :func:`fused_quant_op` does the same
arithmetic in one node:

* forward: ``x̂`` and ``ŵ`` by the native kernels (:mod:`qdetr.quant.native_kernels`) into
  reusable buffers, then the float op on them; only ``x``, ``W`` and the steps are saved;
* backward: ``x̂`` and ``ŵ`` recomputed, the op's input / weight / bias gradients by the same
  ATen calls autograd makes for it (``convolution_backward``; for linear layers the two
  ``mm`` of ``addmm``'s backward and the bias sum), then the two quantizers' backward kernels,
  the LSQ gradient scales and the step clamp's mask, exactly as the separate nodes apply them.

Outputs and gradients are bit-identical to the separate-node path (tested for both layer
kinds, float32 and float64, with and without bias, and for the q / k / v projections of
:class:`qdetr.layers.attention.MultiheadAttention`), with one exception: for a convolution
whose input needs no gradient (a network's first conv, on the image) the input gradient that
only the input quantizer's step sums use is taken from a faster backward kernel, so those two
step gradients are the same sums in another order. It applies where the native kernels apply
(contiguous float32 / float64 CPU tensors, no autocast, no tracing or compiling) to plain
:class:`~qdetr.quant.quantizers.LSQWeightQuantizer` / :class:`~qdetr.quant.quantizers.LSQActQuantizer`
pairs that are enabled, calibrated and hook-free (a forward hook on a quantizer must still see
its call); everything else, and a backward pass that builds a graph (``create_graph=True``),
runs the separate nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks

from qdetr.quant import kernels, native_kernels
from qdetr.quant.primitives import fake_quant_weight
from qdetr.quant.quantizers import MIN_STEP, LSQActQuantizer, LSQWeightQuantizer, _broadcast_shape

__all__ = ["ConvArgs", "fused_quant_op", "fused_layer_forward"]

_conv_backward = torch.ops.aten.convolution_backward.default
_slow_conv2d_backward = torch.ops.aten._slow_conv2d_backward.output_mask
_DTYPES = (torch.float32, torch.float64)
_PLAIN = (torch.Tensor, nn.Parameter)


@dataclass(frozen=True)
class ConvArgs:
    """The geometry of a 2-D convolution (None in place of it means a linear layer)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def _hook_free(module: nn.Module) -> bool:
    return not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
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


def _applies(x, weight, bias, w_scale, wq, aq, conv: ConvArgs | None) -> bool:
    """Cheap checks, the likeliest failures first."""
    if type(wq) is not LSQWeightQuantizer or type(aq) is not LSQActQuantizer:
        return False
    if not (wq.enabled and aq.enabled and wq._is_initialized and aq._is_initialized) or aq.calibrating:
        return False
    dtype = x.dtype
    if x.device.type != "cpu" or dtype not in _DTYPES or not x.is_contiguous() or x.numel() == 0:
        return False
    if type(x) not in _PLAIN or type(weight) not in _PLAIN or weight.device.type != "cpu" or not weight.is_contiguous():
        return False
    a_scale, a_zero = aq.scale, aq.zero_point
    if weight.dtype != dtype or w_scale.dtype != dtype or a_scale.dtype != dtype or a_zero.dtype != dtype:
        return False
    if bias is not None and bias.dtype != dtype:
        return False
    if (x.dim() != 4 or weight.dim() != 4) if conv is not None else (x.dim() not in (2, 3) or weight.dim() != 2):
        return False
    if not _steps_fit(w_scale, weight.shape[0], wq.per_channel):
        return False
    if not _steps_fit(a_scale, x.shape[aq._axis_for(x.dim())], aq.per_channel) or a_zero.shape != a_scale.shape:
        return False
    if kernels.get_kernel_backend() != "native" or not native_kernels.native_kernels_available():
        return False
    if torch.is_autocast_enabled("cpu") or torch._C._is_tracing() or torch.compiler.is_compiling():
        return False
    return _hook_free(wq) and _hook_free(aq) and not _global_hooks()


class _Steps:
    """What the loops take: clamped steps and rounded zero points as contiguous (C,) tensors,
    the integer ranges, the (P, C, Q) layouts of x and W, and the LSQ gradient scales."""

    __slots__ = ("s_w", "s_a", "z_a", "w_range", "a_range", "w_rows", "a_rows", "g_w", "g_a")

    def __init__(self, x, weight, w_scale, wq, aq, g_w: float) -> None:
        self.s_w = w_scale.detach().clamp_min(MIN_STEP)
        self.s_a = aq.scale.detach().clamp_min(MIN_STEP)
        self.z_a = torch.round(aq.zero_point.detach())
        self.w_range = (wq.qmin, wq.qmax)
        self.a_range = aq.qrange
        self.w_rows = native_kernels.rows_layout(weight, 0 if wq.per_channel else None)
        self.a_rows = native_kernels.rows_layout(x, aq._axis_for(x.dim()) if aq.per_channel else None)
        self.g_w = g_w
        self.g_a = aq.grad_scale(x)

    def quantized_operands(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x̂, ŵ)`` in reusable buffers (:data:`qdetr.quant.native_kernels.OUTPUTS`)."""
        w_hat = native_kernels.weight_forward_rows(weight, self.s_w, self.w_rows, *self.w_range)
        x_hat = native_kernels.act_forward_rows(x, self.s_a, self.z_a, self.a_rows, *self.a_range)
        return x_hat, w_hat


def _op_forward(conv: ConvArgs | None, x_hat, w_hat, bias) -> torch.Tensor:
    if conv is not None:
        return F.conv2d(x_hat, w_hat, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return F.linear(x_hat, w_hat, bias)


def _op_backward(conv: ConvArgs | None, grad, x_hat, w_hat, bias, mask: list[bool], steps_only: bool = False):
    """``(grad_x̂, grad_ŵ, grad_b)`` as autograd computes them for the float op (None where not needed).

    ``steps_only``: ``grad_x̂`` feeds only the input quantizer's step sums (``x`` itself needs no
    gradient, as for a network's first conv on the image); a convolution then takes it from
    ATen's im2col + GEMM backward, which sums in another order than oneDNN's but is faster for
    few input channels (a ResNet stem: 12 ms against 18 ms at 2 x 3 x 256 x 256, one thread).
    """
    if conv is not None and steps_only and mask[0] and conv.groups == 1 and tuple(conv.dilation) == (1, 1):
        grad_x = _slow_conv2d_backward(grad, x_hat, w_hat, list(w_hat.shape[2:]), list(conv.stride), list(conv.padding), [True, False, False])[0]
        _, grad_w, grad_b = _op_backward(conv, grad, x_hat, w_hat, bias, [False, mask[1], mask[2]])
        return grad_x, grad_w, grad_b
    if conv is not None:
        return _conv_backward(
            grad, x_hat, w_hat, list(bias.shape) if bias is not None else None,
            list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0], conv.groups, mask,
        )
    # F.linear runs addmm (mm without bias) on the input folded to (N, in) and the weight's
    # transposed view; these are the products addmm's backward takes for those layouts.
    grad2d = grad.reshape(-1, grad.shape[-1])
    x2d = x_hat.reshape(-1, x_hat.shape[-1])
    grad_x = grad2d.mm(w_hat).view(x_hat.shape) if mask[0] else None
    grad_w = grad2d.t().mm(x2d) if mask[1] else None
    grad_b = grad2d.sum(0) if mask[2] else None
    return grad_x, grad_w, grad_b


def _clamp_passes_at_min() -> bool:
    """Whether autograd's ``clamp_min`` backward lets the gradient through where the input equals
    the bound (PyTorch 2.14 does not: a step sitting exactly at MIN_STEP, as a dead channel's
    calibrated step does, gets no gradient). Asked once, so the fused node masks the same way."""
    t = torch.full((1,), MIN_STEP, requires_grad=True)
    (grad,) = torch.autograd.grad(t.clamp_min(MIN_STEP).sum(), t)
    return bool(grad.item() == 1.0)


_CLAMP_PASSES_AT_MIN = _clamp_passes_at_min()


def _clamp_mask(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The gradient through ``scale.clamp_min(MIN_STEP)``, masked as autograd masks it."""
    keep = scale >= MIN_STEP if _CLAMP_PASSES_AT_MIN else scale > MIN_STEP
    return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype))


def _separate_nodes(x, weight, bias, w_scale, wq, aq, conv, g_w) -> torch.Tensor:
    """The same op through the quantizer module and the weight quantizer's autograd function."""
    shape = _broadcast_shape(weight.dim(), 0, wq.per_channel)
    w_hat = fake_quant_weight(weight, w_scale.clamp_min(MIN_STEP).view(shape), wq.qmin, wq.qmax, g_w)
    return _op_forward(conv, aq(x), w_hat, bias)


class _FusedQuantOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, w_scale, a_scale, a_zero, quantizers, conv, x_hat, w_hat, steps):
        ctx.quantizers, ctx.conv, ctx.steps = quantizers, conv, steps
        ctx.save_for_backward(x, weight, bias, w_scale, a_scale, a_zero)
        return _op_forward(conv, x_hat, w_hat, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, w_scale, a_scale, a_zero = ctx.saved_tensors
        (wq, aq), conv, steps = ctx.quantizers, ctx.conv, ctx.steps
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: differentiate the separate-node path instead
            with torch.enable_grad():
                out = _separate_nodes(x, weight, bias, w_scale, wq, aq, conv, steps.g_w)
                inputs = (x, weight, bias, w_scale, a_scale, a_zero)
                wanted = [t for t, n in zip(inputs, need[:6]) if n]
                grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
                return tuple(next(grads) if n else None for n in need[:6]) + (None,) * 5
        mask = [need[0] or need[4] or need[5], need[1] or need[3], need[2]]
        x_hat, w_hat = steps.quantized_operands(x, weight)
        grad_xh, grad_wh, grad_b = _op_backward(conv, grad, x_hat, w_hat, bias, mask, steps_only=not need[0])
        del x_hat, w_hat
        grad_x = grad_w = grad_ws = grad_as = grad_az = None
        # The op's gradients are fresh tensors (contiguous: ATen's convolution backward and mm
        # return them in x̂'s and ŵ's layout); the loops write the input gradients into them.
        if grad_xh is not None:
            grad_x, g_s, g_z = native_kernels.act_backward_rows(
                x, steps.s_a, steps.z_a, grad_xh.contiguous(), steps.a_rows, *steps.a_range, True
            )
            grad_as = _clamp_mask((g_s * steps.g_a).view(a_scale.shape), a_scale)
            grad_az = (g_z * steps.g_a).view(a_zero.shape)
        if grad_wh is not None:
            grad_w, g_s = native_kernels.weight_backward_rows(
                weight, steps.s_w, grad_wh.contiguous(), steps.w_rows, *steps.w_range, True
            )
            grad_ws = _clamp_mask((g_s * steps.g_w).view(w_scale.shape), w_scale)
        return grad_x, grad_w, grad_b, grad_ws, grad_as, grad_az, None, None, None, None, None


def fused_quant_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_quantizer: nn.Module,
    input_quantizer: nn.Module,
    *,
    conv: ConvArgs | None = None,
    weight_steps: torch.Tensor | None = None,
    weight_grad_scale: float | None = None,
) -> torch.Tensor | None:
    """``op(Q_a(x), Q_w(weight)) + bias`` as one autograd node, or None where it does not apply.

    Args:
        x: (B, C_in, H, W) for a convolution, (N, in) or (B, L, in) for a linear op.
        weight: (C_out, C_in / groups, kh, kw) or (out, in); may be a block of rows of a larger
            weight whose quantizer has one step per row (then ``weight_steps`` are those rows' steps).
        bias: (C_out,) or None.
        weight_quantizer, input_quantizer: the layer's quantizers.
        conv: the convolution's geometry; None for a linear op.
        weight_steps: the steps of ``weight``'s rows (default: the weight quantizer's).
        weight_grad_scale: LSQ gradient scale of the weight step (default: the quantizer's for ``weight``).

    Returns:
        The op's output, bit-identical to the separate-node path, or None.

    Examples:
        >>> from qdetr.quant.config import LayerQuantSpec
        >>> from qdetr.quant.modules import QuantLinear
        >>> lin = QuantLinear.from_float(nn.Linear(16, 8), LayerQuantSpec(weight_bits=4, input_bits=4)).train()
        >>> x = torch.randn(2, 5, 16)                      # (B, L, in)
        >>> _ = lin(x)                                     # the first call calibrates (separate nodes)
        >>> y = fused_quant_op(x, lin.weight, lin.bias, lin.weight_quantizer, lin.input_quantizer)
        >>> y is None or torch.equal(y, lin(x))            # None where no C compiler works
        True
    """
    w_scale = weight_quantizer.scale if weight_steps is None else weight_steps
    if not _applies(x, weight, bias, w_scale, weight_quantizer, input_quantizer, conv):
        return None
    if weight_grad_scale is None:
        weight_grad_scale = weight_quantizer.grad_scale(weight)
    steps = _Steps(x, weight, w_scale, weight_quantizer, input_quantizer, weight_grad_scale)
    x_hat, w_hat = steps.quantized_operands(x, weight)
    if not torch.is_grad_enabled():
        return _op_forward(conv, x_hat, w_hat, bias)
    aq = input_quantizer
    return _FusedQuantOp.apply(
        x, weight, bias, w_scale, aq.scale, aq.zero_point, (weight_quantizer, aq), conv, x_hat, w_hat, steps
    )


def fused_layer_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` for a ``QuantConv2d`` or ``QuantLinear`` as one autograd node, or None.

    Args:
        layer: the layer.
        x: (B, C_in, H, W) for a conv, (N, in_features) or (B, L, in_features) for a linear layer.
    """
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    if wq is None or aq is None:
        return None
    conv = None
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return None
        conv = ConvArgs(layer.stride, layer.padding, layer.dilation, layer.groups)
    return fused_quant_op(x, layer.weight, layer.bias, wq, aq, conv=conv)
