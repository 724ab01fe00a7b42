"""Box conversions and GIoU against torchvision."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import generalized_box_iou

from qdetr.ops.boxes import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    check_boxes_xyxy,
    generalized_box_iou_xyxy,
    scale_boxes_xyxy,
)


def test_round_trip_and_known_values():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)


def test_giou_matches_torchvision_and_bounds():
    gen = torch.Generator().manual_seed(0)
    a = box_cxcywh_to_xyxy(torch.rand(6, 4, generator=gen) * 0.5 + 0.1)
    b = box_cxcywh_to_xyxy(torch.rand(4, 4, generator=gen) * 0.5 + 0.1)
    g = generalized_box_iou_xyxy(a, b)
    torch.testing.assert_close(g, generalized_box_iou(a, b))
    assert (g <= 1).all() and (g >= -1).all()
    torch.testing.assert_close(torch.diag(generalized_box_iou_xyxy(a, a)), torch.ones(6))


def test_scale_and_check():
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 0.5]]])
    torch.testing.assert_close(scale_boxes_xyxy(boxes, torch.tensor([[100, 200]])), torch.tensor([[[0.0, 0.0, 200.0, 50.0]]]))
    with pytest.raises(ValueError, match="xyxy"):
        check_boxes_xyxy(torch.tensor([[0.5, 0.5, 0.1, 0.1]]))


def _plain_giou(boxes1, boxes2):
    """DETR's generalized_box_iou, without any clamping of the areas."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return inter / union - (area - union) / area


def test_giou_is_the_reference_formula_on_proper_boxes_and_finite_on_degenerate_ones():
    torch.manual_seed(0)
    boxes1 = box_cxcywh_to_xyxy(torch.rand(7, 4, dtype=torch.float64) * 0.5 + 0.1)
    boxes2 = box_cxcywh_to_xyxy(torch.rand(5, 4, dtype=torch.float64) * 0.5 + 0.1)
    assert torch.equal(generalized_box_iou_xyxy(boxes1, boxes2), _plain_giou(boxes1, boxes2))
    # batched: each image on its own
    batched = generalized_box_iou_xyxy(torch.stack([boxes1, boxes1.flip(0)]), torch.stack([boxes2, boxes2]))
    assert torch.equal(batched[0], _plain_giou(boxes1, boxes2))
    assert torch.equal(batched[1], _plain_giou(boxes1.flip(0), boxes2))
    # zero-area boxes (a saturated sigmoid): the plain formula gives NaN, this one stays finite
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    assert torch.isnan(_plain_giou(point, point)).all()
    giou = generalized_box_iou_xyxy(point, point)
    giou.sum().backward()
    assert torch.isfinite(giou).all() and torch.isfinite(point.grad).all()


def test_distillation_uses_the_same_box_operations():
    import qdetr.distill.fqm as fqm
    import qdetr.ops.boxes as boxes

    assert fqm.generalized_box_iou_xyxy is boxes.generalized_box_iou_xyxy
    assert fqm.box_cxcywh_to_xyxy is boxes.box_cxcywh_to_xyxy
