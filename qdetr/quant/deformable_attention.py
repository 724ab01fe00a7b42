"""Quantized multi-scale deformable attention (Deformable DETR, RT-DETR, D-FINE, ...).

Hugging Face transformers ships two forms of multi-scale deformable attention:

* **core module** (Deformable DETR, RT-DETR, LW-DETR, RF-DETR, Grounding DINO, OmDet-Turbo):
  a wrapper ``<Prefix>MultiscaleDeformableAttention`` with child Linears ``value_proj``,
  ``sampling_offsets``, ``attention_weights``, ``output_proj`` and a parameter-free child
  ``attn`` that samples the value maps (``grid_sample``) and takes the weighted sum;
* **core function** (RT-DETRv2, D-FINE, DEIMv2): the wrapper calls
  ``multi_scale_deformable_attention_v2`` (a module-level function in RT-DETRv2, the instance
  attribute ``ms_deformable_attn_core`` in D-FINE / DEIMv2, which have no value or output
  projection).

:func:`quantize_deformable_attention` quantizes one wrapper in place:

* its Linears become :class:`~qdetr.quant.modules.QuantLinear` at the layer's bits
  (``value_proj``, ``sampling_offsets``, ``attention_weights`` with the projection bits,
  ``output_proj`` with the output bits of the :class:`AttentionQuantSpec`);
* the core is replaced, per instance, by a :class:`QuantDeformableCore` that fake-quantizes
  at ``attn_bits``, per head: the value entering the core (after ``value_proj`` and the
  padding mask, signed), the attention weights after their softmax (unsigned) and the
  bilinearly sampled values (signed);
* sampling offsets (the output of ``sampling_offsets``), reference points and sampling
  locations stay in float: they are sub-pixel coordinates consumed by bilinear
  interpolation, where a coarse grid moves every sample point (at 8 bits over a [0, 1]
  image a step is 1/255 of the image: several pixels on the finest level), deployment
  kernels (e.g. TensorRT's deformable-attention plugin) have no integer path for them, and
  quantized deformable DETRs in the literature keep them in float.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qdetr.layers.recompute import recompute_saved
from qdetr.quant.config import AttentionQuantSpec, LayerQuantSpec
from qdetr.quant.modules import QuantLinear
from qdetr.quant.quantizers import LSQActQuantizer

__all__ = [
    "QuantDeformableCore",
    "is_deformable_attention",
    "quantize_deformable_attention",
    "DEFORMABLE_PROJECTIONS",
]

#: Child Linears of a deformable-attention wrapper that read the query or the value.
DEFORMABLE_PROJECTIONS = ("value_proj", "sampling_offsets", "attention_weights")
#: The output projection (absent in D-FINE / DEIMv2).
DEFORMABLE_OUTPUT = "output_proj"

# Parameter names of the two core signatures in transformers (checked so that a refactor fails loudly).
_CORE_MODULE_ARGS = (
    "value",
    "value_spatial_shapes",
    "value_spatial_shapes_list",
    "level_start_index",
    "sampling_locations",
    "attention_weights",
    "im2col_step",
)
_CORE_FUNCTION_ARGS = (
    "value",
    "value_spatial_shapes",
    "sampling_locations",
    "attention_weights",
    "num_points_list",
    "method",
)
_CORE_FUNCTION_NAME = "multi_scale_deformable_attention_v2"


class QuantDeformableCore(nn.Module):
    """Multi-scale deformable sampling and weighted sum with per-head 8-bit quantizers.

    Computes exactly what transformers' ``MultiScaleDeformableAttention`` module and
    ``multi_scale_deformable_attention_v2`` function compute (bilinear ``grid_sample`` with
    zero padding, or RT-DETRv2's ``"discrete"`` nearest sampling), with three optional
    quantizer slots, all per head (``None`` = float):

    * ``v_quantizer``: the value, (B, S, h, d_h), head axis 2, signed;
    * ``prob_quantizer``: the attention weights after softmax, (B, Q, h, L·P), head axis 2, unsigned;
    * ``sampled_quantizer``: the sampled values, (B, h, d_h, Q, L·P), head axis 1, signed.

    It is called with either signature: ``(value, spatial_shapes, spatial_shapes_list,
    level_start_index, sampling_locations, attention_weights, im2col_step)`` (core-module
    form, locations (B, Q, h, L, P, 2), weights (B, Q, h, L, P)) or ``(value,
    spatial_shapes_list, sampling_locations, attention_weights, num_points_list, method)``
    (core-function form, locations (B, Q, h, L·P, 2), weights (B, Q, h, L·P)).

    Args:
        num_heads: h.
        attn_bits: bits of the three quantizers, or None for a float core.
        spec: quantizer numerics (its ``activation`` config is used).
        form: ``"module"`` or ``"function"``: which call signature this core replaces.

    Shapes:
        returns (B, Q, h·d_h).

    Examples:
        >>> core = QuantDeformableCore(num_heads=2, attn_bits=8, form="function")
        >>> value = torch.randn(1, 4 * 4 + 2 * 2, 2, 8)            # (B, S, h, d_h), two levels
        >>> locations = torch.rand(1, 5, 2, 2 * 3, 2)              # (B, Q, h, L·P, 2) in [0, 1]
        >>> weights = torch.rand(1, 5, 2, 6).softmax(-1)           # (B, Q, h, L·P)
        >>> out = core.train()(value, [(4, 4), (2, 2)], locations, weights, [3, 3], "default")
        >>> out.shape, core.prob_quantizer.scale.shape
        (torch.Size([1, 5, 16]), torch.Size([2]))
    """

    def __init__(
        self,
        num_heads: int,
        attn_bits: int | None,
        spec: AttentionQuantSpec | None = None,
        *,
        form: str = "module",
    ) -> None:
        super().__init__()
        if form not in ("module", "function"):
            raise ValueError(f"form must be 'module' or 'function'; got {form!r}")
        self.num_heads = num_heads
        self.form = form
        if attn_bits is None:
            self.v_quantizer = self.prob_quantizer = self.sampled_quantizer = None
        else:
            act = spec.activation if spec is not None else None
            self.v_quantizer = LSQActQuantizer(attn_bits, num_heads, axis=2, signed=True, config=act)
            self.prob_quantizer = LSQActQuantizer(attn_bits, num_heads, axis=2, signed=False, config=act)
            self.sampled_quantizer = LSQActQuantizer(attn_bits, num_heads, axis=1, signed=True, config=act)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, form={self.form}"

    def forward(self, *args: Any) -> torch.Tensor:
        """Either call signature (see the class docstring); returns (B, Q, h·d_h)."""
        if self.form == "module":
            value, _, shapes, _, locations, weights, _ = args
            b, q, h, levels, points, _ = locations.shape
            locations = locations.flatten(3, 4)
            weights = weights.flatten(3, 4)
            num_points = [points] * levels
            method = "default"
        else:
            value, shapes, locations, weights, num_points, method = args
        return self._sample(value, [tuple(int(x) for x in s) for s in shapes], locations, weights, list(num_points), method)

    def _quant(self, name: str, x: torch.Tensor) -> torch.Tensor:
        quantizer = getattr(self, name)
        return x if quantizer is None else quantizer(x)

    def _sample(self, value, shapes, locations, weights, num_points, method) -> torch.Tensor:
        value = self._quant("v_quantizer", value)
        weights = self._quant("prob_quantizer", weights)
        b, _, h, d = value.shape
        q = locations.shape[1]
        value_list = value.permute(0, 2, 3, 1).flatten(0, 1).split([hh * ww for hh, ww in shapes], dim=-1)
        grids = 2 * locations - 1 if method == "default" else locations
        grids = grids.permute(0, 2, 1, 3, 4).flatten(0, 1).split(num_points, dim=-2)
        sampled = []
        for level, (hh, ww) in enumerate(shapes):
            value_l = value_list[level].reshape(b * h, d, hh, ww)
            if method == "default":
                sampled.append(F.grid_sample(value_l, grids[level], mode="bilinear", padding_mode="zeros", align_corners=False))
            elif method == "discrete":
                coord = (grids[level] * torch.tensor([[ww, hh]], device=value.device) + 0.5).to(torch.int64)
                cx, cy = coord[..., 0].clamp(0, ww - 1), coord[..., 1].clamp(0, hh - 1)
                coord = torch.stack([cx, cy], dim=-1).reshape(b * h, q * num_points[level], 2)
                idx = torch.arange(coord.shape[0], device=value.device).unsqueeze(-1).repeat(1, coord.shape[1])
                values = value_l[idx, :, coord[..., 1], coord[..., 0]]
                sampled.append(values.transpose(1, 2).reshape(b * h, d, q, num_points[level]))
            else:
                raise ValueError(f"unknown deformable sampling method {method!r}; expected 'default' or 'discrete'")
        points = torch.cat(sampled, dim=-1).view(b, h, d, q, -1)  # (B, h, d_h, Q, L·P)
        weights = weights.permute(0, 2, 1, 3).reshape(b * h, 1, q, sum(num_points))
        if self.sampled_quantizer is None:
            out = (points.view(b * h, d, q, -1) * weights).sum(-1)
        else:
            # The quantized samples are recomputed in backward rather than saved (qdetr.layers.recompute).
            p_hat = self.sampled_quantizer(points).view(b * h, d, q, -1)
            recipe = {p_hat: lambda: self.sampled_quantizer.recompute(points).view(b * h, d, q, -1)}
            with recompute_saved(recipe):
                out = (p_hat * weights).sum(-1)
        return out.view(b, h * d, q).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------- recognition


def _arg_names(fn) -> tuple[str, ...]:
    try:
        params = inspect.signature(inspect.unwrap(fn)).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(n for n in params if n != "self")


def _core_form(module: nn.Module) -> str | None:
    """``"module"``, ``"function"`` (attribute or module-level function) or None."""
    core = getattr(module, "attn", None)
    if isinstance(core, QuantDeformableCore):
        return core.form
    if isinstance(core, nn.Module) and not list(core.parameters()):
        if _arg_names(type(core).forward) == _CORE_MODULE_ARGS:
            return "module"
    core = module.__dict__.get("ms_deformable_attn_core", getattr(module, "_modules", {}).get("ms_deformable_attn_core"))
    if core is not None:
        if isinstance(core, QuantDeformableCore) or _arg_names(core) == _CORE_FUNCTION_ARGS:
            return "function"
    fn = getattr(sys.modules.get(type(module).__module__), _CORE_FUNCTION_NAME, None)
    if fn is not None and _CORE_FUNCTION_NAME in _forward_names(type(module)) and _arg_names(fn) == _CORE_FUNCTION_ARGS:
        return "function"
    return None


def _forward_names(cls: type) -> tuple[str, ...]:
    forward = inspect.unwrap(cls.forward)
    return forward.__code__.co_names if hasattr(forward, "__code__") else ()


def is_deformable_attention(module: nn.Module) -> bool:
    """True for a transformers multi-scale deformable attention wrapper that can be quantized.

    Recognised by structure: ``nn.Linear`` children ``sampling_offsets`` and
    ``attention_weights``, an ``n_heads`` attribute, and a sampling core with the expected
    signature (a parameter-free ``attn`` child module, an ``ms_deformable_attn_core``
    attribute, or a call to the module-level ``multi_scale_deformable_attention_v2``).

    Examples:
        >>> from qdetr.tiny_hf_detr import build_tiny_hf_detr
        >>> model = build_tiny_hf_detr("rt_detr").model
        >>> is_deformable_attention(model.model.decoder.layers[0].encoder_attn)
        True
        >>> is_deformable_attention(model.model.decoder.layers[0].self_attn)
        False
    """
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in ("sampling_offsets", "attention_weights")):
        return False
    return isinstance(getattr(module, "n_heads", None), int) and _core_form(module) is not None


def deformable_projection_names(module: nn.Module) -> list[str]:
    """Names of the wrapper's child Linears, input projections first, ``output_proj`` last."""
    names = [n for n in DEFORMABLE_PROJECTIONS if isinstance(getattr(module, n, None), nn.Linear)]
    if isinstance(getattr(module, DEFORMABLE_OUTPUT, None), nn.Linear):
        names.append(DEFORMABLE_OUTPUT)
    return names


# --------------------------------------------------------------------------- module-level core (RT-DETRv2)

_CURRENT: contextvars.ContextVar[nn.Module] = contextvars.ContextVar("qdetr_deformable_module")
_SUBCLASSES: dict[type, type] = {}


def _call_instance_core(*args: Any) -> torch.Tensor:
    return _CURRENT.get().ms_deformable_attn_core(*args)


def _instance_core_subclass(cls: type) -> type:
    """A subclass of ``cls`` whose forward is ``cls.forward``'s own code with the module-level
    core function replaced by the instance's ``ms_deformable_attn_core`` child."""
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]
    original = inspect.unwrap(cls.forward)
    namespace = dict(original.__globals__)
    namespace[_CORE_FUNCTION_NAME] = _call_instance_core
    patched = type(original)(original.__code__, namespace, original.__name__, original.__defaults__, original.__closure__)
    patched.__kwdefaults__ = original.__kwdefaults__

    def forward(self, *args, **kwargs):
        token = _CURRENT.set(self)
        try:
            return patched(self, *args, **kwargs)
        finally:
            _CURRENT.reset(token)

    forward.__doc__ = original.__doc__
    name = f"Quant{cls.__name__}"
    sub = type(name, (cls,), {"forward": forward, "__module__": __name__, "__qualname__": name})
    setattr(sys.modules[__name__], name, sub)  # importable, so that the model pickles
    _SUBCLASSES[cls] = sub
    return sub


# --------------------------------------------------------------------------- quantization


def quantize_deformable_attention(module: nn.Module, spec: AttentionQuantSpec) -> nn.Module:
    """Quantize a transformers multi-scale deformable attention wrapper in place.

    Args:
        module: a module for which :func:`is_deformable_attention` is True.
        spec: projection bits for ``value_proj`` / ``sampling_offsets`` / ``attention_weights``,
            output bits for ``output_proj``, ``attn_bits`` for the core's per-head quantizers.

    Returns:
        The same module.

    Raises:
        TypeError: for a module that is not a recognised deformable attention.

    Examples:
        >>> from qdetr.tiny_hf_detr import build_tiny_hf_detr
        >>> attn = build_tiny_hf_detr("deformable_detr").model.model.decoder.layers[0].encoder_attn
        >>> spec = AttentionQuantSpec(proj_weight_bits=4, proj_input_bits=4, out_weight_bits=4,
        ...                           out_input_bits=4, attn_bits=8)
        >>> attn = quantize_deformable_attention(attn, spec)
        >>> type(attn.sampling_offsets).__name__, type(attn.attn).__name__
        ('QuantLinear', 'QuantDeformableCore')
        >>> attn.attn.sampled_quantizer.scale.shape                # one step per head
        torch.Size([2])
    """
    form = _core_form(module) if is_deformable_attention(module) else None
    if form is None:
        raise TypeError(f"{type(module).__name__} is not a supported multi-scale deformable attention module")
    device = module.sampling_offsets.weight.device
    for name in deformable_projection_names(module):
        out = name == DEFORMABLE_OUTPUT
        w_bits = spec.out_weight_bits if out else spec.proj_weight_bits
        a_bits = spec.out_input_bits if out else spec.proj_input_bits
        if w_bits is None and a_bits is None:
            continue
        layer = LayerQuantSpec(
            weight_bits=w_bits, input_bits=a_bits, input_signed=True, weight=spec.weight, activation=spec.activation
        )
        setattr(module, name, QuantLinear.from_float(getattr(module, name), layer))
    core = QuantDeformableCore(module.n_heads, spec.attn_bits, spec, form=form).to(device)
    if form == "module":
        module.attn = core
    else:
        if "ms_deformable_attn_core" in module.__dict__:
            del module.__dict__["ms_deformable_attn_core"]
        else:  # the module-level function: run this instance's own forward code against its core
            module.__class__ = _instance_core_subclass(type(module))
        module.ms_deformable_attn_core = core
    return module
