"""Quantized Conv2d and Linear: ``y = op(Q_a(x), Q_w(W)) + b`` (method.md Eq. 2.25-2.26).

Both are subclasses of their float counterparts (``isinstance(m, nn.Linear)`` stays true)
with the same parameter names (``weight``, ``bias``) plus ``weight_quantizer`` and
``input_quantizer`` children. ``from_float`` shares the float module's Parameters (no
copy) and ``to_float`` gives them back. The bias is never quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdetr.quant.config import LayerQuantSpec
from qdetr.quant.fused_layers import fused_layer_forward
from qdetr.quant.quantizers import LSQActQuantizer, LSQWeightQuantizer
from qdetr.layers.recompute import recompute_saved

__all__ = ["QuantConv2d", "QuantLinear"]

# Non-parameter attributes that define an nn.Conv2d's computation.
_CONV_ATTRS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
    "padding_mode",
    "_reversed_padding_repeated_twice",
)


def _attach_quantizers(module: nn.Module, spec: LayerQuantSpec, out_channels: int, in_channels: int, in_axis: int):
    if spec.weight_bits is not None:
        module.weight_quantizer = LSQWeightQuantizer(spec.weight_bits, out_channels, axis=0, config=spec.weight)
        module.weight_quantizer.initialize_from(module.weight)
    else:
        module.weight_quantizer = None
    if spec.input_bits is not None:
        module.input_quantizer = LSQActQuantizer(
            spec.input_bits, in_channels, axis=in_axis, signed=spec.input_signed, config=spec.activation
        )
    else:
        module.input_quantizer = None
    module.to(device=module.weight.device)


def _operands(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(x̂, ŵ, recipes)``: the operands a forward pass multiplies, and how to recompute the
    quantized ones in backward instead of saving them (:func:`recompute_saved`).

    x̂ and ŵ feed only the conv / linear call, whose backward gives them fresh gradients: the
    quantizers may overwrite those in place (``grad_in_place``) instead of allocating. Neither
    is kept for backward: x̂ is recomputed from ``x`` (kept anyway by the quantizer, and usually
    by the layer before), ŵ from the weight, so a quantized layer holds no more memory for
    backward than its float counterpart.
    """
    recipes = {}
    x_hat, w_hat = x, module.weight
    if module.input_quantizer is not None:
        x_hat = module.input_quantizer(x, grad_in_place=True)
        if x_hat is not x:
            recipes[x_hat] = lambda: module.input_quantizer.recompute(x)
    if module.weight_quantizer is not None:
        w_hat = module.weight_quantizer(module.weight, grad_in_place=True)
        if w_hat is not module.weight:
            recipes[w_hat] = lambda: module.weight_quantizer.recompute(module.weight)
    return x_hat, w_hat, recipes


def _linear_views(x_hat: torch.Tensor, w_hat: torch.Tensor, recipes: dict) -> dict:
    """``recipes`` plus the views ``F.linear`` saves instead of its operands: ``addmm`` / ``mm``
    keep the input folded to (N, in_features) and the weight transposed, so those views get
    recipes too (recomputed, then viewed the same way)."""
    out = dict(recipes)
    for t, fn in recipes.items():
        if t is w_hat and t.dim() == 2:
            out[t.t()] = lambda fn=fn: fn().t()
        elif t is x_hat and t.dim() > 2 and t.is_contiguous():
            out[t.view(-1, t.shape[-1])] = lambda fn=fn, n=t.shape[-1]: fn().view(-1, n)
    return out


def _describe(module: nn.Module) -> str:
    w = module.weight_quantizer.bits if module.weight_quantizer is not None else "fp"
    a = module.input_quantizer.bits if module.input_quantizer is not None else "fp"
    return f"W{w}/A{a}"


class QuantLinear(nn.Linear):
    """Linear layer with LSQ weight (per output row) and LSQ+ input (per input feature) quantizers.

    Shapes:
        input: (..., in_features); output: (..., out_features).

    Examples:
        >>> lin = QuantLinear.from_float(nn.Linear(16, 8), LayerQuantSpec(weight_bits=4, input_bits=4))
        >>> y = lin.train()(torch.randn(2, 16))
        >>> y.shape, isinstance(lin, nn.Linear)
        (torch.Size([2, 8]), True)
        >>> lin.weight_quantizer.scale.shape, lin.input_quantizer.scale.shape   # (out,), (in,)
        (torch.Size([8]), torch.Size([16]))
        >>> type(lin.to_float()).__name__
        'Linear'
    """

    weight_quantizer: LSQWeightQuantizer | None
    input_quantizer: LSQActQuantizer | None

    @classmethod
    def from_float(cls, module: nn.Linear, spec: LayerQuantSpec) -> "QuantLinear":
        """Wrap ``module`` (sharing its weight and bias) with quantizers described by ``spec``.

        Raises:
            TypeError: if ``module`` has the wrong type.
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(f"QuantLinear.from_float expects nn.Linear, got {type(module).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = module.in_features, module.out_features
        new.weight = module.weight
        new.bias = module.bias
        _attach_quantizers(new, spec, module.out_features, module.in_features, in_axis=-1)
        new.train(module.training)
        return new

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's weight and bias."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        lin.train(self.training)
        return lin

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (the float weight when weights stay in float), shaped like ``weight``."""
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) with quantized input and weight."""
        y = fused_layer_forward(self, x)
        if y is not None:
            return y
        x_hat, w_hat, recipes = _operands(self, x)
        with recompute_saved(_linear_views(x_hat, w_hat, recipes)):
            return F.linear(x_hat, w_hat, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_describe(self)}"


class QuantConv2d(nn.Conv2d):
    """Conv2d with LSQ weight (per output channel) and LSQ+ input (per input channel) quantizers.

    Shapes:
        input: (B, C_in, H, W); output: (B, C_out, H', W').

    Examples:
        >>> conv = QuantConv2d.from_float(nn.Conv2d(3, 8, 3), LayerQuantSpec(weight_bits=8, input_bits=8))
        >>> y = conv.train()(torch.randn(1, 3, 16, 16))
        >>> y.shape
        torch.Size([1, 8, 14, 14])
        >>> conv.weight_quantizer.scale.shape, conv.input_quantizer.scale.shape   # (C_out,), (C_in,)
        (torch.Size([8]), torch.Size([3]))
        >>> conv.quantized_weight().shape
        torch.Size([8, 3, 3, 3])
    """

    weight_quantizer: LSQWeightQuantizer | None
    input_quantizer: LSQActQuantizer | None

    @classmethod
    def from_float(cls, module: nn.Conv2d, spec: LayerQuantSpec) -> "QuantConv2d":
        """Wrap ``module`` (sharing its weight and bias) with quantizers described by ``spec``.

        Raises:
            TypeError: if ``module`` has the wrong type.
        """
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"QuantConv2d.from_float expects nn.Conv2d, got {type(module).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in _CONV_ATTRS:
            setattr(new, attr, getattr(module, attr))
        new.weight = module.weight
        new.bias = module.bias
        _attach_quantizers(new, spec, module.out_channels, module.in_channels, in_axis=1)
        new.train(module.training)
        return new

    def to_float(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` sharing this layer's weight and bias."""
        conv = nn.Conv2d.__new__(nn.Conv2d)
        nn.Module.__init__(conv)
        for attr in _CONV_ATTRS:
            setattr(conv, attr, getattr(self, attr))
        conv.weight, conv.bias = self.weight, self.bias
        conv.train(self.training)
        return conv

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (the float weight when weights stay in float), shaped like ``weight``."""
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W') with quantized input and weight."""
        y = fused_layer_forward(self, x)
        if y is not None:
            return y
        x_hat, w_hat, recipes = _operands(self, x)
        with recompute_saved(recipes):
            return self._conv_forward(x_hat, w_hat, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_describe(self)}"
