"""Shared tiny settings for the engine tests (64 px synthetic images, test-sized DETR)."""

from pathlib import Path

import pytest

from qdetr.engine.config import TrainConfig

COCO_MINI = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "coco-mini"

TINY_MODEL = {"name": "detr_tiny", "overrides": {"hidden_dim": 32, "dim_feedforward": 64, "dropout": 0.1}}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Folder for the tiny synthetic set (written once by the first run that needs it)."""
    return tmp_path_factory.mktemp("synthetic")


def tiny_config(output_dir, synthetic_root, **changes) -> TrainConfig:
    """A run that takes seconds: 8 train / 4 val images of 64 px, detr_tiny, batch 2."""
    base = {
        "output_dir": str(output_dir),
        "epochs": 1,
        "device": "cpu",
        "progress": False,
        "eval_every": 0,
        "log_every": 1,
        "data": {
            "synthetic_root": str(synthetic_root),
            "synthetic_train_images": 8,
            "synthetic_val_images": 4,
            "synthetic": {"image_size": 64, "max_objects": 2, "min_size_frac": 0.3},
            "transforms": {"train_scales": [56, 64], "max_size": 100, "eval_size": 64,
                           "crop_resize_scales": [64], "crop_size": [40, 64]},
            "batch_size": 2,
        },
        "model": TINY_MODEL,
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return TrainConfig.from_dict(base)
