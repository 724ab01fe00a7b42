"""Quantized inline-softmax attention of the Hugging Face DETR family.

Older transformers attention classes compute ``softmax(q·kᵀ)·v`` inside their own
``forward`` instead of dispatching through ``ALL_ATTENTION_FUNCTIONS``, so neither an
attention function nor a hook can reach the probabilities. This module gives each such
class a quantized forward with the same signature and the same math, and the per-head
slots of method.md section 4 (``q_quantizer``, ``k_quantizer``, ``v_quantizer``,
``prob_quantizer`` at ``attn_bits``, head axis 1 of (B, h, L, ·) tensors; q is quantized
*before* the ``d_h^-1/2`` scaling):

======================  ==========================================================  =========================
structure               transformers classes                                        output projection
======================  ==========================================================  =========================
``"detr_inline"``       ``TableTransformerAttention``                               child ``out_proj``
``"detr_inline_dab"``   DAB-DETR's encoder ``DetrAttention`` (float32 softmax)      child ``out_proj``
``"dab_inner"``         ``DabDetrAttention`` inside ``DabDetrDecoderLayerSelf…`` /  ``output_proj``
                        ``…CrossAttention`` wrappers, which hold the q/k/v
                        projections (the wrapper is the unit quantized)
``"query_key_value"``   ``GroundingDinoMultiheadAttention``, ``MMGroundingDino…``,    child ``out_proj``
                        ``OmDetTurboMultiheadAttention``
``"bidirectional"``     ``GroundingDinoBiMultiHeadAttention`` (+ MM): image→text     ``out_vision_proj``,
                        and text→image softmaxes, two probability quantizers        ``out_text_proj``
======================  ==========================================================  =========================

A class is recognised by its child modules, head attributes and ``forward`` parameter
names; a class whose structure differs (a new transformers version) is not recognised, and
``quantize_model`` raises ``NotImplementedError`` naming it instead of quantizing it wrongly.
The instance keeps its identity and parameters: its class is swapped for a generated
subclass ``Quant<Class>`` whose only change is ``forward``.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qdetr.layers.recompute import recompute_saved, slot_recipes
from qdetr.quant.config import AttentionQuantSpec, LayerQuantSpec
from qdetr.quant.modules import QuantLinear
from qdetr.quant.quantizers import LSQActQuantizer

__all__ = ["InlineAttentionStructure", "INLINE_STRUCTURES", "inline_attention_structure", "quantize_inline_attention"]


def _slot(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    quantizer = getattr(module, name, None)
    return x if quantizer is None else quantizer(x)


def _softmax_attention(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dropout: float,
    softmax_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, h, L, d) q, (B, h, S, d) k, (B, h, S, d_v) v -> out (B, h, L, d_v), probs (B, h, L, S)."""
    q_aligned = _slot(module, "q_align", q)
    q_hat, k_hat, v_hat = _slot(module, "q_quantizer", q_aligned), _slot(module, "k_quantizer", k), _slot(module, "v_quantizer", v)
    # Quantized q/k/v/probabilities are recomputed in backward rather than saved (qdetr.layers.recompute).
    with recompute_saved(_recipes((q_hat, "q_quantizer", q_aligned), (k_hat, "k_quantizer", k), module=module)):
        logits = torch.matmul(q_hat, k_hat.transpose(-1, -2)) * scaling
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros_like(mask, dtype=logits.dtype).masked_fill_(mask, -torch.inf)
        logits = logits + mask
    if softmax_dtype is not None:
        probs = F.softmax(logits, dim=-1, dtype=torch.promote_types(softmax_dtype, logits.dtype)).to(q.dtype)
    else:
        probs = F.softmax(logits, dim=-1)
    probs_out = probs
    probs = F.dropout(probs, p=dropout, training=module.training)
    p_hat = _slot(module, "prob_quantizer", probs)
    with recompute_saved(_recipes((p_hat, "prob_quantizer", probs), (v_hat, "v_quantizer", v), module=module)):
        return torch.matmul(p_hat, v_hat), probs_out


def _recipes(*triples: tuple[torch.Tensor, str, torch.Tensor], module: nn.Module) -> dict:
    return slot_recipes(*[(out, getattr(module, name, None) or nn.Identity(), x) for out, name, x in triples])


def _heads(x: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """(B, L, h·d) -> (B, h, L, d)."""
    return x.view(x.shape[0], -1, num_heads, head_dim).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, h, L, d) -> (B, L, h·d)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


# --------------------------------------------------------------------------- forwards


def _detr_inline_forward(self, args) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden_states = args["hidden_states"]
    kv = args.get("key_value_states")
    original = hidden_states
    if args.get("object_queries") is not None:
        hidden_states = hidden_states + args["object_queries"]
    if kv is not None:
        k_in, v_in = kv, kv
        if args.get("spatial_position_embeddings") is not None:
            k_in = kv + args["spatial_position_embeddings"]
    else:
        k_in, v_in = hidden_states, original
    h, d = self.num_heads, self.head_dim
    q = _heads(self.q_proj(hidden_states), h, d)
    k = _heads(self.k_proj(k_in), h, d)
    v = _heads(self.v_proj(v_in), h, d)
    dropout = getattr(self, "dropout", getattr(self, "attention_dropout", 0.0))
    softmax_dtype = torch.float32 if self._qdetr_float32_softmax else None
    out, probs = _softmax_attention(self, q, k, v, args.get("attention_mask"), self.scaling, dropout, softmax_dtype)
    out = self.out_proj(_merge(out))
    return out, (probs if args.get("output_attentions") else None)


def _dab_inner_forward(self, args) -> tuple[torch.Tensor, torch.Tensor | None]:
    h = self.attention_heads
    q = _heads(args["hidden_states"], h, self.attention_head_dim)
    k = _heads(args["key_states"], h, self.attention_head_dim)
    v = _heads(args["value_states"], h, self.values_head_dim)
    out, probs = _softmax_attention(
        self, q, k, v, args.get("attention_mask"), self.scaling, self.attention_dropout, torch.float32
    )
    out = self.output_proj(_merge(out))
    return out, (probs if args.get("output_attentions") else None)


def _qkv_forward(self, args) -> tuple[torch.Tensor, ...]:
    h, d = self.num_attention_heads, self.attention_head_size
    q = _heads(self.query(args["queries"]), h, d)
    k = _heads(self.key(args["keys"]), h, d)
    v = _heads(self.value(args["values"]), h, d)
    out, probs = _softmax_attention(self, q, k, v, args.get("attention_mask"), 1.0 / math.sqrt(d), self.dropout.p)
    out = self.out_proj(_merge(out))
    return (out, probs) if args.get("output_attentions") else (out,)


def _bidirectional_forward(self, args):
    vision, text = args["vision_features"], args["text_features"]
    vision_mask, text_mask = args.get("vision_attention_mask"), args.get("text_attention_mask")
    h, d = self.num_heads, self.head_dim
    q = _slot(self, "q_quantizer", _heads(self.vision_proj(vision), h, d))
    k = _slot(self, "k_quantizer", _heads(self.text_proj(text), h, d))
    v_vision = _slot(self, "v_vision_quantizer", _heads(self.values_vision_proj(vision), h, d))
    v_text = _slot(self, "v_quantizer", _heads(self.values_text_proj(text), h, d))
    batch, nv, nt = vision.shape[0], vision.shape[1], text.shape[1]
    logits = torch.matmul(q * self.scale, k.transpose(-1, -2)).flatten(0, 1)  # (B·h, Nv, Nt)
    logits = torch.clamp(logits - logits.max(), min=-50000, max=50000)
    text_logits = logits.transpose(1, 2)
    text_logits = torch.clamp(text_logits - text_logits.max(dim=-1, keepdim=True)[0], min=-50000, max=50000)
    if vision_mask is not None:
        text_logits = text_logits.masked_fill(vision_mask[:, None, None, :].repeat(1, h, 1, 1).flatten(0, 1), -torch.inf)
    text_probs = text_logits.softmax(dim=-1)
    if text_mask is not None:
        logits = logits.masked_fill(text_mask[:, None, None, :].repeat(1, h, 1, 1).flatten(0, 1), -torch.inf)
    vision_probs = logits.softmax(dim=-1)
    vp = F.dropout(vision_probs, p=self.dropout, training=self.training).view(batch, h, nv, nt)
    tp = F.dropout(text_probs, p=self.dropout, training=self.training).view(batch, h, nt, nv)
    vp = _slot(self, "prob_quantizer", vp)
    tp = _slot(self, "text_prob_quantizer", tp)
    vision_out = self.out_vision_proj(_merge(torch.matmul(vp, v_text)))
    text_out = self.out_text_proj(_merge(torch.matmul(tp, v_vision)))
    return (vision_out, vision_probs), (text_out, text_probs)


# --------------------------------------------------------------------------- structures


@dataclass(frozen=True)
class InlineAttentionStructure:
    """How one family of inline-softmax attention modules is recognised and quantized.

    Attributes:
        name: structure key (a key of :data:`INLINE_STRUCTURES`).
        forward_args: the original ``forward``'s parameter names (recognition).
        children: ``nn.Linear`` children that must exist (recognition).
        attributes: integer attributes that must exist (recognition).
        out_projections: the children that project the attention output.
        head_attr: attribute holding the number of heads.
        extra_quantizers: per-head quantizers beyond q/k/v/prob: ``(name, signed)``.

    Examples:
        >>> INLINE_STRUCTURES["query_key_value"].children
        ('query', 'key', 'value', 'out_proj')
    """

    name: str
    forward_args: tuple[str, ...]
    children: tuple[str, ...]
    attributes: tuple[str, ...]
    out_projections: tuple[str, ...]
    head_attr: str
    forward: Callable
    extra_quantizers: tuple[tuple[str, bool], ...] = ()


_TT_ARGS = ("hidden_states", "attention_mask", "object_queries", "key_value_states", "spatial_position_embeddings", "output_attentions")
_DAB_ENCODER_ARGS = ("hidden_states", "attention_mask", "object_queries", "key_value_states", "output_attentions")
_DAB_INNER_ARGS = ("hidden_states", "attention_mask", "key_states", "value_states", "output_attentions")

#: The recognised structures (see the module docstring).
INLINE_STRUCTURES: dict[str, InlineAttentionStructure] = {
    "detr_inline": InlineAttentionStructure(
        name="detr_inline",
        forward_args=_TT_ARGS,
        children=("q_proj", "k_proj", "v_proj", "out_proj"),
        attributes=("num_heads", "head_dim"),
        out_projections=("out_proj",),
        head_attr="num_heads",
        forward=_detr_inline_forward,
    ),
    "detr_inline_dab": InlineAttentionStructure(
        name="detr_inline_dab",
        forward_args=_DAB_ENCODER_ARGS,
        children=("q_proj", "k_proj", "v_proj", "out_proj"),
        attributes=("num_heads", "head_dim"),
        out_projections=("out_proj",),
        head_attr="num_heads",
        forward=_detr_inline_forward,
    ),
    "dab_inner": InlineAttentionStructure(
        name="dab_inner",
        forward_args=_DAB_INNER_ARGS,
        children=("output_proj",),
        attributes=("attention_heads", "attention_head_dim", "values_head_dim"),
        out_projections=("output_proj",),
        head_attr="attention_heads",
        forward=_dab_inner_forward,
    ),
    "query_key_value": InlineAttentionStructure(
        name="query_key_value",
        forward_args=("queries", "keys", "values", "attention_mask", "output_attentions"),
        children=("query", "key", "value", "out_proj"),
        attributes=("num_attention_heads", "attention_head_size"),
        out_projections=("out_proj",),
        head_attr="num_attention_heads",
        forward=_qkv_forward,
    ),
    "bidirectional": InlineAttentionStructure(
        name="bidirectional",
        forward_args=("vision_features", "text_features", "vision_attention_mask", "text_attention_mask"),
        children=("vision_proj", "text_proj", "values_vision_proj", "values_text_proj", "out_vision_proj", "out_text_proj"),
        attributes=("num_heads", "head_dim"),
        out_projections=("out_vision_proj", "out_text_proj"),
        head_attr="num_heads",
        forward=_bidirectional_forward,
        extra_quantizers=(("v_vision_quantizer", True), ("text_prob_quantizer", False)),
    ),
}


def _forward_args(cls: type) -> tuple[str, ...]:
    try:
        params = inspect.signature(inspect.unwrap(cls.forward)).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(n for n in params if n != "self")


def _matches(module: nn.Module, structure: InlineAttentionStructure) -> bool:
    if not all(isinstance(getattr(module, c, None), nn.Linear) for c in structure.children):
        return False
    if not all(isinstance(getattr(module, a, None), int) for a in structure.attributes):
        return False
    cls = type(module)
    if getattr(cls, "_qdetr_structure", None) == structure.name:
        return True
    return _forward_args(cls) == structure.forward_args


def inline_attention_structure(module: nn.Module) -> InlineAttentionStructure | None:
    """The :class:`InlineAttentionStructure` of ``module``, or None if it is not one.

    For DAB-DETR's decoder wrappers (``DabDetrDecoderLayerSelfAttention`` / ``…CrossAttention``)
    this is the structure of the inner ``DabDetrAttention``; see :func:`dab_inner`.

    Examples:
        >>> from qdetr.tiny_hf_detr import build_tiny_hf_detr
        >>> model = build_tiny_hf_detr("table_transformer").model
        >>> inline_attention_structure(model.model.encoder.layers[0].self_attn).name
        'detr_inline'
        >>> inline_attention_structure(model.model.encoder.layers[0].fc1) is None
        True
    """
    for structure in INLINE_STRUCTURES.values():
        if _matches(module, structure):
            return structure
    return None


def dab_inner(module: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, inner)`` if ``module`` is a DAB-DETR decoder attention wrapper: child Linears
    for q/k/v plus exactly one child with the ``"dab_inner"`` structure."""
    inner = [
        (n, c) for n, c in module.named_children() if inline_attention_structure(c) is INLINE_STRUCTURES["dab_inner"]
    ]
    linears = [c for c in module.children() if isinstance(c, nn.Linear)]
    return inner[0] if len(inner) == 1 and len(linears) >= 3 else None


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _quant_subclass(cls: type, structure: InlineAttentionStructure) -> type:
    key = (cls, structure.name)
    if key in _SUBCLASSES:
        return _SUBCLASSES[key]
    signature = inspect.signature(inspect.unwrap(cls.forward))
    body = structure.forward

    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        return body(self, bound.arguments)

    forward.__doc__ = f"{cls.__name__}.forward with per-head fake quantization (qdetr)."
    name = f"Quant{cls.__name__}"
    attrs = {"forward": forward, "__module__": __name__, "__qualname__": name, "_qdetr_structure": structure.name}
    if structure.name in ("detr_inline", "detr_inline_dab"):
        # DAB-DETR's encoder attention takes its softmax in float32, Table Transformer's in the input dtype.
        attrs["_qdetr_float32_softmax"] = structure.name == "detr_inline_dab"
    sub = type(name, (cls,), attrs)
    setattr(sys.modules[__name__], name, sub)  # importable, so that the model pickles
    _SUBCLASSES[key] = sub
    return sub


def _quantize_linear(module: nn.Module, name: str, weight_bits, input_bits, spec: AttentionQuantSpec) -> None:
    if weight_bits is None and input_bits is None:
        return
    layer = LayerQuantSpec(
        weight_bits=weight_bits, input_bits=input_bits, input_signed=True, weight=spec.weight, activation=spec.activation
    )
    setattr(module, name, QuantLinear.from_float(getattr(module, name), layer))


def _attach(module: nn.Module, structure: InlineAttentionStructure, spec: AttentionQuantSpec) -> None:
    if not hasattr(module, "q_align"):
        module.q_align = nn.Identity()
    if spec.attn_bits is not None:
        heads = getattr(module, structure.head_attr)
        slots = [("q_quantizer", True), ("k_quantizer", True), ("v_quantizer", True), ("prob_quantizer", False)]
        for name, signed in slots + list(structure.extra_quantizers):
            setattr(module, name, LSQActQuantizer(spec.attn_bits, heads, axis=1, signed=signed, config=spec.activation))
    module.__class__ = _quant_subclass(type(module), structure)


def quantize_inline_attention(module: nn.Module, spec: AttentionQuantSpec) -> nn.Module:
    """Quantize an inline-softmax transformers attention module (or DAB-DETR wrapper) in place.

    Input projections get ``spec``'s projection bits, output projections its output bits
    and the per-head slots ``attn_bits``.

    Args:
        module: a module with an :func:`inline_attention_structure`, or a DAB-DETR decoder wrapper.
        spec: which tensors get which bits.

    Returns:
        The same module (its class becomes ``Quant<Class>``).

    Raises:
        TypeError: for a module that is not a recognised inline attention.

    Examples:
        >>> from qdetr.tiny_hf_detr import build_tiny_hf_detr
        >>> attn = build_tiny_hf_detr("table_transformer").model.model.encoder.layers[0].self_attn
        >>> spec = AttentionQuantSpec(proj_weight_bits=4, proj_input_bits=4, out_weight_bits=4,
        ...                           out_input_bits=4, attn_bits=8)
        >>> attn = quantize_inline_attention(attn, spec)
        >>> type(attn).__name__, type(attn.q_proj).__name__, attn.prob_quantizer.scale.shape
        ('QuantTableTransformerAttention', 'QuantLinear', torch.Size([2]))
        >>> out, _ = attn.train()(torch.randn(2, 6, 32))         # (B, L, d) -> (B, L, d)
        >>> out.shape
        torch.Size([2, 6, 32])
    """
    wrapper = dab_inner(module)
    if wrapper is not None:
        inner_name, inner = wrapper
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                _quantize_linear(module, name, spec.proj_weight_bits, spec.proj_input_bits, spec)
        _quantize_linear(inner, "output_proj", spec.out_weight_bits, spec.out_input_bits, spec)
        _attach(inner, INLINE_STRUCTURES["dab_inner"], spec)
        return module
    structure = inline_attention_structure(module)
    if structure is None:
        raise TypeError(f"{type(module).__name__} is not a recognised inline-softmax attention module")
    for name in structure.children:
        if name in structure.out_projections:
            _quantize_linear(module, name, spec.out_weight_bits, spec.out_input_bits, spec)
        else:
            _quantize_linear(module, name, spec.proj_weight_bits, spec.proj_input_bits, spec)
    _attach(module, structure, spec)
    return module
