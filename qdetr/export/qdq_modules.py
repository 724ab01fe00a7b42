"""Export forms of qdetr's quantized layers: the same arithmetic, written with QDQ operators.

Each class is built from a calibrated quantized module and computes what that module computes
in eval mode, but through :mod:`qdetr.export.qdq_ops`, so that the ONNX graph holds
``QuantizeLinear``/``DequantizeLinear`` nodes and int8 weight initializers:

* :class:`ExportActQuantizer` — an :class:`~qdetr.quant.LSQActQuantizer`. Per tensor it is a
  Q -> Clip -> DQ; per channel (the paper profile) it stays a float fake-quant (Div, Round, Clip,
  Mul), because a per-axis DequantizeLinear on an activation is either not fused or breaks
  onnxruntime's integer kernels (docs/concepts/deploy-profile.md).
* :class:`ExportConv2d` / :class:`ExportLinear` — :class:`~qdetr.quant.QuantConv2d` /
  :class:`~qdetr.quant.QuantLinear`: input QDQ, weight ``DequantizeLinear(int8 codes, per
  output channel scale)`` on axis 0 (Conv, ``[C_out, C_in, kh, kw]``) or axis 1 (MatMul,
  ``[K, N]``), float bias. A following frozen batch norm can be folded into the conv.
* :class:`ExportMultiheadAttention` — :class:`~qdetr.quant.QuantMultiheadAttention`: q, k and v
  projections as three MatMuls with their own int8 initializers, QDQ on q, k, v and the
  probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qdetr.export.qdq_ops import CONTAINERS, dequantize_codes, dequantize_weight, quantize_codes, quantize_dequantize
from qdetr.layers.attention import AttentionSlots, MultiheadAttention
from qdetr.quant.quantizers import MIN_STEP, LSQActQuantizer, LSQWeightQuantizer

#: Integer convs get their input channels padded with zeros to a multiple of this.
INPUT_CHANNEL_MULTIPLE = 8

__all__ = ["INPUT_CHANNEL_MULTIPLE", "ExportError", "ExportActQuantizer", "ExportConv2d", "ExportLinear", "ExportMultiheadAttention"]


class ExportError(ValueError):
    """A model, layer or option that the QDQ exporter cannot represent; the message says what to do.

    Examples:
        >>> issubclass(ExportError, ValueError)
        True
    """


class ExportActQuantizer(nn.Module):
    """Eval-mode :class:`~qdetr.quant.LSQActQuantizer` written with QDQ operators.

    Args:
        quantizer: a calibrated activation quantizer.
        name: its qualified name (for error messages).
        container: ``"uint8"`` (onnxruntime: codes offset by ``-Qn``, any zero point in
            ``[Qn, Qp]``) or ``"int8"`` (TensorRT: needs a zero point of 0 and a signed range
            or one within ``[0, 127]``).

    Attributes:
        fold_relu: set when a ReLU directly before this quantizer has been removed; the lowest
            kept level becomes ``max(Qn, z)`` (``Q(relu(x)) = max(Q(x), Q(0))``).
        output_factor: a constant the consumer multiplies by, folded into the dequantization
            step (per tensor only; the attention's ``1/sqrt(d)`` on the query).

    Raises:
        ExportError: for an uncalibrated quantizer, or a zero point the container cannot hold.

    Shapes:
        input and output: any shape (per tensor), or the quantizer's channel axis (per channel).

    Examples:
        >>> from qdetr.quant import QuantizerConfig
        >>> q = LSQActQuantizer(4, 1, axis=-1, signed=False,
        ...                     config=QuantizerConfig(granularity="per_tensor")).train()
        >>> x = torch.rand(2, 5, 8)
        >>> _ = q(x)                                                 # calibrates
        >>> export = ExportActQuantizer(q.eval(), "demo")
        >>> export.per_tensor, bool(torch.equal(export(x), q(x)))
        (True, True)
    """

    def __init__(self, quantizer: LSQActQuantizer, name: str, container: str = "uint8") -> None:
        super().__init__()
        if not quantizer.is_initialized:
            raise ExportError(
                f"activation quantizer {name!r} was never calibrated; run qdetr.calibrate(model, batches) "
                "(or train or load quantized weights) before exporting"
            )
        if container not in CONTAINERS:
            raise ExportError(f"container must be one of {tuple(CONTAINERS)}; got {container!r}")
        self.name = name
        self.container = container
        self.qmin, self.qmax = quantizer.qrange
        self.bits = quantizer.bits
        self.axis = quantizer.axis
        self.fold_relu = False
        self.output_factor = 1.0
        scale = quantizer.scale.detach().float().clamp_min(MIN_STEP)
        zero = torch.round(quantizer.zero_point.detach().float())
        self.per_tensor = scale.numel() == 1
        if self.per_tensor:
            self.scale, self.zero_point = float(scale), int(zero)
            self._check_container()
        else:
            self.register_buffer("scale_c", scale)
            self.register_buffer("zero_c", zero)

    def _check_container(self) -> None:
        z, (cmin, cmax) = self.zero_point, CONTAINERS[self.container]
        if not self.qmin <= z <= self.qmax:
            raise ExportError(
                f"{self.name}: zero point {z} lies outside the integer range [{self.qmin}, {self.qmax}], "
                "so 0.0 has no exact code; re-calibrate or train this quantizer further"
            )
        if self.container == "uint8" and not 0 <= z - self.qmin <= 255:
            raise ExportError(f"{self.name}: zero point {z} does not fit a uint8 container (z - Qn must be in 0..255)")
        if self.container == "int8":
            if z != 0:
                raise ExportError(
                    f"{self.name}: zero point {z} != 0; int8 containers (TensorRT) need symmetric activations: "
                    "train with QuantConfig(profile='deploy', symmetric_activations=True)"
                )
            if self.qmin < cmin or self.qmax > cmax:
                raise ExportError(
                    f"{self.name}: levels [{self.qmin}, {self.qmax}] do not fit int8; an unsigned 8-bit range "
                    "needs a uint8 container: train with symmetric_activations=True for TensorRT"
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` as the source quantizer does in eval mode."""
        if self.per_tensor:
            lo = max(self.qmin, self.zero_point) if self.fold_relu else self.qmin
            return quantize_dequantize(
                x, self.scale, self.zero_point, lo, self.qmax, container=self.container, qmin=self.qmin,
                dequantize_scale=self.scale * self.output_factor,
            )
        axis = self.axis if self.axis >= 0 else x.dim() + self.axis
        shape = [1] * x.dim()
        shape[axis] = -1
        s, z = self.scale_c.to(x.dtype).view(shape), self.zero_c.to(x.dtype).view(shape)
        if self.fold_relu:
            x = torch.relu(x)
        return (torch.round(x / s) + z).clamp(self.qmin, self.qmax).sub(z).mul(s)

    @property
    def container_zero_point(self) -> int:
        """The zero point as stored in the container (``z - Qn`` for uint8); per tensor only."""
        return self.zero_point - self.qmin if self.container == "uint8" else self.zero_point

    def to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The container codes of ``x`` (per tensor only): ``from_codes(to_codes(x)) == forward(x)``."""
        lo = max(self.qmin, self.zero_point) if self.fold_relu else self.qmin
        return quantize_codes(x, self.scale, self.zero_point, lo, self.qmax, container=self.container, qmin=self.qmin)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 values of container codes (padded or rearranged copies of :meth:`to_codes`'s)."""
        return dequantize_codes(codes, self.scale * self.output_factor, self.container_zero_point)

    def extra_repr(self) -> str:
        kind = f"scale={self.scale:.4g}, zero_point={self.zero_point}" if self.per_tensor else "per_channel (float ops)"
        return f"{self.name}, bits={self.bits}, {kind}, container={self.container}, fold_relu={self.fold_relu}"


def _weight_codes(quantizer: LSQWeightQuantizer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes shaped like ``weight``, float64 steps of shape (C_out,))."""
    codes = quantizer.integer_codes(weight.detach().float())
    scale = quantizer.scale.detach().double().clamp_min(MIN_STEP)
    if scale.numel() == 1:
        scale = scale.expand(weight.shape[0]).clone()
    if quantizer.axis not in (0, -weight.dim()):
        raise ExportError(f"weight quantizer steps run along axis {quantizer.axis}; the exporter needs axis 0")
    return codes, scale


def _act(quantizer: nn.Module | None, name: str, container: str) -> ExportActQuantizer | None:
    if quantizer is None or isinstance(quantizer, nn.Identity):
        return None
    if not isinstance(quantizer, LSQActQuantizer):
        raise ExportError(f"{name}: {type(quantizer).__name__} is not a quantizer the exporter knows")
    return None if not quantizer.enabled else ExportActQuantizer(quantizer, name, container)


def _is_resnet_stem(conv: nn.Conv2d) -> bool:
    """A 7x7 stride-2 conv with padding 3 on a few input channels (the ResNet stem)."""
    return (
        conv.kernel_size == (7, 7) and conv.stride == (2, 2) and conv.padding == (3, 3)
        and conv.dilation == (1, 1) and conv.groups == 1 and conv.in_channels <= 4
    )


def _stem_codes_space_to_depth(codes: torch.Tensor) -> torch.Tensor:
    """(C_out, C, 7, 7) stride-2 codes -> (C_out, 4 C, 4, 4) stride-1 codes over 2x2 phases.

    With the kernel shifted by one tap (``w8[1:, 1:] = w``), input pixel ``2 i + u' - 4`` is
    cell ``i + m - 2``, phase ``b`` for ``u' = 2 m + b``: a 4x4 conv over 2x2 cells padded by 2
    cells before and 1 after, with the same products (exact in integer arithmetic). Channel
    ``(b_y * 2 + b_x) * C + c`` holds phase ``(b_y, b_x)`` of input channel ``c``.
    """
    c_out, c_in = codes.shape[:2]
    w8 = codes.new_zeros(c_out, c_in, 8, 8)
    w8[:, :, 1:, 1:] = codes
    # (o, c, m_y, b_y, m_x, b_x) -> (o, b_y, b_x, c, m_y, m_x)
    return w8.view(c_out, c_in, 4, 2, 4, 2).permute(0, 3, 5, 1, 2, 4).reshape(c_out, c_in * 4, 4, 4).contiguous()


class ExportConv2d(nn.Module):
    """:class:`~qdetr.quant.QuantConv2d` as ``DQ(Q(x)), DQ(int8 W, axis 0) -> Conv``.

    Args:
        conv: the quantized conv (or a float ``nn.Conv2d``, exported as it is).
        name: its qualified name.
        container: activation container (see :class:`ExportActQuantizer`).

    Attributes:
        space_to_depth: the ResNet stem (7x7, stride 2, 3 channels) runs as a 4x4 stride-1
            conv over the input's 2x2 phases (12 channels; the same products, so exact):
            onnxruntime's uint8 NHWC convolution runs it about three times as fast as the
            3-channel form (docs/concepts/deploy-profile.md).
        input_channel_pad: zero channels appended to the input (and zero weight codes to the
            weight) of an integer conv whose input channel count is not a multiple of
            :data:`INPUT_CHANNEL_MULTIPLE` (the RGB stem): exact (a zero input quantizes to the
            zero point and meets zero weights), as onnxruntime's uint8 NHWC convolution runs
            faster on padded channels than on 3.

    Shapes:
        input: (B, C_in, H, W); output: (B, C_out, H', W').

    Examples:
        >>> from qdetr.quant import LayerQuantSpec, QuantConv2d
        >>> conv = QuantConv2d.from_float(nn.Conv2d(4, 8, 3), LayerQuantSpec(weight_bits=4, input_bits=None))
        >>> export = ExportConv2d(conv.eval(), "conv")
        >>> x = torch.randn(1, 4, 9, 9)
        >>> torch.allclose(export(x), conv(x), atol=1e-5), export.weight_codes.dtype
        (True, torch.int8)
    """

    def __init__(self, conv: nn.Conv2d, name: str, container: str = "uint8") -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ExportError(f"{name}: padding_mode={conv.padding_mode!r} is not supported by the QDQ exporter")
        self.name = name
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.input_quantizer = _act(getattr(conv, "input_quantizer", None), f"{name}.input_quantizer", container)
        wq = getattr(conv, "weight_quantizer", None)
        if wq is not None and wq.enabled:
            codes, scale = _weight_codes(wq, conv.weight)
            self.register_buffer("weight_codes", codes)
            self.register_buffer("weight_scale", scale.float())
            self.weight_float = None
        else:
            self.weight_codes = None
            self.register_buffer("weight_float", conv.weight.detach().float().clone())
        bias = conv.bias.detach().float().clone() if conv.bias is not None else None
        self.register_buffer("bias", bias)
        self.input_channel_pad = 0
        self.space_to_depth = False
        integer = self.weight_codes is not None and self.input_quantizer is not None and self.input_quantizer.per_tensor
        if integer and _is_resnet_stem(conv) and self.input_quantizer.output_factor == 1.0:
            self.space_to_depth = True
            self.weight_codes = _stem_codes_space_to_depth(self.weight_codes)
        elif integer and self.groups == 1 and conv.in_channels % INPUT_CHANNEL_MULTIPLE:
            self.input_channel_pad = INPUT_CHANNEL_MULTIPLE - conv.in_channels % INPUT_CHANNEL_MULTIPLE
            self.weight_codes = F.pad(self.weight_codes, (0, 0, 0, 0, 0, self.input_channel_pad))

    @torch.no_grad()
    def fold_batch_norm(self, bn: nn.Module) -> None:
        """Fold a following frozen/eval batch norm ``y * g + (beta - mean * g)`` into this conv.

        A positive factor g scales the weight steps (codes unchanged); a negative one also
        negates the codes of that channel.

        Raises:
            ExportError: if a negated code leaves the int8 range (an 8-bit code of -128).
        """
        gamma = bn.weight.double() * (bn.running_var.double() + bn.eps).rsqrt()
        beta = bn.bias.double() - bn.running_mean.double() * gamma
        bias = self.bias.double() if self.bias is not None else torch.zeros_like(beta)
        self.bias = (bias * gamma + beta).float()
        if self.weight_codes is None:
            self.weight_float = (self.weight_float.double() * gamma.view(-1, 1, 1, 1)).float()
            return
        negative = gamma < 0
        codes = self.weight_codes.to(torch.int16)
        codes[negative] = -codes[negative]
        if codes.max() > 127:
            raise ExportError(f"{self.name}: folding a negative batch-norm factor puts a weight code out of int8")
        self.weight_codes = codes.to(torch.int8)
        self.weight_scale = (self.weight_scale.double() * gamma.abs()).float()

    def quantized_weight(self) -> torch.Tensor:
        """The weight the conv uses: ``DQ(codes)`` or the float weight, (C_out, C_in, kh, kw)."""
        if self.weight_codes is None:
            return self.weight_float
        return dequantize_weight(self.weight_codes, self.weight_scale, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W')."""
        if self.space_to_depth:
            # Quantize first, then gather on the 8-bit codes: the conv's zero padding is the
            # zero point's code. The 2x2 phases are strided slices (a pixel_unshuffle would need
            # even sizes, which a dynamic-shape export cannot assume), each of the conv's output
            # size + 3.
            h, w = x.shape[-2:]
            rows, cols = (h - 1) // 2 + 4, (w - 1) // 2 + 4
            codes = F.pad(self.input_quantizer.to_codes(x), (4, 3, 4, 3), value=self.input_quantizer.container_zero_point)
            phases = [codes[..., dy : dy + 2 * rows - 1 : 2, dx : dx + 2 * cols - 1 : 2] for dy in (0, 1) for dx in (0, 1)]
            x = self.input_quantizer.from_codes(torch.cat(phases, dim=1)).to(x.dtype)  # (B, 4 C_in, rows, cols)
            return F.conv2d(x, self.quantized_weight(), self.bias)
        if self.input_channel_pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.input_channel_pad))
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class ExportLinear(nn.Module):
    """:class:`~qdetr.quant.QuantLinear` as ``MatMul(DQ(Q(x)), DQ(int8 W^T, axis 1)) + b``.

    Args:
        linear: the quantized linear (or a float ``nn.Linear``).
        name: its qualified name.
        container: activation container (see :class:`ExportActQuantizer`).
        rows: optional slice of output features (the q, k or v third of a packed projection).
        weight, bias, weight_quantizer, input_quantizer: override the parts taken from ``linear``.

    Shapes:
        input: (..., K); output: (..., N).

    Examples:
        >>> from qdetr.quant import LayerQuantSpec, QuantLinear
        >>> lin = QuantLinear.from_float(nn.Linear(16, 8), LayerQuantSpec(weight_bits=4, input_bits=None))
        >>> export = ExportLinear(lin.eval(), "lin")
        >>> x = torch.randn(2, 3, 16)
        >>> torch.allclose(export(x), lin(x), atol=1e-5), tuple(export.weight_codes.shape)   # (K, N)
        (True, (16, 8))
    """

    def __init__(
        self,
        linear: nn.Module | None,
        name: str,
        container: str = "uint8",
        *,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        weight_quantizer: LSQWeightQuantizer | None = None,
        input_quantizer: nn.Module | None = None,
        rows: slice | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        if linear is not None:
            weight, bias = linear.weight, linear.bias
            weight_quantizer = getattr(linear, "weight_quantizer", None)
            input_quantizer = getattr(linear, "input_quantizer", None)
        self.input_quantizer = _act(input_quantizer, f"{name}.input_quantizer", container)
        rows = rows or slice(None)
        if weight_quantizer is not None and weight_quantizer.enabled:
            codes, scale = _weight_codes(weight_quantizer, weight)
            self.register_buffer("weight_codes", codes[rows].t().contiguous())  # (K, N)
            self.register_buffer("weight_scale", scale[rows].float().contiguous())
            self.weight_float = None
        else:
            self.weight_codes = None
            self.register_buffer("weight_float", weight.detach()[rows].float().t().contiguous())
        self.register_buffer("bias", bias.detach()[rows].float().clone() if bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N)."""
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight_float if self.weight_codes is None else dequantize_weight(self.weight_codes, self.weight_scale, 1)
        y = torch.matmul(x, w)
        return y if self.bias is None else y + self.bias


class ExportMultiheadAttention(MultiheadAttention):
    """:class:`~qdetr.quant.QuantMultiheadAttention` with separate q/k/v projections and QDQ slots.

    ``forward`` and ``forward_with_values`` keep the contract of
    :class:`qdetr.layers.MultiheadAttention` (eval mode, no dropout).

    Args:
        attn: a quantized (or float) qdetr multi-head attention.
        name: its qualified name.
        container: activation container (see :class:`ExportActQuantizer`).

    Shapes:
        query: (L, B, E), key/value: (S, B, E) (or batch first); output like query.

    Examples:
        >>> from qdetr.quant import AttentionQuantSpec, QuantMultiheadAttention
        >>> spec = AttentionQuantSpec(proj_weight_bits=4, proj_input_bits=None, out_weight_bits=4,
        ...                           out_input_bits=None, attn_bits=None)
        >>> attn = QuantMultiheadAttention.from_float(MultiheadAttention(32, 4), spec).eval()
        >>> export = ExportMultiheadAttention(attn, "attn")
        >>> x = torch.randn(5, 2, 32)                                    # (L, B, E)
        >>> torch.allclose(export(x, x, x)[0], attn(x, x, x)[0], atol=1e-5)
        True
    """

    def __init__(self, attn: MultiheadAttention, name: str, container: str = "uint8") -> None:
        nn.Module.__init__(self)
        for attr in ("embed_dim", "num_heads", "head_dim", "dropout", "batch_first", "_qkv_same_embed_dim"):
            setattr(self, attr, getattr(attn, attr))
        e = self.embed_dim
        wq = attn.in_proj_weight_quantizer
        wq = wq if isinstance(wq, LSQWeightQuantizer) else None
        for i, proj in enumerate(("q", "k", "v")):
            setattr(
                self,
                f"{proj}_proj",
                ExportLinear(
                    None,
                    f"{name}.{proj}_proj",
                    container,
                    weight=attn.in_proj_weight,
                    bias=attn.in_proj_bias,
                    weight_quantizer=wq,
                    input_quantizer=getattr(attn, f"{proj}_input_quantizer"),
                    rows=slice(i * e, (i + 1) * e),
                ),
            )
        self.out_proj = ExportLinear(attn.out_proj, f"{name}.out_proj", container)
        for slot in AttentionSlots:
            setattr(self, slot, nn.Identity())
        self.q_align = attn.q_align
        for slot in ("q_quantizer", "k_quantizer", "v_quantizer", "prob_quantizer"):
            q = _act(getattr(attn, slot), f"{name}.{slot}", container)
            setattr(self, slot, q if q is not None else nn.Identity())
        # onnxruntime form only: TensorRT expects each Q/DQ pair to share its scale.
        self.scale_folded = (
            container == "uint8" and isinstance(self.q_quantizer, ExportActQuantizer) and self.q_quantizer.per_tensor
        )
        if self.scale_folded:
            self.q_quantizer.output_factor = 1.0 / math.sqrt(self.head_dim)
        self.eval()

    def forward_with_values(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
        need_weights: bool = False,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """As :meth:`qdetr.layers.MultiheadAttention.forward_with_values` (eval mode)."""
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bsz, tgt_len, _ = query.shape
        src_len = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(bsz, tgt_len, h, d).transpose(1, 2)  # (B, h, L, d_h)
        k = self.k_proj(key).view(bsz, src_len, h, d).transpose(1, 2)  # (B, h, S, d_h)
        v = self.v_proj(value).view(bsz, src_len, h, d).transpose(1, 2)  # (B, h, S, d_h)
        q_hat, k_hat, v_hat = self.q_quantizer(self.q_align(q)), self.k_quantizer(k), self.v_quantizer(v)
        mask = self._merged_additive_mask(key_padding_mask, attn_mask, attn_bias, is_causal, bsz, tgt_len, src_len, q)
        logits = torch.matmul(q_hat, k_hat.transpose(-2, -1))  # (B, h, L, S)
        if not self.scale_folded:  # else 1/sqrt(d) is in the query's dequantization step
            logits = logits * (1.0 / math.sqrt(d))
        if mask is not None:
            logits = logits + mask
        probs = torch.softmax(logits, dim=-1)
        values = torch.matmul(self.prob_quantizer(probs), v_hat)  # (B, h, L, d_h)
        values = values.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)  # (B, L, E)
        out = self.out_proj(values)
        weights = None
        if need_weights:
            weights = probs.mean(dim=1) if average_attn_weights else probs
        if not self.batch_first:
            out, values = out.transpose(0, 1), values.transpose(0, 1)
        return out, weights, values
