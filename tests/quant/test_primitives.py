"""Quantizer numerics against the closed forms of method.md sections 2 and 3."""

import math

import pytest
import torch

from qdetr.quant.config import QuantizerConfig
from qdetr.quant.primitives import fake_quant_activation, fake_quant_weight, integer_range
from qdetr.quant.quantizers import LSQActQuantizer, LSQWeightQuantizer, UncalibratedQuantizerError


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_integer_range():
    assert integer_range(2, True) == (-2, 1)
    assert integer_range(3, True) == (-4, 3)
    assert integer_range(4, True) == (-8, 7)
    assert integer_range(8, True) == (-128, 127)
    assert integer_range(4, False) == (0, 15)


def test_weight_forward_clamps_then_rounds_half_to_even():
    s = torch.tensor([0.5])
    # w/s = 0.5 -> 0 (half to even), 1.5 -> 2 but clipped at Qp=1 for 2 bits, -2.6 -> -2 (clip), 2.5 -> 1
    w = torch.tensor([0.25, 0.75, -1.3, 1.25, -0.25])
    out = fake_quant_weight(w, s, -2, 1, 1.0)
    assert torch.equal(out, torch.tensor([0.0, 0.5, -1.0, 0.5, -0.0]))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_weight_gradients_match_closed_form(per_channel, bits):
    torch.manual_seed(0)
    qn, qp = integer_range(bits, True)
    w = torch.randn(6, 5, requires_grad=True)
    scale = (torch.rand(6, 1) * 0.5 + 0.1) if per_channel else torch.tensor([[0.3]])
    scale.requires_grad_(True)
    g = 0.37
    out = fake_quant_weight(w, scale, qn, qp, g)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()

    v = (w / scale).detach()
    inside = (v >= qn) & (v <= qp)
    expected_dw = upstream * inside
    d_s = torch.where(v < qn, float(qn), torch.where(v > qp, float(qp), torch.round(v) - v))
    expected_ds = (upstream * d_s).sum_to_size(scale.shape) * g
    assert torch.equal(w.grad, expected_dw)
    torch.testing.assert_close(scale.grad, expected_ds, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("signed", [True, False])
def test_activation_gradients_match_closed_form(per_channel, signed):
    torch.manual_seed(1)
    bits = 3
    qn, qp = integer_range(bits, signed)
    x = (torch.randn(4, 3, 5) * 2).requires_grad_(True)
    shape = (1, 3, 1) if per_channel else (1, 1, 1)
    scale = (torch.rand(shape) * 0.4 + 0.2).requires_grad_(True)
    zero = (torch.randn(shape) * 1.5).requires_grad_(True)
    g = 0.11
    out = fake_quant_activation(x, scale, zero, qn, qp, g)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()

    zt = torch.round(zero.detach())
    u = x.detach() / scale.detach() + zt
    low, high = u < qn, u > qp
    inside = ~(low | high)
    # forward closed form
    expected_out = (torch.round(u.clamp(qn, qp)) - zt) * scale.detach()
    assert torch.equal(out.detach(), expected_out)
    # dx: 1 inside, 0 clipped
    assert torch.equal(x.grad, upstream * inside)
    # ds: round(x/s + z) - z - x/s inside; Qn - z low; Qp - z high
    d_s = torch.where(low, qn - zt, torch.where(high, qp - zt, torch.round(u) - zt - x.detach() / scale.detach()))
    torch.testing.assert_close(scale.grad, (upstream * d_s).sum_to_size(shape) * g, rtol=1e-12, atol=1e-12)
    # dz: 0 inside, -s clipped
    d_z = torch.where(inside, torch.zeros_like(u), -scale.detach().expand_as(u))
    torch.testing.assert_close(zero.grad, (upstream * d_z).sum_to_size(shape) * g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_at_most_2_pow_b_levels_per_channel(bits):
    torch.manual_seed(2)
    q = LSQWeightQuantizer(bits, 4)
    w = torch.randn(4, 500) * 3
    q.initialize_from(w)
    out = q(w)
    for c in range(4):
        assert out[c].unique().numel() <= 2**bits
    a = LSQActQuantizer(bits, 4, axis=1, signed="auto").train()
    y = a(torch.randn(8, 4, 100))
    for c in range(4):
        assert y[:, c].unique().numel() <= 2**bits


def test_idempotence():
    torch.manual_seed(3)
    q = LSQWeightQuantizer(3, 5)
    w = torch.randn(5, 7)
    q.initialize_from(w)
    once = q(w)
    assert torch.equal(q(once), once)
    a = LSQActQuantizer(4, 5, axis=-1).train()
    x = torch.randn(3, 5)
    y = a(x)
    with torch.no_grad():
        a.zero_point.fill_(2.3)
    y = a(x)
    assert torch.equal(a(y), y)


def test_weight_init_rule_per_channel_and_tensor():
    torch.manual_seed(4)
    w = torch.randn(3, 10) * torch.tensor([[1.0], [2.0], [5.0]])
    q = LSQWeightQuantizer(4, 3)
    q.initialize_from(w)
    torch.testing.assert_close(q.scale, (2 * w.abs().mean(1) / math.sqrt(7)).to(q.scale))
    qt = LSQWeightQuantizer(4, 3, config=QuantizerConfig(init="tensor"))
    qt.initialize_from(w)
    torch.testing.assert_close(qt.scale, (2 * w.abs().mean() / math.sqrt(7)).expand(3).to(q.scale))
    assert int(q.initialized) == 1 and q.is_initialized


def test_activation_init_rule_and_signedness_detection():
    torch.manual_seed(5)
    relu_out = torch.rand(4, 6, 3, 3)
    a = LSQActQuantizer(4, 6, axis=1, signed="auto").train()
    a(relu_out)
    assert int(a.signed) == 0 and a.qrange == (0, 15)
    expected = 2 * relu_out.transpose(0, 1).reshape(6, -1).abs().mean(1) / math.sqrt(15)
    torch.testing.assert_close(a.scale.detach(), expected.to(a.scale))
    assert torch.equal(a.zero_point.detach(), torch.zeros(6, dtype=a.zero_point.dtype))
    b = LSQActQuantizer(4, 6, axis=1, signed="auto").train()
    b(relu_out - 0.5)
    assert int(b.signed) == 1 and b.qrange == (-8, 7)
    # decided once: a later batch with negatives does not flip it
    a(relu_out - 0.5)
    assert int(a.signed) == 0
    # stored flag survives a state_dict round trip
    c = LSQActQuantizer(4, 6, axis=1, signed="auto")
    c.load_state_dict(a.state_dict())
    assert c.is_initialized and c.qrange == (0, 15)


def test_lsq_plus_zero_point_init_covers_range():
    x = torch.rand(2, 4, 10) * 3 + 1.0  # in [1, 4]
    a = LSQActQuantizer(4, 4, axis=1, signed=False, config=QuantizerConfig(zero_point_init="lsq+")).train()
    y = a(x)
    assert (y - x).abs().max() <= a.scale.max() / 2 + 1e-6


def test_disabled_quantizer_is_exact_identity_and_uncalibrated_eval_raises():
    a = LSQActQuantizer(4, 3, axis=-1).eval()
    x = torch.randn(2, 3)
    with pytest.raises(UncalibratedQuantizerError, match="calibrate"):
        a(x)
    a.enabled = False
    assert a(x) is x


def test_grad_scale_modes():
    w = torch.randn(8, 16)
    q = LSQWeightQuantizer(4, 8)
    assert q.grad_scale(w) == pytest.approx(1 / math.sqrt(16 * 7))
    qt = LSQWeightQuantizer(4, 8, config=QuantizerConfig(grad_scale_numel="tensor"))
    assert qt.grad_scale(w) == pytest.approx(1 / math.sqrt(128 * 7))
    a = LSQActQuantizer(4, 8, axis=1, signed=True)
    x = torch.randn(2, 8, 5, 5)
    assert a.grad_scale(x) == pytest.approx(1 / math.sqrt(25 * 7))


def test_bits_validation():
    for bad in (1, 9, 4.0, "4", True):
        with pytest.raises(ValueError, match="from 2 to 8"):
            LSQWeightQuantizer(bad, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_quantizers_run_in_any_float_dtype(dtype):
    w = torch.randn(4, 6).to(dtype)
    q = LSQWeightQuantizer(4, 4)
    q.initialize_from(w)
    assert q(w).dtype == dtype
    a = LSQActQuantizer(4, 6, axis=-1).train()
    assert a(w).dtype == dtype


def test_compiled_kernels_match_eager():
    """The compiled backend gives bit-identical forwards and equal gradients up to sum order."""
    from qdetr.quant import kernels

    torch.manual_seed(7)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float32) * 3
    s = (torch.rand(1, 6, 1, 1) + 0.1).requires_grad_(True)
    z = (torch.randn(1, 6, 1, 1) * 2).requires_grad_(True)
    w = torch.randn(6, 4, dtype=torch.float32, requires_grad=True)
    sw = (torch.rand(6, 1) * 0.3 + 0.05).requires_grad_(True)
    results = {}
    previous = kernels.get_kernel_backend()
    for backend in ("eager", "compiled"):
        kernels.set_kernel_backend(backend)
        try:
            xi = x.clone().requires_grad_(True)
            y = fake_quant_activation(xi, s, z, -8, 7, 0.5)
            yw = fake_quant_weight(w, sw, -2, 1, 0.25)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add((yw * 0.3).sum()).backward()
            results[backend] = [t.detach().clone() for t in (y, yw, xi.grad, s.grad, z.grad, w.grad, sw.grad)]
            for t in (s, z, w, sw):
                t.grad = None
        finally:
            kernels.set_kernel_backend(previous)
    e, c = results["eager"], results["compiled"]
    for i in (0, 1, 2, 5):  # forwards and input/weight gradients: exact
        assert torch.equal(e[i], c[i])
    for i in (3, 4, 6):  # reductions: same values up to summation order
        torch.testing.assert_close(e[i], c[i], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kernel backend"):
        kernels.set_kernel_backend("cuda")


# ----------------------------------------------------------------------------------------
# The default (native) and eager kernels against the reference closed forms, on every code
# path: native single-pass loops; eager whole-tensor kernels for small tensors and blocked
# CPU kernels (three tilings) for large ones; per-channel steps on axis 0 / 1 / -1 and
# per-tensor steps, gradients written in place or into a new tensor.


@pytest.fixture(params=["native", "eager"])
def backend(request):
    from qdetr.quant import kernels

    previous = kernels.get_kernel_backend()
    kernels.set_kernel_backend(request.param)
    yield request.param
    kernels.set_kernel_backend(previous)

_LAYOUTS = {
    "conv_input_per_channel": ((3, 6, 7, 9), (1, 6, 1, 1)),  # (B, C, H, W), axis 1
    "linear_input_per_channel": ((4, 10, 12), (1, 1, 12)),  # (B, L, C), axis -1
    "weight_per_channel": ((10, 4, 3, 3), (10, 1, 1, 1)),  # (C_out, C_in, k, k), axis 0
    "per_tensor": ((3, 6, 7, 9), (1, 1, 1, 1)),  # the "deploy" profile's activations
}


def _reference_activation(x, s, z, qn, qp, g, upstream):
    """Out-of-place closed form with autograd-free gradients (method.md section 3.2)."""
    from qdetr.quant import kernels

    out = kernels._act_forward_pure(x, s, z, qn, qp)
    grad_x, grad_s, grad_z = kernels._act_backward_pure(x, s, z, upstream, qn, qp)
    return out, grad_x, grad_s * g, grad_z * g


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("block", [40, 1 << 18])  # 40: every blocked tiling; 1 << 18: whole-tensor kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_kernels_match_reference(layout, block, dtype, backend, monkeypatch):
    from qdetr.quant import kernels

    monkeypatch.setattr(kernels, "BLOCK_NUMEL", block)
    x_shape, s_shape = _LAYOUTS[layout]
    torch.manual_seed(11)
    x = (torch.randn(x_shape, dtype=dtype) * 3).requires_grad_(True)
    s = (torch.rand(s_shape, dtype=dtype) * 0.4 + 0.2).requires_grad_(True)
    z = (torch.randn(s_shape, dtype=dtype) * 2).requires_grad_(True)
    upstream = torch.randn(x_shape, dtype=dtype)
    qn, qp = integer_range(3, True)
    g = 0.3
    for grad_in_place in (False, True):
        out = fake_quant_activation(x, s, z, qn, qp, g, grad_in_place=grad_in_place)
        out.backward(upstream.clone())
        ref = _reference_activation(x.detach(), s.detach(), z.detach(), qn, qp, g, upstream)
        assert torch.equal(out.detach(), ref[0])  # forward: bit-identical
        assert torch.equal(x.grad, ref[1])  # input gradient: the same 0/1 mask
        tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-10}
        torch.testing.assert_close(s.grad, ref[2], **tol)  # step sums: equal up to summation order
        torch.testing.assert_close(z.grad, ref[3], **tol)
        x.grad = s.grad = z.grad = None

    w = torch.randn(x_shape, dtype=dtype).requires_grad_(True)
    sw = (torch.rand(s_shape, dtype=dtype) * 0.3 + 0.05).requires_grad_(True)
    for grad_in_place in (False, True):
        out = fake_quant_weight(w, sw, -2, 1, g, grad_in_place=grad_in_place)
        out.backward(upstream.clone())
        grad_w, grad_s = kernels._weight_backward_pure(w.detach(), sw.detach(), upstream, -2, 1)
        assert torch.equal(out.detach(), kernels._weight_forward_pure(w.detach(), sw.detach(), -2, 1))
        assert torch.equal(w.grad, grad_w)
        torch.testing.assert_close(sw.grad, grad_s * g, **tol)
        w.grad = sw.grad = None


def test_blocked_backward_writes_into_an_owned_gradient(backend, monkeypatch):
    """With grad_in_place the CPU backward (native, or eager for large tensors) reuses the
    incoming gradient's memory."""
    from qdetr.quant import kernels

    monkeypatch.setattr(kernels, "BLOCK_NUMEL", 64)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float32)
    s, z = torch.full((1, 4, 1, 1), 0.3), torch.zeros(1, 4, 1, 1)
    grad = torch.randn_like(x)
    expected = kernels.act_backward(x, s.float(), z.float(), grad, -8, 7)
    with torch.no_grad():
        owned = grad.clone()
        got = kernels.act_backward(x, s.float(), z.float(), owned, -8, 7, grad_in_place=True)
    assert got[0].data_ptr() == owned.data_ptr()
    assert expected[0].data_ptr() != grad.data_ptr()
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_quantized_layers_match_unfused_reference(granularity, backend, monkeypatch):
    """QuantConv2d / QuantLinear (whose quantizers reuse gradients in place) give the same
    outputs and gradients as quantizer + float op composed by hand."""
    import torch.nn.functional as F
    from torch import nn

    from qdetr.quant import kernels
    from qdetr.quant.config import LayerQuantSpec
    from qdetr.quant.modules import QuantConv2d, QuantLinear

    monkeypatch.setattr(kernels, "BLOCK_NUMEL", 50)
    torch.manual_seed(12)
    act = QuantizerConfig(granularity=granularity)
    spec = LayerQuantSpec(weight_bits=4, input_bits=4, input_signed=True, activation=act)
    for layer, x in (
        (QuantConv2d.from_float(nn.Conv2d(4, 6, 3, padding=1), spec), torch.randn(2, 4, 9, 9)),
        (QuantLinear.from_float(nn.Linear(12, 7), spec), torch.randn(3, 5, 12)),
    ):
        layer.train()
        layer(x)  # calibrates
        x1 = x.clone().requires_grad_(True)
        y = layer(x1)
        up = torch.randn_like(y)
        y.backward(up)
        got = [x1.grad] + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
        x2 = x.clone().requires_grad_(True)
        x_hat = layer.input_quantizer(x2)
        w_hat = layer.weight_quantizer(layer.weight)
        if isinstance(layer, QuantConv2d):
            y2 = F.conv2d(x_hat, w_hat, layer.bias, padding=1)
        else:
            y2 = F.linear(x_hat, w_hat, layer.bias)
        y2.backward(up)
        expected = [x2.grad] + [p.grad.clone() for p in layer.parameters()]
        assert torch.equal(y, y2)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        layer.zero_grad()


def test_double_backward_does_not_write_gradients_in_place():
    """Under create_graph the incoming gradient may be needed again: no in-place reuse."""
    from torch import nn

    from qdetr.quant.config import LayerQuantSpec
    from qdetr.quant.modules import QuantLinear

    torch.manual_seed(13)
    layer = QuantLinear.from_float(nn.Linear(6, 4), LayerQuantSpec(weight_bits=4, input_bits=4, input_signed=True))
    layer.train()
    x = torch.randn(3, 6, requires_grad=True)
    layer(x)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    (gx_plain,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert torch.equal(gx.detach(), gx_plain)
