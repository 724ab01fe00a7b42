"""Quantized multi-head attention (method.md section 4, attention data path).

:class:`QuantMultiheadAttention` is a drop-in for ``nn.MultiheadAttention`` (same
``state_dict`` names ``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``) built on
:class:`qdetr.layers.MultiheadAttention`. It fills the attention slots with quantizers:

* ``in_proj_weight_quantizer``: q/k/v projection weights, one step per output row (3E,);
* ``q_input_quantizer`` / ``k_input_quantizer`` / ``v_input_quantizer``: projection inputs
  (paper profile only);
* ``q_quantizer`` / ``k_quantizer`` / ``v_quantizer``: per-head q, k, v (signed, attention bits);
* ``prob_quantizer``: per-head softmax probabilities (unsigned, attention bits);
* ``out_proj``: a :class:`~qdetr.quant.modules.QuantLinear`.

Hugging Face DETR-family attention modules (separate ``q_proj``/``k_proj``/``v_proj`` and
``o_proj``/``out_proj`` Linears that dispatch through ``ALL_ATTENTION_FUNCTIONS``) are
quantized in place by :func:`quantize_hf_attention`: their projections become
``QuantLinear`` and the q/k/v/probability quantizers run inside a registered attention
function, ``"qdetr_fake_quant"``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from qdetr.layers.attention import AttentionSlots, MultiheadAttention
from qdetr.layers.recompute import recompute_saved, slot_recipes
from qdetr.quant.config import AttentionQuantSpec, LayerQuantSpec
from qdetr.quant.fused_layers import fused_quant_op
from qdetr.quant.modules import QuantLinear
from qdetr.quant.quantizers import LSQActQuantizer, LSQWeightQuantizer

__all__ = [
    "QuantMultiheadAttention",
    "is_hf_attention",
    "quantize_hf_attention",
    "HF_ATTENTION_IMPLEMENTATION",
]

#: Name under which the fake-quant attention function is registered in transformers.
HF_ATTENTION_IMPLEMENTATION = "qdetr_fake_quant"


def _head_quantizers(module: nn.Module, bits: int, num_heads: int, spec: AttentionQuantSpec) -> None:
    """Attach the four per-head quantizers (axis 1 of (B, h, L, ·) tensors)."""
    for name in ("q_quantizer", "k_quantizer", "v_quantizer"):
        setattr(module, name, LSQActQuantizer(bits, num_heads, axis=1, signed=True, config=spec.activation))
    module.prob_quantizer = LSQActQuantizer(bits, num_heads, axis=1, signed=spec.prob_signed, config=spec.activation)


def _quantize_linear_child(
    module: nn.Module, name: str, weight_bits: int | None, input_bits: int | None, spec: AttentionQuantSpec
) -> None:
    """Replace ``module.<name>`` (an ``nn.Linear``) by a QuantLinear unless both bit widths are None."""
    if weight_bits is None and input_bits is None:
        return
    layer_spec = LayerQuantSpec(
        weight_bits=weight_bits, input_bits=input_bits, input_signed=True, weight=spec.weight, activation=spec.activation
    )
    setattr(module, name, QuantLinear.from_float(getattr(module, name), layer_spec))


class QuantMultiheadAttention(MultiheadAttention):
    """Quantization-aware multi-head attention; see the module docstring for the slots.

    Build it with :meth:`from_float`; ``forward`` and ``forward_with_values`` are those of
    :class:`qdetr.layers.MultiheadAttention`.

    Shapes:
        query: (L, B, E), key/value: (S, B, E) (or batch first with ``batch_first``); output
        like query; per-head quantizers (q, k, v, probabilities) act on axis 1 of
        (B, h, L, d_h) / (B, h, L, S) tensors and hold (h,) steps.

    Examples:
        >>> mha = nn.MultiheadAttention(64, 8)
        >>> spec = AttentionQuantSpec(proj_weight_bits=4, proj_input_bits=4, out_weight_bits=4,
        ...                           out_input_bits=4, attn_bits=8)
        >>> qmha = QuantMultiheadAttention.from_float(mha, spec)
        >>> x = torch.randn(10, 2, 64)                  # (L, B, E)
        >>> out, _ = qmha.train()(x, x, x)
        >>> out.shape
        torch.Size([10, 2, 64])
        >>> qmha.in_proj_weight_quantizer.scale.shape, qmha.prob_quantizer.scale.shape   # (3E,), (h,)
        (torch.Size([192]), torch.Size([8]))
        >>> qmha.in_proj_weight is mha.in_proj_weight  # parameters are shared
        True
    """

    def _in_projections(self, query, key, value):
        """q, k, v projections, each one autograd node where :func:`qdetr.quant.fused_layers.fused_quant_op`
        applies (the rows of ``in_proj_weight`` and of its quantizer's steps that feed it), the
        separate nodes of :class:`qdetr.layers.MultiheadAttention` otherwise: bit-identical."""
        wq = self.in_proj_weight_quantizer
        if not isinstance(wq, LSQWeightQuantizer) or not wq.per_channel:
            return super()._in_projections(query, key, value)
        e, weight, bias = self.embed_dim, self.in_proj_weight, self.in_proj_bias
        g_w = wq.grad_scale(weight)
        out = []
        for i, (x, aq) in enumerate(
            ((query, self.q_input_quantizer), (key, self.k_input_quantizer), (value, self.v_input_quantizer))
        ):
            rows = slice(i * e, (i + 1) * e)
            y = fused_quant_op(
                x, weight[rows], bias[rows] if bias is not None else None, wq, aq,
                weight_steps=wq.scale[rows], weight_grad_scale=g_w,
            )
            if y is None:
                return super()._in_projections(query, key, value)
            out.append(y)
        return tuple(out)

    @classmethod
    def from_float(cls, module: nn.Module, spec: AttentionQuantSpec) -> "QuantMultiheadAttention":
        """Wrap an ``nn.MultiheadAttention`` or :class:`qdetr.layers.MultiheadAttention`.

        Parameters are shared, not copied. Slots already filled on a qdetr attention (for
        example a distribution-alignment ``q_align``) are kept.

        Args:
            module: the float attention.
            spec: which tensors get which bits.

        Raises:
            TypeError: for other module types.
            ValueError: for ``nn.MultiheadAttention`` configurations without an explicit path.
        """
        if isinstance(module, nn.MultiheadAttention):
            new = cls.from_torch(module)
        elif isinstance(module, MultiheadAttention):
            new = cls.__new__(cls)
            nn.Module.__init__(new)
            for attr in ("embed_dim", "num_heads", "head_dim", "dropout", "batch_first", "_qkv_same_embed_dim"):
                setattr(new, attr, getattr(module, attr))
            new.in_proj_weight = module.in_proj_weight
            new.in_proj_bias = module.in_proj_bias
            new.out_proj = module.out_proj
            for slot in AttentionSlots:
                setattr(new, slot, getattr(module, slot))
            new.train(module.training)
        else:
            raise TypeError(f"expected nn.MultiheadAttention or qdetr MultiheadAttention, got {type(module).__name__}")
        e, h = new.embed_dim, new.num_heads
        if spec.proj_weight_bits is not None:
            new.in_proj_weight_quantizer = LSQWeightQuantizer(spec.proj_weight_bits, 3 * e, axis=0, config=spec.weight)
            new.in_proj_weight_quantizer.initialize_from(new.in_proj_weight)
        if spec.proj_input_bits is not None:
            for name in ("q_input_quantizer", "k_input_quantizer", "v_input_quantizer"):
                setattr(
                    new,
                    name,
                    LSQActQuantizer(spec.proj_input_bits, e, axis=-1, signed=True, config=spec.activation),
                )
        _quantize_linear_child(new, "out_proj", spec.out_weight_bits, spec.out_input_bits, spec)
        if spec.attn_bits is not None:
            _head_quantizers(new, spec.attn_bits, h, spec)
        return new.to(device=new.in_proj_weight.device)


# --------------------------------------------------------------------------- Hugging Face


def _hf_out_proj_name(module: nn.Module) -> str | None:
    for name in ("o_proj", "out_proj"):
        if isinstance(getattr(module, name, None), nn.Linear):
            return name
    return None


def _forward_global_names(cls: type) -> tuple[str, ...]:
    """Global names read by ``cls.forward`` (decorators such as ``deprecate_kwarg`` unwrapped)."""
    forward = inspect.unwrap(cls.forward)
    code = getattr(forward, "__code__", None)
    return code.co_names if code is not None else ()


def is_hf_attention(module: nn.Module) -> bool:
    """True for transformers attention modules that dispatch through ``ALL_ATTENTION_FUNCTIONS``.

    Recognised by structure: a ``config`` with an ``_attn_implementation``, at least three
    child ``nn.Linear`` projections (q, k, v; an ``o_proj``/``out_proj`` output projection
    when the module has one: ViT/BERT/YOLOS keep it in a sibling module), and a ``forward``
    that reads the global ``ALL_ATTENTION_FUNCTIONS`` (DETR, Conditional DETR, RT-DETR,
    LW-DETR, BERT, YOLOS, Swin, CLIP, ... in transformers >= 5).

    Examples:
        >>> from transformers import DetrConfig
        >>> from transformers.models.detr.modeling_detr import DetrSelfAttention
        >>> is_hf_attention(DetrSelfAttention(DetrConfig(d_model=32), hidden_size=32, num_attention_heads=4))
        True
        >>> is_hf_attention(nn.MultiheadAttention(32, 4))
        False
    """
    if not hasattr(getattr(module, "config", None), "_attn_implementation"):
        return False
    if sum(isinstance(c, nn.Linear) for c in module.children()) < 3:
        return False
    return "ALL_ATTENTION_FUNCTIONS" in _forward_global_names(type(module))


def _hf_projection_names(module: nn.Module) -> list[str]:
    """Child Linears feeding q, k or v (``q_proj``, ``k_pos_proj``, ``q_pos_sine_proj``, ``query``, ...)."""
    out = _hf_out_proj_name(module)
    return [n for n, c in module.named_children() if isinstance(c, nn.Linear) and n != out]


def _hf_num_heads(module: nn.Module) -> int:
    for attr in ("num_heads", "num_attention_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    head_dim = getattr(module, "head_dim", getattr(module, "attention_head_size", None))
    out = _hf_out_proj_name(module)
    width = getattr(module, out).in_features if out else getattr(module, _hf_projection_names(module)[-1]).out_features
    if not isinstance(head_dim, int):
        raise NotImplementedError(f"cannot tell the number of heads of {type(module).__name__}")
    return width // head_dim


def _fake_quant_attention_function(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """Eager attention with the module's quantizer slots (transformers attention-function API).

    Args:
        query: (B, h, L, d_h); key, value: (B, h, S, d_h); attention_mask: additive, broadcastable
            to (B, h, L, S).

    Returns:
        ``(output (B, L, h, d_h), probabilities (B, h, L, S))`` like transformers' eager attention.
    """
    identity = nn.Identity()
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    q_aligned = getattr(module, "q_align", identity)(query)
    q_slot, k_slot, v_slot = (getattr(module, n, identity) for n in ("q_quantizer", "k_quantizer", "v_quantizer"))
    q, k, v = q_slot(q_aligned), k_slot(key), v_slot(value)
    # Quantized q/k/v/probabilities are recomputed in backward rather than saved (qdetr.layers.recompute).
    with recompute_saved(slot_recipes((q, q_slot, q_aligned), (k, k_slot, key))):
        logits = torch.matmul(q, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True = attend
            attention_mask = torch.zeros_like(attention_mask, dtype=logits.dtype).masked_fill_(~attention_mask, -torch.inf)
        logits = logits + attention_mask
    probs = torch.softmax(logits, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    p_slot = getattr(module, "prob_quantizer", identity)
    p_hat = p_slot(probs)
    with recompute_saved(slot_recipes((p_hat, p_slot, probs), (v, v_slot, value))):
        out = torch.matmul(p_hat, v).transpose(1, 2).contiguous()
    return out, p_hat


def _register_hf_attention_function() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(HF_ATTENTION_IMPLEMENTATION, _fake_quant_attention_function)
    # Without a registered mask function transformers drops padding masks for custom implementations.
    AttentionMaskInterface.register(HF_ATTENTION_IMPLEMENTATION, eager_mask)


def quantize_hf_attention(module: nn.Module, spec: AttentionQuantSpec) -> nn.Module:
    """Quantize a transformers DETR-family attention module in place.

    The q/k/v/out projections become :class:`QuantLinear` (weights per row, inputs per
    feature as ``spec`` says), per-head quantizers are attached as ``q_quantizer``,
    ``k_quantizer``, ``v_quantizer``, ``prob_quantizer`` (plus an identity ``q_align`` slot
    for distribution alignment) and the module's config is switched to the
    ``"qdetr_fake_quant"`` attention function.

    Args:
        module: a module for which :func:`is_hf_attention` is True, modified in place.
        spec: which tensors get which bits.

    Returns:
        The same module.

    Raises:
        TypeError: for a module that is not a supported transformers attention.

    Examples:
        >>> from transformers import DetrConfig
        >>> from transformers.models.detr.modeling_detr import DetrSelfAttention
        >>> attn = DetrSelfAttention(DetrConfig(d_model=32), hidden_size=32, num_attention_heads=4)
        >>> spec = AttentionQuantSpec(proj_weight_bits=4, proj_input_bits=4, out_weight_bits=4,
        ...                           out_input_bits=4, attn_bits=8)
        >>> attn = quantize_hf_attention(attn, spec)
        >>> type(attn.q_proj).__name__, attn.prob_quantizer.scale.shape    # (h,) steps
        ('QuantLinear', torch.Size([4]))
        >>> out, probs = attn.train()(torch.randn(2, 5, 32))                # (B, L, E)
        >>> out.shape, probs.shape                                          # (B, L, E), (B, h, L, L)
        (torch.Size([2, 5, 32]), torch.Size([2, 4, 5, 5]))
    """
    if not is_hf_attention(module):
        raise TypeError(f"{type(module).__name__} is not a supported transformers attention module")
    _register_hf_attention_function()
    out_name = _hf_out_proj_name(module)
    for name in _hf_projection_names(module):
        _quantize_linear_child(module, name, spec.proj_weight_bits, spec.proj_input_bits, spec)
    if out_name is not None:
        _quantize_linear_child(module, out_name, spec.out_weight_bits, spec.out_input_bits, spec)
    num_heads = _hf_num_heads(module)
    if not hasattr(module, "q_align"):
        module.q_align = nn.Identity()
    if spec.attn_bits is not None:
        _head_quantizers(module, spec.attn_bits, num_heads, spec)
        module.to(device=next(module.parameters()).device)
    module.config._attn_implementation = HF_ATTENTION_IMPLEMENTATION
    return module
