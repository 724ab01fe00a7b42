"""Q-DETR distillation: distribution alignment, foreground-aware query matching and the DRD loss.

See ``docs/distillation.md`` for a training-step example (qdetr DETR/SMCA and the Hugging Face DETR family).
"""

from qdetr.distill.adapters import (
    FEATURE_KEYS,
    CoAttentionCapture,
    capture_co_attention,
    find_decoder_cross_attention,
    get_co_attn_features,
    get_pred_boxes,
)
from qdetr.distill.alignment import (
    ALIGNMENT_BY_PROFILE,
    DistributionAlignment,
    alignment_slots,
    insert_distribution_alignment,
    restore_alignment_slots,
)
from qdetr.distill.config import DistillationConfig
from qdetr.distill.fqm import (
    match_teacher_queries,
    select_foreground_queries,
    stack_target_boxes,
    teacher_matching_score,
)
from qdetr.distill.loss import DistillationLoss, fake_quantize_teacher_4bit
from qdetr.distill.teacher import FrozenTeacher

__all__ = [
    # loss and its settings
    "DistillationLoss",
    "DistillationConfig",
    # distribution alignment (inner level)
    "DistributionAlignment",
    "insert_distribution_alignment",
    "ALIGNMENT_BY_PROFILE",
    "alignment_slots",
    "restore_alignment_slots",
    # foreground-aware query matching (upper level)
    "stack_target_boxes",
    "select_foreground_queries",
    "teacher_matching_score",
    "match_teacher_queries",
    # teacher and adapters
    "FrozenTeacher",
    "FEATURE_KEYS",
    "CoAttentionCapture",
    "capture_co_attention",
    "find_decoder_cross_attention",
    "get_co_attn_features",
    "get_pred_boxes",
    # released-code extra (not in the paper)
    "fake_quantize_teacher_4bit",
]
