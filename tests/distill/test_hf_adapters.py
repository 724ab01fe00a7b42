"""Hugging Face DETR / ConditionalDETR through the hook adapter (tiny configs, no download)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qdetr.distill import (
    DistillationLoss,
    FrozenTeacher,
    capture_co_attention,
    find_decoder_cross_attention,
)

pytest.importorskip("transformers")

KINDS = ["detr", "conditional_detr"]


def _pixels(bsz=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, 3, 64, 64, generator=g)


def _hooks_left(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _targets_near(pred_boxes, counts):
    return [
        {"class_labels": torch.ones(n, dtype=torch.int64), "boxes": pred_boxes[b, :n].detach().clamp(0.05, 0.95)}
        for b, n in enumerate(counts)
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_capture_records_attention_values_before_output_projection(hf_detector, kind):
    model = hf_detector(kind)
    model.config._attn_implementation = "eager"  # to get the attention probabilities back
    model.eval()
    names = [name for name, _ in find_decoder_cross_attention(model)]
    assert names == ["model.decoder.layers.0.encoder_attn", "model.decoder.layers.1.encoder_attn"]
    model(pixel_values=_pixels(), output_attentions=True)  # transformers may install its own recorders
    baseline = _hooks_left(model)
    with capture_co_attention(model) as capture:
        assert _hooks_left(model) == baseline + 3
        out = model(pixel_values=_pixels(), output_attentions=True)
    assert _hooks_left(model) == baseline
    outputs = capture.outputs(out)
    feats = outputs["co_attn_features"]
    assert feats.shape == (2, 2, 10, 32)
    assert torch.equal(outputs["pred_boxes"], out.pred_boxes)
    # Independent check on the last layer: A @ v_proj(memory), heads concatenated.
    attn = model.model.decoder.layers[-1].encoder_attn
    probs = out.cross_attentions[-1]  # (B, h, Q, S)
    values = attn.v_proj(out.encoder_last_hidden_state).view(2, -1, 4, 8).transpose(1, 2)  # (B, h, S, d_h)
    expected = torch.matmul(probs, values).transpose(1, 2).reshape(2, 10, 32)
    torch.testing.assert_close(feats[-1], expected, rtol=1e-5, atol=1e-6)

    with capture_co_attention(model, feature="proj_out") as capture:
        model(pixel_values=_pixels())
    proj = capture.outputs({"pred_boxes": out.pred_boxes})["co_attn_proj_features"]
    torch.testing.assert_close(proj[-1], attn.o_proj(feats[-1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_end_to_end_training_step(hf_detector, kind):
    student = hf_detector(kind, seed=0)
    teacher = FrozenTeacher(hf_detector(kind, seed=1))
    baseline = _hooks_left(student), _hooks_left(teacher.model)
    assert teacher.capture == "hooks"
    distill = DistillationLoss(tau=0.3, layers=(-2, -1))
    x = _pixels(3)
    student.train()
    with torch.no_grad():
        boxes = student(pixel_values=x).pred_boxes
    targets = _targets_near(boxes, [2, 0, 3])
    with capture_co_attention(student) as capture:
        out = student(pixel_values=x, labels=targets)
    losses = distill(capture.outputs(out), teacher(pixel_values=x), targets)
    assert losses["num_distilled"] > 0
    (out.loss + losses["loss_drd"]).backward()
    attn = student.model.decoder.layers[-1].encoder_attn
    assert attn.v_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert (_hooks_left(student), _hooks_left(teacher.model)) == baseline


@pytest.mark.parametrize("kind", KINDS)
def test_same_model_gives_zero_loss(hf_detector, kind):
    model = hf_detector(kind).eval()
    # Eager attention: the student pass (with autograd) and the teacher pass (no_grad) then run
    # the same kernels and give bit-identical outputs (SDPA may pick different kernels).
    model.config._attn_implementation = "eager"
    teacher = FrozenTeacher(copy.deepcopy(model))
    x = _pixels(2)
    with capture_co_attention(model) as capture:
        out = model(pixel_values=x)
    targets = _targets_near(out.pred_boxes, [3, 1])
    losses = DistillationLoss(layers=(0, 1))(capture.outputs(out), teacher(pixel_values=x), targets)
    assert losses["num_distilled"] > 0
    assert losses["loss_drd"].item() == 0.0


def test_hf_student_and_qfd_term(hf_detector):
    student, teacher = hf_detector(seed=0).eval(), FrozenTeacher(hf_detector(seed=1))
    x = _pixels(2)
    with capture_co_attention(student) as capture:
        out = student(pixel_values=x)
    targets = _targets_near(out.pred_boxes, [1, 1])
    losses = DistillationLoss(qfd_weight=0.5)(capture.outputs(out), teacher(pixel_values=x), targets)
    assert losses["loss_qfd"] > 0


def test_capture_errors(hf_detector):
    model = hf_detector()
    with capture_co_attention(model) as capture:
        pass
    with pytest.raises(RuntimeError, match="run the model's forward inside"):
        capture.features
    with pytest.raises(ValueError, match="no decoder cross-attention"):
        capture_co_attention(nn.Linear(2, 2))

    torch_decoder = nn.Module()
    torch_decoder.decoder = nn.Module()
    torch_decoder.decoder.layers = nn.ModuleList([nn.Module()])
    torch_decoder.decoder.layers[0].multihead_attn = nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="MultiheadAttention.from_torch"):
        capture_co_attention(torch_decoder)
    with pytest.raises(ValueError, match="feature must be one of"):
        capture_co_attention(model, feature="values")


def test_capture_on_qdetr_attention_matches_native_features(toy_detector):
    # The hook path and the native key agree on qdetr.layers.MultiheadAttention.
    model = toy_detector().eval()
    x = torch.randn(2, 16, 8)
    with capture_co_attention(model) as capture:
        out = model(x)
    torch.testing.assert_close(capture.features, out["co_attn_features"])
