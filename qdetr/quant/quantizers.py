"""Stateful LSQ weight and LSQ+ activation quantizers.

Both quantizers register every parameter and buffer at construction (never lazily), so
step sizes are in the optimizer and the ``state_dict`` from the start. Calibration state
lives in a registered ``initialized`` buffer (uint8 scalar); a Python mirror of it keeps
``forward`` free of ``.item()`` calls, so quantized models compile with ``torch.compile``.

Under ``torch.distributed`` the calibration statistics are all-reduced (activations) or
broadcast from rank 0 (weights), so every rank starts from the same steps.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from qdetr.errors import QdetrError
from qdetr.quant.config import QuantizerConfig, check_bits
from qdetr.quant.primitives import (
    fake_quant_activation,
    fake_quant_weight,
    grad_scale_factor,
    integer_range,
    quantize_weight_codes,
)

__all__ = ["LSQWeightQuantizer", "LSQActQuantizer", "UncalibratedQuantizerError", "MIN_STEP"]

#: Steps are clamped to at least this value in the forward pass.
MIN_STEP = 1e-8


class UncalibratedQuantizerError(QdetrError, RuntimeError):
    """Raised when an activation quantizer that was never calibrated runs in eval mode.

    Fix it by calibrating (:func:`qdetr.quant.calibrate`), running a training step, or loading
    quantized weights.

    Examples:
        >>> q = LSQActQuantizer(4, 8, axis=-1).eval()
        >>> try:
        ...     q(torch.randn(2, 8))
        ... except UncalibratedQuantizerError:
        ...     print("calibrate first")
        calibrate first
    """


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast_shape(ndim: int, axis: int, per_channel: bool) -> list[int]:
    shape = [1] * ndim
    if per_channel:
        shape[axis] = -1
    return shape


def _stats_dtype(x: torch.Tensor) -> torch.Tensor:
    """Detached copy in at least float32 (statistics of half-precision tensors are taken in float32)."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))


def _per_channel_view(x: torch.Tensor, axis: int) -> torch.Tensor:
    """(..., C at axis, ...) -> (C, N)."""
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _keeps_dtype(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether fake-quantizing ``x`` with ``scale`` keeps ``x``'s dtype (then no cast sits between
    the quantizer and its consumer, and the consumer's gradient reaches the quantizer as is)."""
    return torch.promote_types(x.dtype, scale.dtype) == x.dtype


class _QuantizerBase(nn.Module):
    """Common state: bits, axis, ``initialized`` buffer with a Python mirror, ``enabled`` flag."""

    def __init__(self, bits: int, num_channels: int, axis: int, config: QuantizerConfig) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.axis = axis
        self.config = config
        self.per_channel = config.granularity == "per_channel"
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1; got {num_channels}")
        self.num_channels = num_channels if self.per_channel else 1
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self._is_initialized = False
        #: When False the quantizer is an exact identity.
        self.enabled = True

    def _mark_initialized(self) -> None:
        self.initialized.fill_(1)
        self._is_initialized = True

    @property
    def is_initialized(self) -> bool:
        """Whether the steps hold calibrated or loaded values."""
        return self._is_initialized

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_from_buffers()

    def _sync_from_buffers(self) -> None:
        self._is_initialized = bool(self.initialized.item())

    def _axis_for(self, ndim: int) -> int:
        axis = self.axis if self.axis >= 0 else ndim + self.axis
        if not 0 <= axis < ndim:
            raise ValueError(f"quantizer axis {self.axis} is out of range for a {ndim}-D tensor")
        return axis

    def _check_channels(self, x: torch.Tensor, axis: int) -> None:
        if self.per_channel and x.shape[axis] != self.num_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.num_channels} channels on axis {self.axis}, "
                f"got a tensor of shape {tuple(x.shape)}"
            )


class LSQWeightQuantizer(_QuantizerBase):
    """Learned-step-size (LSQ) weight quantizer, signed, per channel or per tensor.

    ``ŵ = s · round(clip(w / s, Qn, Qp))`` with ``Qn = -2^(b-1)``, ``Qp = 2^(b-1) - 1``
    (method.md section 2). The step's gradient is scaled by ``1 / sqrt(N Qp)`` with
    N = elements per step (``config.grad_scale_numel="per_step"``) or the whole tensor.

    Args:
        bits: 2..8.
        num_channels: number of steps along ``axis`` (output channels), ignored per tensor.
        axis: channel axis of the weight (0 for Conv2d/Linear weights).
        config: quantizer numerics.

    Shapes:
        weight: (C_out, ...) with C_out on ``axis``; ``scale``: (C_out,) or (1,).

    Examples:
        >>> q = LSQWeightQuantizer(4, 16)
        >>> w = torch.randn(16, 8)
        >>> q.initialize_from(w)
        >>> q(w).shape
        torch.Size([16, 8])
        >>> q.scale.shape, (q.qmin, q.qmax)
        (torch.Size([16]), (-8, 7))
        >>> codes = q.integer_codes(w)                  # int8 in [Qn, Qp]
        >>> codes.dtype, bool(torch.equal(q(w), codes * q.scale[:, None]))
        (torch.int8, True)
    """

    def __init__(self, bits: int, num_channels: int = 1, *, axis: int = 0, config: QuantizerConfig | None = None):
        super().__init__(bits, num_channels, axis, config or QuantizerConfig())
        self.qmin, self.qmax = integer_range(self.bits, signed=True)
        self.scale = nn.Parameter(torch.ones(self.num_channels))

    def extra_repr(self) -> str:
        gran = "per_channel" if self.per_channel else "per_tensor"
        return f"bits={self.bits}, {gran}, channels={self.num_channels}, axis={self.axis}, signed=True"

    def _scale_view(self, weight: torch.Tensor) -> torch.Tensor:
        axis = self._axis_for(weight.dim())
        return self.scale.clamp_min(MIN_STEP).view(_broadcast_shape(weight.dim(), axis, self.per_channel))

    @torch.no_grad()
    def initialize_from(self, weight: torch.Tensor) -> None:
        """Set ``s = 2 mean|w| / sqrt(Qp)`` (per channel or tensor-wide) and mark initialised.

        Under ``torch.distributed`` the result is broadcast from rank 0.

        Args:
            weight: (C_out, ...) with ``num_channels`` entries on ``axis``.

        Raises:
            ValueError: if the channel count on ``axis`` differs from ``num_channels``.
        """
        w = _stats_dtype(weight)
        axis = self._axis_for(w.dim())
        self._check_channels(w, axis)
        if self.per_channel and self.config.init == "channel":
            mean_abs = _per_channel_view(w.abs(), axis).mean(dim=1)
        else:
            mean_abs = w.abs().mean().expand(self.num_channels)
        step = (2.0 * mean_abs / math.sqrt(self.qmax)).clamp_min(MIN_STEP)
        self.scale.copy_(step.to(self.scale))
        if _distributed():
            dist.broadcast(self.scale.data, src=0)
        self._mark_initialized()

    def grad_scale(self, weight: torch.Tensor) -> float:
        """LSQ gradient scale g for this weight.

        Args:
            weight: (C_out, ...) weight tensor (only its element count is used).
        """
        numel = weight.numel()
        if self.config.grad_scale_numel == "per_step":
            numel = numel // self.num_channels
        return grad_scale_factor(numel, self.qmax)

    def forward(self, weight: torch.Tensor, *, grad_in_place: bool = False) -> torch.Tensor:
        """Fake-quantize ``weight``; identity when ``enabled`` is False.

        Args:
            weight: (C_out, ...); an uncalibrated quantizer initialises its steps from it.
            grad_in_place: the result is only the weight of a conv / linear call, so its
                gradient may be reused in backward (see :func:`qdetr.quant.primitives.fake_quant_weight`).

        Returns:
            Tensor of the same shape and dtype, ``s * W_int``.
        """
        if not self.enabled:
            return weight
        if not self._is_initialized:
            self.initialize_from(weight)
        out = fake_quant_weight(
            weight,
            self._scale_view(weight),
            self.qmin,
            self.qmax,
            self.grad_scale(weight),
            grad_in_place=grad_in_place and _keeps_dtype(weight, self.scale),
        )
        return out.to(weight.dtype)

    def recompute(self, weight: torch.Tensor) -> torch.Tensor:
        """The forward result for ``weight`` without autograd (recomputes ŵ dropped from the saved set).

        Args:
            weight: (C_out, ...) the weight the forward pass quantized.
        """
        with torch.no_grad():
            return self(weight)

    @torch.no_grad()
    def integer_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes ``W_int = clip(round(w / s), Qn, Qp)`` as int8; ``ŵ = s · W_int`` exactly.

        Args:
            weight: (C_out, ...) float weight.

        Returns:
            int8 tensor of the same shape with values in ``[qmin, qmax]``.
        """
        return quantize_weight_codes(weight, self._scale_view(weight).to(weight.dtype), self.qmin, self.qmax)


class LSQActQuantizer(_QuantizerBase):
    """LSQ+ activation quantizer: learned step and learned integer zero point.

    ``x̂ = (round(clip(x / s + round(z), Qn, Qp)) - round(z)) · s`` (method.md section 3).
    Signed range ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``; with ``signed="auto"``
    the sign is detected once from the first calibration batch (``min(x) < -1e-5``) and
    stored in the ``signed`` buffer.

    Calibration runs on the first forward in training mode, or on any forward inside
    :func:`qdetr.quant.calibration`. Evaluating an uncalibrated quantizer raises
    :class:`UncalibratedQuantizerError`.

    Args:
        bits: 2..8.
        num_channels: number of steps along ``axis``.
        axis: channel axis of the input (1 for conv inputs and per-head attention tensors,
            -1 for linear inputs).
        signed: True, False or ``"auto"``.
        config: quantizer numerics.

    Shapes:
        input: any shape with ``num_channels`` entries on ``axis``; ``scale``, ``zero_point``:
        (num_channels,) or (1,).

    Examples:
        >>> q = LSQActQuantizer(4, 8, axis=-1, signed="auto").train()
        >>> y = q(torch.randn(2, 10, 8))   # calibrates on this first training batch
        >>> bool(q.signed), y.shape, q.scale.shape
        (True, torch.Size([2, 10, 8]), torch.Size([8]))
        >>> q.qrange
        (-8, 7)
    """

    def __init__(
        self,
        bits: int,
        num_channels: int = 1,
        *,
        axis: int = -1,
        signed: bool | str = "auto",
        config: QuantizerConfig | None = None,
    ) -> None:
        super().__init__(bits, num_channels, axis, config or QuantizerConfig())
        if signed not in (True, False, "auto"):
            raise ValueError(f"signed must be True, False or 'auto'; got {signed!r}")
        self.signed_mode = signed
        self.scale = nn.Parameter(torch.ones(self.num_channels))
        self.zero_point = nn.Parameter(torch.zeros(self.num_channels), requires_grad=self.config.learn_zero_point)
        self.register_buffer("signed", torch.tensor(0 if signed is False else 1, dtype=torch.uint8))
        self._is_signed = signed is not False
        #: Set by :func:`qdetr.quant.calibration`: (re)calibrate on the next forward.
        self.calibrating = False

    def extra_repr(self) -> str:
        gran = "per_channel" if self.per_channel else "per_tensor"
        sign = self.signed_mode if not self._is_initialized else self._is_signed
        return f"bits={self.bits}, {gran}, channels={self.num_channels}, axis={self.axis}, signed={sign}"

    def _sync_from_buffers(self) -> None:
        super()._sync_from_buffers()
        self._is_signed = bool(self.signed.item())

    @property
    def qrange(self) -> tuple[int, int]:
        """Current integer range ``(Qn, Qp)``."""
        return integer_range(self.bits, self._is_signed)

    def grad_scale(self, x: torch.Tensor) -> float:
        """LSQ gradient scale g for this input.

        Args:
            x: the input (only its shape is used; dim 0 is the batch).
        """
        numel = x.numel()
        if self.config.grad_scale_numel == "per_step":
            numel = numel // self.num_channels
            if x.dim() > 1:
                numel = numel // max(x.shape[0], 1)  # per sample (dim 0)
        return grad_scale_factor(numel, self.qrange[1])

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Initialise signedness, step and zero point from one batch (method.md section 3.3).

        Under ``torch.distributed`` the statistics are all-reduced: ``mean|x|`` is averaged,
        ``min`` and ``max`` take the global extremes.

        Args:
            x: a batch with ``num_channels`` entries on ``axis``.

        Raises:
            ValueError: if the channel count on ``axis`` differs from ``num_channels``.
        """
        xf = _stats_dtype(x)
        axis = self._axis_for(xf.dim())
        self._check_channels(xf, axis)
        if self.per_channel:
            flat = _per_channel_view(xf, axis)
            mean_abs, x_min, x_max = flat.abs().mean(dim=1), flat.amin(dim=1), flat.amax(dim=1)
        else:
            mean_abs, x_min, x_max = xf.abs().mean().view(1), xf.amin().view(1), xf.amax().view(1)
        if self.config.init == "tensor" or not self.per_channel:
            mean_abs = xf.abs().mean().expand(self.num_channels).clone()
        if _distributed():
            world = dist.get_world_size()
            dist.all_reduce(mean_abs, op=dist.ReduceOp.SUM)
            mean_abs /= world
            dist.all_reduce(x_min, op=dist.ReduceOp.MIN)
            dist.all_reduce(x_max, op=dist.ReduceOp.MAX)
        if self.signed_mode == "auto":
            self._is_signed = bool(x_min.min() < -1e-5)
        else:
            self._is_signed = bool(self.signed_mode)
        self.signed.fill_(1 if self._is_signed else 0)
        qn, qp = self.qrange
        zp_init = self.config.zero_point_init
        if zp_init == "lsq+":
            step = ((x_max - x_min) / (qp - qn)).clamp_min(MIN_STEP)
            zero = torch.round(qn - x_min / step)
        else:
            step = (2.0 * mean_abs / math.sqrt(qp)).clamp_min(MIN_STEP)
            if zp_init == "seed":
                # Seed rule (unit-mixing, kept for reproduction): z = 0.9 z + 0.1 (min - s Qn).
                zero = 0.9 * self.zero_point.float() + 0.1 * (x_min - step * qn)
            else:
                zero = torch.zeros_like(step)
        self.scale.copy_(step.to(self.scale))
        self.zero_point.copy_(zero.to(self.zero_point))
        self._mark_initialized()

    def forward(self, x: torch.Tensor, *, grad_in_place: bool = False) -> torch.Tensor:
        """Fake-quantize ``x``; identity when ``enabled`` is False.

        Args:
            x: any shape with ``num_channels`` entries on ``axis``.
            grad_in_place: the result is only the input of a conv / linear call, so its
                gradient may be reused in backward (see :func:`qdetr.quant.primitives.fake_quant_activation`).

        Returns:
            Tensor of the same shape and dtype.

        Raises:
            UncalibratedQuantizerError: in eval mode before any calibration.
        """
        if not self.enabled:
            return x
        if self.calibrating or (self.training and not self._is_initialized):
            self.calibrate(x)
            self.calibrating = False
        elif not self._is_initialized:
            raise UncalibratedQuantizerError(
                "activation quantizer was never calibrated; run qdetr.quant.calibrate(model, batches) "
                "or a training step first, or load quantized weights"
            )
        return self._fake_quant(x, grad_in_place)

    def recompute(self, x: torch.Tensor) -> torch.Tensor:
        """The forward result for ``x`` without autograd (recomputes outputs dropped from the saved set)."""
        with torch.no_grad():
            return self._fake_quant(x) if self.enabled else x

    def _fake_quant(self, x: torch.Tensor, grad_in_place: bool = False) -> torch.Tensor:
        axis = self._axis_for(x.dim())
        shape = _broadcast_shape(x.dim(), axis, self.per_channel)
        qn, qp = self.qrange
        out = fake_quant_activation(
            x,
            self.scale.clamp_min(MIN_STEP).view(shape),
            self.zero_point.view(shape),
            qn,
            qp,
            self.grad_scale(x),
            grad_in_place=grad_in_place and _keeps_dtype(x, self.scale),
        )
        return out.to(x.dtype)
