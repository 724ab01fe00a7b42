"""``model.predict(images)``: images in, absolute xyxy detections out.

Wraps the DETR preprocessing (:func:`qdetr.models.preprocess_images`: resize to
800/1333, ImageNet normalisation, padding mask) and
:func:`qdetr.models.post_process_object_detection` (softmax or sigmoid head, boxes scaled
back to each image's original size).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["predict", "load_image", "recorded_preprocessing"]


def recorded_preprocessing(model: nn.Module):
    """The :class:`qdetr.models.PreprocessingConfig` recorded with a loaded model, else the default.

    It is the ``preprocessing`` entry of the model's ``config.json`` (written by the trainer and
    by ``save_pretrained(..., preprocessing=...)``); files of qdetr 0.1 spelled it
    ``eval_size/max_size/mean/std``, possibly under ``provenance``, and are read too.

    Examples:
        >>> from qdetr.models import create_model
        >>> from qdetr.zoo.prediction import recorded_preprocessing
        >>> recorded_preprocessing(create_model("detr_tiny")).shortest_edge  # nothing recorded: 800/1333
        800
    """
    from qdetr.models.preprocessing import PreprocessingConfig

    info = getattr(model, "qdetr_pretrained_config", None) or {}
    data = info.get("preprocessing") or (info.get("provenance") or {}).get("preprocessing")
    return PreprocessingConfig.from_dict(data) if data else PreprocessingConfig()


def load_image(image: Any) -> Any:
    """Open a path as an RGB PIL image; other inputs are returned unchanged.

    Raises:
        FileNotFoundError: a path that does not exist.
        InputImageError: a file that is not a readable image, or an empty or extremely
            elongated image (see :func:`qdetr.image_io.read_rgb_image`; 16-bit files are scaled).
    """
    if isinstance(image, (str, os.PathLike)):
        from qdetr.image_io import read_rgb_image

        return read_rgb_image(image)
    return image


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Any,
    threshold: float = 0.5,
    *,
    batch_size: int = 1,
    preprocessing=None,
    top_k: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Detect objects in images.

    Args:
        model: a qdetr detector (``forward(pixel_values, pixel_mask)``).
        images: one image or a sequence of images: ``PIL.Image``, file paths, ``(3, H, W)``
            tensors (uint8, or float in [0, 1]) or ``(H, W, 3)`` uint8 arrays.
        threshold: keep detections with a score above it.
        batch_size: images per forward pass. 1 (default) makes each image's result
            independent of the others (padding to a common size changes DETR outputs slightly).
        preprocessing: a :class:`qdetr.models.PreprocessingConfig`; default: the one recorded
            with the model (:func:`recorded_preprocessing`), else the 800/1333 resize.
        top_k: sigmoid (SMCA) heads: (query, class) pairs considered before thresholding.

    Returns:
        One dict per image with ``scores`` (N,), ``labels`` (N,) int64 class ids (names in
        ``model.id2label``) and ``boxes`` (N, 4) absolute xyxy pixels of the original image,
        sorted by descending score, on CPU.

    Raises:
        ValueError: empty input or a non-positive ``batch_size``.

    Examples:
        >>> import torch
        >>> from qdetr.models import PreprocessingConfig, create_model
        >>> from qdetr.zoo import predict
        >>> model = create_model("detr_tiny")
        >>> image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8)
        >>> config = PreprocessingConfig(shortest_edge=64, longest_edge=128)
        >>> [detections] = predict(model, image, threshold=0.0, preprocessing=config)
        >>> sorted(detections), detections["boxes"].shape  # every query scores above 0
        (['boxes', 'labels', 'scores'], torch.Size([10, 4]))
        >>> model.training  # restored after prediction
        True
        >>> predict(model, ["street.jpg"], threshold=0.7)  # doctest: +SKIP
    """
    from qdetr.models import post_process_object_detection, preprocess_images

    if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("predict got no images; pass an image, a path or a list of them")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if preprocessing is None:
        preprocessing = recorded_preprocessing(model)
    # A parameter-free wrapper (e.g. an onnxruntime session) takes float32 CPU inputs.
    reference = next(model.parameters(), torch.empty(0))
    was_training = model.training
    model.eval()
    results: list[dict[str, torch.Tensor]] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = [load_image(im) for im in images[start : start + batch_size]]
            batch = preprocess_images(chunk, preprocessing)
            outputs = model(batch["pixel_values"].to(reference.device, reference.dtype),
                            batch["pixel_mask"].to(reference.device))
            detections = post_process_object_detection(
                outputs, threshold=threshold, target_sizes=batch["original_sizes"].to(reference.device), top_k=top_k
            )
            results.extend({k: v.detach().cpu() for k, v in det.items()} for det in detections)
    finally:
        model.train(was_training)
    return results
