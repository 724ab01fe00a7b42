"""DETR-family detectors: DETR, single-scale SMCA-DETR and the quantized Q-DETR models.

Models take ``forward(pixel_values (B, 3, H, W), pixel_mask (B, H, W) = None)`` (mask 1 =
real pixel) and return a :class:`DetectionOutput` dict with ``pred_logits`` (B, Q, C+1),
``pred_boxes`` (B, Q, 4) normalised cxcywh, ``aux_outputs``, ``decoder_hidden_states``
(L, B, Q, d) and ``co_attn_features`` (L, B, Q, d); see :mod:`qdetr.models.outputs`.
"""

from qdetr.models.backbone import Backbone, ResNetBody, load_backbone_weights
from qdetr.ops.boxes import (
    box_cxcywh_to_xyxy,
    box_iou_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou_xyxy,
)
from qdetr.models.config import DetrConfig, SmcaConfig, config_from_dict
from qdetr.models.criterion import SetCriterion, build_criterion, build_matcher
from qdetr.models.detr import Detr
from qdetr.models.export import DetectorForExport
from qdetr.models.matcher import HungarianMatcher
from qdetr.models.outputs import OUTPUT_KEYS, DetectionOutput
from qdetr.models.postprocess import post_process_object_detection
from qdetr.models.preprocessing import PreprocessingConfig, pad_and_mask, preprocess_images
from qdetr.models.quantized import build_qdetr_smca
from qdetr.models.registry import build_model, create_model, list_models, model_config, register_model
from qdetr.models.smca import SmcaDetr

__all__ = [
    # registry
    "create_model",
    "list_models",
    "register_model",
    "build_model",
    "model_config",
    # configs
    "DetrConfig",
    "SmcaConfig",
    "config_from_dict",
    # models and parts
    "Detr",
    "SmcaDetr",
    "Backbone",
    "ResNetBody",
    "load_backbone_weights",
    "DetectionOutput",
    "OUTPUT_KEYS",
    "DetectorForExport",
    # quantized models
    "build_qdetr_smca",
    # training
    "HungarianMatcher",
    "SetCriterion",
    "build_criterion",
    "build_matcher",
    # pre/post-processing
    "PreprocessingConfig",
    "preprocess_images",
    "pad_and_mask",
    "post_process_object_detection",
    # box ops
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou_xyxy",
    "generalized_box_iou_xyxy",
]

#: Names that moved to :mod:`qdetr.zoo` (the zoo owns every file format); importable from
#: here for one more release with a ``DeprecationWarning``.
_MOVED_TO_ZOO = {
    "convert_release_state_dict": "qdetr.zoo.release_format",
    "load_release_state_dict": "qdetr.zoo.release_format",
    "ReleaseConversionReport": "qdetr.zoo.release_format",
    "ReleaseFormatError": "qdetr.zoo.release_format",
}


def __getattr__(name: str):
    """Deprecated aliases of names that moved out of :mod:`qdetr.models` (see ``_MOVED_TO_ZOO``)."""
    if name in _MOVED_TO_ZOO:
        import importlib
        import warnings

        module = _MOVED_TO_ZOO[name]
        warnings.warn(
            f"qdetr.models.{name} moved to {module}; import it from there (the alias goes in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'qdetr.models' has no attribute {name!r}")
