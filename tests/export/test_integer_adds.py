"""Integer residual adds: the identity quantizer's export, the add split, the stem on codes, the padded stem."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import qdetr
from qdetr.export import export_onnx, to_export_form
from qdetr.export.integer_adds import split_shared_integer_adds
from qdetr.export.qdq_modules import INPUT_CHANNEL_MULTIPLE, ExportConv2d
from qdetr.models.backbone import RESNET_LAYOUTS, ResNetLayout
from qdetr.quant import QuantConfig, quantize_model
from qdetr.testing import example_inputs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

OUTPUTS = ("pred_logits", "pred_boxes")


def _session(model_or_path, level="all", optimized=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "all" else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _residual_graph(zero=3, clip_after=False, float_consumer=False, relu=True):
    """DQ(a), DQ(b) -> Add [-> Relu] -> two quantizers (+ optional clip, + optional float consumer)."""
    init = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(120, np.uint8), "za"),
        numpy_helper.from_array(np.array(zero, np.uint8), "z1"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s2"),
        numpy_helper.from_array(np.array(9, np.uint8), "z2"),
        numpy_helper.from_array(np.array(2, np.uint8), "lo"),
        numpy_helper.from_array(np.array(200, np.uint8), "hi"),
    ]
    nodes = [helper.make_node("DequantizeLinear", [x, "s", "za"], [x + "f"]) for x in "ab"]
    nodes.append(helper.make_node("Add", ["af", "bf"], ["sum"], name="residual"))
    value = "sum"
    if relu:
        nodes.append(helper.make_node("Relu", ["sum"], ["r"]))
        value = "r"
    nodes += [helper.make_node("QuantizeLinear", [value, "s", "z1"], ["q1"]), helper.make_node("QuantizeLinear", [value, "s2", "z2"], ["q2"])]
    last = "q2"
    if clip_after:
        nodes.append(helper.make_node("Clip", ["q2", "lo", "hi"], ["q2c"]))
        last = "q2c"
    nodes += [helper.make_node("DequantizeLinear", ["q1", "s", "z1"], ["y1"]), helper.make_node("DequantizeLinear", [last, "s2", "z2"], ["y2"])]
    outputs = ["y1", "y2"]
    if float_consumer:
        nodes.append(helper.make_node("Mul", [value, "s"], ["y3"]))
        outputs.append("y3")
    shape = [2, 4, 5, 5]
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info(x, TensorProto.UINT8, shape) for x in "ab"],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o in outputs], init,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    "case",
    [dict(), dict(zero=0), dict(clip_after=True), dict(float_consumer=True), dict(relu=False), dict(zero=200, clip_after=True)],
)
def test_split_adds_compute_the_same_values_and_fuse(case):
    model = _residual_graph(**case)
    rng = np.random.default_rng(0)
    feed = {x: rng.integers(0, 256, (2, 4, 5, 5)).astype(np.uint8) for x in "ab"}
    expected = _session(model, "disable").run(None, feed)
    split = onnx.ModelProto()
    split.CopyFrom(model)
    assert split_shared_integer_adds(split) == 2
    onnx.checker.check_model(split)
    ops = collections.Counter(n.op_type for n in split.graph.node)
    assert ops["Add"] == 2 + (1 if case.get("float_consumer") else 0)  # the float reader keeps its own add
    assert ops["Relu"] == (1 if case.get("float_consumer") and case.get("relu", True) else 0)
    for got, want in zip(_session(split, "disable").run(None, feed), expected):
        np.testing.assert_array_equal(got, want)  # the ReLU folded into the codes' clip is exact
    fused = _session(split, "all").run(None, feed)
    for got, want in zip(fused, expected):
        np.testing.assert_allclose(got, want, atol=0.051)  # at most one code of requantization rounding


def test_split_leaves_other_graphs_alone():
    model = _residual_graph()
    model.graph.node[0].op_type = "Identity"  # an add whose input is not dequantized
    del model.graph.node[0].input[1:]
    assert split_shared_integer_adds(model) == 0


@pytest.fixture(scope="module")
def deep_backbone_model(pytestconfig):
    """A tiny deploy-profile DETR with two bottlenecks in layer1 and layer4 (identity paths)."""
    RESNET_LAYOUTS["resnet_tiny_test_deep"] = ResNetLayout((2, 1, 1, 2), 8)
    try:
        torch.manual_seed(0)
        model = quantize_model(
            qdetr.create_model("detr_tiny", backbone="resnet_tiny_test_deep"), config=QuantConfig(bits=4, profile="deploy")
        )
        pixel_values, _ = example_inputs(2)
        yield qdetr.calibrate(model.eval(), [pixel_values])
    finally:
        del RESNET_LAYOUTS["resnet_tiny_test_deep"]


def test_identity_quantized_export_runs_residual_adds_and_stem_pool_on_integers(deep_backbone_model, tmp_path):
    model = deep_backbone_model
    body = model.backbone[0].body
    assert type(body.layer1[1]).__name__ == "IdentityQuantizedBottleneck"
    path = export_onnx(model, tmp_path / "deep.onnx")
    optimized = tmp_path / "optimized.onnx"
    session = _session(path, "all", optimized)
    graph = onnx.load(str(optimized)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    producers = {o: n for n in graph.node for o in n.output}
    readers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            readers[i].append(n.op_type)
    residual_float_adds = [
        n for n in graph.node
        if n.op_type == "Add" and all(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input)
    ]
    # Six bottlenecks; only the last one's sum stays float: it feeds the float input_proj.
    assert len(residual_float_adds) == 1
    (last,) = residual_float_adds
    value = last.output[0]
    relu = [n for n in graph.node if n.op_type == "Relu" and value in n.input]
    if relu:
        value = relu[0].output[0]
    assert readers[value] and "QuantizeLinear" not in readers[value]
    # Five sums read by two quantizers each (the next conv1 and the identity or downsample input).
    assert ops["QLinearAdd"] == 10
    assert ops["QLinearConv"] == sum(1 for m in model.modules() if type(m).__name__ == "QuantConv2d")
    pools = [n for n in graph.node if "MaxPool" in n.op_type]
    assert len(pools) == 1 and producers[pools[0].input[0]].op_type != "DequantizeLinear"  # pools uint8 codes
    assert "Relu" not in {producers[i].op_type for n in graph.node for i in n.input if i in producers and "MaxPool" in n.op_type}
    pixel_values, pixel_mask = example_inputs(3, sizes_hw=[(71, 90), (64, 64), (50, 83)], seed=3)
    with torch.no_grad():
        expected = to_export_form(model)(pixel_values, pixel_mask)
        eager = model(pixel_values, pixel_mask)
    torch.testing.assert_close(expected["pred_boxes"], eager["pred_boxes"], rtol=0, atol=1e-5)
    out = session.run(list(OUTPUTS), {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()})
    reference = _session(path, "disable").run(list(OUTPUTS), {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()})
    np.testing.assert_allclose(reference[1], expected["pred_boxes"].numpy(), atol=1e-4)
    agree = (np.argmax(out[0], -1) == expected["pred_logits"].argmax(-1).numpy()).mean()
    assert agree >= 0.8 and np.abs(out[1] - expected["pred_boxes"].numpy()).max() < 0.1


@pytest.mark.parametrize("size_hw", [(32, 32), (33, 47), (40, 35)])
def test_space_to_depth_codes_give_the_same_sums(size_hw):
    from qdetr.export.qdq_modules import _stem_codes_space_to_depth

    torch.manual_seed(sum(size_hw))
    codes = torch.randint(-128, 128, (16, 3, 7, 7), dtype=torch.int8)
    x = torch.randint(-128, 128, (2, 3, *size_hw)).double()  # integer inputs: every sum is exact
    h, w = size_hw
    rows, cols = (h - 1) // 2 + 4, (w - 1) // 2 + 4
    padded = torch.nn.functional.pad(x, (4, 3, 4, 3))
    phases = torch.cat([padded[..., dy : dy + 2 * rows - 1 : 2, dx : dx + 2 * cols - 1 : 2] for dy in (0, 1) for dx in (0, 1)], 1)
    got = torch.nn.functional.conv2d(phases, _stem_codes_space_to_depth(codes).double())
    assert torch.equal(got, torch.nn.functional.conv2d(x, codes.double(), stride=2, padding=3))


@pytest.mark.parametrize("size_hw", [(32, 32), (33, 47), (40, 35)])
def test_space_to_depth_stem_matches_the_plain_conv(deep_backbone_model, size_hw, monkeypatch):
    import qdetr.export.qdq_modules as qdq_modules

    stem = to_export_form(deep_backbone_model).backbone[0].body.conv1
    assert isinstance(stem, ExportConv2d) and stem.space_to_depth and stem.input_channel_pad == 0
    assert tuple(stem.weight_codes.shape[1:]) == (12, 4, 4)
    monkeypatch.setattr(qdq_modules, "_is_resnet_stem", lambda conv: False)
    plain = to_export_form(deep_backbone_model).backbone[0].body.conv1  # the 7x7 stride-2 form
    assert not plain.space_to_depth
    x = torch.randn(2, 3, *size_hw)
    with torch.no_grad():
        expected = plain(x)
        torch.testing.assert_close(stem(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_other_integer_convs_get_zero_input_channels():
    from torch import nn

    from qdetr.quant import LayerQuantSpec, QuantConv2d, QuantizerConfig

    spec = LayerQuantSpec(weight_bits=4, input_bits=8)
    conv = QuantConv2d.from_float(nn.Conv2d(3, 8, 3, padding=1), spec)
    conv.input_quantizer = type(conv.input_quantizer)(8, 1, axis=1, signed=True, config=QuantizerConfig(granularity="per_tensor"))
    x = torch.randn(2, 3, 9, 9)
    conv.train()(x)
    export = ExportConv2d(conv.eval(), "conv")
    assert export.input_channel_pad == INPUT_CHANNEL_MULTIPLE - 3 and not export.space_to_depth
    assert int(export.weight_codes[:, 3:].abs().sum()) == 0
    with torch.no_grad():
        torch.testing.assert_close(export(x), conv(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("container,qmin,qmax,zero", [("uint8", 0, 15, 3), ("uint8", -128, 127, 5), ("int8", -8, 7, 0)])
def test_codes_round_trip_equals_quantize_dequantize(container, qmin, qmax, zero):
    from qdetr.export.qdq_ops import dequantize_codes, quantize_codes, quantize_dequantize

    x = torch.randn(4, 5, 6) * 3
    for lo in (qmin, max(qmin, zero)):  # with and without a folded ReLU
        codes = quantize_codes(x, 0.37, zero, lo, qmax, container=container, qmin=qmin)
        assert codes.dtype == (torch.uint8 if container == "uint8" else torch.int8)
        stored_zero = zero - qmin if container == "uint8" else zero
        expected = quantize_dequantize(x, 0.37, zero, lo, qmax, container=container, qmin=qmin)
        assert torch.equal(dequantize_codes(codes, 0.37, stored_zero), expected)
