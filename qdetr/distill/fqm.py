"""Foreground-aware query matching (FQM), the upper level of Q-DETR's distillation.

``method.md`` section 6.1, Eq. 2.33-2.37, with the ``qdetr`` rules of section 6.3. All
functions are pure and vectorised over a padded batch: there are no Python loops over
queries or ground-truth boxes (the optional one-to-one assignment loops over images only,
because the Hungarian solver runs on the CPU).

1. Selection (Eq. 2.34). For image b and ground-truth box i,
   ``G_i = max_j GIoU(gt_i, s_j)`` over the student's final-layer boxes. Student query j is
   kept when ``GIoU(gt_i, s_j) > tau * G_i`` (strict) for some i with ``G_i > 0``. Images
   without ground truth keep nothing.
2. Teacher matching (Eq. 2.35). Each kept student query gets the teacher query
   ``k*(j) = argmax_k  mu_giou * GIoU(s_j, t_k) - mu_l1 * ||s_j - t_k||_1`` of the same image,
   with GIoU on xyxy boxes and L1 on normalised cxcywh boxes (DETR's conventions).

Teacher and student may have different query counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from qdetr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou_xyxy

__all__ = [
    "stack_target_boxes",
    "select_foreground_queries",
    "teacher_matching_score",
    "match_teacher_queries",
]


def _check_boxes(name: str, boxes_cxcywh: torch.Tensor) -> None:
    if boxes_cxcywh.dim() != 3 or boxes_cxcywh.shape[-1] != 4:
        raise ValueError(f"{name} must be (B, Q, 4) normalised cxcywh boxes, got shape {tuple(boxes_cxcywh.shape)}")


def stack_target_boxes(
    targets: Sequence[Mapping[str, torch.Tensor]],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the per-image ground-truth boxes of DETR-convention targets into one tensor.

    Args:
        targets: one dict per image with ``"boxes"``: (G_b, 4) normalised cxcywh (other keys,
            e.g. ``"labels"``, are ignored). G_b may be 0.
        dtype: dtype of the result (default: the first target's boxes dtype).
        device: device of the result (default: the first target's boxes device).

    Returns:
        ``(gt_boxes_cxcywh, gt_valid)``: (B, G, 4) boxes padded with zeros to
        G = max_b G_b (at least 1), and the (B, G) bool mask of real boxes.

    Raises:
        ValueError: if a target has no ``"boxes"`` or its boxes are not (G_b, 4).

    Examples:
        >>> targets = [
        ...     {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])},
        ...     {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        ... ]
        >>> gt_boxes_cxcywh, gt_valid = stack_target_boxes(targets)
        >>> gt_boxes_cxcywh.shape                        # (B, G, 4), G = 2
        torch.Size([2, 2, 4])
        >>> gt_valid
        tensor([[ True,  True],
                [False, False]])
    """
    boxes = []
    for b, target in enumerate(targets):
        if not isinstance(target, Mapping) or "boxes" not in target:
            raise ValueError(
                f"targets[{b}] has no 'boxes'; targets must be DETR-convention dicts with 'labels' and "
                "'boxes' ((G, 4) normalised cxcywh). For Hugging Face labels, the same dicts work "
                "('class_labels' is ignored here)."
            )
        t = torch.as_tensor(target["boxes"])
        if t.numel() == 0:
            t = t.reshape(0, 4)
        if t.dim() != 2 or t.shape[-1] != 4:
            raise ValueError(f"targets[{b}]['boxes'] must be (G, 4) normalised cxcywh, got shape {tuple(t.shape)}")
        boxes.append(t)
    if not boxes:
        raise ValueError("targets is empty; pass one target dict per image")
    dtype = dtype if dtype is not None else (boxes[0].dtype if boxes[0].is_floating_point() else torch.float32)
    device = device if device is not None else boxes[0].device
    num_gt = max(1, max(t.shape[0] for t in boxes))
    gt_boxes = torch.zeros(len(boxes), num_gt, 4, dtype=dtype, device=device)
    gt_valid = torch.zeros(len(boxes), num_gt, dtype=torch.bool, device=device)
    for b, t in enumerate(boxes):
        gt_boxes[b, : t.shape[0]] = t.to(device=device, dtype=dtype)
        gt_valid[b, : t.shape[0]] = True
    return gt_boxes, gt_valid


def select_foreground_queries(
    student_boxes_cxcywh: torch.Tensor,
    gt_boxes_cxcywh: torch.Tensor,
    gt_valid: torch.Tensor,
    tau: float = 0.5,
) -> torch.Tensor:
    """Foreground selection of Eq. 2.34 (strict ``>``; ground truths with ``G_i <= 0`` keep nothing).

    Args:
        student_boxes_cxcywh: (B, Q, 4) student final-layer boxes, normalised cxcywh
            (detached here: selection is not differentiated).
        gt_boxes_cxcywh: (B, G, 4) padded ground-truth boxes, normalised cxcywh.
        gt_valid: (B, G) bool, True for real ground-truth boxes.
        tau: relative GIoU threshold in [0, 1].

    Returns:
        (B, Q) bool mask of the student queries to distil.

    Raises:
        ValueError: for boxes that are not (B, ·, 4) or a ``gt_valid`` of the wrong shape.

    Examples:
        >>> student = torch.tensor([[[0.50, 0.5, 0.2, 0.2],      # on the object
        ...                          [0.52, 0.5, 0.2, 0.2],      # close to it
        ...                          [0.90, 0.9, 0.05, 0.05]]])  # elsewhere
        >>> gt = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])           # (B, G, 4) = (1, 1, 4)
        >>> select_foreground_queries(student, gt, torch.tensor([[True]]), tau=0.5)
        tensor([[ True,  True, False]])
    """
    _check_boxes("student_boxes_cxcywh", student_boxes_cxcywh)
    _check_boxes("gt_boxes_cxcywh", gt_boxes_cxcywh)
    if gt_valid.shape != gt_boxes_cxcywh.shape[:2]:
        raise ValueError(f"gt_valid must be (B, G) = {tuple(gt_boxes_cxcywh.shape[:2])}, got {tuple(gt_valid.shape)}")
    student = student_boxes_cxcywh.detach()
    gt = gt_boxes_cxcywh.to(student.dtype)
    giou = generalized_box_iou_xyxy(box_cxcywh_to_xyxy(gt), box_cxcywh_to_xyxy(student))  # (B, G, Q)
    best = giou.max(dim=-1).values  # (B, G): G_i
    active = gt_valid & (best > 0)  # (B, G)
    above = giou > (tau * best)[..., None]  # (B, G, Q)
    return (above & active[..., None]).any(dim=1)  # (B, Q)


def teacher_matching_score(
    student_boxes_cxcywh: torch.Tensor,
    teacher_boxes_cxcywh: torch.Tensor,
    mu_giou: float = 2.0,
    mu_l1: float = 5.0,
) -> torch.Tensor:
    """Score of Eq. 2.35 for every (student, teacher) query pair of each image.

    Args:
        student_boxes_cxcywh: (B, Q_s, 4) normalised cxcywh.
        teacher_boxes_cxcywh: (B, Q_t, 4) normalised cxcywh.
        mu_giou: weight mu1 of the GIoU (on xyxy boxes).
        mu_l1: weight mu2 of the L1 distance (on cxcywh boxes).

    Returns:
        (B, Q_s, Q_t) ``mu_giou * GIoU - mu_l1 * L1`` (higher is a better match).

    Raises:
        ValueError: for boxes that are not (B, ·, 4) or different batch sizes.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> student, teacher = torch.rand(2, 5, 4) * 0.5 + 0.25, torch.rand(2, 7, 4) * 0.5 + 0.25
        >>> teacher_matching_score(student, teacher).shape    # (B, Q_s, Q_t)
        torch.Size([2, 5, 7])
        >>> box = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
        >>> teacher_matching_score(box, box)                  # GIoU 1, L1 0: 2 * 1 - 5 * 0
        tensor([[[2.]]])
    """
    _check_boxes("student_boxes_cxcywh", student_boxes_cxcywh)
    _check_boxes("teacher_boxes_cxcywh", teacher_boxes_cxcywh)
    if student_boxes_cxcywh.shape[0] != teacher_boxes_cxcywh.shape[0]:
        raise ValueError(
            f"student and teacher batch sizes differ ({student_boxes_cxcywh.shape[0]} vs "
            f"{teacher_boxes_cxcywh.shape[0]}); run both models on the same images"
        )
    s = student_boxes_cxcywh.detach()
    t = teacher_boxes_cxcywh.detach().to(s.dtype)
    giou = generalized_box_iou_xyxy(box_cxcywh_to_xyxy(s), box_cxcywh_to_xyxy(t))  # (B, Q_s, Q_t)
    l1 = (s[:, :, None, :] - t[:, None, :, :]).abs().sum(dim=-1)  # (B, Q_s, Q_t)
    return mu_giou * giou - mu_l1 * l1


def match_teacher_queries(
    student_boxes_cxcywh: torch.Tensor,
    teacher_boxes_cxcywh: torch.Tensor,
    foreground: torch.Tensor | None = None,
    *,
    mu_giou: float = 2.0,
    mu_l1: float = 5.0,
    one_to_one: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher query k*(j) for each student query (Eq. 2.35).

    Args:
        student_boxes_cxcywh: (B, Q_s, 4) student final-layer boxes, normalised cxcywh.
        teacher_boxes_cxcywh: (B, Q_t, 4) teacher final-layer boxes, normalised cxcywh.
        foreground: optional (B, Q_s) bool mask of the selected student queries
            (:func:`select_foreground_queries`); default all queries.
        mu_giou: mu1.
        mu_l1: mu2.
        one_to_one: if False (default, the paper), each student query takes its argmax, so two
            student queries may share a teacher query. If True, the selected student queries of
            each image are assigned to distinct teacher queries by the Hungarian algorithm
            (``scipy``) maximising the same score; when an image selects more than Q_t queries the
            surplus stays unmatched.

    Returns:
        ``(teacher_index, matched)``: (B, Q_s) int64 teacher query indices (0 where unmatched)
        and the (B, Q_s) bool mask of matched pairs (= ``foreground`` unless ``one_to_one``
        leaves some unmatched) Ties (teacher queries with identical boxes) go to the
        lowest teacher index.

    Raises:
        ValueError: for boxes that are not (B, ·, 4) or a ``foreground`` of the wrong shape.

    Examples:
        >>> student = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]]])          # (1, 2, 4)
        >>> teacher = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3], [0.2, 0.2, 0.1, 0.1]]])
        >>> match_teacher_queries(student, teacher)
        (tensor([[2, 0]]), tensor([[True, True]]))
        >>> match_teacher_queries(student, teacher, torch.tensor([[True, False]]), one_to_one=True)
        (tensor([[2, 0]]), tensor([[ True, False]]))
    """
    score = teacher_matching_score(student_boxes_cxcywh, teacher_boxes_cxcywh, mu_giou, mu_l1)  # (B, Q_s, Q_t)
    bsz, num_student, _ = score.shape
    if foreground is None:
        foreground = torch.ones(bsz, num_student, dtype=torch.bool, device=score.device)
    elif foreground.shape != (bsz, num_student):
        raise ValueError(f"foreground must be (B, Q_s) = {(bsz, num_student)}, got {tuple(foreground.shape)}")
    if not one_to_one:
        return score.argmax(dim=-1), foreground.clone()

    teacher_index = torch.zeros(bsz, num_student, dtype=torch.int64)
    matched = torch.zeros(bsz, num_student, dtype=torch.bool)
    score_np = score.detach().double().cpu().numpy()
    foreground_np = foreground.cpu().numpy()
    for b in range(bsz):  # per image: the solver is sequential by nature
        rows = np.flatnonzero(foreground_np[b])
        if rows.size == 0:
            continue
        r, c = linear_sum_assignment(score_np[b, rows], maximize=True)
        teacher_index[b, rows[r]] = torch.from_numpy(c.astype(np.int64))
        matched[b, rows[r]] = True
    return teacher_index.to(score.device), matched.to(score.device)
