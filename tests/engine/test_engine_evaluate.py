"""COCO evaluation: parity with pycocotools and AP = 1 on the ground truth."""

import contextlib
import io
import json

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from qdetr.data import (
    CocoDetectionDataset,
    TransformConfig,
    collate_detection,
    make_eval_transforms,
    make_synthetic_coco,
)
from qdetr.engine.evaluate import COCO_STAT_NAMES, coco_evaluate_detections, evaluate_coco
from qdetr.models import create_model


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    ann = make_synthetic_coco(root, num_images=6, image_size=64, seed=11)
    return root / "images", ann


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def test_ground_truth_as_detections_gives_ap_one(val_set):
    coco = _quiet(COCO, str(val_set[1]))
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco.dataset["annotations"]
    ]
    stats, per_class, summary = coco_evaluate_detections(coco, detections, per_class=True)
    assert list(stats) == list(COCO_STAT_NAMES)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in per_class.values())
    assert "Average Precision" in summary


def test_no_detections_gives_zero_with_warning(val_set):
    coco = _quiet(COCO, str(val_set[1]))
    with pytest.warns(UserWarning, match="no detections"):
        stats, _, _ = coco_evaluate_detections(coco, [])
    assert stats["AP"] == 0.0


def test_evaluate_matches_pycocotools_on_written_detections(val_set, tmp_path):
    torch.manual_seed(0)
    model = create_model("detr_tiny", num_classes=5).eval()
    dataset = CocoDetectionDataset(*val_set, make_eval_transforms(TransformConfig(train_scales=(48,), eval_size=48, max_size=None)))
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_detection)
    det_path = tmp_path / "dets.json"
    result = evaluate_coco(model, loader, str(val_set[1]), per_class=True, detections_path=det_path)
    detections = json.loads(det_path.read_text())
    # threshold 0: every query of every image is a detection (10 queries, 6 images)
    assert result.num_detections == len(detections) == 6 * 10
    assert result.eval_batch_size == 2 and result.num_images == 6
    assert all(len(d["bbox"]) == 4 and d["bbox"][2] >= 0 for d in detections)
    # the same numbers straight from pycocotools
    coco = _quiet(COCO, str(val_set[1]))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes(str(det_path)), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    assert [result.stats[n] for n in COCO_STAT_NAMES] == pytest.approx(list(coco_eval.stats), abs=1e-12)
    assert set(result.per_class_ap) == {1, 2, 3, 4}
    assert result.to_dict()["stats"]["AP"] == result.ap
