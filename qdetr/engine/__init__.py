"""Training, evaluation and checkpointing (no argparse: configs are dataclasses)."""

from qdetr.engine.checkpoint import load_checkpoint, save_checkpoint_atomic
from qdetr.engine.config import (
    CONFIG_VERSION,
    DataConfig,
    ModelConfig,
    OptimConfig,
    QATConfig,
    QDetrMethodConfig,
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
from qdetr.engine.trainer import Trainer, TrainResult, build_datasets, train

__all__ = [
    # configuration
    "TrainConfig",
    "DataConfig",
    "ModelConfig",
    "QATConfig",
    "QDetrMethodConfig",
    "CONFIG_VERSION",
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
]


def __getattr__(name: str):
    """Deprecated aliases: ``load_model_file`` / ``save_model_file`` (use :func:`qdetr.zoo.resolve_model`),
    ``QuantTrainConfig`` (:class:`QATConfig`) and ``DistillConfig`` (:class:`QDetrMethodConfig`)."""
    if name in ("load_model_file", "save_model_file"):
        from qdetr.engine import model_files

        return getattr(model_files, name)
    if name in ("QuantTrainConfig", "DistillConfig"):
        from qdetr.engine import config

        return getattr(config, name)
    raise AttributeError(f"module 'qdetr.engine' has no attribute {name!r}")
