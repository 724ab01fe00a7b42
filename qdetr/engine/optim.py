"""AdamW parameter groups for (quantization-aware) DETR training (method.md section 7).

=================================  ==================  =============
parameters                         learning rate       weight decay
=================================  ==================  =============
backbone weights                   ``lr_backbone``     ``weight_decay``
other weights                      ``lr``              ``weight_decay``
quantizer step sizes / zero points ``lr_quant`` or the  0
                                   module's own lr
DA, PReLU, LearnableBias, norms    the module's lr     0
=================================  ==================  =============

``lr_backbone = 0`` freezes the backbone (its parameters get ``requires_grad=False``).
"""

from __future__ import annotations

from torch import nn

from qdetr.engine.config import OptimConfig

__all__ = ["build_param_groups", "is_no_decay_module"]

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
_NO_DECAY_CLASS_NAMES = ("LearnableBias", "DistributionAlignment", "FrozenBatchNorm2d")


def is_no_decay_module(module: nn.Module) -> bool:
    """True for modules whose parameters get no weight decay (norms, PReLU, LearnableBias, DA).

    Examples:
        >>> from torch import nn
        >>> from qdetr.engine.optim import is_no_decay_module
        >>> is_no_decay_module(nn.LayerNorm(8)), is_no_decay_module(nn.PReLU()), is_no_decay_module(nn.Linear(8, 8))
        (True, True, False)
    """
    return isinstance(module, (*_NORM_TYPES, nn.PReLU)) or type(module).__name__ in _NO_DECAY_CLASS_NAMES


def _is_quantizer_param(module_name: str, module: nn.Module) -> bool:
    return type(module).__name__.endswith("Quantizer") or module_name.rsplit(".", 1)[-1].endswith("_quantizer")


def build_param_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """Splits ``model``'s trainable parameters into AdamW groups (see the module table).

    Args:
        model: the detector (not DDP-wrapped); the backbone is the submodule ``backbone``.
        config: learning rates and weight decay.

    Returns:
        Non-empty parameter groups, each with ``params``, ``lr``, ``weight_decay`` and a ``name``.

    Examples:
        >>> import qdetr
        >>> from qdetr.engine.config import OptimConfig
        >>> from qdetr.engine.optim import build_param_groups
        >>> model = qdetr.quantize_model(qdetr.create_model("detr_tiny"), bits=4)
        >>> groups = build_param_groups(model, OptimConfig(lr=1e-4, lr_quant=1e-5))
        >>> sorted(group["name"] for group in groups)
        ['backbone_decay', 'backbone_quantizer', 'main_decay', 'main_no_decay', 'main_quantizer']
        >>> {group["name"]: group["weight_decay"] for group in groups}["main_quantizer"]
        0.0
    """
    groups: dict[str, dict] = {}

    def add(name: str, param, lr: float, weight_decay: float) -> None:
        group = groups.setdefault(name, {"name": name, "params": [], "lr": lr, "weight_decay": weight_decay})
        group["params"].append(param)

    seen: set[int] = set()
    for module_name, module in model.named_modules():
        in_backbone = module_name == "backbone" or module_name.startswith("backbone.")
        base_lr = config.lr_backbone if in_backbone else config.lr
        prefix = "backbone" if in_backbone else "main"
        quant = _is_quantizer_param(module_name, module)
        no_decay = is_no_decay_module(module)
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if in_backbone and config.lr_backbone == 0:
                param.requires_grad_(False)
            if not param.requires_grad:
                continue
            if quant:
                lr = config.lr_quant if config.lr_quant is not None else base_lr
                add(f"{prefix}_quantizer", param, lr, 0.0)
            elif no_decay:
                add(f"{prefix}_no_decay", param, base_lr, 0.0)
            else:
                add(f"{prefix}_decay", param, base_lr, config.weight_decay)
    return [g for g in groups.values() if g["params"]]
