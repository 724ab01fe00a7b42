"""Training, evaluation and checkpointing (no argparse: configs are dataclasses)."""

from qdetr.engine.checkpoint import load_checkpoint, save_checkpoint_atomic
from qdetr.engine.config import (
    DataConfig,
    DistillConfig,
    ModelConfig,
    OptimConfig,
    QuantTrainConfig,
    TrainConfig,
    load_config_file,
)
from qdetr.engine.evaluate import (
    COCO_STAT_NAMES,
    CocoEvalResult,
    coco_evaluate_detections,
    detections_to_coco_json,
    evaluate_coco,
)
from qdetr.engine.model_files import load_model_file, save_model_file
from qdetr.engine.trainer import Trainer, TrainResult, build_datasets, train

__all__ = [
    # configuration
    "TrainConfig",
    "DataConfig",
    "ModelConfig",
    "QuantTrainConfig",
    "DistillConfig",
    "OptimConfig",
    "load_config_file",
    # training
    "Trainer",
    "TrainResult",
    "train",
    "build_datasets",
    # evaluation
    "evaluate_coco",
    "coco_evaluate_detections",
    "detections_to_coco_json",
    "CocoEvalResult",
    "COCO_STAT_NAMES",
    # files
    "save_checkpoint_atomic",
    "load_checkpoint",
    "save_model_file",
    "load_model_file",
]
