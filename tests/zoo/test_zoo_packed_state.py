"""Packed safetensors: save -> load reproduces the fake-quant model bit-exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qdetr.quant import quantize_model
from qdetr.zoo.packed_state import (
    PACKED_SUFFIX,
    find_quantized_weights,
    load_packed_state,
    packed_weight_names,
    read_packed_state_dict,
    save_packed_state,
)
from qdetr.zoo.packing import packed_num_bytes


class ToyDetector(nn.Module):
    """Stem conv, block conv, attention, FFN and a float head: every packed-weight kind."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.self_attn = nn.MultiheadAttention(16, 2)
        self.linear1 = nn.Linear(16, 32)
        self.linear2 = nn.Linear(32, 16)
        self.class_embed = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.relu(self.stem(x)))            # (B, 16, H, W)
        seq = x.flatten(2).permute(2, 0, 1)                  # (HW, B, 16)
        seq = seq + self.self_attn(seq, seq, seq, need_weights=False)[0]
        seq = seq + self.linear2(torch.relu(self.linear1(seq)))
        return self.class_embed(seq)


def _quantized_toy(bits: int, seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    model = quantize_model(ToyDetector(), bits=bits, profile="paper").to(dtype)
    model.train()
    model(torch.randn(2, 3, 6, 6, dtype=dtype))  # calibrates the activation quantizers
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_is_bit_exact(tmp_path, bits, dtype):
    model = _quantized_toy(bits, seed=0, dtype=dtype)
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "model.safetensors"
    summary = save_packed_state(model, path)
    assert "conv.weight" in summary["packed"] and "self_attn.in_proj_weight" in summary["packed"]
    assert "class_embed.weight" not in summary["packed"]  # float head stays float

    fresh = _quantized_toy(bits, seed=1, dtype=dtype)  # different latent weights and steps
    load_packed_state(fresh, path)
    with torch.no_grad():
        got = fresh(x)
    assert torch.equal(got, expected)
    # The loaded weight is exactly the fake-quant weight of the original.
    for qw in find_quantized_weights(model):
        with torch.no_grad():
            assert torch.equal(fresh.get_parameter(qw.param_name), qw.quantizer(model.get_parameter(qw.param_name)))


def test_latent_weights_are_not_stored_and_codes_are_packed(tmp_path):
    model = _quantized_toy(4, seed=0, dtype=torch.float32)
    path = tmp_path / "model.safetensors"
    save_packed_state(model, path)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["qdetr_packed"])
        conv_codes = f.get_tensor("conv.weight" + PACKED_SUFFIX)
        stem_codes = f.get_tensor("stem.weight" + PACKED_SUFFIX)
    assert "conv.weight" not in keys and "self_attn.in_proj_weight" not in keys
    assert "class_embed.weight" in keys and "conv.weight_quantizer.scale" in keys
    assert conv_codes.dtype == torch.uint8 and conv_codes.numel() == packed_num_bytes(16 * 8 * 9, 4)
    assert meta["conv.weight"] == {"shape": [16, 8, 3, 3], "dtype": "float32", "bits": 4, "qmin": -8,
                                   "quantizer": "conv.weight_quantizer"}
    assert meta["stem.weight"]["bits"] == 8 and stem_codes.numel() == 8 * 3 * 9  # stem stays 8-bit
    assert packed_weight_names(path) == sorted(meta)


def test_mismatched_bits_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_packed_state(_quantized_toy(4, seed=0, dtype=torch.float32), path)
    with pytest.raises(ValueError, match="packed at 4 bits.*has 2 bits"):
        load_packed_state(_quantized_toy(2, seed=0, dtype=torch.float32), path)


def test_float_model_refuses_packed_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_packed_state(_quantized_toy(4, seed=0, dtype=torch.float32), path)
    with pytest.raises(ValueError, match="no weight quantizer"):
        load_packed_state(ToyDetector(), path)


def test_shared_tensors_are_stored_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # an alias, like the seed's in_proj_weight / in_proj.weight
            self.register_buffer("view", self.a.bias.detach()[1:3])  # overlapping, different view

    model = Tied()
    path = tmp_path / "tied.safetensors"
    summary = save_packed_state(model, path)
    assert summary["aliases"] == {"b.weight": "a.weight"}
    fresh = Tied()
    load_packed_state(fresh, path)
    assert torch.equal(fresh.a.weight, model.a.weight) and fresh.b.weight is fresh.a.weight
    assert torch.equal(read_packed_state_dict(path)["view"], model.a.bias.detach()[1:3])


def test_strict_load_reports_missing_keys(tmp_path):
    path = tmp_path / "model.safetensors"
    save_packed_state(_quantized_toy(4, seed=0, dtype=torch.float32), path)
    bigger = _quantized_toy(4, seed=0, dtype=torch.float32)
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_packed_state(bigger, path)
