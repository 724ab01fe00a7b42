"""Distillation on qdetr's own DETR / SMCA-DETR (native output keys) and on a quantized HF DETR."""

from __future__ import annotations

import copy

import pytest
import torch

from qdetr.distill import DistillationLoss, FrozenTeacher, capture_co_attention, insert_distribution_alignment
from qdetr.models import build_criterion, create_model
from qdetr.quant import quantize_model

MODELS = ["detr_tiny", "smca_detr_tiny"]


def _pixels(bsz=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, 3, 64, 64, generator=g)


def _targets_near(pred_boxes, counts, label_key="labels"):
    return [
        {label_key: torch.ones(n, dtype=torch.int64), "boxes": pred_boxes[b, :n].detach().clamp(0.05, 0.95)}
        for b, n in enumerate(counts)
    ]


@pytest.mark.parametrize("name", MODELS)
def test_same_model_gives_zero_loss(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    teacher = FrozenTeacher(copy.deepcopy(model))
    assert teacher.capture == "native"
    x = _pixels()
    out = model(x)
    targets = _targets_near(out["pred_boxes"], [3, 2])
    losses = DistillationLoss(layers=(0, -1))(out, teacher(x), targets)
    assert losses["num_distilled"] > 0
    assert losses["loss_drd"].item() == 0.0


@pytest.mark.parametrize("name", MODELS)
def test_quantized_student_training_step(name):
    torch.manual_seed(0)
    student = create_model(name)
    quantize_model(student, bits=4)
    aligned = insert_distribution_alignment(student, where="cross")
    assert len(aligned) == 2
    torch.manual_seed(1)
    teacher = FrozenTeacher(create_model(name))
    criterion = build_criterion(student.config)
    distill = DistillationLoss(tau=0.5, weight=1.0)

    x = _pixels(3)
    student.train()
    with torch.no_grad():
        boxes = student(x)["pred_boxes"]  # first training forward also calibrates the quantizers
    targets = _targets_near(boxes, [2, 0, 1])
    outputs = student(x)
    losses = criterion(outputs, targets)
    losses.update(distill(outputs, teacher(x), targets))
    assert losses["num_distilled"] > 0
    total = criterion.total_loss(losses) + losses["loss_drd"]
    total.backward()

    align = student.transformer.decoder.layers[-1].multihead_attn.q_align
    assert align.weight.grad is not None and align.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    teacher_ids = {id(p) for p in teacher.model.parameters()}
    assert not teacher_ids & {id(p) for p in student.parameters()}


def test_teacher_with_more_queries_and_layers():
    torch.manual_seed(0)
    student = create_model("detr_tiny")
    teacher = FrozenTeacher(create_model("detr_tiny", num_queries=15, dec_layers=3))
    x = _pixels()
    outputs = student(x)
    t_out = teacher(x)
    assert t_out["co_attn_features"].shape[:3] == (3, 2, 15)
    losses = DistillationLoss(tau=0.0)(outputs, t_out, _targets_near(outputs["pred_boxes"], [1, 1]))
    assert losses["num_distilled"] > 0 and torch.isfinite(losses["loss_drd"])
    with pytest.raises(ValueError, match="feature sizes differ"):
        wide = FrozenTeacher(create_model("detr_tiny", hidden_dim=64))
        DistillationLoss()(outputs, wide(x), _targets_near(outputs["pred_boxes"], [1, 1]))


def test_quantized_hugging_face_detr_with_alignment(hf_detector):
    student = hf_detector(seed=0)
    quantize_model(student, bits=4)
    aligned = insert_distribution_alignment(student, where="cross")
    assert aligned == ["model.decoder.layers.0.encoder_attn", "model.decoder.layers.1.encoder_attn"]
    teacher = FrozenTeacher(hf_detector(seed=1))
    x = _pixels(2)
    student.train()
    with torch.no_grad():
        boxes = student(pixel_values=x).pred_boxes
    targets = _targets_near(boxes, [2, 2], label_key="class_labels")
    with capture_co_attention(student) as capture:
        out = student(pixel_values=x, labels=targets)
    losses = DistillationLoss()(capture.outputs(out), teacher(pixel_values=x), targets)
    assert losses["num_distilled"] > 0
    (out.loss + losses["loss_drd"]).backward()
    align = student.model.decoder.layers[-1].encoder_attn.q_align
    assert align.weight.grad is not None and align.weight.grad.abs().sum() > 0
