"""Get the distillation inputs (co-attended features and final boxes) out of any DETR.

:class:`~qdetr.distill.loss.DistillationLoss` reads two things from a model's output:

============================  ==============================================================
key                           contents
============================  ==============================================================
``co_attn_features``          (L_dec, B, Q, d) per decoder layer, the cross-attention's
                              co-attended features ``Â·V̂`` before the output projection
                              (``feature="attn_values"``, the paper's D, Eq. 2.26)
``co_attn_proj_features``     (L_dec, B, Q, d) the same after the output projection
                              (``feature="proj_out"``, the released code's feature)
``pred_boxes``                (B, Q, 4) final-layer boxes, normalised cxcywh
============================  ==============================================================

Where they come from:

* ``qdetr`` DETR / SMCA models return ``co_attn_features`` and ``pred_boxes`` natively
  (no hooks, ``torch.compile``-friendly): pass their output dict as it is.
* Hugging Face DETR-family detectors (DETR, Conditional DETR, Table Transformer, DAB-DETR,
  Deformable DETR, RT-DETR / RT-DETRv2, D-FINE, DEIMv2, LW-DETR, RF-DETR, Grounding DINO,
  OmDet-Turbo) and any model with the same decoder structure: run the forward inside
  :func:`capture_co_attention`, which hooks each decoder layer's cross-attention and removes
  its hooks on exit::

      with capture_co_attention(model) as capture:
          out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
      outputs = capture.outputs(out)   # dict with co_attn_features + the model's own fields

Where the capture hooks (see :func:`find_decoder_cross_attention`):

==========================================  ===============================================
cross-attention                             co-attended feature (B, Q, d)
==========================================  ===============================================
softmax (DETR, Conditional DETR, Table      input of ``o_proj`` / ``out_proj``: the
Transformer, DAB-DETR)                      attention-weighted values, heads concatenated
deformable with an output projection        input of ``output_proj``: the sampled values
(Deformable DETR, RT-DETR(v2), LW-DETR,     weighted by the attention weights, summed over
RF-DETR, Grounding DINO, OmDet-Turbo)       levels and points, heads concatenated
deformable without one (D-FINE, DEIMv2)     the attention module's output[0] (the same
                                            aggregation; ``proj_out`` is the same tensor)
==========================================  ===============================================

:meth:`CoAttentionCapture.outputs` returns the **matching queries only**: the denoising
queries RT-DETR-style models prepend in training (``denoising_meta_values["dn_num_split"]``)
are sliced off the features, ``pred_boxes``, ``logits`` and ``last_hidden_state``, and of
the ``group_detr`` query groups LW-DETR / RF-DETR train with, group 0 (the one they keep in
eval) is kept. ``pred_boxes`` is each model's final box (D-FINE / DEIMv2: the integral of its
final distribution), so foreground-aware query matching pairs student and teacher queries by
their boxes even when two-stage selection gave them different proposals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "FEATURE_KEYS",
    "feature_output_key",
    "get_co_attn_features",
    "get_pred_boxes",
    "find_decoder_cross_attention",
    "CoAttentionCapture",
    "capture_co_attention",
]

#: Output key holding each feature kind.
FEATURE_KEYS: dict[str, str] = {
    "attn_values": "co_attn_features",
    "proj_out": "co_attn_proj_features",
}

#: Child names of a decoder layer that hold its (image) cross-attention, in priority order.
_CROSS_ATTENTION_NAMES = ("encoder_attn", "cross_attn", "multihead_attn")
_OUTPUT_PROJECTION_NAMES = ("o_proj", "out_proj", "output_proj")
#: Output fields some models name differently: OmDet-Turbo's ``decoder_coord_logits`` are its
#: final boxes (sigmoid-normalised cxcywh, as its post-processing reads them).
_FIELD_ALIASES = {"pred_boxes": "decoder_coord_logits", "logits": "decoder_class_logits"}


def feature_output_key(feature: str) -> str:
    """Output key for a feature kind (``"attn_values"`` or ``"proj_out"``).

    Raises:
        ValueError: for an unknown feature kind.

    Examples:
        >>> feature_output_key("attn_values"), feature_output_key("proj_out")
        ('co_attn_features', 'co_attn_proj_features')
    """
    if feature not in FEATURE_KEYS:
        raise ValueError(f"feature must be one of {sorted(FEATURE_KEYS)}, got {feature!r}")
    return FEATURE_KEYS[feature]


def _lookup(outputs: Any, key: str) -> torch.Tensor | None:
    """``outputs[key]`` for dicts (and Hugging Face ``ModelOutput``), else ``outputs.key``."""
    if isinstance(outputs, Mapping):
        return outputs.get(key)
    return getattr(outputs, key, None)


def _missing_hint(role: str) -> str:
    return (
        f"qdetr DETR/SMCA models return it in their output dict; for Hugging Face DETR-family models "
        f"run the {role}'s forward inside `with qdetr.distill.capture_co_attention(model) "
        f"as capture:` and pass `capture.outputs(out)` (a teacher wrapped in qdetr.distill.FrozenTeacher "
        f"does this itself)"
    )


def get_co_attn_features(outputs: Any, feature: str = "attn_values", *, role: str = "student") -> torch.Tensor:
    """Co-attended decoder features of a model output.

    Args:
        outputs: a model output: dict or object with the key of ``feature`` (see
            :data:`FEATURE_KEYS`).
        feature: ``"attn_values"`` (Â·V̂ before the output projection) or ``"proj_out"``.
        role: ``"student"`` or ``"teacher"``, used in error messages.

    Returns:
        (L_dec, B, Q, d) features.

    Raises:
        KeyError: if the key is missing (the message says which adapter produces it).
        ValueError: if the tensor is not 4-D.

    Examples:
        >>> outputs = {"co_attn_features": torch.randn(6, 2, 100, 256), "pred_boxes": torch.rand(2, 100, 4)}
        >>> get_co_attn_features(outputs).shape          # (L_dec, B, Q, d)
        torch.Size([6, 2, 100, 256])
        >>> get_co_attn_features(outputs, "proj_out")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        KeyError: "student outputs have no 'co_attn_proj_features' ...
    """
    key = feature_output_key(feature)
    value = _lookup(outputs, key)
    if value is None:
        raise KeyError(f"{role} outputs have no {key!r} (feature={feature!r}); {_missing_hint(role)}")
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{role} outputs[{key!r}] must be a (L_dec, B, Q, d) tensor, got {shape}")
    return value


def get_pred_boxes(outputs: Any, *, role: str = "student") -> torch.Tensor:
    """Final-layer boxes of a model output.

    Args:
        outputs: a model output with ``pred_boxes``.
        role: ``"student"`` or ``"teacher"``, used in error messages.

    Returns:
        (B, Q, 4) normalised cxcywh boxes.

    Raises:
        KeyError: if ``pred_boxes`` is missing.
        ValueError: if the tensor is not (B, Q, 4).

    Examples:
        >>> get_pred_boxes({"pred_boxes": torch.rand(2, 100, 4)}).shape    # (B, Q, 4) cxcywh
        torch.Size([2, 100, 4])
    """
    value = _lookup(outputs, "pred_boxes")
    if value is None:
        raise KeyError(
            f"{role} outputs have no 'pred_boxes'; pass the detector's own output (DETR convention: "
            "'pred_boxes' (B, Q, 4) normalised cxcywh), not a post-processed result"
        )
    if not isinstance(value, torch.Tensor) or value.dim() != 3 or value.shape[-1] != 4:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{role} outputs['pred_boxes'] must be (B, Q, 4) normalised cxcywh, got {shape}")
    return value


def _is_deformable_attention(module: nn.Module) -> bool:
    """Multi-scale deformable attention: predicts sampling offsets from the query."""
    return isinstance(getattr(module, "sampling_offsets", None), nn.Module)


def _output_projection_of(module: nn.Module) -> nn.Module | None:
    for proj_name in _OUTPUT_PROJECTION_NAMES:
        proj = getattr(module, proj_name, None)
        if isinstance(proj, nn.Module):
            return proj
    return None


def _layer_cross_attention(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """(relative name, module) of a decoder layer's image cross-attention, or None.

    A child named ``encoder_attn`` / ``cross_attn`` / ``multihead_attn`` (in that order:
    Grounding DINO's ``encoder_attn_text`` is not the image branch), else a child that is a
    deformable attention. A wrapper without an output projection whose child of the same kind
    holds one (DAB-DETR's ``cross_attn.cross_attn``) is descended into.
    """
    children = dict(layer.named_children())
    found = next(((n, children[n]) for n in _CROSS_ATTENTION_NAMES if n in children), None)
    if found is None:
        found = next(((n, c) for n, c in children.items() if _is_deformable_attention(c)), None)
    if found is None:
        return None
    name, module = found
    while _output_projection_of(module) is None and not _is_deformable_attention(module):
        inner = dict(module.named_children())
        nested = next(((n, inner[n]) for n in _CROSS_ATTENTION_NAMES if n in inner), None)
        if nested is None:
            break
        name, module = f"{name}.{nested[0]}", nested[1]
    return name, module


def _no_cross_attention_error(model: nn.Module) -> ValueError:
    cls = type(model).__name__
    has_decoder = any(".decoder" in f".{name}" for name, _ in model.named_modules())
    if not has_decoder:
        return ValueError(
            f"{cls} has no decoder, so it has no decoder cross-attention: it is an encoder-only detector "
            "(like YOLOS, whose detection tokens attend in the encoder), and Q-DETR's distillation of "
            "co-attended decoder features does not apply to it"
        )
    return ValueError(
        f"{cls} has no decoder cross-attention that qdetr recognises: no nn.ModuleList under a "
        "'decoder' module whose layers hold an 'encoder_attn' / 'cross_attn' / 'multihead_attn' child or "
        "a deformable attention (a module with 'sampling_offsets'); qdetr models return "
        "'co_attn_features' natively (use their outputs directly)"
    )


def find_decoder_cross_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Decoder cross-attention modules of a DETR, in layer order, found by structure.

    The decoder layers are the elements of an ``nn.ModuleList`` under a module whose name
    contains ``decoder`` (``model.decoder.layers`` in Hugging Face, ``transformer.decoder.layers``
    in ``qdetr``, ``decoder.layers`` in OmDet-Turbo); a layer's cross-attention is its child
    named ``encoder_attn``, ``cross_attn`` or ``multihead_attn``, or its deformable-attention
    child (see the module docstring for where the features are taken).

    Args:
        model: the detector.

    Returns:
        ``[(name, module), ...]`` in decoder layer order.

    Raises:
        ValueError: if there is none, naming the model class (an encoder-only detector such as
            YOLOS gets a message saying co-attention distillation does not apply).

    Examples:
        >>> import qdetr
        >>> [name for name, _ in find_decoder_cross_attention(qdetr.create_model("detr_tiny"))]
        ['transformer.decoder.layers.0.multihead_attn', 'transformer.decoder.layers.1.multihead_attn']
        >>> from qdetr.tiny_hf_detr import build_tiny_hf_detr
        >>> [name for name, _ in find_decoder_cross_attention(build_tiny_hf_detr("dab_detr").model)][-1]
        'model.decoder.layers.2.cross_attn.cross_attn'
        >>> find_decoder_cross_attention(build_tiny_hf_detr("yolos").model)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: YolosForObjectDetection has no decoder, so it has no decoder cross-attention: ...
    """
    for list_name, module_list in model.named_modules():
        if not isinstance(module_list, nn.ModuleList) or not any("decoder" in part for part in list_name.split(".")):
            continue
        found = []
        for index, layer in enumerate(module_list):
            match = _layer_cross_attention(layer)
            if match is not None:
                found.append((f"{list_name}.{index}.{match[0]}", match[1]))
        if found:
            return found
    raise _no_cross_attention_error(model)


def _output_projection(name: str, attention: nn.Module) -> nn.Module | None:
    """The module whose input is the co-attended feature, or None (hook the attention's output)."""
    if isinstance(attention, nn.MultiheadAttention):
        raise ValueError(
            f"{name} is a torch.nn.MultiheadAttention, whose fused forward never calls out_proj as a module, "
            "so its co-attended features cannot be captured; replace it with "
            "qdetr.layers.MultiheadAttention.from_torch(module)"
        )
    proj = _output_projection_of(attention)
    if proj is not None:
        return proj
    if _is_deformable_attention(attention):
        return None  # D-FINE / DEIMv2: the core's output is returned as it is
    raise ValueError(
        f"{name} ({type(attention).__name__}) has no output projection named "
        f"{' / '.join(repr(n) for n in _OUTPUT_PROJECTION_NAMES)} and is not a deformable attention"
    )


def _quads_to_boxes(quads: torch.Tensor) -> torch.Tensor:
    """PP-DocLayoutV4 quads ``[cx, cy, dx1 + 0.5, dy1 + 0.5, ..., dx4 + 0.5, dy4 + 0.5]`` (B, Q, 10)
    -> their enclosing boxes (B, Q, 4) normalised cxcywh (its image processor's decoding)."""
    corners = quads[..., None, :2] + quads[..., 2:].reshape(*quads.shape[:-1], 4, 2) - 0.5  # (B, Q, 4, 2)
    low, high = corners.amin(dim=-2), corners.amax(dim=-2)
    return torch.cat([(low + high) / 2, high - low], dim=-1)


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class CoAttentionCapture:
    """Context manager that records every decoder cross-attention's co-attended features.

    Forward pre-hooks (``feature="attn_values"``) or forward hooks (``"proj_out"``) on each
    cross-attention's output projection store its input (or output), which is ``(B, Q, d)``
    batch-first in Hugging Face DETR-family models and in
    :class:`qdetr.layers.MultiheadAttention`; for a deformable attention without an output
    projection (D-FINE, DEIMv2) a forward hook stores the attention's ``output[0]`` for both
    kinds. The tensors keep their autograd graph, so a student's features can be distilled. A
    pre-hook on the model clears the record at the start of each forward and notes whether the
    model runs in training mode. All hooks are removed on exit, also on error.

    Args:
        model: the detector (see :func:`find_decoder_cross_attention` for what it needs).
        feature: ``"attn_values"`` (default) or ``"proj_out"``.

    Shapes:
        ``features``: (L_dec, B, Q_all, d), one entry per decoder layer, all decoder queries
        (denoising and extra groups included; :meth:`outputs` keeps the matching queries).

    Examples:
        >>> import qdetr
        >>> _ = torch.manual_seed(0)
        >>> model = qdetr.create_model("detr_tiny").eval()     # 2 decoder layers, 10 queries, d = 32
        >>> with CoAttentionCapture(model) as capture, torch.no_grad():
        ...     out = model(torch.randn(2, 3, 64, 64))
        >>> capture.features.shape, capture.active
        (torch.Size([2, 2, 10, 32]), False)
        >>> torch.allclose(capture.features, out["co_attn_features"])   # qdetr models also return them natively
        True

        RT-DETR in training prepends denoising queries; ``outputs`` drops them:

        >>> from qdetr.tiny_hf_detr import build_tiny_hf_detr
        >>> tiny = build_tiny_hf_detr("rt_detr")                # 3 decoder layers, 5 queries, d = 32
        >>> with CoAttentionCapture(tiny.model) as capture:
        ...     out = tiny.forward(with_labels=True)
        >>> capture.features.shape[2], out.denoising_meta_values["dn_num_split"]
        (13, [8, 5])
        >>> merged = capture.outputs(out)
        >>> merged["co_attn_features"].shape, merged["pred_boxes"].shape
        (torch.Size([3, 2, 5, 32]), torch.Size([2, 5, 4]))
    """

    def __init__(self, model: nn.Module, feature: str = "attn_values") -> None:
        self.model = model
        self.feature = feature
        self.key = feature_output_key(feature)
        attentions = find_decoder_cross_attention(model)
        self.layer_names = [name for name, _ in attentions]
        self._attentions = [module for _, module in attentions]
        self._projections = [_output_projection(name, module) for name, module in attentions]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._store: dict[int, torch.Tensor] = {}
        self._training = model.training

    @property
    def active(self) -> bool:
        """True while the hooks are registered."""
        return bool(self._handles)

    def __enter__(self) -> "CoAttentionCapture":
        if self._handles:
            raise RuntimeError("CoAttentionCapture is already active; do not nest the same capture")
        self._store.clear()
        self._handles.append(self.model.register_forward_pre_hook(self._clear))
        for index, (attention, proj) in enumerate(zip(self._attentions, self._projections)):
            if proj is None:
                self._handles.append(attention.register_forward_hook(self._make_post_hook(index)))
            elif self.feature == "attn_values":
                self._handles.append(proj.register_forward_pre_hook(self._make_pre_hook(index)))
            else:
                self._handles.append(proj.register_forward_hook(self._make_post_hook(index)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent); the last record stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _clear(self, module: nn.Module, args: Any) -> None:
        self._store.clear()
        self._training = module.training

    def _make_pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._store[index] = args[0]

        return hook

    def _make_post_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._store[index] = _first_tensor(output)

        return hook

    @property
    def features(self) -> torch.Tensor:
        """(L_dec, B, Q_all, d) features of the last forward, all decoder queries.

        Raises:
            RuntimeError: if some layer recorded nothing (forward not run inside the block,
                or decoder layers skipped by layer drop).
        """
        missing = [self.layer_names[i] for i in range(len(self._projections)) if i not in self._store]
        if missing:
            raise RuntimeError(
                f"no co-attended features were recorded for {missing}; run the model's forward inside the "
                "`with` block (and disable decoder layer drop, e.g. config.decoder_layerdrop=0)"
            )
        tensors = [self._store[i] for i in range(len(self._projections))]
        for name, t in zip(self.layer_names, tensors):
            if t.dim() != 3:
                raise RuntimeError(f"{name}: expected a (B, Q, d) co-attended feature, got {tuple(t.shape)}")
        return torch.stack(tensors, dim=0)

    def query_slice(self, model_outputs: Any) -> slice:
        """The matching queries among the decoder's ``Q_all`` queries of the last forward.

        Denoising queries come first in RT-DETR-style models and are skipped
        (``denoising_meta_values["dn_num_split"][0]`` of them); in training, LW-DETR / RF-DETR
        run ``config.group_detr`` query groups one after the other, and group 0 is kept.

        Args:
            model_outputs: what the model returned.

        Returns:
            ``slice(start, stop)`` on the query axis.

        Raises:
            RuntimeError: if the query count does not split into the model's groups.
        """
        num_all = self.features.shape[2]
        start = 0
        meta = _lookup(model_outputs, "denoising_meta_values")
        if isinstance(meta, Mapping) and meta.get("dn_num_split") is not None:
            start = int(meta["dn_num_split"][0])
        count = num_all - start
        groups = int(getattr(getattr(self.model, "config", None), "group_detr", 1) or 1)
        if self._training and groups > 1:
            if count % groups:
                raise RuntimeError(
                    f"{type(self.model).__name__} ran {count} queries in training, which is not a multiple of "
                    f"config.group_detr = {groups}"
                )
            count //= groups
        return slice(start, start + count)

    def outputs(self, model_outputs: Any) -> dict[str, Any]:
        """The model's outputs as a dict, restricted to the matching queries, with the features added.

        Args:
            model_outputs: what the model returned (dict or Hugging Face ``ModelOutput``).

        Returns:
            A new dict with the model's fields and ``self.key`` -> (L_dec, B, Q, d) features
            (OmDet-Turbo's ``decoder_coord_logits`` / ``decoder_class_logits`` are also
            given as ``pred_boxes`` / ``logits``; PP-DocLayoutV4's quadrilaterals (B, Q, 10) become
            their enclosing boxes in ``pred_boxes``, the quads stay in ``pred_quads``).
            ``self.key``, ``pred_boxes`` (B, Q, 4), ``logits`` (B, Q, C) and
            ``last_hidden_state`` (B, Q, d) hold the matching queries only (see
            :meth:`query_slice`); other fields (losses, auxiliary and encoder outputs) are
            passed through unchanged.
        """
        if isinstance(model_outputs, Mapping):
            merged = dict(model_outputs.items())
            for key, alias in _FIELD_ALIASES.items():
                if merged.get(key) is None and isinstance(merged.get(alias), torch.Tensor):
                    merged[key] = merged[alias]
        elif hasattr(model_outputs, "pred_boxes"):
            merged = {"pred_boxes": model_outputs.pred_boxes}
        else:
            raise TypeError(
                f"cannot read a {type(model_outputs).__name__}; pass the model output dict or ModelOutput "
                "(call the model with return_dict=True)"
            )
        boxes = merged.get("pred_boxes")
        if isinstance(boxes, torch.Tensor) and boxes.dim() == 3 and boxes.shape[-1] == 10:
            merged["pred_quads"] = boxes
            merged["pred_boxes"] = _quads_to_boxes(boxes)
        features = self.features
        queries = self.query_slice(model_outputs)
        num_all = features.shape[2]
        if queries != slice(0, num_all):
            for key in ("pred_boxes", "pred_quads", "logits", "last_hidden_state"):
                value = merged.get(key)
                if isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[1] == num_all:
                    merged[key] = value[:, queries]
        merged[self.key] = features[:, :, queries]
        return merged


def capture_co_attention(model: nn.Module, feature: str = "attn_values") -> CoAttentionCapture:
    """Build a :class:`CoAttentionCapture` for ``model`` (use it in a ``with`` statement).

    Args:
        model: the detector (see :func:`find_decoder_cross_attention`).
        feature: ``"attn_values"`` (default) or ``"proj_out"``.

    Examples:
        >>> import qdetr
        >>> model = qdetr.create_model("detr_tiny").eval()
        >>> with capture_co_attention(model, feature="proj_out") as capture, torch.no_grad():
        ...     out = model(torch.randn(1, 3, 64, 64))
        >>> merged = capture.outputs(out)
        >>> merged["co_attn_proj_features"].shape, merged["pred_boxes"].shape   # (L_dec, B, Q, d), (B, Q, 4)
        (torch.Size([2, 1, 10, 32]), torch.Size([1, 10, 4]))
    """
    return CoAttentionCapture(model, feature=feature)
