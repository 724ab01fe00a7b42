"""Turn detector outputs into per-image detections (Hugging Face ``post_process_object_detection``).

Two scoring rules (ecosystem.md 1.2), chosen by the head that produced the logits:

* ``"softmax"`` (DETR): softmax over C+1 columns, drop the no-object column, take the
  per-query max; keep ``score > threshold``;
* ``"sigmoid"`` (SMCA and other focal heads): sigmoid over the C real classes (the no-object
  column is dropped *before* the top-k), top-k over the flattened (query, class) pairs
  (k = ``top_k``, default Q), keep ``score > threshold``; label = index mod C.

Results are sorted by descending score. Boxes are xyxy, absolute in pixels when
``target_sizes`` (per-image (H, W) of the original image) is given, else normalised.
For COCO AP use ``threshold=0``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from qdetr.ops.boxes import box_cxcywh_to_xyxy, scale_boxes_xyxy

__all__ = ["post_process_object_detection"]


def _as_sizes(target_sizes, batch: int, device: torch.device) -> torch.Tensor:
    sizes = torch.as_tensor(target_sizes, device=device)
    if sizes.shape != (batch, 2):
        raise ValueError(
            f"target_sizes must give (height, width) for each of the {batch} images, shape ({batch}, 2); "
            f"got shape {tuple(sizes.shape)}"
        )
    return sizes


def post_process_object_detection(
    outputs: Mapping[str, torch.Tensor],
    threshold: float = 0.5,
    target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    top_k: int | None = None,
    *,
    classification: str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Scores, labels and xyxy boxes per image.

    Args:
        outputs: model outputs with ``pred_logits`` (B, Q, C+1) and ``pred_boxes`` (B, Q, 4)
            normalised cxcywh.
        threshold: keep detections with score strictly above it (0 for COCO AP).
        target_sizes: (B, 2) tensor or list of (height, width) of the original images; None
            keeps boxes normalised.
        top_k: sigmoid heads only: (query, class) pairs kept before thresholding; default Q.
        classification: ``"softmax"`` or ``"sigmoid"``; default: the ``classification``
            attribute of ``outputs`` (set by qdetr models).

    Returns:
        list of B dicts with ``scores`` (N,), ``labels`` (N,) int64 class ids and ``boxes``
        (N, 4) xyxy, sorted by descending score.

    Raises:
        ValueError: when the head type is unknown or ``target_sizes`` has the wrong shape.

    Examples:
        >>> import torch
        >>> from qdetr.models import post_process_object_detection
        >>> outputs = {  # 1 image, 2 queries, 2 classes + no-object
        ...     "pred_logits": torch.tensor([[[4.0, 0.0, 0.0], [0.0, 0.0, 4.0]]]),
        ...     "pred_boxes": torch.tensor([[[0.5, 0.5, 0.25, 0.5], [0.1, 0.1, 0.1, 0.1]]]),
        ... }
        >>> [result] = post_process_object_detection(
        ...     outputs, threshold=0.5, target_sizes=[(100, 200)], classification="softmax"
        ... )
        >>> result["labels"].tolist(), result["boxes"].tolist()  # absolute xyxy pixels
        ([0], [[75.0, 25.0, 125.0, 75.0]])
    """
    head = classification if classification is not None else getattr(outputs, "classification", None)
    if head not in ("softmax", "sigmoid"):
        raise ValueError(
            "cannot tell the classification head of these outputs; pass classification='softmax' (DETR) "
            "or classification='sigmoid' (SMCA / focal heads)"
        )
    logits = outputs["pred_logits"]
    boxes_xyxy = box_cxcywh_to_xyxy(outputs["pred_boxes"])  # (B, Q, 4)
    bs, nq, _ = logits.shape
    if target_sizes is not None:
        boxes_xyxy = scale_boxes_xyxy(boxes_xyxy, _as_sizes(target_sizes, bs, logits.device))

    results = []
    if head == "softmax":
        prob = logits.softmax(-1)[..., :-1]  # (B, Q, C)
        scores, labels = prob.max(-1)
        for s, lab, box in zip(scores, labels, boxes_xyxy):
            order = s.argsort(descending=True)
            keep = order[s[order] > threshold]
            results.append({"scores": s[keep], "labels": lab[keep], "boxes": box[keep]})
        return results

    prob = logits[..., :-1].sigmoid()  # (B, Q, C): no-object column dropped before top-k
    num_classes = prob.shape[-1]
    k = nq if top_k is None else int(top_k)
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k = min(k, nq * num_classes)
    scores, flat_idx = prob.flatten(1).topk(k, dim=1)  # (B, k), sorted descending
    query_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
    labels = flat_idx % num_classes
    for s, lab, q, box in zip(scores, labels, query_idx, boxes_xyxy):
        keep = s > threshold
        results.append({"scores": s[keep], "labels": lab[keep], "boxes": box[q[keep]]})
    return results
