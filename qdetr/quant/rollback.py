"""All-or-nothing model surgery: snapshot a module tree and restore it exactly.

:func:`qdetr.quantize_model` checks everything it can before touching the model; what can
still fail while it mutates (a transformers module that refuses a swap, a device error, an
interrupt) is undone with a :class:`ModelSnapshot`, so that a failed call leaves the model
with the same module objects, classes, parameters, buffers, hooks and attributes (including
``config._attn_implementation`` of transformers models), and a second call can succeed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["ModelSnapshot"]


def _copy_state(obj: Any) -> dict[str, Any]:
    """Shallow copy of ``obj.__dict__`` with dict values (``_modules``, hooks, ...) copied one level."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(obj).items()}


def _restore_state(obj: Any, saved: dict[str, Any]) -> None:
    current = vars(obj)
    for key in [k for k in current if k not in saved]:
        del current[key]
    for key, value in saved.items():
        now = current.get(key)
        if isinstance(value, dict) and isinstance(now, dict) and now is not value:
            now.clear()  # keep the dict object (OrderedDict subclasses, hook handles refer to it)
            now.update(value)
        else:
            current[key] = value


def _configs(model: nn.Module) -> list[Any]:
    """transformers configs reachable from the modules (``module.config`` and their sub-configs)."""
    found: dict[int, Any] = {}
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        config = stack.pop()
        if config is None or id(config) in found or not hasattr(config, "_attn_implementation"):
            continue
        found[id(config)] = config
        stack.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
    return list(found.values())


class ModelSnapshot:
    """The state of every module (and transformers config) of a model, restorable in place.

    Records, per module, its class and its ``__dict__`` (children, parameters, buffers, hooks
    and plain attributes; containers copied one level, tensors not copied: quantization swaps
    modules but does not write into existing parameters).

    Args:
        model: the root module.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> snapshot = ModelSnapshot(model)
        >>> first = model[0]
        >>> model[0] = nn.Identity()
        >>> model[0].extra = 1
        >>> snapshot.restore()
        >>> model[0] is first
        True
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = [(m, type(m), _copy_state(m)) for m in model.modules()]
        self._configs = [(c, _copy_state(c)) for c in _configs(model)]

    def restore(self) -> None:
        """Put every recorded module and config back as it was."""
        for module, cls, state in self._modules:
            if type(module) is not cls:
                module.__class__ = cls
            _restore_state(module, state)
        for config, state in self._configs:
            _restore_state(config, state)
