"""Tiny offline Hugging Face DETR-family detectors: each builds, runs forward and (where it can) its loss."""

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from qdetr.tiny_hf_detr import TINY_HF_DETR_NAMES, build_tiny_hf_detr  # noqa: E402

# *ForObjectDetection classes of transformers that are not DETR-style detectors.
NOT_DETR_STYLE = {
    "OwlViTForObjectDetection",  # CLIP image-text matching, no set-prediction decoder
    "Owlv2ForObjectDetection",
    "PPOCRV5MobileDetForObjectDetection",  # DB text-region segmentation
    "PPOCRV5ServerDetForObjectDetection",
    "PPOCRV6MediumDetForObjectDetection",
    "PPOCRV6SmallDetForObjectDetection",
}


@pytest.mark.parametrize("name", TINY_HF_DETR_NAMES)
def test_builds_and_runs(name):
    tiny = build_tiny_hf_detr(name)
    assert isinstance(tiny.model, tiny.cls) and tiny.model.training
    assert tuple(tiny.inputs["pixel_values"].shape) == (2, 3, 64, 64)
    if tiny.labels is not None:
        out = tiny.forward(with_labels=True)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        grads = [p.grad for p in tiny.model.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    tiny.model.eval()
    with torch.no_grad():
        out = tiny.forward()
    boxes = out.pred_boxes if hasattr(out, "pred_boxes") else out.decoder_coord_logits
    # PP-DocLayoutV4 predicts 10-coordinate quadrilateral boxes (config.num_coords), the others cxcywh
    assert boxes.shape[0] == 2 and boxes.shape[-1] == getattr(tiny.model.config, "num_coords", 4)


def test_same_seed_same_model_and_batch():
    a, b = build_tiny_hf_detr("rt_detr", seed=3), build_tiny_hf_detr("rt_detr", seed=3)
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert torch.equal(a.inputs["pixel_values"], b.inputs["pixel_values"])
    c = build_tiny_hf_detr("rt_detr", seed=4)
    assert not torch.equal(a.inputs["pixel_values"], c.inputs["pixel_values"])


def test_attn_implementation_is_applied():
    assert build_tiny_hf_detr("detr", attn_implementation="eager").model.config._attn_implementation == "eager"
    assert build_tiny_hf_detr("detr", attn_implementation="sdpa").model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["pp_doclayout_v2", "pp_doclayout_v3", "pp_doclayout_v4"])
def test_document_layout_detectors_compute_no_loss(name):
    # transformers refuses labels for these detectors, so the tiny model carries none
    tiny = build_tiny_hf_detr(name)
    assert tiny.labels is None
    labels = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    with pytest.raises(ValueError, match="does not support training"):
        tiny.model(**tiny.inputs, labels=labels)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="rt_detr"):
        build_tiny_hf_detr("yolo")


def test_every_detr_style_class_of_installed_transformers_has_a_tiny_model():
    built = {build_tiny_hf_detr(n).cls.__name__ for n in TINY_HF_DETR_NAMES}
    installed = {n for n in dir(transformers) if n.endswith("ForObjectDetection") and not n.startswith("Auto")}
    missing = installed - built - NOT_DETR_STYLE
    assert not missing, f"transformers ships DETR-family classes without a tiny config: {sorted(missing)}"


def test_docstring_examples_run():
    import doctest

    import qdetr.tiny_hf_detr as module

    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0
