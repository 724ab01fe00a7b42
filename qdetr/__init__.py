"""qdetr: low-bit quantization-aware training and Q-DETR distillation for DETR detectors.

The top-level API, grouped by role:

* quantization: :func:`quantize_model`, :class:`QuantConfig`, :func:`quant_summary`, :func:`calibrate`;
* distillation: :class:`DistillationLoss`;
* models: :func:`create_model`, :func:`list_models`, :func:`post_process_object_detection`;
* model zoo: :func:`resolve_model` (any model source), :func:`from_pretrained`, :func:`list_pretrained`, :func:`save_pretrained`;
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

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below, for type checkers and the API reference; imported lazily at run time
    from qdetr.distill import DistillationLoss
    from qdetr.export import export_onnx
    from qdetr.models import create_model, list_models, post_process_object_detection
    from qdetr.quant import QuantConfig, calibrate, quant_summary, quantize_model
    from qdetr.zoo import from_pretrained, list_pretrained, resolve_model, save_pretrained

#: Where each top-level name lives. Imported on first use, so ``import qdetr.models`` (or
#: ``qdetr.quant``) loads only that package and what it needs, never the zoo.
_EXPORTS = {
    "quantize_model": "qdetr.quant",
    "QuantConfig": "qdetr.quant",
    "quant_summary": "qdetr.quant",
    "calibrate": "qdetr.quant",
    "DistillationLoss": "qdetr.distill",
    "create_model": "qdetr.models",
    "list_models": "qdetr.models",
    "post_process_object_detection": "qdetr.models",
    "from_pretrained": "qdetr.zoo",
    "resolve_model": "qdetr.zoo",
    "list_pretrained": "qdetr.zoo",
    "save_pretrained": "qdetr.zoo",
    "export_onnx": "qdetr.export",
}


def __getattr__(name: str):
    """Top-level names, imported from their package on first use (see ``_EXPORTS``)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qdetr' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
    "resolve_model",
    "from_pretrained",
    "list_pretrained",
    "save_pretrained",
    # deployment
    "export_onnx",
]
