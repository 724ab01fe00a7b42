"""Frozen real-valued teacher for distillation (``method.md`` section 6.3).

:class:`FrozenTeacher` wraps a trained float detector (loaded from **its own** checkpoint,
never from the student's) so that it

* always runs in eval mode (no dropout), even when a parent module calls ``.train()``;
* runs under ``torch.no_grad()`` and has ``requires_grad=False`` parameters;
* is **not registered** as a submodule: its parameters are not in the wrapper's (or a
  wrapping student's) ``parameters()`` / ``state_dict()``, so an optimizer built from
  ``student.parameters()`` never sees them and student checkpoints do not contain them;
  ``.to()`` / ``.cuda()`` / ``.half()`` on the wrapper (or its parent) still move it;
* returns outputs that :class:`~qdetr.distill.loss.DistillationLoss` reads: qdetr models
  return ``co_attn_features`` natively; Hugging Face models are run inside
  :func:`~qdetr.distill.adapters.capture_co_attention`, whose hooks are removed after every
  call.

Example::

    teacher = FrozenTeacher(float_detr)          # float_detr loaded from its FP checkpoint
    student.teacher = teacher                    # optional: moves with student.to(device)
    optimizer = torch.optim.AdamW(p for p in student.parameters() if p.requires_grad)
    teacher_outputs = teacher(images)            # dict with co_attn_features, pred_boxes
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from qdetr.distill.adapters import capture_co_attention, feature_output_key

__all__ = ["FrozenTeacher"]

_CAPTURE_MODES = ("auto", "native", "hooks")


def _is_hugging_face_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


class FrozenTeacher(nn.Module):
    """Eval-only, gradient-free wrapper around a float teacher detector.

    Args:
        model: the trained float teacher. It is put in eval mode and its parameters get
            ``requires_grad=False`` (in place).
        capture: how the co-attended features are obtained: ``"native"`` (the model returns
            them, qdetr models), ``"hooks"`` (:func:`capture_co_attention`, Hugging Face DETR-family
            models) or ``"auto"`` (hooks for ``transformers.PreTrainedModel``, native
            otherwise).
        feature: ``"attn_values"`` or ``"proj_out"``, as in ``DistillationLoss``.

    Call:
        ``teacher(*args, **kwargs)`` forwards to the model under ``torch.no_grad()`` and
        returns its outputs (a dict with the feature key added when hooks are used).

    Raises:
        ValueError: for an unknown ``capture`` or ``feature``, or a model whose
            cross-attention cannot be hooked when ``capture`` resolves to ``"hooks"``.

    Examples:
        >>> import qdetr
        >>> teacher = FrozenTeacher(qdetr.create_model("detr_tiny"))   # in practice: a trained float model
        >>> student = qdetr.quantize_model(qdetr.create_model("detr_tiny"), bits=4)
        >>> student.teacher = teacher                                    # moves with student.to(...)
        >>> len(list(teacher.parameters())), "teacher.class_embed.weight" in student.state_dict()
        (0, False)
        >>> _ = student.train()
        >>> teacher.model.training
        False
        >>> out = teacher(torch.randn(2, 3, 64, 64))                     # no grad, eval mode
        >>> out["co_attn_features"].shape, out["co_attn_features"].requires_grad   # (L_dec, B, Q, d)
        (torch.Size([2, 2, 10, 32]), False)
    """

    def __init__(self, model: nn.Module, *, capture: str = "auto", feature: str = "attn_values") -> None:
        super().__init__()
        if capture not in _CAPTURE_MODES:
            raise ValueError(f"capture must be one of {_CAPTURE_MODES}, got {capture!r}")
        feature_output_key(feature)  # validates
        if capture == "auto":
            capture = "hooks" if _is_hugging_face_model(model) else "native"
        model.eval()
        model.requires_grad_(False)
        # Stored outside nn.Module's registries on purpose: see the module docstring.
        object.__setattr__(self, "_teacher", model)
        self.capture = capture
        self.feature = feature
        if capture == "hooks":
            capture_co_attention(model, feature)  # fail now, not at the first step, if it cannot be hooked

    @property
    def model(self) -> nn.Module:
        """The wrapped teacher model."""
        return self._teacher

    def extra_repr(self) -> str:
        return f"model={type(self._teacher).__name__}, capture={self.capture!r}, feature={self.feature!r}"

    def train(self, mode: bool = True) -> "FrozenTeacher":
        """Keep the teacher (and this wrapper) in eval mode whatever ``mode`` is."""
        super().train(False)
        self._teacher.eval()
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> "FrozenTeacher":
        # .to(), .cuda(), .half(), ... reach the unregistered teacher too.
        self._teacher._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._teacher.eval()  # in case someone switched the model itself to training
        with torch.no_grad():
            if self.capture == "hooks":
                with capture_co_attention(self._teacher, self.feature) as capture:
                    outputs = self._teacher(*args, **kwargs)
                return capture.outputs(outputs)
            return self._teacher(*args, **kwargs)
