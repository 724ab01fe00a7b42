"""Distribution alignment (DA), the inner level of Q-DETR's distillation (method.md 6.1, Eq. 2.30-2.32).

The student's attention query is standardised per (token, head) over its ``d_h`` channels
and re-scaled by a learnable affine shared by all heads:

    q* = (q - mean(q)) / sqrt(var(q) + eps) * weight + bias

``unbiased=True`` uses the unbiased variance (factor d_h / (d_h - 1)) as the released
checkpoints do; the default is the biased estimator.

:func:`insert_distribution_alignment` is the one placement function for every DETR. It puts a
module into the ``q_align`` slot of a model's decoder attention (:class:`qdetr.layers.MultiheadAttention`,
and the Hugging Face softmax attentions once :func:`qdetr.quant.quantize_model` gave them the
slot): ``where="cross"`` is the paper's co-attention query (paper profile), ``where="self"`` the
decoder self-attention query (released checkpoints, seed profile).

Hugging Face DETR-family decoders:

* softmax attention quantized by :func:`qdetr.quant.quantize_model` (through the attention
  interface: DETR, Conditional DETR, Deformable DETR, RT-DETR / RT-DETRv2, D-FINE, DEIMv2,
  LW-DETR, RF-DETR; inline: Table Transformer, DAB-DETR, Grounding DINO, OmDet-Turbo): the
  ``q_align`` slot of the quantized forward, applied to the unscaled per-head query (B, h, L, d_h);
* a float DAB-DETR's ``DabDetrAttention``, whose query arrives already projected as
  ``hidden_states`` (B, L, h * d_h): it has no slot, so the module is registered as its
  ``q_align`` and a forward pre-hook (``with_kwargs``) applies it per head before the attention
  scales the query (quantizing the model afterwards keeps the module and drops the hook's work,
  as the quantized forward applies the slot itself).
  The hook is not saved with the ``state_dict``: call this function on a fresh model before
  loading a checkpoint that holds ``q_align`` parameters;
* deformable cross-attention computes no query-key product, so ``where="cross"`` does not apply
  to it: distribution alignment goes into these models' decoder self-attention (``where="self"``).
:data:`ALIGNMENT_BY_PROFILE` is the one definition of the slot (and variance estimator) of
each bit profile; the model builder (:func:`qdetr.models.build_qdetr_smca`), the trainer and
the loaders all place DA through this module (``profile=`` or the recorded
:func:`alignment_slots`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = [
    "ALIGNMENT_BY_PROFILE",
    "DistributionAlignment",
    "insert_distribution_alignment",
    "alignment_slots",
    "restore_alignment_slots",
]

#: Where each bit profile puts distribution alignment: ``(where, unbiased)``. The paper puts it
#: on the co-attention (decoder cross-attention) query with the biased variance; the released
#: checkpoints ("seed") on the decoder self-attention query with the unbiased variance.
ALIGNMENT_BY_PROFILE: dict[str, tuple[str, bool]] = {
    "paper": ("cross", False),
    "seed": ("self", True),
    "deploy": ("cross", False),  # the paper's layers with integer-kernel numerics
}

_ATTENTION_NAMES = {
    # decoder cross-attention: facebookresearch/detr and qdetr / Hugging Face (DAB-DETR: cross_attn)
    "cross": ("multihead_attn", "encoder_attn", "cross_attn"),
    # decoder self-attention
    "self": ("self_attn",),
}


class DistributionAlignment(nn.Module):
    """Standardise a per-head query and apply a learnable affine.

    Args:
        head_dim: d_h, the size of the last axis.
        eps: added to the variance (1e-5 as in the paper).
        unbiased: use the unbiased variance estimator (seed checkpoints) instead of the biased one.

    Shapes:
        input and output: (B, h, L, d_h); statistics are taken over the last axis.

    Examples:
        >>> da = DistributionAlignment(32)
        >>> q = torch.randn(2, 8, 300, 32)
        >>> da(q).shape
        torch.Size([2, 8, 300, 32])
        >>> q_star = da(q)                                   # weight 1, bias 0: plain standardisation
        >>> torch.allclose(q_star.mean(-1), torch.zeros(2, 8, 300), atol=1e-5)
        True
    """

    def __init__(self, head_dim: int, eps: float = 1e-5, unbiased: bool = False) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.eps = eps
        self.unbiased = unbiased
        # gamma = 1 and beta = 0 at construction; not touched by Xavier resets (1-D tensors).
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.bias = nn.Parameter(torch.zeros(head_dim))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, eps={self.eps}, unbiased={self.unbiased}"

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """(B, h, L, d_h) -> (B, h, L, d_h), standardised over the last axis, then ``* weight + bias``."""
        mean = q.mean(dim=-1, keepdim=True)
        var = q.var(dim=-1, keepdim=True, unbiased=self.unbiased)
        return (q - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def _head_dim(attention: nn.Module) -> int:
    for attr in ("head_dim", "attention_head_dim", "attention_head_size"):
        head_dim = getattr(attention, attr, None)
        if isinstance(head_dim, int):
            return head_dim
    embed_dim, num_heads = getattr(attention, "embed_dim", None), getattr(attention, "num_heads", None)
    if isinstance(embed_dim, int) and isinstance(num_heads, int) and num_heads > 0:
        return embed_dim // num_heads
    raise ValueError(f"{type(attention).__name__} exposes neither head_dim nor embed_dim/num_heads")


def _reference_tensor(attention: nn.Module) -> torch.Tensor | None:
    for tensor in attention.parameters(recurse=True):
        if tensor.is_floating_point():
            return tensor
    return None


def _takes_projected_query(module: nn.Module) -> bool:
    """DAB-DETR-style attention: q, k, v projected outside, per-head sizes as attributes."""
    return (
        isinstance(getattr(module, "attention_heads", None), int)
        and isinstance(getattr(module, "attention_head_dim", None), int)
        and isinstance(getattr(module, "output_proj", None), nn.Module)
        and not hasattr(module, "q_proj")
    )


def _align_projected_query(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: ``module.q_align`` on the per-head query passed as ``hidden_states``.

    Does nothing once the module's class has changed since the hook was registered:
    :func:`qdetr.quant.quantize_model` swaps in a forward that applies the ``q_align`` slot itself.
    """
    if type(module) is not module._q_align_hooked_class:
        return None
    if args:
        hidden_states, args = args[0], args[1:]
    else:
        hidden_states = kwargs.pop("hidden_states")
    bsz, length, width = hidden_states.shape  # (B, L, h * d_h)
    heads, head_dim = module.attention_heads, module.attention_head_dim
    q = hidden_states.view(bsz, length, heads, head_dim).transpose(1, 2)  # (B, h, L, d_h)
    q = module.q_align(q).transpose(1, 2).reshape(bsz, length, width)
    return (q, *args), kwargs


def _is_deformable(module: nn.Module) -> bool:
    return isinstance(getattr(module, "sampling_offsets", None), nn.Module)


def insert_distribution_alignment(
    model: nn.Module,
    where: str | None = None,
    unbiased: bool | None = None,
    *,
    eps: float = 1e-5,
    profile: str | None = None,
) -> list[str]:
    """Put a :class:`DistributionAlignment` into the ``q_align`` slot of every decoder attention.

    Only decoder layers are touched (module names containing ``decoder.``); encoder
    self-attention never gets DA. The new modules follow the attention's device and dtype,
    start as the identity affine (weight 1, bias 0) and are registered submodules, so they are
    saved in the ``state_dict`` and trained with the model.

    Args:
        model: the detector, modified in place.
        where: ``"cross"`` (decoder ``multihead_attn`` / ``encoder_attn`` / ``cross_attn``, the
            paper's co-attention query) or ``"self"`` (decoder ``self_attn``, the released
            checkpoints; the place for deformable-attention DETRs); default: from ``profile``,
            else ``"cross"``.
        unbiased: unbiased variance (released checkpoints) instead of the biased one;
            default: from ``profile``, else False.
        eps: variance epsilon.
        profile: a bit profile (``"paper"`` or ``"seed"``): takes ``where`` and ``unbiased``
            from :data:`ALIGNMENT_BY_PROFILE`; cannot be combined with them.

    Returns:
        Names of the attention modules that received DA, in module order.

    Raises:
        ValueError: for an unknown ``where``, when no matching attention has a ``q_align``
            slot (the message says why for deformable cross-attention), or when a slot already
            holds something other than ``nn.Identity``.

    Examples:
        >>> import qdetr
        >>> model = qdetr.create_model("detr_tiny")
        >>> insert_distribution_alignment(model, where="cross")
        ['transformer.decoder.layers.0.multihead_attn', 'transformer.decoder.layers.1.multihead_attn']
        >>> model.transformer.decoder.layers[0].multihead_attn.q_align
        DistributionAlignment(head_dim=8, eps=1e-05, unbiased=False)
        >>> out = model(torch.randn(1, 3, 64, 64))
        >>> out["pred_boxes"].shape                          # (B, Q, 4) normalised cxcywh
        torch.Size([1, 10, 4])

        The released checkpoints' placement, by profile:

        >>> seed_model = qdetr.create_model("detr_tiny")
        >>> insert_distribution_alignment(seed_model, profile="seed")[0]
        'transformer.decoder.layers.0.self_attn'
        >>> seed_model.transformer.decoder.layers[0].self_attn.q_align.unbiased
        True

        Hugging Face DAB-DETR passes its projected query to ``DabDetrAttention``, which gets a
        pre-hook; RT-DETR's cross-attention is deformable (its decoder self-attention takes DA
        once :func:`qdetr.quant.quantize_model` gave it the slot):

        >>> from qdetr.tiny_hf_detr import build_tiny_hf_detr
        >>> insert_distribution_alignment(build_tiny_hf_detr("dab_detr").model, where="self")[0]
        'model.decoder.layers.0.self_attn.self_attn'
        >>> insert_distribution_alignment(build_tiny_hf_detr("rt_detr").model, where="cross")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: RTDetrForObjectDetection's decoder cross-attention is deformable: ...use where='self'...
    """
    if profile is not None:
        if profile not in ALIGNMENT_BY_PROFILE:
            raise ValueError(f"profile must be one of {sorted(ALIGNMENT_BY_PROFILE)}, got {profile!r}")
        if where is not None or unbiased is not None:
            raise ValueError("pass either profile= or where=/unbiased=, not both")
        where, unbiased = ALIGNMENT_BY_PROFILE[profile]
    where = "cross" if where is None else where
    unbiased = bool(unbiased)
    if where not in _ATTENTION_NAMES:
        raise ValueError(f"where must be 'cross' (paper) or 'self' (released checkpoints), got {where!r}")
    pattern = re.compile(r"(?:^|\.)decoder\.(?:.*\.)?(?:" + "|".join(_ATTENTION_NAMES[where]) + r")$")
    matching = [(name, module) for name, module in model.named_modules() if pattern.search(name)]
    targets = [(name, module) for name, module in matching if hasattr(module, "q_align")]
    hooked = [(name, module) for name, module in matching if not hasattr(module, "q_align") and _takes_projected_query(module)]
    if not targets and not hooked:
        if where == "cross" and any(_is_deformable(module) for _, module in matching):
            raise ValueError(
                f"{type(model).__name__}'s decoder cross-attention is deformable: it has no query-key product "
                "whose query could be aligned; use where='self' (the decoder self-attention query, as in the "
                "released checkpoints)"
            )
        names = " / ".join(_ATTENTION_NAMES[where])
        raise ValueError(
            f"{type(model).__name__} has no decoder attention named {names} with a 'q_align' slot; build the "
            "model with qdetr.layers.MultiheadAttention (qdetr models do) or, for Hugging Face models, call "
            "qdetr.quant.quantize_model first, which gives their softmax attention the slot"
        )
    for name, module in targets:
        if not isinstance(module.q_align, nn.Identity):
            raise ValueError(
                f"{name}.q_align already holds {type(module.q_align).__name__}; insert distribution alignment "
                "once per model (reset the slot to nn.Identity() to replace it)"
            )
    for name, module in targets + hooked:
        align = DistributionAlignment(_head_dim(module), eps=eps, unbiased=unbiased)
        ref = _reference_tensor(module)
        if ref is not None:
            align = align.to(device=ref.device, dtype=ref.dtype)
        module.q_align = align
    for _, module in hooked:
        module._q_align_hooked_class = type(module)
        module.register_forward_pre_hook(_align_projected_query, with_kwargs=True)
    placed = {name for name, _ in targets + hooked}
    return [name for name, _ in matching if name in placed]


def alignment_slots(model: nn.Module) -> list[dict]:
    """The attention modules whose ``q_align`` slot holds DA, as recorded in a model's ``config.json``.

    Returns:
        ``[{"module": qualified name, "head_dim", "eps", "unbiased"}, ...]`` in module order.

    Examples:
        >>> import qdetr
        >>> model = qdetr.create_model("detr_tiny")
        >>> _ = insert_distribution_alignment(model, profile="paper")
        >>> alignment_slots(model)[0]
        {'module': 'transformer.decoder.layers.0.multihead_attn', 'head_dim': 8, 'eps': 1e-05, 'unbiased': False}
    """
    slots = []
    for name, module in model.named_modules():
        align = getattr(module, "q_align", None)
        if isinstance(align, DistributionAlignment):
            slots.append({"module": name, "head_dim": align.head_dim, "eps": align.eps, "unbiased": align.unbiased})
    return slots


def restore_alignment_slots(model: nn.Module, slots: list[dict]) -> list[str]:
    """Place DA modules where :func:`alignment_slots` recorded them (loading a saved model).

    Raises:
        ValueError: when a recorded module is missing or has no ``q_align`` slot.

    Examples:
        >>> import qdetr
        >>> source = qdetr.create_model("detr_tiny")
        >>> _ = insert_distribution_alignment(source, profile="seed")
        >>> target = qdetr.create_model("detr_tiny")
        >>> restore_alignment_slots(target, alignment_slots(source)) == [s["module"] for s in alignment_slots(source)]
        True
    """
    names = []
    for slot in slots:
        try:
            attention = model.get_submodule(slot["module"])
        except AttributeError as err:
            raise ValueError(f"recorded alignment slot {slot['module']!r} is not a module of {type(model).__name__}") from err
        hook = not hasattr(attention, "q_align") and _takes_projected_query(attention)
        if not hasattr(attention, "q_align") and not hook:
            raise ValueError(f"{slot['module']} has no q_align slot for distribution alignment")
        attention.q_align = DistributionAlignment(int(slot["head_dim"]), eps=float(slot["eps"]), unbiased=bool(slot["unbiased"]))
        if hook:
            attention._q_align_hooked_class = type(attention)
            attention.register_forward_pre_hook(_align_projected_query, with_kwargs=True)
        names.append(slot["module"])
    return names
