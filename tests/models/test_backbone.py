"""Backbone units: the Bi-Real/ReActNet block of the release and the mask downsampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qdetr.models.backbone import RESNET_LAYOUTS, Backbone, BiRealBottleneck, ResNetBody


def _prelu(x, w):
    return torch.where(x >= 0, x, x * w.view(1, -1, 1, 1))


def test_bireal_block_data_path():
    torch.manual_seed(0)
    block = BiRealBottleneck(8, 4, stride=2, downsample=torch.nn.Conv2d(8, 16, 1, stride=2, bias=False)).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 8, 9, 9)

    def lb(name, t):
        return t + getattr(block, name).bias

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    a = lb("bias12", _prelu(lb("bias11", x), block.prelu1.weight))
    a = lb("bias22", _prelu(lb("bias21", bn(block.bn1, block.conv1(a))), block.prelu2.weight))
    a = lb("bias32", _prelu(lb("bias31", bn(block.bn2, block.conv2(a))), block.prelu3.weight))
    a = bn(block.bn3, block.conv3(a)) + block.downsample(x)  # residual from the raw input
    expected = lb("bias02", _prelu(lb("bias01", a), block.prelu0.weight))
    torch.testing.assert_close(block(x), expected)
    assert block.conv1.bias is not None and block.conv2.stride == (2, 2)


def test_bireal_resnet50_key_names():
    body = ResNetBody(RESNET_LAYOUTS["resnet50"], unit="bireal")
    keys = set(body.state_dict())
    for key in ("conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.bias11.bias", "layer1.0.prelu1.weight",
                "layer1.0.conv1.bias", "layer1.0.downsample.0.weight", "layer4.2.bias02.bias", "layer3.5.prelu0.weight"):
        assert key in keys, key
    assert "conv1.bias" not in keys and not any(k.endswith("num_batches_tracked") for k in keys)
    assert len(keys) == 800 - 49 * 6  # the release backbone minus 6 quantizer entries per quantized conv
    assert tuple(body.layer2[0].bias11.bias.shape) == (1, 256, 1, 1)


def test_mask_downsampling_and_strides():
    backbone = Backbone("resnet_tiny").eval()
    mask = torch.zeros(2, 100, 130, dtype=torch.bool)
    mask[1, :, 64:] = True
    feats, fmask = backbone(torch.randn(2, 3, 100, 130), mask)
    assert feats.shape == (2, 256, 4, 5) and fmask.shape == (2, 4, 5)
    # nearest: cell j samples pixel floor(j * 130 / 5) = 0, 26, 52, 78, 104; padding starts at 64
    assert not fmask[0].any() and fmask[1, :, 3:].all() and not fmask[1, :, :3].any()
    dilated = Backbone("resnet_tiny", dilation=True).eval()
    assert dilated(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))[0].shape[-1] == 4
