"""FrozenTeacher: eval mode, no gradients, outside the optimizer, hooks removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdetr.distill import FrozenTeacher


class StudentWithTeacher(nn.Module):
    def __init__(self, student, teacher):
        super().__init__()
        self.student = student
        self.teacher = FrozenTeacher(teacher)


def test_teacher_stays_frozen_inside_a_training_student(toy_detector):
    student, teacher = toy_detector(seed=0), toy_detector(seed=1)
    wrapper = StudentWithTeacher(student, teacher)
    wrapper.train()
    assert student.training
    assert not wrapper.teacher.training and not teacher.training
    assert all(not m.training for m in teacher.modules())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in wrapper.parameters()}
    assert not any(k.startswith("teacher") for k in wrapper.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()  # even when the model itself is switched
    out = wrapper.teacher(torch.randn(2, 16, 8))
    assert not teacher.training
    assert not out["co_attn_features"].requires_grad and out["co_attn_features"].grad_fn is None


def test_teacher_moves_with_its_parent(toy_detector):
    wrapper = StudentWithTeacher(toy_detector(seed=0), toy_detector(seed=1))
    wrapper.double()
    assert all(p.dtype == torch.float64 for p in wrapper.teacher.model.parameters())
    out = wrapper.teacher(torch.randn(1, 16, 8, dtype=torch.float64))
    assert out["pred_boxes"].dtype == torch.float64


def test_teacher_is_deterministic_despite_dropout():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    teacher = FrozenTeacher(model, capture="native")
    teacher.train()
    x = torch.randn(3, 4)
    assert torch.equal(teacher(x), teacher(x))


def test_teacher_argument_errors(toy_detector):
    with pytest.raises(ValueError, match="capture must be one of"):
        FrozenTeacher(toy_detector(), capture="maybe")
    with pytest.raises(ValueError, match="feature must be one of"):
        FrozenTeacher(toy_detector(), feature="values")
    with pytest.raises(ValueError, match="no decoder cross-attention"):
        FrozenTeacher(nn.Linear(2, 2), capture="hooks")
