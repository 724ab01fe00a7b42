"""Foreground selection and teacher matching against straightforward loop references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou

from qdetr.distill.fqm import (
    match_teacher_queries,
    select_foreground_queries,
    stack_target_boxes,
    teacher_matching_score,
)


def _xyxy(boxes_cxcywh):
    return box_convert(boxes_cxcywh, in_fmt="cxcywh", out_fmt="xyxy")


def reference_selection(student_boxes, targets, tau):
    """Eq. 2.34 written as loops: per image, per GT, per student query."""
    bsz, num_queries, _ = student_boxes.shape
    keep = torch.zeros(bsz, num_queries, dtype=torch.bool)
    for b in range(bsz):
        gt = targets[b]["boxes"]
        if gt.shape[0] == 0:
            continue
        giou = generalized_box_iou(_xyxy(gt), _xyxy(student_boxes[b]))  # (G, Q)
        for i in range(gt.shape[0]):
            best = max(float(giou[i, j]) for j in range(num_queries))
            if best <= 0:
                continue
            for j in range(num_queries):
                if float(giou[i, j]) > tau * best:
                    keep[b, j] = True
    return keep


def reference_argmax_matching(student_boxes, teacher_boxes, mu_giou, mu_l1):
    bsz, num_student, _ = student_boxes.shape
    index = torch.zeros(bsz, num_student, dtype=torch.int64)
    for b in range(bsz):
        giou = generalized_box_iou(_xyxy(student_boxes[b]), _xyxy(teacher_boxes[b]))
        for j in range(num_student):
            scores = [
                mu_giou * float(giou[j, k]) - mu_l1 * float((student_boxes[b, j] - teacher_boxes[b, k]).abs().sum())
                for k in range(teacher_boxes.shape[1])
            ]
            index[b, j] = int(np.argmax(scores))
    return index


def _targets(generator, random_boxes, counts):
    return [{"labels": torch.zeros(n, dtype=torch.int64), "boxes": random_boxes(generator, n)} for n in counts]


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_matches_loop_reference(random_boxes, tau, seed):
    g = torch.Generator().manual_seed(seed)
    student = random_boxes(g, 4, 30)
    targets = _targets(g, random_boxes, [3, 0, 7, 1])
    gt, valid = stack_target_boxes(targets)
    keep = select_foreground_queries(student, gt, valid, tau)
    expected = reference_selection(student, targets, tau)
    assert torch.equal(keep, expected)
    assert not keep[1].any()  # image without ground truth keeps nothing
    assert keep.any()


@pytest.mark.parametrize("num_teacher", [30, 17, 45])
def test_argmax_matching_matches_loop_reference(random_boxes, num_teacher):
    g = torch.Generator().manual_seed(3)
    student = random_boxes(g, 3, 30)
    teacher = random_boxes(g, 3, num_teacher)
    index, matched = match_teacher_queries(student, teacher, mu_giou=2.0, mu_l1=5.0)
    assert index.shape == (3, 30) and matched.all()
    assert torch.equal(index, reference_argmax_matching(student, teacher, 2.0, 5.0))
    # other weights
    index, _ = match_teacher_queries(student, teacher, mu_giou=1.0, mu_l1=0.5)
    assert torch.equal(index, reference_argmax_matching(student, teacher, 1.0, 0.5))


def test_matching_score_matches_formula(random_boxes):
    g = torch.Generator().manual_seed(4)
    student, teacher = random_boxes(g, 2, 5), random_boxes(g, 2, 6)
    score = teacher_matching_score(student, teacher, 2.0, 5.0)
    for b in range(2):
        giou = generalized_box_iou(_xyxy(student[b]), _xyxy(teacher[b]))
        l1 = torch.cdist(student[b], teacher[b], p=1)
        torch.testing.assert_close(score[b], 2.0 * giou - 5.0 * l1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_teacher", [30, 8])
def test_one_to_one_matches_hungarian_reference(random_boxes, num_teacher):
    g = torch.Generator().manual_seed(5)
    student = random_boxes(g, 3, 30)
    teacher = random_boxes(g, 3, num_teacher)
    targets = _targets(g, random_boxes, [4, 2, 0])
    gt, valid = stack_target_boxes(targets)
    foreground = select_foreground_queries(student, gt, valid, 0.3)
    index, matched = match_teacher_queries(student, teacher, foreground, one_to_one=True)
    for b in range(3):
        rows = torch.nonzero(foreground[b]).flatten().numpy()
        expected = torch.zeros(30, dtype=torch.bool)
        if rows.size:
            giou = generalized_box_iou(_xyxy(student[b]), _xyxy(teacher[b]))
            cost = 2.0 * giou - 5.0 * torch.cdist(student[b], teacher[b], p=1)
            r, c = linear_sum_assignment(cost[rows].numpy(), maximize=True)
            expected[rows[r]] = True
            assert torch.equal(index[b, rows[r]], torch.from_numpy(c).long())
            # distinct teacher queries
            assert len(set(index[b][matched[b]].tolist())) == int(matched[b].sum())
        assert torch.equal(matched[b], expected)
    assert not (matched & ~foreground).any()
    if num_teacher < int(foreground.sum(dim=1).max()):
        assert (foreground & ~matched).any()  # surplus queries stay unmatched


def test_hand_made_boxes_strict_threshold():
    # GT 0.5x0.5 centred; student 0: same box (GIoU 1), 1: 0.25x0.25 inside (IoU = GIoU = 0.25 exactly),
    # 2: far away (negative GIoU).
    gt = torch.tensor([[[0.5, 0.5, 0.5, 0.5]]], dtype=torch.float64)
    valid = torch.ones(1, 1, dtype=torch.bool)
    student = torch.tensor(
        [[[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.25, 0.25], [0.05, 0.05, 0.05, 0.05]]], dtype=torch.float64
    )
    assert select_foreground_queries(student, gt, valid, 0.24).tolist() == [[True, True, False]]
    assert select_foreground_queries(student, gt, valid, 0.25).tolist() == [[True, False, False]]  # strict >
    assert select_foreground_queries(student, gt, valid, 1.0).tolist() == [[False, False, False]]
    assert select_foreground_queries(student, gt, valid, 0.0).tolist() == [[True, True, False]]


def test_ground_truth_with_nonpositive_best_giou_keeps_nothing():
    # The only GT is far from every student box: G_i < 0, so even tau = 0 keeps nothing
    # (without the G_i > 0 rule, tau * G_i < 0 would keep the less-negative queries).
    gt = torch.tensor([[[0.9, 0.9, 0.05, 0.05]]], dtype=torch.float64)
    student = torch.tensor([[[0.1, 0.1, 0.1, 0.1], [0.3, 0.3, 0.1, 0.1]]], dtype=torch.float64)
    keep = select_foreground_queries(student, gt, torch.ones(1, 1, dtype=torch.bool), 0.0)
    assert not keep.any()


def test_degenerate_boxes_stay_finite():
    student = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.0, 0.1]]])
    teacher = torch.tensor([[[0.1, 0.1, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]])
    score = teacher_matching_score(student, teacher)
    assert torch.isfinite(score).all()
    index, _ = match_teacher_queries(student, teacher)
    assert index.tolist() == [[1, 0]]


def test_stack_target_boxes_pads_and_masks():
    targets = [{"boxes": torch.rand(2, 4)}, {"boxes": torch.zeros(0, 4)}, {"boxes": torch.rand(3, 4)}]
    gt, valid = stack_target_boxes(targets)
    assert gt.shape == (3, 3, 4)
    assert valid.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert torch.equal(gt[0, :2], targets[0]["boxes"])
    gt, valid = stack_target_boxes([{"boxes": torch.zeros(0, 4)}])
    assert gt.shape == (1, 1, 4) and not valid.any()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="has no 'boxes'"):
        stack_target_boxes([{"labels": torch.zeros(1)}])
    with pytest.raises(ValueError, match=r"\(G, 4\)"):
        stack_target_boxes([{"boxes": torch.zeros(3, 5)}])
    with pytest.raises(ValueError, match="batch sizes differ"):
        match_teacher_queries(torch.rand(2, 5, 4), torch.rand(3, 5, 4))
    with pytest.raises(ValueError, match=r"\(B, Q, 4\)"):
        select_foreground_queries(torch.rand(5, 4), torch.rand(1, 1, 4), torch.ones(1, 1, dtype=torch.bool))
