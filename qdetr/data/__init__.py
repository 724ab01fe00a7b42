"""Datasets, transforms and batching for DETR training and evaluation."""

from qdetr.data.coco import AnnotationReport, CocoDetectionDataset, boxes_xyxy_to_cxcywh_normalized
from qdetr.data.collate import DetectionBatch, collate_detection
from qdetr.data.sampler import ResumableDistributedSampler
from qdetr.data.synthetic import (
    SHAPE_CATEGORIES,
    SyntheticShapesConfig,
    make_synthetic_coco,
    render_synthetic_sample,
    synthetic_coco_dict,
)
from qdetr.data.transforms import TransformConfig, make_eval_transforms, make_train_transforms

__all__ = [
    # datasets
    "CocoDetectionDataset",
    "AnnotationReport",
    "SHAPE_CATEGORIES",
    "SyntheticShapesConfig",
    "make_synthetic_coco",
    "render_synthetic_sample",
    "synthetic_coco_dict",
    # transforms
    "TransformConfig",
    "make_train_transforms",
    "make_eval_transforms",
    "boxes_xyxy_to_cxcywh_normalized",
    # batching
    "DetectionBatch",
    "collate_detection",
    "ResumableDistributedSampler",
]
