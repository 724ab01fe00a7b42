"""Registry of the attention forms :func:`qdetr.quantize_model` can quantize.

Each :class:`AttentionAdapter` says which modules it handles (recognised by structure:
child modules, attributes, ``forward`` parameters or globals, never by a local variable
name) and how it quantizes them. ``quantize_model`` asks :func:`find_attention_adapter`
for every module; a module whose class name says "attention" but that no adapter (and no
descendant) handles is reported as unreachable with ``NotImplementedError``, so an
attention form added or refactored by a new transformers version fails loudly instead of
staying in float silently.

=====================  =================================================================
adapter                modules
=====================  =================================================================
``torch_mha``          ``nn.MultiheadAttention``, :class:`qdetr.layers.MultiheadAttention`
                       (replaced by :class:`QuantMultiheadAttention`)
``hf_interface``       transformers attention dispatching through ``ALL_ATTENTION_FUNCTIONS``
                       (kind A: DETR, Conditional DETR, RT-DETR family, LW-/RF-DETR, BERT,
                       CLIP, Swin, ViT/YOLOS, ...), quantized in place
``hf_inline``          inline-softmax attention (kind B: Table Transformer, DAB-DETR,
                       Grounding DINO / OmDet-Turbo MHA and BiMHA), quantized in place
``hf_deformable``      multi-scale deformable attention (kinds C and D: Deformable DETR,
                       RT-DETR(v2), D-FINE, DEIMv2, LW-/RF-DETR, Grounding DINO, OmDet-Turbo)
=====================  =================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from qdetr.layers.attention import MultiheadAttention
from qdetr.quant.attention import (
    QuantMultiheadAttention,
    _hf_out_proj_name,
    _hf_projection_names,
    is_hf_attention,
    quantize_hf_attention,
)
from qdetr.quant.config import AttentionQuantSpec
from qdetr.quant.deformable_attention import (
    DEFORMABLE_OUTPUT,
    deformable_projection_names,
    is_deformable_attention,
    quantize_deformable_attention,
)
from qdetr.quant.inline_attention import dab_inner, inline_attention_structure, quantize_inline_attention

__all__ = ["AttentionAdapter", "ATTENTION_ADAPTERS", "find_attention_adapter", "looks_like_attention"]


@dataclass(frozen=True)
class AttentionAdapter:
    """One attention form: how to recognise it, quantize it and describe it.

    Attributes:
        name: short key shown in error messages and docs.
        matches: ``module -> bool``.
        quantize: ``(module, spec) -> module``; returns the same module (in place) or a
            replacement to put at the module's path.
        layers: ``module -> (input projections, output projections, per-head quantizer host)``
            for :func:`qdetr.quant.quant_summary`.

    Examples:
        >>> find_attention_adapter(nn.MultiheadAttention(8, 2)).name
        'torch_mha'
        >>> find_attention_adapter(nn.Linear(8, 8)) is None
        True
    """

    name: str
    matches: Callable[[nn.Module], bool]
    quantize: Callable[[nn.Module, AttentionQuantSpec], nn.Module]
    layers: Callable[[nn.Module], tuple[list[nn.Module], list[nn.Module], nn.Module | None]]


def _is_torch_mha(module: nn.Module) -> bool:
    return isinstance(module, (nn.MultiheadAttention, MultiheadAttention))


def _torch_mha_layers(module: nn.Module):
    return [module], [module.out_proj], module


def _hf_interface_layers(module: nn.Module):
    out = _hf_out_proj_name(module)
    return [getattr(module, n) for n in _hf_projection_names(module)], ([getattr(module, out)] if out else []), module


def _is_inline(module: nn.Module) -> bool:
    return inline_attention_structure(module) is not None or dab_inner(module) is not None


def _inline_layers(module: nn.Module):
    wrapper = dab_inner(module)
    if wrapper is not None:
        inner = wrapper[1]
        return [c for c in module.children() if isinstance(c, nn.Linear)], [inner.output_proj], inner
    structure = inline_attention_structure(module)
    ins = [getattr(module, n) for n in structure.children if n not in structure.out_projections]
    return ins, [getattr(module, n) for n in structure.out_projections], module


def _deformable_layers(module: nn.Module):
    names = deformable_projection_names(module)
    core = getattr(module, "attn", None)
    if not isinstance(core, nn.Module) or not hasattr(core, "prob_quantizer"):
        core = module._modules.get("ms_deformable_attn_core")
    ins = [getattr(module, n) for n in names if n != DEFORMABLE_OUTPUT]
    outs = [getattr(module, n) for n in names if n == DEFORMABLE_OUTPUT]
    return ins, outs, core


#: The adapters, tried in order.
ATTENTION_ADAPTERS: tuple[AttentionAdapter, ...] = (
    AttentionAdapter("torch_mha", _is_torch_mha, QuantMultiheadAttention.from_float, _torch_mha_layers),
    AttentionAdapter("hf_interface", is_hf_attention, quantize_hf_attention, _hf_interface_layers),
    AttentionAdapter("hf_inline", _is_inline, quantize_inline_attention, _inline_layers),
    AttentionAdapter("hf_deformable", is_deformable_attention, quantize_deformable_attention, _deformable_layers),
)


def find_attention_adapter(module: nn.Module) -> AttentionAdapter | None:
    """The first adapter of :data:`ATTENTION_ADAPTERS` that handles ``module``, or None.

    Examples:
        >>> from qdetr.tiny_hf_detr import build_tiny_hf_detr
        >>> model = build_tiny_hf_detr("rt_detr_v2").model
        >>> find_attention_adapter(model.model.decoder.layers[0].encoder_attn).name
        'hf_deformable'
        >>> find_attention_adapter(model.model.decoder.layers[0].self_attn).name
        'hf_interface'
    """
    for adapter in ATTENTION_ADAPTERS:
        if adapter.matches(module):
            return adapter
    return None


def looks_like_attention(module: nn.Module) -> bool:
    """True when the class name says attention (``...Attention``, ``...Attn``) but no adapter handles it.

    Examples:
        >>> class MyAttention(nn.Module):
        ...     pass
        >>> looks_like_attention(MyAttention()), looks_like_attention(nn.MultiheadAttention(8, 2))
        (True, False)
    """
    name = type(module).__name__.lower()
    return ("attention" in name or name.endswith("attn")) and find_attention_adapter(module) is None
