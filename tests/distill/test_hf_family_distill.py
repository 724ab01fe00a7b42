"""Q-DETR distillation on every tiny Hugging Face DETR-family detector (offline, CPU, seconds).

For each class of :data:`qdetr.tiny_hf_detr.TINY_HF_DETR_NAMES` with a decoder: the capture
finds one cross-attention per decoder layer and removes its hooks, is batch independent,
drops the denoising queries and extra query groups, gives a loss of exactly 0 between two
identical float models and a positive loss with gradients for a 4-bit student.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from qdetr.distill import (  # noqa: E402
    DistillationLoss,
    FrozenTeacher,
    capture_co_attention,
    find_decoder_cross_attention,
    insert_distribution_alignment,
)
from qdetr.quant import quantize_model  # noqa: E402
from qdetr.tiny_hf_detr import TINY_HF_DETR_NAMES, build_tiny_hf_detr  # noqa: E402

DECODER_MODELS = [name for name in TINY_HF_DETR_NAMES if name != "yolos"]
DENOISING = {"rt_detr", "rt_detr_v2", "d_fine", "deimv2"}
QUERY_GROUPS = {"lw_detr", "rf_detr"}
# transformers' DAB-DETR builds float32 tensors inside its decoder, so it cannot run in float64.
NO_FLOAT64 = {"dab_detr"}

NUM_LAYERS, NUM_QUERIES, WIDTH, BATCH = 3, 5, 32, 2


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _spread_boxes(model: nn.Module, seed: int = 0) -> None:
    """Fresh detectors predict nearly one box for every query; spread them so matching has no ties."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "bbox" in name and isinstance(module, nn.Linear) and module.out_features == 4:
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.5)


def _targets_near(boxes: torch.Tensor, count: int = 2) -> list[dict[str, torch.Tensor]]:
    """Ground truth on the first ``count`` predicted boxes of each image (so queries are foreground)."""
    return [
        {"class_labels": torch.ones(count, dtype=torch.int64), "boxes": boxes[b, :count].detach().clamp(0.05, 0.95)}
        for b in range(boxes.shape[0])
    ]


def _per_image(inputs: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Image ``index`` of a tiny batch (OmDet-Turbo's class prompts are stacked over the batch)."""
    out = {}
    for key, value in inputs.items():
        if key.startswith("classes_") and key != "classes_structure":
            counts = inputs["classes_structure"].tolist()
            start = sum(counts[:index])
            out[key] = value[start : start + counts[index]]
        else:
            out[key] = value[index : index + 1]
    return out


def _layer_prefix(attention_name: str) -> str:
    return re.match(r"^(.*\.layers\.\d+)\.", attention_name).group(1)


@pytest.mark.parametrize("name", DECODER_MODELS)
def test_capture_finds_each_decoder_layer_and_removes_its_hooks(name):
    tiny = build_tiny_hf_detr(name)
    model = tiny.model.eval()
    layers = find_decoder_cross_attention(model)
    assert len(layers) == NUM_LAYERS
    assert [_layer_prefix(n).rsplit(".", 1)[1] for n, _ in layers] == ["0", "1", "2"]
    baseline = _hooks(model)
    with capture_co_attention(model) as capture:
        assert _hooks(model) == baseline + NUM_LAYERS + 1
        with torch.no_grad():
            out = tiny.forward()
    assert _hooks(model) == baseline and not capture.active
    merged = capture.outputs(out)
    assert merged["co_attn_features"].shape == (NUM_LAYERS, BATCH, NUM_QUERIES, WIDTH)
    assert merged["pred_boxes"].shape == (BATCH, NUM_QUERIES, 4)
    # The hooks are also removed when the forward fails half-way through the decoder.
    def fail(module, args):
        raise RuntimeError("failed in the decoder")

    failing = layers[-1][1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="failed in the decoder"):
        with capture_co_attention(model), torch.no_grad():
            tiny.forward()
    failing.remove()
    assert _hooks(model) == baseline


@pytest.mark.parametrize("name", DECODER_MODELS)
def test_capture_is_batch_independent(name):
    dtype = torch.float32 if name in NO_FLOAT64 else torch.float64
    tiny = build_tiny_hf_detr(name, attn_implementation="eager")
    model = tiny.model.eval().to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny.inputs.items()}
    with torch.no_grad(), capture_co_attention(model) as capture:
        batch = capture.outputs(model(**inputs))["co_attn_features"]
    singles = []
    for index in range(BATCH):
        with torch.no_grad(), capture_co_attention(model) as capture:
            singles.append(capture.outputs(model(**_per_image(inputs, index)))["co_attn_features"])
    assert batch.dtype == dtype and batch.shape == (NUM_LAYERS, BATCH, NUM_QUERIES, WIDTH)
    torch.testing.assert_close(batch, torch.cat(singles, dim=1))
    assert not torch.equal(singles[0], singles[1])  # the two images do give different features


@pytest.mark.parametrize("name", sorted(DENOISING | QUERY_GROUPS))
def test_training_outputs_keep_the_matching_queries_only(name):
    tiny = build_tiny_hf_detr(name)
    with capture_co_attention(tiny.model) as capture:
        out = tiny.forward(with_labels=True)
    all_queries = capture.features.shape[2]
    merged = capture.outputs(out)
    if name in DENOISING:
        num_denoising, num_matching = out.denoising_meta_values["dn_num_split"]
        assert num_matching == NUM_QUERIES and num_denoising > 0
        assert all_queries == num_denoising + NUM_QUERIES
        kept = slice(num_denoising, None)
    else:
        assert all_queries == tiny.model.config.group_detr * NUM_QUERIES
        kept = slice(0, NUM_QUERIES)
    assert merged["co_attn_features"].shape == (NUM_LAYERS, BATCH, NUM_QUERIES, WIDTH)
    torch.testing.assert_close(merged["co_attn_features"], capture.features[:, :, kept])
    for key in ("pred_boxes", "logits", "last_hidden_state"):
        assert merged[key].shape[1] == NUM_QUERIES, key
        torch.testing.assert_close(merged[key], out[key][:, kept])
    # The model's loss and its auxiliary and encoder outputs are passed through untouched.
    for key in ("loss", "auxiliary_outputs", "enc_outputs_class"):
        assert merged[key] is out[key], key
    # In eval mode the same model runs its matching queries only and nothing is sliced.
    tiny.model.eval()
    with torch.no_grad(), capture_co_attention(tiny.model) as capture:
        out = tiny.forward()
    assert capture.features.shape[2] == NUM_QUERIES
    assert capture.query_slice(out) == slice(0, NUM_QUERIES)


@pytest.mark.parametrize("name", DECODER_MODELS)
def test_identical_float_models_give_exactly_zero_loss(name):
    # Eager attention: the student pass (autograd) and the teacher pass (no_grad) run the same kernels.
    tiny = build_tiny_hf_detr(name, attn_implementation="eager")
    _spread_boxes(tiny.model)
    student = tiny.model.eval()
    teacher = FrozenTeacher(copy.deepcopy(student))
    with capture_co_attention(student) as capture:
        outputs = capture.outputs(tiny.forward())
    losses = DistillationLoss(layers=(0, 1, 2))(outputs, teacher(**tiny.inputs), _targets_near(outputs["pred_boxes"]))
    assert losses["num_distilled"] > 0
    assert losses["loss_drd"].item() == 0.0


@pytest.mark.parametrize("name", DECODER_MODELS)
def test_quantized_student_gets_a_positive_loss_and_gradients(name):
    tiny = build_tiny_hf_detr(name)
    _spread_boxes(tiny.model)
    teacher = FrozenTeacher(copy.deepcopy(tiny.model))
    student = quantize_model(tiny.model, bits=4).train()
    teacher_baseline, student_baseline = _hooks(teacher.model), _hooks(student)
    teacher_outputs = teacher(**tiny.inputs)  # eval, no labels: no denoising queries
    with capture_co_attention(student) as capture:
        out = tiny.forward(with_labels=True)
    outputs = capture.outputs(out)
    assert outputs["co_attn_features"].shape == teacher_outputs["co_attn_features"].shape
    # Random-weight student and teacher select unrelated two-stage proposals; every query overlaps
    # a whole-image box, so foreground-aware matching has queries to pair by their boxes.
    whole_image = [{"boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]])} for _ in range(BATCH)]
    losses = DistillationLoss()(outputs, teacher_outputs, whole_image)
    assert losses["num_distilled"] > 0
    assert losses["loss_drd"].item() > 0
    total = losses["loss_drd"] + (out.loss if tiny.labels is not None else 0.0)
    total.backward()
    last = _layer_prefix(capture.layer_names[-1])
    grads = [p.grad for n, p in student.named_parameters() if n.startswith(last) and p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert (_hooks(teacher.model), _hooks(student)) == (teacher_baseline, student_baseline)


def test_encoder_only_detector_gets_a_clear_error():
    model = build_tiny_hf_detr("yolos").model
    with pytest.raises(ValueError, match="YolosForObjectDetection has no decoder.*does not apply"):
        capture_co_attention(model)
    with pytest.raises(ValueError, match="YolosForObjectDetection"):
        FrozenTeacher(model)


def test_dab_detr_distribution_alignment_reaches_the_projected_query():
    tiny = build_tiny_hf_detr("dab_detr")
    model = tiny.model.eval()
    names = insert_distribution_alignment(model, where="self")
    assert names == [f"model.decoder.layers.{i}.self_attn.self_attn" for i in range(NUM_LAYERS)]
    seen = []
    handles = [
        model.get_submodule(n).q_align.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
        for n in names
    ]
    with torch.no_grad():
        tiny.forward()
    for handle in handles:
        handle.remove()
    assert seen == [(BATCH, 2, NUM_QUERIES, WIDTH // 2)] * NUM_LAYERS  # (B, h, Q, d_h)
    assert "model.decoder.layers.0.self_attn.self_attn.q_align.weight" in model.state_dict()
    with pytest.raises(ValueError, match="already holds DistributionAlignment"):
        insert_distribution_alignment(model, where="self")
    # The hook standardises the query per head before the attention scales it: called directly
    # (random inputs; the tiny model's own values hardly differ between queries), the output
    # equals the plain attention on the aligned query and follows the affine.
    attention = model.get_submodule(names[-1])
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(BATCH, 7, WIDTH, generator=generator) for _ in range(3))
    align = attention.q_align
    aligned = align(query.view(BATCH, 7, 2, WIDTH // 2).transpose(1, 2)).transpose(1, 2).reshape(BATCH, 7, WIDTH)
    with torch.no_grad():
        hooked = attention(hidden_states=query, key_states=key, value_states=value)[0]
        attention.q_align = nn.Identity()
        plain = attention(hidden_states=aligned, key_states=key, value_states=value)[0]
        unaligned = attention(hidden_states=query, key_states=key, value_states=value)[0]
    torch.testing.assert_close(hooked, plain)
    assert not torch.allclose(hooked, unaligned)


@pytest.mark.parametrize("name", ["deformable_detr", "rt_detr", "d_fine", "lw_detr"])
def test_deformable_cross_attention_takes_no_alignment(name):
    with pytest.raises(ValueError, match="cross-attention is deformable.*where='self'"):
        insert_distribution_alignment(build_tiny_hf_detr(name).model, where="cross")


@pytest.mark.parametrize("name", ["deformable_detr", "rt_detr", "d_fine", "lw_detr", "table_transformer", "grounding_dino"])
def test_quantized_self_attention_takes_alignment(name):
    tiny = build_tiny_hf_detr(name)
    model = quantize_model(tiny.model, bits=4)
    names = insert_distribution_alignment(model, where="self")
    assert names == [f"model.decoder.layers.{i}.self_attn" for i in range(NUM_LAYERS)]
    model.train()
    out = tiny.forward(with_labels=True)
    out.loss.backward()
    align = model.get_submodule(names[-1]).q_align
    assert align.weight.grad is not None and align.weight.grad.abs().sum() > 0


def test_dab_detr_alignment_is_applied_once_whether_inserted_before_or_after_quantization():
    def aligned_then_quantized(order):
        tiny = build_tiny_hf_detr("dab_detr", attn_implementation="eager")
        model = tiny.model
        if order == "align first":
            insert_distribution_alignment(model, where="self")
            quantize_model(model, bits=4)
        else:
            quantize_model(model, bits=4)
            insert_distribution_alignment(model, where="self")
        calls = []
        for i in range(NUM_LAYERS):
            align = model.get_submodule(f"model.decoder.layers.{i}.self_attn.self_attn.q_align")
            align.register_forward_hook(lambda m, args, out: calls.append(1))
        model.train()
        torch.manual_seed(0)
        out = tiny.forward(with_labels=True)  # calibrates the quantizers
        return calls, out.pred_boxes

    calls_first, boxes_first = aligned_then_quantized("align first")
    calls_after, boxes_after = aligned_then_quantized("quantize first")
    assert len(calls_first) == len(calls_after) == NUM_LAYERS  # once per layer, not twice
    torch.testing.assert_close(boxes_first, boxes_after)


def test_quadrilateral_predictions_are_matched_by_their_enclosing_boxes():
    import transformers

    tiny = build_tiny_hf_detr("pp_doclayout_v4")
    model = tiny.model.eval()
    with torch.no_grad(), capture_co_attention(model) as capture:
        out = tiny.forward()
    merged = capture.outputs(out)
    assert out.pred_boxes.shape == (BATCH, NUM_QUERIES, 10)
    # Independent decoding: the model's own image processor turns quads into corners.
    corners = transformers.PPDocLayoutV4ImageProcessor()._quad_to_corners(out.pred_boxes)  # (B, Q, 4, 2)
    low, high = corners.amin(dim=-2), corners.amax(dim=-2)
    torch.testing.assert_close(merged["pred_boxes"], torch.cat([(low + high) / 2, high - low], dim=-1))
    assert merged["pred_quads"] is out.pred_boxes
