"""Export helpers: a tuple-returning wrapper for ``torch.export`` / ONNX.

``torch.export`` and the ONNX exporter want tensors (or tuples of tensors) as outputs;
:class:`DetectorForExport` returns ``(pred_logits, pred_boxes)`` and keeps ``pixel_mask``
as an input, so exported graphs still handle padded, non-square batches.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DetectorForExport"]


class DetectorForExport(nn.Module):
    """Wrap a qdetr detector for export.

    Args:
        model: a ``Detr`` or ``SmcaDetr`` (float or quantized), usually in eval mode.

    Shapes:
        pixel_values: (B, 3, H, W); pixel_mask: (B, H, W), 1 = real pixel.
        returns ``(pred_logits (B, Q, C+1), pred_boxes (B, Q, 4) normalised cxcywh)``.

    Examples:
        >>> import torch
        >>> from qdetr.models import DetectorForExport, create_model
        >>> wrapper = DetectorForExport(create_model("detr_tiny").eval())
        >>> pixel_values = torch.randn(1, 3, 64, 64)
        >>> pixel_mask = torch.ones(1, 64, 64, dtype=torch.int64)
        >>> with torch.no_grad():
        ...     pred_logits, pred_boxes = wrapper(pixel_values, pixel_mask)
        >>> pred_logits.shape, pred_boxes.shape
        (torch.Size([1, 10, 6]), torch.Size([1, 10, 4]))
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values, pixel_mask)
        return out["pred_logits"], out["pred_boxes"]
