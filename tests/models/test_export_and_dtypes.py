"""torch.export / ONNX export of tiny float models, and runs in float64 and bfloat16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from qdetr.models import create_model
from qdetr.models.export import DetectorForExport
from qdetr.testing import example_inputs


def _dynamic_shapes():
    batch = Dim("batch", min=1, max=16)
    return {
        "pixel_values": {0: batch, 2: Dim.AUTO, 3: Dim.AUTO},
        "pixel_mask": {0: batch, 1: Dim.AUTO, 2: Dim.AUTO},
    }


def _export(name):
    model = DetectorForExport(create_model(name).eval())
    pixel_values, pixel_mask = example_inputs(2)
    program = torch.export.export(model, (pixel_values, pixel_mask), dynamic_shapes=_dynamic_shapes())
    return model, program


def _check_program(model, program):
    # A different batch size and image size than at export time.
    pixel_values, pixel_mask = example_inputs(3, sizes_hw=[(70, 90), (64, 64), (50, 80)])
    with torch.no_grad():
        expected = model(pixel_values, pixel_mask)
        got = program.module()(pixel_values, pixel_mask)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)


def test_torch_export_detr_tiny_static_shapes():
    model = DetectorForExport(create_model("detr_tiny").eval())
    pixel_values, pixel_mask = example_inputs(2)
    program = torch.export.export(model, (pixel_values, pixel_mask))
    other_values, other_mask = example_inputs(2, seed=1)  # same shapes, other data and padding
    other_mask[1, :, 40:] = 0
    with torch.no_grad():
        for e, g in zip(model(other_values, other_mask), program.module()(other_values, other_mask)):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_torch_export_smca_tiny_dynamic_batch_and_size():
    _check_program(*_export("smca_detr_tiny"))


@pytest.mark.slow
def test_onnx_export_detr_tiny_agrees_with_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, program = _export("detr_tiny")
    onnx_program = torch.onnx.export(
        program,
        example_inputs(2),
        dynamo=True,
        input_names=["pixel_values", "pixel_mask"],
        output_names=["pred_logits", "pred_boxes"],
    )
    path = tmp_path / "detr_tiny.onnx"
    onnx_program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixel_values, pixel_mask = example_inputs(3, sizes_hw=[(70, 90), (64, 64), (50, 80)])
    logits, boxes = session.run(None, {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()})
    with torch.no_grad():
        ref_logits, ref_boxes = model(pixel_values, pixel_mask)
    torch.testing.assert_close(torch.from_numpy(logits), ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(boxes), ref_boxes, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["detr_tiny", "smca_detr_tiny"])
def test_float64_run_matches_float32(name):
    model = create_model(name).eval()
    pixel_values, pixel_mask = example_inputs(2)
    with torch.no_grad():
        out32 = model(pixel_values, pixel_mask)
        model.double()
        out64 = model(pixel_values.double(), pixel_mask)
    assert out64["pred_logits"].dtype == torch.float64
    assert out64["co_attn_features"].dtype == torch.float64
    torch.testing.assert_close(out64["pred_boxes"].float(), out32["pred_boxes"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["detr_tiny", "smca_detr_tiny"])
def test_bfloat16_autocast_run(name):
    model = create_model(name).eval()
    pixel_values, pixel_mask = example_inputs(2)
    with torch.no_grad():
        ref = model(pixel_values, pixel_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(pixel_values, pixel_mask)
    assert out["pred_logits"].dtype == torch.bfloat16
    assert torch.isfinite(out["pred_boxes"].float()).all()
    torch.testing.assert_close(out["pred_boxes"].float(), ref["pred_boxes"], rtol=0.05, atol=0.05)


def test_position_encoding_is_float32_then_cast():
    """method.md 9: computed in float32 even for a float64 model."""
    from qdetr.models.position_encoding import PositionEmbeddingSine

    mask = torch.zeros(1, 5, 7, dtype=torch.bool)
    mask[:, :, 5:] = True
    pe = PositionEmbeddingSine(8)(mask)
    assert pe.dtype == torch.float32
    model = create_model("detr_tiny").eval().double()
    feats, fmask, pos = model.backbone(torch.randn(1, 3, 64, 64, dtype=torch.float64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert pos.dtype == torch.float64
    torch.testing.assert_close(pos, model.backbone[1](fmask).double(), rtol=0, atol=0)
    # Not the same as computing in float64.
    assert not torch.equal(pos, _sine_float64(fmask, 16))


def _sine_float64(mask, f):
    import math

    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float64)
    x = not_mask.cumsum(2, dtype=torch.float64)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(f, dtype=torch.float64) // 2) / f)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)
