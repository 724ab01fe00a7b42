"""DETR training and evaluation transforms (torchvision transforms v2).

Inputs are ``(tv_tensors.Image, target)`` pairs where ``target["boxes"]`` is a
``tv_tensors.BoundingBoxes`` in absolute XYXY pixels and ``target["labels"]`` an int64
tensor; transforms v2 moves, crops and flips the boxes together with the image.

The training recipe follows facebookresearch/detr (method.md section 7):

* random horizontal flip, then either
* (a) a multi-scale resize of the short side to one of ``scales`` (max long side ``max_size``), or
* (b) a resize to one of ``crop_resize_scales``, a random crop with sides in ``crop_size``,
  then (a);
* conversion to float in [0, 1] and ImageNet normalisation.

Scales are configurable so tiny configurations can train on small images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from qdetr.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TransformConfig",
    "RandomSizeCrop",
    "make_train_transforms",
    "make_eval_transforms",
]

#: DETR's multi-scale short sides: 480..800 in steps of 32.
DETR_TRAIN_SCALES = tuple(range(480, 801, 32))


@dataclass(frozen=True, kw_only=True)
class TransformConfig:
    """Image sizes of the DETR transforms.

    Args:
        train_scales: short sides drawn uniformly at training time (DETR: 480..800 step 32).
        max_size: cap on the long side, training and evaluation (DETR: 1333); None = no cap.
            torchvision needs it strictly larger than every short side.
        eval_size: short side at evaluation (DETR: 800).
        random_crop: use DETR's "resize, random crop, resize" branch with probability 0.5.
        crop_resize_scales: short sides before the crop (DETR: 400, 500, 600).
        crop_size: (min, max) side of the random crop (DETR: 384, 600).
        hflip_prob: probability of a horizontal flip.
        mean: per-channel (R, G, B) normalisation mean (ImageNet).
        std: per-channel (R, G, B) normalisation standard deviation (ImageNet).

    Raises:
        ValueError: on empty or non-positive sizes.

    Examples:
        >>> from qdetr.data import TransformConfig
        >>> config = TransformConfig.small(128)
        >>> config.eval_size, config.max_size
        (128, 213)
        >>> TransformConfig(train_scales=(800,), max_size=640)
        Traceback (most recent call last):
        ...
        ValueError: max_size (640) must be > every short side (or None for no cap) ...
    """

    train_scales: tuple[int, ...] = DETR_TRAIN_SCALES
    max_size: int | None = 1333
    eval_size: int = 800
    random_crop: bool = True
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)
    hflip_prob: float = 0.5
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_scales", tuple(int(s) for s in self.train_scales))
        object.__setattr__(self, "crop_resize_scales", tuple(int(s) for s in self.crop_resize_scales))
        object.__setattr__(self, "crop_size", tuple(int(s) for s in self.crop_size))
        object.__setattr__(self, "mean", tuple(float(s) for s in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not self.train_scales or min(self.train_scales) <= 0:
            raise ValueError(f"train_scales must be non-empty positive sizes; got {self.train_scales}")
        if self.max_size is not None and self.max_size <= max(self.train_scales + (self.eval_size,)):
            raise ValueError(
                f"max_size ({self.max_size}) must be > every short side (or None for no cap) "
                f"(train_scales max {max(self.train_scales)}, eval_size {self.eval_size})"
            )
        if self.eval_size <= 0:
            raise ValueError(f"eval_size must be positive; got {self.eval_size}")
        if len(self.crop_size) != 2 or not 0 < self.crop_size[0] <= self.crop_size[1]:
            raise ValueError(f"crop_size must be (min, max) with 0 < min <= max; got {self.crop_size}")
        if self.random_crop and (not self.crop_resize_scales or min(self.crop_resize_scales) <= 0):
            raise ValueError("crop_resize_scales must be positive sizes when random_crop=True")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1]; got {self.hflip_prob}")

    @classmethod
    def small(cls, size: int = 128) -> "TransformConfig":
        """A scaled-down recipe for tiny models: short sides around ``size`` pixels.

        Examples:
            >>> from qdetr.data import TransformConfig
            >>> config = TransformConfig.small(64)
            >>> config.train_scales, config.eval_size, config.crop_size
            ((48, 64), 64, (38, 64))
        """
        scales = tuple(sorted({max(16, int(round(size * f / 16)) * 16) for f in (0.75, 0.875, 1.0, 1.125)}))
        return cls(
            train_scales=scales,
            max_size=int(size * 5 / 3),
            eval_size=size,
            crop_resize_scales=(int(size * 0.75), size),
            crop_size=(int(size * 0.6), size),
        )


class RandomSizeCrop(v2.Transform):
    """DETR's ``RandomSizeCrop``: a crop of random width in [min_size, min(W, max_size)] and
    random height in [min_size, min(H, max_size)] at a random position; boxes follow.

    Args:
        min_size: smallest crop side in pixels.
        max_size: largest crop side in pixels.

    Examples:
        >>> import torch
        >>> from torchvision import tv_tensors
        >>> from qdetr.data.transforms import RandomSizeCrop
        >>> image = tv_tensors.Image(torch.zeros(3, 100, 80))
        >>> boxes_xyxy = tv_tensors.BoundingBoxes(
        ...     torch.tensor([[10.0, 10.0, 50.0, 60.0]]), format="XYXY", canvas_size=(100, 80)
        ... )
        >>> cropped, cropped_boxes = RandomSizeCrop(40, 60)(image, boxes_xyxy)
        >>> 40 <= cropped.shape[-2] <= 60 and 40 <= cropped.shape[-1] <= 60
        True
        >>> tuple(cropped_boxes.canvas_size) == tuple(cropped.shape[-2:])
        True
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def make_params(self, flat_inputs: list) -> dict:
        image = next(x for x in flat_inputs if isinstance(x, (tv_tensors.Image, torch.Tensor)))
        height, width = TF.get_size(image)
        crop_w = int(torch.randint(min(self.min_size, width), min(width, self.max_size) + 1, ()).item())
        crop_h = int(torch.randint(min(self.min_size, height), min(height, self.max_size) + 1, ()).item())
        top = int(torch.randint(0, height - crop_h + 1, ()).item())
        left = int(torch.randint(0, width - crop_w + 1, ()).item())
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt, params: dict):
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.BoundingBoxes, tv_tensors.Mask)):
            return TF.crop(inpt, **params)
        return inpt


def _normalize(config: TransformConfig) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(config.mean), std=list(config.std))]


def make_train_transforms(config: TransformConfig) -> v2.Compose:
    """DETR's training augmentation (flip, multi-scale resize or resize-crop-resize, normalise).

    The returned transform takes ``(image, target)`` and returns them transformed; boxes
    that the crop leaves empty are removed by ``v2.SanitizeBoundingBoxes`` (with their labels).

    Args:
        config: scales, crop sizes, flip probability and normalisation.

    Returns:
        A transform mapping ``(image (3, H, W) uint8, target)`` with ``target["boxes"]``
        (N, 4) absolute xyxy ``BoundingBoxes`` and ``target["labels"]`` (N,) to
        ``(image (3, H', W') float32 normalised, target)`` with boxes (N', 4) absolute xyxy
        in the new image (N' <= N).

    Examples:
        >>> import torch
        >>> from torchvision import tv_tensors
        >>> from qdetr.data import TransformConfig, make_train_transforms
        >>> transform = make_train_transforms(TransformConfig.small(64))
        >>> image = tv_tensors.Image(torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8))
        >>> boxes_xyxy = tv_tensors.BoundingBoxes(
        ...     torch.tensor([[8.0, 8.0, 40.0, 48.0]]), format="XYXY", canvas_size=(64, 80)
        ... )
        >>> out_image, out_target = transform(image, {"boxes": boxes_xyxy, "labels": torch.tensor([1])})
        >>> out_image.dtype, out_image.shape[0]
        (torch.float32, 3)
        >>> out_target["boxes"].shape[0] == out_target["labels"].shape[0] <= 1
        True
    """
    resize = v2.RandomShortestSize(min_size=list(config.train_scales), max_size=config.max_size)
    if config.random_crop:
        crop_branch = v2.Compose(
            [
                v2.RandomShortestSize(min_size=list(config.crop_resize_scales), max_size=config.max_size),
                RandomSizeCrop(*config.crop_size),
                v2.RandomShortestSize(min_size=list(config.train_scales), max_size=config.max_size),
            ]
        )
        scale_step = v2.RandomChoice([resize, crop_branch])
    else:
        scale_step = resize
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=config.hflip_prob),
            scale_step,
            v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_labels_getter),
            *_normalize(config),
        ]
    )


def make_eval_transforms(config: TransformConfig) -> v2.Compose:
    """Deterministic evaluation transform: short side ``eval_size`` (long side <= ``max_size``), normalise.

    Args:
        config: ``eval_size``, ``max_size`` and normalisation.

    Returns:
        A transform mapping ``(image (3, H, W) uint8, target)`` with ``target["boxes"]``
        (N, 4) absolute xyxy ``BoundingBoxes`` to ``(image (3, H', W') float32 normalised,
        target)`` with the boxes scaled to the resized image (still absolute xyxy).

    Examples:
        >>> import torch
        >>> from torchvision import tv_tensors
        >>> from qdetr.data import TransformConfig, make_eval_transforms
        >>> transform = make_eval_transforms(TransformConfig.small(64))
        >>> image = tv_tensors.Image(torch.randint(0, 256, (3, 32, 40), dtype=torch.uint8))
        >>> boxes_xyxy = tv_tensors.BoundingBoxes(
        ...     torch.tensor([[4.0, 4.0, 20.0, 24.0]]), format="XYXY", canvas_size=(32, 40)
        ... )
        >>> out_image, out_target = transform(image, {"boxes": boxes_xyxy, "labels": torch.tensor([1])})
        >>> tuple(out_image.shape), out_target["boxes"].tolist()
        ((3, 64, 80), [[8.0, 8.0, 40.0, 48.0]])
    """
    return v2.Compose(
        [
            v2.Resize(size=config.eval_size, max_size=config.max_size),
            *_normalize(config),
        ]
    )


def _labels_getter(inputs):
    """Finds the labels next to the boxes in ``(image, target)`` for ``SanitizeBoundingBoxes``."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) and len(inputs) > 1 else inputs
    return target["labels"]
