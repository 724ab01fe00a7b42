"""post_process_object_detection: softmax vs sigmoid top-k, sizes, sorting."""

from __future__ import annotations

import pytest
import torch

from qdetr.models import DetectionOutput, create_model, post_process_object_detection
from qdetr.testing import example_inputs


def _out(logits, boxes, head):
    return DetectionOutput(classification=head, pred_logits=logits, pred_boxes=boxes)


def test_softmax_rule_drops_no_object_and_thresholds():
    logits = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 3.0, 0.0]]])  # 2 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.2, 0.2]]])
    res = post_process_object_detection(_out(logits, boxes, "softmax"), threshold=0.5, target_sizes=[(100, 200)])[0]
    prob = logits.softmax(-1)[0, :, :-1]
    assert res["labels"].tolist() == [0, 1]
    torch.testing.assert_close(res["scores"], prob.max(-1).values[[0, 2]])
    torch.testing.assert_close(res["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))
    assert (res["scores"][:-1] >= res["scores"][1:]).all()


def test_sigmoid_rule_top_k_over_query_class_pairs():
    logits = torch.tensor([[[2.0, -1.0, 9.0], [1.0, 3.0, 9.0]]])  # last column = no-object (large)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5]]])
    res = post_process_object_detection(_out(logits, boxes, "sigmoid"), threshold=0.0, top_k=3)[0]
    # no-object column is never returned; pairs sorted by score: (q1,c1), (q0,c0), (q1,c0)
    assert res["labels"].tolist() == [1, 0, 0]
    torch.testing.assert_close(res["scores"], torch.tensor([3.0, 2.0, 1.0]).sigmoid())
    torch.testing.assert_close(res["boxes"][0], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    # Threshold filters after top-k; default k = Q.
    res = post_process_object_detection(_out(logits, boxes, "sigmoid"), threshold=0.8)[0]
    assert res["labels"].tolist() == [1, 0]


def test_softmax_rule_on_smca_logits_differs():
    """Guard: the DETR rule gives different detections on focal logits."""
    model = create_model("smca_detr_tiny").eval()
    out = model(*example_inputs(1))
    right = post_process_object_detection(out, threshold=0.0)
    wrong = post_process_object_detection(out, threshold=0.0, classification="softmax")
    assert len(right[0]["scores"]) == model.config.num_queries
    assert not torch.allclose(right[0]["scores"][:5], wrong[0]["scores"][:5])


@pytest.mark.parametrize("name", ["detr_tiny", "smca_detr_tiny"])
def test_model_outputs_dispatch_and_scale(name):
    model = create_model(name).eval()
    out = model(*example_inputs(2))
    res = post_process_object_detection(out, threshold=0.0, target_sizes=torch.tensor([[480, 640], [300, 400]]))
    rel = post_process_object_detection(out, threshold=0.0)
    assert len(res) == 2
    for r, r_rel, (h, w) in zip(res, rel, [(480, 640), (300, 400)]):
        assert r["boxes"].shape[1] == 4
        torch.testing.assert_close(r["boxes"], r_rel["boxes"] * torch.tensor([w, h, w, h]))
        assert (r["boxes"][:, 2:] >= r["boxes"][:, :2]).all()
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
        assert r["labels"].max() < model.config.num_classes


def test_postprocess_errors():
    logits, boxes = torch.zeros(1, 2, 3), torch.full((1, 2, 4), 0.5)
    with pytest.raises(ValueError, match="classification"):
        post_process_object_detection({"pred_logits": logits, "pred_boxes": boxes})
    with pytest.raises(ValueError, match="target_sizes"):
        post_process_object_detection(_out(logits, boxes, "softmax"), target_sizes=[(1, 2), (3, 4)])
