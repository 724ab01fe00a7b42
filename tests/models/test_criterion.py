"""Set criterion: loss forms, edge cases and overfitting one image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qdetr.models import build_criterion, create_model
from qdetr.testing import example_inputs, example_targets


@pytest.mark.parametrize("name", ["detr_tiny", "smca_detr_tiny"])
def test_loss_keys_and_aux_suffixes(name):
    model = create_model(name).eval()
    criterion = build_criterion(model.config)
    pixel_values, pixel_mask = example_inputs(2)
    losses = criterion(model(pixel_values, pixel_mask), example_targets(2))
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"):
        assert key in losses and torch.isfinite(losses[key])
    assert "class_error" in losses and "cardinality_error" in losses
    total = criterion.total_loss(losses)
    expected = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    torch.testing.assert_close(total, expected)
    assert criterion.weight_dict["loss_ce"] == (2.0 if "smca" in name else 1.0)


def test_softmax_ce_uses_eos_weight():
    criterion = build_criterion(create_model("detr_tiny").config)
    logits = torch.randn(1, 10, 6)
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(1, 10, 4) * 0.3 + 0.3}
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    loss = criterion(outputs, empty)["loss_ce"]
    weight = torch.ones(6)
    weight[-1] = 0.1
    torch.testing.assert_close(loss, F.cross_entropy(logits[0], torch.full((10,), 5), weight))


def test_focal_loss_no_object_column_always_negative():
    criterion = build_criterion(create_model("smca_detr_tiny").config)
    logits = torch.randn(1, 10, 6)
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(1, 10, 4) * 0.3 + 0.3}
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    loss = criterion(outputs, empty)
    # All-negative targets; num_boxes clamps to 1.
    p = logits.sigmoid()
    expected = (0.75 * p**2 * -(torch.log1p(-p))).sum()
    torch.testing.assert_close(loss["loss_ce"], expected, rtol=1e-4, atol=1e-5)
    assert loss["loss_bbox"] == 0 and loss["loss_giou"] == 0


def test_more_targets_than_queries_is_finite():
    model = create_model("detr_tiny", num_queries=3).eval()
    criterion = build_criterion(model.config)
    losses = criterion(model(*example_inputs(1)), example_targets(1, boxes_per_image=8))
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("name", ["detr_tiny", "smca_detr_tiny"])
def test_overfitting_one_image_decreases_the_loss(name):
    torch.manual_seed(0)
    model = create_model(name, dropout=0.0).train()
    criterion = build_criterion(model.config)
    pixel_values, pixel_mask = example_inputs(sizes_hw=[(64, 64)])
    targets = example_targets(1, boxes_per_image=2, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    history = []
    for _ in range(40):
        loss = criterion.total_loss(criterion(model(pixel_values, pixel_mask), targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], history
