"""Set-prediction loss of DETR and SMCA-DETR (method.md 5.1, 5.2).

Losses, each normalised by ``num_boxes`` (the mean number of targets per process over the
world when ``torch.distributed`` is initialised, clamped to at least 1):

* ``loss_ce``: softmax cross-entropy over C+1 classes with the no-object class weighted by
  ``eos_coef`` (DETR; a mean over queries, as in the original), or the sigmoid focal loss
  over all C+1 logits with one-hot targets at the matched class, the no-object column being
  always negative (SMCA; summed, divided by ``num_boxes``);
* ``loss_bbox``: L1 on matched normalised cxcywh boxes;
* ``loss_giou``: ``1 - GIoU`` on matched xyxy boxes;
* the same with suffix ``_{i}`` for every entry ``i`` of ``outputs["aux_outputs"]``.

Logged, without gradient: ``class_error`` (matched-query top-1 error, %) and
``cardinality_error`` (|predicted non-empty count - target count|).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from qdetr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou_xyxy
from qdetr.models.config import DetrConfig, SmcaConfig
from qdetr.models.matcher import HungarianMatcher, target_boxes_cxcywh, target_labels

__all__ = ["SetCriterion", "build_criterion", "build_matcher", "num_boxes_across_processes"]

_LOSS_KEYS = ("loss_ce", "loss_bbox", "loss_giou")


def num_boxes_across_processes(targets: Sequence[Mapping[str, torch.Tensor]], device: torch.device) -> float:
    """Mean target count per process over the world, clamped to >= 1 (DETR's ``num_boxes``)."""
    num = torch.tensor([float(sum(len(target_labels(t)) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return max(num.item(), 1.0)


class SetCriterion(nn.Module):
    """Hungarian-matched detection loss.

    Args:
        num_classes: class ids; logits have ``num_classes + 1`` columns.
        matcher: a :class:`~qdetr.models.matcher.HungarianMatcher`.
        weight_dict: loss name -> weight, used by :meth:`total_loss` (aux keys included).
        classification: ``"softmax"`` (CE with ``eos_coef``) or ``"sigmoid"`` (focal).
        eos_coef: weight of the no-object class (softmax only).
        focal_alpha, focal_gamma: focal loss parameters (sigmoid only).

    Inputs:
        outputs: model outputs with ``pred_logits`` (B, Q, C+1), ``pred_boxes`` (B, Q, 4)
            normalised cxcywh and optionally ``aux_outputs``.
        targets: B dicts with ``labels`` (T_b,) int64 and ``boxes`` (T_b, 4) normalised cxcywh.

    Returns:
        dict of unweighted scalar losses (see the module docstring).

    Raises:
        ValueError: for an unknown ``classification``; in ``forward``, for a target count
            that differs from the batch size or logits with the wrong number of columns.

    Examples:
        >>> import torch
        >>> from qdetr.models import HungarianMatcher, SetCriterion
        >>> from qdetr.testing import example_targets
        >>> criterion = SetCriterion(5, HungarianMatcher(), {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2})
        >>> _ = torch.manual_seed(0)
        >>> outputs = {"pred_logits": torch.randn(2, 10, 6), "pred_boxes": torch.rand(2, 10, 4)}
        >>> losses = criterion(outputs, example_targets(2, num_classes=5))
        >>> sorted(losses)
        ['cardinality_error', 'class_error', 'loss_bbox', 'loss_ce', 'loss_giou']
        >>> criterion.total_loss(losses).shape
        torch.Size([])
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float],
        *,
        classification: str = "softmax",
        eos_coef: float = 0.1,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if classification not in ("softmax", "sigmoid"):
            raise ValueError(f"classification must be 'softmax' or 'sigmoid', got {classification!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.classification = classification
        self.eos_coef = eos_coef
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    @staticmethod
    def _matched_query_index(indices: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        return batch_idx, query_idx

    def loss_labels(self, outputs, targets, indices, num_boxes: float, log: bool = True) -> dict[str, torch.Tensor]:
        """Classification loss ``loss_ce`` (and ``class_error`` when ``log``)."""
        logits = outputs["pred_logits"]  # (B, Q, C+1)
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"pred_logits has {logits.shape[-1]} columns but the criterion expects num_classes + 1 = "
                f"{self.num_classes + 1}; build the criterion with the model's num_classes"
            )
        batch_idx, query_idx = self._matched_query_index(indices)
        matched_labels = torch.cat([target_labels(t)[j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx.to(logits.device), query_idx.to(logits.device)] = matched_labels.long()
        if self.classification == "softmax":
            loss = F.cross_entropy(
                logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype)
            )
        else:
            # One-hot over C+1 columns; unmatched queries are all-negative (no-object column
            # included), so the no-object column is never a positive.
            onehot = torch.zeros_like(logits)
            onehot[batch_idx.to(logits.device), query_idx.to(logits.device), matched_labels.long()] = 1.0
            loss = sigmoid_focal_loss(
                logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
            ) / num_boxes
        losses = {"loss_ce": loss}
        if log:
            with torch.no_grad():
                if len(matched_labels) == 0:
                    losses["class_error"] = torch.zeros((), device=logits.device)
                else:
                    pred = logits[batch_idx.to(logits.device), query_idx.to(logits.device)].argmax(-1)
                    acc = (pred == matched_labels).float().mean() * 100
                    losses["class_error"] = 100 - acc
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets) -> dict[str, torch.Tensor]:
        """``cardinality_error``: |#queries not predicted as no-object - #targets|, batch mean."""
        logits = outputs["pred_logits"]
        if self.classification == "softmax":
            nonempty = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        else:
            nonempty = (logits[..., :-1].sigmoid().max(-1).values > 0.5).sum(1)
        sizes = torch.as_tensor([len(target_labels(t)) for t in targets], device=logits.device)
        return {"cardinality_error": (nonempty.float() - sizes.float()).abs().mean()}

    def loss_boxes(self, outputs, targets, indices, num_boxes: float) -> dict[str, torch.Tensor]:
        """``loss_bbox`` (L1, cxcywh) and ``loss_giou`` (1 - GIoU, xyxy) on matched pairs."""
        boxes = outputs["pred_boxes"]
        batch_idx, query_idx = self._matched_query_index(indices)
        src = boxes[batch_idx.to(boxes.device), query_idx.to(boxes.device)]  # (N, 4)
        tgt = torch.cat([target_boxes_cxcywh(t)[j] for t, (_, j) in zip(targets, indices)]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou_xyxy(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: Mapping, targets: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(
                f"got {len(targets)} target dicts for a batch of {outputs['pred_logits'].shape[0]} images"
            )
        num_boxes = num_boxes_across_processes(targets, outputs["pred_logits"].device)
        indices = self.matcher(outputs, targets)
        losses: dict[str, torch.Tensor] = {}
        losses.update(self.loss_labels(outputs, targets, indices, num_boxes))
        losses.update(self.loss_cardinality(outputs, targets))
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        for i, aux in enumerate(outputs.get("aux_outputs", []) or []):
            aux_indices = self.matcher(aux, targets)
            aux_losses = self.loss_labels(aux, targets, aux_indices, num_boxes, log=False)
            aux_losses.update(self.loss_boxes(aux, targets, aux_indices, num_boxes))
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses

    def total_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``sum(weight_dict[k] * losses[k])`` over the weighted keys present in ``losses``."""
        terms = [losses[k] * w for k, w in self.weight_dict.items() if k in losses]
        if not terms:
            raise ValueError(f"no weighted loss in {sorted(losses)}; weight_dict has {sorted(self.weight_dict)}")
        return sum(terms[1:], terms[0])


def build_matcher(config: DetrConfig) -> HungarianMatcher:
    """The matcher of ``config`` (softmax cost for DETR, focal cost for SMCA).

    Args:
        config: a ``DetrConfig`` or ``SmcaConfig`` (its ``cost_*`` and focal fields).

    Returns:
        A :class:`~qdetr.models.matcher.HungarianMatcher`.

    Examples:
        >>> from qdetr.models import build_matcher, model_config
        >>> build_matcher(model_config("detr_tiny"))
        HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, classification='softmax')
    """
    kwargs = {}
    if isinstance(config, SmcaConfig):
        kwargs = {"focal_alpha": config.focal_alpha, "focal_gamma": config.focal_gamma}
    return HungarianMatcher(
        config.cost_class, config.cost_bbox, config.cost_giou, classification=config.classification, **kwargs
    )


def build_criterion(config: DetrConfig) -> SetCriterion:
    """The criterion (with matcher and weights, aux layers included) of ``config``.

    Args:
        config: a ``DetrConfig`` or ``SmcaConfig`` (loss weights, ``aux_loss``, ``dec_layers``).

    Returns:
        A :class:`SetCriterion` whose ``weight_dict`` has ``loss_ce``, ``loss_bbox``,
        ``loss_giou`` and, with ``aux_loss``, their ``_{i}`` copies for layers 0..L-2.

    Examples:
        >>> from qdetr.models import build_criterion, model_config
        >>> criterion = build_criterion(model_config("smca_detr_tiny"))
        >>> criterion.classification, sorted(criterion.weight_dict)
        ('sigmoid', ['loss_bbox', 'loss_bbox_0', 'loss_ce', 'loss_ce_0', 'loss_giou', 'loss_giou_0'])
    """
    base = {"loss_ce": config.cls_loss_coef, "loss_bbox": config.bbox_loss_coef, "loss_giou": config.giou_loss_coef}
    weight_dict = dict(base)
    if config.aux_loss:
        for i in range(config.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    kwargs = {}
    if isinstance(config, SmcaConfig):
        kwargs = {"focal_alpha": config.focal_alpha, "focal_gamma": config.focal_gamma}
    return SetCriterion(
        config.num_classes,
        build_matcher(config),
        weight_dict,
        classification=config.classification,
        eos_coef=config.eos_coef,
        **kwargs,
    )
