"""Small tensor operations shared by the models and the distillation loss (no qdetr imports).

:mod:`qdetr.ops.boxes` is the one implementation of box format conversion, IoU and GIoU;
:mod:`qdetr.models` (matcher, criterion, post-processing) and :mod:`qdetr.distill` (FQM)
both use it, so :mod:`qdetr.distill` needs neither :mod:`qdetr.models` nor :mod:`qdetr.quant`.
"""

from qdetr.ops.boxes import (
    box_cxcywh_to_xyxy,
    box_iou_xyxy,
    box_xyxy_to_cxcywh,
    check_boxes_xyxy,
    generalized_box_iou_xyxy,
    scale_boxes_xyxy,
)

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou_xyxy",
    "generalized_box_iou_xyxy",
    "check_boxes_xyxy",
    "scale_boxes_xyxy",
]
