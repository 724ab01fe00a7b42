"""The synthetic shapes set is deterministic, valid COCO, and configurable."""

import hashlib
import json

import pytest

from qdetr.data.synthetic import SyntheticShapesConfig, make_synthetic_coco, render_synthetic_sample


def _digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
    make_synthetic_coco(tmp_path / "a", num_images=6, image_size=64, seed=3)
    make_synthetic_coco(tmp_path / "b", num_images=6, image_size=64, seed=3)
    make_synthetic_coco(tmp_path / "c", num_images=6, image_size=64, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_image_does_not_depend_on_dataset_size():
    config = SyntheticShapesConfig(image_size=64)
    a = render_synthetic_sample(5, config, seed=1)
    b = render_synthetic_sample(5, config, seed=1)
    assert a.image.tobytes() == b.image.tobytes() and a.boxes_xywh == b.boxes_xywh


def test_annotations_are_valid_coco(tmp_path):
    config = SyntheticShapesConfig(image_size=96, min_objects=0, max_objects=4, num_classes_used=3)
    ann_file = make_synthetic_coco(tmp_path, 20, seed=0, config=config)
    coco = json.loads(ann_file.read_text())
    assert {c["id"] for c in coco["categories"]} == {1, 2, 3}
    assert len(coco["images"]) == 20
    ids = {im["id"] for im in coco["images"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert ann["image_id"] in ids and ann["category_id"] in (1, 2, 3)
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
        assert ann["area"] == pytest.approx(w * h)
    for im in coco["images"]:
        assert (tmp_path / "images" / im["file_name"]).is_file()
    # objects per image respect the configured range
    per_image = [sum(a["image_id"] == i for a in coco["annotations"]) for i in ids]
    assert max(per_image) <= 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": 8}, "image_size"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"min_size_frac": 0.8, "max_size_frac": 0.5}, "min_size_frac"),
        ({"num_classes_used": 7}, "num_classes_used"),
        ({"image_format": "gif"}, "image_format"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticShapesConfig(**kwargs)
