"""The pipeline on real COCO images (../shared/data/coco-mini): load, train a step, evaluate, predict."""

import json

import pytest

from qdetr.data import CocoDetectionDataset, TransformConfig, make_train_transforms
from qdetr.engine import Trainer
from qdetr.engine.predict import load_model_for_inference, predict_images

from .conftest import COCO_MINI, TINY_MODEL

pytestmark = pytest.mark.skipif(not COCO_MINI.is_dir(), reason="../shared/data/coco-mini is not present")


def test_coco_mini_load_train_evaluate_predict(tmp_path):
    ann = COCO_MINI / "annotations"
    small = {"train_scales": [96, 128], "max_size": 213, "eval_size": 128,
             "crop_resize_scales": [128], "crop_size": [96, 128]}
    dataset = CocoDetectionDataset(COCO_MINI / "train2017", ann / "instances_train2017.json",
                                   make_train_transforms(TransformConfig(**small)))
    assert len(dataset) == 288 and dataset.num_classes == 91
    image, target = dataset[(0, 0)]
    assert min(image.shape[-2:]) in (96, 128) or max(image.shape[-2:]) <= 213
    assert (target["labels"] >= 1).all() and (target["labels"] <= 90).all()

    config = {
        "output_dir": str(tmp_path / "run"), "device": "cpu", "progress": False, "max_steps": 1, "log_every": 1,
        "data": {"dataset": "coco", "train_images": str(COCO_MINI / "train2017"),
                 "train_ann": str(ann / "instances_train2017.json"),
                 "val_images": str(COCO_MINI / "val2017"), "val_ann": str(ann / "instances_val2017.json"),
                 "transforms": small, "batch_size": 2, "max_val_images": 6},
        "model": TINY_MODEL,
    }
    from qdetr.engine.config import TrainConfig

    result = Trainer(TrainConfig.from_dict(config)).fit()
    assert result.global_step == 1 and result.eval.num_images == 6
    assert result.eval.num_detections == 6 * 10 and 0.0 <= result.eval.ap <= 1.0
    loaded = load_model_for_inference(result.model_path)
    assert loaded.categories[1] == "person" and loaded.preprocessing.shortest_edge == 128
    images = sorted((COCO_MINI / "val2017").glob("*.jpg"))[:2]
    records = predict_images(loaded, images, tmp_path / "pred", threshold=0.0)
    assert all((tmp_path / "pred" / f"{p.stem}.pred.png").is_file() for p in images)
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text()) == records
