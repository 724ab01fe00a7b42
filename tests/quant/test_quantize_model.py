"""quantize_model: coverage on real architectures, profiles, errors, round trips, compile."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import qdetr
from qdetr.layers import MultiheadAttention
from qdetr.quant import (
    LSQActQuantizer,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    QuantMultiheadAttention,
    calibrate,
    quant_summary,
    quantize_model,
)


def _count_calls(model, cls):
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.modules() if isinstance(m, cls)]
    return calls, handles


def test_resnet18_coverage_and_training_step():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    assert quantize_model(m, bits=4) is m
    summary = quant_summary(m)
    # 20 convs: stem + 16 block convs quantized, 3 downsample convs float; fc is the head.
    assert summary.coverage == {"conv": (17, 20), "linear": (0, 1), "attention": (0, 0)}
    assert isinstance(m.conv1, QuantConv2d) and m.conv1.weight_quantizer.bits == 8
    assert m.layer1[0].conv1.weight_quantizer.bits == 4
    assert "downsample" in "".join(summary.float_layers)
    assert all("float" in r for r in summary.float_layers.values())
    m.train()
    out = m(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert m.layer1[0].conv1.weight_quantizer.scale.grad is not None
    assert m.layer1[0].conv1.input_quantizer.scale.grad is not None
    text = str(summary)
    assert "coverage (quantized/total): conv: 17/20" in text


def test_transformer_encoder_attention_is_reached_in_eval():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    ref = copy.deepcopy(enc).eval()
    quantize_model(enc, bits=4)
    cov = quant_summary(enc).coverage
    assert cov["attention"] == (2, 2)
    assert cov["linear"] == (4, 4)  # linear1/linear2 per layer; out_proj counted inside attention
    x = torch.randn(3, 7, 32)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 5:] = True
    calibrate(enc, [x])
    enc.eval()
    calls, handles = _count_calls(enc, LSQActQuantizer)
    with torch.no_grad():
        out = enc(x, src_key_padding_mask=mask)
        expected_float = ref(x, src_key_padding_mask=mask)
    assert len(calls) > 0, "eval fast path bypassed the quantizers"
    assert out.shape == expected_float.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, expected_float)
    for h in handles:
        h.remove()


def test_float_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, dropout=0.0).double().eval()
    ours = MultiheadAttention.from_torch(ref)
    q, k = torch.randn(5, 2, 32, dtype=torch.float64), torch.randn(7, 2, 32, dtype=torch.float64)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 4:] = True
    a, wa = ref(q, k, k, key_padding_mask=kpm)
    b, wb = ours(q, k, k, key_padding_mask=kpm)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(wa, wb)
    assert set(ours.state_dict()) == set(ref.state_dict())


def _tiny_decoder():
    layer = nn.TransformerDecoderLayer(32, 4, dim_feedforward=64, dropout=0.0)
    return nn.TransformerDecoder(layer, num_layers=1)


def test_profiles_differ_on_cross_attention():
    seed = quantize_model(_tiny_decoder(), bits=4, profile="seed")
    paper = quantize_model(_tiny_decoder(), bits=4, profile="paper")
    s_cross = seed.layers[0].multihead_attn
    p_cross = paper.layers[0].multihead_attn
    assert isinstance(s_cross, QuantMultiheadAttention) and isinstance(p_cross, QuantMultiheadAttention)
    # seed: cross-attention projections float, q/k/v/softmax 8-bit
    assert isinstance(s_cross.in_proj_weight_quantizer, nn.Identity)
    assert not isinstance(s_cross.out_proj, QuantLinear)
    assert s_cross.q_quantizer.bits == 8 and s_cross.prob_quantizer.signed_mode is False
    # seed self-attention: weights quantized, inputs float
    s_self = seed.layers[0].self_attn
    assert s_self.in_proj_weight_quantizer.bits == 4 and isinstance(s_self.q_input_quantizer, nn.Identity)
    assert s_self.out_proj.input_quantizer is None
    # paper: everything at b bits
    assert p_cross.in_proj_weight_quantizer.bits == 4 and p_cross.k_input_quantizer.bits == 4
    assert p_cross.out_proj.input_quantizer.bits == 4
    # unsigned FFN output input
    assert paper.layers[0].linear2.input_quantizer.signed_mode is False


def _tiny_hf_kwargs():
    from transformers import ResNetConfig

    return dict(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], out_features=["stage4"]
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=10,
        num_labels=5,
    )


def test_hf_detr_coverage_and_attention_reached():
    pytest.importorskip("transformers")
    from transformers import DetrConfig, DetrForObjectDetection

    torch.manual_seed(0)
    m = DetrForObjectDetection(DetrConfig(**_tiny_hf_kwargs()))
    quantize_model(m, bits=4)
    cov = quant_summary(m).coverage
    assert cov["attention"] == (3, 3)
    assert cov["linear"][0] == 4  # fc1/fc2 of encoder and decoder layers; heads float
    attn = m.model.decoder.layers[0].encoder_attn
    assert isinstance(attn.q_proj, QuantLinear) and attn.q_quantizer.bits == 8
    calls, handles = _count_calls(m, LSQActQuantizer)
    m.train()
    out = m(pixel_values=torch.randn(2, 3, 64, 64))
    out.logits.sum().backward()
    assert attn.prob_quantizer in [mod for mod in m.modules()] and len(calls) > 0
    assert attn.q_quantizer.scale.grad is not None, "attention quantizers are not on the gradient path"
    for h in handles:
        h.remove()


class _Unreachable(nn.Module):
    class CustomAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return torch.softmax(x @ self.w @ x.transpose(-1, -2), -1) @ x

    def __init__(self):
        super().__init__()
        self.attn = self.CustomAttention()
        self.proj = nn.Linear(8, 8)


def test_unreachable_attention_fails_loudly_unless_kept_float():
    with pytest.raises(NotImplementedError, match="keep_float"):
        quantize_model(_Unreachable(), bits=4)
    m = quantize_model(_Unreachable(), config=QuantConfig(bits=4, keep_float=("attn",)))
    assert isinstance(m.proj, QuantLinear)


def test_bad_inputs_have_clear_errors():
    m = torchvision.models.resnet18()
    for bad in (1, 9, 3.5):
        with pytest.raises(ValueError, match="from 2 to 8"):
            quantize_model(m, bits=bad)
    with pytest.raises(ValueError, match="unknown profile"):
        quantize_model(m, bits=4, profile="fast")
    with pytest.raises(ValueError, match="matched no"):
        quantize_model(m, config=QuantConfig(bits=4, overrides={"transformer.*": 2}))
    quantize_model(m, bits=4)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(m, bits=4)


def test_mixed_precision_overrides_and_keep_float():
    m = torchvision.models.resnet18()
    cfg = QuantConfig(bits=2, overrides={"layer4.*": 4}, keep_float=("layer1.0.conv1",))
    quantize_model(m, config=cfg)
    assert m.layer4[0].conv1.weight_quantizer.bits == 4
    assert m.layer3[0].conv1.weight_quantizer.bits == 2
    assert type(m.layer1[0].conv1) is nn.Conv2d
    assert "keep_float" in quant_summary(m).float_layers["layer1.0.conv1"]


def test_quant_config_round_trip():
    cfg = QuantConfig(bits=3, attn_bits=6, profile="seed", overrides={"a.*": 4}, keep_float=("b",))
    d = cfg.to_dict()
    assert d["version"] == 1
    assert QuantConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown QuantConfig fields"):
        QuantConfig.from_dict({**d, "foo": 1})


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def test_state_dict_round_trip_gives_identical_outputs():
    x = torch.randn(2, 3, 8, 8)
    a = quantize_model(_small_net(), bits=3)
    a.train()
    opt = torch.optim.SGD(a.parameters(), lr=0.01)
    a(x).sum().backward()
    opt.step()
    b = quantize_model(_small_net(), bits=3)
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))


def test_torch_compile_matches_eager():
    x = torch.randn(2, 3, 8, 8)
    m = quantize_model(_small_net(), bits=4)
    calibrate(m, [x])
    m.eval()
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_float64_and_bf16_autocast():
    x = torch.randn(2, 3, 8, 8)
    m = quantize_model(_small_net(), bits=4)
    m.train()(x)
    m.eval()
    with torch.no_grad():
        y64 = m.double()(x.double())
    assert y64.dtype == torch.float64
    m.float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_hf_conditional_detr_attention_is_reached():
    pytest.importorskip("transformers")
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection

    cfg = ConditionalDetrConfig(**_tiny_hf_kwargs())
    torch.manual_seed(0)
    m = ConditionalDetrForObjectDetection(cfg)
    quantize_model(m, bits=4)
    cov = quant_summary(m).coverage
    assert cov["attention"][0] == cov["attention"][1] >= 3
    m.train()
    out = m(pixel_values=torch.randn(2, 3, 64, 64))
    out.logits.sum().backward()
    cross = m.model.decoder.layers[0].encoder_attn
    assert isinstance(cross.q_content_proj, QuantLinear) and cross.q_quantizer.scale.grad is not None


def test_stem_is_first_three_channel_conv_even_after_other_convs():
    class Det(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_proj = nn.Conv2d(16, 8, 1)  # registered before the backbone, as in DETR
            self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))

    m = quantize_model(Det(), bits=2)
    assert m.backbone[0].weight_quantizer.bits == 8 and m.backbone[0].input_quantizer.bits == 8
    assert m.backbone[2].weight_quantizer.bits == 2
    assert type(m.input_proj) is nn.Conv2d


def test_torchvision_two_stage_detector_trains_and_predicts():
    torch.manual_seed(0)
    m = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5
    )
    quantize_model(m, bits=4)
    summary = quant_summary(m)
    assert summary.coverage["conv"][0] >= 60
    assert isinstance(m.roi_heads.box_head.fc6, QuantLinear)
    assert "roi_heads.box_predictor.cls_score" in summary.float_layers  # prediction head stays float
    images = [torch.rand(3, 160, 200), torch.rand(3, 120, 160)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 80.0, 90.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 5.0, 50.0, 60.0]]), "labels": torch.tensor([2])},
    ]
    m.train()
    losses = m(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    m.eval()
    with torch.no_grad():
        out = m(images)
    assert len(out) == 2 and out[0]["boxes"].shape[-1] == 4
