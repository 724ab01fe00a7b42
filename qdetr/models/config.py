"""Frozen, validated configuration dataclasses for the detectors (no argparse).

``DetrConfig`` describes facebookresearch/detr; ``SmcaConfig`` single-scale SMCA-DETR
(gaopengcuhk/SMCA-DETR and the Q-DETR release). Both serialise with ``to_dict()`` /
``from_dict()``; the dict carries ``arch`` and a format ``version``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from qdetr.models.backbone import RESNET_LAYOUTS

__all__ = ["DetrConfig", "SmcaConfig", "config_from_dict"]

_DYNAMIC_SCALES = ("type1", "type2", "type3", "type4")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True, kw_only=True)
class DetrConfig:
    """DETR architecture, matcher and loss settings (defaults: DETR-R50, COCO).

    Attributes:
        num_classes: number of class ids; logits have ``num_classes + 1`` columns, the last
            one is "no object" (COCO: 91, i.e. max category id + 1).
        num_queries: object queries Q.
        hidden_dim: transformer width d.
        nheads: attention heads (d must be divisible by it).
        enc_layers: encoder layers.
        dec_layers: decoder layers.
        dim_feedforward: FFN hidden width.
        dropout: dropout rate in the transformer.
        backbone: key of ``qdetr.models.backbone.RESNET_LAYOUTS`` (``resnet50``, ``resnet101``,
            ``resnet_tiny``).
        backbone_unit: ``"torchvision"`` (ReLU blocks) or ``"bireal"`` (Q-DETR release blocks).
        dilation: DC5 variant (dilated layer4, stride 16).
        train_backbone: train layer2-4 (stem and layer1 always frozen); False freezes all.
        aux_loss: return and supervise every decoder layer's predictions.
        cost_class, cost_bbox, cost_giou: Hungarian matching weights.
        cls_loss_coef, bbox_loss_coef, giou_loss_coef: loss weights.
        eos_coef: weight of the no-object class in the softmax cross-entropy.

    Raises:
        ValueError: on an invalid field (the message says which values are allowed).

    Examples:
        >>> from qdetr.models import DetrConfig
        >>> config = DetrConfig(num_classes=20)
        >>> config.num_classes, config.classification
        (20, 'softmax')
        >>> DetrConfig.from_dict(config.to_dict()) == config
        True
        >>> DetrConfig(hidden_dim=100, nheads=8)
        Traceback (most recent call last):
        ...
        ValueError: hidden_dim (100) must be divisible by nheads (8); e.g. hidden_dim=256, nheads=8
    """

    arch: ClassVar[str] = "detr"
    version: ClassVar[int] = 1

    num_classes: int = 91
    num_queries: int = 100
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    backbone: str = "resnet50"
    backbone_unit: Literal["torchvision", "bireal"] = "torchvision"
    dilation: bool = False
    train_backbone: bool = True
    aux_loss: bool = True
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    eos_coef: float = 0.1

    def __post_init__(self) -> None:
        for name in ("num_classes", "num_queries", "hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"{name} must be a positive int, got {value!r}")
        _require(
            self.hidden_dim % self.nheads == 0,
            f"hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads}); e.g. hidden_dim=256, nheads=8",
        )
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _require(
            self.backbone in RESNET_LAYOUTS,
            f"backbone must be one of {sorted(RESNET_LAYOUTS)}, got {self.backbone!r}",
        )
        _require(
            self.backbone_unit in ("torchvision", "bireal"),
            f"backbone_unit must be 'torchvision' or 'bireal', got {self.backbone_unit!r}",
        )
        for name in ("cost_class", "cost_bbox", "cost_giou", "cls_loss_coef", "bbox_loss_coef", "giou_loss_coef", "eos_coef"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def classification(self) -> str:
        """``"softmax"`` (DETR cross-entropy head) or ``"sigmoid"`` (focal head)."""
        return "softmax"

    def replace(self, **changes: Any) -> "DetrConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict with ``arch`` and ``version``."""
        out: dict[str, Any] = {"arch": self.arch, "version": self.version}
        out.update(dataclasses.asdict(self))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DetrConfig":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: on a different ``arch``, a newer ``version`` or unknown fields.
        """
        data = dict(data)
        arch = data.pop("arch", cls.arch)
        version = data.pop("version", cls.version)
        if arch != cls.arch:
            raise ValueError(f"config is for arch {arch!r}, not {cls.arch!r}; use config_from_dict()")
        if version > cls.version:
            raise ValueError(f"config version {version} is newer than supported ({cls.version}); upgrade qdetr")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid fields: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class SmcaConfig(DetrConfig):
    """Single-scale SMCA-DETR (method.md 5.2). Adds to :class:`DetrConfig`:

    Attributes:
        dynamic_scale: ``"type1"`` .. ``"type4"``, the Gaussian scale parametrisation.
        smooth: β of ``G = -dist / β`` (8).
        feature_stride: pixels per feature cell used for the reference point (32 in the
            original); None takes the backbone's stride (16 with ``dilation``).
        query_width: columns of ``query_embed``: ``hidden_dim`` (official SMCA, content query
            0) or ``2 * hidden_dim`` (Q-DETR release: positional half, then content half).
        focal_alpha, focal_gamma: sigmoid focal loss parameters.
        prior_prob: classifier bias init ``-log((1 - p) / p)``.

    Raises:
        ValueError: on an invalid field (the message says which values are allowed).

    Examples:
        >>> from qdetr.models import SmcaConfig
        >>> config = SmcaConfig(query_width=512)  # the Q-DETR release layout
        >>> config.classification, config.resolved_query_width, config.resolved_feature_stride
        ('sigmoid', 512, 32)
        >>> config.to_dict()["arch"]
        'smca'
    """

    arch: ClassVar[str] = "smca"

    num_queries: int = 300
    cost_class: float = 2.0
    cls_loss_coef: float = 2.0
    dynamic_scale: Literal["type1", "type2", "type3", "type4"] = "type3"
    smooth: float = 8.0
    feature_stride: int | None = None
    query_width: int | None = None
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    prior_prob: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self.dynamic_scale in _DYNAMIC_SCALES,
            f"dynamic_scale must be one of {_DYNAMIC_SCALES}, got {self.dynamic_scale!r}",
        )
        _require(self.smooth > 0, f"smooth must be > 0, got {self.smooth}")
        _require(
            self.feature_stride is None or (isinstance(self.feature_stride, int) and self.feature_stride >= 1),
            f"feature_stride must be a positive int or None, got {self.feature_stride!r}",
        )
        _require(
            self.query_width in (None, self.hidden_dim, 2 * self.hidden_dim),
            f"query_width must be hidden_dim ({self.hidden_dim}, official SMCA) or 2 * hidden_dim "
            f"({2 * self.hidden_dim}, Q-DETR release layout), got {self.query_width}",
        )
        _require(0.0 < self.prior_prob < 1.0, f"prior_prob must be in (0, 1), got {self.prior_prob}")
        _require(0.0 <= self.focal_alpha <= 1.0, f"focal_alpha must be in [0, 1], got {self.focal_alpha}")

    @property
    def classification(self) -> str:
        return "sigmoid"

    @property
    def resolved_query_width(self) -> int:
        """``query_width`` with None resolved to ``hidden_dim``."""
        return self.hidden_dim if self.query_width is None else self.query_width

    @property
    def resolved_feature_stride(self) -> int:
        """``feature_stride`` with None resolved from ``dilation`` (16 or 32)."""
        if self.feature_stride is not None:
            return self.feature_stride
        return 16 if self.dilation else 32


def config_from_dict(data: dict[str, Any]) -> DetrConfig:
    """Build a :class:`DetrConfig` or :class:`SmcaConfig` from ``to_dict()`` output by ``arch``.

    Args:
        data: a dict from ``to_dict()`` (``arch`` ``"detr"`` or ``"smca"``; missing means
            ``"detr"``).

    Returns:
        The config of the class named by ``arch``.

    Raises:
        ValueError: for an unknown ``arch``, a newer ``version`` or unknown fields.

    Examples:
        >>> from qdetr.models import SmcaConfig, config_from_dict
        >>> config = config_from_dict(SmcaConfig(num_queries=100).to_dict())
        >>> type(config).__name__, config.num_queries
        ('SmcaConfig', 100)
    """
    arch = data.get("arch", "detr")
    classes = {"detr": DetrConfig, "smca": SmcaConfig}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(classes)}")
    return classes[arch].from_dict(data)
