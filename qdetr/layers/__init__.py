"""Building blocks shared by :mod:`qdetr.models`, :mod:`qdetr.quant` and :mod:`qdetr.distill`."""

from qdetr.layers.attention import AttentionSlots, MultiheadAttention

__all__ = ["MultiheadAttention", "AttentionSlots"]
