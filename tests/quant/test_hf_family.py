"""quantize_model on every Hugging Face DETR-family detector (tiny offline configs).

Per class: coverage (every float layer is expected, with its reason), calibration and
training with the model's own loss (gradients reach every quantizer step), at most 2^b
levels at every quantizer output (the deformable ones included), finite quantizer inputs
(RT-DETR's float-max anchors never reach one), eval after calibration, and float64 equality
with the float model when the quantizers are disabled (the replacement forwards compute what
transformers computes). Then: eager vs sdpa, all-or-nothing failures, keep_float subtrees,
shared modules and tied parameters.
"""

import copy
import re

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from qdetr.quant import (  # noqa: E402
    LSQActQuantizer,
    LSQWeightQuantizer,
    QuantConfig,
    QuantLinear,
    calibrate,
    quant_summary,
    quantize_model,
)
from qdetr.quant.attention_adapters import find_attention_adapter  # noqa: E402
from qdetr.quant.deformable_attention import QuantDeformableCore  # noqa: E402
from qdetr.tiny_hf_detr import TINY_HF_DETR_NAMES, build_tiny_hf_detr  # noqa: E402

# Name parts of the layers that stay float, per reason (policy.py says why).
HEADS = {"class_embed", "bbox_embed", "class_labels_classifier", "bbox_predictor"}
PROPOSAL = {"enc_output", "enc_score_head", "enc_bbox_head", "enc_out_class_embed", "enc_out_bbox_embed"}
QUERY_POS = {"query_pos_head", "ref_point_head", "query_scale", "ref_anchor_head"}
RESNET = {"shortcut", "input_projection"}
EXPECTED_FLOAT = {
    "detr": HEADS | RESNET,
    "conditional_detr": HEADS | RESNET | {"ref_point_head", "query_scale"},
    "deformable_detr": HEADS | {"shortcut", "input_proj", "reference_points"},
    "deformable_detr_two_stage": HEADS | {"shortcut", "input_proj", "enc_output", "pos_trans"},
    "dab_detr": HEADS | RESNET | {"ref_point_head", "query_scale", "ref_anchor_head"},
    "table_transformer": HEADS | RESNET,
    "rt_detr": HEADS | {"shortcut", "enc_output", "enc_score_head", "enc_bbox_head", "query_pos_head"},
    "rt_detr_v2": HEADS | {"shortcut", "enc_output", "enc_score_head", "enc_bbox_head", "query_pos_head"},
    "d_fine": HEADS | PROPOSAL - {"enc_out_class_embed", "enc_out_bbox_embed"}
    | {"shortcut", "query_pos_head", "pre_bbox_head", "lqe_layers"},
    "deimv2": HEADS | PROPOSAL - {"enc_out_class_embed", "enc_out_bbox_embed"}
    | {"shortcut", "query_pos_head", "pre_bbox_head", "lqe_layers"},
    # HGNetV2 backbone: its stage downsample is a depthwise conv (float by default, as residual downsamples)
    "pp_doclayout_v2": HEADS | {"downsample", "enc_output", "enc_score_head", "enc_bbox_head", "query_pos_head"},
    "pp_doclayout_v3": HEADS | {"downsample", "enc_output", "enc_score_head", "enc_bbox_head", "query_pos_head"},
    "pp_doclayout_v4": HEADS | {"downsample", "enc_output", "enc_score_head", "enc_bbox_head", "query_pos_head"},
    "lw_detr": HEADS | {"enc_output", "enc_out_class_embed", "enc_out_bbox_embed", "ref_point_head"},
    "rf_detr": HEADS | {"enc_output", "enc_out_class_embed", "enc_out_bbox_embed", "ref_point_head"},
    "grounding_dino": HEADS | {"shortcut", "input_proj", "enc_output", "encoder_output_bbox_embed", "reference_points_head"},
    "mm_grounding_dino": HEADS
    | {"shortcut", "input_proj", "enc_output", "encoder_output_bbox_embed", "reference_points_head"},
    "omdet_turbo": {"encoder_class_head", "encoder_bbox_head", "decoder_class_head", "decoder_bbox_head", "query_position_head"},
    "yolos": HEADS,
}
# Layers that transformers builds (checkpoints carry them) but never calls: PP-DocLayoutV2's
# reading-order encoder keeps rel_pos_x/y_bias although its spatial bias comes from another
# module, and PP-DocLayoutV4's order heads hold one projection per decoder layer but apply
# only the last. Their quantizers cannot run, as their float weights never do. (Unused float
# layers, such as the extra heads of two-stage Deformable DETR, carry no quantizer.)
UNUSED_BY_TRANSFORMERS = {
    "pp_doclayout_v2": {"rel_pos_x_bias", "rel_pos_y_bias"},
    "pp_doclayout_v4": {"successor_order_head.proj.0", "successor_order_head.proj.1",
                        "relative_order_head.proj.0", "relative_order_head.proj.1"},
}
DEFORMABLE = {
    "deformable_detr", "deformable_detr_two_stage", "rt_detr", "rt_detr_v2", "d_fine", "deimv2",
    "pp_doclayout_v2", "pp_doclayout_v3", "pp_doclayout_v4",
    "lw_detr", "rf_detr", "grounding_dino", "mm_grounding_dino", "omdet_turbo",
}


def _float_parts(summary, expected: set[str]) -> set[str]:
    """The expected name part explaining each float layer; unexplained layers as their full name."""
    found: set[str] = set()
    for name, status in summary.float_layers.items():
        parts = set(name.split("."))
        hit = parts & expected
        assert status.startswith("float: ") and "not quantized" not in status, (name, status)
        found |= hit if hit else {name}
    return found


def _layers_never_called(model: nn.Module, run) -> set[str]:
    """Names of the Linear / Conv2d layers of a float model that a training forward never calls."""
    model = copy.deepcopy(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    called: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: called.add(n)) for n, m in layers.items()]
    with torch.no_grad(), torch.random.fork_rng():  # the caller's random stream is untouched
        run(model)
    for h in hooks:
        h.remove()
    return set(layers) - called


def _levels_ok(x: torch.Tensor, axis: int, bits: int) -> bool:
    x = x.detach().movedim(axis, 0).reshape(x.shape[axis], -1)
    return all(torch.unique(row).numel() <= 2**bits for row in x)


def _all_levels_ok(out: torch.Tensor, q: LSQActQuantizer) -> bool:
    if not q.per_channel:
        return torch.unique(out.detach()).numel() <= 2**q.bits
    return _levels_ok(out, q._axis_for(out.dim()), q.bits)


def _outputs(out) -> torch.Tensor:
    """Boxes and class logits, (B, Q·4 + Q·C), from whichever names the class uses."""
    if hasattr(out, "pred_boxes"):
        return torch.cat([out.pred_boxes.flatten(1), out.logits.flatten(1)], dim=1)
    return torch.cat([out.decoder_coord_logits.flatten(1), out.decoder_class_logits.flatten(1)], dim=1)


def _loss_without_labels(out) -> torch.Tensor:
    """Sum of the finite entries of every output the graph reaches (boxes, logits, reading order, masks)."""
    tensors = [v for v in out.values() if torch.is_tensor(v) and v.is_floating_point() and v.requires_grad]
    return sum(v[torch.isfinite(v)].sum() for v in tensors)


def _run(model, inputs):
    """Forward without OmDet-Turbo's text-embedding cache (it would replay embeddings of an earlier call)."""
    for m in model.modules():
        for attr in ("language_cache_class", "language_cache_prompt"):
            if hasattr(m, attr):
                getattr(m, attr).cache.clear()
                getattr(m, attr).current_load = 0
    return _outputs(model(**inputs))


@pytest.mark.parametrize("name", TINY_HF_DETR_NAMES)
def test_quantizes_trains_and_evaluates(name):
    torch.manual_seed(0)
    tiny = build_tiny_hf_detr(name)
    never_called = _layers_never_called(tiny.model, lambda m: _run(m, tiny.inputs))
    model = quantize_model(tiny.model, bits=4)
    quantized = {n.rpartition(".")[0] for n, q in model.named_modules() if isinstance(q, LSQActQuantizer)}
    unused = never_called & quantized
    expected_unused = UNUSED_BY_TRANSFORMERS.get(name, set())
    assert {n for n in unused if not any(n.endswith(e) for e in expected_unused)} == set()
    assert all(any(n.endswith(e) for n in unused) for e in expected_unused)
    summary = quant_summary(model)

    # coverage: attention fully reached, every float layer expected (and every expectation used)
    quantized, total = summary.coverage["attention"]
    assert quantized == total > 0
    found = _float_parts(summary, EXPECTED_FLOAT[name])
    assert found <= EXPECTED_FLOAT[name], f"unexpected float layers: {sorted(found - EXPECTED_FLOAT[name])}"
    assert name == "omdet_turbo" or found & HEADS  # the prediction heads stay float, as in the paper
    if name in DEFORMABLE:
        cores = [m for m in model.modules() if isinstance(m, QuantDeformableCore)]
        assert cores and all(c.sampled_quantizer.bits == 8 for c in cores)
        row = next(r for r in summary.layers if r.kind == "attention" and r.name.endswith(("encoder_attn", "cross_attn")))
        assert row.attn_bits == "8" and row.status.startswith("quantized")

    # a training step with the model's own loss calibrates and reaches every step
    inputs_seen: dict[str, bool] = {}

    def record(name):
        def hook(module, args):  # returns None: the input is not replaced
            x = args[0].detach()
            ok = bool(torch.isfinite(x).all()) and float(x.abs().max()) < 1e6
            inputs_seen[name] = inputs_seen.get(name, True) and ok

        return hook

    hooks = [
        q.register_forward_pre_hook(record(n))
        for n, q in model.named_modules()
        if isinstance(q, LSQActQuantizer) and n.rpartition(".")[0] not in unused
    ]
    out = tiny.forward(with_labels=True)
    loss = out.loss if tiny.labels is not None else _loss_without_labels(out)
    loss.backward()
    for h in hooks:
        h.remove()
    acts = {
        n: q for n, q in model.named_modules() if isinstance(q, LSQActQuantizer) and n.rpartition(".")[0] not in unused
    }
    assert set(inputs_seen) == set(acts), f"quantizers never run: {sorted(set(acts) - set(inputs_seen))[:5]}"
    bad = [n for n, ok in inputs_seen.items() if not ok]  # no float-max anchor (or inf / nan) reaches a quantizer
    assert not bad, bad[:5]
    for n, q in acts.items():
        assert q.is_initialized, n
        parent = model.get_submodule(n.rpartition(".")[0])
        if isinstance(getattr(parent, "weight", None), nn.Parameter) and parent.weight.requires_grad:
            if parent.weight.grad is None:  # off the loss graph in the float model too (OmDet's detached scorer)
                continue
        assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all(), n
    for n, q in model.named_modules():
        if isinstance(q, LSQWeightQuantizer):
            parent = model.get_submodule(n.rpartition(".")[0])
            assert q.scale.grad is not None or (parent.weight.requires_grad and parent.weight.grad is None), n

    # eval after calibration: at most 2^b levels at every quantizer's output
    model.eval()
    levels: dict[str, bool] = {}
    def count(name):
        def hook(module, args, output):  # returns None: the output is not replaced
            levels[name] = levels.get(name, True) and _all_levels_ok(output, module)

        return hook

    hooks = [q.register_forward_hook(count(n)) for n, q in acts.items()]
    with torch.no_grad():
        out = tiny.forward()
    for h in hooks:
        h.remove()
    assert not torch.isnan(_outputs(out)).any()  # (grounding logits are -inf beyond the prompt)
    bad = [n for n, ok in levels.items() if not ok]
    assert not bad, f"more than 2^b levels at {bad[:5]}"
    if name in DEFORMABLE:
        assert any(n.endswith("sampled_quantizer") for n in levels)
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.weight_quantizer is not None:
            assert _levels_ok(module.quantized_weight(), 0, module.weight_quantizer.bits)


# transformers' DAB-DETR builds its sine position embeddings in float32 and cannot run in float64.
FLOAT32_ONLY = {"dab_detr"}


def _dtype(name: str) -> torch.dtype:
    return torch.float32 if name in FLOAT32_ONLY else torch.float64


def _double_inputs(tiny):
    dtype = _dtype(tiny.name)
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tiny.inputs.items()}
    if "pixel_mask" in inputs:  # real padding: the masks must survive quantization
        inputs["pixel_mask"] = inputs["pixel_mask"].clone()
        inputs["pixel_mask"][1, :, 24:] = 0
    return inputs


@pytest.mark.parametrize("name", TINY_HF_DETR_NAMES)
def test_float64_with_quantizers_disabled_matches_the_float_model(name):
    tiny = build_tiny_hf_detr(name)
    model = tiny.model.to(_dtype(name)).eval()
    inputs = _double_inputs(tiny)
    reference = copy.deepcopy(model)
    quantize_model(model, bits=4)
    calibrate(model, [inputs], forward_fn=_run)  # in eval mode: batch-norm statistics stay as they are
    with torch.no_grad():
        quantized = _run(model, inputs)
        for q in model.modules():
            if isinstance(q, (LSQActQuantizer, LSQWeightQuantizer)):
                q.enabled = False
        disabled = _run(model, inputs)
        expected = _run(reference, inputs)
    assert quantized.dtype == _dtype(name) and not torch.isnan(quantized).any()
    tol = 1e-5 if name in FLOAT32_ONLY else 1e-9
    torch.testing.assert_close(disabled, expected, atol=tol, rtol=0)
    assert not torch.allclose(quantized, expected, atol=1e-6)  # the quantizers do change the result


@pytest.mark.parametrize("name", ["rt_detr", "grounding_dino", "yolos"])
def test_eager_and_sdpa_quantize_to_the_same_model(name):
    results = []
    for implementation in ("eager", "sdpa"):
        tiny = build_tiny_hf_detr(name, seed=1, attn_implementation=implementation)
        model = quantize_model(tiny.model.double(), bits=4)
        inputs = _double_inputs(tiny)
        calibrate(model.eval(), [inputs])
        with torch.no_grad():
            out = _outputs(model(**inputs))
        results.append((str(quant_summary(model)), out))
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- all-or-nothing


def _state(model: nn.Module):
    modules = [(n, id(m), type(m)) for n, m in model.named_modules()]
    params = {n: (id(p), p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)}
    configs = [(m.config._attn_implementation, id(m.config)) for m in model.modules() if hasattr(m, "config")]
    return modules, params, configs, sorted(vars(model))


def _assert_same(before, after):
    assert before[0] == after[0]
    assert before[2] == after[2] and before[3] == after[3]
    assert before[1].keys() == after[1].keys()
    for n, (pid, value) in before[1].items():
        assert after[1][n][0] == pid and torch.equal(after[1][n][1], value), n


class UnknownAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(32, 32)

    def forward(self, x):
        return self.q(x)


def test_failed_calls_leave_an_hf_model_unchanged_and_a_retry_works(monkeypatch):
    tiny = build_tiny_hf_detr("rt_detr")
    model = tiny.model
    before = _state(model)

    model.model.extra_attention = UnknownAttention()
    with pytest.raises(NotImplementedError, match="extra_attention"):
        quantize_model(model, bits=4)
    del model.model.extra_attention
    _assert_same(before, _state(model))

    with pytest.raises(ValueError, match="matched no"):
        quantize_model(model, config=QuantConfig(bits=4, keep_float=("model.no_such_module*",)))
    _assert_same(before, _state(model))
    with pytest.raises(ValueError, match="matched no"):
        quantize_model(model, config=QuantConfig(bits=4, overrides={"model.decoder.layers.*.norm*": 8}))
    _assert_same(before, _state(model))

    # a failure in the middle of the surgery (after attention and layers were already swapped)
    calls = {"n": 0}
    original = QuantDeformableCore.__init__

    def failing_init(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure")
        original(self, *args, **kwargs)

    monkeypatch.setattr(QuantDeformableCore, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="simulated"):
        quantize_model(model, bits=4)
    monkeypatch.undo()
    _assert_same(before, _state(model))
    assert model.config._attn_implementation == "sdpa"

    quantize_model(model, bits=4)  # the retry works
    assert quant_summary(model).coverage["attention"] == (7, 7)
    assert model.model.decoder.layers[0].self_attn.config._attn_implementation == "qdetr_fake_quant"
    tiny.forward(with_labels=True).loss.backward()


def test_keep_float_on_a_deformable_attention_protects_its_children():
    tiny = build_tiny_hf_detr("rt_detr_v2")
    cls = type(tiny.model.model.decoder.layers[0].encoder_attn)
    model = quantize_model(tiny.model, config=QuantConfig(bits=4, keep_float=("*.layers.0.encoder_attn",)))
    kept = model.model.decoder.layers[0].encoder_attn
    assert type(kept) is cls and all(type(c) is nn.Linear for c in kept.children())
    assert not any(isinstance(m, (LSQActQuantizer, LSQWeightQuantizer)) for m in kept.modules())
    float_layers = quant_summary(model).float_layers
    assert "keep_float" in float_layers["model.decoder.layers.0.encoder_attn"]
    assert isinstance(model.model.decoder.layers[1].encoder_attn.value_proj, QuantLinear)
    tiny.forward(with_labels=True).loss.backward()


def test_shared_modules_and_tied_parameters_stay_shared():
    tiny = build_tiny_hf_detr("deformable_detr_two_stage")
    model = tiny.model

    def groups(m):
        by_id: dict[int, list[str]] = {}
        for n, p in m.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(n)
        return sorted(sorted(v) for v in by_id.values() if len(v) > 1)

    tied = groups(model)
    assert tied, "the two-stage model ties its heads"
    quantize_model(model, bits=4)
    assert groups(model) == tied

    shared = nn.Linear(16, 16)
    seq = nn.Sequential(shared, nn.ReLU(), shared)
    quantize_model(seq, bits=4)
    assert isinstance(seq[0], QuantLinear) and seq[0] is seq[2]


def test_attention_adapters_recognise_each_form():
    expected = {
        "detr": "hf_interface",
        "table_transformer": "hf_inline",
        "dab_detr": "hf_inline",
        "grounding_dino": "hf_inline",
        "rt_detr": "hf_deformable",
        "d_fine": "hf_deformable",
        "yolos": "hf_interface",
    }
    for name, adapter in expected.items():
        model = build_tiny_hf_detr(name).model
        names = {a.name for m in model.modules() if (a := find_attention_adapter(m)) is not None}
        assert adapter in names, name
    model = build_tiny_hf_detr("grounding_dino").model
    text_attn = model.model.text_backbone.encoder.layer[0].attention.self  # BERT (decorated forward)
    assert find_attention_adapter(text_attn).name == "hf_interface"


def test_pixel_padding_mask_survives_the_fake_quant_attention():
    tiny = build_tiny_hf_detr("detr")
    model = tiny.model.double().eval()
    inputs = _double_inputs(tiny)
    ref = copy.deepcopy(model)
    quantize_model(model, bits=4)
    for q in model.modules():
        if isinstance(q, (LSQActQuantizer, LSQWeightQuantizer)):
            q.enabled = False
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, atol=1e-9, rtol=0)
        unpadded = dict(inputs, pixel_mask=torch.ones_like(inputs["pixel_mask"]))
        assert not torch.allclose(model(**unpadded).logits, ref(**inputs).logits, atol=1e-6)
    assert re.search("qdetr_fake_quant", model.config._attn_implementation)


def test_an_unknown_deformable_core_is_reported_not_skipped():
    tiny = build_tiny_hf_detr("deformable_detr")
    attn = tiny.model.model.decoder.layers[0].encoder_attn

    class RefactoredMultiScaleDeformableAttention(nn.Module):  # a core whose signature changed
        def forward(self, value, spatial_shapes, sampling_locations, attention_weights):
            raise AssertionError("not called")

    attn.attn = RefactoredMultiScaleDeformableAttention()
    before = _state(tiny.model)
    with pytest.raises(NotImplementedError, match=r"layers\.0\.encoder_attn \(DeformableDetrMultiscaleDeformableAttention\)"):
        quantize_model(tiny.model, bits=4)
    _assert_same(before, _state(tiny.model))
    # keeping it float on purpose works, and protects its children
    quantize_model(tiny.model, config=QuantConfig(bits=4, keep_float=("model.decoder.layers.0.encoder_attn",)))
    assert type(attn.value_proj) is nn.Linear


@pytest.mark.parametrize("name", ["rt_detr_v2", "table_transformer"])
def test_quantized_model_deep_copies_and_round_trips_its_state_dict(name):
    tiny = build_tiny_hf_detr(name)
    model = quantize_model(tiny.model, bits=4)
    tiny.forward(with_labels=True)  # calibrates
    model.eval()
    other = quantize_model(build_tiny_hf_detr(name, seed=5).model, bits=4)
    other.load_state_dict(model.state_dict(), strict=True)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        expected = _outputs(model(**tiny.inputs))
        torch.testing.assert_close(_outputs(other.eval()(**tiny.inputs)), expected, atol=0, rtol=0)
        torch.testing.assert_close(_outputs(clone(**tiny.inputs)), expected, atol=0, rtol=0)
