"""``quantize_model``: turn any PyTorch detector into a quantization-aware one, attention included."""

from __future__ import annotations

import fnmatch

from torch import nn

from qdetr.quant.attention_adapters import find_attention_adapter, looks_like_attention
from qdetr.quant.config import QuantConfig, check_bits
from qdetr.quant.rollback import ModelSnapshot
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
                f"quantization rule(s) {unused} matched no module (keep_float) or no Conv2d/Linear/attention "
                f"module (overrides); check the glob against the module names (e.g. {sample}, ...)"
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
        profile: ``"paper"``, ``"seed"`` or ``"deploy"`` (integer-kernel numerics); ignored when
            ``config`` is given. The default is the method as published;
            ``create_model("qdetr_...")`` / ``build_qdetr_smca`` default to ``"seed"`` because
            they rebuild the released checkpoints.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: bits outside 2..8, unknown profile, a rule matching nothing, or an
            already quantized model.
        ConfigError: ``model`` is a bare ``nn.Linear`` / ``nn.Conv2d`` / attention (it cannot
            be replaced in place; wrap it in ``nn.Sequential``).
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
    if isinstance(model, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)):
        from qdetr.errors import ConfigError

        raise ConfigError(
            f"quantize_model replaces layers inside a model and returns the same object, so it cannot quantize a bare "
            f"{type(model).__name__}; wrap it: quantize_model(nn.Sequential(layer), bits=4)[0]"
        )
    if is_quantized(model):
        raise ValueError(
            "model is already quantized (it contains qdetr quantizers); quantize a fresh float model, "
            "or inspect this one with qdetr.quant_summary(model)"
        )

    rules = _RuleMatcher(config)
    report: dict[str, str] = {}
    actions: list[tuple[str, nn.Module, object, object]] = []
    considered: list[str] = []
    skipped: list[str] = []  # subtrees handled as a whole (attention) or kept in float on purpose
    stem_found = False
    unreachable: list[str] = []
    named = list(model.named_modules())
    handled = {id(m) for _, m in named if find_attention_adapter(m) is not None}

    for name, module in named:
        if not name or any(name.startswith(p + ".") for p in skipped):
            continue
        adapter = find_attention_adapter(module)
        is_layer = adapter is not None or type(module) in (nn.Conv2d, nn.Linear)
        if is_layer:
            considered.append(name)
        pattern = rules.keep(name)
        if pattern is not None:
            # keep_float protects the whole subtree (a deformable attention's projections, a head MLP, ...).
            skipped.append(name)
            for sub_name, sub in [(name, module)] + [(f"{name}.{n}", m) for n, m in module.named_modules() if n]:
                if find_attention_adapter(sub) is not None or isinstance(sub, (nn.Conv2d, nn.Linear)):
                    report.setdefault(sub_name, f"float: keep_float rule {pattern!r}")
            continue
        if adapter is not None:
            skipped.append(name)
            role = classify_attention(name)
            actions.append((name, module, adapter, plan_attention(role, config, rules.bits(name))))
            report[name] = f"quantized ({role})"
        elif type(module) in (nn.Conv2d, nn.Linear):
            # The stem is the first Conv2d that reads the 3-channel image (it may come after
            # other convs in registration order, e.g. DETR's input_proj).
            is_stem = isinstance(module, nn.Conv2d) and not stem_found and module.in_channels == 3
            stem_found = stem_found or is_stem
            role = classify_linear_or_conv(name, module, is_stem)
            plan = plan_layer(role, config, rules.bits(name))
            if isinstance(plan, FloatReason):
                report[name] = f"float: {plan}"
                continue
            actions.append((name, module, None, plan))
            report[name] = f"quantized ({role})"
        elif looks_like_attention(module) and not any(id(m) in handled for m in module.modules()):
            unreachable.append(f"{name} ({type(module).__name__})")

    if unreachable:
        raise NotImplementedError(
            "quantize_model cannot reach the attention computation of: "
            + ", ".join(unreachable)
            + ". Supported: nn.MultiheadAttention, qdetr.layers.MultiheadAttention and the transformers "
            "DETR-family attention forms listed in qdetr.quant.attention_adapters. Add the names to "
            "QuantConfig(keep_float=...) to keep them in float on purpose."
        )
    rules.check_all_used(considered)

    # Every check passed: mutate. A failure from here on restores the model exactly.
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    snapshot = ModelSnapshot(model)
    try:
        for name, module, adapter, plan in actions:
            if adapter is not None:
                new = adapter.quantize(module, plan)
            else:
                cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
                new = cls.from_float(module, plan)
            if new is not module:
                for path in paths[id(module)]:  # a module registered at several paths stays shared
                    _set_child(model, path, new)
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
    except BaseException:
        snapshot.restore()
        raise
    return model
