"""Settings of the distribution rectification distillation (DRD) loss.

Defaults follow ``method.md`` section 6.3:

================  ================  ==========================================================
field             default           reason
================  ================  ==========================================================
``tau``           0.5               the only value that was actually run (released code)
``weight``        1.0               lambda; the paper's value was not recovered, tune in
                                    {0.5, 1, 2, 5}
``mu_giou``       2.0               mu1 of Eq. 2.35 (DETR's matching weight)
``mu_l1``         5.0               mu2 of Eq. 2.35 (DETR's matching weight)
``layers``        (-1,)             last decoder layer (released code; the paper is silent)
``feature``       "attn_values"     the paper's D = Â·V̂, before the output projection
``one_to_one``    False             the paper's argmax pairing
``qfd_weight``    0.0               released code's extra feature-MSE term; **not in the paper**
================  ================  ==========================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qdetr.distill.adapters import FEATURE_KEYS

__all__ = ["DistillationConfig"]

_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class DistillationConfig:
    """Hyper-parameters of :class:`~qdetr.distill.loss.DistillationLoss`.

    Args:
        tau: foreground threshold of Eq. 2.34 in [0, 1]: a student query is distilled when its
            GIoU with some ground truth is > tau times that ground truth's best student GIoU.
        weight: lambda of Eq. 2.38; ``loss_drd`` is already multiplied by it.
        mu_giou: GIoU weight of the teacher matching score (Eq. 2.35).
        mu_l1: L1 weight of the teacher matching score (Eq. 2.35).
        layers: decoder layers whose features are distilled (Python indices, -1 = last);
            the loss is averaged over them.
        feature: ``"attn_values"`` (Â·V̂, paper) or ``"proj_out"`` (after the output
            projection, released code).
        one_to_one: pair with the Hungarian algorithm instead of the per-query argmax.
        qfd_weight: weight of the released code's feature-MSE term on the final decoder
            states (``last_hidden_state``); 0 disables it. Not part of the paper.

    Raises:
        ValueError: for out-of-range values (the message says the valid range).

    Examples:
        >>> cfg = DistillationConfig(tau=0.5, layers=(-2, -1), feature="proj_out")
        >>> DistillationConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> DistillationConfig(layers=-1).layers                # a single int is accepted
        (-1,)
        >>> DistillationConfig(tau=2.0)
        Traceback (most recent call last):
            ...
        ValueError: tau must be in [0, 1] (0.5 is the released value), got 2.0
    """

    tau: float = 0.5
    weight: float = 1.0
    mu_giou: float = 2.0
    mu_l1: float = 5.0
    layers: tuple[int, ...] = (-1,)
    feature: str = "attn_values"
    one_to_one: bool = False
    qfd_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.tau) <= 1.0:
            raise ValueError(f"tau must be in [0, 1] (0.5 is the released value), got {self.tau}")
        for name in ("weight", "mu_giou", "mu_l1", "qfd_weight"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.layers, int):
            object.__setattr__(self, "layers", (self.layers,))
        layers = tuple(self.layers)
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"layers must be a non-empty tuple of ints such as (-1,) or (-2, -1), got {self.layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat an index, got {layers}")
        object.__setattr__(self, "layers", layers)
        if self.feature not in FEATURE_KEYS:
            raise ValueError(f"feature must be one of {sorted(FEATURE_KEYS)}, got {self.feature!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict with a ``version`` field."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["version"] = _VERSION
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DistillationConfig":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: for an unknown version or unknown fields.
        """
        data = dict(data)
        version = data.pop("version", _VERSION)
        if version != _VERSION:
            raise ValueError(f"unsupported DistillationConfig version {version}; this qdetr reads version {_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown DistillationConfig fields {unknown}; valid fields are {sorted(names)}")
        if "layers" in data:
            data["layers"] = tuple(data["layers"])
        return cls(**data)
