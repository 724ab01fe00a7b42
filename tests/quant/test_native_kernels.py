"""The native (C) fake-quantization kernels against the eager ones: bit-identical forwards and
input / weight gradients, equal step sums, the same results on several threads, and a clean
fallback to the eager kernels where no C compiler works."""

import logging

import pytest
import torch

from qdetr.quant import kernels, native_kernels

pytestmark = pytest.mark.skipif(
    not native_kernels.native_kernels_available(), reason="no working C compiler on this machine"
)

# (data shape, step shape): conv inputs (axis 1), linear inputs (axis -1, the channel-vector
# loop), conv weights (axis 0), per-tensor steps.
_LAYOUTS = [
    ((2, 6, 7, 9), (1, 6, 1, 1)),
    ((4, 5, 12), (1, 1, 12)),
    ((10, 4, 3, 3), (10, 1, 1, 1)),
    ((3, 6, 7, 9), (1, 1, 1, 1)),
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _inputs(x_shape, s_shape, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g, dtype=dtype) * 3
    # signed zeros, NaN, ties at .5 and the clip boundaries all take the same path as eager
    x.view(-1)[:6] = torch.tensor([-0.0, 0.0, float("nan"), 0.5, -0.5, 2.5], dtype=dtype)
    s = torch.rand(s_shape, generator=g, dtype=dtype) * 0.5 + 0.2
    z = torch.randn(s_shape, generator=g, dtype=dtype) * 2
    grad = torch.randn(x_shape, generator=g, dtype=dtype)
    return x, s, z, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", range(len(_LAYOUTS)))
@pytest.mark.parametrize("qrange", [(0, 15), (-8, 7), (-2, 1)])
def test_native_kernels_are_bit_identical_to_eager(dtype, layout, qrange):
    x, s, z, grad = _inputs(*_LAYOUTS[layout], dtype)
    qn, qp = qrange
    close = {"rtol": 1e-5, "atol": 1e-5, "equal_nan": True}
    assert torch.equal(_bits(native_kernels.act_forward(x, s, z, qn, qp)), _bits(kernels._act_forward_eager(x, s, z, qn, qp)))
    assert torch.equal(_bits(native_kernels.weight_forward(x, s, qn, qp)), _bits(kernels._weight_forward_eager(x, s, qn, qp)))
    got = native_kernels.act_backward(x, s, z, grad.clone(), qn, qp, True)
    ref = kernels._act_backward_eager(x, s, z, grad, qn, qp)
    assert torch.equal(_bits(got[0]), _bits(ref[0]))
    for a, b in zip(got[1:], ref[1:]):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **close)
    got = native_kernels.weight_backward(x, s, grad, qn, qp, False)
    ref = kernels._weight_backward_eager(x, s, grad, qn, qp)
    assert torch.equal(_bits(got[0]), _bits(ref[0]))
    torch.testing.assert_close(got[1], ref[1], **close)


def test_native_backward_writes_in_place_only_when_allowed():
    x, s, z, grad = _inputs((2, 6, 7, 9), (1, 6, 1, 1), torch.float32)
    owned = grad.clone()
    assert native_kernels.act_backward(x, s, z, owned, -8, 7, True)[0].data_ptr() == owned.data_ptr()
    kept = grad.clone()
    out = native_kernels.act_backward(x, s, z, kept, -8, 7, False)[0]
    assert out.data_ptr() != kept.data_ptr() and torch.equal(kept, grad)


def test_native_kernels_split_over_threads_give_the_same_results(monkeypatch):
    monkeypatch.setattr(native_kernels, "PARALLEL_MIN_NUMEL", 1)
    x, s, z, grad = _inputs((4, 6, 7, 9), (1, 6, 1, 1), torch.float64)
    x2, s2, _, grad2 = _inputs((5, 12), (1, 12), torch.float64)
    previous = torch.get_num_threads()
    results = {}
    for threads in (1, 3):
        torch.set_num_threads(threads)
        try:
            results[threads] = [
                native_kernels.act_forward(x, s, z, -8, 7),
                *native_kernels.act_backward(x, s, z, grad.clone(), -8, 7, True),
                *native_kernels.weight_backward(x2, s2, grad2.clone(), -4, 3, True),
            ]
        finally:
            torch.set_num_threads(previous)
    for a, b in zip(results[1], results[3]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize(
    "case",
    ["bfloat16", "non_contiguous", "mixed_dtypes", "two_step_axes", "grad_recording", "wide_range"],
)
def test_native_kernels_decline_what_they_do_not_cover(case):
    x, s, z, _ = _inputs((2, 6, 7, 9), (1, 6, 1, 1), torch.float32)
    qn, qp = -8, 7
    if case == "bfloat16":
        x, s, z = x.bfloat16(), s.bfloat16(), z.bfloat16()
    elif case == "non_contiguous":
        x = x[..., ::2]  # strided, not a permutation of a contiguous tensor
    elif case == "mixed_dtypes":
        s = s.double()
    elif case == "two_step_axes":
        s = torch.rand(1, 6, 7, 1) + 0.1
        z = torch.zeros(1, 6, 7, 1)
    elif case == "grad_recording":
        x.requires_grad_(True)
    else:
        qn, qp = -(1 << 23), 1 << 23
    assert native_kernels.act_forward(x, s, z, qn, qp) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_permuted_views_are_quantized_in_memory_order(dtype):
    """Per-head q / k / v: (B, h, L, d_h) views of (B, L, h, d_h) tensors, steps per head. The
    forward runs natively, bit-identical to eager and with eager's strides; the backward of such
    a view stays eager."""
    x, s, z, grad = _inputs((2, 7, 4, 8), (1, 1, 4, 1), dtype)
    x, grad, s, z = x.transpose(1, 2), grad.transpose(1, 2), s.transpose(1, 2), z.transpose(1, 2)
    got = native_kernels.act_forward(x, s, z, -128, 127)
    ref = kernels._act_forward_eager(x, s, z, -128, 127)
    assert got is not None and got.stride() == ref.stride() == x.stride()
    assert torch.equal(_bits(got), _bits(ref))
    assert native_kernels.act_backward(x, s, z, grad, -128, 127, False) is None


def test_fallback_to_eager_logs_one_line(monkeypatch, tmp_path, caplog):
    """Without a C compiler the default backend runs the eager kernels and says so once."""
    monkeypatch.setattr(native_kernels, "_state", {"lib": None, "error": None, "tried": False})
    monkeypatch.setattr(native_kernels, "_compiler", lambda: None)
    monkeypatch.setenv("QDETR_CACHE", str(tmp_path))
    x, s, z, _ = _inputs((2, 6, 7, 9), (1, 6, 1, 1), torch.float32)
    previous = kernels.get_kernel_backend()
    kernels.set_kernel_backend("native")
    try:
        with caplog.at_level(logging.WARNING, logger=native_kernels.__name__):
            first = kernels.act_forward(x, s, z, -8, 7)
            second = kernels.act_forward(x, s, z, -8, 7)
    finally:
        kernels.set_kernel_backend(previous)
    assert torch.equal(_bits(first), _bits(kernels._act_forward_eager(x, s, z, -8, 7)))
    assert torch.equal(_bits(first), _bits(second))
    messages = [r.getMessage() for r in caplog.records if r.name == native_kernels.__name__]
    assert len(messages) == 1 and "using eager kernels" in messages[0] and "no C compiler" in messages[0]
    assert not native_kernels.native_kernels_available()
    assert "no C compiler" in native_kernels.native_build_error()


def test_build_is_cached_per_machine(tmp_path):
    first = native_kernels._build(tmp_path)
    built = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    second = native_kernels._build(tmp_path)
    assert len(built) == 1 and built[0].startswith("fake_quant-") and built[0].endswith(".so")
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == built  # reused, nothing left over
    assert first._name == second._name


@pytest.mark.filterwarnings("ignore:`torch.jit.trace", "ignore::torch.jit.TracerWarning")
def test_traced_models_record_the_quantizer_not_a_constant():
    """A traced quantized layer recomputes the quantizer on new inputs (no baked-in constant)."""
    from torch import nn

    from qdetr.quant.config import LayerQuantSpec
    from qdetr.quant.modules import QuantLinear

    torch.manual_seed(5)
    layer = QuantLinear.from_float(nn.Linear(8, 4), LayerQuantSpec(weight_bits=4, input_bits=4, input_signed=True))
    layer.train()(torch.randn(16, 8))  # calibrates
    layer.eval()
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(16, 8), check_trace=False)
        other = torch.randn(16, 8) * 2
        assert torch.equal(traced(other), layer(other))
