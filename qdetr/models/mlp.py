"""The small multi-layer perceptron used for DETR's box head and SMCA's reference point."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (none after the last).

    Args:
        input_dim: input width.
        hidden_dim: width of the hidden layers.
        output_dim: output width.
        num_layers: number of Linear layers (state-dict names ``layers.{i}``).

    Shapes:
        (..., input_dim) -> (..., output_dim).

    Examples:
        >>> from qdetr.models.mlp import MLP
        >>> _ = torch.manual_seed(0)
        >>> head = MLP(input_dim=16, hidden_dim=32, output_dim=4, num_layers=3)
        >>> len(head.layers), head.layers[0].out_features, head.layers[2].out_features
        (3, 32, 4)
        >>> head(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 4])
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x
