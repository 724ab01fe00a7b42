"""Elementwise fake-quantization kernels: native, eager or compiled.

The autograd functions of :mod:`qdetr.quant.primitives` call the four kernels below. Three
implementations exist:

* ``"native"`` (default): on CPU, single-pass C loops (:mod:`qdetr.quant.native_kernels`),
  built with the system C compiler on first use (about a second, cached per machine):
  one pass over memory in forward, one in backward, the input gradient written into the
  incoming gradient's memory where the caller allows it. Forward outputs and input / weight
  gradients are bit-identical to ``"eager"``; step-size and zero-point gradients are the same
  sums accumulated in float64, so they agree to float rounding. Tensors the loops do not cover
  (CUDA, half precision, non-contiguous, steps on more than one axis) and every call when no
  C compiler works (one log line says so) run the eager kernels.
* ``"eager"``: PyTorch operations, in place on freshly allocated buffers, so a
  forward pass costs one allocation. The operations and their order match the closed form
  exactly. The straight-through masks are 0./1. tensors of the data's dtype, so every backward
  pass is a vectorized multiply. On CPU the backward of a large tensor runs blockwise
  (:data:`BLOCK_NUMEL` elements at a time) on per-thread scratch buffers that are reused
  across calls, so its intermediates stay in cache and cost no fresh memory; with
  ``grad_in_place=True`` (set by ``QuantConv2d`` / ``QuantLinear``, whose conv / linear
  backward hands the quantizer a gradient nobody else holds) the input gradient is written
  into that gradient's memory and the backward allocates nothing of the tensor's size.
* ``"compiled"``: the same formulas compiled once per tensor rank with ``torch.compile``
  (dynamic shapes) into fused loops: one pass over memory in forward, two in backward.
  Forward outputs are bit-identical to ``"eager"``; step-size and zero-point gradients are
  sums whose order differs, so they agree to float rounding. The first call of each rank
  costs a few seconds of compilation. On CPU it is slower than ``"native"`` (per-call
  overhead, fresh output buffers); it is meant for CUDA. If compilation fails (no C++
  compiler, unsupported platform), qdetr warns once and falls back to ``"eager"``.

Select a backend with :func:`set_kernel_backend` or the ``QDETR_QUANT_KERNELS`` environment
variable. Inside a ``torch.compile`` region the eager formulas are always used (the outer
compiler fuses them itself).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings

import torch

from qdetr.quant import native_kernels

__all__ = ["set_kernel_backend", "get_kernel_backend", "weight_forward", "weight_backward", "act_forward", "act_backward"]

_BACKENDS = ("native", "eager", "compiled")
_state = {"backend": os.environ.get("QDETR_QUANT_KERNELS", "native"), "compiled": None}
if _state["backend"] not in _BACKENDS:
    raise ValueError(f"QDETR_QUANT_KERNELS must be one of {_BACKENDS}; got {_state['backend']!r}")


def set_kernel_backend(name: str) -> None:
    """Choose ``"native"``, ``"eager"`` or ``"compiled"`` fake-quantization kernels (see the module docstring).

    Args:
        name: ``"native"`` (the default), ``"eager"`` or ``"compiled"``.

    Raises:
        ValueError: for any other name.

    Examples:
        >>> previous = get_kernel_backend()
        >>> set_kernel_backend("eager")        # "native" and "compiled" are selected the same way
        >>> get_kernel_backend()
        'eager'
        >>> set_kernel_backend(previous)
    """
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend must be one of {_BACKENDS}; got {name!r}")
    _state["backend"] = name


def get_kernel_backend() -> str:
    """The active kernel backend, ``"native"``, ``"eager"`` or ``"compiled"``.

    Examples:
        >>> get_kernel_backend() in ("native", "eager", "compiled")
        True
    """
    return _state["backend"]


# ----------------------------------------------------------------------------- eager


def _weight_forward_eager(w, s, qn: int, qp: int):
    return torch.div(w, s).clamp_(qn, qp).round_().mul_(s)


def _weight_backward_eager(w, s, grad, qn: int, qp: int):
    # Three buffers of w's size (v, q and the returned grad_w); every pass is a vectorized
    # arithmetic op (0/1 float masks instead of boolean masks, whose CPU kernels are slow).
    v = torch.div(w, s)
    q = torch.clamp(v, qn, qp)
    inside = v.eq_(q)  # 1. where w/s was not clipped, 0. where it was (or is NaN)
    grad_w = torch.mul(grad, _as_dtype(inside, grad))
    # inside: round(v) - v; below: Qn; above: Qp  ->  round(q) - q * inside (q is finite)
    q_inside = inside.mul_(q)
    d_scale = q.round_().sub_(q_inside)
    return grad_w, d_scale.mul_(grad).sum_to_size(s.shape)


def _act_forward_eager(x, s, z, qn: int, qp: int):
    zr = torch.round(z)
    return torch.div(x, s).add_(zr).clamp_(qn, qp).round_().sub_(zr).mul_(s)


def _act_backward_eager(x, s, z, grad, qn: int, qp: int):
    # Three buffers of x's size (v, q and the returned grad_x), as in _weight_backward_eager.
    zr = torch.round(z)
    v = torch.div(x, s).add_(zr)
    q = torch.clamp(v, qn, qp)
    inside = v.eq_(q)  # 1. where x/s + round(z) was not clipped, 0. where it was
    grad_x = torch.mul(grad, _as_dtype(inside, grad))
    # Per step: the sum of grad over clipped elements.
    clipped_sum = grad.sum_to_size(z.shape) - grad_x.sum_to_size(z.shape)
    # d(x̂)/ds: inside round(v) - v; clipped Qn - round(z) or Qp - round(z). The round(z) part is
    # constant per step, so it leaves the elementwise pass:
    # sum(grad * (round(q) - q * inside)) - round(z) * clipped_sum.
    q_inside = inside.mul_(q)
    d_scale = q.round_().sub_(q_inside)
    grad_s = d_scale.mul_(grad).sum_to_size(s.shape) - zr * clipped_sum
    # d(x̂)/dz: inside 0; clipped -s.
    grad_z = -s * clipped_sum
    return grad_x, grad_s, grad_z


def _as_dtype(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask (exact in every float dtype) in ``like``'s dtype, so products keep that dtype."""
    return mask if mask.dtype == like.dtype else mask.to(like.dtype)


# ------------------------------------------------------------------ blocked backward

#: Elements per block of the blocked CPU backward kernels (see :func:`_blocked_layout`).
BLOCK_NUMEL = 1 << 18

_scratch_local = threading.local()


def _scratch(dtype: torch.dtype) -> torch.Tensor:
    """Three persistent (BLOCK_NUMEL,) CPU buffers of ``dtype`` for this thread.

    Reusing them keeps the backward pass from touching fresh memory: a new buffer costs its
    page faults and cache misses on every call, which on CPU outweighs the arithmetic.
    """
    cache = getattr(_scratch_local, "buffers", None)
    if cache is None:
        cache = _scratch_local.buffers = {}
    buf = cache.get(dtype)
    if buf is None or buf.shape[1] != BLOCK_NUMEL:
        buf = cache[dtype] = torch.empty(3, BLOCK_NUMEL, dtype=dtype)
    return buf


def _blocks(shape3: tuple[int, int, int], block: int):
    """Index pairs ``(big, small)`` that tile a (P, C, Q) tensor into contiguous blocks of
    <= ``block`` elements; ``big`` indexes the (P, C, Q) tensors and ``small`` the (1, C, 1)
    steps so that the two broadcast against each other."""
    p_size, c_size, q_size = shape3
    if c_size * q_size <= block:  # whole rows (n, C, Q)
        rows = block // (c_size * q_size)
        for p0 in range(0, p_size, rows):
            yield (slice(p0, p0 + rows),), (slice(None),)
    elif q_size <= block:  # channel ranges of one row (c, Q)
        chans = block // q_size
        for p in range(p_size):
            for c0 in range(0, c_size, chans):
                yield (p, slice(c0, c0 + chans)), (0, slice(c0, c0 + chans))
    else:  # pieces of one channel (n,)
        for p in range(p_size):
            for c in range(c_size):
                for q0 in range(0, q_size, block):
                    yield (p, c, slice(q0, q0 + block)), (0, c)


def _blocked_layout(big: list[torch.Tensor], small: list[torch.Tensor]):
    """(P, C, Q) views of ``big`` and (1, C, 1) views of ``small`` for the blocked kernels, or
    None where they do not apply: non-CPU or small tensors, non-contiguous or differently
    shaped ones, steps of another rank or layout, torch.compile tracing, autograd recording."""
    ref = big[0]
    if ref.device.type != "cpu" or ref.numel() <= BLOCK_NUMEL or torch.compiler.is_compiling():
        return None
    if any(t.shape != ref.shape or not t.is_contiguous() for t in big):
        return None
    if any(t.dim() != ref.dim() or t.shape != small[0].shape for t in small):
        return None
    if torch.is_grad_enabled():
        return None
    axis = _channel_axis(small[0])
    if axis is None and small[0].numel() != 1:
        return None
    return [_as_3d(t, axis, ref.dim()) for t in big], [t.reshape(1, -1, 1) for t in small]


def _partial_sum(t: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``t.sum_to_size(shape)`` accumulated in ``dtype``."""
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1]
    return t.sum(dims, keepdim=True, dtype=dtype).view(shape) if dims else t.to(dtype)


def _block_buffers(scratch: torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:
    n = like.numel()
    return [scratch[i, :n].view(like.shape) for i in range(3)]


def _weight_backward_blocked(w, s, grad, qn: int, qp: int, grad_in_place: bool):
    layout = _blocked_layout([w, grad], [s])
    dtype = torch.result_type(w, s)
    if layout is None or grad.dtype != dtype:
        return None
    (w3, g3), (s3,) = layout
    scratch = _scratch(dtype)
    grad_w = grad if grad_in_place else torch.empty_like(grad)
    gw3 = grad_w.view(w3.shape)
    acc = torch.zeros(s3.shape, dtype=torch.promote_types(dtype, torch.float32))
    for big, small in _blocks(tuple(w3.shape), BLOCK_NUMEL):
        wb, gb, sb = w3[big], g3[big], s3[small]
        v, q, q_inside = _block_buffers(scratch, wb)
        torch.clamp(torch.div(wb, sb, out=v), qn, qp, out=q)
        inside = v.eq_(q)
        torch.mul(q, inside, out=q_inside)
        acc[small] += _partial_sum(q.round_().sub_(q_inside).mul_(gb), sb.shape, acc.dtype)
        torch.mul(gb, inside, out=gw3[big])
    return grad_w, acc.to(dtype).view(s.shape)


def _act_backward_blocked(x, s, z, grad, qn: int, qp: int, grad_in_place: bool):
    layout = _blocked_layout([x, grad], [s, z])
    dtype = torch.result_type(x, s)
    if layout is None or grad.dtype != dtype:
        return None
    (x3, g3), (s3, z3) = layout
    zr3 = torch.round(z3)
    scratch = _scratch(dtype)
    grad_x = grad if grad_in_place else torch.empty_like(grad)
    gx3 = grad_x.view(x3.shape)
    acc_dtype = torch.promote_types(dtype, torch.float32)
    acc_d, acc_clipped = torch.zeros(s3.shape, dtype=acc_dtype), torch.zeros(s3.shape, dtype=acc_dtype)
    for big, small in _blocks(tuple(x3.shape), BLOCK_NUMEL):
        xb, gb, sb, zb = x3[big], g3[big], s3[small], zr3[small]
        v, q, q_inside = _block_buffers(scratch, xb)
        torch.clamp(torch.div(xb, sb, out=v).add_(zb), qn, qp, out=q)
        inside = v.eq_(q)
        torch.mul(q, inside, out=q_inside)
        acc_clipped[small] += _partial_sum(gb, sb.shape, acc_dtype)
        acc_d[small] += _partial_sum(q.round_().sub_(q_inside).mul_(gb), sb.shape, acc_dtype)
        acc_clipped[small] -= _partial_sum(torch.mul(gb, inside, out=gx3[big]), sb.shape, acc_dtype)
    clipped_sum = acc_clipped.to(dtype)
    grad_s = acc_d.to(dtype) - zr3 * clipped_sum
    grad_z = -s3 * clipped_sum
    return grad_x, grad_s.view(s.shape), grad_z.view(z.shape)


# -------------------------------------------------------------------------- compiled


def _weight_backward_pure(w, s, grad, qn: int, qp: int):
    v = w / s
    q = v.clamp(qn, qp)
    outside = q != v
    grad_w = torch.where(outside, 0.0, grad)
    d_scale = torch.round(q) - torch.where(outside, 0.0, v)
    return grad_w, (grad * d_scale).sum_to_size(s.shape)


def _weight_forward_pure(w, s, qn: int, qp: int):
    return torch.round((w / s).clamp(qn, qp)) * s


def _act_forward_pure(x, s, z, qn: int, qp: int):
    zr = torch.round(z)
    return (torch.round((x / s + zr).clamp(qn, qp)) - zr) * s


def _act_backward_pure(x, s, z, grad, qn: int, qp: int):
    zr = torch.round(z)
    v = x / s + zr
    q = v.clamp(qn, qp)
    outside = q != v
    grad_x = torch.where(outside, 0.0, grad)
    d_scale = torch.round(q) - torch.where(outside, zr, v)
    grad_s = (grad * d_scale).sum_to_size(s.shape)
    grad_z = (grad_x.sum_to_size(z.shape) - grad.sum_to_size(z.shape)) * s
    return grad_x, grad_s, grad_z


def _compiled():
    if _state["compiled"] is None:
        opts = {"dynamic": True, "fullgraph": True}
        _state["compiled"] = {
            "weight_forward": torch.compile(_weight_forward_pure, **opts),
            "weight_backward": torch.compile(_weight_backward_pure, **opts),
            "act_forward": torch.compile(_act_forward_pure, **opts),
            "act_backward": torch.compile(_act_backward_pure, **opts),
        }
    return _state["compiled"]


def _channel_axis(s: torch.Tensor) -> int | None:
    axes = [i for i, n in enumerate(s.shape) if n != 1]
    return axes[0] if len(axes) == 1 else None


def _as_3d(t: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    """View ``t`` as (pre, C, post) around the channel axis (C = 1 per tensor)."""
    if axis is None:
        return t.view(1, 1, -1)
    pre = 1
    for n in t.shape[:axis]:
        pre *= n
    return t.view(pre, t.shape[axis], -1)


def _compiled_call(name: str, big: list[torch.Tensor], small: list[torch.Tensor], ints: tuple):
    """Run a compiled kernel on (pre, C, post) views; None if the inputs do not allow it."""
    ref = big[0]
    ndim = ref.dim()
    if any(t.shape != ref.shape or not t.is_contiguous() for t in big):
        return None
    axis = _channel_axis(small[0])
    if axis is None and small[0].numel() != 1:
        return None
    big3 = [_as_3d(t, axis, ndim) for t in big]
    small3 = [t.reshape(1, -1, 1) for t in small]
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch({limit: 64}):
        out = _compiled()[name](*big3[:1], *small3, *big3[1:], *ints)
    outs = out if isinstance(out, tuple) else (out,)
    restored = []
    for o in outs:
        if o.shape == big3[0].shape:
            restored.append(o.view(ref.shape))
        else:  # reduced step/zero-point gradient: back to the step's own shape
            restored.append(o.view(small[0].shape))
    return tuple(restored) if isinstance(out, tuple) else restored[0]


def _dispatch(name: str, eager, big: list[torch.Tensor], small: list[torch.Tensor], ints: tuple, blocked=None, native=None):
    if _state["backend"] == "native" and native is not None:
        out = native(*(big[:1] + small + big[1:]), *ints)
        if out is not None:
            return out
    if _state["backend"] == "compiled" and not torch.compiler.is_compiling():
        try:
            out = _compiled_call(name, big, small, ints)
            if out is not None:
                return out
        except Exception as exc:  # compilation unavailable: fall back once, loudly
            warnings.warn(
                f"compiled fake-quantization kernels are unavailable ({type(exc).__name__}: {exc}); "
                "falling back to eager kernels",
                RuntimeWarning,
                stacklevel=3,
            )
            _state["backend"] = "eager"
    args = big[:1] + small + big[1:]
    if blocked is not None:
        out = blocked(*args, *ints)
        if out is not None:
            return out
    return eager(*args, *ints)


def weight_forward(w, s, qn: int, qp: int):
    """``round(clip(w / s, Qn, Qp)) * s``.

    Args:
        w: weight, any shape, e.g. (C_out, C_in).
        s: positive steps broadcastable to ``w``, e.g. (C_out, 1).
        qn, qp: integer range.

    Returns:
        Tensor shaped like ``w``.

    Examples:
        >>> weight_forward(torch.tensor([[0.26, -1.0, 9.0]]), torch.tensor([[0.5]]), -8, 7)
        tensor([[ 0.5000, -1.0000,  3.5000]])
    """
    return _dispatch("weight_forward", _weight_forward_eager, [w], [s], (qn, qp), native=native_kernels.weight_forward)


def weight_backward(w, s, grad, qn: int, qp: int, *, grad_in_place: bool = False):
    """``(grad_w, grad_s)`` before the LSQ gradient scale (method.md section 2).

    Args:
        w: weight, any shape.
        s: positive steps broadcastable to ``w``.
        grad: gradient of the output, shaped like ``w``.
        qn, qp: integer range.
        grad_in_place: the caller owns ``grad`` and allows ``grad_w`` to be written into it
            (the eager CPU kernels then allocate nothing of ``w``'s size).

    Returns:
        ``grad_w`` shaped like ``w`` (zero where clipped) and ``grad_s`` shaped like ``s``.

    Examples:
        >>> w, s = torch.randn(4, 3), torch.full((4, 1), 0.1)
        >>> grad_w, grad_s = weight_backward(w, s, torch.ones_like(w), -8, 7)
        >>> grad_w.shape, grad_s.shape
        (torch.Size([4, 3]), torch.Size([4, 1]))
    """
    blocked = functools.partial(_weight_backward_blocked, grad_in_place=grad_in_place)
    native = functools.partial(native_kernels.weight_backward, grad_in_place=grad_in_place)
    return _dispatch("weight_backward", _weight_backward_eager, [w, grad], [s], (qn, qp), blocked, native)


def act_forward(x, s, z, qn: int, qp: int):
    """``(round(clip(x / s + round(z), Qn, Qp)) - round(z)) * s``.

    Args:
        x: activation, any shape, e.g. (B, L, C).
        s: positive steps broadcastable to ``x``, e.g. (1, 1, C).
        z: zero points broadcastable to ``x`` (used as ``round(z)``).
        qn, qp: integer range.

    Returns:
        Tensor shaped like ``x``.

    Examples:
        >>> act_forward(torch.tensor([0.3, 2.0, -1.0]), torch.tensor(0.25), torch.tensor(0.0), 0, 3)
        tensor([0.2500, 0.7500, 0.0000])
    """
    return _dispatch("act_forward", _act_forward_eager, [x], [s, z], (qn, qp), native=native_kernels.act_forward)


def act_backward(x, s, z, grad, qn: int, qp: int, *, grad_in_place: bool = False):
    """``(grad_x, grad_s, grad_z)`` before the LSQ gradient scale (method.md section 3.2).

    Args:
        x: activation, any shape.
        s: positive steps broadcastable to ``x``.
        z: zero points shaped like ``s``.
        grad: gradient of the output, shaped like ``x``.
        qn, qp: integer range.
        grad_in_place: the caller owns ``grad`` and allows ``grad_x`` to be written into it.

    Returns:
        ``grad_x`` shaped like ``x`` (zero where clipped), ``grad_s`` and ``grad_z`` shaped like ``s``.

    Examples:
        >>> x, s, z = torch.randn(2, 5, 3), torch.full((1, 1, 3), 0.1), torch.zeros(1, 1, 3)
        >>> gx, gs, gz = act_backward(x, s, z, torch.ones_like(x), -8, 7)
        >>> gx.shape, gs.shape, gz.shape
        (torch.Size([2, 5, 3]), torch.Size([1, 1, 3]), torch.Size([1, 1, 3]))
    """
    blocked = functools.partial(_act_backward_blocked, grad_in_place=grad_in_place)
    native = functools.partial(native_kernels.act_backward, grad_in_place=grad_in_place)
    return _dispatch("act_backward", _act_backward_eager, [x, grad], [s, z], (qn, qp), blocked, native)
