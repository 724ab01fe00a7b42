"""``quantize_model``: turn any PyTorch detector into a quantization-aware one, attention included."""

from __future__ import annotations

import fnmatch

from torch import nn

from qdetr.layers.attention import MultiheadAttention
from qdetr.quant.attention import QuantMultiheadAttention, is_hf_attention, quantize_hf_attention
from qdetr.quant.config import QuantConfig, check_bits
from qdetr.quant.modules import QuantConv2d, QuantLinear
from qdetr.quant.policy import (
    FloatReason,
    classify_attention,
    classify_linear_or_conv,
    plan_attention,
    plan_layer,
)
from qdetr.quant.quantizers import LSQActQuantizer, LSQWeightQuantizer
from qdetr.quant.residual_outputs import attach_residual_output_quantizers

__all__ = ["quantize_model", "is_quantized", "REPORT_ATTR", "CONFIG_ATTR"]

#: Attribute on the root module holding ``{name: status}`` for every layer considered.
REPORT_ATTR = "_qdetr_quant_report"
#: Attribute on the root module holding the :class:`QuantConfig` used.
CONFIG_ATTR = "qdetr_quant_config"


def is_quantized(model: nn.Module) -> bool:
    """True if ``model`` already contains qdetr quantizers.

    Args:
        model: any ``nn.Module``.

    Returns:
        Whether some submodule is an :class:`LSQWeightQuantizer` or :class:`LSQActQuantizer`.

    Examples:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> is_quantized(model)
        False
        >>> is_quantized(quantize_model(model, bits=4))
        True
    """
    return any(isinstance(m, (LSQWeightQuantizer, LSQActQuantizer)) for m in model.modules())


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, (nn.MultiheadAttention, MultiheadAttention)) or is_hf_attention(module)


def _looks_like_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower() and not _is_attention(module)


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


class _RuleMatcher:
    """Glob rules with usage tracking, so that a rule matching nothing is reported."""

    def __init__(self, config: QuantConfig) -> None:
        self.overrides = list(config.overrides)
        self.keep_float = list(config.keep_float)
        self.used: set[str] = set()

    def keep(self, name: str) -> str | None:
        for pattern in self.keep_float:
            if fnmatch.fnmatchcase(name, pattern):
                self.used.add(pattern)
                return pattern
        return None

    def bits(self, name: str) -> int | None:
        for pattern, bits in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                self.used.add(pattern)
                return bits
        return None

    def check_all_used(self, names: list[str]) -> None:
        unused = [p for p in [p for p, _ in self.overrides] + self.keep_float if p not in self.used]
        if unused:
            sample = ", ".join(names[:8])
            raise ValueError(
                f"quantization rule(s) {unused} matched no Conv2d/Linear/attention module; "
                f"check the glob against the module names (e.g. {sample}, ...)"
            )


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    *,
    config: QuantConfig | None = None,
    profile: str = "paper",
) -> nn.Module:
    """Make ``model`` quantization-aware in place and return it.

    Swaps ``nn.Conv2d`` -> :class:`QuantConv2d`, ``nn.Linear`` -> :class:`QuantLinear`,
    ``nn.MultiheadAttention`` / :class:`qdetr.layers.MultiheadAttention` ->
    :class:`QuantMultiheadAttention`, and quantizes Hugging Face DETR-family attention in
    place, following the profile (method.md section 4; the ``"deploy"`` profile also puts
    8-bit quantizers on the ResNet outputs that feed residual adds,
    :mod:`qdetr.quant.residual_outputs`). Weight steps are initialised from
    the weights immediately; activation steps are calibrated on the first training batch
    or by :func:`qdetr.quant.calibrate`.

    Args:
        model: any ``nn.Module`` (qdetr models, torchvision ResNets, ``nn.Transformer``,
            transformers ``DetrForObjectDetection``, ...).
        bits: b in "W b / A b / Attn 8"; ignored when ``config`` is given.
        config: full configuration (bits, profile, overrides, keep_float, numerics).
        profile: ``"paper"``, ``"seed"`` or ``"deploy"``; ignored when ``config`` is given.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: bits outside 2..8, unknown profile, a rule matching nothing, or an
            already quantized model.
        NotImplementedError: an attention module that cannot be reached (name it in
            ``keep_float`` to keep it in float on purpose).

    Examples:
        >>> import qdetr
        >>> _ = torch.manual_seed(0)
        >>> model = quantize_model(qdetr.create_model("detr_tiny"), bits=4)
        >>> type(model.transformer.decoder.layers[0].linear1).__name__
        'QuantLinear'
        >>> type(model.input_proj).__name__           # input_proj stays float in every profile
        'Conv2d'
        >>> out = model.train()(torch.randn(1, 3, 64, 64))   # first training step calibrates
        >>> out["pred_boxes"].shape                   # (B, Q, 4) normalised cxcywh
        torch.Size([1, 10, 4])
        >>> print(qdetr.quant_summary(model))  # doctest: +ELLIPSIS
        module ... status
        ...
        coverage (quantized/total): conv: 13/18, linear: 6/10, attention: 5/5
        A: s/u = signed/unsigned input range, ? = decided from the first calibration batch
    """
    if config is None:
        check_bits(bits)
        config = QuantConfig(bits=bits, profile=profile)
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if is_quantized(model):
        raise ValueError(
            "model is already quantized (it contains qdetr quantizers); quantize a fresh float model, "
            "or inspect this one with qdetr.quant_summary(model)"
        )

    rules = _RuleMatcher(config)
    report: dict[str, str] = {}
    replacements: list[tuple[str, nn.Module]] = []
    considered: list[str] = []
    attention_prefixes: list[str] = []
    stem_found = False
    unreachable: list[str] = []

    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in attention_prefixes):
            continue
        if _is_attention(module):
            attention_prefixes.append(name)
            considered.append(name)
            pattern = rules.keep(name)
            if pattern is not None:
                report[name] = f"float: keep_float rule {pattern!r}"
                continue
            role = classify_attention(name)
            spec = plan_attention(role, config, rules.bits(name))
            if is_hf_attention(module):
                quantize_hf_attention(module, spec)
            else:
                replacements.append((name, QuantMultiheadAttention.from_float(module, spec)))
            report[name] = f"quantized ({role})"
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and type(module) in (nn.Conv2d, nn.Linear):
            considered.append(name)
            # The stem is the first Conv2d that reads the 3-channel image (it may come after
            # other convs in registration order, e.g. DETR's input_proj).
            is_stem = isinstance(module, nn.Conv2d) and not stem_found and module.in_channels == 3
            stem_found = stem_found or is_stem
            pattern = rules.keep(name)
            if pattern is not None:
                report[name] = f"float: keep_float rule {pattern!r}"
                continue
            role = classify_linear_or_conv(name, module, is_stem)
            plan = plan_layer(role, config, rules.bits(name))
            if isinstance(plan, FloatReason):
                report[name] = f"float: {plan}"
                continue
            cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
            replacements.append((name, cls.from_float(module, plan)))
            report[name] = f"quantized ({role})"
        elif _looks_like_attention(module) and not any(
            isinstance(c, (nn.MultiheadAttention, MultiheadAttention)) or is_hf_attention(c) for c in module.modules()
        ):
            if rules.keep(name) is None:
                unreachable.append(f"{name} ({type(module).__name__})")

    if unreachable:
        raise NotImplementedError(
            "quantize_model cannot reach the attention computation of: "
            + ", ".join(unreachable)
            + ". Supported: nn.MultiheadAttention, qdetr.layers.MultiheadAttention and transformers "
            "DETR-family attention. Add the names to QuantConfig(keep_float=...) to keep them in float on purpose."
        )
    rules.check_all_used(considered)
    for name, new in replacements:
        _set_child(model, name, new)
    if config.profile == "deploy":
        for name in attach_residual_output_quantizers(model, config):
            report[name] = f"quantized (residual output A{config.residual_bits})"
    # nn.TransformerEncoder may convert inputs to nested tensors for its fused fast path,
    # which the explicit attention path does not accept.
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
            module.enable_nested_tensor = False
    setattr(model, REPORT_ATTR, report)
    setattr(model, CONFIG_ATTR, config)
    return model
