"""Image preprocessing for DETR-family models (the ``DetrImageProcessor`` recipe).

1. resize so that the shorter side is ``shortest_edge`` (800) unless the longer side would
   exceed ``longest_edge`` (1333), keeping the aspect ratio (facebookresearch/detr
   ``get_size_with_aspect_ratio``), bilinear with antialiasing;
2. scale to [0, 1] and normalise with the ImageNet mean and std;
3. pad bottom/right with zeros to the largest image of the batch and build ``pixel_mask``
   (1 = real pixel, 0 = padding).

Accepted images: ``PIL.Image.Image`` (converted to RGB), ``torch.Tensor`` (3, H, W) uint8 or
float in [0, 1], or ``numpy.ndarray`` (H, W, 3) uint8.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from qdetr.image_io import check_pixel_tensor, to_rgb

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PreprocessingConfig",
    "resized_size_hw",
    "image_to_tensor",
    "pad_and_mask",
    "preprocess_images",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class PreprocessingConfig:
    """Resize, normalisation and padding settings.

    Attributes:
        shortest_edge: target length of the shorter side (pixels).
        longest_edge: upper bound on the longer side; None = unbounded.
        do_resize: resize at all.
        image_mean, image_std: per-channel normalisation (RGB, on [0, 1] values).

    Raises:
        ValueError: on an invalid edge length or normalisation.

    Examples:
        >>> import torch
        >>> from qdetr.models import PreprocessingConfig, preprocess_images
        >>> config = PreprocessingConfig(shortest_edge=64, longest_edge=128)
        >>> preprocess_images([torch.rand(3, 120, 200)], config)["pixel_values"].shape
        torch.Size([1, 3, 64, 106])
        >>> PreprocessingConfig(shortest_edge=800, longest_edge=600)
        Traceback (most recent call last):
        ...
        ValueError: longest_edge (600) must be >= shortest_edge (800) or None
    """

    shortest_edge: int = 800
    longest_edge: int | None = 1333
    do_resize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.shortest_edge < 1:
            raise ValueError(f"shortest_edge must be >= 1, got {self.shortest_edge}")
        if self.longest_edge is not None and self.longest_edge < self.shortest_edge:
            raise ValueError(
                f"longest_edge ({self.longest_edge}) must be >= shortest_edge ({self.shortest_edge}) or None"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image_mean and image_std need 3 values each, with std > 0")
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

    #: Spellings of qdetr 0.1 run files (``eval_size/max_size/mean/std``) -> field names.
    LEGACY_NAMES: ClassVar[dict[str, str]] = {
        "eval_size": "shortest_edge", "max_size": "longest_edge", "mean": "image_mean", "std": "image_std",
    }

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (the ``preprocessing`` entry of a model's ``config.json``).

        Examples:
            >>> from qdetr.models import PreprocessingConfig
            >>> PreprocessingConfig(shortest_edge=64, longest_edge=None).to_dict()["longest_edge"] is None
            True
        """
        return {
            "shortest_edge": self.shortest_edge,
            "longest_edge": self.longest_edge,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessingConfig":
        """Build from :meth:`to_dict` output; the qdetr 0.1 names ``eval_size``, ``max_size``,
        ``mean``, ``std`` are read too.

        Raises:
            ValueError: for an unknown key (the message lists the valid ones).

        Examples:
            >>> from qdetr.models import PreprocessingConfig
            >>> PreprocessingConfig.from_dict({"eval_size": 64, "max_size": None}).shortest_edge
            64
            >>> PreprocessingConfig.from_dict({"size": 64})
            Traceback (most recent call last):
            ...
            ValueError: unknown preprocessing key(s) ['size']; valid: ['do_resize', 'image_mean', 'image_std', 'longest_edge', 'shortest_edge']
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in dict(data).items():
            key = cls.LEGACY_NAMES.get(key, key)
            if key not in names:
                raise ValueError(f"unknown preprocessing key(s) {[key]}; valid: {sorted(names)}")
            kwargs[key] = value
        return cls(**kwargs)


def resized_size_hw(height: int, width: int, shortest_edge: int, longest_edge: int | None) -> tuple[int, int]:
    """Output (height, width) of the DETR resize rule."""
    size = shortest_edge
    if longest_edge is not None:
        min_side, max_side = float(min(height, width)), float(max(height, width))
        if max_side / min_side * size > longest_edge:
            size = int(round(longest_edge * min_side / max_side))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def image_to_tensor(image) -> torch.Tensor:
    """Convert one image to a (3, H, W) float32 tensor in [0, 1].

    Raises:
        TypeError: for unsupported image types.
        ValueError: for a wrong number of channels.
        InputImageError: an empty or extremely elongated image, or a float tensor with NaN/inf
            or values outside [0, 1] (see :func:`qdetr.image_io.check_pixel_tensor`).
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        tensor = TF.pil_to_tensor(to_rgb(image))  # 16-bit and float modes scaled, not clipped
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy images must be (H, W, 3) RGB, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        tensor = image
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}; pass PIL images, (3, H, W) tensors or (H, W, 3) arrays"
        )
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(
            f"image tensors must be (3, H, W) RGB, got shape {tuple(tensor.shape)}; "
            "convert grayscale/RGBA to RGB and use channels-first order"
        )
    if tensor.dtype == torch.uint8:
        check_pixel_tensor(tensor)
        return tensor.float() / 255.0
    if not tensor.is_floating_point():
        raise TypeError(f"image tensors must be uint8 or floating point in [0, 1], got {tensor.dtype}")
    check_pixel_tensor(tensor)
    return tensor.float()


def pad_and_mask(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (3, h_i, w_i) images bottom/right to a batch.

    Args:
        images: B tensors of shape (3, h_i, w_i), same dtype and device.

    Returns:
        ``(pixel_values (B, 3, H, W), pixel_mask (B, H, W) int64)`` with 1 on real pixels,
        where H and W are the largest h_i and w_i.

    Raises:
        ValueError: for an empty sequence.

    Examples:
        >>> import torch
        >>> from qdetr.models import pad_and_mask
        >>> pixel_values, pixel_mask = pad_and_mask([torch.ones(3, 4, 6), torch.ones(3, 5, 3)])
        >>> pixel_values.shape, pixel_mask.shape
        (torch.Size([2, 3, 5, 6]), torch.Size([2, 5, 6]))
        >>> pixel_mask.sum(dim=(1, 2)).tolist()
        [24, 15]
    """
    if len(images) == 0:
        raise ValueError("no images to pad; pass at least one image")
    height = max(int(im.shape[-2]) for im in images)
    width = max(int(im.shape[-1]) for im in images)
    first = images[0]
    pixel_values = first.new_zeros((len(images), first.shape[0], height, width))
    pixel_mask = torch.zeros((len(images), height, width), dtype=torch.int64, device=first.device)
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        pixel_values[i, :, :h, :w] = im
        pixel_mask[i, :h, :w] = 1
    return pixel_values, pixel_mask


def preprocess_images(images, config: PreprocessingConfig | None = None) -> dict[str, torch.Tensor]:
    """Resize, normalise and pad a list of images.

    Args:
        images: one image or a sequence of images (see the module docstring).
        config: settings; defaults to shortest 800 / longest 1333, ImageNet normalisation.

    Returns:
        dict with ``pixel_values`` (B, 3, H, W) float32, ``pixel_mask`` (B, H, W) int64 (1 =
        real pixel), ``original_sizes`` (B, 2) and ``sizes`` (B, 2) as (height, width) before
        and after the resize (pass ``original_sizes`` to ``post_process_object_detection``).

    Raises:
        ValueError: for an empty list or an image with the wrong number of channels.
        TypeError: for an unsupported image type.

    Examples:
        >>> import torch
        >>> from qdetr.models import PreprocessingConfig, preprocess_images
        >>> images = [torch.randint(0, 256, (3, 120, 200), dtype=torch.uint8), torch.rand(3, 90, 90)]
        >>> batch = preprocess_images(images, PreprocessingConfig(shortest_edge=64, longest_edge=128))
        >>> batch["pixel_values"].shape, batch["pixel_mask"].shape
        (torch.Size([2, 3, 64, 106]), torch.Size([2, 64, 106]))
        >>> batch["original_sizes"].tolist(), batch["sizes"].tolist()
        ([[120, 200], [90, 90]], [[64, 106], [64, 64]])
    """
    config = config or PreprocessingConfig()
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess_images got an empty list; pass at least one image")
    mean = torch.tensor(config.image_mean).view(3, 1, 1)
    std = torch.tensor(config.image_std).view(3, 1, 1)
    processed, original_sizes, sizes = [], [], []
    for image in images:
        tensor = image_to_tensor(image)
        h, w = tensor.shape[-2:]
        original_sizes.append((h, w))
        if config.do_resize:
            new_h, new_w = resized_size_hw(h, w, config.shortest_edge, config.longest_edge)
            if (new_h, new_w) != (h, w):
                tensor = TF.resize(tensor, [new_h, new_w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        sizes.append(tuple(tensor.shape[-2:]))
        processed.append((tensor - mean.to(tensor.device)) / std.to(tensor.device))
    pixel_values, pixel_mask = pad_and_mask(processed)
    return {
        "pixel_values": pixel_values,
        "pixel_mask": pixel_mask,
        "original_sizes": torch.tensor(original_sizes, dtype=torch.int64),
        "sizes": torch.tensor(sizes, dtype=torch.int64),
    }
