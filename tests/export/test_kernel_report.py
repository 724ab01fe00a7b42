"""Integer multiply-add share on small hand-built ONNX graphs where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qdetr.export.kernel_report import integer_kernel_report, kernel_multiply_adds  # noqa: E402

RNG = np.random.default_rng(0)


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _save(tmp_path, nodes, inputs, outputs, initializers, opset=21, name="g.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _qdq(x: str, out: str, scale: str, zero: str) -> list:
    return [helper.make_node("QuantizeLinear", [x, scale, zero], [out + "_q"]),
            helper.make_node("DequantizeLinear", [out + "_q", scale, zero], [out])]


def _float_then_quantized_matmul(tmp_path):
    """X (1,4,8) @ W0 (8,16) in float, then a QDQ matmul (16 -> 32) with an output Q."""
    inits = [
        _const("W0", RNG.standard_normal((8, 16)).astype(np.float32)),
        _const("s_a", np.float32(0.05)), _const("z_a", np.uint8(128)),
        _const("W1", RNG.integers(-8, 8, (16, 32)).astype(np.int8)),
        _const("s_w", np.full(32, 0.02, np.float32)), _const("z_w", np.zeros(32, np.int8)),
        _const("s_y", np.float32(0.1)), _const("z_y", np.uint8(128)),
    ]
    nodes = [helper.make_node("MatMul", ["X", "W0"], ["Y0"], name="float_fc")]
    nodes += _qdq("Y0", "Y0d", "s_a", "z_a")
    nodes += [helper.make_node("DequantizeLinear", ["W1", "s_w", "z_w"], ["W1d"], axis=1),
              helper.make_node("MatMul", ["Y0d", "W1d"], ["Y1"], name="quant_fc")]
    nodes += _qdq("Y1", "Y", "s_y", "z_y")
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 8])],
                 [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4, 32])], inits)
    return path, {"X": RNG.standard_normal((1, 4, 8)).astype(np.float32)}


def test_fused_qdq_matmul_is_integer_and_float_matmul_is_not(tmp_path):
    path, feed = _float_then_quantized_matmul(tmp_path)
    report = integer_kernel_report(path, feed, optimized_model_path=tmp_path / "opt.onnx")
    kernels = {k.name: k for k in report.kernels}
    assert kernels["quant_fc"].op_type == "QLinearMatMul" and kernels["quant_fc"].integer
    assert kernels["quant_fc"].multiply_adds == 4 * 32 * 16
    assert kernels["float_fc"].op_type == "MatMul" and not kernels["float_fc"].integer
    assert kernels["float_fc"].multiply_adds == 4 * 16 * 8
    assert report.integer_share == pytest.approx(2048 / (2048 + 512))
    assert report.fallbacks == []  # the float matmul has no dequantized input: float on purpose
    assert report.op_counts["QLinearMatMul"] == 1
    saved = onnx.load(str(tmp_path / "opt.onnx"))
    assert "QLinearMatMul" in {n.op_type for n in saved.graph.node}
    assert "80.0 %" in report.summary()


def test_without_optimizations_the_qdq_matmul_is_a_float_fallback(tmp_path):
    path, feed = _float_then_quantized_matmul(tmp_path)
    report = integer_kernel_report(path, feed, optimization_level="disable")
    assert report.integer_share == 0.0
    assert [k.name for k in report.fallbacks] == ["quant_fc"]
    assert "dequantized input" in report.summary()


def _conv_graph(tmp_path, output_q: bool):
    """QDQ 3x3 conv 4 -> 8 channels on 10x12 with an int32 bias; with or without an output Q."""
    inits = [
        _const("s_x", np.float32(0.04)), _const("z_x", np.uint8(100)),
        _const("W", RNG.integers(-7, 8, (8, 4, 3, 3)).astype(np.int8)),
        _const("s_w", np.linspace(0.01, 0.02, 8).astype(np.float32)), _const("z_w", np.zeros(8, np.int8)),
        _const("B", RNG.integers(-50, 50, 8).astype(np.int32)),
        _const("s_b", (0.04 * np.linspace(0.01, 0.02, 8)).astype(np.float32)), _const("z_b", np.zeros(8, np.int32)),
        _const("s_y", np.float32(0.2)), _const("z_y", np.uint8(128)),
    ]
    nodes = _qdq("X", "Xd", "s_x", "z_x") + [
        helper.make_node("DequantizeLinear", ["W", "s_w", "z_w"], ["Wd"], axis=0),
        helper.make_node("DequantizeLinear", ["B", "s_b", "z_b"], ["Bd"], axis=0),
        helper.make_node("Conv", ["Xd", "Wd", "Bd"], ["Yc" if output_q else "Y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    if output_q:
        nodes += _qdq("Yc", "Y", "s_y", "z_y")
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 4, 10, 12])],
                 [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 8, 10, 12])], inits,
                 name=f"conv_{output_q}.onnx")
    return path, {"X": RNG.standard_normal((2, 4, 10, 12)).astype(np.float32)}


@pytest.mark.parametrize("level", ["extended", "all"])
def test_conv_with_output_q_fuses_to_qlinearconv(tmp_path, level):
    path, feed = _conv_graph(tmp_path, output_q=True)
    report = integer_kernel_report(path, feed, optimization_level=level)
    [kernel] = report.kernels
    assert kernel.op_type == "QLinearConv" and kernel.integer
    assert kernel.multiply_adds == 2 * 8 * 10 * 12 * 4 * 9
    assert report.integer_share == 1.0


def test_conv_without_output_q_stays_float_and_is_listed_as_fallback(tmp_path):
    path, feed = _conv_graph(tmp_path, output_q=False)
    report = integer_kernel_report(path, feed)
    [kernel] = report.kernels
    assert kernel.op_type == "Conv" and not kernel.integer and kernel.dequantized_input
    assert kernel.multiply_adds == 2 * 8 * 10 * 12 * 4 * 9
    assert report.fallbacks == [kernel] and report.integer_share == 0.0


def test_int4_weight_only_matmul_becomes_matmulnbits_counted_integer_at_level_4(tmp_path):
    inits = [_const("W", RNG.integers(-8, 8, (64, 32)).astype(np.int8)),
             _const("s_w", np.full(32, 0.05, np.float32))]
    w4 = helper.make_tensor("W4", TensorProto.INT4, [64, 32], RNG.integers(-8, 8, 64 * 32).tolist())
    nodes = [helper.make_node("DequantizeLinear", ["W4", "s_w"], ["Wd"], axis=1),
             helper.make_node("MatMul", ["X", "Wd"], ["Y"], name="fc4")]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [5, 64])],
                 [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [5, 32])], inits[1:] + [w4])
    report = integer_kernel_report(path, {"X": RNG.standard_normal((5, 64)).astype(np.float32)})
    [kernel] = report.kernels
    assert kernel.op_type == "MatMulNBits" and kernel.integer  # accuracy_level 4: int8 activations
    assert kernel.multiply_adds == 5 * 32 * 64
    float_ref = integer_kernel_report(
        path, {"X": np.ones((5, 64), np.float32)}, session_config={"session.qdq_matmulnbits_accuracy_level": "0"}
    )
    [kernel] = float_ref.kernels
    assert kernel.op_type == "MatMulNBits" and not kernel.integer  # float activations: a float kernel


def test_multiply_add_formulas():
    assert kernel_multiply_adds("Conv", [(1, 6, 9, 9), (12, 3, 3, 3)], (1, 12, 7, 7)) == 12 * 49 * 27  # groups=2
    assert kernel_multiply_adds("QGemm", [(7, 16), (), (), (8, 16)], (7, 8)) == 7 * 8 * 16
    assert kernel_multiply_adds("FusedMatMul", [(3, 10, 4), (3, 10, 6)], (3, 4, 6), {"transA": 1}) == 72 * 10
    assert kernel_multiply_adds("QLinearMatMul", [(2, 8, 5, 16), (), ()], (2, 8, 5, 7)) == 2 * 8 * 5 * 7 * 16
    assert kernel_multiply_adds("Relu", [(3,)], (3,)) is None
    assert kernel_multiply_adds("Conv", [(1, 3, 4, 4), None], (1, 2, 4, 4)) is None


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="export one first"):
        integer_kernel_report(tmp_path / "missing.onnx")
    path, _ = _float_then_quantized_matmul(tmp_path)
    with pytest.raises(ValueError, match="optimization_level"):
        integer_kernel_report(path, optimization_level="max")
    with pytest.raises(ValueError, match="pass inputs="):
        integer_kernel_report(path)
