"""Batching of variable-size detection samples: zero padding plus a pixel mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DetectionBatch", "collate_detection"]


@dataclass
class DetectionBatch:
    """A padded batch.

    Attributes:
        pixel_values: (B, 3, H, W) images, zero-padded at the bottom and right to the largest
            H and W of the batch (rounded up to ``size_divisor``).
        pixel_mask: (B, H, W) int64, 1 = real pixel, 0 = padding (Hugging Face convention).
        targets: one DETR target dict per image (see :mod:`qdetr.data.coco`), with
            ``boxes`` (N_i, 4) normalised cxcywh relative to the unpadded ``size``.

    Examples:
        >>> import torch
        >>> from qdetr.data import collate_detection
        >>> target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        >>> batch = collate_detection([(torch.rand(3, 60, 64), target), (torch.rand(3, 64, 48), target)])
        >>> batch.pixel_values.shape, batch.pixel_mask.shape, len(batch)
        (torch.Size([2, 3, 64, 64]), torch.Size([2, 64, 64]), 2)
        >>> batch.to("cpu", torch.float64).pixel_values.dtype
        torch.float64
    """

    pixel_values: torch.Tensor
    pixel_mask: torch.Tensor
    targets: list[dict]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "DetectionBatch":
        """Moves images, masks and target tensors to ``device`` (images also to ``dtype``).

        Args:
            device: target device.
            dtype: float dtype for ``pixel_values`` (B, 3, H, W); None keeps it. The mask
                stays int64 and the targets keep their dtypes.

        Returns:
            A new batch; this one is unchanged.

        Examples:
            >>> import torch
            >>> from qdetr.data import collate_detection
            >>> batch = collate_detection([(torch.rand(3, 8, 8), {"labels": torch.tensor([1])})])
            >>> moved = batch.to("cpu", torch.float64)
            >>> moved.pixel_values.dtype, moved.pixel_mask.dtype
            (torch.float64, torch.int64)
        """
        pixel_values = self.pixel_values.to(device)
        if dtype is not None:
            pixel_values = pixel_values.to(dtype)
        targets = [
            {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in self.targets
        ]
        return DetectionBatch(pixel_values, self.pixel_mask.to(device), targets)

    def __len__(self) -> int:
        return self.pixel_values.shape[0]


def collate_detection(samples: list[tuple[torch.Tensor, dict]], size_divisor: int = 1) -> DetectionBatch:
    """Pads ``(image (3, H_i, W_i), target)`` samples into a :class:`DetectionBatch`.

    Args:
        samples: images (3, H_i, W_i) and their DETR targets; targets are passed through
            unchanged (normalised cxcywh boxes refer to the unpadded ``size``, as in DETR).
        size_divisor: round the padded H and W up to a multiple of this (1 = no rounding).

    Returns:
        The padded batch: ``pixel_values`` (B, 3, H, W) with H = max H_i and W = max W_i
        (rounded up to ``size_divisor``) and ``pixel_mask`` (B, H, W) int64 (1 = real pixel).

    Raises:
        ValueError: on an empty list or images that are not (3, H, W).

    Examples:
        >>> import torch
        >>> from qdetr.data import collate_detection
        >>> target = {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([1])}
        >>> samples = [(torch.rand(3, 50, 40), target), (torch.rand(3, 64, 48), target)]
        >>> batch = collate_detection(samples, size_divisor=32)
        >>> tuple(batch.pixel_values.shape), tuple(batch.pixel_mask.shape)
        ((2, 3, 64, 64), (2, 64, 64))
        >>> int(batch.pixel_mask[0].sum()), batch.targets[1] is target
        (2000, True)
        >>> collate_detection([(torch.rand(1, 8, 8), target)])
        Traceback (most recent call last):
        ...
        ValueError: expected images of shape (3, H, W); got (1, 8, 8)
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    images = [image for image, _ in samples]
    for image in images:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected images of shape (3, H, W); got {tuple(image.shape)}")
    max_h = max(image.shape[1] for image in images)
    max_w = max(image.shape[2] for image in images)
    if size_divisor > 1:
        max_h = -(-max_h // size_divisor) * size_divisor
        max_w = -(-max_w // size_divisor) * size_divisor
    batch = images[0].new_zeros((len(images), 3, max_h, max_w))
    mask = torch.zeros((len(images), max_h, max_w), dtype=torch.int64)
    for i, image in enumerate(images):
        _, h, w = image.shape
        batch[i, :, :h, :w] = image
        mask[i, :h, :w] = 1
    return DetectionBatch(batch, mask, [target for _, target in samples])
