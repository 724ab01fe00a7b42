"""Preprocessing: resize rule, normalisation, padding and mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qdetr.models import PreprocessingConfig, create_model, preprocess_images
from qdetr.models.preprocessing import resized_size_hw


def test_resize_rule():
    assert resized_size_hw(480, 640, 800, 1333) == (800, 1066)
    assert resized_size_hw(640, 480, 800, 1333) == (1066, 800)
    assert resized_size_hw(200, 1000, 800, 1333) == (267, 1335)  # capped as the original (rounding)
    assert resized_size_hw(800, 900, 800, 1333) == (800, 900)
    assert resized_size_hw(10, 20, 8, None) == (8, 16)


def test_preprocess_mixed_inputs_pads_and_masks():
    pil = Image.fromarray(np.full((30, 40, 3), 255, dtype=np.uint8))
    tensor = torch.zeros(3, 20, 50, dtype=torch.uint8)
    array = np.zeros((16, 16, 3), dtype=np.uint8)
    batch = preprocess_images([pil, tensor, array], PreprocessingConfig(shortest_edge=32, longest_edge=64))
    pv, pm = batch["pixel_values"], batch["pixel_mask"]
    assert batch["original_sizes"].tolist() == [[30, 40], [20, 50], [16, 16]]
    assert batch["sizes"].tolist() == [[32, 42], [26, 65], [32, 32]]
    assert pv.shape == (3, 3, 32, 65) and pm.shape == (3, 32, 65)
    assert pm[0, :, :42].all() and not pm[0, :, 42:].any()
    assert pm[1, :26].all() and not pm[1, 26:].any()
    # White pixels normalise to (1 - mean) / std; padding stays 0.
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(pv[0, :, 5, 5], expected)
    assert (pv[0, :, :, 42:] == 0).all()
    out = create_model("detr_tiny").eval()(pv, pm)
    assert out["pred_boxes"].shape[0] == 3


def test_preprocess_errors():
    with pytest.raises(ValueError, match="RGB"):
        preprocess_images(torch.zeros(1, 8, 8))
    with pytest.raises(TypeError, match="unsupported image type"):
        preprocess_images(["not an image"])
    with pytest.raises(ValueError, match="empty"):
        preprocess_images([])
    with pytest.raises(ValueError, match="longest_edge"):
        PreprocessingConfig(shortest_edge=800, longest_edge=400)
