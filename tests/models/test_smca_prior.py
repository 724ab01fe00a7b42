"""SMCA's Gaussian prior: inference (separated axes) and training (trailing axis) forms equal the formula bit for bit."""

from __future__ import annotations

import pytest
import torch

from qdetr.models.smca import feature_grid_xy, gaussian_prior


def _reference(centres_xy, scales, grid_xy, dynamic_scale, smooth):
    """method.md 5.2 written with a trailing (x, y) axis, as the original SMCA code does."""
    diff2 = (centres_xy.unsqueeze(3) - grid_xy).pow(2)  # (Q, B, h, S, 2)
    if dynamic_scale == "type1":
        dist = diff2.sum(-1)
    else:
        s2 = (scales * scales).unsqueeze(3)
        if dynamic_scale == "type2":
            dist = diff2.sum(-1) * s2[..., 0]
        elif dynamic_scale == "type3":
            dist = (diff2 * s2).sum(-1)
        else:
            dist = (torch.cat([diff2, diff2.prod(dim=-1, keepdim=True)], dim=-1) * s2).sum(-1)
    return (-dist.abs() / smooth).permute(1, 2, 0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dynamic_scale,k", [("type1", 0), ("type2", 1), ("type3", 2), ("type4", 3)])
def test_prior_equals_the_formula(dtype, dynamic_scale, k):
    torch.manual_seed(k)
    centres = torch.rand(12, 2, 4, 2, dtype=dtype) * 20 - 2
    scales = torch.randn(12, 2, 4, k, dtype=dtype) if k else None
    grid = feature_grid_xy(7, 9, dtype, centres.device)
    got = gaussian_prior(centres, scales, grid, dynamic_scale, 8.0)
    assert got.shape == (2, 4, 12, 63)
    assert torch.equal(got, _reference(centres, scales, grid, dynamic_scale, 8.0))


@pytest.mark.parametrize("dynamic_scale,k", [("type1", 0), ("type3", 2), ("type4", 3)])
def test_training_form_keeps_gradients_and_values(dynamic_scale, k):
    torch.manual_seed(k)
    centres = (torch.rand(12, 2, 4, 2) * 20).requires_grad_()
    scales = torch.randn(12, 2, 4, k).requires_grad_() if k else None
    grid = feature_grid_xy(7, 9, torch.float32, centres.device)
    got = gaussian_prior(centres, scales, grid, dynamic_scale, 8.0)
    with torch.no_grad():
        inference = gaussian_prior(centres, scales, grid, dynamic_scale, 8.0)
    assert torch.equal(got.detach(), inference)
    got.sum().backward()
    expected = centres.detach().clone().requires_grad_()
    _reference(expected, scales.detach() if k else None, grid, dynamic_scale, 8.0).sum().backward()
    assert torch.equal(centres.grad, expected.grad)  # the same summation order as the formula's
