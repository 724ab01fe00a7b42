"""Quantization configuration: how each quantizer behaves and which layers get which bits.

* :class:`QuantizerConfig` says *how* one kind of quantizer computes (granularity, init rule,
  gradient-scale mode, zero-point init, signedness policy); see method.md section 3.5.
* :class:`QuantConfig` says *what* is quantized: bit widths, the profile (``"paper"``,
  ``"seed"`` (method.md section 4) or ``"deploy"``, integer-kernel numerics), per-name bit
  overrides for mixed precision and names kept in float. It serialises to a versioned dict (``to_dict`` / ``from_dict``) that is
  stored in every saved model's ``config.json``.
* :class:`LayerQuantSpec` and :class:`AttentionQuantSpec` are the resolved per-module plans
  that the profile produces and the ``from_float`` constructors consume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Union

__all__ = [
    "SUPPORTED_BITS",
    "PROFILES",
    "QuantizerConfig",
    "QuantConfig",
    "LayerQuantSpec",
    "AttentionQuantSpec",
    "check_bits",
]

#: Bit widths accepted for weights and activations.
SUPPORTED_BITS = range(2, 9)
#: Layer-selection profiles: ``"paper"`` and ``"seed"`` (method.md section 4), and ``"deploy"``
#: (the paper's layers with numerics that map onto integer kernels; docs/concepts/deploy-profile.md).
PROFILES = ("paper", "seed", "deploy")

Signedness = Union[bool, Literal["auto"]]


def check_bits(bits: Any, what: str = "bits") -> int:
    """Validate a bit width and return it as ``int``.

    Args:
        bits: the value to check.
        what: the name used in the error message.

    Returns:
        ``bits``.

    Raises:
        ConfigError: (a ``ValueError``) if ``bits`` is not an integer in 2..8 (``4.9`` is refused, not truncated).

    Examples:
        >>> check_bits(4)
        4
        >>> check_bits(16, "weight_bits")
        Traceback (most recent call last):
            ...
        qdetr.errors.ConfigError: weight_bits must be an integer from 2 to 8 (2, 3, 4 and 8 are the tested widths); got 16
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        from qdetr.errors import ConfigError

        raise ConfigError(
            f"{what} must be an integer from 2 to 8 (2, 3, 4 and 8 are the tested widths); got {bits!r}"
        )
    return bits


def _check_choice(value: Any, choices: tuple, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


@dataclass(frozen=True, kw_only=True)
class QuantizerConfig:
    """How a quantizer computes (method.md section 3.5).

    Attributes:
        granularity: ``"per_channel"`` (one step per channel on the quantizer's axis; needed
            by the released checkpoints) or ``"per_tensor"`` (integer-GEMM friendly).
        init: step initialisation ``s = 2 mean|x| / sqrt(Qp)`` with the mean taken per
            ``"channel"`` (default) or over the whole ``"tensor"`` (seed behaviour).
        grad_scale_numel: N in the LSQ gradient scale ``1 / sqrt(N Qp)``: ``"per_step"`` (elements
            sharing one step, per sample; LSQ's intent) or ``"tensor"`` (whole tensor; seed).
        zero_point_init: activation zero-point init: ``"zero"``, ``"seed"`` (damped rule) or
            ``"lsq+"`` (min/max rule). Ignored for weights.
        learn_zero_point: activation zero point is a trained parameter (LSQ+). Ignored for weights.

    Raises:
        ValueError: for an unknown choice (the message lists the valid ones).

    Examples:
        >>> QuantizerConfig(granularity="per_tensor").granularity
        'per_tensor'
        >>> QuantizerConfig.seed().zero_point_init
        'seed'
        >>> QuantConfig(bits=2, weight=QuantizerConfig(granularity="per_tensor")).weight.granularity
        'per_tensor'
    """

    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    init: Literal["channel", "tensor"] = "channel"
    grad_scale_numel: Literal["per_step", "tensor"] = "per_step"
    zero_point_init: Literal["zero", "seed", "lsq+"] = "zero"
    learn_zero_point: bool = True

    def __post_init__(self) -> None:
        _check_choice(self.granularity, ("per_channel", "per_tensor"), "granularity")
        _check_choice(self.init, ("channel", "tensor"), "init")
        _check_choice(self.grad_scale_numel, ("per_step", "tensor"), "grad_scale_numel")
        _check_choice(self.zero_point_init, ("zero", "seed", "lsq+"), "zero_point_init")

    @classmethod
    def seed(cls) -> "QuantizerConfig":
        """The released checkpoints' numerics: tensor-wide init and gradient scale, damped zero point.

        Examples:
            >>> cfg = QuantizerConfig.seed()
            >>> cfg.init, cfg.grad_scale_numel
            ('tensor', 'tensor')
        """
        return cls(init="tensor", grad_scale_numel="tensor", zero_point_init="seed")


@dataclass(frozen=True, kw_only=True)
class LayerQuantSpec:
    """Resolved plan for one Conv2d/Linear: ``None`` bits keep that tensor in float.

    Attributes:
        weight_bits: bits of the weight quantizer (signed, per output channel), or None.
        input_bits: bits of the input quantizer (per input channel), or None.
        input_signed: signedness of the input range (True, False or ``"auto"``: detected
            from the first calibration batch as ``min(x) < -1e-5`` and then stored).
        weight: weight quantizer numerics.
        activation: input quantizer numerics.

    Raises:
        ValueError: for bit widths outside 2..8.

    Examples:
        >>> from qdetr.quant import QuantLinear
        >>> spec = LayerQuantSpec(weight_bits=4, input_bits=None)      # weight-only quantization
        >>> layer = QuantLinear.from_float(nn.Linear(16, 8), spec)
        >>> layer.weight_quantizer.bits, layer.input_quantizer is None
        (4, True)
    """

    weight_bits: int | None
    input_bits: int | None
    input_signed: Signedness = "auto"
    weight: QuantizerConfig = field(default_factory=QuantizerConfig)
    activation: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self) -> None:
        if self.weight_bits is not None:
            check_bits(self.weight_bits, "weight_bits")
        if self.input_bits is not None:
            check_bits(self.input_bits, "input_bits")


@dataclass(frozen=True, kw_only=True)
class AttentionQuantSpec:
    """Resolved plan for one attention module (method.md section 4, attention data path).

    Attributes:
        proj_weight_bits: bits of the q/k/v projection weights (one step per output row).
        proj_input_bits: bits of the q/k/v projection inputs (per channel, signed).
        out_weight_bits: bits of the output projection weight.
        out_input_bits: bits of the output projection input (the co-attended values).
        attn_bits: bits of q, k, v and the softmax probabilities (per head), or None.
        prob_signed: use a signed range for the probabilities (symmetric deploy profile:
            TensorRT's int8 has no unsigned 8-bit range).
        weight, activation: quantizer numerics.

    Raises:
        ValueError: for bit widths outside 2..8.

    Examples:
        >>> spec = AttentionQuantSpec(proj_weight_bits=4, proj_input_bits=None, out_weight_bits=4,
        ...                           out_input_bits=None, attn_bits=8)
        >>> spec.is_float
        False
        >>> AttentionQuantSpec(proj_weight_bits=None, proj_input_bits=None, out_weight_bits=None,
        ...                    out_input_bits=None, attn_bits=None).is_float
        True
    """

    proj_weight_bits: int | None
    proj_input_bits: int | None
    out_weight_bits: int | None
    out_input_bits: int | None
    attn_bits: int | None
    prob_signed: bool = False
    weight: QuantizerConfig = field(default_factory=QuantizerConfig)
    activation: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self) -> None:
        for name in ("proj_weight_bits", "proj_input_bits", "out_weight_bits", "out_input_bits", "attn_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), name)

    @property
    def is_float(self) -> bool:
        """True when nothing in the attention is quantized."""
        return all(
            getattr(self, n) is None
            for n in ("proj_weight_bits", "proj_input_bits", "out_weight_bits", "out_input_bits", "attn_bits")
        )


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """What :func:`qdetr.quantize_model` quantizes, and how.

    Attributes:
        bits: bit width b of weights and of conv/linear inputs ("W b / A b").
        act_bits: activation bit width if different from ``bits`` (default: ``bits``).
        attn_bits: bits of q, k, v and the softmax output inside attention (per head).
        stem_bits: bits of the first convolution (3 input channels), weights and input.
        profile: ``"paper"`` (the paper's Q-FC everywhere), ``"seed"`` (the layout of the
            released Q-DETR checkpoints; method.md section 4) or ``"deploy"``: the paper's
            layers with integer-kernel numerics (one activation step and one integer zero point
            per tensor, weights per output channel, 8-bit residual downsample convs and 8-bit
            quantizers on the ResNet outputs that feed residual adds); see
            docs/concepts/deploy-profile.md. ``"deploy"`` sets ``activation.granularity`` to
            ``"per_tensor"``.
        residual_bits: ``"deploy"`` only: bits of the per-tensor quantizers on the ResNet outputs
            that feed residual adds (``bn3``, the ``downsample`` norm, the stem norm), see
            :mod:`qdetr.quant.residual_outputs`.
        symmetric_activations: ``"deploy"`` only: every activation range is signed with its zero
            point fixed at 0 (TensorRT's INT8 mode accepts nothing else).
        quantize_downsample: also quantize ResNet ``downsample`` 1x1 convs at ``bits`` (float in the
            paper and seed profiles, ``stem_bits`` in the deploy profile).
        overrides: ordered ``(glob, bits)`` pairs: modules whose qualified name matches the glob
            (``fnmatch`` syntax) get ``bits`` for weights and inputs (mixed precision). A dict
            is accepted and converted. The first matching rule wins.
        keep_float: globs of module names that stay in float.
        weight: weight quantizer numerics.
        activation: activation quantizer numerics.

    Raises:
        ValueError: on bit widths outside 2..8, an unknown profile or malformed rules.

    Examples:
        >>> cfg = QuantConfig(bits=2, overrides={"backbone.*": 4}, keep_float=("*.linear2",))
        >>> QuantConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> deploy = QuantConfig(bits=4, profile="deploy", symmetric_activations=True)
        >>> deploy.activation.granularity, deploy.activation.learn_zero_point
        ('per_tensor', False)
        >>> QuantConfig.from_dict(deploy.to_dict()) == deploy
        True
    """

    VERSION = 1

    bits: int = 4
    act_bits: int | None = None
    attn_bits: int = 8
    stem_bits: int = 8
    profile: str = "paper"
    residual_bits: int = 8
    symmetric_activations: bool = False
    quantize_downsample: bool = False
    overrides: tuple[tuple[str, int], ...] = ()
    keep_float: tuple[str, ...] = ()
    weight: QuantizerConfig = field(default_factory=QuantizerConfig)
    activation: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self) -> None:
        check_bits(self.bits, "bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
        check_bits(self.attn_bits, "attn_bits")
        check_bits(self.stem_bits, "stem_bits")
        check_bits(self.residual_bits, "residual_bits")
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; choose one of {PROFILES}")
        overrides = self.overrides
        if isinstance(overrides, dict):
            overrides = tuple(overrides.items())
        try:
            overrides = tuple((str(p), int(b)) for p, b in overrides)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                "overrides must be a dict or a sequence of (glob, bits) pairs, e.g. {'backbone.*': 4}"
            ) from exc
        for pattern, b in overrides:
            check_bits(b, f"overrides[{pattern!r}]")
        keep = self.keep_float
        if isinstance(keep, str):
            keep = (keep,)
        object.__setattr__(self, "overrides", overrides)
        object.__setattr__(self, "keep_float", tuple(str(k) for k in keep))
        if isinstance(self.weight, dict):
            object.__setattr__(self, "weight", QuantizerConfig(**self.weight))
        if isinstance(self.activation, dict):
            object.__setattr__(self, "activation", QuantizerConfig(**self.activation))
        if self.symmetric_activations and self.profile != "deploy":
            raise ValueError("symmetric_activations=True needs profile='deploy'")
        if self.profile == "deploy":
            activation = dataclasses.replace(self.activation, granularity="per_tensor")
            if self.symmetric_activations:
                activation = dataclasses.replace(activation, zero_point_init="zero", learn_zero_point=False)
            object.__setattr__(self, "activation", activation)

    @property
    def activation_bits(self) -> int:
        """Bits of conv/linear inputs (``act_bits`` or ``bits``)."""
        return self.act_bits if self.act_bits is not None else self.bits

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict with a ``version`` field.

        Examples:
            >>> d = QuantConfig(bits=3).to_dict()
            >>> d["bits"], d["version"]
            (3, 1)
        """
        d = dataclasses.asdict(self)
        d["overrides"] = [list(p) for p in self.overrides]
        d["keep_float"] = list(self.keep_float)
        d["version"] = self.VERSION
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: for an unknown version or unknown fields.
        """
        data = dict(data)
        version = data.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise ValueError(f"QuantConfig version {version} is not supported (this qdetr reads version {cls.VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {sorted(unknown)}")
        if "overrides" in data:
            data["overrides"] = tuple(tuple(p) for p in data["overrides"])
        if "keep_float" in data:
            data["keep_float"] = tuple(data["keep_float"])
        return cls(**data)
