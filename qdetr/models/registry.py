"""Model registry: ``create_model(name, **overrides)`` and ``list_models()``.

Entries build untrained models (no download ever happens here). ``overrides`` replace
fields of the entry's config dataclass (``DetrConfig``/``SmcaConfig``); the quantized
entries also take ``bits`` and ``profile``.

==================== ===========================================================
name                 model
==================== ===========================================================
``detr_r50``         DETR, ResNet-50, 100 queries (facebookresearch/detr layout)
``detr_r101``        DETR, ResNet-101
``smca_detr_r50``    single-scale SMCA-DETR, ResNet-50, 300 queries, type3
``detr_tiny``        test-sized DETR (tiny ResNet, d=32, 1+2 layers, 10 queries)
``smca_detr_tiny``   test-sized SMCA-DETR
``qdetr_smca_r50``   quantized SMCA-DETR-R50 in the Q-DETR release layout
``qdetr_smca_tiny``  test-sized quantized SMCA-DETR (bireal tiny backbone)
==================== ===========================================================
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

from qdetr.models.config import DetrConfig, SmcaConfig
from qdetr.models.detr import Detr
from qdetr.models.smca import SmcaDetr

__all__ = ["register_model", "create_model", "list_models", "build_model", "model_config"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_CONFIGS: dict[str, DetrConfig] = {}

#: Shared tiny settings for the test-sized entries.
TINY_SETTINGS = dict(
    backbone="resnet_tiny",
    hidden_dim=32,
    nheads=4,
    enc_layers=1,
    dec_layers=2,
    dim_feedforward=64,
    num_queries=10,
    num_classes=5,
)


def register_model(name: str, config: DetrConfig | None = None) -> Callable:
    """Decorator registering a builder ``fn(**overrides) -> nn.Module`` under ``name``.

    Args:
        name: registry key.
        config: the entry's base config (reported by :func:`model_config`).

    Returns:
        The decorator; it returns the builder unchanged.

    Raises:
        ValueError: if ``name`` is already registered.

    Examples:
        >>> from qdetr.models import create_model, list_models, register_model
        >>> @register_model("detr_tiny_3q")
        ... def detr_tiny_3q(**overrides):
        ...     return create_model("detr_tiny", num_queries=3, **overrides)
        >>> "detr_tiny_3q" in list_models()
        True
        >>> create_model("detr_tiny_3q").query_embed.weight.shape
        torch.Size([3, 32])
        >>> register_model("detr_tiny")(detr_tiny_3q)
        Traceback (most recent call last):
        ...
        ValueError: model 'detr_tiny' is already registered; pick another name
    """

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered; pick another name")
        _REGISTRY[name] = fn
        if config is not None:
            _CONFIGS[name] = config
        return fn

    return decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a glob ``pattern`` (e.g. ``"*tiny"``).

    Args:
        pattern: ``fnmatch`` glob on the name; None lists every entry.

    Returns:
        The matching names, sorted.

    Examples:
        >>> from qdetr.models import list_models
        >>> list_models("*_tiny")
        ['detr_tiny', 'qdetr_smca_tiny', 'smca_detr_tiny']
        >>> "detr_r50" in list_models()
        True
    """
    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def model_config(name: str) -> DetrConfig:
    """Base config of a registered float or quantized entry.

    Args:
        name: a name from :func:`list_models`.

    Returns:
        The entry's :class:`~qdetr.models.config.DetrConfig` or
        :class:`~qdetr.models.config.SmcaConfig` (before any ``create_model`` overrides).

    Raises:
        ValueError: for an unknown name (the message lists close matches).

    Examples:
        >>> from qdetr.models import model_config
        >>> config = model_config("qdetr_smca_tiny")
        >>> type(config).__name__, config.hidden_dim, config.backbone_unit
        ('SmcaConfig', 32, 'bireal')
    """
    _check_name(name)
    return _CONFIGS[name]


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Available: {list_models()}")


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        **overrides: config fields to change (e.g. ``num_classes=20``), and for quantized
            entries ``bits`` / ``profile``. Their ``profile`` defaults to ``"seed"``: these
            entries rebuild the released Q-DETR checkpoints (DA on the decoder self-attention),
            while :func:`qdetr.quant.quantize_model` defaults to ``"paper"``, the method as
            published, for any detector.

    Returns:
        The untrained model, in train mode (no weights are downloaded). Its
        ``forward(pixel_values (B, 3, H, W), pixel_mask (B, H, W) = None)`` returns a
        :class:`~qdetr.models.outputs.DetectionOutput` with ``pred_logits`` (B, Q, C+1) and
        ``pred_boxes`` (B, Q, 4) normalised cxcywh.

    Raises:
        ValueError: for an unknown name or an unknown/invalid override.

    Examples:
        >>> import torch
        >>> from qdetr.models import create_model
        >>> model = create_model("detr_tiny", num_classes=20).eval()
        >>> with torch.no_grad():
        ...     out = model(torch.randn(2, 3, 64, 64))
        >>> out["pred_logits"].shape, out["pred_boxes"].shape
        (torch.Size([2, 10, 21]), torch.Size([2, 10, 4]))
        >>> create_model("qdetr_smca_tiny", bits=4).config.backbone_unit
        'bireal'
        >>> model = create_model("detr_r50")  # doctest: +SKIP
    """
    _check_name(name)
    return _REGISTRY[name](**overrides)


def build_model(config: DetrConfig) -> nn.Module:
    """``Detr`` or ``SmcaDetr`` for ``config``.

    Args:
        config: a :class:`~qdetr.models.config.DetrConfig` (gives ``Detr``) or
            :class:`~qdetr.models.config.SmcaConfig` (gives ``SmcaDetr``).

    Returns:
        The untrained float model.

    Raises:
        TypeError: if ``config`` is neither.

    Examples:
        >>> from qdetr.models import SmcaConfig, build_model
        >>> config = SmcaConfig(backbone="resnet_tiny", hidden_dim=32, nheads=4, enc_layers=1,
        ...                     dec_layers=1, dim_feedforward=64, num_queries=5)
        >>> type(build_model(config)).__name__
        'SmcaDetr'
    """
    if isinstance(config, SmcaConfig):
        return SmcaDetr(config)
    if isinstance(config, DetrConfig):
        return Detr(config)
    raise TypeError(f"expected a DetrConfig or SmcaConfig, got {type(config).__name__}")


def _apply_overrides(config: DetrConfig, overrides: dict) -> DetrConfig:
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} fields {unknown}; valid fields: {sorted(fields)}")
    return dataclasses.replace(config, **overrides)


def _register_float(name: str, config: DetrConfig) -> None:
    def builder(**overrides) -> nn.Module:
        return build_model(_apply_overrides(config, overrides))

    builder.__name__ = name
    builder.__doc__ = f"Build ``{name}`` from {config!r} with ``overrides`` applied."
    register_model(name, config)(builder)


def _register_quantized(name: str, config: SmcaConfig) -> None:
    def builder(*, bits: int = 4, profile: str = "seed", quant_config=None, **overrides) -> nn.Module:
        from qdetr.models.quantized import build_qdetr_smca

        return build_qdetr_smca(
            _apply_overrides(config, overrides), bits=bits, profile=profile, quant_config=quant_config
        )

    builder.__name__ = name
    builder.__doc__ = (
        f"Quantized SMCA-DETR ``{name}``: ``bits`` (2/3/4), ``profile`` (``'seed'``, the default: the released "
        "checkpoints' layout, or ``'paper'``, quantize_model's default), optional ``quant_config`` and config "
        "``overrides``."
    )
    register_model(name, config)(builder)


_register_float("detr_r50", DetrConfig())
_register_float("detr_r101", DetrConfig(backbone="resnet101"))
_register_float("smca_detr_r50", SmcaConfig())
_register_float("detr_tiny", DetrConfig(**TINY_SETTINGS))
_register_float("smca_detr_tiny", SmcaConfig(**TINY_SETTINGS))
_register_quantized("qdetr_smca_r50", SmcaConfig(backbone_unit="bireal", query_width=512))
_register_quantized("qdetr_smca_tiny", SmcaConfig(**TINY_SETTINGS, backbone_unit="bireal", query_width=64))
