"""Recompute fake-quantized inputs in backward instead of saving them.

A quantized layer computes ``y = op(x̂, ŵ)`` with ``x̂ = Q(x)``. Autograd would keep
``x̂`` for the backward pass of ``op`` *and* ``x`` for the backward pass of ``Q`` (``x`` is
usually kept alive anyway: it is the output of a ReLU or the input of a residual add).
:func:`recompute_saved` replaces the saved ``x̂`` by a recipe that recomputes it from ``x``
when backward needs it, so a quantized layer stores no more activation memory than its
float counterpart. The recomputation uses the same function as the forward pass, so the
recomputed tensor is bit-identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["recompute_saved", "slot_recipes"]


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class _Recipe:
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self.fn = fn


@contextlib.contextmanager
def recompute_saved(recipes: dict[torch.Tensor, Callable[[], torch.Tensor]]) -> Iterator[None]:
    """Inside the context, tensors in ``recipes`` saved for backward are recomputed instead.

    Args:
        recipes: ``{tensor: fn}``; ``fn()`` must return a tensor equal to ``tensor``.

    Does nothing when autograd is off or under ``torch.compile`` tracing (the compiler
    makes its own recomputation decisions).

    Examples:
        >>> x = torch.randn(4, 8, requires_grad=True)                  # (N, in_features)
        >>> weight = torch.randn(3, 8, requires_grad=True)
        >>> x_hat = torch.round(x * 4) / 4                             # stands in for Q(x)
        >>> with recompute_saved({x_hat: lambda: torch.round(x.detach() * 4) / 4}):
        ...     y = torch.nn.functional.linear(x_hat, weight)          # x_hat is not stored
        >>> y.sum().backward()
        >>> torch.allclose(weight.grad, torch.ones(4, 3).T @ x_hat.detach())
        True
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or not recipes:
        yield
        return
    table = {_key(t): fn for t, fn in recipes.items()}

    def pack(t: torch.Tensor):
        fn = table.get(_key(t)) if isinstance(t, torch.Tensor) and t.layout == torch.strided else None
        return _Recipe(fn) if fn is not None else t

    def unpack(obj):
        if isinstance(obj, _Recipe):
            with torch.no_grad():
                return obj.fn()
        return obj

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def slot_recipes(*triples: tuple[torch.Tensor, object, torch.Tensor]) -> dict:
    """Recipes for slot outputs: ``(output, slot, input)`` triples whose slot has a
    ``recompute(input)`` method (qdetr quantizers do; ``nn.Identity`` slots are skipped).

    Args:
        *triples: ``(output, slot, input)`` with ``output = slot(input)``.

    Returns:
        ``{output: fn}`` for :func:`recompute_saved`.

    Examples:
        >>> from qdetr.quant import LSQActQuantizer
        >>> q = LSQActQuantizer(8, 4, axis=1, signed=True).train()
        >>> k = torch.randn(2, 4, 5, 8)                                # (B, h, S, d_h)
        >>> k_hat = q(k)
        >>> identity = torch.nn.Identity()
        >>> len(slot_recipes((k_hat, q, k), (k, identity, k)))         # the identity slot is skipped
        1
    """
    return {out: (lambda s=slot, i=inp: s.recompute(i)) for out, slot, inp in triples if hasattr(slot, "recompute") and out is not inp}
