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
* Hugging Face ``DetrForObjectDetection`` / ``ConditionalDetrForObjectDetection`` (and any
  model whose decoder cross-attention modules are named ``...decoder.layers.<i>.encoder_attn``
  or ``...decoder.layers.<i>.multihead_attn`` with an ``o_proj`` / ``out_proj`` submodule):
  run the forward inside :func:`capture_co_attention`, which hooks the output projections and
  removes its hooks on exit::

      with capture_co_attention(model) as capture:
          out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
      outputs = capture.outputs(out)   # dict with co_attn_features + the model's own fields
"""

from __future__ import annotations

import re
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

_CROSS_ATTENTION_NAME = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.(?:encoder_attn|multihead_attn)$")
_OUTPUT_PROJECTION_NAMES = ("o_proj", "out_proj")


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
        f"qdetr DETR/SMCA models return it in their output dict; for Hugging Face DETR or "
        f"ConditionalDETR run the {role}'s forward inside `with qdetr.distill.capture_co_attention(model) "
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


def find_decoder_cross_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Decoder cross-attention modules of a DETR, in layer order.

    Matches modules named ``...decoder.layers.<i>.encoder_attn`` (Hugging Face) or
    ``...decoder.layers.<i>.multihead_attn`` (facebookresearch/detr, ``qdetr``).

    Args:
        model: the detector.

    Returns:
        ``[(name, module), ...]`` sorted by decoder layer index.

    Raises:
        ValueError: if no such module exists.

    Examples:
        >>> import qdetr
        >>> [name for name, _ in find_decoder_cross_attention(qdetr.create_model("detr_tiny"))]
        ['transformer.decoder.layers.0.multihead_attn', 'transformer.decoder.layers.1.multihead_attn']
    """
    found = []
    for name, module in model.named_modules():
        match = _CROSS_ATTENTION_NAME.search(name)
        if match:
            found.append((int(match.group(1)), name, module))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no decoder cross-attention named '...decoder.layers.<i>.encoder_attn' "
            "or '...decoder.layers.<i>.multihead_attn'; qdetr models return 'co_attn_features' natively "
            "(use their outputs directly), other models must expose one of these names"
        )
    found.sort(key=lambda item: item[0])
    return [(name, module) for _, name, module in found]


def _output_projection(name: str, attention: nn.Module) -> nn.Module:
    if isinstance(attention, nn.MultiheadAttention):
        raise ValueError(
            f"{name} is a torch.nn.MultiheadAttention, whose fused forward never calls out_proj as a module, "
            "so its co-attended features cannot be captured; replace it with "
            "qdetr.layers.MultiheadAttention.from_torch(module)"
        )
    for proj_name in _OUTPUT_PROJECTION_NAMES:
        proj = getattr(attention, proj_name, None)
        if isinstance(proj, nn.Module):
            return proj
    raise ValueError(f"{name} ({type(attention).__name__}) has no output projection named 'o_proj' or 'out_proj'")


class CoAttentionCapture:
    """Context manager that records every decoder cross-attention's co-attended features.

    Forward pre-hooks (``feature="attn_values"``) or forward hooks (``"proj_out"``) on each
    cross-attention's output projection store its input (or output), which is
    ``(B, Q, d)`` batch-first in Hugging Face DETR/ConditionalDETR and in
    :class:`qdetr.layers.MultiheadAttention`. The tensors keep their autograd graph, so a
    student's features can be distilled. A pre-hook on the model clears the record at the
    start of each forward. All hooks are removed on exit, also on error.

    Args:
        model: the detector (see :func:`find_decoder_cross_attention` for the names it needs).
        feature: ``"attn_values"`` (default) or ``"proj_out"``.

    Shapes:
        ``features``: (L_dec, B, Q, d), one entry per decoder layer.

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

        With a Hugging Face ``DetrForObjectDetection`` (6 decoder layers, 100 queries, d = 256):

        >>> with CoAttentionCapture(hf_detr) as capture:              # doctest: +SKIP
        ...     out = hf_detr(pixel_values=x)
        >>> capture.features.shape                                     # doctest: +SKIP
        torch.Size([6, 2, 100, 256])
    """

    def __init__(self, model: nn.Module, feature: str = "attn_values") -> None:
        self.model = model
        self.feature = feature
        self.key = feature_output_key(feature)
        self.layer_names = [name for name, _ in find_decoder_cross_attention(model)]
        self._projections = [
            _output_projection(name, module) for name, module in find_decoder_cross_attention(model)
        ]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._store: dict[int, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        """True while the hooks are registered."""
        return bool(self._handles)

    def __enter__(self) -> "CoAttentionCapture":
        if self._handles:
            raise RuntimeError("CoAttentionCapture is already active; do not nest the same capture")
        self._store.clear()
        self._handles.append(self.model.register_forward_pre_hook(self._clear))
        for index, proj in enumerate(self._projections):
            if self.feature == "attn_values":
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

    def _make_pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._store[index] = args[0]

        return hook

    def _make_post_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._store[index] = output

        return hook

    @property
    def features(self) -> torch.Tensor:
        """(L_dec, B, Q, d) features of the last forward.

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
                raise RuntimeError(f"{name}: expected a (B, Q, d) output-projection input, got {tuple(t.shape)}")
        return torch.stack(tensors, dim=0)

    def outputs(self, model_outputs: Any) -> dict[str, Any]:
        """The model's outputs as a dict, with the recorded features added.

        Args:
            model_outputs: what the model returned (dict or Hugging Face ``ModelOutput``).

        Returns:
            A new dict with the model's fields (``pred_boxes``, ``logits``, ...) and
            ``self.key`` -> (L_dec, B, Q, d) features.
        """
        if isinstance(model_outputs, Mapping):
            merged = dict(model_outputs.items())
        elif hasattr(model_outputs, "pred_boxes"):
            merged = {"pred_boxes": model_outputs.pred_boxes}
        else:
            raise TypeError(
                f"cannot read a {type(model_outputs).__name__}; pass the model output dict or ModelOutput "
                "(call the model with return_dict=True)"
            )
        merged[self.key] = self.features
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
