"""Hungarian matching between predictions and ground truth (scipy ``linear_sum_assignment``).

Cost per (query, target) pair (method.md 5.1 / 5.2)::

    C = cost_class * C_class + cost_bbox * L1(cxcywh) - cost_giou * GIoU(xyxy)

with ``C_class = -p(class)`` (softmax head, DETR) or the focal cost
``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` with ``p = sigmoid(logit)``
(sigmoid head, SMCA). The cost matrix of the whole batch is computed in one shot and split
per image; only the assignment runs per image on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from qdetr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou_xyxy

__all__ = ["HungarianMatcher", "target_labels", "target_boxes_cxcywh"]


def target_labels(target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The (T,) int64 class ids of a target dict (``labels`` or HF's ``class_labels``)."""
    for key in ("labels", "class_labels"):
        if key in target:
            return target[key]
    raise KeyError(f"target dict needs 'labels' (T,) int64 class ids, got keys {sorted(target)}")


def target_boxes_cxcywh(target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The (T, 4) normalised cxcywh boxes of a target dict (key ``boxes``)."""
    if "boxes" not in target:
        raise KeyError(f"target dict needs 'boxes' (T, 4) normalised cxcywh, got keys {sorted(target)}")
    return target["boxes"]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets per image.

    Args:
        cost_class: weight of the classification cost.
        cost_bbox: weight of the L1 cost on normalised cxcywh boxes.
        cost_giou: weight of the (negated) GIoU cost on xyxy boxes.
        classification: ``"softmax"`` (DETR) or ``"sigmoid"`` (focal cost, SMCA).
        focal_alpha, focal_gamma: focal cost parameters (sigmoid only).

    Inputs:
        outputs: dict with ``pred_logits`` (B, Q, C+1) and ``pred_boxes`` (B, Q, 4) cxcywh.
        targets: list of B dicts with ``labels`` (T_b,) int64 and ``boxes`` (T_b, 4) cxcywh.

    Returns:
        list of B ``(query_idx, target_idx)`` int64 tensor pairs of length
        ``min(Q, T_b)``, sorted by query index. Images without targets give empty tensors;
        with more targets than queries only Q targets are matched.

    Raises:
        ValueError: for an unknown ``classification`` or all-zero costs; in ``forward``, for
            a target count that differs from the batch size or a non-finite cost.

    Examples:
        >>> import torch
        >>> from qdetr.models import HungarianMatcher
        >>> matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
        >>> outputs = {
        ...     "pred_logits": torch.zeros(1, 3, 6),
        ...     "pred_boxes": torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]]),
        ... }
        >>> targets = [{"labels": torch.tensor([2, 4]), "boxes": torch.tensor([[0.8, 0.8, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]])}]
        >>> query_idx, target_idx = matcher(outputs, targets)[0]  # one pair per image
        >>> query_idx.tolist(), target_idx.tolist()
        ([0, 2], [1, 0])
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        *,
        classification: str = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if classification not in ("softmax", "sigmoid"):
            raise ValueError(f"classification must be 'softmax' or 'sigmoid', got {classification!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0; set at least one of cost_class, cost_bbox, cost_giou > 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.classification = classification
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"classification={self.classification!r}"
        )

    def _class_cost(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, C+1) logits, (T,) labels -> (N, T) classification cost."""
        if self.classification == "softmax":
            return -logits.softmax(-1)[:, labels]
        prob = logits.sigmoid()
        a, g = self.focal_alpha, self.focal_gamma
        neg = (1 - a) * prob.pow(g) * (-(1 - prob + 1e-8).log())
        pos = a * (1 - prob).pow(g) * (-(prob + 1e-8).log())
        return pos[:, labels] - neg[:, labels]

    @torch.no_grad()
    def cost_matrix(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """(B, Q, sum T_b) cost of every query against every target of the batch."""
        logits = outputs["pred_logits"]
        boxes = outputs["pred_boxes"]
        bs, nq = logits.shape[:2]
        labels = torch.cat([target_labels(t) for t in targets]).to(logits.device).long()
        tgt_boxes = torch.cat([target_boxes_cxcywh(t) for t in targets]).to(boxes)
        # At least float32 (bfloat16/float16 outputs), float64 stays float64.
        ct = torch.promote_types(logits.dtype, torch.float32)
        flat_logits = logits.flatten(0, 1).to(ct)  # (B*Q, C+1)
        flat_boxes = boxes.flatten(0, 1).to(ct)  # (B*Q, 4)
        tgt_boxes = tgt_boxes.to(ct)
        cost = self.cost_class * self._class_cost(flat_logits, labels)
        cost = cost + self.cost_bbox * torch.cdist(flat_boxes, tgt_boxes, p=1)
        cost = cost - self.cost_giou * generalized_box_iou_xyxy(
            box_cxcywh_to_xyxy(flat_boxes), box_cxcywh_to_xyxy(tgt_boxes)
        )
        return cost.view(bs, nq, -1)

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        bs = outputs["pred_logits"].shape[0]
        if len(targets) != bs:
            raise ValueError(f"got {len(targets)} target dicts for a batch of {bs} images; pass one dict per image")
        sizes = [len(target_labels(t)) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in range(bs)]
        cost = self.cost_matrix(outputs, targets).cpu()
        if not torch.isfinite(cost).all():
            raise ValueError(
                "matching cost contains NaN/inf; check that pred_boxes and target boxes are finite, "
                "normalised cxcywh with positive width and height"
            )
        indices = []
        for b, block in enumerate(cost.split(sizes, dim=-1)):
            if sizes[b] == 0:
                indices.append((empty, empty.clone()))
                continue
            rows, cols = linear_sum_assignment(block[b].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
