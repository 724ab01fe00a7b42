"""Distribution rectification distillation loss (Q-DETR, ``method.md`` section 6).

``L_DRD = E_j ||D^S_j - D^T_{k*(j)}||_2`` (Eq. 2.37) over the student queries j selected by
foreground-aware query matching (:mod:`qdetr.distill.fqm`), with D the co-attended decoder
features ``Â·V̂`` (Eq. 2.26). One student pass and one teacher pass per step; any batch size;
teacher and student may have different query counts.

Usage in a training step (qdetr model, native output keys)::

    distill = DistillationLoss(tau=0.5, weight=1.0)
    outputs = student(images)                       # has 'co_attn_features', 'pred_boxes'
    teacher_outputs = teacher(images)               # FrozenTeacher: eval, no grad
    losses = criterion(outputs, targets)            # detection losses
    losses.update(distill(outputs, teacher_outputs, targets))
    total = sum(v for k, v in losses.items() if k.startswith("loss_"))  # loss_drd is weighted
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qdetr.distill.adapters import get_co_attn_features, get_pred_boxes
from qdetr.distill.config import DistillationConfig
from qdetr.distill.fqm import match_teacher_queries, select_foreground_queries, stack_target_boxes

__all__ = ["DistillationLoss", "fake_quantize_teacher_4bit"]


def fake_quantize_teacher_4bit(features: torch.Tensor) -> torch.Tensor:
    """The released code's 4-bit fake quantization of the teacher's decoder states (QFD term).

    Signed 4 bits (Qn = -8, Qp = 7), one step for the whole tensor:
    ``s = 2 mean|x| / sqrt(7)``, ``z = round(0.1 (min x + 8 s))`` (its first-batch
    initialisation), ``x_hat = (round(clip(x / s + z, -8, 7)) - z) s`` (``method.md`` 3.1 and
    6.2). The step and zero point are recomputed from each batch. Not part of the paper.

    Args:
        features: (..., d) teacher features.

    Returns:
        Tensor of the same shape with at most 16 distinct values.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> states = torch.randn(2, 10, 32)                 # (B, Q, d) teacher decoder states
        >>> states_hat = fake_quantize_teacher_4bit(states)
        >>> states_hat.shape, states_hat.unique().numel() <= 16
        (torch.Size([2, 10, 32]), True)
    """
    x = features.detach()
    step = (2.0 * x.abs().mean() / 7.0**0.5).clamp(min=torch.finfo(x.dtype).tiny)
    zero_point = torch.round(0.1 * (x.min() + 8.0 * step))
    return (torch.round(torch.clamp(x / step + zero_point, -8.0, 7.0)) - zero_point) * step


def _check_target_boxes(targets: Sequence[Mapping[str, Any]]) -> None:
    """Refuse NaN/inf target boxes: they would silently select no (or every) foreground query."""
    from qdetr.errors import DataError

    for index, target in enumerate(targets):
        boxes = target.get("boxes") if isinstance(target, Mapping) else None
        if isinstance(boxes, torch.Tensor) and boxes.numel() and not bool(torch.isfinite(boxes).all()):
            raise DataError(
                f"targets[{index}]['boxes'] contains NaN or infinite values; fix or drop those annotations "
                "(qdetr.data.CocoDetectionDataset refuses them when it reads the annotation file)"
            )


class DistillationLoss(nn.Module):
    """Q-DETR distribution rectification distillation (DRD) with foreground-aware query matching.

    Args:
        tau: foreground threshold (Eq. 2.34), default 0.5. The test is strict (GIoU > tau * G_i),
            so tau = 0 keeps the queries with a positive GIoU to some ground truth, not all queries.
        weight: lambda (Eq. 2.38); the returned ``loss_drd`` is already multiplied by it.
        mu_giou: GIoU weight of the teacher matching score (Eq. 2.35), default 2.
        mu_l1: L1 weight of the teacher matching score, default 5.
        layers: decoder layers to distil (-1 = last); the loss is averaged over them. Each index
            is applied to the student's and the teacher's layer stacks separately.
        feature: ``"attn_values"`` (Â·V̂ before the output projection, the paper's D, read from
            ``co_attn_features``) or ``"proj_out"`` (after it, read from
            ``co_attn_proj_features``; the released code's choice).
        one_to_one: Hungarian pairing on the same score instead of the per-query argmax.
        qfd_weight: weight of the released code's feature-MSE term between the student's and
            the 4-bit fake-quantized teacher's final decoder states (``last_hidden_state``,
            (B, Q, d), query slot j against slot j). **Not part of the paper**; 0 (default)
            disables it and ``loss_qfd`` is not returned.
        config: a :class:`DistillationConfig` instead of the keyword arguments.

    Call:
        ``loss_fn(student_outputs, teacher_outputs, targets)`` with

        * ``student_outputs`` / ``teacher_outputs``: model outputs (dict or Hugging Face
          ``ModelOutput``-like) holding ``co_attn_features`` (L, B, Q, d) and ``pred_boxes``
          (B, Q, 4) normalised cxcywh (see :mod:`qdetr.distill.adapters`);
        * ``targets``: list of B DETR-convention dicts with ``"boxes"`` (G_b, 4) normalised
          cxcywh (``"labels"`` is not used); G_b may be 0.

    Returns:
        dict with

        * ``loss_drd``: scalar, ``weight`` x mean over all matched pairs of the batch of
          ``||D^S_j - D^T_k*||_2``, averaged over ``layers``. Exactly 0 (computed as
          0 x sum of student features, so DDP sees the graph, never NaN) when no query is
          selected;
        * ``num_distilled``: int64 scalar, matched pairs in the batch (per layer);
        * ``frac_distilled``: float scalar, ``num_distilled / (B * Q_student)``;
        * ``loss_qfd``: only when ``qfd_weight > 0``.

        Only the ``loss_*`` entries are losses; the counts are detached, for logging.

    Raises:
        KeyError: if an output lacks a needed key (the message names the adapter to use).
        ValueError: for mismatched batch sizes, feature sizes or layer indices.

    Gradients flow to the student's features only: the teacher's outputs are detached and
    selection and matching use detached boxes.

    Examples:
        >>> import qdetr
        >>> from qdetr.distill import FrozenTeacher
        >>> _ = torch.manual_seed(0)
        >>> student = qdetr.quantize_model(qdetr.create_model("detr_tiny"), bits=4).train()
        >>> teacher = FrozenTeacher(qdetr.create_model("detr_tiny"))
        >>> images = torch.randn(2, 3, 64, 64)                      # (B, 3, H, W)
        >>> targets = [  # boxes: (G_b, 4) normalised cxcywh
        ...     {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
        ...     {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        ... ]
        >>> distill = DistillationLoss(tau=0.5, weight=1.0)
        >>> losses = distill(student(images), teacher(images), targets)
        >>> sorted(losses)
        ['frac_distilled', 'loss_drd', 'num_distilled']
        >>> losses["loss_drd"].shape, losses["loss_drd"].requires_grad, losses["num_distilled"].dtype
        (torch.Size([]), True, torch.int64)
        >>> losses["loss_drd"].backward()                           # gradients reach the student only
    """

    def __init__(
        self,
        tau: float = 0.5,
        weight: float = 1.0,
        mu_giou: float = 2.0,
        mu_l1: float = 5.0,
        layers: Sequence[int] | int = (-1,),
        feature: str = "attn_values",
        one_to_one: bool = False,
        qfd_weight: float = 0.0,
        *,
        config: DistillationConfig | None = None,
    ) -> None:
        super().__init__()
        if config is None:
            layers = (layers,) if isinstance(layers, int) else tuple(layers)
            config = DistillationConfig(
                tau=tau,
                weight=weight,
                mu_giou=mu_giou,
                mu_l1=mu_l1,
                layers=layers,
                feature=feature,
                one_to_one=one_to_one,
                qfd_weight=qfd_weight,
            )
        self.config = config

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"tau={c.tau}, weight={c.weight}, mu_giou={c.mu_giou}, mu_l1={c.mu_l1}, layers={c.layers}, "
            f"feature={c.feature!r}, one_to_one={c.one_to_one}, qfd_weight={c.qfd_weight}"
        )

    @staticmethod
    def _layer_positions(layers: tuple[int, ...], num_student: int, num_teacher: int) -> tuple[list[int], list[int]]:
        student, teacher = [], []
        for i in layers:
            for count, out in ((num_student, student), (num_teacher, teacher)):
                if not -count <= i < count:
                    raise ValueError(
                        f"layers={layers} is out of range: the student has {num_student} and the teacher "
                        f"{num_teacher} decoder layers of features; use negative indices (-1 = last)"
                    )
                out.append(i % count)
        return student, teacher

    def _check_inputs(
        self,
        student_features: torch.Tensor,
        student_boxes: torch.Tensor,
        teacher_features: torch.Tensor,
        teacher_boxes: torch.Tensor,
        targets: Sequence[Mapping[str, Any]],
    ) -> None:
        for role, feats, boxes in (
            ("student", student_features, student_boxes),
            ("teacher", teacher_features, teacher_boxes),
        ):
            if feats.shape[1:3] != boxes.shape[:2]:
                raise ValueError(
                    f"{role} features (L, B, Q, d) = {tuple(feats.shape)} do not match its pred_boxes "
                    f"(B, Q, 4) = {tuple(boxes.shape)}; both must come from the same forward pass"
                )
        b_s, b_t = student_boxes.shape[0], teacher_boxes.shape[0]
        if b_s != b_t:
            raise ValueError(
                f"student and teacher batch sizes differ ({b_s} vs {b_t}); run both models on the same images"
            )
        if isinstance(targets, Mapping) or len(targets) != b_s:
            n = "a dict" if isinstance(targets, Mapping) else len(targets)
            raise ValueError(f"targets must be a list with one dict per image: got {n} for a batch of {b_s} images")
        d_s, d_t = student_features.shape[-1], teacher_features.shape[-1]
        if d_s != d_t:
            raise ValueError(
                f"student and teacher feature sizes differ ({d_s} vs {d_t}); DRD compares features directly, "
                "so use a teacher with the same d_model (the paper's teachers share the student's width)"
            )
        _check_target_boxes(targets)

    def forward(
        self,
        student_outputs: Any,
        teacher_outputs: Any,
        targets: Sequence[Mapping[str, Any]],
    ) -> dict[str, torch.Tensor]:
        """The DRD loss; see the class docstring (Call, Returns, Raises) for shapes and keys."""
        cfg = self.config
        student_features = get_co_attn_features(student_outputs, cfg.feature, role="student")  # (L_s, B, Q_s, d)
        teacher_features = get_co_attn_features(teacher_outputs, cfg.feature, role="teacher")  # (L_t, B, Q_t, d)
        student_boxes = get_pred_boxes(student_outputs, role="student")  # (B, Q_s, 4)
        teacher_boxes = get_pred_boxes(teacher_outputs, role="teacher")  # (B, Q_t, 4)
        self._check_inputs(student_features, student_boxes, teacher_features, teacher_boxes, targets)
        s_layers, t_layers = self._layer_positions(cfg.layers, student_features.shape[0], teacher_features.shape[0])

        # FQM (Eq. 2.34-2.35) on detached boxes.
        gt_boxes, gt_valid = stack_target_boxes(targets, dtype=student_boxes.dtype, device=student_boxes.device)
        foreground = select_foreground_queries(student_boxes, gt_boxes, gt_valid, cfg.tau)  # (B, Q_s)
        teacher_index, matched = match_teacher_queries(
            student_boxes,
            teacher_boxes,
            foreground,
            mu_giou=cfg.mu_giou,
            mu_l1=cfg.mu_l1,
            one_to_one=cfg.one_to_one,
        )  # (B, Q_s), (B, Q_s)

        # Eq. 2.37 on the chosen layers.
        s_feat = student_features[s_layers]  # (L', B, Q_s, d)
        t_feat = teacher_features[t_layers].detach().to(s_feat.dtype)  # (L', B, Q_t, d)
        num_layers, bsz, num_queries, dim = s_feat.shape
        index = teacher_index[None, :, :, None].expand(num_layers, bsz, num_queries, dim)
        t_matched = torch.gather(t_feat, 2, index)  # (L', B, Q_s, d)
        distances = torch.linalg.vector_norm(s_feat - t_matched, dim=-1)  # (L', B, Q_s)
        pair_mask = matched[None].expand_as(distances)
        num_pairs = matched.sum()
        total = torch.where(pair_mask, distances, torch.zeros((), dtype=distances.dtype, device=distances.device)).sum()
        mean = total / (num_pairs * num_layers).clamp(min=1).to(total.dtype)
        # No pair selected: exactly 0, still attached to the student's features for DDP.
        loss_drd = torch.where(num_pairs > 0, mean, 0.0 * s_feat.sum()) * cfg.weight

        losses = {
            "loss_drd": loss_drd,
            "num_distilled": num_pairs.detach(),
            "frac_distilled": (num_pairs.to(torch.float32) / max(1, bsz * num_queries)).detach(),
        }
        if cfg.qfd_weight > 0:
            losses["loss_qfd"] = self._qfd(student_outputs, teacher_outputs) * cfg.qfd_weight
        return losses

    @staticmethod
    def _qfd(student_outputs: Any, teacher_outputs: Any) -> torch.Tensor:
        states = []
        for role, outputs in (("student", student_outputs), ("teacher", teacher_outputs)):
            value = outputs.get("last_hidden_state") if isinstance(outputs, Mapping) else None
            if value is None:
                value = getattr(outputs, "last_hidden_state", None)
            if value is None:
                raise KeyError(
                    f"qfd_weight > 0 needs the {role}'s final decoder states under 'last_hidden_state' "
                    "(B, Q, d); Hugging Face DETR returns it, qdetr models return it when built with it; "
                    "or set qfd_weight=0 (the default, as in the paper)"
                )
            states.append(value)
        student_states, teacher_states = states
        if student_states.shape != teacher_states.shape:
            raise ValueError(
                f"the QFD term pairs query slots, so student and teacher 'last_hidden_state' must have the same "
                f"shape, got {tuple(student_states.shape)} and {tuple(teacher_states.shape)}; set qfd_weight=0"
            )
        target = fake_quantize_teacher_4bit(teacher_states.to(student_states.dtype))
        return torch.mean((target - student_states) ** 2)
