"""Wrong inputs get errors, not wrong answers: images, pixel tensors, COCO files, API arguments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from qdetr.errors import ConfigError, DataError, InputImageError

from .harness import Case, check_case, ids


# ----------------------------------------------------------------------------------------- images
def _predict(image):
    from qdetr.models import PreprocessingConfig, create_model
    from qdetr.zoo import predict

    model = create_model("detr_tiny")
    return lambda _: predict(model, image, preprocessing=PreprocessingConfig(shortest_edge=32, longest_edge=64))


def _predict_file(name: str):
    from qdetr.zoo.prediction import load_image

    return lambda d: load_image(d / name)


def _save_array(name: str, array: np.ndarray):
    return lambda d: Image.fromarray(array).save(d / name)  # the mode follows the dtype (float32 -> F)


IMAGE_CASES = [
    Case("float tensor with NaN", _predict(torch.full((3, 16, 16), float("nan"))), InputImageError, "NaN"),
    Case("float tensor with inf", _predict(torch.full((3, 16, 16), float("inf"))), InputImageError, "infinite"),
    Case("float tensor in 0..255", _predict(torch.full((3, 16, 16), 200.0)), InputImageError, "divide by 255"),
    Case("normalised float tensor (negative values)", _predict(torch.full((3, 16, 16), -1.5)), InputImageError,
         "unnormalised"),
    Case("zero-size tensor", _predict(torch.zeros(3, 0, 16, dtype=torch.uint8)), InputImageError, "empty"),
    Case("1 x 500 tensor (aspect 500:1)", _predict(torch.zeros(3, 1, 500, dtype=torch.uint8)), InputImageError,
         "aspect ratio"),
    Case("text file named .jpg", _predict_file("notes.jpg"), InputImageError, "not a readable image",
         lambda d: (d / "notes.jpg").write_text("hello")),
    Case("truncated PNG", _predict_file("cut.png"), InputImageError, "not a readable image",
         lambda d: (_save_array("whole.png", np.zeros((32, 32, 3), np.uint8))(d),
                    (d / "cut.png").write_bytes((d / "whole.png").read_bytes()[:60]))),
    Case("float TIFF with values up to 1000", _predict_file("f.tiff"), InputImageError, "expected [0, 1] or [0, 255]",
         _save_array("f.tiff", np.full((8, 8), 1000.0, np.float32))),
    Case("1 x 300 PNG", _predict_file("line.png"), InputImageError, "aspect ratio",
         _save_array("line.png", np.zeros((1, 300, 3), np.uint8))),
]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=ids(IMAGE_CASES))
def test_bad_image_is_refused(case, tmp_path):
    check_case(case, tmp_path)


@pytest.mark.parametrize("dtype, suffix", [(np.uint16, ".png"), (np.uint16, ".tiff"), (np.int32, ".tiff")])
def test_high_depth_images_are_scaled_not_clipped(tmp_path, dtype, suffix):
    from qdetr.image_io import read_rgb_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    path = tmp_path / f"ramp{suffix}"
    Image.fromarray(ramp.astype(dtype)).save(path)
    assert Image.open(path).mode in ("I;16", "I;16B", "I"), Image.open(path).mode
    rgb = np.asarray(read_rgb_image(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    expected = np.rint(ramp.astype(dtype).astype(np.float64) * 255 / 65535)
    assert np.abs(rgb[..., 0].astype(float) - expected).max() <= 1  # a ramp, not a white image
    assert (rgb == 255).mean() < 0.05


def test_16_bit_png_predicts_like_its_8_bit_version(tmp_path):
    from qdetr.models import PreprocessingConfig, create_model
    from qdetr.zoo import predict

    grey8 = np.random.default_rng(0).integers(0, 256, (48, 64), dtype=np.uint8)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # exact 16-bit version
    Image.fromarray(grey8).convert("RGB").save(tmp_path / "flat.png")
    model = create_model("detr_tiny").eval()
    config = PreprocessingConfig(shortest_edge=32, longest_edge=64)
    deep, flat = predict(model, [tmp_path / "deep.png", tmp_path / "flat.png"], threshold=0.0, preprocessing=config)
    assert torch.equal(deep["boxes"], flat["boxes"]) and torch.equal(deep["scores"], flat["scores"])


# ------------------------------------------------------------------------------------------- COCO
def _coco(**edits):
    """A valid 2-image file, then ``edits`` applied: {"path.to.field": value or _DELETE}."""

    def setup(d):
        images = d / "images"
        images.mkdir()
        for name in ("a.jpg", "b.jpg"):
            Image.new("RGB", (32, 24)).save(images / name)
        data = {
            "images": [{"id": 1, "file_name": "a.jpg", "width": 32, "height": 24},
                       {"id": 2, "file_name": "b.jpg", "width": 32, "height": 24}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 8], "iscrowd": 0},
                            {"id": 11, "image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        }
        for path, value in edits.items():
            *parents, leaf = path.split(".")
            node = data
            for part in parents:
                node = node[int(part)] if part.isdigit() else node[part]
            if value is _DELETE:
                del node[leaf]
            else:
                node[int(leaf) if leaf.isdigit() else leaf] = value
        (d / "instances.json").write_text(json.dumps(data))

    return setup


_DELETE = object()


def _open_coco(d):
    from qdetr.data import CocoDetectionDataset

    return CocoDetectionDataset(d / "images", d / "instances.json")


COCO_CASES = [
    Case("annotation without bbox", _open_coco, DataError, "annotations[0] (id 10): bbox",
         _coco(**{"annotations.0.bbox": _DELETE})),
    Case("bbox with 3 numbers", _open_coco, DataError, "list of 4 numbers", _coco(**{"annotations.1.bbox": [1, 2, 3]})),
    Case("bbox as a string", _open_coco, DataError, "bbox must be", _coco(**{"annotations.0.bbox": "1,2,3,4"})),
    Case("NaN bbox", _open_coco, DataError, "NaN", _coco(**{"annotations.0.bbox": [math.nan, 0, 4, 4]})),
    Case("annotation without id", _open_coco, DataError, "annotations[1]: id must be an integer",
         _coco(**{"annotations.1.id": _DELETE})),
    Case("annotation without image_id", _open_coco, DataError, "image_id must be an integer",
         _coco(**{"annotations.0.image_id": _DELETE})),
    Case("annotation of an unknown image", _open_coco, DataError, "image_id 99 is not in images",
         _coco(**{"annotations.0.image_id": 99})),
    Case("annotation without category_id", _open_coco, DataError, "category_id must be an integer",
         _coco(**{"annotations.0.category_id": _DELETE})),
    Case("category id absent from categories", _open_coco, DataError, "category_id 7 is not in categories",
         _coco(**{"annotations.1.category_id": 7})),
    Case("no categories", _open_coco, DataError, "missing 'categories'", _coco(categories=_DELETE)),
    Case("category without name", _open_coco, DataError, "categories[0] (id 1): name",
         _coco(**{"categories.0.name": _DELETE})),
    Case("image without file_name", _open_coco, DataError, "images[1] (id 2): file_name",
         _coco(**{"images.1.file_name": _DELETE})),
    Case("image without id", _open_coco, DataError, "images[0]: id must be an integer",
         _coco(**{"images.0.id": _DELETE})),
    Case("file_name that climbs out of the image folder", _open_coco, DataError, "outside the image folder",
         _coco(**{"images.0.file_name": "../instances.json"})),
    Case("absolute file_name", _open_coco, DataError, "outside the image folder",
         _coco(**{"images.0.file_name": "/etc/passwd"})),
    Case("duplicate image id", _open_coco, DataError, "duplicate image id", _coco(**{"images.1.id": 1})),
    Case("annotation file that is not JSON", _open_coco, DataError, "not valid JSON",
         lambda d: ((d / "images").mkdir(), (d / "instances.json").write_text("{images: [}"))),
    Case("annotation file that is a list", _open_coco, DataError, "expected a JSON object",
         lambda d: ((d / "images").mkdir(), (d / "instances.json").write_text("[]"))),
]


@pytest.mark.parametrize("case", COCO_CASES, ids=ids(COCO_CASES))
def test_malformed_coco_file_names_file_and_record(case, tmp_path):
    error = check_case(case, tmp_path)
    assert "instances.json" in str(error)


def test_unreadable_image_in_a_coco_set_names_the_file(tmp_path):
    _coco()(tmp_path)
    (tmp_path / "images" / "b.jpg").write_bytes(b"not a jpeg")
    dataset = _open_coco(tmp_path)
    with pytest.raises(InputImageError, match="b.jpg"):
        dataset[1]


# -------------------------------------------------------------------------------------------- API
def _distill_with_nan_targets(_):
    from qdetr.distill import DistillationLoss

    b, q, d = 1, 4, 8
    outputs = {"co_attn_features": torch.randn(1, b, q, d), "pred_boxes": torch.rand(b, q, 4)}
    targets = [{"boxes": torch.tensor([[0.5, 0.5, float("nan"), 0.2]]), "labels": torch.tensor([1])}]
    return DistillationLoss()(outputs, outputs, targets)


API_CASES = [
    Case("quantize_model on a bare nn.Linear", lambda _: __import__("qdetr").quantize_model(nn.Linear(8, 4), bits=4),
         ConfigError, "nn.Sequential"),
    Case("quantize_model on a bare nn.Conv2d",
         lambda _: __import__("qdetr").quantize_model(nn.Conv2d(3, 4, 3), bits=4), ConfigError, "wrap it"),
    Case("quantize_model with bits=4.9", lambda _: __import__("qdetr").quantize_model(nn.Sequential(nn.Linear(8, 4)),
                                                                                       bits=4.9),
         ConfigError, "got 4.9"),
    Case("DistillationLoss with NaN target boxes", _distill_with_nan_targets, DataError, "NaN"),
]


@pytest.mark.parametrize("case", API_CASES, ids=ids(API_CASES))
def test_bad_api_argument_is_refused(case, tmp_path):
    check_case(case, tmp_path)


def test_wrapped_layer_quantizes():
    import qdetr

    layer = qdetr.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3)), bits=4)[0]
    assert type(layer).__name__ == "QuantConv2d"
