"""Reusable output memory: never hands out memory that a live tensor still uses."""

import copy
import pickle

import pytest
import torch
from torch import nn

from qdetr.quant import fused_layers, native_kernels
from qdetr.quant.config import LayerQuantSpec
from qdetr.quant.modules import QuantConv2d, QuantLinear
from qdetr.quant.primitives import fake_quant_activation
from qdetr.quant.reusable_buffers import ReusableBuffers


def test_memory_is_reused_only_once_every_reference_is_gone():
    pool = ReusableBuffers(max_buffers=1, min_numel=8)
    a = pool.empty((4, 8), torch.float32)
    ptr = a.data_ptr()
    view = a[1:]
    del a
    held = pool.empty((4, 8), torch.float32)  # the view still holds the buffer
    assert held.data_ptr() != ptr
    del view, held
    again = pool.empty((2, 8), torch.float64)  # another dtype: its own buffers
    assert again.dtype == torch.float64 and again.data_ptr() != ptr
    reused = pool.empty((5, 4), torch.float32)
    assert reused.data_ptr() == ptr and reused.shape == (5, 4) and reused.is_contiguous()
    small = pool.empty((3,), torch.float32)  # below min_numel: plain allocation
    assert small.data_ptr() != ptr


def test_buffers_grow_to_the_largest_request_and_copies_start_empty():
    pool = ReusableBuffers(max_buffers=2, min_numel=1)
    pool.empty((10,), torch.float32)
    pool.empty((1000,), torch.float32)
    assert pool.nbytes() == 4000
    for clone in (copy.deepcopy(pool), pickle.loads(pickle.dumps(pool))):
        assert clone.nbytes() == 0 and clone.max_buffers == 2
    pool.clear()
    assert pool.nbytes() == 0
    with pytest.raises(ValueError, match="max_buffers"):
        ReusableBuffers(max_buffers=0)


@pytest.mark.skipif(not native_kernels.native_kernels_available(), reason="no working C compiler")
def test_a_kept_quantizer_output_is_never_overwritten():
    """x̂ saved by autograd (or kept by the caller) keeps its values while later calls run."""
    torch.manual_seed(0)
    shape = (2, 8, 64, 80)  # above the pool's size threshold
    s, z = torch.full((1, 8, 1, 1), 0.05), torch.zeros(1, 8, 1, 1)
    weight = torch.randn(shape, requires_grad=True)
    x1 = torch.randn(shape)
    y1 = fake_quant_activation(x1, s, z, -8, 7, 1.0)
    kept = y1.clone()
    loss = (y1 * weight).sum()  # saves y1 for backward
    for seed in range(4):  # more calls than the pool has buffers
        fake_quant_activation(torch.randn(shape, generator=torch.Generator().manual_seed(seed)), s, z, -8, 7, 1.0)
    assert torch.equal(y1, kept)
    loss.backward()
    assert torch.equal(weight.grad, kept)


@pytest.mark.parametrize("layer, x", [
    (lambda spec: QuantConv2d.from_float(nn.Conv2d(4, 6, 3, padding=1), spec), torch.randn(2, 4, 9, 9)),
    (lambda spec: QuantLinear.from_float(nn.Linear(12, 7), spec), torch.randn(3, 5, 12)),
    (lambda spec: QuantLinear.from_float(nn.Linear(12, 7), spec), torch.randn(15, 12)),
    (lambda spec: QuantLinear.from_float(nn.Linear(12, 7, bias=False), spec), torch.randn(3, 5, 12)),
])
def test_quantized_layers_recompute_both_operands_in_backward(layer, x, monkeypatch):
    """Neither x̂ nor ŵ is kept for backward: each is recomputed once, bit-identically (the
    separate-node path; the fused one is covered by tests/quant/test_fused_layers.py)."""
    monkeypatch.setattr(fused_layers, "_applies", lambda *args: False)
    layer = layer(LayerQuantSpec(weight_bits=4, input_bits=4, input_signed=True)).train()
    layer(x)  # calibrates
    calls = []
    for quantizer in (layer.input_quantizer, layer.weight_quantizer):
        original = quantizer.recompute

        def counting(t, original=original, quantizer=quantizer):
            out = original(t)
            calls.append((quantizer, out))
            return out

        monkeypatch.setattr(quantizer, "recompute", counting)
    x1 = x.clone().requires_grad_(True)
    x_hat, w_hat = layer.input_quantizer(x1).detach(), layer.weight_quantizer(layer.weight).detach()
    layer(x1).sum().backward()
    assert [q for q, _ in calls] == [layer.input_quantizer, layer.weight_quantizer] or [q for q, _ in calls] == [
        layer.weight_quantizer,
        layer.input_quantizer,
    ]
    for quantizer, out in calls:
        assert torch.equal(out, x_hat if quantizer is layer.input_quantizer else w_hat)


def test_a_small_request_does_not_pin_a_large_buffer():
    pool = ReusableBuffers(max_buffers=2, min_numel=1, max_oversize=4)
    big = pool.empty((1000,), torch.float32)
    big_ptr = big.data_ptr()
    del big
    small = pool.empty((100,), torch.float32)  # 10x smaller: its own buffer, the large one stays free
    assert small.data_ptr() != big_ptr
    quarter = pool.empty((250,), torch.float32)  # within 4x: served by the large buffer
    assert quarter.data_ptr() == big_ptr
    with pytest.raises(ValueError, match="max_oversize"):
        ReusableBuffers(max_oversize=0)
