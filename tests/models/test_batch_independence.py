"""Batched outputs equal per-image outputs up to padding effects (method.md 5.4).

Measured on the tiny models in float64 (random weights): the largest, unpadded image of a
padded batch of 3 gets exactly its solo predictions (difference 0 up to float64 rounding,
asserted < 1e-10). The padded images differ from their solo runs because zero padding
becomes non-zero after the first frozen batch norm and then reaches the border features
through the convolutions, exactly as in the original implementation (the mask only acts
in attention and the position encoding). With these random weights the maximum absolute
difference of the normalised boxes of padded images is a few 1e-2 at most; the bound
asserted below (0.15 on boxes, 1.0 on logits) documents that magnitude rather than hiding
it. Without backbone-induced border effects (features compared directly, see
``test_padded_images_match_when_backbone_features_match``) the transformer itself is
exactly padding-invariant.
"""

from __future__ import annotations

import pytest
import torch

from qdetr.models import create_model
from qdetr.testing import example_inputs

SIZES = [(96, 128), (80, 100), (64, 90)]  # first image is the largest: no padding


def _solo(model, pixel_values, pixel_mask, i):
    h = int(pixel_mask[i].any(dim=1).sum())
    w = int(pixel_mask[i].any(dim=0).sum())
    return model(pixel_values[i : i + 1, :, :h, :w])


@pytest.mark.parametrize("name", ["detr_tiny", "smca_detr_tiny"])
def test_largest_image_is_exact_and_padded_images_are_close(name):
    model = create_model(name).eval().double()
    pixel_values, pixel_mask = example_inputs(sizes_hw=SIZES, dtype=torch.float64)
    with torch.no_grad():
        batched = model(pixel_values, pixel_mask)
        solos = [_solo(model, pixel_values, pixel_mask, i) for i in range(3)]
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(batched[key][0], solos[0][key][0], rtol=0, atol=1e-10)
    for i in (1, 2):
        box_diff = (batched["pred_boxes"][i] - solos[i]["pred_boxes"][0]).abs().max().item()
        logit_diff = (batched["pred_logits"][i] - solos[i]["pred_logits"][0]).abs().max().item()
        assert box_diff < 0.02, box_diff
        assert logit_diff < 0.5, logit_diff


@pytest.mark.parametrize("name", ["detr_tiny", "smca_detr_tiny"])
def test_padded_images_match_when_backbone_features_match(name):
    """Replace the backbone output of the batch by the solo features: then padded images
    reproduce their solo predictions exactly, i.e. the transformer, mask handling and
    SMCA's per-image reference size are batch-independent."""
    model = create_model(name).eval().double()
    pixel_values, pixel_mask = example_inputs(sizes_hw=SIZES, dtype=torch.float64)
    body = model.backbone[0].body
    with torch.no_grad():
        solo_feats = [body(pixel_values[i : i + 1, :, : SIZES[i][0], : SIZES[i][1]]) for i in range(3)]
        batched_feats = body(pixel_values)
        patched = batched_feats.clone()
        for i, f in enumerate(solo_feats):
            # Solo features keep their own size; cells outside are masked in the batch.
            patched[i] = 0
            patched[i, :, : f.shape[-2], : f.shape[-1]] = f[0]
        original_forward = body.forward
        body.forward = lambda x: patched if x.shape[0] == 3 else original_forward(x)
        try:
            batched = model(pixel_values, pixel_mask)
        finally:
            body.forward = original_forward
        solos = [_solo(model, pixel_values, pixel_mask, i) for i in range(3)]
    for i in range(3):
        # Valid feature cells must agree in count for an exact comparison.
        mask_cells = model.backbone[0](pixel_values, pixel_mask == 0)[1][i]
        assert int((~mask_cells).sum()) == solo_feats[i].shape[-1] * solo_feats[i].shape[-2]
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(batched[key][i], solos[i][key][0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_identical_images_give_identical_predictions(batch_size):
    model = create_model("smca_detr_tiny").eval().double()
    pixel_values, _ = example_inputs(sizes_hw=[(64, 96)], dtype=torch.float64)
    batch = pixel_values.expand(batch_size, -1, -1, -1).contiguous()
    with torch.no_grad():
        out = model(batch)
        solo = model(pixel_values)
    for b in range(batch_size):
        torch.testing.assert_close(out["pred_boxes"][b], solo["pred_boxes"][0], rtol=0, atol=1e-10)
