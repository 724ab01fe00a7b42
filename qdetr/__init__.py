"""qdetr: low-bit quantization-aware training and Q-DETR distillation for DETR detectors.

The top-level API, grouped by role:

* quantization: :func:`quantize_model`, :class:`QuantConfig`, :func:`quant_summary`, :func:`calibrate`;
* distillation: :class:`DistillationLoss`;
* models: :func:`create_model`, :func:`list_models`, :func:`post_process_object_detection`;
* model zoo: :func:`from_pretrained`, :func:`list_pretrained`, :func:`save_pretrained`;
* deployment: :func:`export_onnx` (QDQ ONNX for integer kernels).

Examples:
    >>> import torch
    >>> import qdetr
    >>> _ = torch.manual_seed(0)
    >>> model = qdetr.quantize_model(qdetr.create_model("detr_tiny"), bits=4)   # W4/A4/Attn8
    >>> images = torch.randn(2, 3, 64, 64)                                      # (B, 3, H, W)
    >>> model = qdetr.calibrate(model.eval(), [images])
    >>> out = model(images)
    >>> out["pred_logits"].shape, out["pred_boxes"].shape    # boxes: (B, Q, 4) normalised cxcywh
    (torch.Size([2, 10, 6]), torch.Size([2, 10, 4]))
"""

__version__ = "0.1.0"

from qdetr.distill import DistillationLoss
from qdetr.export import export_onnx
from qdetr.models import create_model, list_models, post_process_object_detection
from qdetr.quant import QuantConfig, calibrate, quant_summary, quantize_model
from qdetr.zoo import from_pretrained, list_pretrained, save_pretrained

__all__ = [
    "__version__",
    # quantization
    "quantize_model",
    "QuantConfig",
    "quant_summary",
    "calibrate",
    # distillation
    "DistillationLoss",
    # models
    "create_model",
    "list_models",
    "post_process_object_detection",
    # model zoo
    "from_pretrained",
    "list_pretrained",
    "save_pretrained",
    # deployment
    "export_onnx",
]
