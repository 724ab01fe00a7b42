"""The ``"deploy"`` profile: integer-kernel numerics, symmetric option, residual output quantizers, round trips."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

import qdetr
from qdetr.engine.config import TrainConfig
from qdetr.quant import LSQActQuantizer, LSQWeightQuantizer, QuantConfig, quant_summary, quantize_model
from qdetr.quant.residual_outputs import OutputQuantizedBatchNorm2d
from qdetr.testing import example_inputs


def _deploy_model(bits=4, **config):
    torch.manual_seed(0)
    return quantize_model(qdetr.create_model("detr_tiny"), config=QuantConfig(bits=bits, profile="deploy", **config))


def _activation_quantizers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LSQActQuantizer)}


def test_config_sets_per_tensor_activations_and_round_trips():
    cfg = QuantConfig(bits=2, profile="deploy", symmetric_activations=True)
    assert cfg.activation.granularity == "per_tensor"
    assert not cfg.activation.learn_zero_point and cfg.activation.zero_point_init == "zero"
    assert cfg.weight.granularity == "per_channel"
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig.from_dict(QuantConfig(bits=3, profile="deploy").to_dict()).profile == "deploy"
    train = TrainConfig().with_overrides(["quant.bits=4", "quant.profile=deploy"])  # `qdetr train --set ...`
    assert train.quant.quantization.profile == "deploy"


def test_symmetric_needs_deploy_profile():
    with pytest.raises(ValueError, match="needs profile='deploy'"):
        QuantConfig(bits=4, symmetric_activations=True)
    with pytest.raises(ValueError, match="profile"):
        TrainConfig().with_overrides(["quant.bits=4", "quant.profile=int8"])


def test_every_activation_quantizer_is_per_tensor_and_weights_per_channel():
    model = _deploy_model()
    acts = _activation_quantizers(model)
    assert acts and all(q.num_channels == 1 and q.scale.shape == (1,) for q in acts.values())
    # Attention q/k/v/probabilities too (one step per tensor, not per head).
    assert "transformer.encoder.layers.0.self_attn.prob_quantizer" in acts
    weights = [m for m in model.modules() if isinstance(m, LSQWeightQuantizer)]
    assert all(q.per_channel and q.num_channels > 1 for q in weights)
    # Paper's layer selection plus the 8-bit downsample convs.
    body = model.backbone[0].body
    assert body.layer1[0].downsample[0].weight_quantizer.bits == 8
    assert body.layer1[0].conv2.weight_quantizer.bits == 4
    assert type(model.input_proj) is torch.nn.Conv2d
    paper = quantize_model(qdetr.create_model("detr_tiny"), bits=4)
    assert type(paper.backbone[0].body.layer1[0].downsample[0]) is torch.nn.Conv2d


def test_residual_outputs_get_8bit_quantizers_and_show_in_summary():
    model = _deploy_model(bits=2)
    body = model.backbone[0].body
    for bn in (body.bn1, body.layer1[0].bn3, body.layer1[0].downsample[1]):
        assert isinstance(bn, OutputQuantizedBatchNorm2d)
        assert bn.output_quantizer.bits == 8 and bn.output_quantizer.num_channels == 1
    assert type(body.layer1[0].bn1) is FrozenBatchNorm2d  # followed by ReLU and conv2's input quantizer
    summary = quant_summary(model)
    outputs = [row for row in summary.layers if row.kind == "output"]
    assert {row.name for row in outputs} >= {"backbone.0.body.layer4.0.bn3", "backbone.0.body.bn1"}
    assert all(row.status == "quantized (residual output A8)" for row in outputs)
    assert summary.coverage["conv"] == (17, 18)


def test_output_quantized_norm_equals_norm_then_quantizer():
    bn = FrozenBatchNorm2d(6)
    bn.weight.uniform_(0.5, 2.0)
    bn.running_mean.normal_()
    qbn = OutputQuantizedBatchNorm2d.from_batch_norm(bn, 8, QuantConfig(profile="deploy").activation).train()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    qbn.double()
    y = qbn(x)
    assert qbn.output_quantizer.is_initialized
    torch.testing.assert_close(y, qbn.output_quantizer(bn.double()(x)), rtol=0, atol=0)
    assert qbn.to_batch_norm().weight is qbn.weight


def test_symmetric_profile_keeps_zero_points_at_zero_through_training():
    model = _deploy_model(bits=3, symmetric_activations=True).train()
    pixel_values, pixel_mask = example_inputs(2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(pixel_values, pixel_mask)
    (out["pred_logits"].square().mean() + out["pred_boxes"].sum()).backward()
    optimizer.step()
    acts = _activation_quantizers(model)
    assert all(bool(q.signed) for q in acts.values())
    assert all(float(q.zero_point.abs().max()) == 0.0 and not q.zero_point.requires_grad for q in acts.values())
    # The residual output quantizers are trained like the others.
    assert model.backbone[0].body.layer1[0].bn3.output_quantizer.scale.grad is not None


def test_deploy_model_save_and_load_round_trip(tmp_path):
    model = _deploy_model(bits=3).eval()
    pixel_values, pixel_mask = example_inputs(2)
    model = qdetr.calibrate(model, [pixel_values])
    model.save_pretrained(tmp_path)
    loaded = qdetr.from_pretrained(tmp_path)
    assert isinstance(loaded.backbone[0].body.layer2[0].bn3, OutputQuantizedBatchNorm2d)
    assert loaded.qdetr_quant_config == model.qdetr_quant_config
    with torch.no_grad():
        expected, got = model(pixel_values, pixel_mask), loaded(pixel_values, pixel_mask)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=1e-6)


@pytest.fixture
def deep_layout():
    """A test layout with two bottlenecks in layer1 and layer4, so that identity paths exist."""
    from qdetr.models.backbone import RESNET_LAYOUTS, ResNetLayout

    RESNET_LAYOUTS["resnet_tiny_test_deep"] = ResNetLayout((2, 1, 1, 2), 8)
    yield "resnet_tiny_test_deep"
    del RESNET_LAYOUTS["resnet_tiny_test_deep"]


def _deep_deploy_model(backbone, bits=4, **config):
    torch.manual_seed(0)
    return quantize_model(
        qdetr.create_model("detr_tiny", backbone=backbone), config=QuantConfig(bits=bits, profile="deploy", **config)
    )


def test_identity_paths_get_8bit_quantizers(deep_layout):
    from qdetr.quant.residual_outputs import IdentityQuantizedBottleneck

    model = _deep_deploy_model(deep_layout).train()
    body = model.backbone[0].body
    blocks = [n for n, m in model.named_modules() if isinstance(m, IdentityQuantizedBottleneck)]
    assert blocks == ["backbone.0.body.layer1.1", "backbone.0.body.layer4.1"]
    assert type(body.layer1[0]).__name__ == "Bottleneck"  # has a downsample: quantized at its norm
    quantizer = body.layer1[1].identity_quantizer
    assert quantizer.bits == 8 and quantizer.num_channels == 1
    assert "backbone.0.body.layer1.1.identity_quantizer.scale" in model.state_dict()
    summary = {row.name: row for row in quant_summary(model).layers}
    row = summary["backbone.0.body.layer1.1.identity_quantizer"]
    assert row.kind == "output" and row.status == "quantized (residual output A8)"
    pixel_values, pixel_mask = example_inputs(2)
    out = model(pixel_values, pixel_mask)
    (out["pred_logits"].square().mean() + out["pred_boxes"].sum()).backward()
    assert not bool(quantizer.signed)  # the identity is a ReLU output
    assert quantizer.scale.grad is not None and float(quantizer.scale.grad.abs()) > 0
    symmetric = _deep_deploy_model(deep_layout, symmetric_activations=True)
    assert symmetric.backbone[0].body.layer4[1].identity_quantizer.signed_mode is True


def test_identity_quantized_block_forward_and_round_trip(deep_layout, tmp_path):
    model = _deep_deploy_model(deep_layout, bits=3).eval()
    pixel_values, pixel_mask = example_inputs(2)
    model = qdetr.calibrate(model, [pixel_values])
    block = model.backbone[0].body.layer1[1].double()
    x = torch.rand(2, block.conv1.in_channels, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        branch = block.bn3(block.conv3(block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))))
        torch.testing.assert_close(block(x), torch.relu(branch + block.identity_quantizer(x)), rtol=0, atol=0)
    block.float()
    model.save_pretrained(tmp_path)
    loaded = qdetr.from_pretrained(tmp_path)
    assert type(loaded.backbone[0].body.layer1[1]).__name__ == "IdentityQuantizedBottleneck"
    with torch.no_grad():
        expected, got = model(pixel_values, pixel_mask), loaded(pixel_values, pixel_mask)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=1e-6)


def test_identity_quantizer_needs_a_block_without_downsample():
    from torchvision.models.resnet import Bottleneck

    from qdetr.quant.residual_outputs import IdentityQuantizedBottleneck

    block = Bottleneck(8, 4, downsample=torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1)))
    with pytest.raises(ValueError, match="downsample"):
        IdentityQuantizedBottleneck.from_bottleneck(block, 8, False, QuantConfig(profile="deploy").activation)
