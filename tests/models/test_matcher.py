"""Hungarian matcher: optimality, edge cases, cost forms."""

from __future__ import annotations

import itertools

import pytest
import torch

from qdetr.models import HungarianMatcher
from qdetr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou_xyxy
from qdetr.testing import example_targets


def _outputs(bs=2, q=5, c=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.cat([torch.rand(bs, q, 2, generator=gen) * 0.6 + 0.2, torch.rand(bs, q, 2, generator=gen) * 0.3 + 0.05], -1)
    return {"pred_logits": torch.randn(bs, q, c, generator=gen), "pred_boxes": boxes}


@pytest.mark.parametrize("classification", ["softmax", "sigmoid"])
def test_assignment_is_optimal_against_brute_force(classification):
    outputs = _outputs(bs=2, q=5)
    targets = example_targets(2, num_classes=3, boxes_per_image=[3, 2], seed=1)
    matcher = HungarianMatcher(2.0, 5.0, 2.0, classification=classification)
    indices = matcher(outputs, targets)
    cost = matcher.cost_matrix(outputs, targets)
    offset = 0
    for b, (rows, cols) in enumerate(indices):
        n = len(targets[b]["labels"])
        block = cost[b, :, offset : offset + n]
        offset += n
        best = min(
            sum(block[q, t].item() for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), n)
        )
        assert len(rows) == n
        assert torch.equal(rows, rows.sort().values)
        assert block[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def test_softmax_and_focal_cost_formulas():
    outputs = _outputs(bs=1, q=3, c=4)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.1, 0.3]])}]
    logits, boxes = outputs["pred_logits"][0], outputs["pred_boxes"][0]
    geo = 5 * torch.cdist(boxes, targets[0]["boxes"], p=1) - 2 * generalized_box_iou_xyxy(
        box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(targets[0]["boxes"])
    )
    soft = HungarianMatcher(1.0, 5.0, 2.0).cost_matrix(outputs, targets)[0]
    torch.testing.assert_close(soft, -logits.softmax(-1)[:, [1, 2]] + geo)
    focal = HungarianMatcher(2.0, 5.0, 2.0, classification="sigmoid").cost_matrix(outputs, targets)[0]
    p = logits.sigmoid()[:, [1, 2]]
    expected = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p**2 * -(1 - p + 1e-8).log()
    torch.testing.assert_close(focal, 2 * expected + geo)


def test_no_targets_gives_empty_indices():
    outputs = _outputs(bs=2)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    indices = HungarianMatcher()(outputs, [empty, empty])
    assert all(len(r) == 0 and len(c) == 0 and r.dtype == torch.int64 for r, c in indices)
    # Mixed: one image without targets.
    targets = [empty, example_targets(1, num_classes=3, boxes_per_image=2)[0]]
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices[0][0]) == 0
    assert len(indices[1][0]) == 2


def test_more_targets_than_queries():
    outputs = _outputs(bs=1, q=3)
    targets = example_targets(1, num_classes=3, boxes_per_image=7)
    rows, cols = HungarianMatcher()(outputs, targets)[0]
    assert len(rows) == 3 and len(set(cols.tolist())) == 3
    assert sorted(rows.tolist()) == [0, 1, 2]


def test_matcher_errors():
    outputs = _outputs(bs=2)
    with pytest.raises(ValueError, match="one dict per image"):
        HungarianMatcher()(outputs, example_targets(1))
    with pytest.raises(ValueError, match="classification"):
        HungarianMatcher(classification="softmx")
    bad = example_targets(2, num_classes=3)
    bad[0]["boxes"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        HungarianMatcher()(outputs, bad)
    with pytest.raises(KeyError, match="labels"):
        HungarianMatcher()(outputs, [{"boxes": torch.zeros(1, 4)}] * 2)
