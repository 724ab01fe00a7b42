"""Box conversions and pairwise overlap measures.

Every name carries the box format it expects:

* ``cxcywh``: (centre x, centre y, width, height), the DETR regression target (normalised to
  [0, 1] by the image size);
* ``xyxy``: (x0, y0, x1, y1), used for IoU and for the post-processed absolute boxes.

The format conversions and the pairwise IoU come from :mod:`torchvision.ops`. The generalized
IoU is written out (DETR's ``generalized_box_iou`` arithmetic, which is also torchvision's)
for two reasons: it is batched (``(..., N, 4) x (..., M, 4) -> (..., N, M)``, which FQM needs
per image), and it keeps degenerate boxes finite. A saturated sigmoid can give zero-area
boxes; two of them have a zero union and a zero enclosing area, where the plain formula gives
NaN. Both areas are clamped to the smallest normal float, which changes nothing wherever they
are non-zero (values and gradients are bit-identical to the plain formula there) and gives a
finite GIoU otherwise. The caller decides whether to reject such boxes
(:func:`check_boxes_xyxy`).

This module is the only implementation in qdetr: :mod:`qdetr.models` (matcher, criterion,
post-processing) and :mod:`qdetr.distill.fqm` import it.
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
        >>> from qdetr.ops import box_cxcywh_to_xyxy
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
        >>> from qdetr.ops import box_xyxy_to_cxcywh
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
        >>> from qdetr.ops import box_iou_xyxy
        >>> boxes1_xyxy = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
        >>> boxes2_xyxy = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 2.0], [3.0, 3.0, 4.0, 4.0]])
        >>> box_iou_xyxy(boxes1_xyxy, boxes2_xyxy).tolist()
        [[1.0, 0.5, 0.0]]
    """
    return box_iou(boxes1_xyxy, boxes2_xyxy)


def generalized_box_iou_xyxy(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al., 2019), in [-1, 1], batched over leading axes.

    Args:
        boxes1_xyxy: (..., N, 4) xyxy boxes with x1 >= x0 and y1 >= y0.
        boxes2_xyxy: (..., M, 4) xyxy boxes, same leading axes.

    Returns:
        (..., N, M) GIoU. Computed in the inputs' dtype; differentiable; finite for degenerate
        (zero-area) boxes (see the module docstring).

    Examples:
        >>> import torch
        >>> from qdetr.ops import generalized_box_iou_xyxy
        >>> boxes1_xyxy = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
        >>> boxes2_xyxy = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 2.0], [3.0, 3.0, 4.0, 4.0]])
        >>> generalized_box_iou_xyxy(boxes1_xyxy, boxes2_xyxy).tolist()  # disjoint boxes go below 0
        [[1.0, 0.5, -0.6875]]
        >>> point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])                   # a zero-area box
        >>> generalized_box_iou_xyxy(point, point).tolist()
        [[0.0]]
        >>> generalized_box_iou_xyxy(torch.rand(2, 3, 4).sort(-1).values, torch.rand(2, 5, 4).sort(-1).values).shape
        torch.Size([2, 3, 5])
    """
    tiny = torch.finfo(boxes1_xyxy.dtype).tiny
    area1 = (boxes1_xyxy[..., 2] - boxes1_xyxy[..., 0]) * (boxes1_xyxy[..., 3] - boxes1_xyxy[..., 1])  # (..., N)
    area2 = (boxes2_xyxy[..., 2] - boxes2_xyxy[..., 0]) * (boxes2_xyxy[..., 3] - boxes2_xyxy[..., 1])  # (..., M)
    a = boxes1_xyxy[..., :, None, :]  # (..., N, 1, 4)
    b = boxes2_xyxy[..., None, :, :]  # (..., 1, M, 4)

    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)  # (..., N, M, 2)
    inter = wh[..., 0] * wh[..., 1]  # (..., N, M)
    union = (area1[..., :, None] + area2[..., None, :] - inter).clamp(min=tiny)
    iou = inter / union

    wh_hull = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    area_hull = (wh_hull[..., 0] * wh_hull[..., 1]).clamp(min=tiny)
    return iou - (area_hull - union) / area_hull


def check_boxes_xyxy(boxes_xyxy: torch.Tensor, name: str = "boxes") -> None:
    """Raise ``ValueError`` if any (..., 4) xyxy box has x1 < x0 or y1 < y0 or is not finite.

    Examples:
        >>> import torch
        >>> from qdetr.ops import check_boxes_xyxy
        >>> check_boxes_xyxy(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
        >>> check_boxes_xyxy(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
        Traceback (most recent call last):
        ...
        ValueError: boxes have x1 < x0 or y1 < y0; boxes must be xyxy (convert cxcywh with box_cxcywh_to_xyxy)
    """
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

    Examples:
        >>> import torch
        >>> from qdetr.ops import scale_boxes_xyxy
        >>> scale_boxes_xyxy(torch.tensor([[[0.5, 0.5, 1.0, 1.0]]]), torch.tensor([[100, 200]])).tolist()
        [[[100.0, 50.0, 200.0, 100.0]]]
    """
    h, w = sizes_hw.to(boxes_xyxy.dtype).unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1)  # (B, 4)
    return boxes_xyxy * scale[:, None, :]
