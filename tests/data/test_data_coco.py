"""COCO-format dataset: DETR targets, transforms and bad input."""

import json

import pytest
import torch
from PIL import Image

from qdetr.data import (
    CocoDetectionDataset,
    ResumableDistributedSampler,
    TransformConfig,
    collate_detection,
    make_eval_transforms,
    make_train_transforms,
)


def _write_coco(root, images, annotations, categories=({"id": 1, "name": "a"}, {"id": 7, "name": "b"})):
    (root / "img").mkdir(parents=True, exist_ok=True)
    infos = []
    for image_id, (name, mode, size) in enumerate(images, start=1):
        if mode is not None:
            Image.new(mode, size, color=(90,) * len(mode) if len(mode) > 1 else 90).save(root / "img" / name)
        infos.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
    anns = [dict(a, id=i, area=a["bbox"][2] * a["bbox"][3], iscrowd=a.get("iscrowd", 0)) for i, a in enumerate(annotations, 1)]
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": infos, "annotations": anns, "categories": list(categories)}))
    return root / "img", ann_file


def test_targets_are_detr_format(tmp_path):
    img_dir, ann = _write_coco(
        tmp_path, [("a.png", "RGB", (80, 40))], [{"image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10]}]
    )
    config = TransformConfig(train_scales=(20,), eval_size=20, max_size=None)
    ds = CocoDetectionDataset(img_dir, ann, make_eval_transforms(config))
    image, target = ds[0]
    assert image.shape == (3, 20, 40)  # short side 40 -> 20
    assert target["labels"].tolist() == [7]  # raw category id
    expected_cxcywh = torch.tensor([[20 / 80, 10 / 40, 20 / 80, 10 / 40]])
    torch.testing.assert_close(target["boxes"], expected_cxcywh)
    assert target["orig_size"].tolist() == [40, 80] and target["size"].tolist() == [20, 40]
    assert int(target["image_id"]) == 1
    assert ds.num_classes == 8 and ds.category_names == {1: "a", 7: "b"}


def test_missing_image_error_names_file_and_skip_option(tmp_path):
    img_dir, ann = _write_coco(
        tmp_path, [("here.png", "RGB", (32, 32)), ("gone.png", None, (32, 32))], []
    )
    with pytest.raises(FileNotFoundError, match=r"gone\.png.*missing_images='skip'"):
        CocoDetectionDataset(img_dir, ann)
    with pytest.warns(UserWarning, match="skipped"):
        ds = CocoDetectionDataset(img_dir, ann, missing_images="skip")
    assert len(ds) == 1 and ds.report.num_missing_images == 1


def test_missing_annotation_file_or_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file"):
        CocoDetectionDataset(tmp_path, tmp_path / "nope.json")
    img_dir, ann = _write_coco(tmp_path, [("a.png", "RGB", (8, 8))], [])
    with pytest.raises(FileNotFoundError, match="image folder"):
        CocoDetectionDataset(tmp_path / "nodir", ann)


def test_negatives_degenerate_outside_crowd_and_colour_modes(tmp_path):
    img_dir, ann = _write_coco(
        tmp_path,
        [("gray.png", "L", (50, 50)), ("cmyk.jpg", "CMYK", (50, 50)), ("empty.png", "RGB", (50, 50))],
        [
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5]},  # degenerate: dropped
            {"image_id": 1, "category_id": 1, "bbox": [40, 40, 30, 30]},  # outside: clipped
            {"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1},  # crowd: ignored
            {"image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 10]},
        ],
    )
    with pytest.warns(UserWarning, match="1 degenerate boxes .* 1 boxes reaching outside"):
        ds = CocoDetectionDataset(img_dir, ann, None)
    assert ds.report.num_images_without_annotations == 1 and ds.report.num_crowd_boxes == 1
    gray, t_gray = ds[0]
    assert gray.shape == (3, 50, 50)
    torch.testing.assert_close(t_gray["boxes"], torch.tensor([[45 / 50, 45 / 50, 10 / 50, 10 / 50]]))
    cmyk, t_cmyk = ds[1]
    assert cmyk.shape == (3, 50, 50) and t_cmyk["labels"].tolist() == [7]
    empty, t_empty = ds[2]
    assert t_empty["boxes"].shape == (0, 4) and t_empty["labels"].shape == (0,)


def test_train_transform_is_seeded_per_sample_and_boxes_stay_valid(tmp_path):
    img_dir, ann = _write_coco(
        tmp_path,
        [("a.png", "RGB", (120, 90))],
        [{"image_id": 1, "category_id": 1, "bbox": [5, 5, 60, 40]}, {"image_id": 1, "category_id": 7, "bbox": [70, 50, 40, 30]}],
    )
    config = TransformConfig(train_scales=(48, 64, 80), max_size=160, eval_size=64, crop_resize_scales=(64,), crop_size=(30, 60))
    ds = CocoDetectionDataset(img_dir, ann, make_train_transforms(config))
    state = torch.get_rng_state()
    a_img, a_t = ds[(0, 123)]
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    b_img, b_t = ds[(0, 123)]
    assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"])
    sizes = set()
    for seed in range(12):
        image, target = ds[(0, seed)]
        sizes.add(tuple(image.shape[-2:]))
        assert (target["boxes"] >= 0).all() and (target["boxes"] <= 1).all()
        assert (target["boxes"][:, 2:] > 0).all()
        assert len(target["boxes"]) == len(target["labels"])
    assert len(sizes) > 1  # multi-scale / crop really varies the size


def test_transform_config_validation():
    with pytest.raises(ValueError, match="max_size"):
        TransformConfig(train_scales=(800,), max_size=600)
    small = TransformConfig.small(128)
    assert small.eval_size == 128 and max(small.train_scales) < small.max_size


def test_collate_pads_and_masks():
    a = (torch.ones(3, 4, 6), {"boxes": torch.zeros(0, 4)})
    b = (torch.full((3, 5, 3), 2.0), {"boxes": torch.zeros(1, 4)})
    batch = collate_detection([a, b])
    assert batch.pixel_values.shape == (2, 3, 5, 6) and batch.pixel_mask.shape == (2, 5, 6)
    assert batch.pixel_mask[0, :4, :6].all() and not batch.pixel_mask[0, 4:].any()
    assert batch.pixel_mask[1, :5, :3].all() and not batch.pixel_mask[1, :, 3:].any()
    assert (batch.pixel_values[0, :, 4:] == 0).all() and (batch.pixel_values[1, :, :, 3:] == 0).all()
    assert batch.pixel_mask.sum().item() == 4 * 6 + 5 * 3
    padded = collate_detection([a, b], size_divisor=4)
    assert padded.pixel_values.shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="empty"):
        collate_detection([])


def test_sampler_resume_and_eval_sharding():
    full = ResumableDistributedSampler(10, seed=3)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableDistributedSampler(10, seed=3)
    resumed.set_epoch(2, start=4)
    assert list(resumed) == order[4:] and len(resumed) == 6
    other_epoch = ResumableDistributedSampler(10, seed=3)
    other_epoch.set_epoch(3)
    assert [i for i, _ in other_epoch] != [i for i, _ in order]
    shards = [list(ResumableDistributedSampler(7, num_replicas=2, rank=r, shuffle=False, pad=False)) for r in range(2)]
    assert sorted(i for s in shards for i, _ in s) == list(range(7))  # no duplicates for evaluation
    padded = [list(ResumableDistributedSampler(7, num_replicas=2, rank=r)) for r in range(2)]
    assert len(padded[0]) == len(padded[1]) == 4
    with pytest.raises(ValueError, match="rank"):
        ResumableDistributedSampler(4, num_replicas=2, rank=2)
