"""The two operators a QDQ export is made of, as PyTorch custom ops with ONNX translations.

* ``qdetr::quantize_dequantize`` — a per-tensor activation fake-quant. In PyTorch it computes
  LSQ+'s division form ``(clamp(round(x / s) + z, lo, hi) - z) * s``; in ONNX it becomes
  ``QuantizeLinear -> Clip -> DequantizeLinear`` in an 8-bit container (uint8 with
  ``zp' = z - Qn`` or int8 with ``zp = z``); the Clip keeps the b-bit levels and is left out
  when the levels fill the container.
* ``qdetr::dequantize_weight`` — ``codes * scale`` along one axis. In ONNX it is a
  ``DequantizeLinear`` of an int8 initializer holding the integer weight codes.

Both are traced by ``torch.onnx.export(..., dynamo=True)`` and translated by the functions in
:data:`ONNX_TRANSLATIONS`; they are registered when this module is imported.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "quantize_dequantize",
    "quantize_codes",
    "dequantize_codes",
    "dequantize_weight",
    "onnx_translations",
    "CONTAINERS",
]

#: Integer containers of the activation codes: ONNX element type, value range.
CONTAINERS = {"uint8": (0, 255), "int8": (-128, 127)}


@torch.library.custom_op("qdetr::quantize_dequantize", mutates_args=())
def _quantize_dequantize_op(
    x: torch.Tensor,
    scale: float,
    zero_point: int,
    lo: int,
    hi: int,
    container_offset: int,
    signed_container: bool,
    dequantize_scale: float,
) -> torch.Tensor:
    s = torch.full((), scale, dtype=x.dtype, device=x.device)
    codes = torch.round(torch.div(x, s)).add_(zero_point).clamp_(lo, hi).sub_(zero_point)
    if dequantize_scale == scale:
        return codes.mul_(s)
    return codes.mul_(torch.full((), dequantize_scale, dtype=x.dtype, device=x.device))


@_quantize_dequantize_op.register_fake
def _(x, scale, zero_point, lo, hi, container_offset, signed_container, dequantize_scale):
    return torch.empty_like(x)


@torch.library.custom_op("qdetr::quantize_codes", mutates_args=())
def _quantize_codes_op(
    x: torch.Tensor, scale: float, zero_point: int, lo: int, hi: int, container_offset: int, signed_container: bool
) -> torch.Tensor:
    s = torch.full((), scale, dtype=x.dtype, device=x.device)
    codes = torch.round(torch.div(x, s)).add_(zero_point).clamp_(lo, hi).add_(container_offset)
    return codes.to(torch.int8 if signed_container else torch.uint8)


@_quantize_codes_op.register_fake
def _(x, scale, zero_point, lo, hi, container_offset, signed_container):
    return torch.empty(x.shape, dtype=torch.int8 if signed_container else torch.uint8, device=x.device)


@torch.library.custom_op("qdetr::dequantize_codes", mutates_args=())
def _dequantize_codes_op(
    codes: torch.Tensor, scale: float, container_zero_point: int, signed_container: bool
) -> torch.Tensor:
    return (codes.to(torch.float32) - container_zero_point) * scale


@_dequantize_codes_op.register_fake
def _(codes, scale, container_zero_point, signed_container):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("qdetr::dequantize_weight", mutates_args=())
def _dequantize_weight_op(codes: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * codes.dim()
    shape[axis] = -1
    return codes.to(scale.dtype) * scale.view(shape)


@_dequantize_weight_op.register_fake
def _(codes, scale, axis):
    return torch.empty(codes.shape, dtype=scale.dtype, device=codes.device)


def quantize_dequantize(
    x: torch.Tensor,
    scale: float,
    zero_point: int,
    lo: int,
    hi: int,
    *,
    container: str = "uint8",
    qmin: int | None = None,
    dequantize_scale: float | None = None,
) -> torch.Tensor:
    """Per-tensor fake-quant ``(clamp(round(x / s) + z, lo, hi) - z) * s`` that exports as Q -> Clip -> DQ.

    Args:
        x: activation, any shape, float.
        scale: the step s (> 0).
        zero_point: the integer zero point z.
        lo, hi: the integer levels kept, ``Qn <= lo <= hi <= Qp`` (``lo`` above ``Qn`` folds a
            preceding ReLU into the clip).
        container: ``"uint8"`` (codes stored as ``code - Qn``) or ``"int8"`` (codes as is).
        qmin: Qn, the lowest level of the range (default ``lo``); sets the uint8 offset.
        dequantize_scale: the step of the DequantizeLinear (default ``scale``); another value
            folds a constant factor of the consumer into it (``(codes - z) * s * c``).

    Returns:
        Tensor like ``x`` on the quantization grid.

    Examples:
        >>> quantize_dequantize(torch.tensor([-1.0, 0.26, 0.9]), 0.25, 0, -2, 1)
        tensor([-0.5000,  0.2500,  0.2500])
    """
    if container not in CONTAINERS:
        raise ValueError(f"container must be one of {tuple(CONTAINERS)}; got {container!r}")
    qmin = lo if qmin is None else qmin
    offset = -qmin if container == "uint8" else 0
    dq_scale = float(scale) if dequantize_scale is None else float(dequantize_scale)
    return torch.ops.qdetr.quantize_dequantize(
        x, float(scale), int(zero_point), int(lo), int(hi), offset, container == "int8", dq_scale
    )


def quantize_codes(
    x: torch.Tensor, scale: float, zero_point: int, lo: int, hi: int, *, container: str = "uint8", qmin: int | None = None
) -> torch.Tensor:
    """The integer codes of :func:`quantize_dequantize` in their container (exports as Q -> Clip).

    Args:
        x, scale, zero_point, lo, hi, container, qmin: as :func:`quantize_dequantize`.

    Returns:
        uint8 (``code - Qn``) or int8 tensor shaped like ``x``; :func:`dequantize_codes` maps it
        back to exactly what :func:`quantize_dequantize` returns (float32).

    Examples:
        >>> codes = quantize_codes(torch.tensor([-1.0, 0.26, 0.9]), 0.25, 0, -2, 1)
        >>> codes, dequantize_codes(codes, 0.25, 2)
        (tensor([0, 3, 3], dtype=torch.uint8), tensor([-0.5000,  0.2500,  0.2500]))
    """
    if container not in CONTAINERS:
        raise ValueError(f"container must be one of {tuple(CONTAINERS)}; got {container!r}")
    qmin = lo if qmin is None else qmin
    offset = -qmin if container == "uint8" else 0
    return torch.ops.qdetr.quantize_codes(x, float(scale), int(zero_point), int(lo), int(hi), offset, container == "int8")


def dequantize_codes(codes: torch.Tensor, scale: float, container_zero_point: int) -> torch.Tensor:
    """``(codes - zero point) * scale`` in float32 (exports as DequantizeLinear).

    Args:
        codes: uint8 / int8 codes from :func:`quantize_codes` (or padded / sliced copies).
        scale: the step.
        container_zero_point: the zero point as stored in the container (``z - Qn`` for uint8).

    Examples:
        >>> dequantize_codes(torch.tensor([0, 5], dtype=torch.uint8), 0.5, 1)
        tensor([-0.5000,  2.0000])
    """
    signed = codes.dtype == torch.int8
    return torch.ops.qdetr.dequantize_codes(codes, float(scale), int(container_zero_point), signed)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """``codes * scale`` along ``axis``; exports as DequantizeLinear of an int8 initializer.

    Args:
        codes: int8 integer weight codes, e.g. (C_out, C_in, kh, kw) or (K, N).
        scale: (codes.shape[axis],) positive steps.
        axis: the axis the steps run along (the output channels).

    Returns:
        Float tensor shaped like ``codes`` (dtype of ``scale``).

    Examples:
        >>> dequantize_weight(torch.tensor([[1, -2], [3, 0]], dtype=torch.int8), torch.tensor([0.5, 2.0]), 0)
        tensor([[ 0.5000, -1.0000],
                [ 6.0000,  0.0000]])
    """
    return torch.ops.qdetr.dequantize_weight(codes, scale, axis)


def onnx_translations(opset: int) -> dict:
    """``{custom op: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=...)``.

    Args:
        opset: the ONNX opset of the exported graph (the ops used exist from opset 13 on).

    Examples:
        >>> sorted(str(k) for k in onnx_translations(18))  # doctest: +NORMALIZE_WHITESPACE
        ['qdetr.dequantize_codes.default', 'qdetr.dequantize_weight.default',
         'qdetr.quantize_codes.default', 'qdetr.quantize_dequantize.default']
    """
    import onnxscript
    from onnxscript import ir

    op = onnxscript.values.Opset("", opset)

    def _const(value: int, signed: bool):
        return op.Constant(value=ir.tensor(np.array(value, np.int8 if signed else np.uint8)))

    def quantize_dequantize_onnx(
        x,
        scale: float,
        zero_point: int,
        lo: int,
        hi: int,
        container_offset: int,
        signed_container: bool,
        dequantize_scale: float,
    ):
        s = op.Constant(value=ir.tensor(np.array(scale, np.float32)))
        zp = _const(zero_point + container_offset, signed_container)
        q = op.QuantizeLinear(x, s, zp)
        cmin, cmax = CONTAINERS["int8" if signed_container else "uint8"]
        lo_c, hi_c = lo + container_offset, hi + container_offset
        if lo_c > cmin or hi_c < cmax:
            q = op.Clip(q, _const(lo_c, signed_container), _const(hi_c, signed_container))
        if dequantize_scale != scale:
            s = op.Constant(value=ir.tensor(np.array(dequantize_scale, np.float32)))
        return op.DequantizeLinear(q, s, zp)

    def quantize_codes_onnx(
        x, scale: float, zero_point: int, lo: int, hi: int, container_offset: int, signed_container: bool
    ):
        s = op.Constant(value=ir.tensor(np.array(scale, np.float32)))
        q = op.QuantizeLinear(x, s, _const(zero_point + container_offset, signed_container))
        cmin, cmax = CONTAINERS["int8" if signed_container else "uint8"]
        lo_c, hi_c = lo + container_offset, hi + container_offset
        if lo_c > cmin or hi_c < cmax:
            q = op.Clip(q, _const(lo_c, signed_container), _const(hi_c, signed_container))
        return q

    def dequantize_codes_onnx(codes, scale: float, container_zero_point: int, signed_container: bool):
        s = op.Constant(value=ir.tensor(np.array(scale, np.float32)))
        return op.DequantizeLinear(codes, s, _const(container_zero_point, signed_container))

    def dequantize_weight_onnx(codes, scale, axis: int):
        return op.DequantizeLinear(codes, scale, axis=axis)

    return {
        torch.ops.qdetr.quantize_dequantize.default: quantize_dequantize_onnx,
        torch.ops.qdetr.quantize_codes.default: quantize_codes_onnx,
        torch.ops.qdetr.dequantize_codes.default: dequantize_codes_onnx,
        torch.ops.qdetr.dequantize_weight.default: dequantize_weight_onnx,
    }
