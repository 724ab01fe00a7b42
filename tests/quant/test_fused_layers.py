"""The fused quantized conv / linear node (qdetr.quant.fused_layers) against the separate-node
path: bit-identical outputs and gradients, the cases it leaves to the separate nodes, double
backward, and what it keeps for backward."""

import pytest
import torch
from torch import nn

from qdetr.layers.attention import MultiheadAttention
from qdetr.quant import fused_layers, native_kernels, quantize_model
from qdetr.quant.config import LayerQuantSpec
from qdetr.quant.kernels import get_kernel_backend, set_kernel_backend
from qdetr.quant.modules import QuantConv2d, QuantLinear

pytestmark = pytest.mark.skipif(
    not native_kernels.native_kernels_available(), reason="no working C compiler on this machine"
)

SPEC = LayerQuantSpec(weight_bits=4, input_bits=4)


def _count_fused(monkeypatch) -> list:
    calls = []
    original = fused_layers._FusedQuantOp.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(fused_layers._FusedQuantOp, "apply", counting)
    return calls


def _step(module, inputs, upstream_seed=1, fused=True, monkeypatch=None):
    """Outputs and every gradient of one forward/backward, fused or through the separate nodes."""
    if not fused:
        monkeypatch.setattr(fused_layers, "_applies", lambda *args: False)
    try:
        module.zero_grad(set_to_none=True)
        xs = [t.clone().requires_grad_(True) for t in inputs]
        out = module(*xs)
        out = out[0] if isinstance(out, tuple) else out
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=out.dtype)
        out.backward(up)
        return [out.detach()] + [x.grad for x in xs] + [p.grad for p in module.parameters()]
    finally:
        monkeypatch.undo()


def _assert_identical(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert (u is None) == (v is None), i
        if u is not None:
            assert u.dtype == v.dtype and torch.equal(u, v), f"tensor {i} differs"


def _layers():
    yield "conv", lambda: QuantConv2d.from_float(nn.Conv2d(8, 6, 3, padding=1), SPEC), (2, 8, 11, 13)
    yield "conv_stride_nobias", lambda: QuantConv2d.from_float(nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False), SPEC), (2, 8, 11, 13)
    yield "conv_grouped_1x1", lambda: QuantConv2d.from_float(nn.Conv2d(8, 4, 1, groups=2), SPEC), (1, 8, 5, 7)
    yield "linear_2d", lambda: QuantLinear.from_float(nn.Linear(16, 12), SPEC), (5, 16)
    yield "linear_3d", lambda: QuantLinear.from_float(nn.Linear(16, 12), SPEC), (3, 7, 16)
    yield "linear_3d_nobias", lambda: QuantLinear.from_float(nn.Linear(16, 12, bias=False), SPEC), (2, 9, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(_layers()), ids=lambda c: c[0])
def test_fused_layers_are_bit_identical_to_the_separate_nodes(case, dtype, monkeypatch):
    _, build, shape = case
    torch.manual_seed(0)
    layer = build().to(dtype).train()
    x = torch.randn(shape, dtype=dtype) * 3
    layer(x)  # calibrates (separate nodes)
    calls = _count_fused(monkeypatch)
    fused = _step(layer, [x], monkeypatch=monkeypatch)
    assert calls, "the fused node did not run"
    calls = _count_fused(monkeypatch)
    separate = _step(layer, [x], fused=False, monkeypatch=monkeypatch)
    assert not calls
    _assert_identical(fused, separate)
    with torch.no_grad():  # evaluation takes the fused operands too
        assert torch.equal(layer(x), fused[0])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("self_attention", [True, False])
def test_fused_attention_projections_are_bit_identical(bias, self_attention, monkeypatch):
    torch.manual_seed(0)
    holder = nn.ModuleDict({"attn": MultiheadAttention.from_torch(nn.MultiheadAttention(32, 4, batch_first=True, bias=bias))})
    quantize_model(holder, bits=4, profile="paper")
    attn = holder["attn"].double().train()
    q, k = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 7, 32, dtype=torch.float64)
    inputs = (q, q, q) if self_attention else (q, k, k + 1)
    attn(*inputs)
    calls = _count_fused(monkeypatch)
    fused = _step(attn, inputs, monkeypatch=monkeypatch)
    assert len(calls) == 4  # q, k, v projections and out_proj
    _assert_identical(fused, _step(attn, inputs, fused=False, monkeypatch=monkeypatch))


def test_first_conv_step_gradients_are_the_same_sums(monkeypatch):
    """A conv whose input needs no gradient (the stem, on the image): weight gradients and the
    output bit-identical, the input quantizer's step sums equal up to summation order."""
    torch.manual_seed(0)
    layer = QuantConv2d.from_float(nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False), LayerQuantSpec(weight_bits=8, input_bits=8))
    layer = layer.train()
    x = torch.randn(2, 3, 40, 40)
    layer(x)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(fused_layers, "_applies", lambda *args: False)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        results.append([y.detach()] + [p.grad for p in layer.parameters()])
    names = ["output"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, *results):
        if name.startswith("input_quantizer."):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b), name


def test_steps_at_the_lower_bound_get_the_same_gradient(monkeypatch):
    """A dead channel calibrates to a step of exactly MIN_STEP: the fused node masks its gradient
    as autograd's clamp_min does."""
    from qdetr.quant.quantizers import MIN_STEP

    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(8, 4), SPEC).train()
    x = torch.relu(torch.randn(6, 8))
    x[:, 2] = 0.0  # a dead input channel
    layer(x)
    with torch.no_grad():
        layer.input_quantizer.scale[3] = MIN_STEP
        layer.weight_quantizer.scale[1] = MIN_STEP
    assert layer.input_quantizer.scale[2] == torch.tensor(MIN_STEP)
    fused = _step(layer, [x], monkeypatch=monkeypatch)
    _assert_identical(fused, _step(layer, [x], fused=False, monkeypatch=monkeypatch))


def _with_forward_hook(layer):
    layer.input_quantizer.register_forward_hook(lambda *args: None)
    return layer


@pytest.mark.parametrize(
    "case",
    ["uncalibrated", "hooked_quantizer", "eager_backend", "autocast", "non_contiguous", "disabled", "weight_only"],
)
def test_fused_path_leaves_other_cases_to_the_separate_nodes(case, monkeypatch):
    torch.manual_seed(0)
    spec = LayerQuantSpec(weight_bits=4, input_bits=None) if case == "weight_only" else SPEC
    layer = QuantLinear.from_float(nn.Linear(16, 12), spec).train()
    x = torch.randn(4, 6, 16)
    if case != "uncalibrated":
        layer(x)
    if case == "hooked_quantizer":
        _with_forward_hook(layer)
    if case == "non_contiguous":
        x = torch.randn(6, 4, 16).transpose(0, 1)
    if case == "disabled":
        layer.input_quantizer.enabled = False
    calls = _count_fused(monkeypatch)
    previous = get_kernel_backend()
    if case == "eager_backend":
        set_kernel_backend("eager")
    try:
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                layer(x).float().sum().backward()
        else:
            layer(x).sum().backward()
    finally:
        set_kernel_backend(previous)
    assert not calls


def test_create_graph_through_a_fused_layer(monkeypatch):
    """create_graph: the fused node's backward differentiates the separate-node path (same
    first-order gradients, which carry a graph)."""
    torch.manual_seed(13)
    layer = QuantLinear.from_float(nn.Linear(6, 4), LayerQuantSpec(weight_bits=4, input_bits=4, input_signed=True))
    layer = layer.double().train()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    layer(x)
    calls = _count_fused(monkeypatch)
    gx, gw = torch.autograd.grad(layer(x).square().sum(), (x, layer.weight), create_graph=True)
    assert calls and gx.requires_grad
    monkeypatch.setattr(fused_layers, "_applies", lambda *args: False)
    gx_sep, gw_sep = torch.autograd.grad(layer(x).square().sum(), (x, layer.weight), create_graph=True)
    assert torch.equal(gx.detach(), gx_sep.detach()) and torch.equal(gw.detach(), gw_sep.detach())
    (gx_plain,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert torch.equal(gx.detach(), gx_plain)


def test_fused_layer_keeps_only_its_inputs_for_backward():
    """Saved for backward: x, W, b and the steps (no x̂, no ŵ)."""
    torch.manual_seed(0)
    layer = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), SPEC).train()
    x = torch.randn(2, 8, 32, 32)
    layer(x)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x1 = x.clone().requires_grad_(True)
        y = layer(x1)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0] is x1
    assert sum(t.numel() for t in saved) == x.numel() + sum(p.numel() for p in layer.parameters())
    y.sum().backward()
    assert x1.grad is not None and layer.weight.grad is not None
