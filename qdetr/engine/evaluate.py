"""COCO box evaluation: model -> post-processing -> COCO detections JSON -> pycocotools COCOeval.

Conventions (ecosystem.md section 1.6, method.md section 7):

* post-processing at score threshold 0 (thresholding before AP biases it): all queries for
  softmax (DETR) heads, top-k (k = 300 for SMCA) for sigmoid heads;
* detections are written in COCO format: ``{"image_id", "category_id", "bbox": [x, y, w, h]
  absolute pixels of the original image, "score"}``;
* all 12 COCOeval stats are returned with their names, plus the evaluation batch size;
* under ``torch.distributed`` each rank evaluates its shard, detections are gathered and rank 0
  runs COCOeval; every rank receives the result.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "COCO_STAT_NAMES",
    "CocoEvalResult",
    "detections_to_coco_json",
    "coco_evaluate_detections",
    "evaluate_coco",
]

logger = logging.getLogger(__name__)

#: Names of the 12 ``COCOeval.stats`` entries, in order (stats[0] is AP@[.5:.95]).
COCO_STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


@dataclass(frozen=True)
class CocoEvalResult:
    """Result of a COCO box evaluation.

    Attributes:
        stats: the 12 COCOeval stats by name (``AP`` ... ``AR_large``); -1 where COCO has no
            ground truth for an area range.
        per_class_ap: category id -> AP@[.5:.95] (only when asked for).
        num_images: number of evaluated images.
        num_detections: number of detections scored.
        eval_batch_size: batch size the detections were computed at (padding can change them).
        summary: COCOeval's printed summary.

    Examples:
        >>> from qdetr.engine import COCO_STAT_NAMES, CocoEvalResult
        >>> result = CocoEvalResult(stats={name: 0.5 for name in COCO_STAT_NAMES}, per_class_ap={1: 0.25}, num_images=4)
        >>> result.ap, result.ap50
        (0.5, 0.5)
        >>> result.to_dict()["per_class_ap"]
        {'1': 0.25}
    """

    stats: dict[str, float]
    per_class_ap: dict[int, float] | None = None
    num_images: int = 0
    num_detections: int = 0
    eval_batch_size: int | None = None
    summary: str = ""

    @property
    def ap(self) -> float:
        """AP@[.5:.95] (COCO's main number)."""
        return self.stats["AP"]

    @property
    def ap50(self) -> float:
        """AP at IoU 0.5."""
        return self.stats["AP50"]

    def to_dict(self) -> dict:
        """JSON-serialisable dict (per-class keys become strings)."""
        out = asdict(self)
        if self.per_class_ap is not None:
            out["per_class_ap"] = {str(k): v for k, v in self.per_class_ap.items()}
        return out


def detections_to_coco_json(results: list[dict], image_ids: Iterable[int]) -> list[dict]:
    """Converts post-processed results into COCO detection records.

    Args:
        results: one dict per image with ``scores`` (N,), ``labels`` (N,) raw category ids and
            ``boxes`` (N, 4) absolute xyxy in the original image.
        image_ids: COCO image id of each result.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``: one record per
        detection, ``bbox`` in COCO xywh absolute pixels.

    Examples:
        >>> import torch
        >>> from qdetr.engine import detections_to_coco_json
        >>> result = {
        ...     "scores": torch.tensor([0.75]),
        ...     "labels": torch.tensor([3]),
        ...     "boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0]]),  # absolute xyxy
        ... }
        >>> detections_to_coco_json([result], image_ids=[7])
        [{'image_id': 7, 'category_id': 3, 'bbox': [10.0, 20.0, 40.0, 60.0], 'score': 0.75}]
    """
    records: list[dict] = []
    for result, image_id in zip(results, image_ids):
        boxes_xyxy = result["boxes"].detach().double().cpu()
        boxes_xywh = torch.cat([boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]], dim=1)
        scores = result["scores"].detach().double().cpu().tolist()
        labels = result["labels"].detach().cpu().tolist()
        for box, score, label in zip(boxes_xywh.tolist(), scores, labels):
            records.append(
                {"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": float(score)}
            )
    return records


def _quiet_coco(ann: str | Path | dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(ann, dict):
            coco = COCO()
            coco.dataset = ann
            coco.createIndex()
            return coco
        return COCO(str(ann))


def coco_evaluate_detections(
    coco_gt: COCO,
    detections: list[dict],
    *,
    image_ids: Iterable[int] | None = None,
    per_class: bool = False,
) -> tuple[dict[str, float], dict[int, float] | None, str]:
    """Runs pycocotools ``COCOeval`` (bbox) on COCO-format detections.

    Args:
        coco_gt: ground truth.
        detections: COCO detection records (xywh boxes).
        image_ids: restrict evaluation to these images (default: every image of ``coco_gt``).
        per_class: also return AP@[.5:.95] per category.

    Returns:
        ``(stats by name, per-class AP or None, printed summary)``. With no detections
        every stat is 0.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.data import CocoDetectionDataset, make_synthetic_coco
        >>> from qdetr.engine import coco_evaluate_detections
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     ann_file = make_synthetic_coco(tmp, num_images=2, image_size=64)
        ...     coco_gt = CocoDetectionDataset(Path(tmp) / "images", ann_file).coco
        >>> perfect = [
        ...     {"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 1.0}
        ...     for ann in coco_gt.dataset["annotations"]
        ... ]
        >>> stats, per_class_ap, summary = coco_evaluate_detections(coco_gt, perfect, per_class=True)
        >>> round(stats["AP"], 3), round(stats["AP50"], 3), sorted(per_class_ap) == coco_gt.getCatIds()
        (1.0, 1.0, True)
        >>> summary.splitlines()[0].startswith(" Average Precision")
        True
    """
    img_ids = sorted(int(i) for i in (image_ids if image_ids is not None else coco_gt.getImgIds()))
    if not detections:
        warnings.warn("no detections to evaluate; every COCO stat is 0", stacklevel=2)
        stats = {name: 0.0 for name in COCO_STAT_NAMES}
        per_class_ap = {int(c): 0.0 for c in coco_gt.getCatIds()} if per_class else None
        return stats, per_class_ap, ""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_dt = coco_gt.loadRes(detections)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = img_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = {name: float(value) for name, value in zip(COCO_STAT_NAMES, coco_eval.stats)}
    per_class_ap = None
    if per_class:
        # precision: (T iou thresholds, R recall points, K categories, A areas, M max dets)
        precision = coco_eval.eval["precision"]
        per_class_ap = {}
        for k, cat_id in enumerate(coco_eval.params.catIds):
            values = precision[:, :, k, 0, -1]
            values = values[values > -1]
            per_class_ap[int(cat_id)] = float(np.mean(values)) if values.size else -1.0
    summary = "\n".join(line for line in buffer.getvalue().splitlines() if line.startswith(" Average"))
    return stats, per_class_ap, summary


def _default_postprocess() -> Callable:
    from qdetr.models import post_process_object_detection

    return post_process_object_detection


def _call_postprocess(postprocess: Callable, outputs, target_sizes: torch.Tensor, top_k: int | None):
    kwargs = {"threshold": 0.0, "target_sizes": target_sizes}
    if top_k is not None and "top_k" in inspect.signature(postprocess).parameters:
        kwargs["top_k"] = top_k
    return postprocess(outputs, **kwargs)


def _gather(obj):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


@torch.no_grad()
def evaluate_coco(
    model: torch.nn.Module,
    loader: Iterable,
    coco_gt: COCO | str | Path | dict,
    *,
    device: torch.device | str = "cpu",
    postprocess: Callable | None = None,
    top_k: int | None = 300,
    per_class: bool = False,
    detections_path: str | Path | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> CocoEvalResult:
    """Evaluates a detector on a COCO-format loader with pycocotools.

    Args:
        model: maps ``(pixel_values (B, 3, H, W), pixel_mask (B, H, W))`` to DETR outputs
            (``pred_logits`` (B, Q, C[+1]), ``pred_boxes`` (B, Q, 4) normalised cxcywh).
        loader: yields :class:`qdetr.data.DetectionBatch` with ``orig_size`` and ``image_id``
            in every target.
        coco_gt: ground truth: a ``COCO`` object, an annotation file, or a COCO dict.
        device: where to run the model.
        postprocess: ``post_process_object_detection(outputs, threshold, target_sizes[, top_k])``;
            default :func:`qdetr.models.post_process_object_detection` (dispatches on the head).
        top_k: (query, class) pairs kept for sigmoid heads (SMCA: 300, capped at Q x C); softmax
            heads keep every query. Passed only when the post-processor accepts it.
        per_class: also compute AP per category.
        detections_path: write the gathered COCO detections JSON here (rank 0 only).
        dtype: run the model in this dtype (default: the model's own).
        progress: show a tqdm bar on rank 0.

    Returns:
        The 12 stats by name, optional per-class AP, counts and the evaluation batch size.
        Under ``torch.distributed`` every rank returns the same result.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from torch.utils.data import DataLoader
        >>> import qdetr
        >>> from qdetr.data import (
        ...     CocoDetectionDataset, TransformConfig, collate_detection, make_eval_transforms, make_synthetic_coco
        ... )
        >>> from qdetr.engine import evaluate_coco
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     ann_file = make_synthetic_coco(tmp, num_images=2, image_size=64)
        ...     transforms = make_eval_transforms(TransformConfig.small(64))
        ...     dataset = CocoDetectionDataset(Path(tmp) / "images", ann_file, transforms)
        ...     loader = DataLoader(dataset, batch_size=2, collate_fn=collate_detection)
        ...     model = qdetr.create_model("detr_tiny", num_classes=dataset.num_classes)
        ...     result = evaluate_coco(model, loader, dataset.coco)
        >>> result.num_images, result.eval_batch_size, len(result.stats)
        (2, 2, 12)
        >>> 0.0 <= result.ap <= 1.0
        True
    """
    coco_gt = coco_gt if isinstance(coco_gt, COCO) else _quiet_coco(coco_gt)
    postprocess = postprocess if postprocess is not None else _default_postprocess()
    was_training = model.training
    model.eval()
    records: list[dict] = []
    image_ids: list[int] = []
    batch_size = None
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    iterator = loader
    if progress and rank == 0:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="eval", leave=False)
    for batch in iterator:
        batch = batch.to(device, dtype)
        batch_size = max(batch_size or 0, len(batch))
        outputs = model(batch.pixel_values, batch.pixel_mask)
        target_sizes = torch.stack([t["orig_size"] for t in batch.targets]).to(device)
        results = _call_postprocess(postprocess, outputs, target_sizes, top_k)
        ids = [int(t["image_id"]) for t in batch.targets]
        records.extend(detections_to_coco_json(results, ids))
        image_ids.extend(ids)
    model.train(was_training)
    all_records = [r for part in _gather(records) for r in part]
    all_ids = sorted({i for part in _gather(image_ids) for i in part})
    all_batch_sizes = [b for b in _gather(batch_size) if b is not None]
    eval_batch_size = max(all_batch_sizes) if all_batch_sizes else None
    payload = [None]
    if rank == 0:
        stats, per_class_ap, summary = coco_evaluate_detections(
            coco_gt, all_records, image_ids=all_ids, per_class=per_class
        )
        if detections_path is not None:
            from qdetr.atomic_write import atomic_path

            with atomic_path(detections_path) as tmp:
                tmp.write_text(json.dumps(all_records))
        payload = [
            CocoEvalResult(
                stats=stats,
                per_class_ap=per_class_ap,
                num_images=len(all_ids),
                num_detections=len(all_records),
                eval_batch_size=eval_batch_size,
                summary=summary,
            )
        ]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    logger.info("COCO eval: AP %.4f AP50 %.4f on %d images", payload[0].ap, payload[0].ap50, payload[0].num_images)
    return payload[0]
