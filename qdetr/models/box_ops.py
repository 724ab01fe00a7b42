"""Box conversions and pairwise overlap measures.

Every name carries the box format it expects:

* ``cxcywh``: (centre x, centre y, width, height), the DETR regression target (normalised to
  [0, 1] by the image size);
* ``xyxy``: (x0, y0, x1, y1), used for IoU and for the post-processed absolute boxes.

The format conversions and the pairwise IoU come from :mod:`torchvision.ops`; the generalized
IoU is written out so that it accepts degenerate boxes produced early in training without
asserting on them (the caller decides, see :func:`check_boxes_xyxy`).
"""

from __future__ import annotations

import torch
from torchvision.ops import box_convert, box_iou

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou_xyxy",
    "generalized_box_iou_xyxy",
    "check_boxes_xyxy",
    "scale_boxes_xyxy",
]


def box_cxcywh_to_xyxy(boxes_cxcywh: torch.Tensor) -> torch.Tensor:
    """Convert (..., 4) cxcywh boxes to (..., 4) xyxy boxes.

    Args:
        boxes_cxcywh: (..., 4) boxes as (centre x, centre y, width, height), normalised
            cxcywh or in pixels.

    Returns:
        (..., 4) xyxy boxes in the same units (normalised xyxy, or absolute xyxy).

    Examples:
        >>> import torch
        >>> from qdetr.models import box_cxcywh_to_xyxy
        >>> box_cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.25, 0.5]])).tolist()
        [[0.375, 0.25, 0.625, 0.75]]
    """
    return box_convert(boxes_cxcywh, in_fmt="cxcywh", out_fmt="xyxy")


def box_xyxy_to_cxcywh(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """Convert (..., 4) xyxy boxes to (..., 4) cxcywh boxes.

    Args:
        boxes_xyxy: (..., 4) boxes as (x0, y0, x1, y1), normalised or absolute xyxy.

    Returns:
        (..., 4) cxcywh boxes in the same units.

    Examples:
        >>> import torch
        >>> from qdetr.models import box_xyxy_to_cxcywh
        >>> box_xyxy_to_cxcywh(torch.tensor([[0.375, 0.25, 0.625, 0.75]])).tolist()
        [[0.5, 0.5, 0.25, 0.5]]
    """
    return box_convert(boxes_xyxy, in_fmt="xyxy", out_fmt="cxcywh")


def box_iou_xyxy(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU.

    Args:
        boxes1_xyxy: (N, 4) xyxy boxes.
        boxes2_xyxy: (M, 4) xyxy boxes.

    Returns:
        (N, M) IoU matrix.

    Examples:
        >>> import torch
        >>> from qdetr.models import box_iou_xyxy
        >>> boxes1_xyxy = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
        >>> boxes2_xyxy = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 2.0], [3.0, 3.0, 4.0, 4.0]])
        >>> box_iou_xyxy(boxes1_xyxy, boxes2_xyxy).tolist()
        [[1.0, 0.5, 0.0]]
    """
    return box_iou(boxes1_xyxy, boxes2_xyxy)


def generalized_box_iou_xyxy(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al., 2019), in [-1, 1].

    Args:
        boxes1_xyxy: (N, 4) xyxy boxes with x1 >= x0 and y1 >= y0.
        boxes2_xyxy: (M, 4) xyxy boxes with x1 >= x0 and y1 >= y0.

    Returns:
        (N, M) GIoU matrix. Computed in the inputs' dtype; differentiable.

    Examples:
        >>> import torch
        >>> from qdetr.models import generalized_box_iou_xyxy
        >>> boxes1_xyxy = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
        >>> boxes2_xyxy = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 2.0], [3.0, 3.0, 4.0, 4.0]])
        >>> generalized_box_iou_xyxy(boxes1_xyxy, boxes2_xyxy).tolist()  # disjoint boxes go below 0
        [[1.0, 0.5, -0.6875]]
    """
    area1 = (boxes1_xyxy[:, 2] - boxes1_xyxy[:, 0]) * (boxes1_xyxy[:, 3] - boxes1_xyxy[:, 1])  # (N,)
    area2 = (boxes2_xyxy[:, 2] - boxes2_xyxy[:, 0]) * (boxes2_xyxy[:, 3] - boxes2_xyxy[:, 1])  # (M,)

    lt = torch.max(boxes1_xyxy[:, None, :2], boxes2_xyxy[None, :, :2])  # (N, M, 2)
    rb = torch.min(boxes1_xyxy[:, None, 2:], boxes2_xyxy[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    union = area1[:, None] + area2[None, :] - inter
    iou = inter / union

    lt_hull = torch.min(boxes1_xyxy[:, None, :2], boxes2_xyxy[None, :, :2])
    rb_hull = torch.max(boxes1_xyxy[:, None, 2:], boxes2_xyxy[None, :, 2:])
    wh_hull = (rb_hull - lt_hull).clamp(min=0)
    area_hull = wh_hull[..., 0] * wh_hull[..., 1]
    return iou - (area_hull - union) / area_hull


def check_boxes_xyxy(boxes_xyxy: torch.Tensor, name: str = "boxes") -> None:
    """Raise ``ValueError`` if any (..., 4) xyxy box has x1 < x0 or y1 < y0 or is not finite."""
    if not torch.isfinite(boxes_xyxy).all():
        raise ValueError(f"{name} contain NaN or inf; check the model outputs or the targets")
    if (boxes_xyxy[..., 2:] < boxes_xyxy[..., :2]).any():
        raise ValueError(
            f"{name} have x1 < x0 or y1 < y0; boxes must be xyxy (convert cxcywh with box_cxcywh_to_xyxy)"
        )


def scale_boxes_xyxy(boxes_xyxy: torch.Tensor, sizes_hw: torch.Tensor) -> torch.Tensor:
    """Scale normalised xyxy boxes to absolute pixels.

    Args:
        boxes_xyxy: (B, N, 4) boxes normalised to [0, 1].
        sizes_hw: (B, 2) image sizes as (height, width).

    Returns:
        (B, N, 4) absolute xyxy boxes.
    """
    h, w = sizes_hw.to(boxes_xyxy.dtype).unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1)  # (B, 4)
    return boxes_xyxy * scale[:, None, :]
