"""Box conversions and GIoU against torchvision."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import generalized_box_iou

from qdetr.models.box_ops import (
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
