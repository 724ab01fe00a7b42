"""``model.predict``: PIL images, paths and tensors -> absolute xyxy detections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import qdetr.zoo as zoo
from qdetr.models import PreprocessingConfig, post_process_object_detection, preprocess_images

from .helpers import tiny_quantized_smca

SMALL = PreprocessingConfig(shortest_edge=64, longest_edge=96)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("predict") / "m"
    zoo.save_pretrained(tiny_quantized_smca(4), directory)
    return zoo.from_pretrained(directory)


def _image(seed: int, size_wh=(120, 80)) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size_wh[1], size_wh[0], 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_predict_matches_preprocess_forward_postprocess(model):
    image = _image(0)
    (result,) = model.predict(image, threshold=0.0, preprocessing=SMALL)
    assert set(result) == {"scores", "labels", "boxes"}
    batch = preprocess_images([image], SMALL)
    with torch.no_grad():
        out = model(batch["pixel_values"], batch["pixel_mask"])
    (expected,) = post_process_object_detection(out, threshold=0.0, target_sizes=batch["original_sizes"])
    for key in ("scores", "labels", "boxes"):
        assert torch.equal(result[key], expected[key])
    # boxes are absolute pixels of the original 120x80 image, not normalised
    assert result["boxes"].shape[1] == 4 and result["boxes"][:, 2].max() > 1.5
    assert torch.all(result["scores"][:-1] >= result["scores"][1:])


def test_paths_pil_and_tensors_agree(model, tmp_path):
    image = _image(1)
    path = tmp_path / "img.png"
    image.save(path)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    by_pil, by_path, by_str, by_tensor = model.predict([image, path, str(path), tensor], threshold=0.0,
                                                       preprocessing=SMALL)
    for other in (by_path, by_str, by_tensor):
        assert torch.equal(other["boxes"], by_pil["boxes"]) and torch.equal(other["labels"], by_pil["labels"])


def test_threshold_filters_and_batches_are_independent(model):
    images = [_image(2), _image(3, size_wh=(64, 100))]
    low = model.predict(images, threshold=0.0, preprocessing=SMALL)
    one_by_one = [model.predict(im, threshold=0.0, preprocessing=SMALL)[0] for im in images]
    for a, b in zip(low, one_by_one):
        assert torch.equal(a["scores"], b["scores"])
    cut = float(low[0]["scores"].median())
    high = model.predict(images[0], threshold=cut, preprocessing=SMALL)[0]
    assert len(high["scores"]) < len(low[0]["scores"]) and bool((high["scores"] > cut).all())


def test_labels_have_names_and_model_stays_in_eval(model):
    (result,) = model.predict(_image(4), threshold=0.0, preprocessing=SMALL)
    assert all(int(label) in model.id2label for label in result["labels"])
    assert not model.training


def test_bad_inputs(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found"):
        model.predict(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="no images"):
        model.predict([])
