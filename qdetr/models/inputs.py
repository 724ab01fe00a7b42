"""Validation of detector inputs in the Hugging Face convention (mask 1 = real pixel)."""

from __future__ import annotations

import torch

__all__ = ["padding_mask_from_pixel_mask", "image_sizes_wh_from_pixel_mask"]


def padding_mask_from_pixel_mask(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
    """Check ``pixel_values``/``pixel_mask`` and return the padding mask of the original code.

    Args:
        pixel_values: (B, 3, H, W) normalised images, floating point.
        pixel_mask: (B, H, W), 1 (or True) on real pixels and 0 on padding; None means no
            padding.

    Returns:
        (B, H, W) bool, True on padded pixels.

    Raises:
        TypeError: if the inputs are not tensors or pixel_values is not floating point.
        ValueError: on an empty batch, a wrong channel count or a mask of the wrong shape.

    Examples:
        >>> from qdetr.models.inputs import padding_mask_from_pixel_mask
        >>> pixel_values = torch.zeros(1, 3, 2, 3)
        >>> pixel_mask = torch.tensor([[[1, 1, 0], [1, 1, 0]]])
        >>> padding_mask_from_pixel_mask(pixel_values, pixel_mask)
        tensor([[[False, False,  True],
                 [False, False,  True]]])
        >>> padding_mask_from_pixel_mask(pixel_values, None).any().item()
        False
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be a torch.Tensor of shape (B, 3, H, W), got {type(pixel_values).__name__}; "
            "use qdetr.models.preprocess_images() to convert PIL images"
        )
    if pixel_values.dim() != 4:
        raise ValueError(
            f"pixel_values must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}; "
            "add a batch dimension with pixel_values.unsqueeze(0)"
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values is an empty batch (B = 0); pass at least one image")
    if pixel_values.shape[1] != 3:
        raise ValueError(
            f"pixel_values must have 3 (RGB) channels in dim 1, got {pixel_values.shape[1]} "
            f"(shape {tuple(pixel_values.shape)}); convert grayscale/RGBA images to RGB, and use (B, C, H, W) order"
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be floating point, got {pixel_values.dtype}; "
            "normalise images with qdetr.models.preprocess_images()"
        )
    b, _, h, w = pixel_values.shape
    if pixel_mask is None:
        return torch.zeros((b, h, w), dtype=torch.bool, device=pixel_values.device)
    if not isinstance(pixel_mask, torch.Tensor):
        raise TypeError(f"pixel_mask must be a torch.Tensor of shape (B, H, W), got {type(pixel_mask).__name__}")
    if tuple(pixel_mask.shape) != (b, h, w):
        raise ValueError(
            f"pixel_mask must have shape (B, H, W) = {(b, h, w)} to match pixel_values, got "
            f"{tuple(pixel_mask.shape)}; pad images and masks together (qdetr.models.preprocess_images)"
        )
    return pixel_mask == 0


def image_sizes_wh_from_pixel_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """Real (unpadded) size of each image, (width, height), from a top-left aligned mask.

    Args:
        padding_mask: (B, H, W) bool, True on padding.

    Returns:
        (B, 2) int64: number of columns and rows that contain a real pixel.

    Examples:
        >>> from qdetr.models.inputs import image_sizes_wh_from_pixel_mask
        >>> padding_mask = torch.ones(2, 4, 5, dtype=torch.bool)
        >>> padding_mask[0, :3, :4] = False     # a 4 x 3 (w x h) image
        >>> padding_mask[1, :, :] = False       # an unpadded 5 x 4 image
        >>> image_sizes_wh_from_pixel_mask(padding_mask)
        tensor([[4, 3],
                [5, 4]])
    """
    real = ~padding_mask
    width = real.any(dim=1).sum(dim=-1)  # (B,)
    height = real.any(dim=2).sum(dim=-1)  # (B,)
    return torch.stack([width, height], dim=-1)
