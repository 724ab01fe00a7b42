"""DistillationLoss: values, gradients, batch independence, empty targets and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from qdetr.distill import (
    DistillationConfig,
    DistillationLoss,
    FrozenTeacher,
    fake_quantize_teacher_4bit,
    insert_distribution_alignment,
    match_teacher_queries,
    select_foreground_queries,
    stack_target_boxes,
)


def _targets_from(boxes_per_image):
    return [{"labels": torch.zeros(len(b), dtype=torch.int64), "boxes": b} for b in boxes_per_image]


def _targets_near(pred_boxes, counts, seed=0):
    """Targets close to some predicted boxes, so that selection keeps queries."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for b, n in enumerate(counts):
        idx = torch.randperm(pred_boxes.shape[1], generator=g)[:n]
        noise = 0.02 * torch.randn(n, 4, generator=g, dtype=pred_boxes.dtype)
        boxes = (pred_boxes[b, idx].detach() + noise).clamp(0.05, 0.95)
        targets.append({"labels": torch.zeros(n, dtype=torch.int64), "boxes": boxes})
    return targets


def _tokens(bsz, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, 16, 8, generator=g, dtype=dtype)


def test_zero_when_student_and_teacher_are_the_same_model(toy_detector):
    model = toy_detector().double().eval()
    x = _tokens(3)
    targets = _targets_near(model(x)["pred_boxes"], [3, 1, 2])
    student_out = model(x)
    teacher_out = FrozenTeacher(copy.deepcopy(model))(x)
    for one_to_one in (False, True):
        losses = DistillationLoss(one_to_one=one_to_one, layers=(-2, -1))(student_out, teacher_out, targets)
        assert losses["num_distilled"] > 0
        assert losses["loss_drd"].item() == 0.0


def test_value_matches_hand_computation():
    # Two images, 3 student queries, 2 teacher queries, 2 layers, d = 2.
    gt = [torch.tensor([[0.3, 0.3, 0.2, 0.2]]), torch.tensor([[0.7, 0.7, 0.2, 0.2]])]
    s_boxes = torch.tensor(
        [
            [[0.3, 0.3, 0.2, 0.2], [0.8, 0.2, 0.1, 0.1], [0.31, 0.3, 0.2, 0.2]],
            [[0.7, 0.7, 0.2, 0.2], [0.1, 0.9, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]],
        ]
    )
    t_boxes = torch.tensor([[[0.8, 0.2, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]], [[0.7, 0.7, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    s_feat = torch.arange(2 * 2 * 3 * 2, dtype=torch.float32).reshape(2, 2, 3, 2)
    t_feat = torch.zeros(2, 2, 2, 2)
    t_feat[:, 0, 1] = torch.tensor([1.0, 1.0])  # image 0, teacher query 1
    t_feat[:, 1, 0] = torch.tensor([-2.0, 0.0])  # image 1, teacher query 0
    student = {"pred_boxes": s_boxes, "co_attn_features": s_feat}
    teacher = {"pred_boxes": t_boxes, "co_attn_features": t_feat}
    # tau = 0.5: image 0 keeps queries 0 and 2 (both matched to teacher 1), image 1 keeps query 0 (teacher 0).
    pairs = [(0, 0, 1), (0, 2, 1), (1, 0, 0)]
    for layers in [(-1,), (0,), (0, 1)]:
        expected = torch.stack(
            [torch.linalg.vector_norm(s_feat[l, b, j] - t_feat[l, b, k]) for l in layers for b, j, k in pairs]
        ).mean()
        losses = DistillationLoss(weight=2.5, layers=layers)(student, teacher, _targets_from(gt))
        torch.testing.assert_close(losses["loss_drd"], 2.5 * expected)
        assert losses["num_distilled"].item() == 3
        assert losses["frac_distilled"].item() == pytest.approx(3 / 6)


def test_gradients_reach_student_and_alignment_never_teacher(toy_detector):
    student = toy_detector(seed=0)
    names = insert_distribution_alignment(student, where="cross")
    assert len(names) == 2
    teacher_model = toy_detector(seed=1)
    teacher = FrozenTeacher(teacher_model)
    x = _tokens(2, dtype=torch.float32)
    student.train()
    out = student(x)
    targets = _targets_near(out["pred_boxes"], [2, 3])
    losses = DistillationLoss()(out, teacher(x), targets)
    assert losses["num_distilled"] > 0
    losses["loss_drd"].backward()
    align = student.decoder.layers[-1].multihead_attn.q_align
    assert align.weight.grad is not None and align.weight.grad.abs().sum() > 0
    assert align.bias.grad is not None and align.bias.grad.abs().sum() > 0
    assert student.decoder.layers[-1].multihead_attn.in_proj_weight.grad.abs().sum() > 0
    assert student.backbone.weight.grad.abs().sum() > 0
    # Box head only feeds the (detached) selection and matching.
    assert student.bbox_embed.weight.grad is None
    assert all(p.grad is None and not p.requires_grad for p in teacher_model.parameters())


def test_teacher_outputs_with_grad_are_detached(toy_detector):
    student, teacher = toy_detector(seed=0), toy_detector(seed=1)
    x = _tokens(2, dtype=torch.float32)
    s_out, t_out = student(x), teacher(x)  # teacher not frozen, not under no_grad
    losses = DistillationLoss(tau=0.0)(s_out, t_out, _targets_near(s_out["pred_boxes"], [2, 2]))
    losses["loss_drd"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_batch_loss_is_the_pair_weighted_mean_of_per_image_losses(toy_detector):
    student, teacher = toy_detector(seed=0).double().eval(), toy_detector(seed=1, num_queries=9).double().eval()
    x = _tokens(3)
    s_out, t_out = student(x), teacher(x)
    targets = _targets_near(s_out["pred_boxes"], [3, 0, 2])
    loss_fn = DistillationLoss(layers=(0, -1))
    batch = loss_fn(s_out, t_out, targets)

    per_image, counts = [], []
    for b in range(3):
        xb = x[b : b + 1]
        single = loss_fn(student(xb), teacher(xb), targets[b : b + 1])  # B = 1 forward
        per_image.append(single["loss_drd"])
        counts.append(single["num_distilled"])
    counts = torch.stack(counts)
    assert counts.sum() == batch["num_distilled"]
    assert counts[1] == 0 and per_image[1].item() == 0.0
    expected = (torch.stack(per_image) * counts).sum() / counts.sum()
    torch.testing.assert_close(batch["loss_drd"], expected, rtol=1e-10, atol=1e-12)


def test_targets_without_boxes_give_exact_zero_and_finite_gradients(toy_detector):
    student, teacher = toy_detector(seed=0), toy_detector(seed=1)
    x = _tokens(2, dtype=torch.float32)
    s_out = student(x)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    losses = DistillationLoss()(s_out, FrozenTeacher(teacher)(x), empty)
    assert losses["loss_drd"].item() == 0.0
    assert losses["num_distilled"].item() == 0 and losses["frac_distilled"].item() == 0.0
    assert losses["loss_drd"].requires_grad  # still attached to the student's graph (DDP)
    losses["loss_drd"].backward()
    grad = student.decoder.layers[-1].multihead_attn.in_proj_weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() == 0


def test_different_query_counts_and_one_to_one(toy_detector):
    student, teacher = toy_detector(seed=0, num_queries=12), toy_detector(seed=1, num_queries=5)
    x = _tokens(2, dtype=torch.float32)
    s_out, t_out = student(x), FrozenTeacher(teacher)(x)
    targets = _targets_near(s_out["pred_boxes"], [4, 4])
    argmax = DistillationLoss(tau=0.0)(s_out, t_out, targets)
    hungarian = DistillationLoss(tau=0.0, one_to_one=True)(s_out, t_out, targets)
    assert torch.isfinite(argmax["loss_drd"]) and torch.isfinite(hungarian["loss_drd"])
    assert 0 < hungarian["num_distilled"] <= 2 * 5  # at most Q_teacher pairs per image
    assert hungarian["num_distilled"] <= argmax["num_distilled"]


def test_loss_follows_selection_and_matching(toy_detector):
    student, teacher = toy_detector(seed=0).double(), toy_detector(seed=1).double()
    x = _tokens(2)
    s_out, t_out = student(x), teacher(x)
    targets = _targets_near(s_out["pred_boxes"], [2, 3])
    gt, valid = stack_target_boxes(targets)
    keep = select_foreground_queries(s_out["pred_boxes"], gt, valid, 0.5)
    index, matched = match_teacher_queries(s_out["pred_boxes"], t_out["pred_boxes"], keep)
    diffs = []
    for b, j in torch.nonzero(matched).tolist():
        s_feat = s_out["co_attn_features"][-1, b, j]
        t_feat = t_out["co_attn_features"][-1, b, index[b, j]]
        diffs.append(torch.linalg.vector_norm(s_feat - t_feat))
    expected = torch.stack(diffs).mean()
    torch.testing.assert_close(DistillationLoss()(s_out, t_out, targets)["loss_drd"], expected)


def test_proj_out_feature_reads_its_own_key():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    feats = torch.ones(1, 1, 1, 4)
    student = {"pred_boxes": boxes, "co_attn_proj_features": feats}
    teacher = {"pred_boxes": boxes, "co_attn_proj_features": 3 * feats}
    losses = DistillationLoss(feature="proj_out")(student, teacher, _targets_from([boxes[0]]))
    assert losses["loss_drd"].item() == pytest.approx(4.0)  # ||(-2, -2, -2, -2)||
    with pytest.raises(KeyError, match="co_attn_features"):
        DistillationLoss()(student, teacher, _targets_from([boxes[0]]))


def test_qfd_term_is_off_by_default_and_matches_formula(toy_detector):
    student, teacher = toy_detector(seed=0), toy_detector(seed=1)
    x = _tokens(2, dtype=torch.float32)
    s_out, t_out = student(x), FrozenTeacher(teacher)(x)
    targets = _targets_near(s_out["pred_boxes"], [1, 1])
    assert "loss_qfd" not in DistillationLoss()(s_out, t_out, targets)
    losses = DistillationLoss(qfd_weight=0.5)(s_out, t_out, targets)
    q = fake_quantize_teacher_4bit(t_out["last_hidden_state"])
    assert q.unique().numel() <= 16
    torch.testing.assert_close(losses["loss_qfd"], 0.5 * torch.mean((q - s_out["last_hidden_state"]) ** 2))
    with pytest.raises(KeyError, match="last_hidden_state"):
        DistillationLoss(qfd_weight=0.5)({k: v for k, v in s_out.items() if k != "last_hidden_state"}, t_out, targets)


def test_fake_quantize_teacher_4bit_closed_form():
    x = torch.tensor([-1.0, -0.2, 0.0, 0.3, 2.0])
    step = 2 * x.abs().mean() / 7**0.5
    zero = torch.round(0.1 * (x.min() + 8 * step))
    expected = (torch.round(torch.clamp(x / step + zero, -8, 7)) - zero) * step
    torch.testing.assert_close(fake_quantize_teacher_4bit(x), expected)


def _outputs(bsz=2, queries=4, layers=2, dim=8):
    return {
        "pred_boxes": torch.rand(bsz, queries, 4) * 0.5 + 0.25,
        "co_attn_features": torch.randn(layers, bsz, queries, dim),
    }


def test_mismatched_inputs_raise_clear_errors():
    targets = _targets_from([torch.rand(2, 4) * 0.5 + 0.25, torch.rand(1, 4) * 0.5 + 0.25])
    loss_fn = DistillationLoss()
    with pytest.raises(ValueError, match="feature sizes differ"):
        loss_fn(_outputs(dim=8), _outputs(dim=16), targets)
    with pytest.raises(ValueError, match="batch sizes differ"):
        loss_fn(_outputs(bsz=2), _outputs(bsz=3), targets)
    with pytest.raises(ValueError, match="one dict per image"):
        loss_fn(_outputs(), _outputs(), targets[:1])
    with pytest.raises(ValueError, match="one dict per image"):
        loss_fn(_outputs(), _outputs(), targets[0])
    with pytest.raises(KeyError, match="teacher outputs have no 'co_attn_features'.*capture_co_attention"):
        loss_fn(_outputs(), {"pred_boxes": torch.rand(2, 4, 4)}, targets)
    with pytest.raises(KeyError, match="student outputs have no 'pred_boxes'"):
        loss_fn({"co_attn_features": torch.randn(2, 2, 4, 8)}, _outputs(), targets)
    with pytest.raises(ValueError, match="out of range"):
        DistillationLoss(layers=(2,))(_outputs(layers=2), _outputs(layers=3), targets)
    with pytest.raises(ValueError, match="same forward pass"):
        bad = _outputs()
        bad["pred_boxes"] = torch.rand(2, 5, 4)
        loss_fn(bad, _outputs(), targets)
    with pytest.raises(ValueError, match=r"\(L_dec, B, Q, d\)"):
        loss_fn({"pred_boxes": torch.rand(2, 4, 4), "co_attn_features": torch.randn(2, 4, 8)}, _outputs(), targets)


def test_student_and_teacher_with_different_depths_use_their_own_last_layer():
    targets = _targets_from([torch.tensor([[0.5, 0.5, 0.4, 0.4]])])
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4]]])
    student = {"pred_boxes": boxes, "co_attn_features": torch.zeros(2, 1, 1, 3)}
    teacher_feats = torch.zeros(4, 1, 1, 3)
    teacher_feats[-1] = 1.0
    teacher = {"pred_boxes": boxes, "co_attn_features": teacher_feats}
    assert DistillationLoss()(student, teacher, targets)["loss_drd"].item() == pytest.approx(3**0.5)


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="tau must be in"):
        DistillationLoss(tau=1.5)
    with pytest.raises(ValueError, match="weight must be >= 0"):
        DistillationLoss(weight=-1)
    with pytest.raises(ValueError, match="feature must be one of"):
        DistillationLoss(feature="values")
    with pytest.raises(ValueError, match="layers must"):
        DistillationLoss(layers=())
    with pytest.raises(ValueError, match="must not repeat"):
        DistillationLoss(layers=(-1, -1))
    config = DistillationConfig(tau=0.3, layers=(-2, -1), one_to_one=True)
    assert DistillationConfig.from_dict(config.to_dict()) == config
    assert DistillationLoss(config=config).config == config
    assert DistillationLoss(layers=-1).config.layers == (-1,)
    with pytest.raises(ValueError, match="unknown DistillationConfig fields"):
        DistillationConfig.from_dict({"tau": 0.5, "lamda": 1.0})
