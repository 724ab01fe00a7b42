"""QDQ ONNX export: structure, onnxruntime agreement, integer kernels, dynamic shapes, errors, CLI."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from torch import nn

import qdetr
from qdetr.export import ExportError, ExportOptions, export_onnx, to_export_form
from qdetr.export.qdq_modules import INPUT_CHANNEL_MULTIPLE
from qdetr.export.qdq_ops import onnx_translations
from qdetr.quant import LSQActQuantizer, QuantConfig, quantize_model
from qdetr.testing import example_inputs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

OUTPUTS = ("pred_logits", "pred_boxes")


def _calibrated(name="detr_tiny", bits=4, **config):
    torch.manual_seed(0)
    model = quantize_model(qdetr.create_model(name), config=QuantConfig(bits=bits, **config))
    pixel_values, pixel_mask = example_inputs(2)
    return qdetr.calibrate(model.eval(), [pixel_values])


def _session(path, level="all", optimized=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, pixel_values, pixel_mask):
    out = session.run(list(OUTPUTS), {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()})
    return dict(zip(OUTPUTS, (torch.from_numpy(o) for o in out)))


def _reference(model, pixel_values, pixel_mask, options=None):
    with torch.no_grad():
        out = to_export_form(model, options)(pixel_values, pixel_mask)
    return {k: out[k] for k in OUTPUTS}


def _new_inputs():
    """Another batch size and other image sizes than at export time, with padding."""
    return example_inputs(3, sizes_hw=[(70, 90), (64, 64), (50, 80)], seed=3)


def _producers(graph):
    return {out: node for node in graph.node for out in node.output}


@pytest.fixture(scope="module")
def deploy_w4(tmp_path_factory):
    model = _calibrated(bits=4, profile="deploy")
    path = tmp_path_factory.mktemp("export") / "detr_tiny_deploy_w4.onnx"
    export_onnx(model, path, metadata={"qdetr.model_name": "detr_tiny"})
    return model, path


# ----------------------------------------------------------------------------- PyTorch export form


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("profile", ["deploy", "paper"])
def test_export_form_computes_what_the_model_computes(bits, profile):
    model = _calibrated(bits=bits, profile=profile)
    pixel_values, pixel_mask = _new_inputs()
    with torch.no_grad():
        expected = model(pixel_values, pixel_mask)
    # Without the batch-norm folding the export form is the same arithmetic.
    got = _reference(model, pixel_values, pixel_mask, ExportOptions(fold_batch_norm=False))
    for key in OUTPUTS:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)


def test_relu_folded_into_clip_equals_relu_then_quantizer():
    quantizer = LSQActQuantizer(3, 1, axis=1, signed=True, config=QuantConfig(profile="deploy").activation)
    quantizer.train()(torch.randn(2, 4, 8, 8))
    quantizer.zero_point.data.fill_(2.0)  # zero point above Qn: the ReLU is not implied by the range
    from qdetr.export.qdq_modules import ExportActQuantizer

    export = ExportActQuantizer(quantizer.eval(), "q")
    export.fold_relu = True
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64) * 3
    torch.testing.assert_close(export(x.float()).double(), quantizer(torch.relu(x.float())).double(), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the exported graph


def test_graph_is_standard_qdq_with_int8_weights(deploy_w4):
    model, path = deploy_w4
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["pixel_values", "pixel_mask"]
    assert [o.name for o in graph.output] == list(OUTPUTS)
    inits = {i.name: i for i in graph.initializer}
    producers = _producers(graph)
    # Every Conv/MatMul reading a DequantizeLinear weight reads int8 codes on the output-channel axis.
    weight_dqs = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul"):
            continue
        w = producers.get(node.input[1])
        if w is None or w.op_type != "DequantizeLinear" or w.input[0] not in inits:
            continue
        weight_dqs += 1
        codes = onnx.numpy_helper.to_array(inits[w.input[0]])
        axis = next(a.i for a in w.attribute if a.name == "axis")
        assert codes.dtype == np.int8
        assert axis == (0 if node.op_type == "Conv" else 1)
        assert onnx.numpy_helper.to_array(inits[w.input[1]]).shape == (codes.shape[axis],)
    # 17 quantized convs, 6 FFN linears and 5 attentions x 4 projections.
    assert weight_dqs == 17 + 6 + 5 * 4
    # Activations: every QuantizeLinear has a scalar scale (per tensor) and a uint8 zero point.
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            scale, zero = (onnx.numpy_helper.to_array(inits[n]) for n in node.input[1:3])
            assert scale.shape == () and scale > 0 and zero.dtype == np.uint8
    # 4-bit codes are clipped to their 16 levels; the 8-bit ones need no Clip.
    clips = [n for n in graph.node if n.op_type == "Clip" and producers[n.input[0]].op_type == "QuantizeLinear"]
    bounds = [tuple(int(onnx.numpy_helper.to_array(inits[c.input[i]])) for i in (1, 2)) for c in clips]
    spans = collections.Counter(hi - lo for lo, hi in bounds)
    assert spans[15] > 0  # a ReLU folded into a clip only raises the low end
    # Wider clips are 8-bit codes (the stem's) whose low end a folded ReLU raised.
    assert all(hi - lo <= 15 or hi == 255 for lo, hi in bounds)


def test_metadata_props(deploy_w4):
    _, path = deploy_w4
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["qdetr.classification"] == "softmax"
    assert meta["qdetr.bits"] == "4" and meta["qdetr.profile"] == "deploy"
    assert meta["qdetr.model_name"] == "detr_tiny"
    assert json.loads(meta["qdetr.preprocessing"])["shortest_edge"] == 800
    assert json.loads(meta["qdetr.export"]) == {"target": "onnxruntime", "opset": 18, "container": "uint8"}


def test_onnxruntime_agrees_with_pytorch_on_new_shapes(deploy_w4):
    model, path = deploy_w4
    pixel_values, pixel_mask = _new_inputs()
    expected = _reference(model, pixel_values, pixel_mask)
    unoptimized = _run(_session(path, "disable"), pixel_values, pixel_mask)
    for key in OUTPUTS:  # float noise only: same QDQ arithmetic in float
        torch.testing.assert_close(unoptimized[key], expected[key], rtol=0, atol=1e-5)
    optimized = _run(_session(path, "all"), pixel_values, pixel_mask)
    # Integer kernels requantize once per layer (at most one output step each).
    torch.testing.assert_close(optimized["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0.05)
    assert (optimized["pred_logits"].argmax(-1) == expected["pred_logits"].argmax(-1)).float().mean() >= 0.8


def test_every_quantized_layer_runs_on_an_integer_kernel(deploy_w4, tmp_path):
    _, path = deploy_w4
    optimized = tmp_path / "optimized.onnx"
    _session(path, "all", optimized)
    graph = onnx.load(str(optimized)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops["QLinearConv"] == 17  # every quantized conv; only the float input_proj stays float
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["QGemm"] >= 6 + 5 * 4 + 5 * 2
    producers = _producers(graph)
    fallbacks = [
        n.name
        for n in graph.node
        if n.op_type in ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul")
        and any(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input)
    ]
    assert fallbacks == []


def test_integer_multiply_add_share(deploy_w4):
    from qdetr.export import integer_kernel_report

    _, path = deploy_w4
    report = integer_kernel_report(path, image_size=(128, 128))
    assert report.integer_share >= 0.9, report.summary()  # the float input_proj and heads are the rest


def test_static_shape_export(tmp_path):
    model = _calibrated(bits=4, profile="deploy")
    path = export_onnx(model, tmp_path / "static.onnx", dynamic=False, example_size=(64, 64))
    graph = onnx.load(str(path)).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 64, 64]
    pixel_values, pixel_mask = example_inputs(sizes_hw=[(64, 64)], seed=5)
    got = _run(_session(path, "disable"), pixel_values, pixel_mask)
    expected = _reference(model, pixel_values, pixel_mask)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- bit widths, profiles


class _ConvBlock(nn.Module):
    """conv -> frozen BN -> ReLU -> conv -> linear over pixels: a tiny stand-in exported quickly."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import FrozenBatchNorm2d

        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FrozenBatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
        self.body[1].weight.data.uniform_(-2, 2)  # negative factors negate codes when folded
        self.body[1].running_mean.data.normal_()
        self.expand = nn.Linear(8, 16)
        self.reduce = nn.Linear(16, 4)

    def forward(self, x):
        y = self.body(x).flatten(2).transpose(1, 2)  # (B, HW, 8)
        return self.reduce(torch.relu(self.expand(y)))


def _export_module(module, x, path, opset=18):
    program = torch.onnx.export(
        module,
        (x,),
        dynamo=True,
        opset_version=opset,
        input_names=["x"],
        dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},),
        custom_translation_table=onnx_translations(max(opset, 18)),
    )
    program.save(str(path))
    return path


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_widths_run_in_onnxruntime_and_agree(bits, tmp_path):
    torch.manual_seed(bits)
    block = _ConvBlock()
    model = quantize_model(block, config=QuantConfig(bits=bits, profile="deploy", quantize_downsample=True))
    model.train()(torch.randn(4, 3, 12, 12))
    export = to_export_form(model.eval())
    path = _export_module(export, torch.randn(2, 3, 12, 12), tmp_path / f"block{bits}.onnx")
    x = torch.randn(3, 3, 14, 10)
    with torch.no_grad():
        expected, exact = model(x), export(x)
    session = _session(path, "disable")
    got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(exact, expected, rtol=0, atol=0.5)  # BN folding may move a rounding
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    # b-bit codes (a negative folded BN factor may negate -2^(b-1)); the stem (3 input channels, padded
    # with zero channels for the integer kernel) has 8 bits.
    codes = [
        a for a in inits.values()
        if a.dtype == np.int8 and a.ndim >= 2
        and not (a.ndim == 4 and a.shape[1] == INPUT_CHANNEL_MULTIPLE and not a[:, 3:].any())
    ]
    assert len(codes) == 3 and all(np.abs(a.astype(int)).max() <= 2 ** (bits - 1) for a in codes)
    optimized = _session(path, "all", tmp_path / "opt.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearConv"] >= 1 and ops["MatMulIntegerToFloat"] + ops["QGemm"] + ops["QLinearMatMul"] >= 1
    fused = torch.from_numpy(optimized.run(None, {"x": x.numpy()})[0])
    # A requantization may move a value by one step, and at 2-4 bits one step of an inner tensor moves the
    # outputs visibly: require most outputs to be unchanged rather than a small maximum.
    assert float(((fused - exact).abs() > 1e-4).float().mean()) <= 0.15


def test_newer_opset(tmp_path):
    model = quantize_model(_ConvBlock(), config=QuantConfig(bits=4, profile="deploy"))
    model.train()(torch.randn(2, 3, 12, 12))
    export = to_export_form(model.eval())
    path = _export_module(export, torch.randn(2, 3, 12, 12), tmp_path / "op21.onnx", opset=21)
    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 21
    x = torch.randn(1, 3, 12, 12)
    got = torch.from_numpy(_session(path, "disable").run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, export(x), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_uncalibrated_model_names_the_quantizer(tmp_path):
    model = quantize_model(qdetr.create_model("detr_tiny"), bits=4, profile="deploy").eval()
    with pytest.raises(ExportError, match=r"quantizer '[\w.]+_quantizer' was never calibrated; run qdetr.calibrate"):
        export_onnx(model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_unsupported_layer_and_model_errors(tmp_path):
    with pytest.raises(ExportError, match="is not a qdetr detector"):
        export_onnx(nn.Linear(3, 4), tmp_path / "x.onnx")

    class Custom(nn.Module):  # a quantizer in a module the exporter does not know
        def __init__(self):
            super().__init__()
            self.quantizer = LSQActQuantizer(4, 1, axis=-1, config=QuantConfig(profile="deploy").activation)

    model = nn.Sequential(Custom())
    model[0].quantizer.train()(torch.randn(3, 4))
    with pytest.raises(ExportError, match=r"does not know the layers holding the quantizers \['0.quantizer'\]"):
        to_export_form(model)


def test_opset_and_target_errors():
    with pytest.raises(ExportError, match="opset 11 is not supported"):
        ExportOptions(opset=11)
    with pytest.raises(ExportError, match="target must be one of"):
        ExportOptions(target="tflite")


def test_tensorrt_target_needs_symmetric_activations():
    model = _calibrated(bits=4, profile="deploy")
    with pytest.raises(ExportError, match=r"levels \[0, 255\] do not fit int8"):
        to_export_form(model, ExportOptions(target="tensorrt"))  # unsigned 8-bit probabilities
    # A non-zero zero point (LSQ+ learns them; the asymmetric deploy profile allows it).
    model.transformer.encoder.layers[0].self_attn.q_input_quantizer.zero_point.data.fill_(3.0)
    with pytest.raises(ExportError, match=r"int8 containers \(TensorRT\) need symmetric activations"):
        to_export_form(model, ExportOptions(target="tensorrt"))


def test_zero_point_outside_the_range_is_refused():
    model = _calibrated(bits=2, profile="deploy")
    model.transformer.encoder.layers[0].linear1.input_quantizer.zero_point.data.fill_(9.0)
    with pytest.raises(ExportError, match="zero point 9 lies outside the integer range"):
        to_export_form(model)


def test_cli_export_reports_a_missing_model(tmp_path, capsys):
    from qdetr.cli import main

    code = main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x.onnx")])
    assert code == 2
    assert "qdetr export: error" in capsys.readouterr().err


# ----------------------------------------------------------------------------- slow: full exports


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_deploy_detr_other_bit_widths_agree(bits, tmp_path):
    model = _calibrated(bits=bits, profile="deploy")
    path = export_onnx(model, tmp_path / "m.onnx")
    pixel_values, pixel_mask = _new_inputs()
    expected = _reference(model, pixel_values, pixel_mask)
    got = _run(_session(path, "disable"), pixel_values, pixel_mask)
    for key in OUTPUTS:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)
    _session(path, "all", tmp_path / "opt.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearConv"] == 17


@pytest.mark.slow
def test_paper_profile_exports_per_channel_activations_as_float_ops(tmp_path):
    model = _calibrated(bits=4, profile="paper")
    path = export_onnx(model, tmp_path / "paper.onnx")
    graph = onnx.load(str(path)).graph
    inits = {i.name for i in graph.initializer}
    # Never a per-axis DequantizeLinear on an activation: every axis DQ reads an initializer.
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and any(a.name == "axis" for a in node.attribute):
            assert node.input[0] in inits
    pixel_values, pixel_mask = _new_inputs()
    expected = _reference(model, pixel_values, pixel_mask)
    for level in ("disable", "all"):  # runs fully optimized too (float kernels for per-channel layers)
        got = _run(_session(path, level), pixel_values, pixel_mask)
        torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=1e-4 if level == "disable" else 0.05)


@pytest.mark.slow
def test_smca_and_symmetric_tensorrt_export(tmp_path):
    model = _calibrated("smca_detr_tiny", bits=4, profile="deploy", symmetric_activations=True)
    path = export_onnx(model, tmp_path / "smca_trt.onnx", target="tensorrt")
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = inits[node.input[2]]
            assert zero.dtype == np.int8 and not zero.any()  # TensorRT: int8, zero points all 0
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert (inits[node.input[1]] > 0).all()  # constant positive scales
    pixel_values, pixel_mask = _new_inputs()
    got = _run(_session(path, "disable"), pixel_values, pixel_mask)
    expected = _reference(model, pixel_values, pixel_mask, ExportOptions(target="tensorrt"))
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_cli_export_of_a_saved_model(tmp_path):
    from qdetr.cli import main

    model = _calibrated(bits=4, profile="deploy")
    model.save_pretrained(tmp_path / "saved")
    assert main(["export", str(tmp_path / "saved"), str(tmp_path / "m.onnx"), "--static", "64", "64"]) == 0
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert {p.key: p.value for p in proto.metadata_props}["qdetr.model_name"] == str(tmp_path / "saved")
    pixel_values, pixel_mask = example_inputs(sizes_hw=[(64, 64)], seed=2)
    got = _run(_session(tmp_path / "m.onnx", "disable"), pixel_values, pixel_mask)
    expected = _reference(model, pixel_values, pixel_mask)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_train_deploy_profile_then_export_with_the_cli(tmp_path):
    """`qdetr train --set quant.profile=deploy`, then `qdetr export runs/.../model_final.pt out.onnx`."""
    from qdetr.cli import main
    from qdetr.engine import Trainer
    from qdetr.engine.config import TrainConfig

    config = TrainConfig.from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "epochs": 1,
            "max_steps": 2,
            "device": "cpu",
            "progress": False,
            "eval_every": 0,
            "data": {
                "synthetic_root": str(tmp_path / "synthetic"),
                "synthetic_train_images": 4,
                "synthetic_val_images": 2,
                "synthetic": {"image_size": 64, "max_objects": 2, "min_size_frac": 0.3},
                "transforms": {"train_scales": [64], "max_size": 100, "eval_size": 64,
                               "crop_resize_scales": [64], "crop_size": [40, 64]},
                "batch_size": 2,
            },
            "model": {"name": "detr_tiny"},
            "quant": {"bits": 3, "profile": "deploy"},
        }
    )
    result = Trainer(config).fit()
    assert main(["export", str(result.model_path), str(tmp_path / "w3.onnx")]) == 0
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "w3.onnx")).metadata_props}
    assert meta["qdetr.profile"] == "deploy" and meta["qdetr.bits"] == "3"
    assert json.loads(meta["qdetr.preprocessing"])["shortest_edge"] == 64
    pixel_values, pixel_mask = example_inputs(2, seed=4)
    out = _run(_session(tmp_path / "w3.onnx", "all"), pixel_values, pixel_mask)
    assert out["pred_boxes"].shape == (2, 10, 4) and torch.isfinite(out["pred_logits"]).all()


@pytest.mark.slow
def test_float_model_exports_as_plain_onnx(tmp_path):
    torch.manual_seed(0)
    model = qdetr.create_model("detr_tiny").eval()
    path = export_onnx(model, tmp_path / "float.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    pixel_values, pixel_mask = _new_inputs()
    got = _run(_session(path, "all"), pixel_values, pixel_mask)
    with torch.no_grad():
        expected = model(pixel_values, pixel_mask)
    for key in OUTPUTS:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4)
